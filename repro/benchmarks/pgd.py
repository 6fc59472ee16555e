"""PGD-10 throughput (images/s) of a PreAct-ResNet-18 on CIFAR-shaped inputs.

    python -m repro bench pgd --device cuda --batch-size 512 --iters 20

On CUDA the attack runs under bf16 autocast with channels_last memory, as in training; the
inputs are random images (speed does not depend on content), so no dataset is needed.
"""
from __future__ import annotations

import argparse
import time

import torch

from repro import attacks
from repro.data import MEAN_STD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    from repro import models  # another package of the library; imported only when run

    p = argparse.ArgumentParser(prog="python -m repro bench pgd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 512 on CUDA, 32 on CPU")
    p.add_argument("--iters", type=int, default=10, help="timed PGD calls (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="PGD steps per call")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bs = args.batch_size or (512 if cuda else 32)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = models.build("preact_resnet18", num_classes=10, mean_std=MEAN_STD["cifar10"])
    model = model.to(device, memory_format=fmt).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(bs, 3, 32, 32, device=device, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,), device=device, generator=g)
    eps = 8 / 255

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            attacks.pgd(model, x, y, eps=eps, alpha=2 / 255, steps=args.steps, generator=g)

    for _ in range(args.warmup):
        run()
    _sync(device)
    t = time.perf_counter()
    for _ in range(args.iters):
        run()
    _sync(device)
    dt = time.perf_counter() - t
    ips = args.iters * bs / dt
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"PGD-{args.steps} PreAct-ResNet-18 32x32: {ips:,.1f} images/s "
          f"({1000 * dt / args.iters:.1f} ms per batch of {bs}; {name}; "
          f"{'bf16 autocast, channels_last' if cuda else 'float32'}; torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
