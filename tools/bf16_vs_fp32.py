"""Does bf16 training reach the fp32 run's clean and robust accuracy? Train the same recipe
with ``amp="fp32"`` and ``amp="bf16"`` for each seed, evaluate every model in fp32 on the same
test images, and print a table.

Two recipes (``--recipe``):

- ``cifar-fgsm-rs`` (default): FGSM-RS (Wong et al. 2020: eps 8/255, step 10/255, uniform
  random start), PreAct-ResNet-18 of base width ``--width``, the full CIFAR-10 training set
  (``--n-train`` cuts it), batch 128, SGD momentum 0.9, weight decay 5e-4, one-cycle learning
  rate peaking at 0.2, random crop + flip. Evaluated with PGD-``--pgd-steps`` (eps 8/255,
  step 2/255). The laptop-scale comparison of issue 17, for a CPU with native bf16
  (AVX512_BF16 / AMX_BF16) or a GPU:

      python tools/bf16_vs_fp32.py --epochs 10 --width 16 --seeds 0 1 --n-test 2000

- ``mnist-pgd``: the intro chapter's PGD-AT recipe (``repro.experiments.intro``): its small
  CNN on all of MNIST, PGD-10 training attack (eps 0.1, step 2.5·eps/10), Adam 1e-3, batch
  100, learning rate × 0.1 after 3/4 of training, no augmentation. Evaluated with
  PGD-``--pgd-steps`` (eps 0.1, step 2.5·eps/steps). Small enough to compare on a CPU that
  emulates bf16 (the 2-core AVX2 machine of this project: about 4.5× slower than fp32 for
  this recipe; the run below took 32 min there, book/how-to-run.md has its table):

      python tools/bf16_vs_fp32.py --recipe mnist-pgd --epochs 3 --seeds 0 1 --n-test 2000 --pgd-steps 40

Every model is evaluated the same way: clean accuracy and PGD with one random start from a
fixed generator, in fp32, on the first ``--n-test`` test images, identical for every model;
the table gives bf16 − fp32 paired per seed and the seed-to-seed SD of the fp32 runs.

Runs are resumable and cached under ``--out`` (default ``results/bf16_vs_fp32``): one folder
per (precision, seed, recipe); rerunning prints the table from the finished runs. The table is
also written to ``<out>/summary.json`` (``<out>/<recipe>/summary.json`` for ``mnist-pgd``).
A toy run that only proves the script works:

    python tools/bf16_vs_fp32.py --toy
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repro import attacks, data, evaluate, models, objectives, results, train  # noqa: E402
from repro.experiments import intro  # noqa: E402

EPS, FGSM_ALPHA, PGD_ALPHA = 8 / 255, 10 / 255, 2 / 255     # cifar-fgsm-rs
MNIST_EPS = intro.SPEC.resolve("laptop")["eps"]              # mnist-pgd: the intro chapter's


def train_one(amp: str, seed: int, args, ds, device) -> tuple[torch.nn.Module, train.TrainResult]:
    if args.recipe == "mnist-pgd":   # the intro chapter's own recipe, at its laptop preset
        icfg = intro.SPEC.resolve("laptop", epochs=args.epochs, seed=seed)
        recipe = {"recipe": args.recipe, "amp": amp, "seed": seed, "width": args.width,
                  "epochs": args.epochs, "n_train": len(ds.y_train), "objective": "pgd_at",
                  "eps": icfg["eps"], "alpha": 2.5 * icfg["eps"] / icfg["train_steps"],
                  "steps": icfg["train_steps"]}
        cfg = dataclasses.replace(intro.train_config(icfg), amp=amp, val_every=0)
        objective = intro.training_objective("pgd_at", icfg)
        torch.manual_seed(seed)
        model = models.build("small_cnn", 10, mean_std=ds.mean_std, width=args.width)
    else:
        recipe = {"amp": amp, "seed": seed, "width": args.width, "epochs": args.epochs,
                  "batch_size": args.batch_size, "lr": args.lr, "n_train": len(ds.y_train),
                  "objective": "fgsm_rs", "eps": EPS, "alpha": FGSM_ALPHA}
        cfg = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                momentum=0.9, weight_decay=5e-4, schedule="onecycle", seed=seed,
                                augment=True, amp=amp, val_every=0)
        objective = objectives.fgsm_rs(EPS, FGSM_ALPHA)
        torch.manual_seed(seed)
        model = models.build("preact_resnet18", 10, mean_std=ds.mean_std, width=args.width)
    run_dir = Path(args.out) / f"{amp}-s{seed}-{results.config_key(recipe)}"
    result = train.train(model, objective, ds, cfg, run_dir, device=device,
                         progress=args.progress)
    return model, result


def evaluate_fp32(model, ds, args, device) -> dict:
    eps = MNIST_EPS if args.recipe == "mnist-pgd" else EPS
    alpha = 2.5 * eps / args.pgd_steps if args.recipe == "mnist-pgd" else PGD_ALPHA
    pgd = functools.partial(attacks.pgd, eps=eps, alpha=alpha, steps=args.pgd_steps,
                            generator=torch.Generator().manual_seed(1234))
    res = evaluate.robust_eval(model.to(device).eval(), ds.x_test, ds.y_test, {"pgd": pgd},
                               device=device, progress=False, threat=("linf", eps))
    return {"clean": res.clean, "pgd": res.per_attack["pgd"]}


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b over the same examples and its standard error."""
    d = a.astype(float) - b.astype(float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=("cifar-fgsm-rs", "mnist-pgd"), default="cifar-fgsm-rs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=None,
                   help="PreAct-ResNet-18 base width (default 16) or the small CNN's (default: "
                        "the intro chapter's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-train", type=int, default=None, help="default: the full training set")
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.2, help="one-cycle peak")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(results.results_root() / "bf16_vs_fp32"))
    p.add_argument("--progress", action="store_true")
    p.add_argument("--toy", action="store_true",
                   help="a ~1-minute run that proves the script works: 256 training images, "
                        "width 4, 1 epoch, 100 test images, PGD-3 (its numbers mean nothing)")
    args = p.parse_args(argv)
    if args.recipe == "cifar-fgsm-rs" and args.width is None:
        args.width = 16
    if args.toy:
        args.n_train, args.width, args.epochs, args.n_test = 256, 4, 1, 100
        args.batch_size, args.pgd_steps = 64, 3
        args.out = str(Path(args.out) / "toy")
    if args.recipe != "cifar-fgsm-rs":
        args.out = str(Path(args.out) / args.recipe)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = train.resolve_device(args.device)
    native = train.resolve_precision(train.TrainConfig(), device)["amp"] == "bf16"
    if not native:
        print(f"note: {device} has no native bf16 here, so the bf16 runs are emulated (slow); "
              f"the comparison is meant for a machine where amp='auto' picks bf16", flush=True)
    name = "mnist" if args.recipe == "mnist-pgd" else "cifar10"
    ds = data.load(name).limit(n_train=args.n_train, n_val=0, n_test=args.n_test)

    rows, outcomes = [], {}
    for seed in args.seeds:
        for amp in ("fp32", "bf16"):
            t0 = time.perf_counter()
            model, result = train_one(amp, seed, args, ds, device)
            out = evaluate_fp32(model, ds, args, device)
            outcomes[amp, seed] = out
            rows.append({"amp": amp, "seed": seed, "clean": float(out["clean"].mean()),
                         "pgd": float(out["pgd"].mean()), "train_s": result.seconds,
                         "precision": result.precision, "cached": result.cached,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"  {amp} seed {seed}: clean {rows[-1]['clean']:.4f}  PGD {rows[-1]['pgd']:.4f}"
                  f"  (train {result.seconds:.0f} s{', cached' if result.cached else ''})", flush=True)

    diffs = []
    for seed in args.seeds:
        b, f = outcomes["bf16", seed], outcomes["fp32", seed]
        diffs.append({"seed": seed, **{f"{k}_diff": _paired(b[k], f[k]) for k in ("clean", "pgd")}})
    seed_noise = {}
    if len(args.seeds) > 1:
        for k in ("clean", "pgd"):
            accs = [float(outcomes["fp32", s][k].mean()) for s in args.seeds]
            seed_noise[k] = float(np.std(accs, ddof=1))

    if args.recipe == "mnist-pgd":
        print(f"\nPGD-10 AT (eps 0.1) small CNN (width {args.width or 'default'}), MNIST n_train "
              f"{len(ds.y_train)}, {args.epochs} epochs, batch 100, Adam, {device}; evaluated "
              f"in fp32 on the first {len(ds.y_test)} test images (PGD-{args.pgd_steps}, eps 0.1)")
    else:
        print(f"\nFGSM-RS PreAct-ResNet-18 width {args.width}, CIFAR-10 n_train {len(ds.y_train)}, "
              f"{args.epochs} epochs, batch {args.batch_size}, {device}; evaluated in fp32 on the "
              f"first {len(ds.y_test)} test images (PGD-{args.pgd_steps}, eps 8/255)")
    print(f"{'amp':5s} {'seed':>4s} {'clean':>8s} {'PGD':>8s} {'train s':>8s}")
    for r in rows:
        print(f"{r['amp']:5s} {r['seed']:4d} {100 * r['clean']:7.2f}% {100 * r['pgd']:7.2f}% "
              f"{r['train_s']:8.0f}")
    print("bf16 - fp32, same seed, same test images (percentage points, +- 1 paired SE):")
    for d in diffs:
        (c, cs), (g, gs) = d["clean_diff"], d["pgd_diff"]
        print(f"  seed {d['seed']}: clean {100 * c:+.2f} +- {100 * cs:.2f}   "
              f"PGD {100 * g:+.2f} +- {100 * gs:.2f}")
    if seed_noise:
        print(f"seed noise (fp32, SD across seeds): clean {100 * seed_noise['clean']:.2f}  "
              f"PGD {100 * seed_noise['pgd']:.2f} points")
    summary = {"args": vars(args), "device": str(device), "native_bf16": native, "rows": rows,
               "paired_bf16_minus_fp32": diffs, "seed_sd_fp32": seed_noise,
               "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"written {Path(args.out) / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
