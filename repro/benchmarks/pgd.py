"""PGD-10 throughput (images/s) of a PreAct-ResNet-18 on CIFAR-shaped inputs.

    python -m repro bench pgd --device cuda --batch-size 512 --iters 20

On CUDA the attack runs under bf16 autocast with channels_last memory, as in training; the
inputs are random images (speed does not depend on content), so no dataset is needed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from repro import attacks
from repro.data import MEAN_STD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device=None, batch_size=None, iters=10, warmup=2, steps=10, width=64) -> dict:
    """Time ``iters`` PGD calls after ``warmup``; returns images/s and the settings."""
    from repro import models  # another package of the library; imported only when run

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    bs = batch_size or (512 if cuda else 32)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = models.build("preact_resnet18", num_classes=10, mean_std=MEAN_STD["cifar10"],
                         width=width)
    model = model.to(device, memory_format=fmt).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(bs, 3, 32, 32, device=device, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,), device=device, generator=g)
    eps = 8 / 255

    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            attacks.pgd(model, x, y, eps=eps, alpha=2 / 255, steps=steps, generator=g)

    for _ in range(warmup):
        once()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        once()
    _sync(device)
    dt = time.perf_counter() - t
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "model": f"preact_resnet18(width={width})",
            "attack": f"PGD-{steps} linf eps 8/255", "batch_size": bs, "iters": iters,
            "precision": "bf16 autocast, channels_last" if cuda else "float32",
            "img_s": round(iters * bs / dt, 1), "ms_per_batch": round(1000 * dt / iters, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro bench pgd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 512 on CUDA, 32 on CPU")
    p.add_argument("--iters", type=int, default=10, help="timed PGD calls (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="PGD steps per call")
    p.add_argument("--width", type=int, default=64, help="PreAct-ResNet-18 base width")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    r = run(args.device, args.batch_size, args.iters, args.warmup, args.steps, args.width)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"PGD-{args.steps} PreAct-ResNet-18 32x32: {r['img_s']:,.1f} images/s "
          f"({r['ms_per_batch']:.1f} ms per batch of {r['batch_size']}; {r['device']}; "
          f"{r['precision']}; torch {r['torch']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
