"""Many small models trained at once as one batched ensemble (``torch.func``): what makes
hundreds of memorization subset models affordable (issue 16: K >= 100 CIFAR-100 models in one
8-minute H200 piece).

``train_ensemble`` trains M copies of one architecture, model m on its own subset of the
training set with its own seed, exactly as ``repro.train.train`` would train each alone with
the ``standard`` objective (cross-entropy on clean images): the same batch order
(``data.epoch_order(n_m, seed_m, epoch)``), the same crops and flips
(``data.batch_generator(seed_m, epoch, step)``), the same learning rate per step
(``train.lr_at``), the same optimiser (SGD or Adam act elementwise, so one optimiser over the
stacked parameters applies each model's own update), bf16 autocast on CUDA as the trainer.
The parameters and buffers of the M models are stacked (``torch.func.stack_module_state``)
and one ``vmap`` of ``functional_call`` runs all M forward passes, each on its own batch; the
summed loss's gradient is each model's own gradient. Equal to one-by-one training to float
tolerance (the batched convolutions sum in another order), not bitwise.

Limits: the ``standard`` objective only (no attacks inside vmap); no validation or best-
checkpoint selection (the subset models use neither); a checkpoint at every epoch end
(``folder``) so a killed ensemble resumes at its last finished epoch.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from repro import data as data_lib
from repro import losses, train as train_lib


class Ensemble:
    """M models of one architecture as stacked parameters and buffers.

    ``models``: M modules with identical structure (their own initialisations).
    ``logits(x)``: x (M, B, C, H, W) -> (M, B, classes), model m on batch m;
    ``predict(x)``: x (B, C, H, W) shared by all models -> (M, B) argmax labels.
    ``unstack()``: the M trained models as ordinary modules.
    """

    def __init__(self, models: Sequence[nn.Module]):
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.m = len(models)
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self._template = models[0]

    def to(self, device) -> "Ensemble":
        self.params = {k: v.detach().to(device).requires_grad_(True) for k, v in self.params.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def _call(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.base.train()
        return vmap(self._call, in_dims=(0, 0, 0))(self.params, self.buffers, x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.base.eval()
        out = vmap(self._call, in_dims=(0, 0, None))(self.params, self.buffers, x)
        return out.argmax(-1)

    def unstack(self) -> list[nn.Module]:
        out = []
        for i in range(self.m):
            model = copy.deepcopy(self._template).cpu()
            model.load_state_dict({**{k: v[i].detach().cpu() for k, v in self.params.items()},
                                   **{k: v[i].cpu() for k, v in self.buffers.items()}})
            out.append(model)
        return out


class _Stacked(nn.Module):
    """The stacked tensors as one module's parameters, for ``train.make_optimizer``."""

    def __init__(self, params: dict):
        super().__init__()
        self.plist = nn.ParameterList([nn.Parameter(v, requires_grad=True) for v in params.values()])


def train_ensemble(models: Sequence[nn.Module], x_train: torch.Tensor, y_train: torch.Tensor,
                   subsets: Sequence[np.ndarray], seeds: Sequence[int],
                   cfg: train_lib.TrainConfig, *, device=None, folder=None,
                   progress: Callable[[str], None] | None = None) -> Ensemble:
    """Train ``models[m]`` on ``x_train[subsets[m]]`` with ``cfg`` but seed ``seeds[m]`` (the
    standard objective), all at once; returns the trained ``Ensemble``.

    ``x_train`` uint8 (N, C, H, W), ``y_train`` (N,) int64, ``subsets[m]`` the sorted positions
    of model m's examples (e.g. ``np.flatnonzero(mask)``), all of one size (the subsets of
    ``memorization.subset_masks`` are). ``folder``: where the epoch-end checkpoint lives.
    Errors: unequal subset sizes; ``cfg.steps``/``cfg.grad_clip`` (not supported here).
    """
    device = train_lib.resolve_device(device)
    m = len(models)
    if not (len(subsets) == len(seeds) == m):
        raise ValueError(f"{m} models, {len(subsets)} subsets and {len(seeds)} seeds differ")
    sizes = {len(s) for s in subsets}
    if len(sizes) != 1:
        raise ValueError(f"the subsets must have one size, got {sorted(sizes)}")
    if cfg.steps is not None or cfg.grad_clip:
        raise ValueError("train_ensemble trains by epochs, without gradient clipping")
    n = sizes.pop()
    spe = data_lib.steps_per_epoch(n, cfg.batch_size)
    if spe == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {n} training images")
    total = cfg.epochs * spe

    ens = Ensemble([mod.to("cpu") for mod in models]).to(device)
    holder = _Stacked(ens.params)
    ens.params = dict(zip(ens.params, holder.plist))
    optimizer = train_lib.make_optimizer(holder, cfg)
    x_train, y_train = x_train.to(device), y_train.to(device)
    index = torch.as_tensor(np.stack([np.asarray(s, dtype=np.int64) for s in subsets])).to(device)

    start_epoch = 0
    ckpt = Path(folder) / "ensemble.pt" if folder is not None else None
    if ckpt is not None and ckpt.exists():
        # onto the CPU, as the trainer: load_state_dict / copy_ put everything on the device
        # (Adam's step counters stay CPU tensors, as a fresh non-capturable Adam keeps them)
        state = train_lib.load_checkpoint(ckpt, map_location="cpu")
        if state.get("seeds") != list(seeds) or state.get("config") != cfg.to_dict():
            raise train_lib.CheckpointError(f"{ckpt} was written for other models or settings")
        with torch.no_grad():
            for k, v in state["params"].items():
                ens.params[k].copy_(v)
            for k, v in state["buffers"].items():
                ens.buffers[k].copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]

    for epoch in range(start_epoch, cfg.epochs):
        orders = torch.stack([data_lib.epoch_order(n, s, epoch) for s in seeds]).to(device)
        for step in range(spe):
            pos = orders[:, step * cfg.batch_size:(step + 1) * cfg.batch_size]     # (M, B)
            rows = torch.gather(index, 1, pos)                                    # (M, B)
            xb = x_train[rows]                                                    # (M, B, C, H, W)
            if cfg.augment:
                xb = torch.stack([data_lib.augment(xb[i], generator=data_lib.batch_generator(
                    seeds[i], epoch, step)) for i in range(m)])
            xb, yb = data_lib.to_float(xb), y_train[rows]
            lr = train_lib.lr_at(cfg, epoch * spe + step, total, spe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with train_lib.autocast_context(cfg, device):
                logits = ens.logits(xb)
            # the sum of the M mean losses: model m's gradient is its own loss's gradient
            loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                        reduction="none").view(m, -1).mean(1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            train_lib.atomic_save({"format": train_lib.CHECKPOINT_FORMAT, "epoch": epoch + 1,
                                   "seeds": list(seeds), "config": cfg.to_dict(),
                                   "params": {k: v.detach() for k, v in ens.params.items()},
                                   "buffers": ens.buffers, "optimizer": optimizer.state_dict()},
                                  ckpt)
        if progress:
            progress(f"[ensemble] {m} models: epoch {epoch + 1}/{cfg.epochs} (loss of the last "
                     f"batch, mean over models {float(loss) / m:.3f})")
    return ens


def correct(ens: Ensemble, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 500,
            device=None) -> np.ndarray:
    """(M, len(y)) bool: model m right on example i (eval mode, fp32 as
    ``evaluate.predict``)."""
    device = train_lib.resolve_device(device)
    out = []
    for xb, yb in data_lib.eval_batches(x, y, batch_size, device=device):
        out.append((ens.predict(xb) == yb).cpu())
    return torch.cat(out, 1).numpy()


def default_group(device) -> int:
    """How many subset models to train at once: ``$REPRO_ENSEMBLE`` if set, else 16 on CUDA
    (small models leave a GPU launch-bound; not yet measured on one: ``python -m repro bench
    ensemble``) and 1 on the CPU, where the ensemble is not faster (one thread, BN small CNN
    width 16, batch 128: 8 at once 1700-1860 images/s in all, one model 1790-2670 in the
    ensemble and 1740-2240 in the trainer, on a busy shared 2-core machine) and one at a time
    keeps the published CPU estimates bit for bit."""
    env = os.environ.get("REPRO_ENSEMBLE")
    if env:
        return max(1, int(env))
    return 16 if torch.device(device).type == "cuda" else 1
