"""What every chapter's experiment does: pick the device, load the data at the preset's size,
train a model under a cached run folder, and evaluate it into metrics + small arrays.

A chapter run stores everything its notebook shows in ``metrics.json`` / ``arrays.npz``, so a
run computed on a GPU machine renders on a CPU machine with no weights at hand.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from repro import data, results, train
from repro.models import build


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_dataset(name: str, *, n_train: int | None, n_test: int | None,
                 n_val: int | None = None, val_size: int | None = None) -> data.Dataset:
    """The dataset cut to the preset's size (stored orders are shuffled, so prefixes mix
    all classes)."""
    return data.load(name, val_size=val_size).limit(n_train, n_val, n_test)


def train_and_evaluate(chapter: str, name: str, config: dict, *,
                       model_fn: Callable[[], torch.nn.Module], objective,
                       dataset: data.Dataset, train_cfg: train.TrainConfig,
                       evaluate: Callable[[torch.nn.Module], tuple[dict, dict]],
                       device: torch.device, progress: bool = True,
                       use_best: bool = True, validate=None) -> results.Run:
    """Train ``model_fn()`` with ``objective`` (resumable: checkpoints live in the run folder)
    and evaluate the best-on-validation weights (or the final ones) with ``evaluate``.
    ``validate(model) -> dict`` replaces the trainer's epoch-end validation (see
    ``repro.train.train``).

    ``config`` must describe everything that changes the result; it keys the cache.
    """
    def compute(run: results.Run):
        model = model_fn()
        result = train.train(model, objective, dataset, train_cfg, run.path / "train",
                             device=device, progress=progress, validate=validate)
        weights = result.best_path if (use_best and result.best_path) else result.final_path
        train.load_weights(model, weights, device)
        model.to(device).eval()
        metrics, arrays = evaluate(model)
        metrics["training"] = {"history": result.history, "seconds": result.seconds,
                               "best_step": result.best_step, "best_val": result.best_metric,
                               "weights": "best-on-validation" if weights == result.best_path
                               else "final", "total_steps": result.total_steps}
        return metrics, arrays

    full = {**config, "train": train_cfg.to_dict(), "objective": _describe(objective)}
    return results.cached(chapter, name, full, compute, device=device)


def _describe(objective) -> dict:
    cfg = getattr(objective, "config", None)
    return cfg() if callable(cfg) else {"name": type(objective).__name__}


def model_for(arch: str, dataset: data.Dataset, *, width: int | None = None,
              normalize: bool = True, **kw):
    """A registered architecture sized for ``dataset`` (classes, channels, normalisation:
    ``normalize=False`` gives an identity input layer, mean 0 and std 1, on [0, 1] inputs)."""
    def make():
        torch.manual_seed(kw.pop("init_seed", 0))
        return build(arch, dataset.num_classes,
                     mean_std=dataset.mean_std if normalize else None, width=width, **kw)
    return make


def as_numpy_images(x: torch.Tensor) -> np.ndarray:
    """Float [0,1] or uint8 NCHW tensors -> uint8 arrays (small to store, exact to show)."""
    if x.dtype == torch.uint8:
        return x.cpu().numpy()
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
