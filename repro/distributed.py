"""Data-parallel training past one GPU: the plumbing ``repro.train`` calls, so that

    torchrun --nproc_per_node=N -m repro experiment CHAPTER --preset paper

trains every run of the chapter with ``torch.nn.parallel.DistributedDataParallel`` and gives
the result of a single-process run (to float tolerance; see "What is exact" below).

How a step is split. The trainer's global batch of step s is a pure function of (seed, epoch,
step) (``repro.train.epoch_batches``), so every rank builds the same global batch and keeps
its contiguous slice ``[r * B/N, (r + 1) * B/N)``; the global batch size B must be divisible
by N. Each rank runs the objective (attacks included) on its slice; DDP averages the
gradients, which equals the gradient of the global batch's mean loss. The attack's random
start comes from the step generator (a pure function of (seed, step)): while the objective
runs, every random draw from that generator whose first dimension is the local batch is
drawn at the global batch's size and sliced (``SliceRandomness``), so rank r gets exactly the
numbers a single process would have used for those examples. The per-step logs (means over
the local batch) are averaged over the ranks at each epoch end.

Who writes. Rank 0 alone writes checkpoints, ``metrics.jsonl``, ``best.pt``/``final.pt``,
``result.json`` and the results folders (``repro.results``, ``repro.memorization``); it alone
runs the trainer's validation (the others skip it and wait at the next gradient all-reduce).
Every rank resumes from the same ``checkpoint.pt`` (the checkpoint holds the unwrapped model,
so a run can resume with another N, or with one process). After training every rank loads the
final weights that rank 0 wrote; the chapter's evaluation after training then runs on every
rank, identically (same weights, same generators), and only rank 0 writes it: evaluation is
not split, it is replicated. Run folders must be on a file system all ranks see (one node, or
a shared file system).

BatchNorm. With per-rank batch statistics a BN model trained on N ranks differs from the
single-process one (each rank normalises with its slice's statistics). ``sync_batchnorm``
(default on, ``REPRO_SYNC_BN=0`` turns it off) converts BN layers to ``SyncBatchNorm`` on
CUDA, which computes the statistics of the global batch. PyTorch's SyncBatchNorm has no CPU
kernel, so on CPU (gloo) BN layers stay per-rank: equality with N = 1 holds there only for
BN-free models.

What is exact: objectives whose loss is a mean of per-example terms (standard, PGD-AT,
TRADES, ALP, FGSM-RS, HE's margin losses, LMT) get the single-process step up to float
rounding (the gradients are summed in another order). Over many steps that rounding is
amplified where the method is discontinuous or normalising: PGD's sign steps and Adam's
g / sqrt(v) (measured, 1 vs 2 gloo processes, small CNN on MNIST, PGD-5 training: max weight
difference 3e-8 after 3 and 10 SGD steps, 2e-3 after 30; with Adam 2e-6 after 3 steps,
3e-3 after 10), so long runs agree as two runs on different hardware do, not bit for bit.
Losses that couple the examples of a batch
(BAT's normalised weights sum_i w_i L_i / sum_i w_i, its contrastive discrimination loss,
AdvProp's concatenated batches through plain BN) are computed per slice, which is what
per-GPU data parallelism does in practice but not the single-process number.

Source: PyTorch's DDP and torchrun documentation (environment variables RANK, WORLD_SIZE,
LOCAL_RANK set by torchrun; ``init_process_group`` with ``env://``).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import replace

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def is_writer() -> bool:
    """True on the process that writes files: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def agree(value):
    """Rank 0's ``value`` on every rank (a decision every rank must take alike, e.g.
    "this run is already finished"); ``value`` itself in a single process."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``
    > 1); pin this process to GPU ``LOCAL_RANK`` when CUDA is available (so ``"cuda"`` means
    this rank's GPU). NCCL on CUDA, gloo on CPU. Returns True when running distributed."""
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()


def sync_batchnorm_enabled() -> bool:
    return os.environ.get("REPRO_SYNC_BN", "1") not in ("0", "false", "False", "")


# ----------------------------------------------------------------------------- randomness

_FACTORIES = {torch.rand: 0, torch.randn: 0}  # function -> position of the size argument


class SliceRandomness(TorchFunctionMode):
    """While active, a random draw from ``generator`` whose first dimension is ``local_n``
    is made at ``global_n`` and the rows ``[offset, offset + local_n)`` are returned: the
    numbers a single process drawing for the whole global batch would have given to this
    rank's examples. Handles ``torch.rand``/``randn``/``randint`` and in-place
    ``Tensor.uniform_``/``normal_``/``random_``/``bernoulli_``/``exponential_``; other draws
    pass through unchanged (they are the same on every rank)."""

    _INPLACE = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_,
                torch.Tensor.bernoulli_, torch.Tensor.exponential_}

    def __init__(self, generator: torch.Generator, local_n: int, global_n: int, offset: int):
        super().__init__()
        self.generator, self.local_n, self.global_n, self.offset = generator, local_n, global_n, offset

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.offset:self.offset + self.local_n]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("generator") is not self.generator:
            return func(*args, **kwargs)
        if func in _FACTORIES or func is torch.randint:
            args = list(args)
            if "size" in kwargs:
                size, put = tuple(kwargs["size"]), lambda s: kwargs.__setitem__("size", s)
            elif func is torch.randint:
                i = len(args) - 1
                size, put = tuple(args[i]), lambda s: args.__setitem__(i, s)
            elif len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
                size, put = tuple(args[0]), lambda s: args.__setitem__(0, s)
            else:
                size = tuple(args)
                def put(s):
                    args[:] = [s]
            if len(size) and size[0] == self.local_n:
                put((self.global_n, *size[1:]))
                return self._rows(func(*args, **kwargs))
            return func(*args, **kwargs)
        if func in self._INPLACE and args and args[0].dim() and args[0].shape[0] == self.local_n:
            target = args[0]
            full = target.new_empty((self.global_n, *target.shape[1:]))
            func(full, *args[1:], **kwargs)
            with torch.no_grad():
                target.copy_(self._rows(full))
            return target
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- wrapped model

class _DDP(nn.parallel.DistributedDataParallel):
    """DDP whose attributes fall back to the wrapped model's, so objectives that read them
    (HE's ``model.head`` check) see the model they would see in one process."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


_RULES_REGISTERED = False


def _register_lipschitz_rules() -> None:
    """LMT's training-time bound walks the model it is given (``repro.lipschitz.plan``):
    plan a DDP wrapper as the model it wraps (same layer names, so the power-iteration
    vectors checkpoint under the same keys for any N), and SyncBatchNorm as the BatchNorm it
    replaced (the same inference-time map)."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    from repro import lipschitz
    lipschitz.register_bound(nn.parallel.DistributedDataParallel)(
        lambda m, shape, name: lipschitz.plan(m.module, shape, name))
    lipschitz.register_bound(nn.SyncBatchNorm)(lipschitz._bn_rule)
    _RULES_REGISTERED = True


# ----------------------------------------------------------------------------- trainer hooks

class Single:
    """The single-process case: every hook is the identity, so ``repro.train`` runs exactly
    the code path it ran before data parallelism existed."""

    world_size, rank, is_writer = 1, 0, True

    def check(self, batch_size: int) -> None:
        pass

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model

    def shard(self, batch):
        return batch

    def randomness(self, generator, n_local: int):
        return contextlib.nullcontext()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def mean_dict(self, d: dict) -> dict:
        return d

    def barrier(self) -> None:
        pass


class DataParallel(Single):
    """``world_size`` ranks of one process group (see the module docstring)."""

    def __init__(self):
        self.world_size, self.rank = world_size(), rank()
        self.is_writer = self.rank == 0
        _register_lipschitz_rules()

    def check(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {self.world_size} "
                             f"processes: each rank takes an equal slice of the global batch")

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """SyncBatchNorm on CUDA (before the optimiser sees the parameters; the converted
        layers keep the same parameters, buffers and state_dict keys)."""
        if device.type == "cuda" and sync_batchnorm_enabled():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP around ``model``: its parameters are broadcast from rank 0, so every rank
        starts (or resumes) from the same weights. Buffers are not re-broadcast at every
        forward (the attacks call the model many times per step): with SyncBatchNorm the
        running statistics agree on every rank anyway."""
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        ddp = _DDP
        # torch >= 2.13 renames broadcast_buffers=False (no per-forward broadcast)
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(
                       nn.parallel.DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
        return ddp(model, device_ids=ids, **no_sync)

    def _slice(self, n_global: int) -> slice:
        n = n_global // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def shard(self, batch):
        s = self._slice(len(batch.y))
        self._global_n = len(batch.y)
        return replace(batch, x=batch.x[s], y=batch.y[s], index=batch.index[s])

    def randomness(self, generator, n_local: int):
        if generator is None:
            return contextlib.nullcontext()
        return SliceRandomness(generator, n_local, self._global_n, self.rank * n_local)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        torch.distributed.all_reduce(t)
        return t / self.world_size

    def mean_dict(self, d: dict) -> dict:
        """Means over the ranks of equal-sized slices' means (one all-reduce)."""
        if not d:
            return d
        keys = sorted(d)
        flat = self.mean(torch.stack([torch.as_tensor(d[k], dtype=torch.float64) for k in keys]))
        return {k: flat[i] for i, k in enumerate(keys)}

    def barrier(self) -> None:
        torch.distributed.barrier()


def context() -> Single:
    """The trainer's hooks for this process: ``DataParallel`` inside a process group of more
    than one rank, else ``Single``."""
    return DataParallel() if world_size() > 1 else Single()
