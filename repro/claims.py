"""The claims registry: what each paper claims, the paper's number, and how a chapter's
published results judge it.

A claim is data (id, paper, text, the paper's value with its unit and source) plus, once a
chapter implements it, an ``evaluate(result) -> Outcome`` that reads the chapter's result dict
(the one ``repro.experiments.<chapter>.run`` returns, or ``repro.publish.load`` rebuilds from a
published folder) and returns our value and a verdict. Nothing here holds a measured number.

Where the claims come from, per paper:

- ``PAPER_CLAIMS[paper]`` below: every claim of the four papers, without evaluators (verdict
  "not yet run"), so the scorecard lists them before any chapter exists;
- a chapter module's ``CLAIMS`` list (``repro/experiments/<chapter>.py``), if it has one:
  claims with the same ``id`` replace the registry's, new ids are added. A chapter adds
  evaluators to the registry's claims by re-declaring them with ``evaluate=...`` (e.g.
  ``dataclasses.replace(claims.get("he.aa-gain"), evaluate=my_fn)``).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN = (
    "reproduced", "partly", "not reproduced", "not yet run")
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_YET_RUN)


@dataclass(frozen=True)
class Outcome:
    """What our run says about a claim: a readable value, the number behind it (if one
    number sums it up) and a verdict from ``VERDICTS``."""
    ours: str
    verdict: str
    value: float | None = None
    note: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass(frozen=True)
class Claim:
    id: str                 # "<paper>.<slug>", unique across the book
    paper: str              # paper / chapter key: intro, he, lmt, advprop, bat
    text: str               # the claim, in one sentence
    paper_value: str        # the paper's number(s) as the paper states them, or "qualitative"
    unit: str = ""          # e.g. "% top-1, ImageNet" (empty for qualitative claims)
    source: str = ""        # where the number is stated (table, figure, third party)
    evaluate: Callable[[dict], Outcome] | None = None

    def judge(self, result: dict | None) -> Outcome:
        """Our value and verdict from a chapter result (None: nothing published yet)."""
        if self.evaluate is None:
            return Outcome("—", NOT_YET_RUN, note="no evaluator in the chapter yet")
        if result is None:
            return Outcome("—", NOT_YET_RUN, note="evaluator ready; no published run yet")
        try:
            return self.evaluate(result)
        except KeyError as e:  # the published run predates the metric this claim reads
            return Outcome("—", NOT_YET_RUN, note=f"published run lacks {e}")


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- the introduction's own checks (textbook facts the paper chapters rely on) -------------

def _intro_runs(result: dict) -> tuple[dict, dict, str]:
    std = result["runs"]["standard"]["metrics"]
    adv = result["runs"]["pgd_at"]["metrics"]
    key = f"pgd{result['config']['eval_steps']}"
    return std, adv, key


def _intro_at_raises_pgd(result: dict) -> Outcome:
    std, adv, key = _intro_runs(result)
    s, a = std["accuracy"][key], adv["accuracy"][key]
    gain = a - s
    verdict = REPRODUCED if gain >= 0.2 else PARTLY if gain > 0 else NOT_REPRODUCED
    return Outcome(f"PGD accuracy {_pct(s)} (standard) → {_pct(a)} (PGD-AT)", verdict,
                   value=100 * gain)


def _intro_standard_fragile(result: dict) -> Outcome:
    std, _, key = _intro_runs(result)
    c, p = std["accuracy"]["clean"], std["accuracy"][key]
    verdict = (REPRODUCED if p <= 0.5 * c else PARTLY if p < c - 0.1 else NOT_REPRODUCED)
    return Outcome(f"clean {_pct(c)}, PGD {_pct(p)}", verdict, value=100 * p)


def _intro_aa_confirms(result: dict) -> Outcome:
    _, adv, key = _intro_runs(result)
    if "autoattack" not in adv:
        return Outcome("—", NOT_YET_RUN, note="the published preset ran no AutoAttack")
    p, aa = adv["accuracy"][key], adv["autoattack"]["accuracy"]
    gap = p - aa
    verdict = REPRODUCED if gap <= 0.02 else PARTLY if gap <= 0.05 else NOT_REPRODUCED
    return Outcome(f"PGD {_pct(p)}, AutoAttack ({adv['autoattack']['version']}) {_pct(aa)}",
                   verdict, value=100 * gap)


def _intro_sanity(result: dict) -> Outcome:
    _, adv, _ = _intro_runs(result)
    checks = adv["sanity"]["checks"]
    failed = [c["name"] for c in checks if not c["passed"]]
    verdict = (REPRODUCED if not failed else PARTLY if len(failed) == 1 else NOT_REPRODUCED)
    ours = f"{len(checks) - len(failed)}/{len(checks)} checks pass"
    return Outcome(ours + (f" (flagged: {', '.join(failed)})" if failed else ""), verdict,
                   value=float(len(failed)))


INTRO_CLAIMS = [
    Claim("intro.standard-fragile", "intro",
          "A normally trained network loses most of its accuracy to a small L∞ PGD attack.",
          "qualitative", source="Szegedy et al. 2014; Goodfellow et al. 2015",
          evaluate=_intro_standard_fragile),
    Claim("intro.at-raises-pgd", "intro",
          "PGD adversarial training raises PGD accuracy far above standard training "
          "(≥ 20 points: reproduced).",
          "qualitative", source="Madry et al. 2018", evaluate=_intro_at_raises_pgd),
    Claim("intro.aa-confirms-pgd", "intro",
          "On a PGD-trained model, AutoAttack confirms the PGD number (gap ≤ 2 points: "
          "reproduced; ≤ 5: partly).",
          "qualitative", source="Croce & Hein 2020", evaluate=_intro_aa_confirms),
    Claim("intro.no-masking", "intro",
          "The adversarially trained model shows no symptom of gradient masking.",
          "qualitative", source="Carlini et al. 2019; Croce & Hein 2020",
          evaluate=_intro_sanity),
]

# --- the four papers, as stated by the papers (no evaluators: chapters add them) ------------

PAPER_CLAIMS = {
    "he": [
        Claim("he.rb-clean", "he", "PGD-AT+HE, WRN-34-20 on CIFAR-10: clean accuracy.",
              "85.14", "% clean, CIFAR-10, ε = 8/255",
              "RobustBench entry Pang2020Boosting (paper: Table 2)"),
        Claim("he.rb-aa", "he", "PGD-AT+HE, WRN-34-20 on CIFAR-10: AutoAttack accuracy.",
              "53.74", "% AutoAttack, CIFAR-10, ε = 8/255",
              "RobustBench entry Pang2020Boosting"),
        Claim("he.pgd-gain", "he",
              "HE improves PGD robust accuracy over PGD-AT at the same training budget.",
              "qualitative", "", "Pang et al. 2020, Table 2"),
        Claim("he.aa-gain", "he",
              "HE's gain over PGD-AT survives AutoAttack (not an artefact of a weak "
              "cosine-logit attack loss).",
              "qualitative", "", "Pang et al. 2020; RobustBench"),
        Claim("he.orthogonal", "he",
              "HE is orthogonal to the AT variant: TRADES+HE and ALP+HE improve over TRADES "
              "and ALP.", "qualitative", "", "Pang et al. 2020, Table 2"),
    ],
    "lmt": [
        Claim("lmt.tighter-bound", "lmt",
              "The layer-wise bound (conv as the true operator) is tighter than the "
              "reshaped-kernel bound.", "qualitative", "",
              "Tsuzuku et al. 2018, Sec. 4"),
        Claim("lmt.larger-radius", "lmt",
              "LMT yields larger certified L2 radii than standard training and weight-decay "
              "or Parseval baselines.", "qualitative", "", "Tsuzuku et al. 2018, Sec. 6"),
        Claim("lmt.mnist-clean", "lmt", "MNIST 4-layer CNN trained with LMT: clean accuracy.",
              "86.5", "% clean, MNIST",
              "third-party reimplementation (not the paper's own table)"),
        Claim("lmt.mnist-verified", "lmt",
              "MNIST 4-layer CNN trained with LMT: verified accuracy at L2 radius 1.58.",
              "40.6", "% certified at L2 = 1.58, MNIST",
              "third-party reimplementation (not the paper's own table)"),
        Claim("lmt.attack-robust", "lmt",
              "LMT models are more robust than standard ones to C&W and DeepFool (L2) "
              "attacks.", "qualitative", "", "Tsuzuku et al. 2018, Sec. 6"),
    ],
    "advprop": [
        Claim("advprop.clean-gain-b7", "advprop",
              "AdvProp improves clean accuracy over vanilla training (EfficientNet-B7, "
              "ImageNet).", "84.3 → 85.2", "% top-1, ImageNet",
              "Xie et al. 2020, Table 1"),
        Claim("advprop.clean-gain-r50", "advprop",
              "AdvProp improves clean accuracy over vanilla training (ResNet-50, ImageNet).",
              "76.7 → 77.4", "% top-1, ImageNet", "PyTorch port of AdvProp (ResNet-50)"),
        Claim("advprop.aux-bn", "advprop",
              "The auxiliary BatchNorms matter: mixing clean and adversarial images in one "
              "BN hurts clean accuracy.", "qualitative", "", "Xie et al. 2020, Sec. 5"),
        Claim("advprop.bigger-stronger", "advprop",
              "Bigger models prefer stronger attackers (larger ε / more PGD steps).",
              "qualitative", "", "Xie et al. 2020, Fig. 4"),
        Claim("advprop.corruptions", "advprop",
              "AdvProp improves robustness to distortions (ImageNet-C style corruptions).",
              "qualitative", "", "Xie et al. 2020, Table 2"),
    ],
    "bat": [
        Claim("bat.atypical-clean-not-robust", "bat",
              "(a) Memorising atypical samples helps their clean accuracy but hardly their "
              "robust accuracy.", "qualitative", "", "Xu et al. 2021, Sec. 3"),
        Claim("bat.atypical-hurts-typical", "bat",
              "(b) Fitting (some) atypical samples hurts robust accuracy on typical samples.",
              "qualitative", "", "Xu et al. 2021, Sec. 3"),
        Claim("bat.tradeoff", "bat",
              "BAT improves the clean/robust trade-off over PGD-AT and TRADES.",
              "qualitative", "", "Xu et al. 2021, Sec. 5 (CIFAR-100, Tiny ImageNet)"),
    ],
}

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
