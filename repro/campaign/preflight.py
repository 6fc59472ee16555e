"""The preflight of a GPU window: CUDA and bf16 work, torch.compile works or falls back,
every (architecture, batch) timed on the device, host syncs counted in the hot paths."""
from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
import time
from typing import Any

from repro import results
from repro.campaign.estimate import Arch, CLASSES, SHAPES, build_model, forward_flops, piece_jobs, piece_seconds
from repro.campaign.pieces import Piece

# ----------------------------------------------------------------------------- preflight

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_arch(arch: Arch, batch: int, device, steps: int = 3, amp: str | None = None) -> dict:
    """Seconds per forward-equivalent image of ``arch``: a PGD attack step (2 passes) and a
    training step (3 passes), after one warm-up; channels_last on CUDA. ``amp``: "bf16" or
    "fp32" autocast for both; None: bf16 on CUDA, fp32 elsewhere."""
    import torch
    from repro import attacks
    cuda = device.type == "cuda"
    bf16 = cuda if amp is None else amp == "bf16"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(arch).to(device, memory_format=fmt)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *SHAPES[arch.dataset], device=device, generator=g)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES[arch.dataset], (batch,), device=device, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def attack(n):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=n, generator=g)

    def train(n):
        model.train()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    out = {}
    for name, fn, passes in (("attack", attack, 2), ("train", train, 3)):
        fn(1)
        _sync(device)
        t = time.perf_counter()
        fn(steps)
        _sync(device)
        out[name] = (time.perf_counter() - t) / (steps * batch * passes)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"arch": arch.label(), "batch": batch, "s_per_pass_attack": out["attack"],
            "s_per_pass_train": out["train"],
            "s_per_pass": (2 * out["attack"] + 3 * out["train"]) / 5,
            "achieved_tflops": forward_flops(arch) / ((2 * out["attack"] + 3 * out["train"]) / 5)
            / 1e12}


def _matmul_check(device, n: int) -> dict:
    import torch
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    ref = (a.double() @ b.double())
    got = (a.bfloat16() @ b.bfloat16()).double()
    rel = float((got - ref).norm() / ref.norm())
    ab, bb = a.bfloat16(), b.bfloat16()
    ab @ bb
    _sync(device)
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        ab @ bb
    _sync(device)
    dt = (time.perf_counter() - t) / reps
    return {"n": n, "rel_error_vs_float64": rel, "ok": rel < 2e-2,
            "tflops": 2 * n ** 3 / dt / 1e12}


_COMPILE_SNIPPET = """
import json, sys, time, torch
t = time.perf_counter()
device, backend = sys.argv[1], sys.argv[2]
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).to(device)
x = torch.rand(4, 3, 8, 8, device=device)
with torch.no_grad():
    err = float((torch.compile(model, backend=backend)(x) - model(x)).abs().max())
print(json.dumps({"max_abs_diff": err, "seconds": time.perf_counter() - t}))
"""


def _start_compile_check(device, backend: str) -> tuple:
    """Start the ``torch.compile`` check in a child process (it compiles on the CPU cores
    while the preflight times the GPU); ``_finish_compile_check`` collects it."""
    proc = subprocess.Popen([sys.executable, "-c", _COMPILE_SNIPPET, str(device), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, backend, time.perf_counter()


def _finish_compile_check(started: tuple, timeout: float = 120.0) -> dict:
    """Does ``torch.compile`` work here? It compiles beside the pieces and must not eat the
    window: past ``timeout`` seconds since its start the child is killed, and on any failure
    the campaign trains eager (it does anyway: no chapter sets ``TrainConfig.compile``)."""
    proc, backend, t = started
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t)))
        if proc.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip()
                               else f"exit {proc.returncode}")
        got = json.loads(out.strip().splitlines()[-1])
        return {"backend": backend, "ok": got["max_abs_diff"] < 1e-3, **got}
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to eager
        proc.kill()
        proc.communicate()
        return {"backend": backend, "ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                "seconds": time.perf_counter() - t, "fallback": "eager"}


def _call(fn, **kwargs):
    """Call a benchmark's ``run`` with the keyword arguments it (still) accepts; errors are
    recorded, never raised (another module owns the benchmark's signature)."""
    import inspect
    try:
        params = inspect.signature(fn).parameters
        return fn(**{k: v for k, v in kwargs.items() if k in params})
    except Exception as e:  # noqa: BLE001 - a benchmark failure must not stop the campaign
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def hot_paths(device) -> dict:
    """The calls ``sync_check`` watches: a PGD attack with restarts, an FGSM-RS step, and an
    epoch of augmented training batches from data resident on ``device``."""
    import torch
    from repro import attacks, data, models
    model = models.build("preact_resnet18", 10, mean_std=data.MEAN_STD["cifar10"],
                         width=8).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(64, 3, 32, 32, device=device, generator=g)
    y = torch.randint(0, 10, (64,), device=device, generator=g)
    xs = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    ys = torch.randint(0, 10, (256,), device=device, generator=g)
    return {
        "pgd": lambda: attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5,
                                   restarts=2, generator=g),
        "fgsm_rs": lambda: attacks.fgsm(model, x, y, eps=8 / 255, alpha=10 / 255,
                                        random_start=True, generator=g),
        "train_batches": lambda: list(data.train_batches(xs, ys, 64, seed=0, epoch=0)),
    }


def sync_check(device) -> dict:
    """Host synchronisations inside the hot paths (``hot_paths``), counted by CUDA's sync
    debug mode (not checked on a CPU). Each should be 0: a sync stalls the launch queue."""
    import warnings
    import torch
    if device.type != "cuda":
        return {"checked": False, "why": "sync debug mode needs CUDA"}
    out = {"checked": True}
    for name, fn in hot_paths(device).items():
        fn()   # warm-up: first calls may allocate or pick kernels
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        msgs = [str(w.message).splitlines()[0] for w in caught
                if "synchroniz" in str(w.message).lower()]
        out[name] = {"syncs": len(msgs), "first": msgs[:2]}
    return out


def _safe(fn, *args, **kwargs):
    """A preflight step that fails is recorded, never raised: the window must go on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def preflight(pieces: list[Piece], device, dry_run: bool, log=print,
              budget_s: float | None = None) -> dict:
    """CUDA + bf16 work, torch.compile works or falls back, every (architecture, batch) the
    pending pieces use timed on this device, and the two benchmarks."""
    import torch
    from repro.benchmarks import pgd as bench_pgd
    from repro.benchmarks import train as bench_train
    rec: dict[str, Any] = {"kind": "repro-preflight", "device": results.device_name(device), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "dry_run": dry_run,
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    if device.type == "cuda":
        rec["capability"] = list(torch.cuda.get_device_capability(device))
        rec["bf16_supported"] = torch.cuda.is_bf16_supported()
    rec["matmul_bf16"] = _safe(_matmul_check, device, 256 if dry_run else 8192)
    log(f"[preflight] bf16 matmul: {rec['matmul_bf16']}")
    compiling = _start_compile_check(device, "eager" if dry_run else "inductor")
    rec["sync_check"] = _safe(sync_check, device)
    log(f"[preflight] host syncs in hot paths: {rec['sync_check']}")
    seen, timings, counted = set(), [], 0.0
    for p in pieces:   # only pieces that could start: counted estimates up to 2x the budget
        counted += piece_seconds(p, dry_run)
        if budget_s is not None and counted > 2 * budget_s and timings:
            break
        for j in piece_jobs(p, dry_run):
            key = (j.arch, j.batch)
            if j.what.endswith("eval") or key in seen:
                continue
            seen.add(key)
            t = _safe(time_arch, j.arch, j.batch, device, steps=1 if dry_run else 3)
            log(f"[preflight] {t}")
            if "error" not in t:   # an architecture that failed keeps its counted estimate
                timings.append(t)
    rec["timings"] = timings
    rec["rates"] = {}
    for t in timings:   # the slowest batch size measured per architecture
        rec["rates"][t["arch"]] = max(rec["rates"].get(t["arch"], 0.0), t["s_per_pass"])
    rec["bench_pgd"] = _call(bench_pgd.run, device=str(device),
                             batch_size=32 if dry_run else 512, iters=1 if dry_run else 10,
                             warmup=1, width=8 if dry_run else 64)
    log(f"[preflight] bench pgd: {rec['bench_pgd']}")
    rec["bench_train"] = _call(bench_train.run, device=str(device),
                               batch_size=16 if dry_run else 128, steps=1 if dry_run else 10,
                               warmup=1 if dry_run else 3, width=8 if dry_run else 64)
    log(f"[preflight] bench train: {rec['bench_train']}")
    rec["compile"] = compiling   # collected by the caller: the compiler may still be busy
    rec["seconds"] = time.perf_counter() - t0
    return rec
