"""Memorization and influence estimated by subsampling (Feldman & Zhang 2020), as BAT uses
them (Xu et al., arXiv 2106.04794), plus a cheap single-run proxy and the atypical split.

Definitions, for a training algorithm A and training set D:

    mem(x_i)        = P_{F<-A(S)}(F(x_i) = y_i | x_i in S)  - P(F(x_i) = y_i | x_i not in S)
    infl(x_i, x'_j) = P_{F<-A(S)}(F(x'_j) = y'_j | x_i in S) - P(F(x'_j) = y'_j | x_i not in S)

with S a random subset of D (here 70%, as Feldman & Zhang). The estimator trains K models on
K random subsets and records each model's correctness on every training and test example;
the probabilities are the means over the models that did / did not see x_i. Its standard
error is the two-sample binomial one (Agresti-Caffo adjusted). Each model's correctness is stored in its own file
(``SubsetEstimation``), so a killed estimation continues with the next missing model.

Atypical training examples: mem > t (t = 0.15 in the paper). Atypical test examples: some
atypical training example has influence > t on them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# key of a subset model's file that holds its wall time (s) rather than a correctness array
WALL_TIME = "wall_time_s"


# ----------------------------------------------------------------------------- subsets

def subset_masks(n: int, k: int, fraction: float = 0.7, seed: int = 0) -> np.ndarray:
    """(k, n) bool: row m marks the examples in subset m, exactly round(fraction * n) of them.
    Row m is a pure function of (n, fraction, seed, m), so K can grow without changing the
    first rows (a larger estimation reuses the smaller one's models)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    size = int(round(fraction * n))
    masks = np.zeros((k, n), dtype=bool)
    for m in range(k):
        rng = np.random.default_rng([seed, m, n])
        masks[m, rng.permutation(n)[:size]] = True
    return masks


# ----------------------------------------------------------------------------- estimates

@dataclass
class Estimate:
    """Per-example estimate with its standard error and the counts behind it (NaN where
    no model saw, or no model missed, the example)."""
    value: np.ndarray
    se: np.ndarray
    p_in: np.ndarray
    p_out: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray

    def valid(self) -> np.ndarray:
        return np.isfinite(self.value)

    def summary(self) -> dict:
        ok = self.valid()
        return {"n": int(len(self.value)), "n_valid": int(ok.sum()),
                "mean": float(np.nanmean(self.value)) if ok.any() else float("nan"),
                "mean_se": float(np.nanmean(self.se)) if ok.any() else float("nan"),
                "median_se": float(np.nanmedian(self.se)) if ok.any() else float("nan"),
                "mean_n_in": float(self.n_in.mean()), "mean_n_out": float(self.n_out.mean())}


def _two_sample(in_sum, n_in, out_sum, n_out) -> Estimate:
    with np.errstate(invalid="ignore", divide="ignore"):
        p_in = np.where(n_in > 0, in_sum / np.maximum(n_in, 1), np.nan)
        p_out = np.where(n_out > 0, out_sum / np.maximum(n_out, 1), np.nan)
        # Agresti-Caffo: proportions with one success and one failure added, so a handful
        # of models that all agree does not claim a standard error of 0
        a_in = (in_sum + 1) / (n_in + 2)
        a_out = (out_sum + 1) / (n_out + 2)
        se = np.sqrt(a_in * (1 - a_in) / np.maximum(n_in, 1)
                     + a_out * (1 - a_out) / np.maximum(n_out, 1))
    value = p_in - p_out
    se = np.where(np.isfinite(value), se, np.nan)
    return Estimate(value, se, p_in, p_out, np.asarray(n_in), np.asarray(n_out))


def memorization(correct: np.ndarray, masks: np.ndarray) -> Estimate:
    """mem(x_i) from ``correct`` (K, n) bool (model k right on training example i) and the
    subset ``masks`` (K, n)."""
    correct, masks = np.asarray(correct, dtype=bool), np.asarray(masks, dtype=bool)
    if correct.shape != masks.shape:
        raise ValueError(f"correct {correct.shape} and masks {masks.shape} differ")
    n_in = masks.sum(0)
    n_out = (~masks).sum(0)
    return _two_sample((correct & masks).sum(0), n_in, (correct & ~masks).sum(0), n_out)


def influence(correct_test: np.ndarray, masks: np.ndarray, rows=None) -> Estimate:
    """infl(x_i, x'_j) as (len(rows), m) arrays: ``correct_test`` (K, m) bool, ``masks``
    (K, n), ``rows`` the training examples i to compute (default all: n x m floats)."""
    c = np.asarray(correct_test, dtype=np.float64)
    m = np.asarray(masks, dtype=bool)
    if rows is not None:
        m = m[:, np.asarray(rows)]
    mf = m.astype(np.float64)
    in_sum = mf.T @ c
    out_sum = (1 - mf).T @ c
    n_in = mf.sum(0)[:, None] * np.ones((1, c.shape[1]))
    n_out = (1 - mf).sum(0)[:, None] * np.ones((1, c.shape[1]))
    return _two_sample(in_sum, n_in, out_sum, n_out)


def max_influence(correct_test: np.ndarray, masks: np.ndarray, rows,
                  candidates: np.ndarray | None = None, chunk: int = 512):
    """For each test example j: the largest infl(x_i, x'_j) over training examples ``rows``
    (e.g. the atypical ones), its standard error and the argmax (an index into the training
    set; -1 where there is none). ``candidates`` (m, c) optionally restricts, per test
    example, the training examples considered (e.g. its nearest same-class neighbours):
    only pairs with i in ``rows`` and in the test example's candidate list count.
    Computed in chunks of rows, so n x m never sits in memory."""
    c_test = np.asarray(correct_test, dtype=bool)
    rows = np.asarray(rows, dtype=np.int64)
    m = c_test.shape[1]
    best = np.full(m, -np.inf)
    best_se = np.full(m, np.nan)
    arg = np.full(m, -1, dtype=np.int64)
    if candidates is not None:
        allowed_rows = np.zeros(masks.shape[1], dtype=bool)
        allowed_rows[rows] = True
        cand = np.asarray(candidates, dtype=np.int64)
        for j in range(m):
            cj = cand[j][allowed_rows[cand[j]]]
            if len(cj) == 0:
                continue
            est = influence(c_test[:, j:j + 1], masks, cj)
            v = np.where(np.isfinite(est.value[:, 0]), est.value[:, 0], -np.inf)
            k = int(np.argmax(v))
            if v[k] > best[j]:
                best[j], best_se[j], arg[j] = v[k], est.se[k, 0], cj[k]
        return np.where(np.isfinite(best), best, np.nan), best_se, arg
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk]
        est = influence(c_test, masks, r)
        v = np.where(np.isfinite(est.value), est.value, -np.inf)
        k = v.argmax(0)
        top = v[k, np.arange(m)]
        better = top > best
        best[better] = top[better]
        best_se[better] = est.se[k, np.arange(m)][better]
        arg[better] = r[k][better]
    return np.where(np.isfinite(best), best, np.nan), best_se, arg


# ----------------------------------------------------------------------------- splits

def atypical(mem: np.ndarray, t: float = 0.15) -> np.ndarray:
    """Training examples with mem > t (NaN estimates count as typical)."""
    mem = np.asarray(mem, dtype=np.float64)
    return np.where(np.isfinite(mem), mem > t, False)


def atypical_test(max_infl: np.ndarray, t: float = 0.15) -> np.ndarray:
    """Test examples on which some atypical training example has influence > t
    (``max_infl`` from ``max_influence`` over the atypical rows)."""
    return atypical(max_infl, t)


def top_fraction(score: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of examples with the largest ``score`` (ties broken by position):
    an atypical split from a proxy score, matched in size to another split."""
    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    k = int(round(fraction * len(score)))
    out = np.zeros(len(score), dtype=bool)
    if k > 0:
        out[np.argsort(-score, kind="stable")[:k]] = True
    return out


# ----------------------------------------------------------------------------- proxy

def learning_speed(correct_per_epoch: np.ndarray) -> np.ndarray:
    """Per-example mean correctness over the epochs of one run (Jiang et al.'s learning
    speed / C-score proxy): (E, n) bool -> (n,) in [0, 1]. Examples learnt late or forgotten
    often are the ones a model has to memorise."""
    return np.asarray(correct_per_epoch, dtype=np.float64).mean(0)


def memorization_proxy(correct_per_epoch: np.ndarray) -> np.ndarray:
    """Fitted at the end but learnt late: (mean correctness over the last quarter of the
    epochs, at least one) x (1 - learning speed). On a model that fits its training set this
    is 1 - learning speed; on an under-fitting one it does not rank the never-fitted
    examples (mem ~ 0: wrong whether seen or not) as memorised."""
    h = np.asarray(correct_per_epoch, dtype=np.float64)
    late = h[-max(1, len(h) // 4):].mean(0)
    return late * (1.0 - learning_speed(h))


def correlation(a: np.ndarray, b: np.ndarray) -> dict:
    """Pearson and Spearman correlation over the entries where both are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]

    def pearson(u, v):
        if len(u) < 2 or u.std() == 0 or v.std() == 0:
            return float("nan")
        return float(np.corrcoef(u, v)[0, 1])

    def ranks(u):  # average ranks for ties
        order = np.argsort(u, kind="stable")
        r = np.empty(len(u))
        r[order] = np.arange(len(u))
        _, inv, counts = np.unique(u, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    return {"pearson": pearson(a, b), "spearman": pearson(ranks(a), ranks(b)) if len(a) else
            float("nan"), "n": int(len(a))}


def split_half_reliability(correct: np.ndarray, masks: np.ndarray) -> dict:
    """How reproducible the estimate is at this K, from the models already trained: the
    Pearson correlation between the estimates of the first and the second half of the K
    models, and its Spearman-Brown extrapolation 2r / (1 + r) to all K (what two independent
    sets of K models would agree to). Examples either half cannot estimate are left out."""
    h = len(masks) // 2
    if h < 2:
        return {"k_half": h, "pearson_half": float("nan"), "spearman_brown": float("nan"),
                "n": 0}
    a = memorization(correct[:h], masks[:h]).value
    b = memorization(correct[h:2 * h], masks[h:2 * h]).value
    c = correlation(a, b)
    r = c["pearson"]
    return {"k_half": h, "pearson_half": r, "spearman_brown": 2 * r / (1 + r), "n": c["n"]}


# ----------------------------------------------------------------------------- estimation

class MissingModelsError(FileNotFoundError):
    """The estimate needs subset models that no shard has recorded yet; ``missing`` lists
    their indices."""

    def __init__(self, folder: Path, missing: list[int], k: int):
        self.folder, self.missing, self.k = folder, missing, k
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        super().__init__(f"{len(missing)} of {k} subset models missing in {folder}: {shown}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N), 0 <= i < N (a shard index, e.g. ``$SLURM_ARRAY_TASK_ID/N``)."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= i < N")
    return i, n


def shard_models(k: int, shard: tuple[int, int] | None) -> list[int]:
    """The model indices of shard (i, N) out of K: every N-th one starting at i (balanced,
    and growing K never moves a model to another shard). ``None``: all K."""
    if shard is None:
        return list(range(k))
    i, n = shard
    return list(range(i, k, n))


def model_path(folder, k: int) -> Path:
    """Where subset model ``k``'s correctness arrays are kept in an estimation's folder."""
    return Path(folder) / f"model_{k:04d}.npz"


class SubsetEstimation:
    """K subset models, each its own file ``<folder>/model_<k>.npz`` holding that model's
    bool correctness arrays (e.g. ``train_clean``, ``test_clean``, ``train_adv``). Finished
    models are skipped, so a killed estimation continues where it stopped; a manifest pins
    (n, K-independent subset seed, fraction) so a folder is never mixed across settings.

    The models are independent, so they can be trained in shards (``run(..., shard=(i, N))``)
    on any mix of machines; copying every shard's ``model_*.npz`` into one folder and calling
    ``merged()`` gives exactly the arrays of one unsharded run (each model is a pure function
    of its index: its subset, seed and initialisation).

    ``train_one(k, mask) -> dict[str, bool array]`` trains model k on the examples where
    ``mask`` is True and returns its correctness on every training and test example;
    ``train_many(ks, masks) -> list of such dicts`` trains several at once (a batched
    ensemble, ``repro.ensemble``), ``group`` models per call.
    """

    def __init__(self, folder, n: int, k: int, fraction: float = 0.7, seed: int = 0):
        self.folder = Path(folder)
        self.n, self.k, self.fraction, self.seed = n, k, fraction, seed
        self.masks = subset_masks(n, k, fraction, seed)

    def _manifest(self) -> dict:
        return {"n": self.n, "fraction": self.fraction, "seed": self.seed}

    def path(self, k: int) -> Path:
        return model_path(self.folder, k)

    def done(self) -> list[int]:
        return [k for k in range(self.k) if self.path(k).exists()]

    def missing(self, shard: tuple[int, int] | None = None) -> list[int]:
        return [k for k in shard_models(self.k, shard) if not self.path(k).exists()]

    def _check_manifest(self, write: bool) -> None:
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old != self._manifest():
                raise ValueError(f"{self.folder} holds an estimation with {old}, not "
                                 f"{self._manifest()}; use another folder")
        elif write:
            tmp = self.folder / f".manifest.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self._manifest()))
            os.replace(tmp, manifest)

    def _save(self, k: int, arrays: dict, wall_time_s: float | None = None) -> None:
        tmp = self.folder / f".model_{k:04d}.{os.getpid()}.tmp.npz"
        out = {n: np.asarray(v, dtype=bool) for n, v in arrays.items()}
        if wall_time_s is not None:  # what training and scoring this model cost (seconds)
            out[WALL_TIME] = np.float64(wall_time_s)
        np.savez_compressed(tmp, **out)
        os.replace(tmp, self.path(k))

    def run(self, train_one: Callable[[int, np.ndarray], dict] | None = None,
            log: Callable | None = None, *, shard: tuple[int, int] | None = None,
            train_many: Callable[[list, np.ndarray], list] | None = None, group: int = 1):
        """Train the missing models of ``shard`` (default: all K) and record each as soon as
        it is done; returns ``load()`` (the finished models so far). Under ``torchrun`` only
        rank 0 writes (every rank computes the same arrays)."""
        from repro import distributed
        writer = distributed.is_writer()
        if writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".*.tmp.npz"):
                stale.unlink(missing_ok=True)
        self._check_manifest(write=writer)
        todo = self.missing(shard)
        if train_many is None and train_one is None:
            raise ValueError("give train_one or train_many")
        step = max(1, group) if train_many is not None else 1
        for start in range(0, len(todo), step):
            ks = todo[start:start + step]
            t0 = time.time()
            outs = (train_many(ks, self.masks[ks]) if train_many is not None
                    else [train_one(ks[0], self.masks[ks[0]])])
            each = (time.time() - t0) / len(ks)  # a batched group's time, shared evenly
            for k, arrays in zip(ks, outs):
                if writer:
                    self._save(k, arrays, wall_time_s=each)
            if log:
                log(f"[memorization] models {ks} done ({len(self.done())}/{self.k} recorded)")
        return self.load()

    def merged(self) -> dict[str, np.ndarray]:
        """``load()`` of all K models; ``MissingModelsError`` (naming them) if any is missing."""
        self._check_manifest(write=False)
        missing = self.missing()
        if missing:
            raise MissingModelsError(self.folder, missing, self.k)
        return self.load()

    def load(self) -> dict[str, np.ndarray]:
        """The stacked correctness arrays (K, ...) of the finished models, plus ``masks`` and
        ``wall_time_s`` (K,): each model's training and scoring time in seconds, NaN for a
        model recorded before times were kept."""
        rows = self.done()
        if not rows:
            raise FileNotFoundError(f"no finished subset model in {self.folder}")
        stacked: dict[str, list] = {}
        times = []
        for k in rows:
            with np.load(self.path(k)) as d:
                times.append(float(d[WALL_TIME]) if WALL_TIME in d.files else np.nan)
                for name in d.files:
                    if name != WALL_TIME:
                        stacked.setdefault(name, []).append(d[name])
        out = {name: np.stack(v) for name, v in stacked.items()}
        out["masks"] = self.masks[rows]
        out[WALL_TIME] = np.asarray(times)
        return out
