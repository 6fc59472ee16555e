"""What every chapter's experiment does: pick the device, load the data at the preset's size,
train a model under a cached run folder, and evaluate it into metrics + small arrays.

A chapter run stores everything its notebook shows in ``metrics.json`` / ``arrays.npz``, so a
run computed on a GPU machine renders on a CPU machine with no weights at hand.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from repro import data, results, train
from repro.models import build
from repro.params import ParameterError


def pick_device(name: str = "auto", *, float64: bool = False) -> torch.device:
    """``"auto"``: CUDA, then Apple's MPS, then the CPU (``repro.train.resolve_device``).

    ``float64=True``: the chapter computes in float64 (LMT's certificates); MPS has no
    float64, so "auto" falls back to the CPU there, and an explicit "mps" is refused."""
    device = train.resolve_device(name)
    if float64 and device.type == "mps":
        if name == "auto":
            return torch.device("cpu")
        raise ParameterError("device 'mps' has no float64, which this chapter's certificates "
                             "need: use 'cpu' or 'auto'")
    return device


def load_dataset(name: str, *, n_train: int | None, n_test: int | None,
                 n_val: int | None = None, val_size: int | None = None) -> data.Dataset:
    """The dataset cut to the preset's size (stored orders are shuffled, so prefixes mix
    all classes). Asking for more images than a split has raises ``ParameterError`` (it was
    cut silently, so a result said n_test=20000 of a 10,000-image test set)."""
    ds = data.load(name, val_size=val_size)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        have = len(getattr(ds, f"y_{split}"))
        if n is not None and n > have:
            raise ParameterError(f"n_{split}={n}, but {name} has {have} {split} images"
                                 + (" after the validation split" if split == "train" else "")
                                 + f": ask for at most {have}")
    return ds.limit(n_train, n_val, n_test)


class TrainedOnly(Exception):
    """Raised by ``train_and_evaluate`` inside ``stop_after_training()`` once a run's training
    is finished and saved (its evaluation not started): ``path`` is the run folder, whose
    final checkpoint the next call evaluates without training again."""

    def __init__(self, chapter: str, name: str, path):
        super().__init__(f"{chapter}/{name}: trained, evaluation left for later ({path})")
        self.chapter, self.name, self.path = chapter, name, path


_STOP_AFTER_TRAINING = False


class stop_after_training:
    """``with stop_after_training(): chapter.run(..., only=[name])``: the first run that has
    to be computed stops after its training (``TrainedOnly``), so that training and
    evaluation can be separate campaign pieces of at most 2 hours each. A run found
    finished in the cache returns as usual."""

    def __enter__(self):
        global _STOP_AFTER_TRAINING
        self._before, _STOP_AFTER_TRAINING = _STOP_AFTER_TRAINING, True
        return self

    def __exit__(self, *exc):
        global _STOP_AFTER_TRAINING
        _STOP_AFTER_TRAINING = self._before
        return False


def evaluation_model(model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """The module an evaluation attacks, and what it is: ``model`` itself (eager, at its own
    dtype), or ``torch.compile(model)`` where ``REPRO_COMPILE_EVAL=1`` (the CPU campaign sets
    it where it measured a compiled fp32 PGD step faster: 2.07x on a 2-core AVX-512 EPYC,
    2.06 against 1.00 ms per image-pass). Compiling changes no arithmetic type: the attack is
    the same fp32 attack, its sign steps only follow a differently fused computation, so
    individual adversarial images differ where a gradient is near 0 (the accuracy is the
    same estimate; tests/test_evaluate.py checks that they agree). Other attributes
    (``model.head``, submodules) are the model's own; a new batch size recompiles once, then
    the batch dimension is dynamic."""
    import os
    env = os.environ.get("REPRO_COMPILE_EVAL", "").strip()
    if env not in ("", "0", "1"):
        raise ValueError(f"REPRO_COMPILE_EVAL must be 0 or 1, got {env!r}")
    if env == "1":
        return torch.compile(model), {"compile": True, "why": "REPRO_COMPILE_EVAL=1"}
    return model, {"compile": False, "why": "eager" + (" (REPRO_COMPILE_EVAL=0)" if env else "")}


def train_and_evaluate(chapter: str, name: str, config: dict, *,
                       model_fn: Callable[[], torch.nn.Module], objective,
                       dataset: data.Dataset, train_cfg: train.TrainConfig,
                       evaluate: Callable[[torch.nn.Module], tuple[dict, dict]],
                       device: torch.device, progress: bool = True,
                       use_best: bool = True, validate=None) -> results.Run:
    """Train ``model_fn()`` with ``objective`` (resumable: checkpoints live in the run folder)
    and evaluate the best-on-validation weights (or the final ones) with ``evaluate``.
    ``validate(model) -> dict`` replaces the trainer's epoch-end validation (see
    ``repro.train.train``).

    ``config`` must describe everything that changes the result; it keys the cache.
    ``evaluate`` may take a keyword argument ``folder``: the run folder, where it can keep the
    finished stages of a long evaluation so that a killed one resumes (``EvalStages``).
    """
    import inspect
    takes_folder = "folder" in inspect.signature(evaluate).parameters

    def compute(run: results.Run):
        model = model_fn()
        result = train.train(model, objective, dataset, train_cfg, run.path / "train",
                             device=device, progress=progress, validate=validate)
        if _STOP_AFTER_TRAINING:
            raise TrainedOnly(chapter, name, run.path)
        weights = result.best_path if (use_best and result.best_path) else result.final_path
        train.load_weights(model, weights, device)
        model.to(device).eval()
        net, how = evaluation_model(model)
        metrics, arrays = (evaluate(net, folder=run.path) if takes_folder
                           else evaluate(net))
        metrics["evaluation"] = how
        metrics["training"] = {"history": result.history, "seconds": result.seconds,
                               "best_step": result.best_step, "best_val": result.best_metric,
                               "weights": "best-on-validation" if weights == result.best_path
                               else "final", "total_steps": result.total_steps,
                               "precision": result.precision}
        return metrics, arrays

    return results.cached(chapter, name, run_config(config, train_cfg, objective), compute,
                          device=device)


def hours_curve(runs: dict, label: Callable[[str], str],
                test_point: Callable[[dict], tuple[float, float, str]]):
    """What each CPU-hour buys, for any chapter: per run and epoch, validation clean / robust
    accuracy (%) against training hours, then the run's test-set point (a DataFrame with
    columns run, epoch, hours, epoch_s, clean, robust, split).

    ``runs``: name -> run record (``metrics`` with the trainer's ``training.history``);
    ``test_point(metrics) -> (clean, robust, split label)``. ``hours``: epochs times the
    run's fastest epoch. The measured per-epoch wall times are kept (``epoch_s``), but an
    epoch that ran beside other work or while its process was paused (a campaign pauses its
    piece for CI) is slower than the machine is; contention only adds time, so the fastest
    epoch is what one idle machine gives (the HE pilot: 181 s, with half of its 20 epochs at
    220-930 s beside tests and one at 4,567 s paused)."""
    import pandas as pd
    rows = []
    for name, r in runs.items():
        hist = [h for h in r["metrics"].get("training", {}).get("history", [])
                if "val_clean" in h]
        if not hist:
            continue
        per_epoch = float(min(h["seconds"] for h in hist))
        for h in hist:
            rows.append({"run": label(name), "epoch": h["epoch"],
                         "hours": h["epoch"] * per_epoch / 3600, "epoch_s": h["seconds"],
                         "clean": 100 * h["val_clean"],
                         "robust": 100 * h.get("val_robust", float("nan")),
                         "split": "validation"})
        clean, robust, split = test_point(r["metrics"])
        rows.append({"run": label(name), "epoch": hist[-1]["epoch"],
                     "hours": len(hist) * per_epoch / 3600, "epoch_s": per_epoch,
                     "clean": 100 * clean, "robust": 100 * robust, "split": split})
    return pd.DataFrame(rows)


class EvalStages:
    """Finished stages of a run's evaluation, kept in ``<run folder>/eval/<stage>.npz`` (arrays
    and the stage's metrics as JSON): ``stages.get("aa", fn)`` returns the stored
    ``(metrics, arrays)`` of a stage finished before a kill, else computes ``fn()`` and stores
    it. On an overnight CPU run, each of HE's stages (the PGD / C&W attacks on the full test
    set, AutoAttack, the feature geometry) takes tens of minutes; the folder's
    ``metrics.json``/``arrays.npz`` are written when all are done, and the stages stay beside
    them (small files, not published)."""

    def __init__(self, folder):
        from pathlib import Path
        self.dir = None if folder is None else Path(folder) / "eval"

    def get(self, name: str, fn: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
        import json
        import os
        if self.dir is not None:
            f = self.dir / f"{name}.npz"
            if f.exists():
                with np.load(f, allow_pickle=False) as d:
                    arrays = {k: d[k] for k in d.files if k != "__metrics__"}
                    metrics = json.loads(str(d["__metrics__"]))
                return metrics, arrays
        metrics, arrays = fn()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f"{name}.tmp.npz"
            np.savez(tmp, __metrics__=np.array(json.dumps(metrics)),
                     **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, self.dir / f"{name}.npz")
        return metrics, arrays


def run_config(config: dict, train_cfg: train.TrainConfig, objective) -> dict:
    """The full configuration that keys a trained run's cache folder (``config.json``)."""
    return {**config, "train": train_cfg.to_dict(), "objective": _describe(objective)}


def _describe(objective) -> dict:
    cfg = getattr(objective, "config", None)
    return cfg() if callable(cfg) else {"name": type(objective).__name__}


def model_for(arch: str, dataset: data.Dataset, *, width: int | None = None,
              normalize: bool = True, **kw):
    """A registered architecture sized for ``dataset`` (classes, channels, normalisation:
    ``normalize=False`` gives an identity input layer, mean 0 and std 1, on [0, 1] inputs)."""
    def make():
        torch.manual_seed(kw.pop("init_seed", 0))
        return build(arch, dataset.num_classes,
                     mean_std=dataset.mean_std if normalize else None, width=width, **kw)
    return make


def as_numpy_images(x: torch.Tensor) -> np.ndarray:
    """Float [0,1] or uint8 NCHW tensors -> uint8 arrays (small to store, exact to show)."""
    if x.dtype == torch.uint8:
        return x.cpu().numpy()
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
