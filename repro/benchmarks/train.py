"""Speed of one PGD-10 adversarial-training step of PreAct-ResNet-18 on CIFAR-10 batches:
the repro trainer against a reference loop written the way most research code is.

    python -m repro bench train --device cuda --batch-size 128 --steps 20
    python -m repro bench train --device cpu --width 16 --batch-size 32 --steps 3 --threads 1 --rounds 3

The reference loop (after Rice et al. 2020's ``train_cifar.py``): a Dataset that pads, crops
and flips each image on the CPU, a DataLoader, fp32 NCHW, and a PGD attack that calls
``loss.backward()`` in train mode (so it also computes every weight gradient it throws away).
The repro path is ``repro.train.train`` with ``repro.objectives.pgd_at``: data resident on
the device with batched augmentation, attack in eval mode with frozen weights, and the
trainer's precision and layout (``--amp`` / ``--channels-last``, default "auto": see
``repro.train.resolve_precision``; the choice that ran is printed). Both train the same network
from the same initial weights with the same batch size, epsilon, step size and number of
attack steps; only the steady state is timed (after ``--warmup`` steps; with ``--compile``
the warm-up, which includes compiling, is timed separately). ``--rounds`` alternates the two
paths, which spreads the load of a shared machine over both. On the CPU the benchmark also
reports the ratio of *CPU time* per step (``time.process_time``, this process's threads; the
reference's DataLoader must then run in-process, ``--ref-workers 0``): on a loaded machine
the wall-clock ratio moves with the load of other processes, the CPU-time ratio much less.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from repro import data, models, objectives
from repro.train import TrainConfig, resolve_device, train

EPS, ALPHA, ATTACK_STEPS = 8 / 255, 2 / 255, 10


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timed:
    """Wraps an objective and stamps the clock at every call (after the previous step ended)."""

    def __init__(self, objective, device):
        self.objective, self.device, self.stamps = objective, device, []  # (wall, cpu) s

    def config(self):
        return self.objective.config()

    def __call__(self, model, batch, state):
        _sync(self.device)
        self.stamps.append((time.perf_counter(), time.process_time()))
        return self.objective(model, batch, state)


def _durations(stamps, warmup, steps) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each timed step from (wall, cpu) stamps."""
    d = np.diff(np.asarray(stamps[warmup:warmup + steps + 1]), axis=0)
    return list(d[:, 0]), list(d[:, 1])


def time_repro(model, dataset, batch_size, steps, warmup, device, compile=False, amp="auto",
               channels_last="auto") -> tuple[tuple[list[float], list[float]], float, dict]:
    """Wall and CPU seconds of each of ``steps`` full trainer steps after ``warmup`` untimed
    ones, the wall seconds from the start of ``train`` to the first timed step (warm-up, and
    compiling with ``compile``), and the precision record of the run."""
    timed = _Timed(objectives.pgd_at(EPS, ALPHA, ATTACK_STEPS), device)
    cfg = TrainConfig(steps=warmup + steps + 1, batch_size=batch_size, lr=0.1, momentum=0.9,
                      weight_decay=5e-4, schedule="constant", augment=True, val_every=0,
                      checkpoint_every=0, compile=compile, amp=amp, channels_last=channels_last)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, timed, dataset, cfg, run_dir, device=device, progress=False)
    return _durations(timed.stamps, warmup, steps), timed.stamps[warmup][0] - start, result.precision


class _PerImageCIFAR(torch.utils.data.Dataset):
    """The usual transform stack, per image on the CPU: pad 4 + random crop, random flip,
    to float tensor (what ``RandomCrop(32, 4), RandomHorizontalFlip(), ToTensor()`` do)."""

    def __init__(self, x_uint8_nchw, y):
        self.x = x_uint8_nchw.permute(0, 2, 3, 1).numpy()  # HWC, as images are stored on disk
        self.y = y.numpy()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = np.pad(self.x[i], ((4, 4), (4, 4), (0, 0)))
        top, left = np.random.randint(0, 9, size=2)
        img = img[top:top + 32, left:left + 32]
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255)
        return img, int(self.y[i])


def _reference_attack(model, X, y, eps, alpha, steps):
    """PGD as in Rice et al.'s ``attack_pgd``: model left in train mode, ``loss.backward()``."""
    delta = torch.zeros_like(X).uniform_(-eps, eps)
    delta = torch.clamp(delta, -X, 1 - X)
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(model(X + delta), y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
        delta.data = torch.clamp(d, -X, 1 - X)
        delta.grad.zero_()
    return delta.detach()


def time_reference(model, dataset, batch_size, steps, warmup, device,
                   workers=0) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each of ``steps`` steps of the research-style loop after
    ``warmup``."""
    loader = torch.utils.data.DataLoader(
        _PerImageCIFAR(dataset.x_train, dataset.y_train), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.to(device).train()
    stamps = []
    for i, (X, y) in enumerate(loader):
        _sync(device)
        stamps.append((time.perf_counter(), time.process_time()))
        if i == warmup + steps:
            break
        X, y = X.to(device), y.to(device)
        delta = _reference_attack(model, X, y, EPS, ALPHA, ATTACK_STEPS)
        loss = F.cross_entropy(model(torch.clamp(X + delta, 0, 1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _durations(stamps, warmup, steps)


def run(device=None, batch_size=128, steps=20, warmup=3, width=64, compile=False,
        ref_workers=0, rounds=1, seed=0, amp="auto", channels_last="auto") -> dict:
    """Time both paths, alternating them for ``rounds`` rounds (on a shared machine, load
    changes over time; alternating spreads it evenly). Images/s use the median step time."""
    device = resolve_device(device)
    ds = data.load("cifar10")
    ds = ds.limit(n_train=(warmup + steps + 1) * batch_size, n_val=0, n_test=0)
    torch.manual_seed(seed)
    init = models.build("preact_resnet18", 10, mean_std=ds.mean_std, width=width)
    state = {k: v.clone() for k, v in init.state_dict().items()}

    def fresh():
        m = models.build("preact_resnet18", 10, mean_std=ds.mean_std, width=width)
        m.load_state_dict(state)
        return m

    ref_steps, our_steps, ref_cpu, our_cpu, warmups, precision = [], [], [], [], [], None
    for _ in range(rounds):
        wall, cpu = time_reference(fresh(), ds, batch_size, steps, warmup, device, ref_workers)
        ref_steps, ref_cpu = ref_steps + wall, ref_cpu + cpu
        (wall, cpu), warm_s, precision = time_repro(fresh(), ds, batch_size, steps, warmup,
                                                    device, compile, amp, channels_last)
        our_steps, our_cpu = our_steps + wall, our_cpu + cpu
        warmups.append(warm_s)
    cpu_comparable = device.type == "cpu" and ref_workers == 0
    ref, ours = batch_size / np.median(ref_steps), batch_size / np.median(our_steps)
    per_round = [round(float(np.median(r) / np.median(o)), 3) for r, o in
                 zip(np.array_split(ref_steps, rounds), np.array_split(our_steps, rounds))]
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": f"preact_resnet18(width={width})", "batch_size": batch_size,
            "timed_steps": steps * rounds, "attack": f"PGD-{ATTACK_STEPS} linf eps 8/255",
            "repro_precision": {k: precision[k] for k in ("amp", "channels_last", "compile")},
            "repro_warmup_s": [round(w, 2) for w in warmups],
            "reference_img_s": round(ref, 2), "repro_img_s": round(ours, 2),
            "speedup": round(ours / ref, 3), "speedup_per_round": per_round,
            "reference_mean_img_s": round(batch_size / np.mean(ref_steps), 2),
            "repro_mean_img_s": round(batch_size / np.mean(our_steps), 2),
            # per CPU-second of this process (None where not comparable: CUDA, or workers)
            "reference_img_per_cpu_s": round(batch_size / np.median(ref_cpu), 2) if cpu_comparable else None,
            "repro_img_per_cpu_s": round(batch_size / np.median(our_cpu), 2) if cpu_comparable else None,
            "speedup_cpu_time": round(float(np.median(ref_cpu) / np.median(our_cpu)), 3)
            if cpu_comparable else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--width", type=int, default=64, help="PreAct-ResNet-18 base width (64 = paper)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the two paths this often")
    p.add_argument("--compile", action="store_true", help="torch.compile the repro model")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"),
                   help="the repro trainer's precision (the reference is always fp32)")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="the repro trainer's memory layout (the reference is always NCHW)")
    p.add_argument("--ref-workers", type=int, default=0, help="DataLoader workers of the reference")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is steadier on a shared machine)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cl = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    r = run(args.device, args.batch_size, args.steps, args.warmup, args.width, args.compile,
            args.ref_workers, args.rounds, amp=args.amp, channels_last=cl)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"PGD-10 adversarial training step, {r['model']}, batch {r['batch_size']}, "
              f"{r['device']} (torch {r['torch']}, {r['threads']} threads), {r['timed_steps']} timed steps each")
        print(f"  reference loop : {r['reference_img_s']:10.1f} images/s (median step; "
              f"mean {r['reference_mean_img_s']:.1f})")
        prec = r["repro_precision"]
        print(f"  repro trainer  : {r['repro_img_s']:10.1f} images/s (median step; "
              f"mean {r['repro_mean_img_s']:.1f}; {prec['amp']}, "
              f"{'channels_last' if prec['channels_last'] else 'NCHW'}"
              f"{', compiled' if prec['compile'] else ''}; warm-up "
              f"{', '.join(f'{w:.1f}' for w in r['repro_warmup_s'])} s)")
        print(f"  speed-up       : {r['speedup']:10.2f}x"
              + (f" (per round: {', '.join(f'{s:.2f}' for s in r['speedup_per_round'])})"
                 if len(r["speedup_per_round"]) > 1 else ""))
        if r["speedup_cpu_time"] is not None:
            print(f"  in CPU time    : {r['speedup_cpu_time']:10.2f}x (reference "
                  f"{r['reference_img_per_cpu_s']:.1f}, repro {r['repro_img_per_cpu_s']:.1f} "
                  f"images per CPU-second; steadier than wall time on a loaded machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
