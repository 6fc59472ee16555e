"""Training throughput of M subset models at once (``repro.ensemble``) against the trainer
training one model (``repro.train.train``), in images/s per model and in all.

    python -m repro bench ensemble --device cuda --models 1 8 16 32
    python -m repro bench ensemble --device cpu --models 1 8 --arch small_cnn --width 16

Each configuration trains one epoch of ``--steps`` batches (standard objective, SGD, BN
models as BAT's subset models, random crops and flips) after one untimed warm-up epoch of two
batches. The images are random uint8 tensors of CIFAR's shape (speed does not depend on
content), so no dataset is needed. On CUDA: bf16 autocast, as the trainer.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    from repro import data, ensemble, models, objectives, train

    p = argparse.ArgumentParser(prog="python -m repro bench ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", type=int, nargs="+", default=[1, 8], help="values of M")
    p.add_argument("--arch", default="small_cnn", choices=["small_cnn", "preact_resnet18"])
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default 512 on CUDA, 128 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed batches per model")
    p.add_argument("--no-trainer", action="store_true", help="skip the one-model trainer run")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    bs = args.batch_size or (512 if device.type == "cuda" else 128)
    n = bs * args.steps
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    mean_std = data.MEAN_STD["cifar100"]
    kw = {"in_size": 32, "norm": "bn"} if args.arch == "small_cnn" else {}

    def make(seed):
        torch.manual_seed(seed)
        return models.build(args.arch, args.classes, mean_std=mean_std, width=args.width, **kw)

    cfg = train.TrainConfig(epochs=1, batch_size=bs, lr=0.05, augment=True, val_every=0,
                            val_size=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.arch} width {args.width}, batch {bs}, {args.steps} steps; {name}; "
          f"torch {torch.__version__}")
    for m in args.models:
        idx = [np.arange(n)] * m
        warm = [np.arange(2 * bs)] * m
        ensemble.train_ensemble([make(s) for s in range(m)], x, y, warm, list(range(m)), cfg,
                                device=device)
        _sync(device)
        t = time.perf_counter()
        ensemble.train_ensemble([make(s) for s in range(m)], x, y, idx, list(range(m)), cfg,
                                device=device)
        _sync(device)
        dt = time.perf_counter() - t
        print(f"ensemble M={m:3d}: {n / dt:9.1f} images/s per model, {m * n / dt:9.1f} in all "
              f"({dt:.2f} s)", flush=True)
    if not args.no_trainer:
        ds = data.Dataset("cifar100", [str(i) for i in range(args.classes)], x, y, x[:0], y[:0],
                          x[:0], y[:0], source="random uint8 images")
        with tempfile.TemporaryDirectory() as d:
            train.train(make(0), objectives.standard(), ds.limit(2 * bs), cfg, f"{d}/warm",
                        device=device, progress=False)
            _sync(device)
            t = time.perf_counter()
            train.train(make(0), objectives.standard(), ds, cfg, f"{d}/run", device=device,
                        progress=False)
            _sync(device)
            dt = time.perf_counter() - t
        print(f"trainer, one model: {n / dt:9.1f} images/s ({dt:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
