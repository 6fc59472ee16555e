"""Pieces as data: each chapter's preset cut into pieces (a chapter, the overrides that
restrict its preset to some runs, the claims the pieces decide, what they need first)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import repro
from repro import experiments

# Each paper's main claim counts twice when pieces are ordered (one per paper; the intro's
# textbook checks have none): the first window should settle a headline, not only the cheap
# MNIST checks.
HEADLINE = {"he.aa-gain": 2, "lmt.larger-radius": 2, "advprop.clean-gain-b7": 2,
            "bat.tradeoff": 2}


# ----------------------------------------------------------------------------- pieces (data)

@dataclass(frozen=True)
class Piece:
    id: str
    chapter: str
    title: str
    overrides: dict = field(default_factory=dict)   # restrict the gpu preset (not in run keys)
    only: tuple | None = None                        # run names, for chapters whose run() has it
    stage: str = "run"          # "run", "train" / "evaluate" (one model's two halves),
                                # "memorization:<dataset>" (BAT) or, before it, its subset
                                # models in shards: "memorization-shard:<dataset>:<i>/<N>"
    claims: tuple = ()                               # claim ids this piece's results decide
    needs: tuple = ()                                # piece ids that must be done first
    datasets: tuple = ()                             # what must be staged on the machine
    preset: str = "gpu"                              # the chapter preset the piece cuts


PIECES: list[Piece] = [
    Piece("he-pgd", "he", "PGD-AT and PGD-AT+HE, PreAct-ResNet-18, full CIFAR-10, AA on 1000",
          overrides={"variants": ["pgd_at"]}, claims=("he.pgd-gain", "he.aa-gain"),
          datasets=("cifar10",)),
    Piece("intro", "intro", "standard and PGD-AT small CNN on MNIST, AutoAttack standard",
          claims=("intro.standard-fragile", "intro.at-raises-pgd", "intro.aa-confirms-pgd",
                  "intro.no-masking"), datasets=("mnist",)),
    # LMT's MNIST claims are decided by the published paper-preset run (20 epochs, computed on
    # the CPU); this piece only provides the gpu preset's MNIST rows, so that a later
    # `publish lmt --preset gpu` (MNIST + CIFAR-10 on one page) retrains nothing on the CPU.
    Piece("lmt-mnist", "lmt", "LMT, LMT++, standard, weight decay: MNIST 4-layer CNN (gpu "
          "preset rows; the claims come from the published paper-preset run)",
          overrides={"datasets": ["mnist"]}, claims=(), datasets=("mnist",)),
    Piece("he-trades", "he", "TRADES and TRADES+HE", overrides={"variants": ["trades"]},
          claims=(), datasets=("cifar10",)),
    Piece("he-alp", "he", "ALP and ALP+HE", overrides={"variants": ["alp"]},
          claims=("he.orthogonal",), needs=("he-trades",), datasets=("cifar10",)),
    Piece("lmt-cifar-a", "lmt", "standard and LMT: WRN-16-4 on CIFAR-10",
          overrides={"datasets": ["cifar10"], "methods": ["standard", "lmt"]},
          claims=("lmt.tighter-bound", "lmt.larger-radius", "lmt.attack-robust"),
          datasets=("cifar10",)),
    Piece("lmt-cifar-b", "lmt", "weight decay and LMT++: WRN-16-4 on CIFAR-10",
          overrides={"datasets": ["cifar10"], "methods": ["weight_decay", "lmt_plus"]},
          needs=("lmt-cifar-a",), datasets=("cifar10",)),
    Piece("advprop-s0", "advprop", "vanilla, shared-BN AT, AdvProp: width 64, seed 0",
          only=("vanilla_w64_s0", "shared_bn_w64_e1_s0", "advprop_w64_e1_s0"),
          claims=("advprop.aux-bn",), datasets=("cifar10",)),
    Piece("advprop-s1", "advprop", "vanilla, shared-BN AT, AdvProp: width 64, seed 1",
          only=("vanilla_w64_s1", "shared_bn_w64_e1_s1", "advprop_w64_e1_s1"),
          claims=("advprop.clean-gain-b7", "advprop.clean-gain-r50", "advprop.corruptions"),
          needs=("advprop-s0",), datasets=("cifar10",)),
    Piece("advprop-ablation", "advprop", "widths 16/64 x eps 1/2/4 ablation",
          only=("vanilla_w16_s0", "advprop_w16_e1_s0", "advprop_w16_e2_s0",
                "advprop_w16_e4_s0", "advprop_w64_e2_s0", "advprop_w64_e4_s0"),
          claims=("advprop.bigger-stronger",), needs=("advprop-s1",), datasets=("cifar10",)),
    # BAT's memorization pieces call bat.memorization_run, which trains the K subset models
    # through repro.memorization; they are estimated as K separate models (FLOPs + launches +
    # RUN_OVERHEAD_S each). A batched / vmapped ensemble trainer offered by repro.memorization
    # (another change, not assumed to exist yet) drops the per-model launches and overhead:
    # the estimate is then an upper bound, and the piece needs no change.
    Piece("bat-mem-cifar100", "bat", "memorization: K subset models + proxy, CIFAR-100",
          stage="memorization:cifar100", datasets=("cifar100",)),
    Piece("bat-mem-cifar10", "bat", "memorization contrast: K subset models, CIFAR-10",
          stage="memorization:cifar10", needs=("bat-mem-cifar100",), datasets=("cifar10",)),
    Piece("bat-at", "bat", "PGD-AT (with curves), TRADES, BAT a=1,2, typical+f runs",
          claims=("bat.atypical-clean-not-robust", "bat.atypical-hurts-typical",
                  "bat.tradeoff"), needs=("bat-mem-cifar100", "bat-mem-cifar10"),
          datasets=("cifar100", "cifar10")),
]

# The CPU campaign (repro/campaign/cpu.py): every chapter's `overnight` preset in pieces of
# at most about 2 hours of a 2-core CPU, each one trained model where the chapter's run()
# can select one (HE and AdvProp: `only`; LMT: `methods`). A model whose training and
# evaluation together pass 2 hours is two pieces: `train` (stops once the weights are saved)
# then `evaluate` (finds them and evaluates). Training resumes from its last epoch
# checkpoint after a kill; HE's evaluation from its last finished stage.
_HE_RUN = {"variants": ["pgd_at"]}
BAT_SHARDS = 4   # BAT overnight's CIFAR-10 subset models: K = 600 in 4 pieces of 150


def _split(id_: str, chapter: str, title: str, *, claims=(), needs=(), **kw) -> list[Piece]:
    """One model as a training piece and an evaluation piece after it (the claims go to
    the evaluation, which also waits for ``needs``)."""
    return [Piece(f"{id_}-train", chapter, f"{title}: training", stage="train", **kw),
            Piece(f"{id_}-eval", chapter, f"{title}: evaluation", stage="evaluate",
                  claims=claims, needs=(f"{id_}-train", *needs), **kw)]


def _advprop_id(method: str, seed: int) -> str:
    """The piece that finishes ``method`` at ``seed`` (an evaluation piece where split)."""
    return f"advprop-o-{method}-s{seed}" + ("" if method == "vanilla" else "-eval")


def _advprop_pieces(method: str, seed: int) -> list[Piece]:
    """One AdvProp overnight model. The last AdvProp model at seed 1 decides the claim on
    shared BN (both its seeds done); the one at seed 2 (``extra_seeds``: vanilla and AdvProp
    only) the AdvProp − vanilla claims, paired over all three seeds."""
    run = f"{method}_w32_s{seed}" if method == "vanilla" else f"{method}_w32_e1_s{seed}"
    claims, needs = (), ()
    if (method, seed) == ("advprop", 1):
        claims = ("advprop.aux-bn",)
        needs = tuple(_advprop_id(a, b) for a in ("shared_bn", "advprop") for b in (0, 1)
                      if (a, b) != ("advprop", 1))
    if (method, seed) == ("advprop", 2):
        claims = ("advprop.clean-gain-b7", "advprop.clean-gain-r50", "advprop.corruptions")
        needs = tuple(_advprop_id(a, b) for a in ("vanilla", "advprop") for b in (0, 1, 2)
                      if (a, b) != ("advprop", 2))
    kw = dict(only=(run,), datasets=("cifar10",), preset="overnight")
    title = f"{method}, width 32, seed {seed}"
    if method == "vanilla":
        return [Piece(f"advprop-o-{method}-s{seed}", "advprop", title, claims=claims,
                      needs=needs, **kw)]
    return _split(f"advprop-o-{method}-s{seed}", "advprop", title, claims=claims,
                  needs=needs, **kw)


OVERNIGHT_PIECES: list[Piece] = [
    *_split("he-o-pgd_at-s0", "he", "PGD-AT, width-32 PreAct-ResNet-18, seed 0",
            overrides=_HE_RUN, only=("pgd_at",), datasets=("cifar10",), preset="overnight"),
    *_split("he-o-pgd_at_he-s0", "he", "PGD-AT+HE, seed 0 (the same initial body and data "
            "order as PGD-AT)", overrides=_HE_RUN, only=("pgd_at_he",), datasets=("cifar10",),
            preset="overnight"),
    # AdvProp's pilot (is the vanilla recipe at >= 90% clean?) before HE's second seed: its
    # answer decides AdvProp's other 10.7 hours, which can then be changed before they run
    *_advprop_pieces("vanilla", 0),
    *_split("he-o-pgd_at-s1", "he", "PGD-AT, seed 1", overrides={**_HE_RUN, "seed": 1},
            only=("pgd_at",), datasets=("cifar10",), preset="overnight"),
    *_split("he-o-pgd_at_he-s1", "he", "PGD-AT+HE, seed 1", overrides={**_HE_RUN, "seed": 1},
            only=("pgd_at_he",), claims=("he.pgd-gain", "he.aa-gain"),
            needs=("he-o-pgd_at-s0-eval", "he-o-pgd_at_he-s0-eval", "he-o-pgd_at-s1-eval"),
            datasets=("cifar10",), preset="overnight"),
    Piece("intro-o", "intro", "standard and PGD-AT small CNN on MNIST, AutoAttack standard",
          datasets=("mnist",), preset="overnight"),
    Piece("lmt-o-baselines", "lmt", "standard and weight decay: MNIST 4-layer CNN, 20 epochs",
          overrides={"methods": ["standard", "weight_decay"]}, datasets=("mnist",),
          preset="overnight"),
    Piece("lmt-o-lmt", "lmt", "LMT and LMT++ at every c: MNIST 4-layer CNN, 20 epochs",
          overrides={"methods": ["lmt", "lmt_plus"]}, datasets=("mnist",),
          preset="overnight"),
    # AdvProp: vanilla (0.67 h) is one piece; shared-BN and AdvProp (1.8 and 1.9 h) are two;
    # seed 2 trains vanilla and AdvProp only (the corruption claim's third seed)
    *[q for s in (0, 1) for m in ("vanilla", "shared_bn", "advprop")
      if (m, s) != ("vanilla", 0) for q in _advprop_pieces(m, s)],
    *[q for m in ("vanilla", "advprop") for q in _advprop_pieces(m, 2)],
    # K = 600 subset models (the atypical test split's influence SE <= 0.05) in shards of
    # at most 2 hours, then the estimate, the split and the proxy
    *[Piece(f"bat-o-mem-cifar10-shard{i}", "bat", f"memorization: subset models {i}, "
            f"{i + BAT_SHARDS}, ... of K (shard {i + 1} of {BAT_SHARDS}), CIFAR-10",
            stage=f"memorization-shard:cifar10:{i}/{BAT_SHARDS}", datasets=("cifar10",),
            preset="overnight") for i in range(BAT_SHARDS)],
    Piece("bat-o-mem-cifar10", "bat", "memorization: the K subset models merged, the "
          "estimate, the atypical splits and the proxy, CIFAR-10",
          stage="memorization:cifar10",
          needs=tuple(f"bat-o-mem-cifar10-shard{i}" for i in range(BAT_SHARDS)),
          datasets=("cifar10",), preset="overnight"),
    Piece("bat-o-mem-cifar100", "bat", "memorization contrast: K subset models, CIFAR-100",
          stage="memorization:cifar100", datasets=("cifar100",), preset="overnight"),
    *[Piece(f"bat-o-{name}", "bat", title, only=(name,),
            claims=(("bat.atypical-clean-not-robust", "bat.atypical-hurts-typical",
                     "bat.tradeoff") if name == "typical+0" else ()),
            needs=(("bat-o-mem-cifar10",) if name != "typical+0" else
                   ("bat-o-mem-cifar10", "bat-o-mem-cifar100", "bat-o-pgd_at", "bat-o-trades",
                    "bat-o-bat-a1", "bat-o-bat-a2")),
            datasets=("cifar10",), preset="overnight")
      for name, title in (("pgd_at", "PGD-AT with per-epoch curves (finding (a))"),
                          ("trades", "TRADES"),
                          ("bat-a1", "BAT alpha 1, the published atypical split"),
                          ("bat-a2", "BAT alpha 2"),
                          ("typical+0", "PGD-AT on the typical examples only (finding (b))"))],
    # HE's pilot (20 epochs, seed 0; the preset took 30 after it): trained in the campaign's
    # first session, its evaluation left for last, for the chapter's accuracy-per-hour frontier
    Piece("he-o-pilot-e20", "he", "HE pilot: PGD-AT, 20 epochs, seed 0 (the frontier's first "
          "point; its training is done, its evaluation resumes)",
          overrides={**_HE_RUN, "epochs": 20}, only=("pgd_at",), stage="evaluate",
          datasets=("cifar10",), preset="overnight"),
]
BY_ID = {p.id: p for p in PIECES + OVERNIGHT_PIECES}


def pieces_for(preset: str) -> list[Piece]:
    """The pieces that cut ``preset`` ("gpu": ``PIECES``, "overnight": ``OVERNIGHT_PIECES``)."""
    out = [p for p in PIECES + OVERNIGHT_PIECES if p.preset == preset]
    if not out:
        raise ValueError(f"no campaign pieces for preset {preset!r}: "
                         "use 'gpu' or 'overnight'")
    return out

# --dry-run: the same pieces at the smoke preset, cut further to toy size
DRY_OVERRIDES = {
    "he": dict(n_train=128, n_test=40, n_aa=0, val_size=16, eps_grid=[0.0, 8.0],
               batch_size=32, train_steps=2, eval_steps=2),
    "intro": dict(n_train=300, n_test=50, eval_steps=3, train_steps=2),
    "lmt": dict(n_train=200, n_test=30, n_attack=30, pgd_steps=2, cw_steps=2, cw_search=1),
    "advprop": dict(n_train=64, n_test=50, n_corrupt=20, widths=[4], eps_grid=[1],
                    corruptions=["gaussian_noise"], severities=[1], batch_size=32),
    "bat": dict(n_train=200, n_val=50, n_test=60, curve_test=60, mem_k=3, mem_epochs=1, epochs=1),
}
DRY_PIECES = ("he-pgd",)   # the pieces a dry run executes (then packs, ingests, publishes)


def preset_for(dry_run: bool, piece: Piece | None = None) -> str:
    """The chapter preset a piece runs: smoke for a dry run, else the piece's own."""
    return "smoke" if dry_run else (piece.preset if piece is not None else "gpu")


def piece_overrides(piece: Piece, dry_run: bool = False) -> dict:
    base = dict(DRY_OVERRIDES.get(piece.chapter, {})) if dry_run else {}
    out = {**base, **piece.overrides}
    if dry_run and piece.chapter == "he" and piece.only is None:
        out["width"] = 4
    if dry_run and piece.chapter == "advprop" and piece.only is not None:
        out["widths"] = [4]
    return out


def piece_config(piece: Piece, dry_run: bool = False) -> dict:
    """The chapter's resolved config for this piece (strict: an unknown override raises)."""
    spec = experiments.get(piece.chapter).SPEC
    return spec.resolve(preset_for(dry_run, piece), **piece_overrides(piece, dry_run))


def spec_hash(piece: Piece, dry_run: bool = False) -> str:
    payload = json.dumps({"piece": dataclasses.asdict(piece),
                          "config": piece_config(piece, dry_run),
                          "repro": repro.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]



def weight(piece: Piece) -> float:
    """Claims a piece decides, each paper's headline claim counted twice (``HEADLINE``)."""
    return sum(HEADLINE.get(c, 1) for c in piece.claims)
