"""One trainer for every method: ``train(model, objective, dataset, cfg, run_dir)``.

What it guarantees:
- Exact resume. Batches, augmentation and attack random starts are pure functions of
  (seed, epoch, step) (see ``repro.data`` and ``step_generator``); the checkpoint holds model,
  optimiser, objective state, RNG states, running metric sums and the global step; the
  learning rate is a pure function of the step. A run killed at any point (even ``kill -9``)
  and restarted ends with the same metrics and, on CPU, bitwise the same weights.
- Atomic checkpoints (temp file + ``os.replace``) every ``checkpoint_every`` steps and at
  every epoch end; a finished run folder returns its result without training again.
- Clear failures: a non-finite loss raises ``NonFiniteLossError`` naming the step before any
  weight is touched (the last good checkpoint stays); an unreadable or mismatched checkpoint
  raises ``CheckpointError``.
- Checkpoint selection on the *validation* split's PGD accuracy, never the test set.
- Speed: the dataset moves to the accelerator once (indexing and augmentation happen there),
  bf16 autocast where the hardware computes bf16 natively, channels_last on CUDA, optional
  ``torch.compile``. ``resolve_precision`` says what ``"auto"`` picks and why; the
  resolved choice is recorded in ``result.json`` (``TrainResult.precision``) and in every
  checkpoint, and a run never resumes under a different resolved precision.
- Validation (the PGD accuracy that selects ``best.pt``) always runs in fp32, also when
  training uses bf16: the attack that picks checkpoints must not be weakened by rounding.

Files in ``run_dir``: ``checkpoint.pt`` (while running), ``metrics.jsonl`` (one record per
epoch), ``best.pt`` / ``final.pt`` (model weights), ``result.json`` (written last).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from repro import data as data_lib
from repro import distributed
from repro.objectives import Batch, StepState

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, or written for another model or config."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the update."""

    def __init__(self, message: str, step: int, epoch: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.epoch, self.checkpoint = step, epoch, checkpoint


@dataclass
class TrainConfig:
    epochs: int = 10
    steps: int | None = None             # total optimisation steps; overrides ``epochs``
    batch_size: int = 128
    optimizer: str = "sgd"               # "sgd" | "adam"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple = (0.9, 0.999)          # adam
    schedule: str = "multistep"          # "multistep" | "cosine" | "onecycle" | "constant"
    milestones: tuple = (0.5, 0.75)      # all < 1: fractions of training; else epochs
    gamma: float = 0.1
    onecycle_peak: float = 0.4           # Wong et al.: lr rises 0 -> lr over 2/5, then -> 0
    grad_clip: float | None = None
    seed: int = 0
    augment: bool = True                 # random crop (pad 4) + flip; off for MNIST
    checkpoint_every: int = 0            # steps; 0: only at epoch ends
    amp: str = "auto"                    # "auto" | "bf16" | "fp32": see resolve_precision
    channels_last: Any = "auto"          # "auto" | True | False: see resolve_precision
    compile: bool = False
    val_every: int = 1                   # epochs; 0: no validation
    val_size: int = 500                  # first n validation images
    val_batch_size: int = 250
    val_eps: float = 8 / 255
    val_alpha: float = 2 / 255
    val_steps: int = 10
    val_norm: str = "linf"
    select_metric: str = "val_robust"    # the record key that picks best.pt (higher is better)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# Fields that do not change the result: a run may resume with other values of these.
_RESUME_FREE = {"checkpoint_every", "compile", "val_batch_size"}


@dataclass
class TrainResult:
    run_dir: Path
    history: list                        # the records of metrics.jsonl
    final_path: Path
    best_path: Path | None
    best_metric: float | None            # cfg.select_metric of best.pt (validation split)
    best_step: int | None
    total_steps: int
    seconds: float                       # training wall time, summed over resumed pieces
    resumed_from: int | None = None      # the step this call resumed at, if it did
    cached: bool = False                 # True when run_dir was already finished
    # what ran: {"device", "amp", "channels_last", "compile", "why"} (resolve_precision);
    # None in result.json files written before it was recorded (see resolve_precision)
    precision: dict | None = None

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("run_dir", "final_path", "best_path"):
            d[k] = None if d[k] is None else str(d[k])
        return d


# ----------------------------------------------------------------------------- pieces

def resolve_device(device=None) -> torch.device:
    """``None`` or ``"auto"``: CUDA if available, else Apple's MPS, else the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """Randomness for the objective at one step (attack random starts): a pure function of
    (seed, step), on the training device."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 2_654_435_761 + step * 40_503 + 17) % (2 ** 63))
    return g


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int, epoch: int,
                  start_step: int = 0, augment: bool = True):
    """``repro.data.train_batches`` plus each batch's positions in the training set.

    Same order and same augmentation draws (both are functions of (seed, epoch, step)).
    """
    order = data_lib.epoch_order(len(y), seed, epoch).to(x.device)
    for step in range(start_step, data_lib.steps_per_epoch(len(y), batch_size)):
        index = order[step * batch_size:(step + 1) * batch_size]
        xb = x[index]
        if augment:
            xb = data_lib.augment(xb, generator=data_lib.batch_generator(seed, epoch, step))
        yield step, Batch(data_lib.to_float(xb), y[index], index)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose 'sgd' or 'adam'")


def lr_at(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based): a pure function of the
    step, so resuming needs no scheduler state."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        ms = list(cfg.milestones)
        bounds = ([m * total_steps for m in ms] if all(m < 1 for m in ms)
                  else [m * steps_per_epoch for m in ms])
        return cfg.lr * cfg.gamma ** sum(step >= round(b) for b in bounds)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
    if cfg.schedule == "onecycle":
        # Wong et al. interpolate at the end of each step, so the first step's lr is not 0
        t = (step + 1) / total_steps
        return float(np.interp(t, [0, cfg.onecycle_peak, 1], [0, cfg.lr, 0]))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose multistep, cosine, onecycle "
                     f"or constant")


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively *and* this torch build's oneDNN uses it.

    x86: AVX512_BF16 or AMX_BF16 (``torch.cpu.get_capabilities()``); arm64: the BF16
    extension. Both also need ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (oneDNN built
    with bf16 kernels for this CPU). Without native support, bf16 convolutions are emulated and
    far slower than fp32 (measured on an AVX2-only EPYC, torch 2.13: a PreAct-ResNet-18
    width-16 forward + backward took 13-20x longer under bf16 autocast than in fp32).
    """
    try:
        caps = torch.cpu.get_capabilities()
        has_bf16_kernels = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch without these queries: assume not
        return False
    native = any(caps.get(k, False) for k in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))
    return bool(native and has_bf16_kernels)


def resolve_precision(cfg: TrainConfig, device) -> dict:
    """What ``cfg.amp`` / ``cfg.channels_last`` / ``cfg.compile`` mean on ``device``.

    ``amp="auto"`` picks bf16 autocast on CUDA with native bf16 (compute capability >= 8) and
    on a CPU with native bf16 (``cpu_native_bf16``), fp32 elsewhere (older GPUs, CPUs without
    bf16 instructions, Apple's MPS, whose bf16 support depends on the macOS version and was
    not measured). The environment variable ``REPRO_AMP`` (``fp32`` or ``bf16``) overrides
    what "auto" picks, e.g. ``REPRO_AMP=fp32`` to rerun a chapter exactly as its published
    fp32 runs on a CPU that would pick bf16. ``REPRO_COMPILE=1`` (or ``0``) turns
    ``torch.compile`` of the training steps on (off) whatever ``cfg.compile`` says: like the
    precision it is not part of a run's cache key (fp32 math, fused), and the record says
    whether it ran.

    ``channels_last="auto"`` is on for CUDA only. On the CPU it is off: measured on a 2-core
    AVX2 EPYC (torch 2.13, fp32, loaded machine) it gained 5-15% on a PGD-10 training step of
    PreAct-ResNet-18 width 16 (``bench train``) and nothing on the small MNIST CNN, and
    oneDNN's channels_last
    1x1 strided convolution computes its weight gradient out of bounds when the convolution has
    fewer input channels than its vector block (8 on AVX2, 16 on AVX-512): here a crash (heap
    corruption) at 2, 4 and 6 input channels, i.e. PreAct-ResNet widths the smoke presets use;
    the oneDNN report (issue #6035) also shows silently wrong gradients with several threads
    (``_warn_onednn_1x1``). ``channels_last=True`` still forces it.

    The cache key of a run (``repro.results``) holds ``amp`` and ``channels_last`` *as
    written* ("auto"): a key names the recipe, not the hardware, exactly as the same key
    computed on a GPU renders on a CPU. What actually ran is this function's record, stored
    in ``result.json`` (``TrainResult.precision``) and in every checkpoint. Runs whose
    ``result.json`` has no ``precision`` predate this record; their "auto" meant fp32 NCHW on
    CPU and bf16 channels_last on CUDA (the device is in the run's provenance).

    Returns ``{"device", "amp": "bf16"|"fp32", "channels_last": bool, "compile": bool, "why"}``.
    """
    device = torch.device(device)
    amp, why = cfg.amp, f"amp={cfg.amp!r} as configured"
    if amp in ("off", None, False):
        amp = "fp32"
    forced = os.environ.get("REPRO_AMP", "").strip().lower()
    if amp == "auto" and forced:
        if forced not in ("bf16", "fp32"):
            raise ValueError(f"REPRO_AMP must be 'bf16' or 'fp32', got {forced!r}")
        amp, why = forced, f"auto: REPRO_AMP={forced}"
    if amp == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            amp, why = ("bf16", "auto: CUDA with native bf16") if native else \
                ("fp32", "auto: CUDA without native bf16")
        elif device.type == "cpu":
            amp, why = ("bf16", "auto: CPU with native bf16 (cpu_native_bf16)") if cpu_native_bf16() \
                else ("fp32", "auto: CPU without native bf16 instructions")
        else:
            amp, why = "fp32", f"auto: fp32 on {device.type}"
    if amp not in ("bf16", "fp32"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {cfg.amp!r}")
    cl = cfg.channels_last
    if cl == "auto":
        cl = device.type == "cuda"
    compiled = bool(cfg.compile)
    env = os.environ.get("REPRO_COMPILE", "").strip().lower()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"REPRO_COMPILE must be 0 or 1, got {env!r}")
        compiled = env == "1"
        why += f"; REPRO_COMPILE={env}"
    return {"device": str(device), "amp": amp, "channels_last": bool(cl),
            "compile": compiled, "why": why}


def _warn_onednn_1x1(model: nn.Module) -> None:
    """Warn when a channels_last CPU run would hit oneDNN issue #6035: the weight gradient of a
    1x1 convolution with stride > 1 and fewer than 16 input channels (an AVX2 or AVX-512 vector
    block) is written out of bounds (crash, or silently wrong gradients with several threads).
    """
    bad = [name for name, m in model.named_modules()
           if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
           and m.in_channels < 16 and m.weight.requires_grad]
    if bad:
        import warnings
        warnings.warn(f"channels_last on the CPU with 1x1 strided convolutions of fewer than 16 "
                      f"input channels ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                      f"oneDNN computes their weight gradients out of bounds (oneDNN issue "
                      f"#6035; a crash or wrong gradients). Use channels_last=False or a wider "
                      f"model.", RuntimeWarning, stacklevel=3)


def autocast_context(cfg: TrainConfig, device):
    """The autocast of a training step: bf16 or none, as ``resolve_precision`` decides."""
    device = torch.device(device)
    if resolve_precision(cfg, device)["amp"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(cfg: TrainConfig, device) -> bool:
    return resolve_precision(cfg, device)["channels_last"]


@torch.no_grad()
def _clean_correct(model, x, y):
    return (model(x).argmax(1) == y).sum()


def validate_robust(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor,
                    cfg: TrainConfig, device: torch.device) -> dict:
    """Clean and PGD accuracy on the first ``cfg.val_size`` validation images. The attack
    draws from its own fixed generator, so validation never disturbs training randomness.
    Computed in fp32 even inside a caller's bf16 autocast (``attacks.float32``)."""
    from repro import attacks
    n = min(cfg.val_size, len(y_val))
    if n == 0:
        return {}
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7)
    clean = robust = 0
    channels_last = use_channels_last(cfg, device)
    for xb, yb in data_lib.eval_batches(x_val[:n], y_val[:n], cfg.val_batch_size, device=device):
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with attacks.float32(device):
            clean += _clean_correct(model, xb, yb)
            x_adv = attacks.pgd(model, xb, yb, eps=cfg.val_eps, alpha=cfg.val_alpha,
                                steps=cfg.val_steps, norm=cfg.val_norm, generator=gen)
            robust += _clean_correct(model, x_adv, yb)
    model.train(was_training)
    return {"val_clean": float(clean) / n, "val_robust": float(robust) / n}


def model_signature(model: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``: a kill at
    any moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location=None) -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling errors: all mean corrupt
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"delete it to start the run over") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a repro training checkpoint "
                              f"(format {ckpt.get('format') if isinstance(ckpt, dict) else '?'})")
    return ckpt


def _check_compatible(path: Path, ckpt: dict, model: nn.Module, cfg: TrainConfig,
                      objective_config: dict) -> None:
    saved, current = ckpt["model_signature"], model_signature(model)
    if saved != current:
        missing = sorted(set(saved) - set(current))[:3]
        extra = sorted(set(current) - set(saved))[:3]
        shapes = [f"{k}: {saved[k]} vs {current[k]}" for k in saved
                  if k in current and saved[k] != current[k]][:3]
        raise CheckpointError(
            f"checkpoint {path} is for a different model: "
            + "; ".join(s for s in (f"keys only in checkpoint {missing}" if missing else "",
                                    f"keys only in model {extra}" if extra else "",
                                    f"shape mismatch {shapes}" if shapes else "") if s)
            + ". Use a new run folder for a new model.")
    diffs = [f"{k}: {ckpt['config'].get(k)!r} -> {v!r}" for k, v in cfg.to_dict().items()
             if k not in _RESUME_FREE and ckpt["config"].get(k) != v]
    if ckpt.get("objective") != objective_config:
        diffs.append(f"objective: {ckpt.get('objective')} -> {objective_config}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written with a different configuration "
                              f"({'; '.join(diffs)}). Use a new run folder or the old settings.")


def _check_same_precision(path: Path, ckpt: dict, cfg: TrainConfig, device: torch.device,
                          precision: dict) -> None:
    """A run resumes only under the bf16/fp32 choice it started with: "auto" may resolve
    differently on another machine, and half a run in each would be neither. A checkpoint
    written before the choice was recorded ran under the old rule (bf16 only on CUDA)."""
    saved = (ckpt.get("precision") or {}).get("amp")
    if saved is None:
        saved = "bf16" if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda") else "fp32"
    if saved != precision["amp"]:
        raise CheckpointError(
            f"checkpoint {path} was trained in {saved} but amp={cfg.amp!r} means "
            f"{precision['amp']} here ({precision['why']}). Resume it on a machine where it "
            f"means {saved}, or start a new run folder.")


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *[float(v) if isinstance(v, float) else int(v) for v in np_state[2:]])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    """Restore ``_rng_state``'s record. Every generator state is a CPU ByteTensor (also the
    CUDA one: ``torch.cuda.set_rng_state`` raises "RNG state must be a torch.ByteTensor" for a
    tensor on the GPU), so a record loaded with ``map_location=<cuda>`` is moved back first."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"].cpu())


def _value(v, device) -> torch.Tensor:
    """A log value as a 0-d float64 tensor on ``device`` (float32 on MPS, which has no float64)."""
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return v.detach().to(device, dtype) if torch.is_tensor(v) else torch.tensor(float(v), dtype=dtype, device=device)


def _objective_config(objective) -> dict:
    cfg = getattr(objective, "config", None)
    return cfg() if callable(cfg) else {"name": type(objective).__name__}


# ----------------------------------------------------------------------------- train

def train(model: nn.Module, objective: Callable, dataset: data_lib.Dataset, cfg: TrainConfig,
          run_dir, *, device=None, progress: bool = True,
          validate: Callable[[nn.Module], dict] | None = None) -> TrainResult:
    """Train ``model`` with ``objective`` on ``dataset.x_train`` and return the result.

    ``validate(model) -> dict`` replaces the default validation (clean + PGD accuracy on
    ``cfg.val_size`` validation images); its ``cfg.select_metric`` entry picks ``best.pt``.
    Restarting with the same ``run_dir`` resumes; a finished ``run_dir`` returns at once
    (and loads the final weights into ``model``).

    Inside a ``torchrun`` process group the run is data-parallel (``repro.distributed``):
    each rank trains on its slice of every global batch, rank 0 writes and validates.
    """
    par = distributed.context()          # the identity hooks in a single process
    progress = progress and par.is_writer
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    ckpt_path, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    final_path, best_path, result_path = run_dir / "final.pt", run_dir / "best.pt", run_dir / "result.json"

    model.to(device)
    if result_path.exists():
        return _finished(result_path, model, device)
    for stale in run_dir.glob(".*.tmp") if par.is_writer else ():  # half-written files of a killed run
        stale.unlink(missing_ok=True)

    precision = resolve_precision(cfg, device)
    channels_last = precision["channels_last"]
    step_autocast = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
                     if precision["amp"] == "bf16" else contextlib.nullcontext)
    if channels_last:
        if device.type == "cpu":
            _warn_onednn_1x1(model)
        model.to(memory_format=torch.channels_last)
    if device.type in ("cuda", "mps"):
        dataset = dataset.to(device)           # once: batches are indexed and augmented there
    x_train, y_train = dataset.x_train, dataset.y_train
    steps_per_epoch = data_lib.steps_per_epoch(len(y_train), cfg.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(y_train)} training images")
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    par.check(cfg.batch_size)
    model = par.prepare(model, device)
    optimizer = make_optimizer(model, cfg)
    objective_config = _objective_config(objective)

    # Everything below is what a checkpoint must restore.
    torch.manual_seed(cfg.seed)
    global_step, history, best = 0, [], {"metric": None, "step": None}
    sums: dict[str, torch.Tensor] = {}
    counted, epoch_seconds, total_seconds = 0, 0.0, 0.0
    resumed_from = None
    if ckpt_path.exists():
        # onto the CPU, whatever the device: the RNG states must stay CPU ByteTensors
        # (torch.set_rng_state / torch.cuda.set_rng_state refuse any other tensor, and the
        # numpy state goes through .numpy()); the model, optimiser, objective state and sums
        # are copied onto ``device`` as they are loaded below
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        _check_compatible(ckpt_path, ckpt, model, cfg, objective_config)
        _check_same_precision(ckpt_path, ckpt, cfg, device, precision)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if hasattr(objective, "load_state_dict"):
                objective.load_state_dict(ckpt["objective_state"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model/objective: "
                                  f"{str(e).splitlines()[0]}") from None
        global_step, history, best = ckpt["step"], ckpt["history"], ckpt["best"]
        sums = {k: v.to(device) for k, v in ckpt["sums"].items()}
        counted, epoch_seconds, total_seconds = ckpt["counted"], ckpt["epoch_seconds"], ckpt["seconds"]
        _set_rng_state(ckpt["rng"], device)
        resumed_from = global_step
    par.barrier()  # every rank has read the checkpoint before rank 0 writes anything
    # metrics.jsonl always mirrors the checkpoint's history (a killed run may have written more)
    if par.is_writer:
        _atomic_write_text("".join(json.dumps(r) + "\n" for r in history), metrics_path)

    # torch.compile wraps the training steps only: validation and the final evaluation run
    # the uncompiled module (an attack's many batch sizes would each recompile); a chapter's
    # evaluation may compile its own (common.evaluation_model)
    net = par.wrap(torch.compile(model) if precision["compile"] else model, device)

    def save_checkpoint():
        saved_sums = par.mean_dict(sums)  # over the ranks: every rank resumes with the same sums
        if not par.is_writer:
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "step": global_step, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "objective_state": (objective.state_dict() if hasattr(objective, "state_dict") else {}),
                     "rng": _rng_state(device), "history": history, "best": best,
                     "sums": {k: v.cpu() for k, v in saved_sums.items()}, "counted": counted,
                     "epoch_seconds": epoch_seconds + (time.perf_counter() - t_piece),
                     "seconds": total_seconds + (time.perf_counter() - t_piece),
                     "config": cfg.to_dict(), "objective": objective_config,
                     "precision": precision,
                     "model_signature": model_signature(model)}, ckpt_path)

    bar = _progress_bar(total_steps, global_step, run_dir.name, progress)
    t_piece, last_refresh = time.perf_counter(), 0.0
    model.train()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    try:
        while global_step < total_steps:
            epoch, start = divmod(global_step, steps_per_epoch)
            for step_in_epoch, batch in epoch_batches(x_train, y_train, cfg.batch_size, seed=cfg.seed,
                                                      epoch=epoch, start_step=start, augment=cfg.augment):
                batch = par.shard(batch)
                if channels_last:
                    batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                state = StepState(epoch, global_step, total_steps, steps_per_epoch,
                                  step_generator(cfg.seed, global_step, device))
                lr = lr_at(cfg, global_step, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with step_autocast(), par.randomness(state.generator, len(batch.y)):
                    loss, logs = objective(net, batch, state)
                if not torch.isfinite(par.mean(loss.detach())).item():
                    last = f"{ckpt_path} (step {global_step_saved(ckpt_path)})" if ckpt_path.exists() else "none yet"
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {global_step} (0-based, epoch {epoch}); "
                        f"training stopped before the update. Last good checkpoint: {last}",
                        global_step, epoch, ckpt_path if ckpt_path.exists() else None)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0) + _value(v, device)
                counted += 1
                global_step += 1
                bar.update(1)
                now = time.perf_counter()
                if progress and now - last_refresh > 1.0:  # a host sync, so not every step
                    bar.set_postfix({k: f"{(v / counted).item():.3f}" for k, v in sums.items()}, refresh=False)
                    last_refresh = now

                epoch_done = step_in_epoch + 1 == steps_per_epoch or global_step == total_steps
                if epoch_done:
                    record = {"epoch": epoch + 1, "step": global_step, "lr": lr}
                    record.update({k: (v / counted).item() for k, v in par.mean_dict(sums).items()})
                    last_epoch = global_step == total_steps
                    if par.is_writer and cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
                        # fp32: no autocast here (validate_robust also guards itself)
                        record.update(validate(model) if validate is not None else
                                      validate_robust(model, dataset.x_val, dataset.y_val, cfg, device))
                        metric = record.get(cfg.select_metric)
                        if metric is not None and (best["metric"] is None or metric > best["metric"]):
                            best = {"metric": metric, "step": global_step}
                            atomic_save(model.state_dict(), best_path)
                    record["seconds"] = round(epoch_seconds + time.perf_counter() - t_piece, 3)
                    history.append(record)
                    total_seconds += time.perf_counter() - t_piece
                    # reset the running sums *before* the epoch-end checkpoint: a run resumed
                    # from it must not average the finished epoch into the next one's log
                    t_piece, epoch_seconds, sums, counted = time.perf_counter(), 0.0, {}, 0
                    save_checkpoint()
                    if par.is_writer:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    if progress:
                        bar.write(_format_record(record))
                elif cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0:
                    save_checkpoint()
                if global_step == total_steps:
                    break
    finally:
        bar.close()
        # back as it was: the evaluation after training feeds many batch shapes (DeepFool's
        # shrinking active set, AutoAttack's subsets), and cuDNN would re-tune for each
        torch.backends.cudnn.benchmark = cudnn_benchmark

    if not par.is_writer:  # rank 0 writes the result; every rank returns it, final weights loaded
        par.barrier()
        return _finished(result_path, model, device)
    atomic_save(model.state_dict(), final_path)
    result = TrainResult(run_dir, history, final_path, best_path if best["metric"] is not None else None,
                         best["metric"], best["step"], total_steps, round(total_seconds, 3),
                         resumed_from, precision=precision)
    _atomic_write_text(json.dumps(result.to_json(), indent=1), result_path)
    ckpt_path.unlink(missing_ok=True)  # the run is complete: final.pt and best.pt remain
    par.barrier()
    return result


def global_step_saved(path: Path) -> int | str:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return "?"


def _finished(result_path: Path, model: nn.Module, device) -> TrainResult:
    d = json.loads(result_path.read_text())
    result = TrainResult(Path(d["run_dir"]), d["history"], Path(d["final_path"]),
                         Path(d["best_path"]) if d["best_path"] else None, d["best_metric"],
                         d["best_step"], d["total_steps"], d["seconds"], d["resumed_from"], cached=True,
                         precision=d.get("precision"))
    final_path = result_path.parent / "final.pt"
    try:
        state = torch.load(final_path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"finished run {result_path.parent}: final weights {final_path} do not "
                              f"load into this model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return result


def _format_record(r: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm  # plain text: tqdm.auto warns in notebooks without ipywidgets
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def load_weights(model: nn.Module, path, device=None) -> nn.Module:
    """Load ``best.pt`` / ``final.pt`` into ``model`` with a clear error if it does not fit."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=device or "cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"weights {path} do not load into {type(model).__name__}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return model
