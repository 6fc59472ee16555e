"""Clean and robust accuracy, official AutoAttack, and gradient-masking sanity checks.

Results keep per-example correctness (numpy bool arrays) rather than only percentages: robust
accuracy is the per-example worst case over attacks, and later chapters (BAT's atypical
samples) need to know *which* examples survived. Every AutoAttack result says which version
(and any deviation from it) produced it.

Every entry point here computes in fp32, also when called inside a bf16 autocast (for
instance from a training loop's validation): ``predict``, ``robust_eval`` (with the attacks
it is given), ``autoattack``, ``zero_gradient_fraction`` and ``sanity_report`` switch off
any autocast around their work (``repro.attacks.float32``). A bf16 attack can be weaker and
overstate robustness; training attacks may use bf16, reported numbers do not.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # plain text bars: tqdm.auto warns in notebooks without ipywidgets

from repro import attacks as A
from repro.data import to_float

Attack = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _norms(norm: str) -> tuple[str, str]:
    """('linf'|'l2' for repro.attacks, 'Linf'|'L2' for AutoAttack)."""
    n = norm.lower()
    if n not in ("linf", "l2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    return n, {"linf": "Linf", "l2": "L2"}[n]


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
    (``ValueError`` otherwise, see ``repro.attacks.check_images``)."""
    A.check_images(x, "evaluate.predict", allow_uint8=True)
    device = _model_device(model) if device is None else torch.device(device)
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
    outside [0, 1] (normalised, or 0..255) raise ``ValueError`` before any work.
    """
    A.check_images(x, "evaluate.robust_eval", allow_uint8=True)
    if not isinstance(attacks, Mapping):
        names = [getattr(a, "__name__", type(a).__name__) for a in attacks]
        attacks = {(n if names.count(n) == 1 else f"{n}#{i}"): a
                   for i, (n, a) in enumerate(zip(names, attacks))}
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device)
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
    """
    from pyautoattack import AutoAttack

    if version not in ("standard", "fast"):
        raise ValueError(f"version must be 'standard' or 'fast', got {version!r}")
    _, aa_norm = _norms(norm)
    A.check_images(x, "evaluate.autoattack", allow_uint8=True)
    device = _model_device(model) if device is None else torch.device(device)
    model.to(device)
    xf, y = to_float(x).float(), y.long()
    clean = predict(model, xf, batch_size=batch_size, device=device) == y.cpu()
    n_cls = None
    with A.eval_mode(model):
        with torch.no_grad():
            n_cls = model(xf[:1].to(device)).shape[1]
        if n_cls < 2:
            raise ValueError(f"evaluate.autoattack: the model has {n_cls} output; AutoAttack "
                             f"needs logits for at least 2 classes")
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


# ----------------------------------------------------------------------------- sanity checks

@dataclass
class Check:
    """One sanity check: what was observed, whether it passed, and what that suggests."""

    name: str
    passed: bool
    observed: dict
    message: str

    def __str__(self) -> str:
        return f"[{'ok' if self.passed else 'FLAG'}] {self.name}: {self.message}"


@dataclass
class SanityReport:
    checks: list[Check]
    accuracy: dict[str, float]
    settings: dict

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __getitem__(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def flags(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "accuracy": self.accuracy, "settings": self.settings,
                "checks": [vars(c) for c in self.checks]}

    def __str__(self) -> str:
        head = (f"Gradient-masking sanity report ({self.settings['norm']}, eps="
                f"{self.settings['eps']:.5g}, n={self.settings['n']}): "
                f"{'no flags' if self.passed else f'{len(self.flags())} flag(s)'}")
        accs = "  ".join(f"{k} {100 * v:.2f}%" for k, v in self.accuracy.items())
        return "\n".join([head, "  accuracy: " + accs, *("  " + str(c) for c in self.checks)])


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


@A.float32()
def zero_gradient_fraction(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                           batch_size: int = 256, device=None) -> float:
    """Fraction of examples whose cross-entropy input-gradient is exactly zero (uint8 or
    float images in [0, 1])."""
    A.check_images(x, "evaluate.zero_gradient_fraction", allow_uint8=True)
    device = _model_device(model) if device is None else torch.device(device)
    zero = 0
    with A.eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb = to_float(x[i:i + batch_size].to(device)).requires_grad_(True)
            loss = F.cross_entropy(model(xb).float(), y[i:i + batch_size].to(device),
                                   reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            zero += int((g.flatten(1).abs().sum(1) == 0).sum())
    return zero / max(1, len(y))


@A.float32()
def sanity_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  norm: str = "Linf", steps: int = 10, loss: str = "ce",
                  large_eps: float | None = None, aa_version: str = "fast",
                  aa_n_iter: int | None = None, square_queries: int = 1000,
                  tol: float = 0.01, gap_tol: float = 0.05, batch_size: int = 256,
                  device=None, seed: int = 0, progress: bool = False) -> SanityReport:
    """Flag signs of gradient masking (after AutoAttack's checks.py and Carlini et al. 2019).

    Runs PGD-``steps`` and PGD-10x``steps`` (same random starts), PGD at ``large_eps``
    (default: the whole [0,1] box), AutoAttack (``aa_version``), Square (black-box,
    ``square_queries``) and an input-gradient census, then checks: large eps -> ~0 accuracy;
    more steps never help the model; AutoAttack <= PGD; PGD not far above AutoAttack
    (``gap_tol``); Square no better than white-box; no zero gradients. ``tol`` absorbs noise.
    """
    from pyautoattack.square import SquareAttack

    A.check_images(x, "evaluate.sanity_report", allow_uint8=True)
    lnorm, aa_norm = _norms(norm)
    n = len(y)
    tol = max(tol, 1.0 / max(1, n))  # one example can always flip
    dim = math.prod(x.shape[1:])
    if large_eps is None:  # a ball that contains the whole box: any label is reachable
        large_eps = 1.0 if lnorm == "linf" else math.sqrt(dim)
    device = _model_device(model) if device is None else torch.device(device)

    def pgd_attack(e, k, alpha):
        g = torch.Generator().manual_seed(seed)
        return lambda m, xb, yb: A.pgd(m, xb, yb, eps=e, alpha=alpha, steps=k, norm=lnorm,
                                       loss=loss, random_start=True, generator=g)

    sq = SquareAttack(lambda z: model(z), norm=aa_norm, n_queries=square_queries, eps=eps,
                      p_init=0.8, n_restarts=1, seed=seed, verbose=False, device=device,
                      resc_schedule=square_queries != 5000)

    def square(m, xb, yb):
        devices = [device.index or 0] if device.type == "cuda" else []
        with A.eval_mode(m), torch.no_grad(), torch.random.fork_rng(devices=devices):
            return sq.perturb(xb, yb)

    k_few, k_many = steps, 10 * steps
    attacks = {f"pgd-{k_few}": pgd_attack(eps, k_few, 2.5 * eps / k_few),
               f"pgd-{k_many}": pgd_attack(eps, k_many, 2.5 * eps / k_many),
               "pgd-large-eps": pgd_attack(large_eps, 5 * k_few, 2.5 * large_eps / k_few),
               "square": square}
    res = robust_eval(model, x, y, attacks, batch_size=batch_size, device=device,
                      progress=progress)
    aa = autoattack(model, x, y, eps=eps, norm=aa_norm, version=aa_version,
                    batch_size=batch_size, device=device, seed=seed, n_iter=aa_n_iter)
    res = res.merge(aa)
    acc = res.accuracy()
    del acc["worst"]  # would include the large-eps attack, which is a probe, not a threat
    aa_key = next(iter(aa.per_attack))
    a_few, a_many = acc[f"pgd-{k_few}"], acc[f"pgd-{k_many}"]
    a_pgd, a_aa, a_large, a_sq = min(a_few, a_many), acc[aa_key], acc["pgd-large-eps"], acc["square"]
    white = res.clean & res.per_attack[f"pgd-{k_few}"] & res.per_attack[f"pgd-{k_many}"] & \
        res.per_attack[aa_key]
    a_white = float(white.mean())
    only_square = float((white & ~res.per_attack["square"]).mean())
    acc["white-box worst"] = a_white
    zero_frac = zero_gradient_fraction(model, x, y, batch_size=batch_size, device=device)

    checks = []
    ok = a_large <= tol
    checks.append(Check("large_eps", ok, {"eps": large_eps, "accuracy": a_large}, (
        f"PGD at eps={large_eps:.4g} leaves {_pct(a_large)} correct" +
        (": the attack reaches ~0 as it should." if ok else
         ": a ball this large contains images of every class, so gradients are not guiding "
         "the attack (masked/obfuscated gradients, saturated softmax, or a broken attack). "
         "Gradient-based robust accuracy is not trustworthy."))))
    ok = a_many <= a_few + tol
    checks.append(Check("more_steps", ok, {f"pgd-{k_few}": a_few, f"pgd-{k_many}": a_many}, (
        f"PGD-{k_many} {_pct(a_many)} vs PGD-{k_few} {_pct(a_few)}" +
        (": more iterations do not help the model." if ok else
         ": more iterations *raise* accuracy, so the attack does not converge (noisy or "
         "masked gradients, step size too large). Tune the attack before trusting numbers."))))
    ok = a_aa <= a_pgd + tol
    checks.append(Check("autoattack_not_above_pgd", ok, {"autoattack": a_aa, "pgd": a_pgd}, (
        f"{aa_key} {_pct(a_aa)} vs best PGD {_pct(a_pgd)}" +
        (": AutoAttack is at least as strong, as expected." if ok else
         ": AutoAttack is weaker than plain PGD, which is unusual: check for randomness in "
         "the model, softmax outputs instead of logits, or a reduced AutoAttack budget."))))
    ok = a_pgd - a_aa <= gap_tol
    checks.append(Check("pgd_close_to_autoattack", ok, {"gap": a_pgd - a_aa}, (
        f"PGD overestimates AutoAttack by {100 * (a_pgd - a_aa):.2f} points" +
        (f" (<= {100 * gap_tol:.1f}): PGD is a fair proxy here." if ok else
         f" (> {100 * gap_tol:.1f}): the {loss!r}-loss PGD is weak on this model (e.g. scaled "
         "or cosine logits as in HE, or masked gradients). Report AutoAttack numbers."))))
    ok = a_sq >= a_white - tol
    checks.append(Check("blackbox_not_better", ok, {"square": a_sq, "white_box": a_white,
                                                    "only_square_fools": only_square}, (
        f"Square ({square_queries} queries) {_pct(a_sq)} vs white-box worst case "
        f"{_pct(a_white)}; Square alone fools {_pct(only_square)} of examples" +
        ("." if ok else
         ": a black-box attack beats gradient attacks, the signature of gradient masking. "
         "White-box robust accuracy is overestimated."))))
    ok = zero_frac == 0
    checks.append(Check("zero_gradients", ok, {"fraction": zero_frac}, (
        f"{_pct(zero_frac)} of examples have an exactly zero input gradient" +
        ("." if ok else
         ": gradient attacks cannot move these points (saturated softmax in float32, "
         "non-differentiable layers); use margin/DLR losses (AutoAttack) or fix the model."))))
    settings = {"norm": aa_norm, "eps": eps, "n": n, "steps": [k_few, k_many], "loss": loss,
                "large_eps": large_eps, "autoattack": aa.info[aa_key],
                "square_queries": square_queries, "tol": tol, "gap_tol": gap_tol, "seed": seed}
    return SanityReport(checks, acc, settings)
