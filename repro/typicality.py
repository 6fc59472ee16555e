"""Per-example typicality from public, precomputed scores: a data source, like ``repro.data``.

The BAT paper (Xu et al., ICLR 2022) calls a training example *atypical* when its
memorization score (Feldman & Zhang, NeurIPS 2020, eq. 1 of the BAT paper) exceeds t = 0.15.
Estimating that score needs thousands of models; the field has published such estimates:

- ``cscore``: the consistency score of Jiang et al. (ICML 2021): the expected held-out
  accuracy on an image of models trained on random subsets without it, averaged over subset
  sizes. Low C-score = atypical. Published for CIFAR-10 and CIFAR-100.
- ``mem``: Feldman & Zhang's memorization estimate ``tr_mem`` (4,000 ResNet-50 models, each
  on 70% of the data). Published for CIFAR-100 only.

Both are indexed in the *official* training order (``data_batch_1..5`` / ``train``). This
module returns them in the order of a ``repro.data.Dataset``'s arrays:

- arrays read from torchvision's folders are in official order already;
- the offline ``cifar10.npz`` written by ``../shared/data/prepare.py`` carries
  ``official_index_train`` (image i of its ``x_train`` is official image
  ``official_index_train[i]``);
- the offline ``cifar100.npz`` is not the official split: no score can be attached to its
  images (``NoOfficialScoresError``).

Where the files are read: ``root``, else ``$REPRO_SCORES``, else ``../shared/data/scores``
beside the checkout. A reader with internet downloads the four files listed in ``FILES``
from the URLs in ``SOURCES`` into one folder and points ``REPRO_SCORES`` at it.

On CIFAR-10 only C-scores exist, so BAT's rule (mem > t) is carried over through a
calibration on CIFAR-100, where both exist (``calibrate``): the C-score threshold that
selects as many examples as mem > t, and how well the two sets agree.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from repro import data
from repro import validate as V
from repro.memorization import correlation

SCORES_ROOT = data.PROJECT_ROOT.parent / "shared" / "data" / "scores"
KINDS = ("cscore", "mem")
FILES = {("cifar10", "cscore"): "cifar10-cscores-orig-order.npz",
         ("cifar100", "cscore"): "cifar100-cscores-orig-order.npz",
         ("cifar100", "mem"): "cifar100-mem-orig-order.npy"}
SOURCES = {
    "cscore": "Jiang, Zhang, Talwar, Mozer, Characterizing Structural Regularities of Labeled "
              "Data in Overparameterized Models, ICML 2021; "
              "https://pluskid.github.io/structural-regularity/ (cscores/<name>-cscores-orig-order.npz)",
    "mem": "Feldman & Zhang, What Neural Networks Memorize and Why, NeurIPS 2020 (tr_mem of "
           "cifar100_infl_matrix.npz, https://pluskid.github.io/influence-memorization/; the "
           "copy in ../shared/data/scores is a third party's export of it, checked equal at "
           "the 1,015 official high-influence pairs)",
}
# Feldman & Zhang's CIFAR-100 estimate: 4,000 models, each on a random 70% of the data. The
# standard error of p_in - p_out is largest at p = 1/2: sqrt(1/4 (1/(0.7 m) + 1/(0.3 m))).
FZ_MODELS, FZ_FRACTION = 4000, 0.7
FZ_SE_MAX = float(np.sqrt(0.25 * (1 / (FZ_FRACTION * FZ_MODELS) + 1 / ((1 - FZ_FRACTION) * FZ_MODELS))))
# Our offline CIFAR arrays come from one of these: only CIFAR-10's carries the mapping
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class NoOfficialScoresError(LookupError):
    """No public score can be attached to these images (the message says why)."""


class ScoresNotFoundError(FileNotFoundError):
    """A score file is missing; the message says where we looked and how to get it."""


def scores_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("REPRO_SCORES")
    return Path(env) if env else SCORES_ROOT


def reference(name: str, kind: str = "cscore", root=None) -> np.ndarray:
    """The published scores of ``name``'s 50,000 training images in official order, float64.

    Raises ``NoOfficialScoresError`` for a (dataset, kind) nobody published (e.g. ``mem`` of
    CIFAR-10, anything of MNIST) and ``ScoresNotFoundError`` when the file is not on disk."""
    W = "typicality.reference"
    name = V.choice(W, "name", name, data.NAMES)
    kind = V.choice(W, "kind", kind, KINDS)
    if (name, kind) not in FILES:
        have = ", ".join(f"{n} {k}" for n, k in FILES)
        raise NoOfficialScoresError(f"{W}: no published {kind} scores for {name} (published: "
                                    f"{have})")
    path = scores_root(root) / FILES[name, kind]
    if not path.exists():
        raise ScoresNotFoundError(
            f"{W}: {path} not found. Download {FILES[name, kind]} ({SOURCES[kind]}) into a "
            f"folder and set REPRO_SCORES to it, or pass root=")
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False)
    else:
        with np.load(path, allow_pickle=False) as d:
            values = d["scores"]
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (50000,):
        raise ValueError(f"{W}: {path} holds shape {values.shape}, expected (50000,)")
    return values


def reference_labels(name: str, root=None) -> np.ndarray | None:
    """The labels stored beside the C-scores (official order), or None if the file has none."""
    path = scores_root(root) / FILES[name, "cscore"]
    with np.load(path, allow_pickle=False) as d:
        return np.asarray(d["labels"], dtype=np.int64) if "labels" in d.files else None


def official_index(ds: data.Dataset, split: str = "train") -> np.ndarray:
    """Each image's position in the official training order, for ``ds``'s ``train`` or
    ``val`` split (both are carved from the 50,000 training images by ``data.load``).

    Raises ``NoOfficialScoresError`` when the arrays carry no mapping: our offline CIFAR-100
    (not the official split) and limited datasets whose origin is unknown."""
    W = "typicality.official_index"
    split = V.choice(W, "split", split, ("train", "val"))
    positions = ds.extras.get(f"{split}_index")
    n = len(ds.y_train if split == "train" else ds.y_val)
    if positions is None:
        raise NoOfficialScoresError(f"{W}: {ds.name} carries no {split}_index (not loaded "
                                    "by repro.data.load)")
    positions = np.asarray(positions, dtype=np.int64)[:n]   # Dataset.limit keeps a prefix
    if "official_index_train" in ds.extras:
        return np.asarray(ds.extras["official_index_train"], dtype=np.int64)[positions]
    if Path(str(ds.source)).name == TORCHVISION_FOLDERS.get(ds.name):
        return positions                                     # torchvision's files: official
    why = (" (the offline CIFAR-100 is not the official split: ../shared/data/README.md)"
           if ds.name == "cifar100" else "")
    raise NoOfficialScoresError(
        f"{W}: the {ds.name} arrays from {ds.source} carry no official_index_train, so no "
        f"published score can be attached to their images{why}. Rewrite them with "
        "`python ../shared/data/prepare.py DIR` or read torchvision's files.")


@dataclass(frozen=True)
class Scores:
    """Published scores of one split's images, in the order of the dataset's arrays."""
    dataset: str
    kind: str
    split: str
    values: np.ndarray          # (n,) float64
    source: str                 # paper and file

    def provenance(self) -> dict:
        return {"dataset": self.dataset, "kind": self.kind, "split": self.split,
                "source": self.source, "file": FILES[self.dataset, self.kind]}


def for_dataset(ds: data.Dataset, kind: str = "cscore", split: str = "train",
                root=None) -> Scores:
    """The published ``kind`` score of every image of ``ds``'s ``split``, in array order.

    The mapping is checked against the labels stored with the C-scores (a mismatch raises
    ``ValueError``: the arrays are not what the mapping says)."""
    W = "typicality.for_dataset"
    kind = V.choice(W, "kind", kind, KINDS)
    idx = official_index(ds, split)
    values = reference(ds.name, kind, root)[idx]
    labels = reference_labels(ds.name, root)
    y = (ds.y_train if split == "train" else ds.y_val).cpu().numpy()
    if labels is not None and not np.array_equal(labels[idx], y):
        bad = int((labels[idx] != y).sum())
        raise ValueError(f"{W}: {bad} of {len(y)} {ds.name} {split} labels differ from the "
                         "published labels at the mapped positions: the mapping is wrong")
    return Scores(ds.name, kind, split, values, SOURCES[kind])


@dataclass(frozen=True)
class Calibration:
    """Which C-score threshold stands for BAT's rule mem > t (fitted where both exist)."""
    t: float                    # memorization threshold (BAT: 0.15)
    threshold: float            # atypical = C-score < threshold
    fraction: float             # share of mem > t (= share of C-score < threshold)
    precision: float            # of the C-score set, share with mem > t
    recall: float               # of the mem > t set, share in the C-score set
    spearman: float             # rank correlation of C-score and mem (negative: opposite)
    n: int
    fitted_on: str

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(cscore: np.ndarray, mem: np.ndarray, t: float = 0.15,
              fitted_on: str = "") -> Calibration:
    """The C-score threshold below which as many examples lie as have mem > t, with the
    agreement of the two sets (precision = recall when the sizes match, up to ties)."""
    W = "typicality.calibrate"
    t = V.in_range(W, "t", t, -1, 1)
    cscore, mem = np.asarray(cscore, np.float64), np.asarray(mem, np.float64)
    if cscore.shape != mem.shape or cscore.ndim != 1:
        raise ValueError(f"{W}: cscore and mem must be 1-D of one length, got {cscore.shape} "
                         f"and {mem.shape}")
    ok = np.isfinite(cscore) & np.isfinite(mem)
    c, m = cscore[ok], mem[ok]
    target = m > t
    if not target.any() or target.all():
        raise ValueError(f"{W}: mem > {t} holds for {'no' if not target.any() else 'every'} "
                         "example: nothing to calibrate")
    k = int(target.sum())
    threshold = float(np.sort(c)[k])            # C-score < threshold: the k lowest (ties aside)
    chosen = c < threshold
    tp = int((chosen & target).sum())
    return Calibration(t=float(t), threshold=threshold, fraction=float(target.mean()),
                       precision=tp / max(1, int(chosen.sum())), recall=tp / k,
                       spearman=correlation(c, m)["spearman"], n=int(ok.sum()),
                       fitted_on=fitted_on)


def calibration(t: float = 0.15, root=None) -> Calibration:
    """``calibrate`` on the published CIFAR-100 C-scores and memorization estimates."""
    return calibrate(reference("cifar100", "cscore", root), reference("cifar100", "mem", root),
                     t, fitted_on="CIFAR-100 training set (official order), C-scores of "
                               "Jiang et al. 2021 vs Feldman & Zhang 2020 tr_mem")


def atypical(ds: data.Dataset, t: float = 0.15, split: str = "train", root=None
             ) -> tuple[np.ndarray, Calibration, Scores]:
    """BAT's atypical training examples from the published scores: mem > t where Feldman &
    Zhang's estimate exists for these images, else C-score < the CIFAR-100 calibration's
    threshold. Returns (bool mask in array order, calibration, the scores used)."""
    cal = calibration(t, root)
    try:
        mem = for_dataset(ds, "mem", split, root)
    except NoOfficialScoresError:
        cs = for_dataset(ds, "cscore", split, root)
        return cs.values < cal.threshold, cal, cs
    return mem.values > t, cal, mem


def agreement(ours: np.ndarray, ours_atypical: np.ndarray, official: Scores,
              official_atypical: np.ndarray) -> dict:
    """How our estimate agrees with a published score: Spearman of the two scores (C-scores
    enter negated, so agreement is positive) and the overlap of the two atypical sets."""
    ours_atypical = np.asarray(ours_atypical, bool)
    official_atypical = np.asarray(official_atypical, bool)
    sign = -1.0 if official.kind == "cscore" else 1.0
    both = int((ours_atypical & official_atypical).sum())
    either = int((ours_atypical | official_atypical).sum())
    return {"spearman": correlation(ours, sign * official.values)["spearman"],
            "n": int(len(ours)), "ours_atypical": int(ours_atypical.sum()),
            "official_atypical": int(official_atypical.sum()), "both": both,
            "precision": both / max(1, int(ours_atypical.sum())),
            "recall": both / max(1, int(official_atypical.sum())),
            "jaccard": both / max(1, either), "official": official.kind}
