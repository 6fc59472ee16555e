"""Clean and robust accuracy and official AutoAttack (the gradient-masking sanity checks are
in ``repro.sanity``, re-exported here).

Results keep per-example correctness (numpy bool arrays) rather than only percentages: robust
accuracy is the per-example worst case over attacks, and later chapters (BAT's atypical
samples) need to know *which* examples survived. Every AutoAttack result says which version
(and any deviation from it) produced it.

Every entry point here computes in fp32, also when called inside a bf16 autocast (for
instance from a training loop's validation): ``predict``, ``robust_eval`` (with the attacks
it is given), ``autoattack``, ``zero_gradient_fraction`` and ``sanity_report`` switch off
any autocast around their work (``repro.attacks.float32``). A bf16 attack can be weaker and
overstate robustness; training attacks may use bf16, reported numbers do not.

Every entry point validates its arguments before any work (``repro.validate``; the table is
``book/validation.md``): images (uint8 or float in [0, 1]), labels (int64, one per image,
0 <= y < the model's number of outputs, found with one single-image forward), radii, counts,
tolerances, norms, versions and devices, with errors that name the argument and its range.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from repro import attacks as A
from repro import validate as V
from repro.data import to_float

Attack = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _norms(norm: str, where: str = "evaluate", name: str = "norm") -> tuple[str, str]:
    """('linf'|'l2' for repro.attacks, 'Linf'|'L2' for AutoAttack)."""
    n = V.norm(where, name, norm)
    return n, {"linf": "Linf", "l2": "L2"}[n]


def _num_classes(where: str, model: torch.nn.Module, x: torch.Tensor,
                 device: torch.device) -> int | None:
    """The model's number of outputs, from one eval-mode forward of one image (None for an
    empty batch); refuses outputs that are not logits (N, C)."""
    if len(x) == 0:
        return None
    with A.eval_mode(model), torch.no_grad():
        z = model(to_float(x[:1].to(device)))
    return V.logits(where, z, 1)


def _inputs(where: str, model, x, y, *, ndim: int | None, device) -> tuple[torch.device,
                                                                           int | None]:
    """The checks every evaluation entry point shares, in order: the model, the device, the
    images and labels (one host sync), then the labels against the model's outputs."""
    V.module(where, "model", model)
    device = V.device(where, "device", device)
    device = _model_device(model) if device is None else device
    y_range = V.batch(where, x, y, allow_uint8=True, ndim=ndim, min_ndim=2)
    n_cls = _num_classes(where, model.to(device), x, device)
    if n_cls is not None:
        V.classes(where, y_range, n_cls)
    return device, n_cls


# ----------------------------------------------------------------------------- results

@dataclass
class EvalResult:
    """Per-example correctness: ``clean`` and one array per attack (each already AND-ed with
    ``clean``: a point misclassified without attack is not robust). ``info[name]`` says how
    each entry was produced (attack settings, threat model, AutoAttack version, warnings)."""

    clean: np.ndarray
    per_attack: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.clean)

    @property
    def worst(self) -> np.ndarray:
        """Correct under every attack (and clean): the per-example worst case."""
        return np.logical_and.reduce([self.clean, *self.per_attack.values()])

    def accuracy(self) -> dict[str, float]:
        acc = {"clean": float(self.clean.mean())}
        acc.update({k: float(v.mean()) for k, v in self.per_attack.items()})
        acc["worst"] = float(self.worst.mean())
        return acc

    def merge(self, other: "EvalResult") -> "EvalResult":
        """Combine two evaluations of the same examples (e.g. PGD and AutoAttack)."""
        if not np.array_equal(self.clean, other.clean):
            raise ValueError("clean correctness differs: not the same model/examples")
        clash = set(self.per_attack) & set(other.per_attack)
        if clash:
            raise ValueError(f"both results have attacks {sorted(clash)}")
        return EvalResult(self.clean, {**self.per_attack, **other.per_attack},
                          {**self.info, **other.info})

    def to_dict(self) -> dict:
        """JSON-able: accuracies, settings, and the per-example arrays as 0/1 lists."""
        return {"n": self.n, "accuracy": self.accuracy(), "info": self.info,
                "per_example": {"clean": self.clean.astype(int).tolist(),
                                **{k: v.astype(int).tolist() for k, v in self.per_attack.items()}}}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        ex = {k: np.asarray(v, dtype=bool) for k, v in d["per_example"].items()}
        clean = ex.pop("clean")
        return cls(clean, ex, d.get("info", {}))

    def __str__(self) -> str:
        return "  ".join(f"{k} {100 * v:.2f}%" for k, v in self.accuracy().items()) + \
            f"  (n={self.n})"


# ----------------------------------------------------------------------------- evaluation

def _check_threat(x_adv, x, threat, name):
    norm, eps = _norms(threat[0])[0], float(threat[1])
    d = (x_adv - x).flatten(1).float()
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    # tolerance: float32 rounding of x +- eps, nothing more
    if (size > eps * (1 + 1e-5) + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
        raise AssertionError(f"attack {name!r} left the threat model ({norm}, eps={eps}): "
                             f"max size {size.max().item():.6g}, range "
                             f"[{x_adv.min().item():.4g}, {x_adv.max().item():.4g}]")


def _describe(attack) -> str:
    """Provenance: 'repro.attacks.pgd(eps=0.03137, steps=10, ...)' for a functools.partial
    (the way to pass settings), else the callable's name."""
    if isinstance(attack, functools.partial):
        val = lambda v: (f"Generator(seed={v.initial_seed()})"  # noqa: E731
                         if isinstance(v, torch.Generator) else repr(v))
        args = [val(a) for a in attack.args] + [f"{k}={val(v)}" for k, v in attack.keywords.items()]
        return f"{_describe(attack.func)}({', '.join(args)})"
    name = getattr(attack, "__qualname__", type(attack).__qualname__)
    return f"{getattr(attack, '__module__', '')}.{name}".lstrip(".")


@A.float32()
def predict(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 512,
            device=None) -> torch.Tensor:
    """Eval-mode argmax predictions (on the CPU) for uint8 or float images in [0, 1]
    (``ValueError`` otherwise, see ``repro.attacks.check_images``). ``batch_size`` >= 1;
    ``device``: None (the model's), 'auto', 'cpu', 'cuda[:N]', 'mps' or a torch.device."""
    W = "evaluate.predict"
    V.module(W, "model", model)
    batch_size = V.count(W, "batch_size", batch_size)
    device = V.device(W, "device", device)
    V.images(W, x, allow_uint8=True, ndim=None, min_ndim=2)
    device = _model_device(model) if device is None else device
    out = []
    with A.eval_mode(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(to_float(x[i:i + batch_size].to(device))).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@A.float32()
def robust_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                attacks: Mapping[str, Attack] | Sequence[Attack], *, batch_size: int = 256,
                device=None, progress: bool = True,
                threat: tuple[str, float] | None = None) -> EvalResult:
    """Clean accuracy and accuracy under each ``attack(model, x, y) -> x_adv``, per example.

    ``x``: uint8 or float images in [0, 1] (any device; batches are moved to ``device``,
    default the model's device, where the model is moved as well). ``threat=(norm, eps)``
    asserts that every adversarial batch stays in that ball and in [0, 1]. Float images
    outside [0, 1] (normalised, or 0..255) raise ``ValueError`` before any work, and so do
    labels that are not int64 (N,) class indices of the model, attacks that are not
    callables (a mapping needs string names), ``batch_size`` < 1, a bad ``threat`` or an
    unknown ``device``.
    """
    W = "evaluate.robust_eval"
    batch_size = V.count(W, "batch_size", batch_size)
    V.flag(W, "progress", progress)
    if threat is not None:
        if not isinstance(threat, (tuple, list)) or len(threat) != 2:
            raise TypeError(f"{W}: threat must be None or a pair (norm, eps), got "
                            f"{V._show(threat)}")
        threat = (_norms(threat[0], W, "threat[0] (norm)")[0],
                  V.nonneg(W, "threat[1] (eps)", threat[1]))
    if isinstance(attacks, Mapping):
        for k, a in attacks.items():
            if not isinstance(k, str):
                raise TypeError(f"{W}: attacks must map string names to attacks, got the key "
                                f"{k!r} ({type(k).__name__})")
            if not callable(a):
                raise TypeError(f"{W}: attacks[{k!r}] must be a callable attack(model, x, y) "
                                f"-> x_adv, got {type(a).__name__}")
    elif isinstance(attacks, (list, tuple)):
        for i, a in enumerate(attacks):
            if not callable(a):
                raise TypeError(f"{W}: attacks[{i}] must be a callable attack(model, x, y) -> "
                                f"x_adv, got {type(a).__name__}")
    else:
        raise TypeError(f"{W}: attacks must be a mapping name -> attack or a list of "
                        f"attacks, got {type(attacks).__name__}")
    device, _ = _inputs(W, model, x, y, ndim=None, device=device)
    if not isinstance(attacks, Mapping):
        names = [getattr(a, "__name__", type(a).__name__) for a in attacks]
        attacks = {(n if names.count(n) == 1 else f"{n}#{i}"): a
                   for i, (n, a) in enumerate(zip(names, attacks))}
    clean, per = [], {k: [] for k in attacks}
    bar = tqdm(total=len(y), desc="robust eval", unit="img", disable=not progress)
    for i in range(0, len(y), batch_size):
        xb = to_float(x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        with A.eval_mode(model), torch.no_grad():
            ok = model(xb).argmax(1) == yb
        clean.append(ok.cpu())
        for name, attack in attacks.items():
            x_adv = attack(model, xb, yb)
            if threat is not None:
                _check_threat(x_adv, xb, threat, name)
            with A.eval_mode(model), torch.no_grad():
                per[name].append((ok & (model(x_adv).argmax(1) == yb)).cpu())
        bar.update(len(yb))
        bar.set_postfix({k: f"{torch.cat(v).float().mean():.3f}" for k, v in
                         [("clean", clean), *per.items()]}, refresh=False)
    bar.close()
    cat = lambda v: torch.cat(v).numpy() if v else np.zeros(0, dtype=bool)
    info = {k: {"attack": _describe(a), "threat": list(threat) if threat else None}
            for k, a in attacks.items()}
    return EvalResult(cat(clean), {k: cat(v) for k, v in per.items()}, info)


# ----------------------------------------------------------------------------- AutoAttack

class _Capture(logging.Handler):
    """Collects AutoAttack's own warnings (its checks.py flags) into the result."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@A.float32()
def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               norm: str = "Linf", version: str = "standard", batch_size: int = 500,
               device=None, seed: int = 0, n_iter: int | None = None,
               n_target_classes: int | None = None, square_queries: int | None = None,
               verbose: bool = False) -> EvalResult:
    """Robust accuracy under the official AutoAttack (``pyautoattack``), per example.

    ``version``: 'standard' (APGD-CE, APGD-T, FAB-T, Square) or 'fast' (APGD-CE with one
    restart + APGD-T, i.e. AutoAttack's ``version='custom'`` with those two attacks).
    ``n_iter`` / ``n_target_classes`` / ``square_queries`` override AutoAttack's fixed
    budgets; the result key then reads ``autoattack-<version>-modified`` and ``info`` lists
    the overrides. AutoAttack's own check warnings are kept in ``info``.

    Fewer than 4 classes: APGD-T cannot run (its targeted DLR loss divides by the gap to the
    4th-largest logit; the package fails with an IndexError), so it is left out, the key
    reads ``-modified`` and ``info["dropped"]`` says why; FAB-T then targets the n-1 other
    classes. Fewer than 2 classes raise ``ValueError``. Float images outside [0, 1] raise
    ``ValueError`` (``repro.attacks.check_images``).

    Validated first: ``eps`` finite > 0; ``norm`` 'Linf' | 'L2' (any case); ``version``;
    ``batch_size`` >= 1; ``seed`` int >= 0; ``n_iter``, ``square_queries`` None or >= 1;
    ``n_target_classes`` None or in [1, classes - 1]; ``verbose`` a bool; ``x`` (N, C, H, W)
    uint8 or float in [0, 1]; ``y`` int64 (N,) in [0, classes); ``device``.
    """
    from pyautoattack import AutoAttack

    W = "evaluate.autoattack"
    eps = V.positive(W, "eps", eps)
    _, aa_norm = _norms(norm, W)
    version = V.choice(W, "version", version, ("standard", "fast"))
    batch_size = V.count(W, "batch_size", batch_size)
    seed = V.count(W, "seed", seed, min=0)
    n_iter = V.count(W, "n_iter", n_iter, none=True)
    n_target_classes = V.count(W, "n_target_classes", n_target_classes, none=True)
    square_queries = V.count(W, "square_queries", square_queries, none=True)
    V.flag(W, "verbose", verbose)
    V.module(W, "model", model)
    device = V.device(W, "device", device)
    device = _model_device(model) if device is None else device
    y_range = V.batch(W, x, y, allow_uint8=True, ndim=4)
    model.to(device)
    n_cls = _num_classes(W, model, x, device)
    if n_cls is not None and n_cls < 2:
        raise ValueError(f"evaluate.autoattack: the model has {n_cls} output; AutoAttack "
                         f"needs logits for at least 2 classes")
    if n_cls is not None:
        V.classes(W, y_range, n_cls)
        if n_target_classes is not None:
            V.count(W, "n_target_classes", n_target_classes, min=1, max=n_cls - 1)
    xf = to_float(x).float()
    clean = predict(model, xf, batch_size=batch_size, device=device) == y.cpu()
    with A.eval_mode(model):
        if version == "standard":
            aa = AutoAttack(model, norm=aa_norm, eps=eps, version="standard", device=device,
                            seed=seed)
        else:
            aa = AutoAttack(model, norm=aa_norm, eps=eps, version="custom", device=device,
                            seed=seed, attacks=["apgd-ce", "apgd-t"])
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_restarts = 1
            aa.apgd_targeted.n_target_classes = 9
        # fewer classes than AutoAttack's 9 targets (e.g. a 5-class toy): use all of them
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_cls - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_cls - 1)
        dropped = {}
        if n_cls < 4 and "apgd-t" in aa.attacks_to_run:
            aa.attacks_to_run = [a for a in aa.attacks_to_run if a != "apgd-t"]
            dropped["apgd-t"] = (f"needs at least 4 classes (targeted DLR loss); the model "
                                 f"has {n_cls}")
        overrides = {}
        if n_iter is not None:
            aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = overrides["n_iter"] = n_iter
        if n_target_classes is not None:
            aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = n_target_classes
            overrides["n_target_classes"] = n_target_classes
        if square_queries is not None:
            aa.square.n_queries = overrides["square_queries"] = square_queries
        capture = _Capture()
        aa.logger.addHandler(capture)
        old_level, old_prop = aa.logger.level, aa.logger.propagate
        aa.logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
        aa.logger.propagate = verbose  # when quiet, warnings go to the result, not stderr
        if verbose:
            aa.logger.addHandler(handler := logging.StreamHandler())
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            # AutoAttack reseeds torch's global RNG; keep the caller's stream untouched
            with torch.random.fork_rng(devices=devices):
                _, y_adv = aa.run_standard_evaluation(xf, y.to(xf.device), batch_size=batch_size)
        finally:
            aa.logger.removeHandler(capture)
            if verbose:
                aa.logger.removeHandler(handler)
            aa.logger.setLevel(old_level)
            aa.logger.propagate = old_prop
    key = f"autoattack-{version}" + ("-modified" if overrides or dropped else "")
    robust = clean.numpy() & (y_adv.cpu() == y.cpu()).numpy()
    info = {"package": "pyautoattack", "version": version, "norm": aa_norm, "eps": eps,
            "attacks": list(aa.attacks_to_run), "seed": seed, "overrides": overrides,
            "dropped": dropped, "warnings": capture.messages}
    return EvalResult(clean.numpy(), {key: robust}, {key: info})


# The sanity checks live in repro.sanity (one concept per module); their public names stay
# reachable from here, where the chapters and the book have always found them (a lazy
# attribute: repro.sanity imports this module).
_SANITY = ("Check", "SanityReport", "check_dynamic", "check_randomized", "check_softmax_output",
           "sanity_report", "zero_gradient_fraction")


def __getattr__(name: str):
    if name in _SANITY:
        from repro import sanity
        return getattr(sanity, name)
    raise AttributeError(f"module 'repro.evaluate' has no attribute {name!r}")
