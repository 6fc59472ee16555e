"""Introduction chapter: a small CNN on real MNIST, trained normally and with PGD adversarial
training, attacked with FGSM and PGD, and checked for gradient masking.

The threat model is L-inf with eps = 0.1 on MNIST, as in Kolter & Madry's adversarial
robustness tutorial: small enough that a 4-layer CNN trains robustly in minutes on a CPU.
"""
from __future__ import annotations

import numpy as np
import torch

from repro import attacks, evaluate, objectives
from repro.experiments import common
from repro.params import Param, Spec
from repro.train import TrainConfig

SPEC = Spec("intro", [
    Param("epochs", "int", "training epochs for each model", ge=1),
    Param("n_train", "int", "training images (None: all 55,000)", optional=True, ge=1, le=55000),
    Param("n_test", "int", "test images evaluated", ge=1, le=10000),
    Param("eps", "float", "L-inf attack radius on [0,1] pixels, train and test", ge=0, le=1),
    Param("train_steps", "int", "PGD steps when generating training attacks", ge=1),
    Param("eval_steps", "int", "PGD steps in evaluation", ge=1),
    Param("restarts", "int", "PGD random restarts in evaluation", ge=1),
    Param("eps_grid", "list[float]", "radii for the accuracy-vs-eps curve", ge=0, le=1),
    Param("autoattack", "str", "AutoAttack version run on the adversarially trained model",
          choices=("none", "fast", "standard")),
    Param("seed", "int", "seed for data order, initialisation and attacks", ge=0),
    Param("device", "str", "'auto', 'cpu' or 'cuda'"),
], presets={
    "smoke": dict(epochs=1, n_train=3000, n_test=200, eps=0.1, train_steps=5, eval_steps=10,
                  restarts=1, eps_grid=[0.0, 0.05, 0.1, 0.2, 0.3], autoattack="none", seed=0,
                  device="auto"),
    "laptop": dict(epochs=3, n_train=None, n_test=2000, eps=0.1, train_steps=10, eval_steps=40,
                   restarts=2, eps_grid=[0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3],
                   autoattack="fast", seed=0, device="auto"),
    # 2 CPU cores, in one campaign piece (python -m repro campaign plan --device cpu
    # --preset overnight): the gpu preset's setup (10 epochs of PGD-20 training, the full test
    # set, AutoAttack standard); the intro's claims are decided at the laptop preset already.
    "overnight": dict(epochs=10, n_train=None, n_test=10000, eps=0.1, train_steps=20,
                      eval_steps=100, restarts=2,
                      eps_grid=[0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3],
                      autoattack="standard", seed=0, device="auto"),
    # one H200 campaign piece (~1-2 min by counted operations; repro/campaign/)
    "gpu": dict(epochs=10, n_train=None, n_test=10000, eps=0.1, train_steps=20, eval_steps=100,
                restarts=2, eps_grid=[0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3],
                autoattack="standard", seed=0, device="auto"),
    "paper": dict(epochs=20, n_train=None, n_test=10000, eps=0.1, train_steps=40,
                  eval_steps=100, restarts=10, eps_grid=[0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3],
                  autoattack="standard", seed=0, device="auto"),
})

METHODS = ("standard", "pgd_at")


def _evaluate(model, ds, cfg, device, progress):
    """Everything the chapter shows about one trained model, as metrics + small arrays."""
    eps, steps, restarts, seed = cfg["eps"], cfg["eval_steps"], cfg["restarts"], cfg["seed"]
    x, y = ds.x_test, ds.y_test
    gen = torch.Generator(device=device).manual_seed(seed)
    alpha = 2.5 * eps / steps  # Madry et al.'s rule: the walk can cross the ball 2.5 times
    attack_set = {
        "fgsm": lambda m, xb, yb: attacks.fgsm(m, xb, yb, eps=eps),
        f"pgd{steps}": lambda m, xb, yb: attacks.pgd(m, xb, yb, eps=eps, alpha=alpha, steps=steps,
                                                     restarts=restarts, generator=gen),
    }
    res = evaluate.robust_eval(model, x, y, attack_set, device=device, progress=progress,
                               threat=("linf", eps))
    metrics = {"accuracy": res.accuracy(), "n_test": res.n}
    arrays = {"correct_clean": res.clean, **{f"correct_{k}": v for k, v in res.per_attack.items()}}

    curve = []  # robust accuracy against eps, PGD with the same step rule
    for e in cfg["eps_grid"]:
        if e == 0:
            curve.append(float(res.clean.mean()))
            continue
        r = evaluate.robust_eval(model, x, y, {"pgd": lambda m, xb, yb, e=e: attacks.pgd(
            m, xb, yb, eps=e, alpha=2.5 * e / steps, steps=steps, generator=gen)},
            device=device, progress=False)
        curve.append(float(r.per_attack["pgd"].mean()))
    metrics["eps_curve"] = {"eps": cfg["eps_grid"], "accuracy": curve}

    # A few adversarial examples to look at: the first 8 test digits under PGD.
    xs, ys = common.data.to_float(x[:8]).to(device), y[:8].to(device)
    x_adv = attacks.pgd(model, xs, ys, eps=eps, alpha=alpha, steps=steps, generator=gen)
    with torch.no_grad():
        arrays["examples_clean"] = common.as_numpy_images(xs)
        arrays["examples_adv"] = common.as_numpy_images(x_adv)
        arrays["examples_label"] = ys.cpu().numpy()
        arrays["examples_pred_clean"] = model(xs).argmax(1).cpu().numpy()
        arrays["examples_pred_adv"] = model(x_adv).argmax(1).cpu().numpy()
    return metrics, arrays


def _evaluate_robust_model(model, ds, cfg, device, progress):
    metrics, arrays = _evaluate(model, ds, cfg, device, progress)
    n_check = min(len(ds.y_test), 500)
    report = evaluate.sanity_report(model, ds.x_test[:n_check], ds.y_test[:n_check],
                                    eps=cfg["eps"], steps=cfg["eval_steps"],
                                    aa_version="fast", device=device, seed=cfg["seed"],
                                    square_queries=300 if cfg["preset"] == "smoke" else 1000)
    metrics["sanity"] = report.to_dict()
    if cfg["autoattack"] != "none":
        aa = evaluate.autoattack(model, ds.x_test, ds.y_test, eps=cfg["eps"],
                                 version=cfg["autoattack"], device=device, seed=cfg["seed"])
        key = next(iter(aa.per_attack))
        metrics["autoattack"] = {"version": cfg["autoattack"], "key": key,
                                 "accuracy": float(aa.per_attack[key].mean())}
        arrays["correct_autoattack"] = aa.per_attack[key]
    return metrics, arrays


def train_config(cfg: dict) -> TrainConfig:
    """The chapter's training recipe for a resolved config (Adam 1e-3, batch 100, lr x 0.1
    after 3/4 of training, no augmentation; validation PGD-10 at the config's eps)."""
    eps = cfg["eps"]
    return TrainConfig(epochs=cfg["epochs"], batch_size=100, optimizer="adam", lr=1e-3,
                       weight_decay=0.0, schedule="multistep", milestones=(0.75,),
                       seed=cfg["seed"], augment=False, val_size=500, val_eps=eps,
                       val_alpha=2.5 * eps / 10, val_steps=10)


def training_objective(method: str, cfg: dict):
    """``standard`` or ``pgd_at`` (PGD-``train_steps`` at the config's eps, step
    2.5·eps/steps) for a resolved config."""
    if method == "standard":
        return objectives.standard()
    eps = cfg["eps"]
    return objectives.pgd_at(eps=eps, alpha=2.5 * eps / cfg["train_steps"],
                             steps=cfg["train_steps"])


def run(preset: str = "smoke", progress: bool = True, **overrides) -> dict:
    """Train both models (or reuse cached runs) and return what the chapter shows."""
    cfg = SPEC.resolve(preset, **overrides)
    device = common.pick_device(cfg["device"])
    ds = common.load_dataset("mnist", n_train=cfg["n_train"], n_test=cfg["n_test"], n_val=500)
    train_cfg = train_config(cfg)
    key = {k: v for k, v in cfg.items() if k not in ("device",)}
    out = {"config": cfg, "runs": {}}
    for method in METHODS:
        objective = training_objective(method, cfg)
        evaluate_fn = _evaluate if method == "standard" else _evaluate_robust_model
        run = common.train_and_evaluate(
            "intro", method, {**key, "method": method},
            model_fn=common.model_for("small_cnn", ds), objective=objective, dataset=ds,
            train_cfg=train_cfg, device=device, progress=progress,
            evaluate=lambda m, f=evaluate_fn: f(m, ds, cfg, device, progress))
        out["runs"][method] = {"metrics": run.metrics(), "arrays": run.arrays(),
                               "provenance": run.provenance(), "path": str(run.path)}
    out["summary"] = {m: r["metrics"]["accuracy"] for m, r in out["runs"].items()}
    return out


def table(result: dict):
    """The chapter's main table: accuracy per model and attack (a pandas DataFrame)."""
    import pandas as pd
    rows = {}
    for method, r in result["runs"].items():
        acc = dict(r["metrics"]["accuracy"])
        if "autoattack" in r["metrics"]:
            acc[f"AutoAttack ({r['metrics']['autoattack']['version']})"] = \
                r["metrics"]["autoattack"]["accuracy"]
        rows[{"standard": "standard training", "pgd_at": "PGD adversarial training"}[method]] = acc
    table = (pd.DataFrame(rows).T * 100).round(2)
    return table.astype(object).where(table.notna(), "—")  # AutoAttack runs on the AT model only


def examples(result: dict, method: str) -> dict[str, np.ndarray]:
    a = result["runs"][method]["arrays"]
    return {k[len("examples_"):]: a[k] for k in a if k.startswith("examples_")}
