"""BAT chapter (Xu et al., arXiv 2106.04794): memorization in adversarial training and Benign
Adversarial Training, first public implementation.

What ``run`` computes, each piece a cached run (``results/bat/``):

- ``subsets-<data>``: K models trained on random 70% subsets of the training set, each
  model's correctness on every training and test example (one file per model: a killed
  estimation resumes at the next missing model; a model killed mid-training resumes from
  its checkpoint);
- ``proxy-<data>``: one standard training run on the whole training set whose per-epoch
  training-set correctness gives the learning-speed proxy, and whose features give each test
  example's nearest same-class training neighbours (the candidates for high influence);
- ``memorization-<data>``: the memorization estimate with its standard error, the largest
  influence of an atypical training example on each test example (over those candidates),
  and the proxy-estimate correlation;
- ``pgd_at``: PGD adversarial training on everything, with per-epoch clean and PGD
  correctness of the first ``curve_test`` test examples (finding (a));
- ``typical+<f>``: PGD-AT on the typical examples plus a fraction f of the atypical ones
  (finding (b));
- ``trades``, ``bat-a<alpha>``: the baselines and BAT, evaluated with PGD (and AutoAttack).

Every split, curve and table the notebook shows is recomputed from those runs' arrays.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from repro import (attacks, claims, data, distributed, ensemble, evaluate, memorization,
                   objectives, results, train, typicality)
from repro.experiments import common
from repro.params import Param, Spec
from repro.train import TrainConfig

CHAPTER = "bat"

SPEC = Spec(CHAPTER, [
    Param("dataset", "str", "main dataset", choices=("cifar100", "cifar10")),
    Param("contrast", "str", "second dataset whose memorization is estimated as a contrast",
          choices=("none", "cifar10", "cifar100")),
    Param("n_train", "int", "training images (None: all 48,000 after the validation split)",
          optional=True, ge=1, le=48000),
    Param("n_val", "int", "validation images (checkpoint selection; never the test set)",
          ge=0, le=2000),
    Param("n_test", "int", "test images", ge=1, le=10000),
    Param("mem_k", "int", "number of subset models K of the memorization estimator", ge=2),
    Param("contrast_mem_k", "int", "K for the contrast dataset (None: mem_k); the contrast "
          "is a description, the main dataset's K decides the atypical test split",
          optional=True, ge=2),
    Param("mem_fraction", "float", "fraction of the training set each subset model sees",
          gt=0, lt=1),
    Param("mem_arch", "str", "architecture of the subset models and the proxy run",
          choices=("small_cnn", "preact_resnet18")),
    Param("mem_width", "int", "channel width of the subset models", ge=1),
    Param("mem_epochs", "int", "epochs of each subset model (and of the proxy run)", ge=1),
    Param("mem_batch_size", "int", "batch size of the subset models and the proxy run (large "
          "on a GPU: the K models are small and launch-bound)", ge=1),
    Param("mem_augment", "bool", "random crop + flip for the subset models and the proxy run "
          "(off at small scale, where it keeps small models from fitting)"),
    Param("mem_method", "str", "how subset models train: standard (Feldman & Zhang, as the "
          "paper's scores) or pgd_at (also records adversarial correctness)",
          choices=("standard", "pgd_at")),
    Param("arch", "str", "architecture of the adversarially trained models",
          choices=("small_cnn", "preact_resnet18")),
    Param("width", "int", "channel width of the adversarially trained models", ge=1),
    Param("epochs", "int", "epochs of each adversarially trained model", ge=1),
    Param("lr", "float", "SGD learning rate (momentum 0.9, weight decay 5e-4)", gt=0),
    Param("milestones", "list[float]", "lr x0.1 at these fractions of training", gt=0, lt=1),
    Param("batch_size", "int", "batch size", ge=1),
    Param("eps255", "float", "L-inf radius in /255 units (train and test)", ge=0, le=255),
    Param("train_steps", "int", "PGD steps when generating training attacks", ge=1),
    Param("eval_steps", "int", "PGD steps in evaluation", ge=1),
    Param("restarts", "int", "PGD restarts in evaluation", ge=1),
    Param("t", "float", "memorization threshold: atypical = mem > t", ge=-1, le=1),
    Param("split_source", "str", "what defines the atypical training examples: our subsampled "
          "estimate, the proxy's top examples in the estimate's proportion, or the published "
          "scores (repro.typicality: mem > t where Feldman & Zhang's exist, else the C-score "
          "threshold calibrated on CIFAR-100)", choices=("estimate", "proxy", "official")),
    Param("n_neighbors", "int", "nearest same-class training examples per test example whose "
          "influence is estimated", ge=1),
    Param("alphas", "list[float]", "BAT's alpha values (reweighting strength)", ge=0),
    Param("beta", "float", "BAT's weight of the discrimination loss", ge=0),
    Param("tau", "float", "temperature of the discrimination loss (not given by the paper; "
          "0.5 is our choice: 0.1 killed the small CNN's penultimate ReLU features)", gt=0),
    Param("trades_beta", "float", "TRADES's beta", ge=0),
    Param("atypical_fractions", "list[float]", "finding (b): fractions of the atypical "
          "training examples added to the typical ones", ge=0, le=1),
    Param("curve_test", "int", "test examples evaluated after every epoch (finding (a))",
          ge=1, le="n_test"),
    Param("autoattack", "str", "AutoAttack version on the final models",
          choices=("none", "fast", "standard")),
    Param("seed", "int", "seed for subsets, data order, initialisation and attacks", ge=0),
    Param("device", "str", "'auto', 'cpu' or 'cuda'"),
], presets={
    "smoke": dict(dataset="cifar100", contrast="cifar10", n_train=600, n_val=100, n_test=300,
                  mem_k=4, contrast_mem_k=None, mem_fraction=0.7, mem_arch="small_cnn", mem_width=4, mem_epochs=2,
                  mem_batch_size=100, mem_augment=False, mem_method="standard", arch="small_cnn", width=4, epochs=2, lr=0.05,
                  milestones=[0.5, 0.75], batch_size=100, eps255=8.0, train_steps=2,
                  eval_steps=3, restarts=1, t=0.15, split_source="estimate", n_neighbors=5,
                  alphas=[1.0, 2.0], beta=0.2, tau=0.5, trades_beta=6.0,
                  atypical_fractions=[0.0, 1.0], curve_test=100, autoattack="none", seed=0,
                  device="auto"),
    # laptop: CIFAR-10, not CIFAR-100. On a CPU budget a small CNN under PGD-AT reaches about
    # 9% clean accuracy on CIFAR-100 (20,000 images, 10 epochs, measured) and fits nothing to
    # memorise; on CIFAR-10 it learns. CIFAR-100 stays as the memorization contrast.
    # The 30-minute budget (timed on a quiet 2-core CPU): K = 32 subset models (48 took 14
    # of 40 min), AutoAttack on 1000 test images (~50 s a run, 6 runs) and finding (b) as
    # the gpu preset tests it: typical-only against all.
    "laptop": dict(dataset="cifar10", contrast="cifar100", n_train=10000, n_val=500,
                   n_test=1000, mem_k=32, contrast_mem_k=None, mem_fraction=0.7, mem_arch="small_cnn", mem_width=16,
                   mem_epochs=10, mem_batch_size=128, mem_augment=False,
                   mem_method="standard", arch="small_cnn", width=32, epochs=15,
                   lr=0.05, milestones=[0.5, 0.75], batch_size=128, eps255=8.0,
                   train_steps=3, eval_steps=10, restarts=1, t=0.15, split_source="estimate",
                   n_neighbors=10, alphas=[1.0, 2.0], beta=0.2, tau=0.5, trades_beta=6.0,
                   atypical_fractions=[0.0, 1.0], curve_test=1000, autoattack="fast",
                   seed=0, device="auto"),
    # overnight: full CIFAR-10, the atypical training split from the published scores
    # (repro.typicality: C-score below the threshold calibrated on CIFAR-100, 10.8% of the
    # images), a width-16 PreAct-ResNet-18 trained 15 epochs with PGD-3, the full test set.
    # Our memorization estimate stays beside the published split (its agreement with it is
    # shown) and picks the atypical *test* examples (the largest influence of an atypical
    # training neighbour), which nobody published: K = 600 subset models bring that
    # influence's SE to about 0.045 at worst (sqrt(1/4 / 420 + 1/4 / 180): 70% subsets),
    # under finding (a)'s 0.05 (four campaign shards of about 1.4 CPU-hours). The CIFAR-100
    # contrast, a description, stays at K = 32.
    "overnight": dict(dataset="cifar10", contrast="cifar100", n_train=None, n_val=1000,
                      n_test=10000, mem_k=600, contrast_mem_k=32, mem_fraction=0.7,
                      mem_arch="small_cnn",
                      mem_width=16, mem_epochs=10, mem_batch_size=128, mem_augment=False,
                      mem_method="standard", arch="preact_resnet18", width=16, epochs=15,
                      lr=0.1, milestones=[0.5, 0.75], batch_size=128, eps255=8.0,
                      train_steps=3, eval_steps=20, restarts=1, t=0.15,
                      split_source="official", n_neighbors=10, alphas=[1.0, 2.0], beta=0.2,
                      tau=0.5, trades_beta=6.0, atypical_fractions=[0.0, 1.0],
                      curve_test=1000, autoattack="fast", seed=0, device="auto"),
    # gpu: three H200 campaign pieces (repro/campaign/): K = 100 subset models on
    # CIFAR-100, the same on CIFAR-10 (the contrast), then the five AT runs (~4-6 min each by
    # counted operations; not yet measured). Finding (b) compares typical-only with all.
    "gpu": dict(dataset="cifar100", contrast="cifar10", n_train=None, n_val=1000, n_test=5000,
                mem_k=100, contrast_mem_k=None, mem_fraction=0.7, mem_arch="preact_resnet18", mem_width=16,
                mem_epochs=10, mem_batch_size=512, mem_augment=True,
                mem_method="standard", arch="preact_resnet18", width=32,
                epochs=12, lr=0.1, milestones=[0.5, 0.75], batch_size=256, eps255=8.0,
                train_steps=5, eval_steps=20, restarts=1, t=0.15, split_source="estimate",
                n_neighbors=20, alphas=[1.0, 2.0], beta=0.2, tau=0.5, trades_beta=6.0,
                atypical_fractions=[0.0, 1.0], curve_test=1000, autoattack="fast",
                seed=0, device="auto"),
    "paper": dict(dataset="cifar100", contrast="cifar10", n_train=None, n_val=1000,
                  n_test=10000, mem_k=2000, contrast_mem_k=None, mem_fraction=0.7, mem_arch="preact_resnet18",
                  mem_width=64, mem_epochs=30, mem_batch_size=128, mem_augment=True,
                  mem_method="standard", arch="preact_resnet18",
                  width=64, epochs=160, lr=0.1, milestones=[0.5, 0.75], batch_size=128,
                  eps255=8.0, train_steps=10, eval_steps=20, restarts=1, t=0.15,
                  split_source="estimate", n_neighbors=50, alphas=[1.0, 2.0], beta=0.2,
                  tau=0.5, trades_beta=6.0, atypical_fractions=[0.0, 0.25, 0.5, 0.75, 1.0],
                  curve_test=10000, autoattack="standard", seed=0, device="auto"),
})


# ----------------------------------------------------------------------------- helpers

def _eps(cfg) -> float:
    return cfg["eps255"] / 255


def _model_fn(arch: str, width: int, ds: data.Dataset, seed: int):
    # small_cnn with BatchNorm: without it the small CPU models barely fit CIFAR-100 in a
    # few epochs, and a model that does not fit its training set memorises nothing
    kw = {"in_size": ds.image_shape[-1], "norm": "bn"} if arch == "small_cnn" else {}
    return common.model_for(arch, ds, width=width, init_seed=seed, **kw)


def _train_cfg(cfg, *, epochs: int, adversarial: bool, n_val: int, seed: int) -> TrainConfig:
    eps = _eps(cfg)
    return TrainConfig(epochs=epochs, batch_size=cfg["batch_size"], optimizer="sgd",
                       lr=cfg["lr"], momentum=0.9, weight_decay=5e-4, schedule="multistep",
                       milestones=tuple(cfg["milestones"]), seed=seed, augment=True,
                       val_every=1 if n_val else 0, val_size=n_val, val_eps=eps,
                       val_alpha=2.5 * eps / max(1, cfg["eval_steps"]),
                       val_steps=cfg["eval_steps"],
                       select_metric="val_robust" if adversarial else "val_clean")


def _subset(ds: data.Dataset, idx: np.ndarray) -> data.Dataset:
    idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return data.Dataset(ds.name, ds.classes, ds.x_train[idx_t], ds.y_train[idx_t], ds.x_val,
                        ds.y_val, ds.x_test, ds.y_test, source=ds.source, extras=ds.extras)


def _pgd(cfg, device, steps=None, restarts=None):
    eps, steps = _eps(cfg), steps or cfg["eval_steps"]
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 11)
    return lambda m, xb, yb: attacks.pgd(m, xb, yb, eps=eps, alpha=2.5 * eps / steps,
                                         steps=steps, restarts=restarts or cfg["restarts"],
                                         generator=gen)


def _epoch_hook_files(folder: Path, train_dir: Path, steps_per_epoch: int) -> None:
    """Drop per-epoch files of epochs a resumed run will redo (written after its last
    checkpoint): the hook's files always match the trainer's history."""
    if (train_dir / "result.json").exists():
        return
    ckpt = train_dir / "checkpoint.pt"
    done = 0
    if ckpt.exists():
        step = train.global_step_saved(ckpt)
        done = step // steps_per_epoch if isinstance(step, int) else 0
    for f in folder.glob("epoch_*.npz"):
        if int(f.stem.split("_")[1]) > done:
            f.unlink()


def _train_with_hook(name: str, config: dict, *, model_fn, objective, dataset, train_cfg,
                     device, progress, hook=None, evaluate_fn):
    """common.train_and_evaluate with a per-epoch hook ``hook(model) -> dict of arrays``
    whose results are stored as ``epoch_<e>.npz`` in the run folder (resumable) and handed
    to ``evaluate_fn(model, epochs: list[dict])``."""
    def compute(run: results.Run):
        model = model_fn()
        run_dir = run.path / "train"
        hooks = run.path / "epochs"
        hooks.mkdir(parents=True, exist_ok=True)
        spe = data.steps_per_epoch(len(dataset.y_train), train_cfg.batch_size)
        _epoch_hook_files(hooks, run_dir, spe)

        def validate(m):
            out = (train.validate_robust(m, dataset.x_val, dataset.y_val, train_cfg, device)
                   if train_cfg.val_size else {})
            if hook is not None:
                e = len(list(hooks.glob("epoch_*.npz"))) + 1
                was = m.training
                m.eval()
                arrays = hook(m)
                m.train(was)
                tmp = hooks / f".epoch_{e:04d}.tmp.npz"
                np.savez_compressed(tmp, **arrays)
                tmp.replace(hooks / f"epoch_{e:04d}.npz")
            return out

        result = train.train(model, objective, dataset, train_cfg, run_dir, device=device,
                             progress=progress, validate=validate)
        if common._STOP_AFTER_TRAINING:
            raise common.TrainedOnly(CHAPTER, name, run.path)
        weights = result.best_path or result.final_path
        train.load_weights(model, weights, device)
        model.to(device).eval()
        epochs = []
        for f in sorted(hooks.glob("epoch_*.npz")):
            with np.load(f) as d:
                epochs.append({k: d[k] for k in d.files})
        net, how = common.evaluation_model(model)
        metrics, arrays = evaluate_fn(net, epochs)
        metrics["evaluation"] = how
        metrics["training"] = {"history": result.history, "seconds": result.seconds,
                               "weights": "best-on-validation" if weights == result.best_path
                               else "final", "best_step": result.best_step}
        return metrics, arrays

    full = {**config, "train": train_cfg.to_dict(), "objective": common._describe(objective)}
    return results.cached(CHAPTER, name, full, compute, device=device)


def _correct(model, x, y, device, attack=None, batch_size=500) -> np.ndarray:
    if attack is None:
        return (evaluate.predict(model, x, batch_size=batch_size, device=device) == y.cpu()).numpy()
    res = evaluate.robust_eval(model, x, y, {"a": attack}, device=device, progress=False,
                               batch_size=batch_size)
    return res.per_attack["a"]


def _record(run: results.Run) -> dict:
    return {"metrics": run.metrics(), "arrays": run.arrays(), "provenance": run.provenance(),
            "path": str(run.path)}


# ----------------------------------------------------------------------------- memorization

def mem_k_for(cfg, dataset: str) -> int:
    """K subset models for ``dataset``: ``contrast_mem_k`` for the contrast dataset where
    set, else ``mem_k``."""
    if (dataset == cfg.get("contrast") and dataset != cfg["dataset"]
            and cfg.get("contrast_mem_k") is not None):
        return cfg["contrast_mem_k"]
    return cfg["mem_k"]


def _mem_config(cfg, name: str) -> dict:
    keys = ("n_train", "n_val", "n_test", "mem_k", "mem_fraction", "mem_arch", "mem_width",
            "mem_epochs", "mem_batch_size", "mem_augment", "mem_method", "lr", "milestones", "batch_size", "eps255",
            "train_steps", "seed")
    return {"dataset": name, **{k: cfg[k] for k in keys}, "mem_k": mem_k_for(cfg, name)}


def _mem_objective(cfg):
    if cfg["mem_method"] == "standard":
        return objectives.standard()
    eps = _eps(cfg)
    return objectives.pgd_at(eps=eps, alpha=2.5 * eps / cfg["train_steps"],
                             steps=cfg["train_steps"])


def _subset_estimation(cfg, ds, run_path: Path) -> memorization.SubsetEstimation:
    return memorization.SubsetEstimation(run_path / "models", len(ds.y_train), mem_k_for(cfg, ds.name),
                                         cfg["mem_fraction"], cfg["seed"])


def _subset_trainer(cfg, ds, device, run_path: Path, progress=False) -> dict:
    """The arguments of ``SubsetEstimation.run`` that train subset models: ``train_one(k,
    mask)`` trains model k (its own seed, subset and batch order) with the repro trainer
    (resumable from its checkpoint) and returns its correctness on every training and test
    example; where ``ensemble.default_group(device)`` > 1 (CUDA; ``$REPRO_ENSEMBLE``) and the
    method is standard, ``train_many`` trains that many models at once as a batched ensemble
    (resumable at its epoch ends)."""
    tcfg = dataclasses.replace(_train_cfg(cfg, epochs=cfg["mem_epochs"], adversarial=False,
                                          n_val=0, seed=cfg["seed"]),
                               augment=cfg["mem_augment"], batch_size=cfg["mem_batch_size"])
    adv = cfg["mem_method"] == "pgd_at"

    def train_one(k, mask):
        model = _model_fn(cfg["mem_arch"], cfg["mem_width"], ds, cfg["seed"] + 1000 + k)()
        folder = run_path / "models" / f"train_{k:04d}"
        tc = dataclasses.replace(tcfg, seed=cfg["seed"] + 1000 + k)
        train.train(model, _mem_objective(cfg), _subset(ds, np.flatnonzero(mask)), tc,
                    folder, device=device, progress=progress)
        model.eval()
        out = {"train_clean": _correct(model, ds.x_train, ds.y_train, device),
               "test_clean": _correct(model, ds.x_test, ds.y_test, device)}
        if adv:
            out["train_adv"] = _correct(model, ds.x_train, ds.y_train, device, _pgd(cfg, device))
            out["test_adv"] = _correct(model, ds.x_test, ds.y_test, device, _pgd(cfg, device))
        shutil.rmtree(folder, ignore_errors=True)  # weights are not needed any more
        return out

    group = ensemble.default_group(device)
    if group <= 1 or adv:  # one at a time with the trainer (the published CPU runs)
        return {"train_one": train_one}

    def train_many(ks, masks):
        # a batched ensemble (repro.ensemble): the same models as train_one's to float
        # tolerance, trained together; standard objective only
        seeds = [cfg["seed"] + 1000 + k for k in ks]
        models = [_model_fn(cfg["mem_arch"], cfg["mem_width"], ds, s)() for s in seeds]
        folder = run_path / "models" / f"ensemble_{ks[0]:04d}_{ks[-1]:04d}"
        ens = ensemble.train_ensemble(models, ds.x_train, ds.y_train,
                                      [np.flatnonzero(m) for m in masks], seeds, tcfg,
                                      device=device, folder=folder,
                                      progress=print if progress else None)
        tr = ensemble.correct(ens, ds.x_train, ds.y_train, device=device)
        te = ensemble.correct(ens, ds.x_test, ds.y_test, device=device)
        shutil.rmtree(folder, ignore_errors=True)
        return [{"train_clean": tr[i], "test_clean": te[i]} for i in range(len(ks))]

    return {"train_many": train_many, "group": group}


def subset_folder(cfg, ds) -> results.Run:
    """The ``subsets-<data>`` run folder of this config (finished or not); its ``models/``
    holds one ``model_<k>.npz`` per recorded subset model."""
    return results.find_run(CHAPTER, f"subsets-{ds.name}", _mem_config(cfg, ds.name))


def subset_status(cfg, ds) -> dict:
    """Which of the K subset models are recorded (in the local results folder)."""
    run = subset_folder(cfg, ds)
    est = _subset_estimation(cfg, ds, run.path)
    missing = [] if run.done else est.missing()
    k = mem_k_for(cfg, ds.name)
    return {"dataset": ds.name, "folder": str(run.path), "k": k,
            "done": k - len(missing), "missing": missing, "merged": run.done}


def train_subset_shard(cfg, ds, device, shard: tuple[int, int], progress=False) -> dict:
    """Train and record shard (i, N) of the K subset models (every N-th model from i) into
    the ``subsets-<data>`` run folder, skipping recorded ones; the folder is not marked
    finished (``subset_models(..., train_missing=False)`` does that once all K exist)."""
    run = subset_folder(cfg, ds)
    if not run.done:
        run.prepare()
        est = _subset_estimation(cfg, ds, run.path)
        est.run(**_subset_trainer(cfg, ds, device, run.path, progress), shard=shard,
                log=print if progress else None)
    return subset_status(cfg, ds)


def subset_models(cfg, ds, device, progress=False, *, train_missing: bool = True) -> results.Run:
    """The K subset models' correctness arrays (cached; resumable per model). With
    ``train_missing=False`` nothing is trained: the models recorded by the shards are
    merged, or ``memorization.MissingModelsError`` names the missing ones."""
    conf = _mem_config(cfg, ds.name)

    def compute(run: results.Run):
        est = _subset_estimation(cfg, ds, run.path)
        if train_missing:
            est.run(**_subset_trainer(cfg, ds, device, run.path, progress),
                    log=print if progress else None)
        stacked = est.merged()
        times = stacked[memorization.WALL_TIME]
        return {"k": int(len(stacked["masks"])), "n_train": len(ds.y_train),
                "n_test": len(ds.y_test),
                # the models' own training time: this run's wall time is only the merge when
                # the models were trained by shards (campaign pieces, other machines)
                "models_wall_time_s": round(float(np.nansum(times)), 2),
                "models_timed": int(np.isfinite(times).sum())}, dict(stacked)

    return results.cached(CHAPTER, f"subsets-{ds.name}", conf, compute, device=device)


def proxy_run(cfg, ds, device, progress=False) -> results.Run:
    """One standard run on the whole training set: per-epoch training correctness (the
    learning-speed proxy) and each test example's nearest same-class training neighbours."""
    conf = {**_mem_config(cfg, ds.name), "mem_k": None, "n_neighbors": cfg["n_neighbors"]}
    tcfg = dataclasses.replace(_train_cfg(cfg, epochs=cfg["mem_epochs"], adversarial=False,
                                          n_val=cfg["n_val"], seed=cfg["seed"]),
                               augment=cfg["mem_augment"],
                                   batch_size=cfg["mem_batch_size"])

    def hook(model):
        return {"train_clean": _correct(model, ds.x_train, ds.y_train, device)}

    def evaluate_fn(model, epochs):
        per_epoch = np.stack([e["train_clean"] for e in epochs])
        feats_tr = _features(model, ds.x_train, device)
        feats_te = _features(model, ds.x_test, device)
        nbrs = _neighbors(feats_te, ds.y_test, feats_tr, ds.y_train, cfg["n_neighbors"])
        test_ok = _correct(model, ds.x_test, ds.y_test, device)
        return ({"epochs": len(epochs), "test_clean": float(test_ok.mean())},
                {"train_correct_per_epoch": per_epoch,
                 "proxy": memorization.memorization_proxy(per_epoch).astype(np.float32),
                 "test_neighbors": nbrs.astype(np.int32)})

    return _train_with_hook(f"proxy-{ds.name}", conf,
                            model_fn=_model_fn(cfg["mem_arch"], cfg["mem_width"], ds, cfg["seed"]),
                            objective=objectives.standard(), dataset=ds, train_cfg=tcfg,
                            device=device, progress=progress, hook=hook, evaluate_fn=evaluate_fn)


@torch.no_grad()
def _features(model, x, device, batch_size=500) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model.features(data.to_float(x[i:i + batch_size].to(device))).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def _neighbors(f_te, y_te, f_tr, y_tr, k, chunk=1000) -> np.ndarray:
    """(m, k) indices of each test example's k most cosine-similar same-class training
    examples (-1 padding where a class has fewer)."""
    out = np.full((len(y_te), k), -1, dtype=np.int64)
    for i in range(0, len(y_te), chunk):
        sim = f_te[i:i + chunk] @ f_tr.t()
        sim[y_te[i:i + chunk, None].cpu() != y_tr[None, :].cpu()] = -float("inf")
        kk = min(k, sim.shape[1])
        v, idx = sim.topk(kk, dim=1)
        idx[~torch.isfinite(v)] = -1
        out[i:i + chunk, :kk] = idx.numpy()
    return out


def memorization_run(cfg, ds, device, progress=False, with_proxy=True, *,
                     train_missing: bool = True) -> results.Run:
    """Estimate + SE + splits + proxy correlation (cached; reads the subset models).

    A finished (local or published) estimate is returned without touching the subset
    models, which are never published: a GPU run renders on a CPU machine."""
    conf = {**_mem_config(cfg, ds.name), "t": cfg["t"], "split_source": cfg["split_source"],
            "n_neighbors": cfg["n_neighbors"], "proxy": with_proxy}
    name = f"memorization-{ds.name}"
    found = results.find_run(CHAPTER, name, conf)
    if distributed.agree(found.done):
        found = results.find_run(CHAPTER, name, conf)
        print(f"[cache] {CHAPTER}/{name}: reusing {found.path}")
        return found
    subs = subset_models(cfg, ds, device, progress, train_missing=train_missing)
    prox = proxy_run(cfg, ds, device, progress) if with_proxy else None

    def compute(run: results.Run):
        a = subs.arrays()
        masks = a["masks"]
        est = memorization.memorization(a["train_clean"], masks)
        sm = subs.metrics()
        metrics = {"k": int(len(masks)), "estimate": est.summary(),
                   # the unpublished subset models this estimate is made of: publish adds
                   # their time to the chapter's compute time
                   "upstream_wall_time_s": sm.get("models_wall_time_s"),
                   "upstream": f"{sm.get('models_timed', 0)} of {len(masks)} timed subset "
                               f"models in {subs.path.name}",
                   "reliability": memorization.split_half_reliability(a["train_clean"], masks),
                   "fraction_atypical_estimate": float(memorization.atypical(est.value, cfg["t"]).mean())}
        arrays = {"mem": est.value.astype(np.float32), "mem_se": est.se.astype(np.float32),
                  "p_in": est.p_in.astype(np.float32), "p_out": est.p_out.astype(np.float32),
                  "n_in": est.n_in.astype(np.int32)}
        if "train_adv" in a:
            adv = memorization.memorization(a["train_adv"], masks)
            arrays["mem_adv"] = adv.value.astype(np.float32)
            metrics["estimate_adv"] = adv.summary()
        atyp = memorization.atypical(est.value, cfg["t"])
        if cfg["split_source"] == "official" and with_proxy:
            # the published scores define the training split; our estimate stays beside it
            # (its agreement with them is the chapter's check of the estimator)
            official, cal, scores = typicality.atypical(ds, cfg["t"])
            metrics["official"] = {
                "calibration": cal.as_dict(), "scores": scores.provenance(),
                "agreement": typicality.agreement(est.value, atyp, scores, official),
                # the precision of the rule the split stands for (mem > t, 4,000 models)
                "split_se": typicality.FZ_SE_MAX}
            arrays["official_score"] = scores.values.astype(np.float32)
            atyp = official
        if prox is not None:
            pa = prox.arrays()
            proxy = pa["proxy"].astype(np.float64)
            metrics["proxy_correlation"] = memorization.correlation(proxy, est.value)
            if cfg["split_source"] == "proxy":
                atyp = memorization.top_fraction(proxy, float(atyp.mean()))
            arrays["proxy"] = pa["proxy"]
            best, best_se, arg = memorization.max_influence(
                a["test_clean"], masks, np.flatnonzero(atyp), candidates=pa["test_neighbors"])
            test_atyp = memorization.atypical_test(best, cfg["t"])
            arrays.update(test_max_infl=best.astype(np.float32),
                          test_max_infl_se=best_se.astype(np.float32),
                          test_infl_source=arg.astype(np.int32), test_atypical=test_atyp)
            metrics["fraction_atypical_test"] = float(test_atyp.mean())
        arrays["train_atypical"] = atyp
        metrics["fraction_atypical_train"] = float(atyp.mean())
        metrics["n_atypical_train"] = int(atyp.sum())
        return metrics, arrays

    return results.cached(CHAPTER, name, conf, compute, device=device)


# ----------------------------------------------------------------------------- AT runs

def _at_config(cfg) -> dict:
    keys = ("dataset", "n_train", "n_val", "n_test", "arch", "width", "epochs", "lr",
            "milestones", "batch_size", "eps255", "train_steps", "eval_steps", "restarts",
            "autoattack", "curve_test", "seed")
    return {k: cfg[k] for k in keys}


def _evaluate_final(model, ds, cfg, device, progress):
    res = evaluate.robust_eval(model, ds.x_test, ds.y_test,
                               {"pgd": _pgd(cfg, device)}, device=device, progress=progress,
                               threat=("linf", _eps(cfg)))
    metrics = {"accuracy": res.accuracy(), "n_test": res.n}
    arrays = {"correct_clean": res.clean, "correct_pgd": res.per_attack["pgd"]}
    if cfg["autoattack"] != "none":
        aa = evaluate.autoattack(model, ds.x_test, ds.y_test, eps=_eps(cfg),
                                 version=cfg["autoattack"], device=device, seed=cfg["seed"])
        key = next(iter(aa.per_attack))
        metrics["autoattack"] = {"version": cfg["autoattack"], "key": key,
                                 "accuracy": float(aa.per_attack[key].mean())}
        arrays["correct_aa"] = aa.per_attack[key]
    return metrics, arrays


def _at_run(name, cfg, ds, train_ds, objective, device, progress, extra=None, curves=False):
    eps = _eps(cfg)
    tcfg = _train_cfg(cfg, epochs=cfg["epochs"], adversarial=True, n_val=cfg["n_val"],
                      seed=cfg["seed"])
    m = min(cfg["curve_test"], len(ds.y_test))

    def hook(model):
        xs, ys = ds.x_test[:m], ds.y_test[:m]
        return {"test_clean": _correct(model, xs, ys, device),
                "test_pgd": _correct(model, xs, ys, device, _pgd(cfg, device))}

    def evaluate_fn(model, epochs):
        metrics, arrays = _evaluate_final(model, ds, cfg, device, progress)
        if epochs:
            arrays["curve_clean"] = np.stack([e["test_clean"] for e in epochs])
            arrays["curve_pgd"] = np.stack([e["test_pgd"] for e in epochs])
        metrics["n_train"] = int(len(train_ds.y_train))
        return metrics, arrays

    del eps
    return _train_with_hook(name, {**_at_config(cfg), **(extra or {}), "method": name},
                            model_fn=_model_fn(cfg["arch"], cfg["width"], ds, cfg["seed"]),
                            objective=objective, dataset=train_ds, train_cfg=tcfg,
                            device=device, progress=progress, hook=hook if curves else None,
                            evaluate_fn=evaluate_fn)


def _pgd_at_objective(cfg):
    eps = _eps(cfg)
    return objectives.pgd_at(eps=eps, alpha=2.5 * eps / cfg["train_steps"],
                             steps=cfg["train_steps"])


def at_run_names(cfg: dict) -> list[str]:
    """The adversarially trained runs of a config, in the order ``run`` trains them."""
    names = ["pgd_at", "trades", *[f"bat-a{a:g}" for a in cfg["alphas"]]]
    return names + [f"typical+{f:g}" for f in cfg["atypical_fractions"] if f < 1]


def run(preset: str = "smoke", progress: bool = True, only=None, **overrides) -> dict:
    """Estimate memorization, then train and evaluate PGD-AT, TRADES, BAT and the
    typical+f runs (or reuse cached runs).

    ``only``: compute just these AT runs (names from ``at_run_names``), after the main
    dataset's memorization runs they need (the contrast's is skipped): a campaign piece of
    one model. The result then has no ``summary``; the cache joins the pieces."""
    cfg = SPEC.resolve(preset, **overrides)
    if only is not None:
        only = list(only)
        unknown = sorted(set(only) - set(at_run_names(cfg)))
        if unknown:
            raise ValueError(f"bat.run: only names unknown runs {unknown}; this config has "
                             f"{at_run_names(cfg)}")
    torch.manual_seed(cfg["seed"])
    device = common.pick_device(cfg["device"])
    eps = _eps(cfg)
    ds = common.load_dataset(cfg["dataset"], n_train=cfg["n_train"], n_test=cfg["n_test"],
                             n_val=cfg["n_val"])
    if cfg["split_source"] == "official":
        typicality.official_index(ds)       # no published scores for these images: fail now
    out = {"config": cfg, "runs": {}}
    mem = memorization_run(cfg, ds, device, progress)
    out["runs"]["memorization"] = _record(mem)
    out["runs"]["proxy"] = _record(proxy_run(cfg, ds, device, progress))
    if cfg["contrast"] not in ("none", cfg["dataset"]) and only is None:
        cds = common.load_dataset(cfg["contrast"], n_train=cfg["n_train"],
                                  n_test=cfg["n_test"], n_val=cfg["n_val"])
        out["runs"]["memorization_contrast"] = _record(
            memorization_run(cfg, cds, device, progress, with_proxy=False))
    atyp = mem.arrays()["train_atypical"]

    def wanted(name):
        return only is None or name in only

    # PGD-AT on everything (baseline + finding (a) curves), TRADES, BAT
    step = 2.5 * eps / cfg["train_steps"]
    split_key = {"split": {"t": cfg["t"], "source": cfg["split_source"],
                           "mem": _mem_config(cfg, ds.name)}}
    pgd_at_needed = wanted("pgd_at") or (only is None and 1.0 in cfg["atypical_fractions"])
    if pgd_at_needed:
        out["runs"]["pgd_at"] = _record(_at_run("pgd_at", cfg, ds, ds, _pgd_at_objective(cfg),
                                                device, progress, curves=True))
    if wanted("trades"):
        out["runs"]["trades"] = _record(_at_run(
            "trades", cfg, ds, ds, objectives.trades(beta=cfg["trades_beta"], eps=eps,
                                                     alpha=step, steps=cfg["train_steps"]),
            device, progress, extra={"trades_beta": cfg["trades_beta"]}))
    for a in cfg["alphas"]:
        if not wanted(f"bat-a{a:g}"):
            continue
        obj = objectives.bat(atyp, alpha=a, beta=cfg["beta"], tau=cfg["tau"], eps=eps,
                             step=step, steps=cfg["train_steps"])
        out["runs"][f"bat-a{a:g}"] = _record(_at_run(
            f"bat-a{a:g}", cfg, ds, ds, obj, device, progress,
            extra={**split_key, "alpha": a, "beta": cfg["beta"], "tau": cfg["tau"]}))

    # finding (b): typical examples plus a growing fraction of the atypical ones
    rng = np.random.default_rng(cfg["seed"])
    atyp_idx = rng.permutation(np.flatnonzero(atyp))
    typ_idx = np.flatnonzero(~atyp)
    for f in cfg["atypical_fractions"]:
        n_add = int(round(f * len(atyp_idx)))
        if n_add == len(atyp_idx):  # the whole training set: that is the pgd_at run
            if "pgd_at" in out["runs"]:
                out["runs"][f"typical+{f:g}"] = out["runs"]["pgd_at"]
            continue
        if not wanted(f"typical+{f:g}"):
            continue
        idx = np.sort(np.concatenate([typ_idx, atyp_idx[:n_add]]))
        out["runs"][f"typical+{f:g}"] = _record(_at_run(
            f"typical+{f:g}", cfg, ds, _subset(ds, idx), _pgd_at_objective(cfg), device,
            progress, extra={**split_key, "atypical_fraction": f}))
    if only is None:
        out["summary"] = summary(out)
    return out


# ----------------------------------------------------------------------------- views

def _robust_key(metrics: dict) -> tuple[str, float]:
    if "autoattack" in metrics:
        return f"AutoAttack ({metrics['autoattack']['version']})", metrics["autoattack"]["accuracy"]
    return "PGD", metrics["accuracy"]["pgd"]


def splits(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train atypical, test atypical) bool arrays of the main dataset."""
    a = result["runs"]["memorization"]["arrays"]
    return a["train_atypical"], a["test_atypical"]


def by_split(result: dict, run: str) -> dict:
    """Clean / PGD accuracy of a run's final model on typical and atypical test examples."""
    a = result["runs"][run]["arrays"]
    _, test_atyp = splits(result)
    out = {}
    for name, sel in (("typical", ~test_atyp), ("atypical", test_atyp), ("all", None)):
        for kind in ("clean", "pgd"):
            v = a[f"correct_{kind}"]
            v = v if sel is None else v[sel]
            out[f"{name} {kind}"] = float(v.mean()) if len(v) else float("nan")
    return out


def curves(result: dict, run: str = "pgd_at") -> dict:
    """Finding (a): per-epoch accuracy on typical / atypical test examples, clean and PGD."""
    a = result["runs"][run]["arrays"]
    _, test_atyp = splits(result)
    m = a["curve_clean"].shape[1]
    sel = test_atyp[:m]
    out = {"epoch": list(range(1, a["curve_clean"].shape[0] + 1))}
    for name, s in (("typical", ~sel), ("atypical", sel)):
        for kind in ("clean", "pgd"):
            c = a[f"curve_{kind}"][:, s]
            out[f"{name} {kind}"] = (c.mean(1) if s.any() else np.full(len(c), np.nan)).tolist()
    out["n_typical"], out["n_atypical"] = int((~sel).sum()), int(sel.sum())
    return out


def fractions(result: dict) -> dict:
    """Finding (b): accuracy on typical test examples against the atypical fraction added."""
    fr = result["config"]["atypical_fractions"]
    rows = [by_split(result, f"typical+{f:g}") for f in fr]
    return {"fraction": fr, "typical clean": [r["typical clean"] for r in rows],
            "typical pgd": [r["typical pgd"] for r in rows],
            "n_train": [result["runs"][f"typical+{f:g}"]["metrics"]["n_train"] for f in fr]}


def methods(result: dict) -> list[str]:
    return ["pgd_at", "trades", *[f"bat-a{a:g}" for a in result["config"]["alphas"]]]


LABELS = {"pgd_at": "PGD-AT", "trades": "TRADES"}


def label(run: str) -> str:
    if run.startswith("bat-a"):
        return f"BAT (α={run[5:]})"
    return LABELS.get(run, run)


def table(result: dict):
    """Clean / PGD / AutoAttack accuracy (%) of PGD-AT, TRADES and BAT."""
    import pandas as pd
    rows = {}
    for r in methods(result):
        m = result["runs"][r]["metrics"]
        row = {"clean": m["accuracy"]["clean"], "PGD": m["accuracy"]["pgd"]}
        if "autoattack" in m:
            row[f"AutoAttack ({m['autoattack']['version']})"] = m["autoattack"]["accuracy"]
        s = by_split(result, r)
        row["atypical clean"], row["atypical PGD"] = s["atypical clean"], s["atypical pgd"]
        rows[label(r)] = row
    return (pd.DataFrame(rows).T * 100).round(2)


def extremes(result: dict, ds: data.Dataset | None = None, per_class: int = 1,
             n_classes: int = 8) -> dict:
    """The most and least memorised training images of the first ``n_classes`` classes
    (images loaded from the dataset: they are not stored in the runs)."""
    cfg = result["config"]
    if ds is None:
        ds = common.load_dataset(cfg["dataset"], n_train=cfg["n_train"], n_test=cfg["n_test"],
                                 n_val=cfg["n_val"])
    mem = result["runs"]["memorization"]["arrays"]["mem"]
    y = ds.y_train.numpy()
    most, least, labels = [], [], []
    for c in range(n_classes):
        idx = np.flatnonzero((y == c) & np.isfinite(mem))
        if len(idx) < 2 * per_class:
            continue
        order = idx[np.argsort(mem[idx], kind="stable")]
        least += list(order[:per_class])
        most += list(order[::-1][:per_class])
        labels += [ds.classes[c]] * per_class
    return {"most": common.as_numpy_images(ds.x_train[most]), "least":
            common.as_numpy_images(ds.x_train[least]), "labels": labels,
            "mem_most": mem[most], "mem_least": mem[least]}


def published_reference(t: float = 0.15) -> dict:
    """The published CIFAR-100 C-scores and memorization estimates with their calibration
    (``typicality.calibration``): ``{"available", "why", "calibration", "cscore", "mem",
    "cifar10_cscore", "cifar10_fraction"}``; ``available`` is False (``why`` says what is
    missing) where the score files are not on disk."""
    try:
        cal = typicality.calibration(t)
        c10 = typicality.reference("cifar10", "cscore")
    except (typicality.NoOfficialScoresError, FileNotFoundError) as e:
        return {"available": False, "why": str(e)}
    return {"available": True, "why": "", "calibration": cal,
            "cscore": typicality.reference("cifar100", "cscore"),
            "mem": typicality.reference("cifar100", "mem"), "cifar10_cscore": c10,
            "cifar10_fraction": float((c10 < cal.threshold).mean())}


def estimator_agreement(result: dict, ds: data.Dataset | None = None) -> dict:
    """Our subset-model estimate against the published score of the same training images:
    Spearman and the overlap of the atypical sets (``typicality.agreement``), plus
    ``available`` / ``why`` (False where no published score fits these images, e.g. our
    offline CIFAR-100). Works for any run, whatever its ``split_source``."""
    cfg = result["config"]
    mm = result["runs"]["memorization"]["metrics"]
    if "official" in mm:
        return {"available": True, "why": "", **mm["official"]["agreement"]}
    if ds is None:
        ds = common.load_dataset(cfg["dataset"], n_train=cfg["n_train"], n_test=cfg["n_test"],
                                 n_val=cfg["n_val"])
    try:
        official, _, scores = typicality.atypical(ds, cfg["t"])
    except (typicality.NoOfficialScoresError, FileNotFoundError) as e:
        return {"available": False, "why": str(e)}
    mem = np.asarray(result["runs"]["memorization"]["arrays"]["mem"], float)
    return {"available": True, "why": "",
            **typicality.agreement(mem, memorization.atypical(mem, cfg["t"]), scores, official)}


def summary(result: dict) -> dict:
    mm = result["runs"]["memorization"]["metrics"]
    s = {"k": mm["k"], "mem_mean_se": mm["estimate"]["mean_se"],
         "proxy_spearman": mm.get("proxy_correlation", {}).get("spearman"),
         "split_half_r": mm.get("reliability", {}).get("pearson_half"),
         "fraction_atypical_train": mm["fraction_atypical_train"],
         "fraction_atypical_test": mm.get("fraction_atypical_test")}
    for r in methods(result):
        m = result["runs"][r]["metrics"]
        s[r] = {"clean": m["accuracy"]["clean"], "pgd": m["accuracy"]["pgd"],
                "robust": _robust_key(m)[1]}
    return s


# ----------------------------------------------------------------------------- claims

def _pct(x):
    return f"{100 * x:.1f}%"


def split_se(result: dict) -> float:
    """The standard error of the memorization behind the atypical training split: our
    estimate's mean SE, or, for the published split, that of the rule it stands for
    (Feldman & Zhang's mem > t from 4,000 models, ``typicality.FZ_SE_MAX``)."""
    mm = result["runs"]["memorization"]["metrics"]
    if "official" in mm:
        return float(mm["official"]["split_se"])
    return float(mm["estimate"]["mean_se"])


def test_split_se(result: dict) -> float | None:
    """Mean standard error of the largest influence that makes a test example atypical,
    over the atypical test examples (always our subset models' estimate: nobody published
    influences for these test images). None when no test example is atypical."""
    a = result["runs"]["memorization"]["arrays"]
    if "test_max_infl_se" not in a or not np.asarray(a["test_atypical"]).any():
        return None
    se = np.asarray(a["test_max_infl_se"], float)[np.asarray(a["test_atypical"], bool)]
    return float(np.nanmean(se))


def _facts(result: dict, n: int) -> dict:
    """What the claims' floors (repro/claims_data/bat.json) ask about this run."""
    cfg = result["config"]
    return {"full_training_set": cfg["n_train"] is None,
            "mem_se": split_se(result),
            "test_split_se": test_split_se(result),
            "pgd_at_clean": result["runs"]["pgd_at"]["metrics"]["accuracy"]["clean"],
            "test_images": n}


def _claim_a(result: dict) -> claims.Outcome:
    c = curves(result)
    if c["n_atypical"] == 0:
        return claims.Outcome("no atypical test example found", claims.NOT_YET_RUN)
    a = result["runs"]["pgd_at"]["arrays"]
    _, test_atyp = splits(result)
    sel = test_atyp[:a["curve_clean"].shape[1]]
    cc, cp = (np.asarray(a[k], float)[:, sel] for k in ("curve_clean", "curve_pgd"))
    est = claims.per_example((cc[-1] - cc[0]) - (cp[-1] - cp[0]),
                             "per atypical test example, first → last epoch")
    ours = (f"atypical test ({c['n_atypical']}): clean {_pct(c['atypical clean'][0])} → "
            f"{_pct(c['atypical clean'][-1])}, PGD {_pct(c['atypical pgd'][0])} → "
            f"{_pct(c['atypical pgd'][-1])}; clean gain − PGD gain {est} points")
    note = (f"typical test ({c['n_typical']}): clean "
            f"{100 * (c['typical clean'][-1] - c['typical clean'][0]):+.1f} pts, PGD "
            f"{100 * (c['typical pgd'][-1] - c['typical pgd'][0]):+.1f} pts over the same epochs")
    return claims.judge("bat.atypical-clean-not-robust", est, _facts(result, est.n),
                        ours=ours, note=note)


def accuracy_se(p, n: int):
    """Binomial standard error of an accuracy p (a float or an array) measured on n examples."""
    return np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / max(1, n))


def _claim_b(result: dict) -> claims.Outcome:
    f = fractions(result)
    r = f["typical pgd"]
    ours = ", ".join(f"{100 * a:g}% atypical: {_pct(v)}" for a, v in zip(f["fraction"], r))
    typical = ~splits(result)[1]
    first, last = (np.asarray(result["runs"][f"typical+{x:g}"]["arrays"]["correct_pgd"],
                              bool)[typical] for x in (f["fraction"][0], f["fraction"][-1]))
    est = claims.paired(last, first, "typical test images, paired")
    return claims.judge("bat.atypical-hurts-typical", est, _facts(result, est.n),
                        ours="PGD acc. on typical test: " + ours + f"; drop {est} points")


def _claim_tradeoff(result: dict) -> claims.Outcome:
    bat_run = f"bat-a{result['config']['alphas'][0]:g}"   # fixed in advance, not chosen on test

    def per_image(run):
        a = result["runs"][run]["arrays"]
        robust = a["correct_aa"] if "correct_aa" in a else a["correct_pgd"]
        return (np.asarray(a["correct_clean"], float) + np.asarray(robust, float)) / 2

    def point(run):
        m = result["runs"][run]["metrics"]
        return m["accuracy"]["clean"], _robust_key(m)[1]
    parts, texts = [], []
    for base in ("pgd_at", "trades"):
        est = claims.paired(per_image(base), per_image(bat_run))
        parts.append(claims.judge("bat.tradeoff", est, _facts(result, est.n)))
        texts.append(f"vs {label(base)}: {est} ({parts[-1].verdict})")
    bc, br = point(bat_run)
    ours = (f"{label(bat_run)}: clean {_pct(bc)}, robust {_pct(br)}; " + "; ".join(
        f"{label(b)}: {_pct(point(b)[0])}, {_pct(point(b)[1])}" for b in ("pgd_at", "trades"))
        + "; (clean + robust)/2 " + ", ".join(texts) + " points")
    out = claims.combine(parts, ours, note=f"BAT's α is the config's first ({bat_run}), fixed "
                                           "in advance; one verdict per baseline, combined.")
    return dataclasses.replace(out, value=parts[0].value)


CLAIMS = [
    claims.with_evaluator("bat.atypical-clean-not-robust", _claim_a),
    claims.with_evaluator("bat.atypical-hurts-typical", _claim_b),
    claims.with_evaluator("bat.tradeoff", _claim_tradeoff),
]


def claim_table(result: dict):
    """The chapter's claims with our values, floors, power and verdicts (a DataFrame)."""
    return claims.table(result, "bat")


def dump(result: dict) -> str:
    return json.dumps(result["summary"], indent=1, default=float)
