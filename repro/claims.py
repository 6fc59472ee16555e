"""The claims registry and the book's one verdict rule.

**Claims are data.** Each chapter's claims live in ``repro/claims_data/<paper>.json`` (shipped
with the package): id, text, the paper's value and unit as the source states it (or
``"not transcribed"`` where no source was at hand), the source (table / section / page), the
setting (dataset, architecture, ε, attack), the quantity our run measures, the paper's effect
in that quantity's unit (``effect``, ``null`` where the paper gives no comparable number), the
direction the paper claims, the ``null`` value the effect is tested against (0 for a gain), and
the scale ``floor`` below which the claim is not tested, with why. ``load_data`` reads them;
``tests/test_claims.py`` validates them. Nothing here holds a measured number.

**Evaluators.** A chapter module's ``CLAIMS`` list attaches an ``evaluate(result) -> Outcome``
to the data's claims (``with_evaluator(id, fn)``); claims with the same id replace the
registry's. An evaluator measures an :class:`Estimate` and hands it to :func:`judge`::

    def _my_claim(result):
        est = claims.paired(base_correct, new_correct)         # new − base, points
        facts = {"full_training_set": cfg["n_train"] is None,  # what the floor asks about
                 "baseline_clean": base_clean, "test_images": len(base_correct)}
        return claims.judge("he.pgd-gain", est, facts, ours=f"{est}")

    CLAIMS = [claims.with_evaluator("he.pgd-gain", _my_claim)]

Estimates (all in points, i.e. percent of test images):

- :func:`paired` — per-example correctness of two models on the *same* test images (shape
  ``(n,)``, or ``(seeds, n)`` for several seeds): the paired difference and its SE;
- :func:`per_example` — any per-example contrast (e.g. an interaction of four models);
- :func:`across_seeds` — one number per seed and model where no per-example arrays exist
  (t interval with seeds − 1 degrees of freedom);
- :func:`proportion` — one accuracy (a claim about a level, e.g. RobustBench's 53.74%);
- :func:`exact` — a count with no sampling error (e.g. failed sanity checks).

**The rule** (:func:`verdict`), with x the estimate moved so that the paper's direction is
positive and the claim's ``null`` is 0, [lo, hi] its 95% interval, P the paper's effect:

- *not yet run*: no estimate;
- *inconclusive*: the run is below the claim's floor (never judged there), or the interval
  holds both 0 and P (with no P: holds 0 and reaches into the paper's direction), or the
  estimate has no interval;
- *reproduced*: lo > 0 (the paper's direction, the interval excludes 0), unless hi < P;
- *partly*: the paper's direction but smaller than the paper's effect: lo > 0 and hi < P
  (significant, significantly smaller), or x > 0 with lo ≤ 0 < hi < P (not significant, and
  the interval excludes P);
- *not reproduced*: at or above the floor and the interval excludes the paper's effect: hi < 0,
  or x ≤ 0 with hi < P.

Every outcome carries the floor (met or not, and why) and the smallest effect the run could
have detected: ``mde = (q_0.975 + q_0.80) · SE``, the true effect that a two-sided 5% test
detects with 80% power (q: normal quantiles, 1.96 + 0.84 = 2.80; t quantiles for
seed-level estimates).

**Adopting the rule in a chapter**: read the claim's ``quantity``, ``direction``, ``null``
and ``floor["requires"]`` in its data file; build the estimate of that quantity (a count of
violations: ``exact``; a certified fraction on n test points: ``proportion``; LMT − standard
on the same points: ``paired``; a median against a threshold t: the fraction beyond t, since a
median exceeds t exactly when more than half do); pass the facts the floor names (a key
``x_min`` in ``requires`` reads the fact ``x``; ``repro.experiments.lmt._facts`` is an
example) to :func:`judge`. Every chapter's evaluators do so; for any that does not,
:meth:`Claim.judge` turns a "not reproduced" that carries no floor check into
*inconclusive*: no claim is refuted by a run whose scale nobody checked.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPRODUCED, PARTLY, INCONCLUSIVE, NOT_REPRODUCED, NOT_YET_RUN = (
    "reproduced", "partly", "inconclusive", "not reproduced", "not yet run")
VERDICTS = (REPRODUCED, PARTLY, INCONCLUSIVE, NOT_REPRODUCED, NOT_YET_RUN)
NOT_TRANSCRIBED = "not transcribed"
DATA_DIR = Path(__file__).with_name("claims_data")

# Two-sided 95% and one-sided 80% quantiles: the normal ones, and Student's t for 1..10
# degrees of freedom (scipy.stats.t.ppf(0.975 / 0.80, df); tests/test_claims.py checks them).
Z975, Z80 = 1.959964, 0.841621
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281)
T80 = (1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791)


def _quantiles(df: int | None) -> tuple[float, float]:
    if df is None or df > len(T975):
        return Z975, Z80
    return T975[df - 1], T80[df - 1]


# ----------------------------------------------------------------------------- estimates

@dataclass(frozen=True)
class Estimate:
    """A measured effect in points with its standard error.

    ``n``: test images behind it; ``seeds``: training seeds; ``df``: degrees of freedom of a
    t interval (None: normal); ``basis``: how it was computed, in words."""
    value: float
    se: float
    n: int
    seeds: int = 1
    df: int | None = None
    basis: str = ""

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.se) and self.se >= 0 and math.isfinite(self.value)

    @property
    def interval(self) -> tuple[float, float]:
        """The two-sided 95% interval (nan, nan) when there is no SE."""
        if not self.has_interval:
            return (float("nan"), float("nan"))
        q = _quantiles(self.df)[0]
        return (self.value - q * self.se, self.value + q * self.se)

    @property
    def mde(self) -> float:
        """Smallest true effect detected with 80% power by a two-sided 5% test:
        (q_0.975 + q_0.80) · SE (2.80 · SE with normal quantiles)."""
        if not self.has_interval:
            return float("nan")
        q975, q80 = _quantiles(self.df)
        return (q975 + q80) * self.se

    def __str__(self) -> str:
        if not self.has_interval:
            return f"{self.value:+.1f} (no interval)"
        lo, hi = self.interval
        return f"{self.value:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def per_example(d, basis: str = "") -> Estimate:
    """Estimate from per-example contrasts ``d`` (fractions, e.g. b − a of 0/1 correctness),
    shape ``(n,)`` for one seed or ``(seeds, n)`` over the same n test images.

    One seed: mean and SE = sd/√n (the paired-difference SE). Several seeds: the mean over
    seeds and images, SE² = sd(d̄_i)²/n + sd(D_s)²/S with d̄_i the per-image mean over seeds
    and D_s the per-seed means: test-image sampling plus seed-to-seed variation (conservative:
    part of the seed variance is counted twice). Returned in points (× 100)."""
    d = np.asarray(d, dtype=float)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[1] == 0:
        raise ValueError(f"per_example: need shape (n,) or (seeds, n), got {d.shape}")
    s, n = d.shape
    per_image = d.mean(0)
    var = per_image.var(ddof=1) / n if n > 1 else float("nan")
    if s > 1:
        var += d.mean(1).var(ddof=1) / s
    what = basis or "paired over the same test images"
    if s > 1:
        what += f", {s} seeds"
    return Estimate(100 * float(d.mean()), 100 * math.sqrt(var) if var == var else float("nan"),
                    n=n, seeds=s, basis=what)


def paired(a, b, basis: str = "") -> Estimate:
    """Paired difference b − a (points) of per-example correctness on the same test images:
    ``a``, ``b`` bool/0-1 arrays of shape (n,) or (seeds, n). See :func:`per_example`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired: shapes differ {a.shape} vs {b.shape} (same test images?)")
    return per_example(b - a, basis)


def across_seeds(a, b, n: int = 0, basis: str = "") -> Estimate:
    """Difference b − a of one number per seed (fractions, paired by seed) where no
    per-example arrays exist: mean, SE = sd/√S, t interval with S − 1 df. One seed: no SE."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    s = len(d)
    se = float(d.std(ddof=1) / math.sqrt(s)) if s > 1 else float("nan")
    return Estimate(100 * float(d.mean()), 100 * se, n=n, seeds=s, df=s - 1 if s > 1 else None,
                    basis=basis or f"across {s} seed(s), paired by seed")


def proportion(p: float, n: int, basis: str = "") -> Estimate:
    """One accuracy p measured on n images: 100·p with the binomial SE of the Agresti–Coull
    "plus four" estimate, p̃ = (np + 2)/(n + 4), SE = √(p̃(1 − p̃)/(n + 4)) (Agresti & Coull
    1998). Away from 0 and 1 it equals the Wald SE √(p(1 − p)/n) to within 4/n; at 0 or 1
    (e.g. 960 of 960 certificates within a bound) it stays positive, where the Wald SE of 0
    would claim an exact value and a detectable effect of 0."""
    p4 = (p * n + 2) / (n + 4)
    se = math.sqrt(p4 * (1 - p4) / (n + 4)) if n > 0 else float("nan")
    return Estimate(100 * p, 100 * se, n=n, basis=basis or f"accuracy on {n} test images")


def exact(value: float, n: int = 0, basis: str = "") -> Estimate:
    """A number with no sampling error (a count, a check): SE 0."""
    return Estimate(float(value), 0.0, n=n, basis=basis or "exact (no sampling error)")


# ----------------------------------------------------------------------------- floors

@dataclass(frozen=True)
class FloorCheck:
    met: bool | None         # None: not checked
    why: str = ""


def check_floor(floor: dict | None, facts: dict) -> FloorCheck:
    """Check a claim's floor (``{"requires": {...}, "why": ...}``) against a run's facts.

    Requirement keys: ``<fact>_min`` (fact ≥ value), ``<fact>_max`` (fact ≤ value),
    ``<fact>_in`` (fact in a list), anything else: fact == value. A missing fact fails."""
    if not floor or not floor.get("requires"):
        return FloorCheck(None, "no floor stated")
    failed, passed = [], []
    for key, want in floor["requires"].items():
        for suffix, test, word in (("_min", lambda f, w: f >= w, "≥"),
                                   ("_max", lambda f, w: f <= w, "≤"),
                                   ("_in", lambda f, w: f in w, "in")):
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                break
        else:
            name, test, word = key, (lambda f, w: f == w), "="
        have = facts.get(name)
        ok = have is not None and bool(test(have, want))
        (passed if ok else failed).append(f"{name} = {_fmt(have)} (needs {word} {_fmt(want)})")
    if failed:
        return FloorCheck(False, "below the floor: " + "; ".join(failed))
    return FloorCheck(True, "floor met: " + "; ".join(passed))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ----------------------------------------------------------------------------- outcomes

@dataclass(frozen=True)
class Outcome:
    """What our run says about a claim: a readable value, the number behind it, a verdict
    from ``VERDICTS``, and (from :func:`judge`) the interval, the floor and the power."""
    ours: str
    verdict: str
    value: float | None = None
    note: str = ""
    interval: tuple[float, float] | None = None
    mde: float | None = None          # smallest detectable effect (points, 80% power)
    floor_met: bool | None = None
    floor_why: str = ""
    basis: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def verdict(est: Estimate | None, *, effect: float | None = None, direction: int = 1,
            null: float = 0.0, floor_met: bool | None = True) -> str:
    """The rule (module docstring). ``effect``: the paper's effect in the estimate's unit
    (None: qualitative); ``direction``: +1 if the paper claims the estimate exceeds ``null``,
    −1 if it claims it falls below; ``floor_met``: False means below the floor."""
    if est is None:
        return NOT_YET_RUN
    if floor_met is False or not est.has_interval:
        return INCONCLUSIVE
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    x = direction * (est.value - null)
    lo, hi = sorted(direction * (v - null) for v in est.interval)
    p = None if effect is None else direction * (effect - null)
    if p is not None and p <= 0:
        raise ValueError(f"the paper's effect {effect} is not in the claimed direction from "
                         f"{null}")
    if lo > 0:
        return PARTLY if p is not None and hi < p else REPRODUCED
    if hi < 0:
        return NOT_REPRODUCED
    # the interval holds 0
    if p is None or hi >= p:
        return INCONCLUSIVE
    return PARTLY if x > 0 else NOT_REPRODUCED


# ----------------------------------------------------------------------------- claims

@dataclass(frozen=True)
class Claim:
    id: str                 # "<paper>.<slug>", unique across the book
    paper: str              # paper / chapter key: intro, he, lmt, advprop, bat
    text: str               # the claim, in one sentence
    paper_value: str        # as the source states it, "qualitative" or "not transcribed"
    unit: str = ""          # e.g. "% top-1, ImageNet"
    source: str = ""        # where the number is stated (table, section, page)
    evaluate: Callable[[dict], Outcome] | None = None
    setting: dict = field(default_factory=dict)   # dataset, architecture, eps, attack
    quantity: str = ""      # what our estimate measures, in its unit
    effect: float | None = None   # the paper's effect in that unit (None: no comparable number)
    effect_note: str = ""
    direction: int = 1
    null: float = 0.0
    floor: dict = field(default_factory=dict)     # {"requires": {...}, "why": "..."}

    def judge(self, result: dict | None) -> Outcome:
        """Our value and verdict from a chapter result (None: nothing published yet)."""
        if self.evaluate is None:
            return Outcome("—", NOT_YET_RUN, note="no evaluator in the chapter yet")
        if result is None:
            return Outcome("—", NOT_YET_RUN, note="evaluator ready; no published run yet")
        try:
            out = self.evaluate(result)
        except KeyError as e:  # the published run predates the metric this claim reads
            return Outcome("—", NOT_YET_RUN, note=f"published run lacks {e}")
        if (out.verdict == NOT_REPRODUCED and out.floor_met is None
                and (self.floor or {}).get("requires")):
            # An evaluator that did not check the claim's floor cannot refute it.
            return dataclasses.replace(
                out, verdict=INCONCLUSIVE, floor_why="floor not checked by the evaluator",
                note=(out.note + " " if out.note else "") + "Not reproduced only at or above "
                     "the floor; this evaluator does not check it (use repro.claims.judge).")
        return out


FIELDS = ("id", "text", "paper_value", "unit", "source", "setting", "quantity", "effect",
          "effect_note", "direction", "null", "floor")


def load_data(paper: str) -> list[Claim]:
    """The claims of ``paper`` from ``claims_data/<paper>.json`` (no evaluators)."""
    raw = json.loads((DATA_DIR / f"{paper}.json").read_text(encoding="utf-8"))
    out = []
    for c in raw["claims"]:
        missing = [f for f in FIELDS if f not in c]
        if missing:
            raise ValueError(f"claims_data/{paper}.json: claim {c.get('id')!r} lacks {missing}")
        d = {"+": 1, "-": -1}[c["direction"]]
        out.append(Claim(c["id"], paper, c["text"], c["paper_value"], c["unit"], c["source"],
                         setting=dict(c["setting"]), quantity=c["quantity"], effect=c["effect"],
                         effect_note=c["effect_note"], direction=d, null=float(c["null"]),
                         floor=dict(c["floor"])))
    return out


def judge(claim_id: str, est: Estimate | None, facts: dict | None = None, *, ours: str = "",
          note: str = "", claim: Claim | None = None) -> Outcome:
    """The verdict of ``claim_id`` (its data: effect, direction, null, floor) on ``est``,
    with the floor checked against ``facts``. ``ours`` defaults to the estimate and its
    95% interval."""
    c = claim or get(claim_id)
    if est is None:
        return Outcome(ours or "—", NOT_YET_RUN, note=note)
    fl = check_floor(c.floor, facts or {})
    v = verdict(est, effect=c.effect, direction=c.direction, null=c.null,
                floor_met=fl.met is not False)
    lo, hi = est.interval
    ours = ours or f"{est} points"
    if fl.met is False:
        note = (note + " " if note else "") + "Not judged below the floor."
    return Outcome(ours, v, value=est.value, note=note,
                   interval=(lo, hi) if est.has_interval else None,
                   mde=est.mde if est.has_interval else None, floor_met=fl.met,
                   floor_why=fl.why + (f" ({c.floor.get('why')})" if fl.met is False
                                       and c.floor.get("why") else ""),
                   basis=est.basis)


def invalid(ours: str, reason: str) -> Outcome:
    """An outcome from runs that are not evidence (e.g. trained with a known bug)."""
    return Outcome(ours, INCONCLUSIVE, note=reason, floor_met=None,
                   floor_why="runs not valid: " + reason)


def combine(outcomes: list[Outcome], ours: str, note: str = "") -> Outcome:
    """One verdict for a claim about several comparisons ("X improves over A and B"):
    not reproduced if any part is, else not yet run / inconclusive if any part is, else
    reproduced if all parts are, else partly. The floor is met only if it is met for all."""
    vs = [o.verdict for o in outcomes]
    if not vs:
        return Outcome(ours, NOT_YET_RUN, note=note)
    for v in (NOT_REPRODUCED, NOT_YET_RUN, INCONCLUSIVE):
        if v in vs:
            break
    else:
        v = REPRODUCED if all(x == REPRODUCED for x in vs) else PARTLY
    mets = [o.floor_met for o in outcomes]
    met = False if False in mets else (None if None in mets else True)
    mdes = [o.mde for o in outcomes if o.mde is not None]
    return Outcome(ours, v, note=note, floor_met=met,
                   floor_why="; ".join(dict.fromkeys(o.floor_why for o in outcomes
                                                     if o.floor_why)),
                   mde=max(mdes) if mdes else None)


def with_evaluator(claim_id: str, fn: Callable[[dict], Outcome]) -> Claim:
    """The registry's claim ``claim_id`` with ``fn`` as its evaluator (for a chapter's CLAIMS)."""
    return dataclasses.replace(get(claim_id), evaluate=fn)


# The papers, in book order. ``chapter`` is the key in repro.experiments.CHAPTERS.
PAPERS = {
    "intro": dict(short="Introduction", title="Adversarial examples and adversarial training "
                  "(Goodfellow et al. 2015; Madry et al. 2018)", chapter="intro"),
    "he": dict(short="HE", title="Boosting Adversarial Training with Hypersphere Embedding "
               "(Pang et al., NeurIPS 2020)", chapter="he"),
    "lmt": dict(short="LMT", title="Lipschitz-Margin Training (Tsuzuku, Sato and Sugiyama, "
                "NeurIPS 2018)", chapter="lmt"),
    "advprop": dict(short="AdvProp", title="Adversarial Examples Improve Image Recognition "
                    "(Xie et al., CVPR 2020)", chapter="advprop"),
    "bat": dict(short="BAT", title="Towards the Memorization Effect of Neural Networks in "
                "Adversarial Training (Xu et al., arXiv 2106.04794)", chapter="bat"),
}

# --- the introduction's own checks (textbook facts the paper chapters rely on) -------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _intro_parts(result: dict):
    std, adv = result["runs"]["standard"], result["runs"]["pgd_at"]
    key = f"pgd{result['config']['eval_steps']}"
    return std, adv, key


def _intro_facts(result: dict, n: int) -> dict:
    std = result["runs"]["standard"]["metrics"]["accuracy"]["clean"]
    return {"test_images": n, "standard_clean": std}


def _correct(run: dict, key: str) -> np.ndarray:
    return np.asarray(run["arrays"][f"correct_{key}"], dtype=bool)


def _intro_standard_fragile(result: dict) -> Outcome:
    std, _, key = _intro_parts(result)
    est = paired(_correct(std, key), _correct(std, "clean"),
                 "clean − PGD, paired over the same test images")
    c, p = std["metrics"]["accuracy"]["clean"], std["metrics"]["accuracy"][key]
    return judge("intro.standard-fragile", est, _intro_facts(result, est.n),
                 ours=f"clean {_pct(c)}, PGD {_pct(p)}: drop {est} points")


def _intro_at_raises_pgd(result: dict) -> Outcome:
    std, adv, key = _intro_parts(result)
    est = paired(_correct(std, key), _correct(adv, key))
    s, a = std["metrics"]["accuracy"][key], adv["metrics"]["accuracy"][key]
    return judge("intro.at-raises-pgd", est, _intro_facts(result, est.n),
                 ours=f"PGD accuracy {_pct(s)} (standard) → {_pct(a)} (PGD-AT): {est} points")


def _intro_aa_confirms(result: dict) -> Outcome:
    _, adv, key = _intro_parts(result)
    if "autoattack" not in adv["metrics"]:
        return Outcome("—", NOT_YET_RUN, note="the published preset ran no AutoAttack")
    aa = np.asarray(adv["arrays"]["correct_autoattack"], dtype=bool)
    pgd = _correct(adv, key)[: len(aa)]
    est = paired(aa, pgd, "PGD − AutoAttack on the same test images")
    m = adv["metrics"]
    return judge("intro.aa-confirms-pgd", est, _intro_facts(result, est.n),
                 ours=f"PGD {_pct(pgd.mean())}, AutoAttack ({m['autoattack']['version']}) "
                      f"{_pct(aa.mean())}: gap {est} points")


def _intro_sanity(result: dict) -> Outcome:
    _, adv, _ = _intro_parts(result)
    checks = adv["metrics"]["sanity"]["checks"]
    failed = [c["name"] for c in checks if not c["passed"]]
    est = exact(len(failed), n=len(checks), basis="failed sanity checks (a count)")
    ours = f"{len(checks) - len(failed)}/{len(checks)} checks pass"
    return judge("intro.no-masking", est, _intro_facts(result, len(
        _correct(adv, "clean"))), ours=ours + (f" (flagged: {', '.join(failed)})" if failed
                                               else ""))


_INTRO_EVALUATORS = {"intro.standard-fragile": _intro_standard_fragile,
                     "intro.at-raises-pgd": _intro_at_raises_pgd,
                     "intro.aa-confirms-pgd": _intro_aa_confirms,
                     "intro.no-masking": _intro_sanity}

# --- the registry: every paper's claims from its data file ---------------------------------

PAPER_CLAIMS = {p: load_data(p) for p in ("he", "lmt", "advprop", "bat")}
INTRO_CLAIMS = [dataclasses.replace(c, evaluate=_INTRO_EVALUATORS.get(c.id))
                for c in load_data("intro")]
REGISTRY = {"intro": INTRO_CLAIMS, **PAPER_CLAIMS}


def get(claim_id: str) -> Claim:
    for claims in REGISTRY.values():
        for c in claims:
            if c.id == claim_id:
                return c
    raise KeyError(f"unknown claim {claim_id!r}")


def chapter_module(paper: str):
    """The chapter's experiment module if the chapter exists, else None."""
    from repro import experiments
    chapter = PAPERS[paper]["chapter"]
    if chapter not in experiments.CHAPTERS:
        return None
    return importlib.import_module(experiments.CHAPTERS[chapter])


def claims_for(paper: str) -> list[Claim]:
    """The registry's claims for ``paper``, replaced or extended by the chapter's ``CLAIMS``."""
    base = list(REGISTRY.get(paper, []))
    module = chapter_module(paper)
    extra = list(getattr(module, "CLAIMS", []) or []) if module is not None else []
    by_id = {c.id: i for i, c in enumerate(base)}
    for c in extra:
        if not isinstance(c, Claim):
            raise TypeError(f"{module.__name__}.CLAIMS holds {type(c).__name__}, not Claim")
        c = c if c.paper == paper else dataclasses.replace(c, paper=paper)
        if c.id in by_id:
            base[by_id[c.id]] = c
        else:
            by_id[c.id] = len(base)
            base.append(c)
    return base


def all_claims() -> dict[str, list[Claim]]:
    return {paper: claims_for(paper) for paper in PAPERS}


def table(result: dict | None, paper: str):
    """The chapter's claims with the paper's number, ours, the floor, the smallest detectable
    effect and the verdict (a pandas DataFrame, for the notebooks)."""
    import pandas as pd
    rows = []
    for c in claims_for(paper):
        o = c.judge(result)
        rows.append({
            "claim": c.text,
            "paper": c.paper_value + (f" ({c.unit})" if c.unit else "")
            + (f" — {c.source}" if c.source else ""),
            "ours": o.ours,
            "floor": ("met" if o.floor_met else "not met" if o.floor_met is False else "—"),
            "detectable (80% power)": f"{o.mde:.1f} points" if o.mde is not None else "—",
            "verdict": o.verdict,
            "note": " ".join(x for x in (o.note, o.floor_why if o.floor_met is False else "")
                             if x)})
    return pd.DataFrame(rows)
