"""Gradient-masking sanity checks: the checklist of Carlini et al. 2019 ("On Evaluating
Adversarial Robustness") and AutoAttack's ``checks.py`` as one report (``sanity_report``), plus
the model-level checks it runs (randomized, softmax-output and dynamic defences). Split from
``repro.evaluate``, which re-exports every public name here. Like ``repro.evaluate``, every
entry point computes in fp32 and validates its arguments first (``book/validation.md``).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from repro import attacks as A
from repro import validate as V
from repro.data import to_float
from repro.evaluate import EvalResult, _inputs, _model_device, _norms, autoattack, robust_eval

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
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; the report has {[c.name for c in self.checks]}")

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
    float images in [0, 1]; labels int64 in [0, classes); ``batch_size`` >= 1)."""
    W = "evaluate.zero_gradient_fraction"
    batch_size = V.count(W, "batch_size", batch_size)
    device, _ = _inputs(W, model, x, y, ndim=None, device=device)
    zero = 0
    with A.eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb = to_float(x[i:i + batch_size].to(device)).requires_grad_(True)
            loss = F.cross_entropy(model(xb).float(), y[i:i + batch_size].to(device),
                                   reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
            zero += int((g.flatten(1).abs().sum(1) == 0).sum())
    return zero / max(1, len(y))


# ----------------------------------------------------------------------------- model checks
# Properties of the model itself (no attack), after AutoAttack's checks.py: a randomized
# defence (check_randomized), probabilities instead of logits (check_range_output) and a
# forward pass that runs autograd (check_dynamic). Each returns a Check with its numbers.

def _first_batch(where, model, x, batch_size, device):
    V.module(where, "model", model)
    batch_size = V.count(where, "batch_size", batch_size)
    device = V.device(where, "device", device)
    device = _model_device(model) if device is None else device
    return device, batch_size


@A.float32()
def check_randomized(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     passes: int = 5, batch_size: int = 256, device=None,
                     alpha: float = 1e-4) -> Check:
    """Randomized defence: ``passes`` eval-mode forward passes of the first ``batch_size``
    images; flagged when any two outputs differ (L2 distance of the L2-normalised outputs
    above ``alpha``) or the number of correct predictions changes (AutoAttack's
    ``check_randomized``; Carlini et al. 2019, §4.6 "Properly Ensemble over Randomness").
    A randomized model needs attacks that average gradients over its randomness (EOT) and
    AutoAttack's ``version='rand'``: fixed-randomness attacks overstate its robustness."""
    W = "evaluate.check_randomized"
    device, batch_size = _first_batch(W, model, x, batch_size, device)
    passes = V.count(W, "passes", passes, min=2)
    alpha = V.nonneg(W, "alpha", alpha)
    V.batch(W, x, y, allow_uint8=True, ndim=None, min_ndim=2)
    xb = to_float(x[:batch_size].to(device))
    yb = y[:batch_size].to(device)
    outs, correct = [], []
    with A.eval_mode(model), torch.no_grad():
        for _ in range(passes):
            z = model(xb).float()
            V.logits(W, z, len(xb))
            correct.append(int((z.argmax(1) == yb).sum()))
            outs.append(z / (z.flatten(1).norm(dim=1).view(-1, 1) + 1e-10))
    diff = max(((outs[i] - outs[j]).flatten(1).norm(dim=1).max().item()
                for i in range(passes) for j in range(i + 1, passes)), default=0.0)
    flips = sum(int((o.argmax(1) != outs[0].argmax(1)).sum()) for o in outs[1:])
    ok = diff <= alpha and len(set(correct)) == 1
    return Check("randomized_defence", ok, {
        "passes": passes, "n": len(xb), "max_output_change": diff, "alpha": alpha,
        "correct_per_pass": correct, "prediction_changes": flips}, (
        f"{passes} eval-mode forward passes of {len(xb)} images: largest change of the "
        f"normalised output {diff:.3g} (threshold {alpha:g}), correct per pass {correct}" +
        (": the model is deterministic." if ok else
         ": the model is randomized at inference (a randomized defence, or dropout/noise "
         "left active in eval mode). Gradient attacks with fixed randomness overstate its "
         "robustness: attack with EOT (average the gradient over many draws) and evaluate "
         "with AutoAttack's version='rand'.")))


@A.float32()
def check_softmax_output(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                         device=None, alpha: float = 1e-5) -> Check:
    """Probabilities instead of logits: flagged when every output of the first
    ``batch_size`` images lies in [0, 1] and every row sums to 1 (within ``alpha``), as in
    AutoAttack's ``check_range_output``. Attacks then treat probabilities as logits: the
    model's own softmax saturates on confident predictions (vanishing, in float32 often
    exactly zero, input gradients) and the loss barely moves, which masks gradients (Carlini
    et al. 2019, §2.5 "Adaptive Adversaries": change the loss as appropriate)."""
    W = "evaluate.check_softmax_output"
    device, batch_size = _first_batch(W, model, x, batch_size, device)
    alpha = V.nonneg(W, "alpha", alpha)
    V.images(W, x, allow_uint8=True, ndim=None, min_ndim=2)
    with A.eval_mode(model), torch.no_grad():
        z = model(to_float(x[:batch_size].to(device))).float()
    V.logits(W, z, min(len(x), batch_size))
    lo, hi = z.min().item(), z.max().item()
    row = (z.sum(1) - 1).abs().max().item()
    prob = lo > -alpha and hi < 1 + alpha and row < alpha
    return Check("softmax_output", not prob, {"min": lo, "max": hi,
                                              "max_row_sum_error": row, "alpha": alpha}, (
        f"outputs in [{lo:.4g}, {hi:.4g}], row sums differ from 1 by up to {row:.3g}" +
        (": the model returns probabilities, not logits. Attacks on probabilities see "
         "saturated, vanishing gradients: remove the final softmax (or attack the logits)."
         if prob else ": the outputs are logits.")))


_AUTOGRAD_NAMES = ("grad", "backward", "_make_grads", "vjp", "jvp")


@A.float32()
def check_dynamic(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                  device=None) -> Check:
    """Dynamic defence: flagged when one forward pass of the first ``batch_size`` images
    calls autograd (``torch.autograd.grad``/``backward``), i.e. the model runs its own
    optimisation at inference (test-time purification, an attack inside the defence), as
    AutoAttack's ``check_dynamic`` detects by tracing the calls. Such a defence needs an
    adaptive attack (Carlini et al. 2019, §2.5 "Adaptive Adversaries"; BPDA, §4.7)."""
    W = "evaluate.check_dynamic"
    device, batch_size = _first_batch(W, model, x, batch_size, device)
    V.images(W, x, allow_uint8=True, ndim=None, min_ndim=2)
    xb = to_float(x[:batch_size].to(device))
    calls: list[str] = []
    previous = sys.gettrace()
    marker = f"{os.sep}torch{os.sep}"

    def tracer(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code.co_name in _AUTOGRAD_NAMES and marker in code.co_filename and \
                    ("autograd" in code.co_filename or code.co_filename.endswith("_tensor.py")):
                calls.append(code.co_name)
        return previous(frame, event, arg) if previous is not None else None

    with A.eval_mode(model):  # gradients enabled, as the defence would see them
        sys.settrace(tracer)
        try:
            model(xb)
        finally:
            sys.settrace(previous)
    ok = not calls
    return Check("dynamic_defence", ok, {"autograd_calls": len(calls),
                                         "functions": sorted(set(calls))}, (
        f"one forward pass makes {len(calls)} autograd call(s)" +
        ("." if ok else f" ({', '.join(sorted(set(calls)))}): the defence computes gradients "
         "at inference (a dynamic defence). Standard attacks do not differentiate through "
         "that inner optimisation: design an adaptive attack before trusting any number.")))


# ----------------------------------------------------------------------------- sanity report

def _noise_attack(eps: float, norm: str, samples: int, seed: int):
    """Random search on the sphere of radius ``eps`` (L-inf: eps times random signs, a
    vertex of the cube; L2: a random direction), clamped to [0, 1]; per example the first
    sample that fools the model (Carlini et al. 2019, §4.11)."""
    gens: dict = {}

    def attack(m, xb, yb):
        g = gens.get(xb.device)
        if g is None:
            g = gens[xb.device] = torch.Generator(device=xb.device).manual_seed(seed)
        best, found = xb.clone(), torch.zeros(len(xb), dtype=torch.bool, device=xb.device)
        shape1 = (-1,) + (1,) * (xb.dim() - 1)
        with A.eval_mode(m), torch.no_grad():
            for _ in range(samples):
                d = torch.randn(xb.shape, generator=g, device=xb.device)
                d = eps * (d.sign() if norm == "linf" else
                           d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape1))
                xa = (xb + d.to(xb.dtype)).clamp(0, 1)  # clamping stays in the ball
                new = (m(xa).argmax(1) != yb) & ~found
                best = torch.where(new.view(shape1), xa, best)
                found |= new
        return best
    return attack


# Verdicts of the attack-based checks added to the report: pure functions of the measured
# accuracies, so each one's pass/fail rule is stated (and tested) in one place.

def _n_classes_check(n_cls: int | None, dropped: dict) -> Check:
    ok = n_cls is None or (n_cls >= 4 and not dropped)
    return Check("n_classes", ok, {"classes": n_cls, "dropped": dropped}, (
        f"the model has {n_cls} classes" +
        (": every AutoAttack attack applies." if ok else
         ": AutoAttack's targeted DLR loss needs 4 classes, so its evaluation is reduced "
         f"(left out: {', '.join(dropped) or 'none'}); strengthen it with other attacks "
         "(AutoAttack's check_n_classes).")))


def _single_step_check(a_single: float, a_pgd: float, tol: float) -> Check:
    ok = a_pgd <= a_single + tol
    return Check("single_step_not_better", ok, {"single_step": a_single, "pgd": a_pgd}, (
        f"iterative PGD {_pct(a_pgd)} vs one gradient step {_pct(a_single)}" +
        (": iterating helps the attack, as it must." if ok else
         ": a single step is stronger than PGD, so the iterative attack is broken or its "
         "gradients are masked (Carlini et al. 2019, §5.2).")))


def _steps_check(k: int, a_k: float, k2: int, a_k2: float, tol: float) -> Check:
    ok = a_k - a_k2 <= tol
    return Check("steps_converged", ok, {f"pgd-{k}": a_k, f"pgd-{k2}": a_k2,
                                         "drop": a_k - a_k2}, (
        f"PGD-{k2} {_pct(a_k2)} vs PGD-{k} {_pct(a_k)}" +
        (": doubling the steps does not help the attack, it has converged." if ok else
         f": doubling the steps lowers accuracy by {100 * (a_k - a_k2):.2f} points, so "
         f"PGD-{k} has not converged; use more steps (Carlini et al. 2019, §4.8).")))


def _restarts_check(k: int, restarts: int, key: str, a_one: float, a_restarts: float,
                    tol: float) -> Check:
    ok = a_one - a_restarts <= tol
    return Check("restarts_converged", ok, {f"pgd-{k}": a_one, key: a_restarts,
                                            "drop": a_one - a_restarts}, (
        f"PGD-{k} with {restarts} restarts {_pct(a_restarts)} vs one start {_pct(a_one)}" +
        (": more random starts do not help the attack." if ok else
         f": {restarts} restarts lower accuracy by {100 * (a_one - a_restarts):.2f} points, so "
         "the attack finds sub-optimal maxima; report the worst over more restarts "
         "(Carlini et al. 2019, §4.9).")))


def _eps_monotone_check(curve: Sequence[tuple[float, float]], tol: float) -> Check:
    curve = sorted(curve, key=lambda p: (p[0], -p[1]))  # equal budgets: no false "rise"
    rise = max((b[1] - a[1] for a, b in zip(curve, curve[1:])), default=0.0)
    ok = rise <= tol
    return Check("eps_monotone", ok, {"eps": [e for e, _ in curve],
                                      "accuracy": [a for _, a in curve],
                                      "largest_rise": rise}, (
        "accuracy vs eps " + ", ".join(f"{e:.4g}: {_pct(a)}" for e, a in curve) +
        (": never rises with the budget." if ok else
         f": rises by {100 * rise:.2f} points with a larger budget, so the attack is flawed "
         "or gradients are masked (Carlini et al. 2019, §5.2-5.3).")))


def _random_noise_check(white: np.ndarray, noise_ok: np.ndarray, samples: int,
                        tol: float) -> Check:
    only = float((white & ~noise_ok).mean()) if len(white) else 0.0
    a_noise = float(noise_ok.mean()) if len(noise_ok) else 0.0
    ok = only <= tol
    return Check("random_noise_not_better", ok, {
        "random_noise": a_noise, "white_box": float(white.mean()) if len(white) else 0.0,
        "only_noise_fools": only, "samples": samples}, (
        f"{samples} random points on the eps-sphere per example: {_pct(a_noise)} correct; "
        f"noise alone fools {_pct(only)} of examples" +
        ("." if ok else
         ": random search finds adversarial examples the gradient attacks miss, so the "
         "gradients are masked (Carlini et al. 2019, §4.11).")))


def _transfer_check(white: np.ndarray, transfer_ok: np.ndarray, steps: int,
                    tol: float) -> Check:
    only = float((white & ~transfer_ok).mean()) if len(white) else 0.0
    a_tr = float(transfer_ok.mean()) if len(transfer_ok) else 0.0
    ok = only <= tol
    return Check("transfer_not_better", ok, {
        "transfer": a_tr, "white_box": float(white.mean()) if len(white) else 0.0,
        "only_transfer_fools": only}, (
        f"PGD-{steps} transferred from the surrogate {_pct(a_tr)} correct; it alone fools "
        f"{_pct(only)} of examples" +
        ("." if ok else
         ": a transfer attack beats white-box attacks on the model itself, the signature "
         "of gradient masking (Carlini et al. 2019, §4.5, §5.4).")))


@A.float32()
def sanity_report(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  norm: str = "Linf", steps: int = 10, loss: str = "ce",
                  large_eps: float | None = None, aa_version: str = "fast",
                  aa_n_iter: int | None = None, square_queries: int = 1000,
                  tol: float = 0.01, gap_tol: float = 0.05, batch_size: int = 256,
                  device=None, seed: int = 0, progress: bool = False, restarts: int = 2,
                  eps_factors: Sequence[float] = (0.5, 2.0), noise_samples: int = 100,
                  random_passes: int = 5,
                  surrogate: torch.nn.Module | None = None) -> SanityReport:
    """Flag signs of gradient masking: the checklist of Carlini et al. 2019 ("On Evaluating
    Adversarial Robustness", §3 and the sections it points to) and AutoAttack's checks.py.

    Attacks run (per example, through ``robust_eval``): PGD-``steps``, PGD-2x and 10x
    ``steps`` (same random starts), PGD-``steps`` with ``restarts`` restarts, a single
    gradient step (FGSM for L-inf), PGD at ``eps_factors`` x eps and at ``large_eps``
    (default: the whole [0,1] box), AutoAttack (``aa_version``), Square (black-box,
    ``square_queries``), ``noise_samples`` random points on the eps-sphere, and, given a
    ``surrogate`` model, PGD transferred from it. Checks, in this order (names are the keys
    of the report; the first six are the original ones and keep their meaning):

    * ``large_eps``: a ball containing the whole box brings accuracy to ~0;
    * ``more_steps``: 10x the steps never raises accuracy;
    * ``autoattack_not_above_pgd`` / ``pgd_close_to_autoattack`` (within ``gap_tol``);
    * ``blackbox_not_better``: Square no better than the white-box worst case;
    * ``zero_gradients``: no example has an exactly zero input gradient;
    * ``randomized_defence``, ``softmax_output``, ``dynamic_defence``: properties of the
      model (``check_randomized``, ``check_softmax_output``, ``check_dynamic``);
    * ``n_classes``: enough classes for every AutoAttack attack (targeted DLR needs 4);
    * ``single_step_not_better``: iterative PGD at least as strong as one gradient step;
    * ``steps_converged``: doubling the steps lowers accuracy by at most ``tol``;
    * ``restarts_converged``: ``restarts`` restarts lower accuracy by at most ``tol``;
    * ``eps_monotone``: accuracy never rises with eps (0, the ``eps_factors``, eps, large);
    * ``random_noise_not_better``: random noise fools no example the white-box attacks miss;
    * ``transfer_not_better`` (only with ``surrogate``): neither does the transfer attack.

    ``tol`` absorbs noise (at least one example). Every argument is validated first
    (``ValueError``/``TypeError`` naming it): eps, large_eps (>= eps) finite > 0; steps,
    square_queries, noise_samples >= 1; restarts, random_passes >= 2; tol, gap_tol in
    [0, 1]; eps_factors finite > 0; loss 'ce' | 'cw' | 'kl'; norm; aa_version; aa_n_iter;
    batch_size; seed >= 0; device; surrogate a Module or None; x (N, C, H, W) uint8 or float
    in [0, 1]; y int64 (N,) in [0, classes).
    """
    from pyautoattack.square import SquareAttack

    W = "evaluate.sanity_report"
    eps = V.positive(W, "eps", eps)
    lnorm, aa_norm = _norms(norm, W)
    steps = V.count(W, "steps", steps)
    loss = V.choice(W, "loss", loss, A.LOSSES)
    large_eps = V.positive(W, "large_eps", large_eps, none=True)
    if large_eps is not None and large_eps < eps:
        raise ValueError(f"{W}: large_eps must be >= eps ({eps:g}) or None, got {large_eps:g}")
    aa_version = V.choice(W, "aa_version", aa_version, ("standard", "fast"))
    aa_n_iter = V.count(W, "aa_n_iter", aa_n_iter, none=True)
    square_queries = V.count(W, "square_queries", square_queries)
    tol = V.in_range(W, "tol", tol, 0, 1)
    gap_tol = V.in_range(W, "gap_tol", gap_tol, 0, 1)
    batch_size = V.count(W, "batch_size", batch_size)
    seed = V.count(W, "seed", seed, min=0)
    V.flag(W, "progress", progress)
    restarts = V.count(W, "restarts", restarts, min=2)
    if isinstance(eps_factors, (str, bytes)) or not isinstance(eps_factors, (tuple, list)):
        raise TypeError(f"{W}: eps_factors must be a sequence of finite numbers > 0, got "
                        f"{V._show(eps_factors)}")
    eps_factors = tuple(V.positive(W, f"eps_factors[{i}]", f) for i, f in enumerate(eps_factors))
    noise_samples = V.count(W, "noise_samples", noise_samples)
    random_passes = V.count(W, "random_passes", random_passes, min=2)
    if surrogate is not None:
        V.module(W, "surrogate", surrogate)
    device, n_cls = _inputs(W, model, x, y, ndim=4, device=device)

    n = len(y)
    tol = max(tol, 1.0 / max(1, n))  # one example can always flip
    dim = math.prod(x.shape[1:])
    if large_eps is None:  # a ball that contains the whole box: any label is reachable
        large_eps = 1.0 if lnorm == "linf" else math.sqrt(dim)

    # properties of the model: cheap, and they explain the attack-based flags below
    model_checks = [
        check_randomized(model, x, y, passes=random_passes, batch_size=batch_size,
                         device=device),
        check_softmax_output(model, x, batch_size=batch_size, device=device),
        check_dynamic(model, x, batch_size=batch_size, device=device)]

    def pgd_attack(e, k, alpha, r=1, net=None):
        g = torch.Generator().manual_seed(seed)
        return lambda m, xb, yb: A.pgd(m if net is None else net, xb, yb, eps=e, alpha=alpha,
                                       steps=k, norm=lnorm, loss=loss, random_start=True,
                                       restarts=r, generator=g)

    sq = SquareAttack(lambda z: model(z), norm=aa_norm, n_queries=square_queries, eps=eps,
                      p_init=0.8, n_restarts=1, seed=seed, verbose=False, device=device,
                      resc_schedule=square_queries != 5000)

    def square(m, xb, yb):
        devices = [device.index or 0] if device.type == "cuda" else []
        with A.eval_mode(m), torch.no_grad(), torch.random.fork_rng(devices=devices):
            return sq.perturb(xb, yb)

    def single_step(m, xb, yb):  # FGSM for L-inf, one normalised gradient step for L2
        return A.pgd(m, xb, yb, eps=eps, alpha=eps, steps=1, norm=lnorm,
                     loss="ce" if loss == "kl" else loss, random_start=False)

    k_few, k_double, k_many = steps, 2 * steps, 10 * steps
    key_restarts = f"pgd-{k_few}x{restarts}-restarts"
    eps_keys = {f: f"pgd-{f:g}xeps" for f in eps_factors}
    attacks = {f"pgd-{k_few}": pgd_attack(eps, k_few, 2.5 * eps / k_few),
               f"pgd-{k_many}": pgd_attack(eps, k_many, 2.5 * eps / k_many),
               "pgd-large-eps": pgd_attack(large_eps, 5 * k_few, 2.5 * large_eps / k_few),
               "square": square,
               f"pgd-{k_double}": pgd_attack(eps, k_double, 2.5 * eps / k_double),
               key_restarts: pgd_attack(eps, k_few, 2.5 * eps / k_few, r=restarts),
               "single-step": single_step,
               **{eps_keys[f]: pgd_attack(f * eps, k_few, 2.5 * f * eps / k_few)
                  for f in eps_factors},
               "random-noise": _noise_attack(eps, lnorm, noise_samples, seed)}
    if surrogate is not None:
        surrogate.to(device)
        attacks["transfer"] = pgd_attack(eps, k_many, 2.5 * eps / k_many, net=surrogate)
    res = robust_eval(model, x, y, attacks, batch_size=batch_size, device=device,
                      progress=progress)
    aa = autoattack(model, x, y, eps=eps, norm=aa_norm, version=aa_version,
                    batch_size=batch_size, device=device, seed=seed, n_iter=aa_n_iter)
    aa_key = next(iter(aa.per_attack))
    # A randomized model's clean predictions differ between the two runs (merge would refuse):
    # judge every attack against robust_eval's clean pass (identical for deterministic ones).
    res = EvalResult(res.clean, {**res.per_attack, aa_key: aa.per_attack[aa_key] & res.clean},
                     {**res.info, **aa.info})
    acc = res.accuracy()
    del acc["worst"]  # would include the large-eps attack, which is a probe, not a threat
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

    # --- added: the rest of Carlini et al. 2019's checklist and AutoAttack's checks.py
    checks.extend(model_checks)
    checks.append(_n_classes_check(n_cls, aa.info[aa_key].get("dropped", {})))
    checks.append(_single_step_check(acc["single-step"], a_pgd, tol))
    checks.append(_steps_check(k_few, a_few, k_double, acc[f"pgd-{k_double}"], tol))
    checks.append(_restarts_check(k_few, restarts, key_restarts, a_few, acc[key_restarts], tol))
    curve = [(0.0, acc["clean"]), (eps, a_few), (large_eps, a_large),
             *((f * eps, acc[eps_keys[f]]) for f in eps_factors)]
    checks.append(_eps_monotone_check(curve, tol))
    checks.append(_random_noise_check(white, res.per_attack["random-noise"], noise_samples, tol))
    not_run = {}
    if surrogate is not None:
        checks.append(_transfer_check(white, res.per_attack["transfer"], k_many, tol))
    else:
        not_run["transfer_not_better"] = "needs a surrogate model (surrogate=...)"
    settings = {"norm": aa_norm, "eps": eps, "n": n, "steps": [k_few, k_many], "loss": loss,
                "large_eps": large_eps, "autoattack": aa.info[aa_key],
                "square_queries": square_queries, "tol": tol, "gap_tol": gap_tol, "seed": seed,
                "doubled_steps": k_double, "restarts": restarts, "eps_factors": list(eps_factors),
                "noise_samples": noise_samples, "random_passes": random_passes,
                "surrogate": None if surrogate is None else type(surrogate).__name__,
                "not_run": not_run}
    return SanityReport(checks, acc, settings)
