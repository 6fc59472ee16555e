"""HE chapter: Boosting Adversarial Training with Hypersphere Embedding (Pang et al., NeurIPS 2020).

Each AT variant (PGD-AT, TRADES, ALP) is trained twice on CIFAR-10 from the same initial body
weights, data order and budget: once with a linear head and its usual loss, once with HE (a
hypersphere head, logits cos θ, and the margin loss CE(s·(cos θ − m·1_y))). Every model is then
evaluated on its *actual output* (cos θ for HE models) with

* PGD on cross-entropy (weak on unscaled cosines: softmax of values in [-1, 1] is nearly flat),
* PGD on the C&W margin loss (max_{j≠y} z_j − z_y: invariant to the logit scale),
* AutoAttack (APGD-CE + APGD-T at ``autoattack="fast"``, the standard suite otherwise),

with the per-example worst case, a robust-accuracy-against-eps curve (C&W-loss PGD), and the
feature norms ||z|| and angles ∠(z, W_y) of the penultimate features on clean and attacked
test images (the paper's argument: the norm steers a standard model's attack, HE removes it).

Checkpoint choice: the *final* weights of every run are evaluated. The trainer's validation
PGD uses CE on the model output, which is the weak attack on an HE model, so choosing
"best on validation" would favour HE; the final epoch is also what the official code reports.
Everything the notebook shows is stored in each run's metrics.json / arrays.npz.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from repro import attacks, claims, evaluate, objectives
from repro.experiments import common
from repro.params import Param, Spec
from repro.train import TrainConfig

VARIANTS = ("pgd_at", "trades", "alp")
LABELS = {"pgd_at": "PGD-AT", "trades": "TRADES", "alp": "ALP"}
# The official defaults of the HE objectives (ShawnXYang/AT_HE).
HE_DEFAULTS = {"pgd_at": dict(s=10.0, m=0.2), "trades": dict(s=15.0, m=0.2),
               "alp": dict(s=20.0, m=0.3)}
BETAS = {"trades": 6.0, "alp": 0.5}
ARCHITECTURES = ("preact_resnet18", "wrn34_10", "wrn34_20")

# What the paper / RobustBench publish (CIFAR-10, eps 8/255). Only numbers we could check are
# transcribed; the rest of the paper's Table 2 is referenced, not copied from memory.
PUBLISHED = {
    "pgd_at_he": {"source": "RobustBench Pang2020Boosting (WRN-34-20)", "clean": 85.14,
                  "autoattack": 53.74},
}

SPEC = Spec("he", [
    Param("variants", "list[str]", "AT variants, each trained with and without HE",
          choices=VARIANTS),
    Param("architecture", "str", "network (PreAct-ResNet-18 or the paper's WRN-34-10/20)",
          choices=ARCHITECTURES),
    Param("width", "int", "PreAct-ResNet first-stage channels (None: the paper's 64; "
          "ignored for WRNs)", optional=True),
    Param("epochs", "int", "training epochs of every run"),
    Param("n_train", "int", "CIFAR-10 training images (None: all 49,000 after validation)",
          optional=True),
    Param("n_test", "int", "test images for clean / PGD / C&W accuracy and the feature plots"),
    Param("n_aa", "int", "test images (the first n) given to AutoAttack"),
    Param("eps", "float", "L-inf radius in /255 units, training and evaluation (8 = 8/255)"),
    Param("train_steps", "int", "PGD steps of the training attack (step 2.5·eps/steps)"),
    Param("eval_steps", "int", "PGD steps of the CE and C&W evaluation attacks"),
    Param("restarts", "int", "random restarts of the evaluation attacks"),
    Param("s", "float", "HE scale s for every variant (None: official s per variant: "
          "PGD-AT 10, TRADES 15, ALP 20)", optional=True),
    Param("m", "float", "HE margin m for every variant (None: official m: PGD-AT 0.2, "
          "TRADES 0.2, ALP 0.3)", optional=True),
    Param("eps_grid", "list[float]", "radii (/255) of the robust-accuracy-vs-eps curve"),
    Param("autoattack", "str", "AutoAttack version on the first n_aa test images",
          choices=("none", "fast", "standard")),
    Param("batch_size", "int", "training batch size"),
    Param("lr", "float", "SGD learning rate (momentum 0.9, weight decay 5e-4)"),
    Param("schedule", "str", "learning-rate schedule", choices=("onecycle", "multistep")),
    Param("milestones", "list[float]", "multistep: lr ×0.1 at these epochs (≥ 1) or "
          "fractions of training (< 1)"),
    Param("val_size", "int", "validation images for the training curves (0: none)"),
    Param("seed", "int", "seed for data order, initialisation and attacks"),
    Param("device", "str", "'auto', 'cpu' or 'cuda'"),
], presets={
    # CPU, about a minute: PGD-AT with and without HE on 512 images of a width-4 network.
    "smoke": dict(variants=["pgd_at"], architecture="preact_resnet18", width=4, epochs=1,
                  n_train=512, n_test=100, n_aa=0, eps=8.0, train_steps=3, eval_steps=5,
                  restarts=1, s=None, m=None, eps_grid=[0.0, 4.0, 8.0, 16.0],
                  autoattack="none", batch_size=64, lr=0.1, schedule="onecycle",
                  milestones=[0.5, 0.75], val_size=64, seed=0, device="auto"),
    # 2 CPU cores, ~20 min for the six runs: width-8 PreAct-ResNet-18 on 2,000 images.
    "laptop": dict(variants=list(VARIANTS), architecture="preact_resnet18", width=8, epochs=4,
                   n_train=2000, n_test=200, n_aa=100, eps=8.0, train_steps=5, eval_steps=20,
                   restarts=1, s=None, m=None, eps_grid=[0.0, 4.0, 8.0, 16.0],
                   autoattack="fast", batch_size=64, lr=0.1, schedule="onecycle",
                   milestones=[0.5, 0.75], val_size=100, seed=0, device="auto"),
    # One H200, six runs in three campaign pieces of two runs (repro/campaign.py: variants
    # [pgd_at], [trades], [alp]; about 4-5 H200-minutes each by counted operations, not yet
    # measured): PreAct-ResNet-18 (width 64), full CIFAR-10, 8 epochs of PGD-7 AT (Madry's
    # CIFAR step count) with a one-cycle schedule, AutoAttack on the first 1000 test images.
    "gpu": dict(variants=list(VARIANTS), architecture="preact_resnet18", width=None, epochs=8,
                n_train=None, n_test=2000, n_aa=1000, eps=8.0, train_steps=7, eval_steps=20,
                restarts=1, s=None, m=None, eps_grid=[0.0, 4.0, 8.0, 16.0],
                autoattack="fast", batch_size=128, lr=0.2, schedule="onecycle",
                milestones=[0.5, 0.75], val_size=500, seed=0, device="auto"),
    # The paper's schedule: 110 epochs, lr 0.1 decayed ×0.1 at epochs 100 and 105, PGD-10
    # training attack. WRN-34-20, the RobustBench entry the claims quote; the paper's Table 2
    # uses WRN-34-10 (-p architecture wrn34_10).
    "paper": dict(variants=list(VARIANTS), architecture="wrn34_20", width=None, epochs=110,
                  n_train=None, n_test=10000, n_aa=10000, eps=8.0, train_steps=10,
                  eval_steps=20, restarts=1, s=None, m=None,
                  eps_grid=[0.0, 2.0, 4.0, 8.0, 12.0, 16.0], autoattack="standard",
                  batch_size=128, lr=0.1, schedule="multistep", milestones=[100.0, 105.0],
                  val_size=1000, seed=0, device="auto"),
})


def run_names(variants) -> list[str]:
    return [n for v in variants for n in (v, f"{v}_he")]


def label(name: str) -> str:
    base = name[:-3] if name.endswith("_he") else name
    return LABELS[base] + ("+HE" if name.endswith("_he") else "")


def he_params(variant: str, cfg: dict) -> dict:
    d = dict(HE_DEFAULTS[variant])
    if cfg.get("s") is not None:
        d["s"] = float(cfg["s"])
    if cfg.get("m") is not None:
        d["m"] = float(cfg["m"])
    return d


def make_objective(name: str, cfg: dict) -> objectives.Objective:
    eps = cfg["eps"] / 255
    kw = dict(eps=eps, alpha=2.5 * eps / cfg["train_steps"], steps=cfg["train_steps"])
    variant, he = (name[:-3], True) if name.endswith("_he") else (name, False)
    if variant in BETAS:
        kw["beta"] = BETAS[variant]
    if he:
        kw.update(he_params(variant, cfg))
        return objectives.build(f"{variant}_he", **kw)
    return objectives.build(variant, **kw)


def _model_fn(cfg: dict, ds, he: bool):
    arch, head = cfg["architecture"], ("hypersphere" if he else "linear")
    if arch == "preact_resnet18":
        return common.model_for("preact_resnet18", ds, width=cfg["width"], head=head)
    widen = {"wrn34_10": 10, "wrn34_20": 20}[arch]
    return common.model_for("wrn", ds, head=head, depth=34, widen_factor=widen)


# ----------------------------------------------------------------------------- geometry

@torch.no_grad()
def feature_geometry(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Penultimate-feature norm ||z|| and angle ∠(z, W_y) (degrees) to the true class's weight
    row, per example (bias ignored for linear heads)."""
    logits, z = model(x, return_features=True)
    w = model.head.weight.float()
    z = z.float()
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    cos_y = cos.gather(1, y[:, None]).squeeze(1).clamp(-1, 1)
    return {"norm": z.norm(dim=1).cpu().numpy().astype(np.float32),
            "angle": torch.rad2deg(torch.acos(cos_y)).cpu().numpy().astype(np.float32)}


# ----------------------------------------------------------------------------- evaluation

def _evaluate(model, ds, cfg, device, progress):
    eps = cfg["eps"] / 255
    steps, restarts, seed = cfg["eval_steps"], cfg["restarts"], cfg["seed"]
    alpha = 2.5 * eps / steps
    x, y = ds.x_test, ds.y_test
    gen = torch.Generator(device=device).manual_seed(seed)
    pgd_key, cw_key = f"pgd{steps}", f"cw{steps}"
    attack_set = {
        pgd_key: lambda m, xb, yb: attacks.pgd(m, xb, yb, eps=eps, alpha=alpha, steps=steps,
                                               restarts=restarts, loss="ce", generator=gen),
        cw_key: lambda m, xb, yb: attacks.pgd(m, xb, yb, eps=eps, alpha=alpha, steps=steps,
                                              restarts=restarts, loss="cw", generator=gen),
    }
    res = evaluate.robust_eval(model, x, y, attack_set, device=device, progress=progress,
                               threat=("linf", eps))
    acc = res.accuracy()
    metrics = {"accuracy": acc, "n_test": res.n, "keys": {"pgd": pgd_key, "cw": cw_key}}
    arrays = {"correct_clean": res.clean,
              **{f"correct_{k}": v for k, v in res.per_attack.items()}}

    if cfg["autoattack"] != "none" and cfg["n_aa"] > 0:
        n = min(cfg["n_aa"], len(y))
        aa = evaluate.autoattack(model, x[:n], y[:n], eps=eps, version=cfg["autoattack"],
                                 device=device, seed=seed)
        key = next(iter(aa.per_attack))
        worst = aa.per_attack[key] & res.worst[:n]
        metrics["autoattack"] = {"version": cfg["autoattack"], "key": key, "n": n,
                                 "accuracy": float(aa.per_attack[key].mean()),
                                 "worst_with_pgd_cw": float(worst.mean()),
                                 "pgd_on_same": float(res.per_attack[pgd_key][:n].mean()),
                                 "cw_on_same": float(res.per_attack[cw_key][:n].mean()),
                                 "clean_on_same": float(res.clean[:n].mean()),
                                 "warnings": aa.info[key].get("warnings", [])}
        arrays["correct_autoattack"] = aa.per_attack[key]

    curve = []  # robust accuracy against eps: C&W-loss PGD (scale-invariant, fair to HE)
    for e in cfg["eps_grid"]:
        if e == 0:
            curve.append(float(res.clean.mean()))
            continue
        ee = e / 255
        r = evaluate.robust_eval(model, x, y, {"cw": lambda m, xb, yb, ee=ee: attacks.pgd(
            m, xb, yb, eps=ee, alpha=2.5 * ee / steps, steps=steps, loss="cw", generator=gen)},
            device=device, progress=False)
        curve.append(float(r.per_attack["cw"].mean()))
    metrics["eps_curve"] = {"eps": list(cfg["eps_grid"]), "accuracy": curve, "attack": cw_key}

    # Feature geometry on clean images and on their C&W-PGD adversarial versions.
    geo = {"clean": [], "adv": []}
    for i in range(0, len(y), 250):
        xb = common.data.to_float(x[i:i + 250]).to(device)
        yb = y[i:i + 250].to(device)
        x_adv = attacks.pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, loss="cw",
                            generator=gen)
        model.eval()
        geo["clean"].append(feature_geometry(model, xb, yb))
        geo["adv"].append(feature_geometry(model, x_adv, yb))
    for kind, parts in geo.items():
        for q in ("norm", "angle"):
            arrays[f"{q}_{kind}"] = np.concatenate([p[q] for p in parts])
    metrics["geometry"] = {f"{q}_{kind}_median": float(np.median(arrays[f"{q}_{kind}"]))
                           for kind in geo for q in ("norm", "angle")}
    return metrics, arrays


def run(preset: str = "smoke", progress: bool = True, only=None, **overrides) -> dict:
    """Train every variant with and without HE (or reuse cached runs); evaluate each.

    ``only``: compute just these run names (e.g. ``["pgd_at_he"]``), to split a preset over
    processes or sessions; the cache joins them afterwards."""
    cfg = SPEC.resolve(preset, **overrides)
    device = common.pick_device(cfg["device"])
    val = cfg["val_size"]
    ds = common.load_dataset("cifar10", n_train=cfg["n_train"], n_test=cfg["n_test"],
                             n_val=max(val, 1), val_size=1000)
    eps = cfg["eps"] / 255
    train_cfg = TrainConfig(
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer="sgd", lr=cfg["lr"],
        momentum=0.9, weight_decay=5e-4, schedule=cfg["schedule"],
        milestones=tuple(cfg["milestones"]), seed=cfg["seed"], augment=True,
        val_every=1 if val > 0 else 0, val_size=val, val_eps=eps, val_alpha=eps / 4,
        val_steps=10)
    # what changes a run's result: everything but the device and the list of variants
    key = {k: v for k, v in cfg.items() if k not in ("device", "variants")}
    out = {"config": cfg, "runs": {}}
    for name in run_names(cfg["variants"]):
        if only is not None and name not in only:
            continue
        he = name.endswith("_he")
        objective = make_objective(name, cfg)
        r = common.train_and_evaluate(
            "he", name, {**key, "method": name}, model_fn=_model_fn(cfg, ds, he),
            objective=objective, dataset=ds, train_cfg=train_cfg, device=device,
            progress=progress, use_best=False,
            evaluate=lambda m: _evaluate(m, ds, cfg, device, progress))
        out["runs"][name] = {"metrics": r.metrics(), "arrays": r.arrays(),
                             "provenance": r.provenance(), "path": str(r.path)}
    out["summary"] = {n: summary_row(r["metrics"]) for n, r in out["runs"].items()}
    return out


# ----------------------------------------------------------------------------- tables

def summary_row(metrics: dict) -> dict:
    acc, keys = metrics["accuracy"], metrics["keys"]
    row = {"clean": acc["clean"], "pgd": acc[keys["pgd"]], "cw": acc[keys["cw"]],
           "worst": acc["worst"]}
    if "autoattack" in metrics:
        row["autoattack"] = metrics["autoattack"]["accuracy"]
    return row


def table(result: dict):
    """Clean / PGD / C&W / AutoAttack accuracy (%) per run, paper numbers beside ours."""
    import pandas as pd
    cfg = result["config"]
    rows = []
    for name, r in result["runs"].items():
        m = r["metrics"]
        row = {"run": label(name),
               "clean": 100 * m["accuracy"]["clean"],
               f"PGD-{cfg['eval_steps']} (CE)": 100 * m["accuracy"][m["keys"]["pgd"]],
               f"C&W-PGD-{cfg['eval_steps']}": 100 * m["accuracy"][m["keys"]["cw"]],
               "worst (PGD, C&W)": 100 * m["accuracy"]["worst"]}
        if "autoattack" in m:
            aa = m["autoattack"]
            row[f"AutoAttack-{aa['version']} (first {aa['n']})"] = 100 * aa["accuracy"]
        pub = PUBLISHED.get(name)
        row["paper: clean / AA"] = (f"{pub['clean']:.2f} / {pub['autoattack']:.2f} "
                                    f"({pub['source']})" if pub else "Table 2 of the paper")
        rows.append(row)
    df = pd.DataFrame(rows).set_index("run")
    return df.round(2)


def paired_gain(result: dict, base: str, attack: str) -> tuple[float, float, int]:
    """Gain (points) of ``base``+HE over ``base`` on per-example robustness under ``attack``
    ('pgd', 'cw', 'worst', 'autoattack'), and its paired standard error."""
    def correct(name):
        r = result["runs"][name]
        a, m = r["arrays"], r["metrics"]
        if attack == "autoattack":
            return np.asarray(a["correct_autoattack"], bool)
        if attack == "worst":
            return (np.asarray(a[f"correct_{m['keys']['pgd']}"], bool)
                    & np.asarray(a[f"correct_{m['keys']['cw']}"], bool))
        return np.asarray(a[f"correct_{m['keys'][attack]}"], bool)
    c0, c1 = correct(base), correct(f"{base}_he")
    d = c1.astype(float) - c0.astype(float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return 100 * float(d.mean()), 100 * float(se), len(d)


# ----------------------------------------------------------------------------- claims

def _full_scale(cfg: dict) -> bool:
    return cfg["architecture"] == "wrn34_20" and cfg["n_train"] is None and cfg["epochs"] >= 100


def _gain_verdict(gain: float, se: float) -> str:
    if gain > 2 * se and gain > 0:
        return claims.REPRODUCED
    if gain > 0:
        return claims.PARTLY
    return claims.NOT_REPRODUCED


def _rb(metric: str, paper_value: float):
    def judge(result: dict) -> claims.Outcome:
        if "pgd_at_he" not in result["runs"]:
            return claims.Outcome("—", claims.NOT_YET_RUN, note="no PGD-AT+HE run published")
        m = result["runs"]["pgd_at_he"]["metrics"]
        if metric == "autoattack" and "autoattack" not in m:
            return claims.Outcome("—", claims.NOT_YET_RUN, note="the run has no AutoAttack")
        ours = 100 * (m["accuracy"]["clean"] if metric == "clean" else m["autoattack"]["accuracy"])
        cfg = result["config"]
        if not _full_scale(cfg):
            return claims.Outcome(f"{ours:.1f}% ({cfg['architecture']}, preset "
                                  f"{cfg['preset']}: not comparable)", claims.NOT_YET_RUN,
                                  value=ours, note="needs the paper-scale WRN-34-20 run")
        diff = abs(ours - paper_value)
        verdict = (claims.REPRODUCED if diff <= 1 else claims.PARTLY if diff <= 3
                   else claims.NOT_REPRODUCED)
        return claims.Outcome(f"{ours:.2f}%", verdict, value=ours)
    return judge


def _gain_claim(attack: str):
    def judge(result: dict) -> claims.Outcome:
        if not {"pgd_at", "pgd_at_he"} <= set(result["runs"]):
            return claims.Outcome("—", claims.NOT_YET_RUN, note="PGD-AT ± HE not both run")
        if attack == "autoattack" and "autoattack" not in result["runs"]["pgd_at"]["metrics"]:
            return claims.Outcome("—", claims.NOT_YET_RUN, note="the run has no AutoAttack")
        g, se, n = paired_gain(result, "pgd_at", attack)
        return claims.Outcome(f"{g:+.1f} ± {se:.1f} points (n = {n})",
                              _gain_verdict(g, se), value=g,
                              note="paired difference ± its standard error; reproduced "
                                   "needs gain > 2 SE")
    return judge


def _orthogonal(result: dict) -> claims.Outcome:
    bases = [b for b in ("trades", "alp") if {b, f"{b}_he"} <= set(result["runs"])]
    if not bases:
        return claims.Outcome("—", claims.NOT_YET_RUN, note="TRADES/ALP ± HE not run")
    attack = ("autoattack" if all("autoattack" in result["runs"][b]["metrics"] for b in bases)
              else "worst")
    gains = {b: paired_gain(result, b, attack) for b in bases}
    verdicts = [_gain_verdict(g, se) for g, se, _ in gains.values()]
    if len(bases) == 2 and all(v == claims.REPRODUCED for v in verdicts):
        verdict = claims.REPRODUCED
    elif any(g > 0 for g, _, _ in gains.values()):
        verdict = claims.PARTLY
    else:
        verdict = claims.NOT_REPRODUCED
    ours = "; ".join(f"{LABELS[b]}: {g:+.1f} ± {se:.1f}" for b, (g, se, _) in gains.items())
    return claims.Outcome(f"{ours} points ({attack})", verdict,
                          value=float(np.mean([g for g, _, _ in gains.values()])))


CLAIMS = [
    dataclasses.replace(claims.get("he.rb-clean"), evaluate=_rb("clean", 85.14)),
    dataclasses.replace(claims.get("he.rb-aa"), evaluate=_rb("autoattack", 53.74)),
    dataclasses.replace(claims.get("he.pgd-gain"), evaluate=_gain_claim("pgd")),
    dataclasses.replace(claims.get("he.aa-gain"), evaluate=_gain_claim("autoattack")),
    dataclasses.replace(claims.get("he.orthogonal"), evaluate=_orthogonal),
]


def verdicts(result: dict):
    """The chapter's claims with our values and verdicts (a pandas DataFrame)."""
    import pandas as pd
    rows = []
    for c in CLAIMS:
        o = c.judge(result)
        rows.append({"claim": c.text, "paper": c.paper_value + (f" ({c.unit})" if c.unit else ""),
                     "ours": o.ours, "verdict": o.verdict})
    return pd.DataFrame(rows)
