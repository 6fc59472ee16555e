"""Datasets as tensors, a deterministic validation split, and on-device batch augmentation.

Images are kept as uint8 NCHW tensors (a CIFAR train set is 150 MB, so it fits on any GPU
whole) and turned into float in [0, 1] per batch. Models normalise inside their first layer.

Where the data comes from, in this order:
  1. ``ROOT/<name>.npz`` as written by ``../shared/data/prepare.py`` (``x_train``, ``y_train``,
     ``x_test``, ``y_test``, ``classes``);
  2. torchvision's on-disk layouts under ROOT (``cifar-10-batches-py/``, ``cifar-100-python/``,
     ``MNIST/raw/``), read without importing torchvision;
  3. a torchvision download into ROOT, only when ``download=True`` and torchvision imports.
ROOT is the ``root`` argument, else ``$REPRO_DATA``, else ``.data/`` in the project checkout.
Nothing found is an error that says where we looked: there is no fallback to fake data.

Every public function validates its arguments before any work (``repro.validate``; the table
is ``book/validation.md``): dataset names, counts (limits within what a split holds,
``val_size``, batch sizes, steps), seeds, devices named by strings, and image/label tensors.
"""
from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from repro import validate as V

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = PROJECT_ROOT / ".data"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

NAMES = ("mnist", "cifar10", "cifar100")
# Per-channel statistics of the training sets; models use them in their normalisation layer.
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}


class DataNotFoundError(FileNotFoundError):
    """Raised when no source of a dataset exists; the message says where we looked."""


@dataclass
class Dataset:
    """One dataset split into train / validation / test, images uint8 NCHW, labels int64."""

    name: str
    classes: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mean_std(self):
        return MEAN_STD[self.name]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        """Move every split to ``device`` (e.g. the whole set onto the GPU): 'auto', 'cpu',
        'cuda', 'cuda:N', 'mps' or a torch.device."""
        device = V.device("data.Dataset.to", "device", device, none=False)
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Dataset(self.name, self.classes, source=self.source, extras=self.extras, **moved)

    def limit(self, n_train: int | None = None, n_val: int | None = None,
              n_test: int | None = None) -> "Dataset":
        """The first n images of each split (the stored order is already shuffled). Each n is
        None (the whole split) or an int in [0, the split's size]."""
        W = "data.Dataset.limit"
        for name, n, t in (("n_train", n_train, self.y_train), ("n_val", n_val, self.y_val),
                           ("n_test", n_test, self.y_test)):
            V.count(W, name, n, min=0, max=len(t), none=True)  # at most what the split has

        def cut(t, n):
            return t if n is None else t[:n]
        return Dataset(self.name, self.classes,
                       cut(self.x_train, n_train), cut(self.y_train, n_train),
                       cut(self.x_val, n_val), cut(self.y_val, n_val),
                       cut(self.x_test, n_test), cut(self.y_test, n_test),
                       source=self.source, extras=self.extras)

    def __repr__(self) -> str:
        return (f"Dataset({self.name}: train {tuple(self.x_train.shape)}, val "
                f"{tuple(self.x_val.shape)}, test {tuple(self.x_test.shape)}, from {self.source})")


def _root(where: str, root) -> None:
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{where}: root must be None, a str or an os.PathLike folder, got "
                        f"{type(root).__name__}")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$REPRO_DATA``, else ``.data/`` in the project checkout."""
    _root("data.data_root", root)
    if root is not None:
        return Path(root)
    env = os.environ.get("REPRO_DATA")
    return Path(env) if env else DEFAULT_ROOT


def load(name: str, root: str | os.PathLike | None = None, *, val_size: int | None = None,
         download: bool = False, seed: int = 0) -> Dataset:
    """Load ``name`` (mnist, cifar10, cifar100) with ``val_size`` training images held out.

    The validation split is a fixed random subset of train (``seed``), so checkpoint
    selection never touches the test set. Default size: 5000 for MNIST, 2000 for CIFAR.
    Validated first: ``name`` one of ``NAMES``; ``root`` None, str or PathLike;
    ``val_size`` None or an int >= 0 (and below the training set's size, checked once it is
    read); ``download`` a bool; ``seed`` an int.
    """
    W = "data.load"
    name = V.choice(W, "name", name, NAMES)
    _root(W, root)
    val_size = V.count(W, "val_size", val_size, min=0, none=True)
    V.flag(W, "download", download)
    seed = V.integer(W, "seed", seed)
    base = data_root(root)
    arrays, source = _read(name, base, download)
    x_train = _to_nchw(arrays["x_train"])
    x_test = _to_nchw(arrays["x_test"])
    y_train = torch.as_tensor(np.asarray(arrays["y_train"], dtype=np.int64))
    y_test = torch.as_tensor(np.asarray(arrays["y_test"], dtype=np.int64))
    if val_size is None:
        val_size = 5000 if name == "mnist" else 2000
    if not 0 <= val_size < len(y_train):
        raise ValueError(f"{W}: val_size must be in [0, {len(y_train)}) ({name} has "
                         f"{len(y_train)} training images), got {val_size}")
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
    classes = [str(c) for c in arrays.get("classes", range(NUM_CLASSES[name]))]
    extras = {k: v for k, v in arrays.items()
              if k not in ("x_train", "y_train", "x_test", "y_test", "classes")}
    extras["train_index"] = train_idx.numpy()  # positions in the stored train order
    extras["val_index"] = val_idx.numpy()
    return Dataset(name, classes, x_train[train_idx], y_train[train_idx],
                   x_train[val_idx], y_train[val_idx], x_test, y_test, source, extras)


def _to_nchw(x) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:  # N,H,W grayscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def _read(name: str, base: Path, download: bool):
    looked = []
    npz = base / f"{name}.npz"
    looked.append(str(npz))
    if npz.exists():
        with np.load(npz, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}, str(npz)
    reader = {"cifar10": _read_cifar10_batches, "cifar100": _read_cifar100_python,
              "mnist": _read_mnist_raw}[name]
    folder = base / {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                     "mnist": "MNIST/raw"}[name]
    looked.append(str(folder))
    if folder.exists():
        return reader(folder), str(folder)
    if download:
        try:
            import torchvision  # noqa: F401  (optional: wheels need CUDA libraries)
        except Exception as e:  # ImportError or a CUDA library error
            looked.append(f"torchvision download (torchvision does not import: {e})")
        else:
            _torchvision_download(name, base)
            return reader(folder), str(folder)
    hint = (f"  python {SHARED_DATA / 'prepare.py'} {base} {name}" if SHARED_DATA.exists()
            else f"  python -m repro data prepare --root {base}   (needs ../shared/data), or "
                 f"load(..., download=True) with torchvision installed and internet")
    raise DataNotFoundError(
        f"dataset {name!r} not found. Looked in:\n  " + "\n  ".join(looked) +
        f"\nTo get it:\n{hint}\nor set REPRO_DATA to a folder that holds {name}.npz.")


def _unpickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar10_batches(folder: Path):
    xs, ys = [], []
    for i in range(1, 6):
        d = _unpickle(folder / f"data_batch_{i}")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(d["labels"])
    t = _unpickle(folder / "test_batch")
    meta = _unpickle(folder / "batches.meta")
    return {"x_train": np.concatenate(xs).transpose(0, 2, 3, 1), "y_train": np.array(ys),
            "x_test": np.asarray(t["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
            "y_test": np.array(t["labels"]), "classes": np.array(meta["label_names"])}


def _read_cifar100_python(folder: Path):
    tr, te = _unpickle(folder / "train"), _unpickle(folder / "test")
    meta = _unpickle(folder / "meta")
    shape = lambda d: np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return {"x_train": shape(tr), "y_train": np.array(tr["fine_labels"]),
            "x_test": shape(te), "y_test": np.array(te["fine_labels"]),
            "classes": np.array(meta["fine_label_names"])}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _read_mnist_raw(folder: Path):
    def find(stem):
        for p in (folder / stem, folder / (stem + ".gz")):
            if p.exists():
                return p
        raise DataNotFoundError(f"{folder} has no {stem}[.gz]")
    return {"x_train": _read_idx(find("train-images-idx3-ubyte")),
            "y_train": _read_idx(find("train-labels-idx1-ubyte")).astype(np.int64),
            "x_test": _read_idx(find("t10k-images-idx3-ubyte")),
            "y_test": _read_idx(find("t10k-labels-idx1-ubyte")).astype(np.int64),
            "classes": np.array([str(i) for i in range(10)])}


def _torchvision_download(name: str, base: Path) -> None:
    import torchvision.datasets as tvd
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[name]
    for train in (True, False):
        cls(str(base), train=train, download=True)


def prepare_offline(root: str | os.PathLike | None = None, names=NAMES,
                    shared: Path = SHARED_DATA) -> Path:
    """Write ``ROOT/<name>.npz`` from the project's offline copy in ``../shared/data``
    (``names``: a sequence of names from ``NAMES``)."""
    W = "data.prepare_offline"
    _root(W, root)
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise TypeError(f"{W}: names must be a list or tuple of dataset names from "
                        f"{NAMES}, got {V._show(names)}")
    names = [V.choice(W, f"names[{i}]", n, NAMES) for i, n in enumerate(names)]
    base = data_root(root)
    script = shared / "prepare.py"
    if not script.exists():
        raise DataNotFoundError(f"no offline data at {shared}: clone the project next to its "
                                f"shared/ folder, or use load(..., download=True)")
    subprocess.run([sys.executable, str(script), str(base), *names], check=True)
    return base


# ----------------------------------------------------------------------------- batches

def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (a float tensor is returned unchanged; any other
    dtype is refused: no host sync, dtype only)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data.to_float: x must be a torch.Tensor of images, got "
                        f"{type(x).__name__}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"data.to_float: x must be uint8 or float images, got dtype {x.dtype}")
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def augment(x: torch.Tensor, *, pad: int = 4, flip: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, on x's device, per image.

    Works on uint8 or float NCHW batches; the random draws come from ``generator`` (on
    the CPU, so the same seed gives the same crops on any device). On CUDA the draws travel
    in one pinned, non-blocking copy: no stream synchronisation per batch (a plain
    ``.to('cuda')`` of a pageable CPU tensor waits for the GPU to drain its queue).
    Validated (host-only): ``x`` a 4-D uint8/float tensor; ``pad`` an int >= 0; ``flip`` a
    bool; ``generator`` None or a CPU ``torch.Generator``.
    """
    W = "data.augment"
    V.tensor(W, "x", x)
    if x.dim() != 4 or not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"{W}: x must be a batch of uint8 or float images (N, C, H, W), got "
                         f"dtype {x.dtype} and shape {tuple(x.shape)}")
    pad = V.count(W, "pad", pad, min=0)
    V.flag(W, "flip", flip)
    V.generator(W, "generator", generator, cpu=True)
    n, _, h, w = x.shape
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    dev = x.device
    draws = torch.stack([dx, dy, flips.long()])
    if dev.type == "cuda":
        draws = draws.pin_memory().to(dev, non_blocking=True)
    dx, dy, flips = draws[0], draws[1], draws[2].bool()
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=dev)[None]              # n,h
    cols = dx[:, None] + torch.arange(w, device=dev)[None]              # n,w
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    idx = torch.arange(n, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # n,h,w,c
    return out.permute(0, 3, 1, 2).contiguous()


def batch_generator(seed: int, epoch: int, step: int = 0) -> torch.Generator:
    """The CPU generator for one batch: a pure function of (seed, epoch, step), so a run
    resumed at any step draws exactly the same crops and flips as an uninterrupted one.
    ``seed`` an int; ``epoch``, ``step`` ints >= 0."""
    W = "data.batch_generator"
    seed, epoch = V.integer(W, "seed", seed), V.count(W, "epoch", epoch, min=0)
    step = V.count(W, "step", step, min=0)
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % (2**63))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: depends only on (seed, epoch). ``n``, ``epoch``
    ints >= 0; ``seed`` an int."""
    W = "data.epoch_order"
    n, seed = V.count(W, "n", n, min=0), V.integer(W, "seed", seed)
    epoch = V.count(W, "epoch", epoch, min=0)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def train_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int, epoch: int,
                  start_step: int = 0, augment_images: bool = True, drop_last: bool = True,
                  device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented float batches in [0,1] for one epoch, starting at ``start_step``.

    Everything is a function of (seed, epoch, step), which is what makes resume exact.
    With x already on the GPU, indexing and augmentation happen there.

    Validated when called (not at the first ``next``): ``x`` a uint8/float tensor (N, C, H, W)
    (any rank >= 2 without augmentation); ``y`` int64 (N,); ``batch_size`` >= 1; ``seed`` an
    int; ``epoch``, ``start_step`` >= 0; the flags bools; ``device``.
    """
    W = "data.train_batches"
    augment_images = V.flag(W, "augment_images", augment_images)
    _xy(W, x, y, ndim=4 if augment_images else None)
    batch_size = V.count(W, "batch_size", batch_size)
    seed, epoch = V.integer(W, "seed", seed), V.count(W, "epoch", epoch, min=0)
    start_step = V.count(W, "start_step", start_step, min=0)
    drop_last = V.flag(W, "drop_last", drop_last)
    device = V.device(W, "device", device)
    return _train_batches(x, y, batch_size, seed=seed, epoch=epoch, start_step=start_step,
                          augment_images=augment_images, drop_last=drop_last, device=device)


def _xy(where: str, x, y, *, ndim: int | None) -> None:
    """Host-only: images uint8/float with a batch dimension, one int64 label each."""
    V.tensor(where, "x", x)
    if not (x.dtype == torch.uint8 or x.is_floating_point()) or \
            (x.dim() != ndim if ndim is not None else x.dim() < 2):
        want = "(N, C, H, W)" if ndim == 4 else "(N, ...)"
        raise ValueError(f"{where}: x must be uint8 or float images {want}, got dtype "
                         f"{x.dtype} and shape {tuple(x.shape)}")
    V.tensor(where, "y", y)
    if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{where}: y must be int64 labels of shape ({len(x)},) (one per "
                         f"image of x), got dtype {y.dtype} and shape {tuple(y.shape)}")


def _train_batches(x, y, batch_size, *, seed, epoch, start_step, augment_images, drop_last,
                   device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    device = x.device if device is None else device
    n = len(y)
    order = epoch_order(n, seed, epoch)    # one copy per epoch, not per batch; pinned and
    if x.device.type == "cuda":            # asynchronous on CUDA (no stream sync)
        order = order.pin_memory().to(x.device, non_blocking=True)
    steps = n // batch_size if drop_last else -(-n // batch_size)
    for step in range(start_step, steps):
        idx = order[step * batch_size:(step + 1) * batch_size].to(x.device)
        # non_blocking only towards CUDA: a non-blocking copy *from* CUDA to the CPU lands in
        # pinned memory and returns before the data is there (augment would read garbage)
        nb = device.type == "cuda"
        xb, yb = x[idx].to(device, non_blocking=nb), y[idx].to(device, non_blocking=nb)
        if augment_images:
            xb = augment(xb, generator=batch_generator(seed, epoch, step))
        yield to_float(xb), yb


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Batches per epoch of ``n`` (int >= 0) examples at ``batch_size`` (int >= 1)."""
    W = "data.steps_per_epoch"
    n, batch_size = V.count(W, "n", n, min=0), V.count(W, "batch_size", batch_size)
    drop_last = V.flag(W, "drop_last", drop_last)
    return n // batch_size if drop_last else -(-n // batch_size)


def eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device=None):
    """Ordered float batches in [0,1], no augmentation (validated when called: ``x`` uint8 or
    float (N, ...), ``y`` int64 (N,), ``batch_size`` >= 1, ``device``)."""
    W = "data.eval_batches"
    _xy(W, x, y, ndim=None)
    batch_size = V.count(W, "batch_size", batch_size)
    device = V.device(W, "device", device)
    return _eval_batches(x, y, batch_size, x.device if device is None else device)


def _eval_batches(x, y, batch_size, device):
    for i in range(0, len(y), batch_size):
        yield to_float(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
