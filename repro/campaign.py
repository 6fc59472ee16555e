"""The GPU campaign: every chapter's ``gpu`` preset cut into pieces that fit a lent H200 window,
one command that runs the pending pieces inside a budget, and results that come back and
publish on a CPU machine.

    python -m repro campaign plan [--calibrate]          # ordered pieces, estimates, done?
    python -m repro campaign run --budget-s 540 --out DIR   # on the GPU machine
    python -m repro campaign ingest DIR/*.tar.gz DIR/campaign.json   # on a CPU machine
    python -m repro campaign run --dry-run --out DIR     # the same path, toy size, on a CPU

**Pieces are data** (``PIECES``): a chapter, the parameter overrides that restrict the
chapter's ``gpu`` preset to some of its runs (``variants``, ``datasets``/``methods``, ``only``;
none of these enters a run's cache key, so a piece's runs are the full preset's runs), the
claim ids (``repro.claims`` / the chapter's ``CLAIMS``) its results decide, and the pieces it
needs first. A piece runs ``repro.experiments.<chapter>.run("gpu", **overrides)`` (BAT's
memorization pieces call ``bat.memorization_run``; BAT's ``run`` has no ``only``).

**Estimates come from counted operations.** For each architecture at its width, input size
and class count, ``forward_flops`` counts one forward pass with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (2 FLOPs per multiply-add).
Each chapter's ``workload`` function counts, from the resolved config, the forward-pass
equivalents a run needs: a training step on an image costs 3 (forward + backward with weight
gradients), an attack step 2 (forward + input gradient; the attacks freeze the weights), a
plain forward 1; TRADES adds a clean forward and trains on two images, ALP/AdvProp train on
two; validation, the evaluation attacks (steps x restarts), the eps curves and AutoAttack
(``AA_FIRST``/``AA_LATER``: iterations times targets, on the ``CLEAN_FRACTION`` of images
the first attack sees and the ``ROBUST_FRACTION`` still robust for the later ones) are
counted the same way. Seconds on the H200 = FLOPs / (``H200_BF16_FLOPS`` x ``efficiency(width)``) + launches x ``LAUNCH_S``:

* ``H200_BF16_FLOPS`` = 788 TFLOP/s, the 8192^3 bf16 matrix product measured on this
  workplace's H200 (device docs, KINDS.md, 2026-10-28);
* ``efficiency`` = 0.12 at 64 channels, x sqrt(channels/64) below (small convolutions on
  32x32 images use the tensor cores poorly): our stated assumption, re-measured by every
  preflight;
* ``LAUNCH_S`` = 4 us per module per forward-equivalent pass over a batch (eager mode
  launches about one kernel per module forward and two backward, at ~3-5 us each; the
  modules are counted: ~0.25 ms for a PreAct-ResNet-18, ~0.05 ms for the MNIST CNN); it
  dominates the small MNIST and width-16 models.

``plan --calibrate`` times a forward+backward here on the CPU and predicts each chapter's
*laptop* preset with the same pass counts at that measured CPU rate, next to the wall time
its publication recorded: the ratio says how far the counting model is from a real run.
The preflight of ``campaign run`` times a few attack and training steps of every
(architecture, width, batch) that the pending pieces use on the device itself and
re-estimates each piece from those rates before it decides what fits.

**What comes back.** Each finished piece is one ``piece-<id>.tar.gz`` (the run folders'
small files only: ``publish.SMALL_FILES``, never checkpoints), plus ``campaign.json`` (the
session's manifest: library digest, stamp commit, device, torch, each piece's status and
estimated vs measured seconds) and ``preflight.json``: at most 8 files, each < 16 MB.

**Ingest** checks every run (folder key = ``results.config_key(config)``, the manifest's
library digest = this checkout's ``repro/`` digest, a CUDA device unless the manifest is a
dry run, the torch version) and copies the run folders into
``book/published/<chapter>/results/``, where ``results.find_run`` finds them, so ``publish``
renders the chapter without retraining; the pieces it completed go into the ledger
``book/published/campaign-ledger.json``. ``plan`` and ``run`` skip pieces the ledger lists
whose runs are all present: a second lucky session continues where the first stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import repro
from repro import experiments, results
from repro.data import PROJECT_ROOT

# ----------------------------------------------------------------------------- constants

H200_BF16_FLOPS = 788e12   # measured 8192^3 bf16 matmul, KINDS.md (2026-10-28)
EFFICIENCY_64 = 0.12       # stated: fraction of that reached by a 64-channel ResNet step
LAUNCH_S = 4e-6            # stated: launch overhead per module per forward-equivalent batch
CLEAN_FRACTION = 0.8       # stated: AutoAttack's first attack runs on correctly classified
ROBUST_FRACTION = 0.45     # images, the later ones only on those still robust
PIECE_OVERHEAD_S = 20.0    # per piece: python + torch import, CUDA init, data load
RUN_OVERHEAD_S = 1.0       # stated, per trained model: setup, the dataset's copy to the GPU,
                           # per-epoch checkpoints, evaluation batches copied from the CPU
SAFETY = 1.2               # a piece starts only if 1.2 x its estimate fits what is left
PACK_RESERVE_S = 15.0      # kept for packing at the end
MAX_PIECE_S = 8 * 60       # design rule: each piece <= 8 H200-minutes
TOTAL_GPU_S = 60 * 60      # design rule: the whole book <= 60 H200-minutes
MAX_FILES, MAX_FILE_BYTES = 8, 16_000_000   # what the device tool brings back
MAX_PIECE_FILES = MAX_FILES - 3   # + campaign.json, preflight.json and a tee'd log
# A lent window: 15 device-minutes, less start-up (~2 min), two staging calls (~1.5 min),
# transfers and idle gaps (~1 min): one `campaign run` command of at most 9 minutes, from
# which the preflight (~1 min) is taken.
WINDOW_RUN_S = 540
PREFLIGHT_S = 60

TRAIN_SIZE = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
# Forward-equivalent passes per attacked image of AutoAttack's attacks: APGD-CE (100
# iterations, forward + input gradient) on the correctly classified images; then, on those
# still robust, APGD-T (9 targets x 100) for 'fast', plus FAB-T (9 x 100, ~3 passes each:
# forward + two-class Jacobian) and Square (5000 forward queries) for 'standard'.
AA_FIRST = 2 * 100
AA_LATER = {"fast": 2 * 900, "standard": 2 * 900 + 3 * 900 + 5000}

# Each paper's main claim counts twice when pieces are ordered (one per paper; the intro's
# textbook checks have none): the first window should settle a headline, not only the cheap
# MNIST checks.
HEADLINE = {"he.aa-gain": 2, "lmt.larger-radius": 2, "advprop.clean-gain-b7": 2,
            "bat.tradeoff": 2}

# Not installed on the GPU machine (device docs, issue 16): a dry run's pieces run without them.
NOT_ON_DEVICE = ("papermill", "nbformat", "nbclient", "jupyter_client", "ipykernel", "IPython",
                 "pandas", "seaborn")

LEDGER = results.PUBLISHED_ROOT / "campaign-ledger.json"
PREFLIGHT_RECORD = results.PUBLISHED_ROOT / "campaign-preflight.json"


# ----------------------------------------------------------------------------- pieces (data)

@dataclass(frozen=True)
class Piece:
    id: str
    chapter: str
    title: str
    overrides: dict = field(default_factory=dict)   # restrict the gpu preset (not in run keys)
    only: tuple | None = None                        # run names, for chapters whose run() has it
    stage: str = "run"                               # "run" or "memorization:<dataset>" (BAT)
    claims: tuple = ()                               # claim ids this piece's results decide
    needs: tuple = ()                                # piece ids that must be done first
    datasets: tuple = ()                             # what must be staged on the machine


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
BY_ID = {p.id: p for p in PIECES}

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


def preset_for(dry_run: bool) -> str:
    return "smoke" if dry_run else "gpu"


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
    return spec.resolve(preset_for(dry_run), **piece_overrides(piece, dry_run))


def spec_hash(piece: Piece, dry_run: bool = False) -> str:
    payload = json.dumps({"piece": dataclasses.asdict(piece),
                          "config": piece_config(piece, dry_run),
                          "repro": repro.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- counting

@dataclass(frozen=True)
class Arch:
    name: str            # registry name
    width: int | None
    dataset: str

    def label(self) -> str:
        return f"{self.name}(w={self.width}) {self.dataset}"


@dataclass
class Job:
    """Forward-pass equivalents of one architecture at one batch size (see module doc)."""
    arch: Arch
    passes: float        # image-passes, forward-equivalent
    batch: int
    what: str
    models: int = 0      # trained models in the job: RUN_OVERHEAD_S each


_FLOPS: dict = {}
_MODULES: dict = {}


def _build_kwargs(arch: Arch) -> dict:
    from repro.data import MEAN_STD
    kw: dict[str, Any] = {"mean_std": MEAN_STD[arch.dataset], "width": arch.width}
    if arch.name == "small_cnn" and arch.dataset != "mnist":
        kw.update(in_size=SHAPES[arch.dataset][-1], norm="bn")
    return kw


def build_model(arch: Arch):
    from repro.models import build
    if arch.name in ("wrn34_10", "wrn34_20"):
        return build("wrn", CLASSES[arch.dataset], depth=34,
                     widen_factor=10 if arch.name == "wrn34_10" else 20,
                     **_build_kwargs(arch))
    return build(arch.name, CLASSES[arch.dataset], **_build_kwargs(arch))


def forward_flops(arch: Arch) -> float:
    """FLOPs of one forward pass of one image (counted on the meta device, 2 per MAC)."""
    if arch not in _FLOPS:
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        with torch.device("meta"):
            model = build_model(arch)
        x = torch.zeros(1, *SHAPES[arch.dataset], device="meta")
        with FlopCounterMode(display=False) as fc:
            model(x)
        _FLOPS[arch] = float(fc.get_total_flops())
        _MODULES[arch] = sum(1 for m in model.modules() if not list(m.children()))
    return _FLOPS[arch]


def modules(arch: Arch) -> int:
    """Leaf modules of the architecture (about one kernel launch each, forward)."""
    forward_flops(arch)
    return _MODULES[arch]


def channels(arch: Arch) -> int:
    if arch.name == "preact_resnet18":
        return arch.width or 64
    if arch.name == "wrn16_4":
        return 4 * (arch.width or 16)
    if arch.name.startswith("wrn34"):
        return 160
    return arch.width or 16


def efficiency(arch: Arch) -> float:
    """Stated fraction of the H200's measured bf16 rate a training step reaches."""
    return EFFICIENCY_64 * min(1.0, math.sqrt(channels(arch) / 64))


def job_seconds(job: Job, rates: dict | None = None) -> float:
    """Estimated seconds of a job: measured rate (s per forward-equivalent image at this
    architecture, from a preflight) when given, else counted FLOPs at the stated rate."""
    key = job.arch.label()
    fixed = job.models * RUN_OVERHEAD_S
    if rates and key in rates:
        return fixed + job.passes * rates[key]
    compute = job.passes * forward_flops(job.arch) / (H200_BF16_FLOPS * efficiency(job.arch))
    return fixed + compute + job.passes / job.batch * LAUNCH_S * modules(job.arch)


def _train(arch, n, epochs, per_image, batch, val=0, val_steps=10, val_every=1, what="train"):
    """Training: per-image passes each epoch, plus the trainer's validation (clean + PGD)."""
    passes = epochs * n * per_image
    if val and val_every:
        passes += epochs / val_every * val * (2 * val_steps + 2)
    return Job(arch, passes, batch, what, models=1)


def _aa(version, n):
    if version == "none" or n <= 0:
        return 0
    return n * (1 + CLEAN_FRACTION * AA_FIRST + ROBUST_FRACTION * AA_LATER[version])


def _pgd_passes(steps, restarts=1):
    return restarts * (2 * steps + 1)


def _n_train(cfg_n, dataset, held_out):
    full = TRAIN_SIZE[dataset] - held_out
    return full if cfg_n is None else min(cfg_n, full)


def workload_he(cfg: dict, piece: Piece | None = None) -> list[Job]:
    from repro.experiments import he
    arch = Arch(cfg["architecture"], cfg["width"] if cfg["architecture"] == "preact_resnet18"
                else None, "cifar10")
    n = _n_train(cfg["n_train"], "cifar10", 1000)
    k, s, nt = cfg["train_steps"], cfg["eval_steps"], cfg["n_test"]
    per = {"pgd_at": 2 * k + 3, "trades": 1 + 2 * k + 6, "alp": 2 * k + 6}
    jobs = []
    for name in he.run_names(cfg["variants"]):
        base = name[:-3] if name.endswith("_he") else name
        jobs.append(_train(arch, n, cfg["epochs"], per[base], cfg["batch_size"],
                           cfg["val_size"], what=f"{name} train"))
        ev = nt * (1 + 2 * _pgd_passes(s, cfg["restarts"]))          # clean, CE and C&W PGD
        ev += sum(1 for e in cfg["eps_grid"] if e) * nt * _pgd_passes(s)   # eps curve
        ev += nt * (2 * s + 2)                                         # feature geometry
        if cfg["autoattack"] != "none":
            ev += _aa(cfg["autoattack"], min(cfg["n_aa"], nt))
        jobs.append(Job(arch, ev, 256, f"{name} eval"))
    return jobs


def workload_intro(cfg: dict, piece: Piece | None = None) -> list[Job]:
    arch = Arch("small_cnn", None, "mnist")
    n = _n_train(cfg["n_train"], "mnist", 5000)
    s, nt = cfg["eval_steps"], cfg["n_test"]
    jobs = []
    for method, per in (("standard", 3), ("pgd_at", 2 * cfg["train_steps"] + 3)):
        jobs.append(_train(arch, n, cfg["epochs"], per, 100, 500, what=f"{method} train"))
        ev = nt * (1 + 3 + _pgd_passes(s, cfg["restarts"]))
        ev += sum(1 for e in cfg["eps_grid"] if e) * nt * _pgd_passes(s)
        if method == "pgd_at":   # sanity report on 500 images, AutoAttack on n_test
            ev += 500 * (_pgd_passes(s) + _pgd_passes(10 * s) + _pgd_passes(s) + 1000) \
                + _aa("fast", 500)
            ev += _aa(cfg["autoattack"], nt)
        jobs.append(Job(arch, ev, 256, f"{method} eval"))
    return jobs


def workload_lmt(cfg: dict, piece: Piece | None = None) -> list[Job]:
    """One training and one evaluation job per trained model (``lmt.variants``: baselines
    once, LMT / LMT++ once per c). LMT's training-time bound adds, per optimisation step,
    ``power_steps`` forward + transpose passes of ``power_block`` vectors through every conv
    (spread over the batch); certificates cost one forward per test image; the attacks (C&W,
    DeepFool, L2 PGD at each radius, the in-ball soundness PGD) run on ``n_attack`` images."""
    from repro.experiments import lmt
    jobs = []
    for ds in cfg["datasets"]:
        setup = lmt.dataset_setup(ds, cfg)
        arch = Arch("small_cnn" if ds == "mnist" else "wrn16_4", setup["width"], ds)
        n, batch = _n_train(cfg["n_train"], ds, 500), setup["batch_size"]
        nt, na = cfg["n_test"], min(cfg["n_attack"], cfg["n_test"])
        pgd = _pgd_passes(cfg["pgd_steps"], cfg["pgd_restarts"]) + 1
        for row, method, _ in lmt.variants(setup, cfg):
            per = 3 + (2 * cfg["power_steps"] * cfg["power_block"] / batch
                       if method.startswith("lmt") else 0)
            jobs.append(_train(arch, n, setup["epochs"], per, batch, 500,
                               what=f"{ds}-{row} train"))
            ev = nt + na * (2 * cfg["cw_steps"] * cfg["cw_search"] + 0.3 * 50 * 12)
            ev += (sum(1 for r in setup["radii"] if r) + 1) * na * pgd
            jobs.append(Job(arch, ev, 256, f"{ds}-{row} eval"))
    return jobs


def workload_advprop(cfg: dict, piece: Piece | None = None) -> list[Job]:
    from repro.experiments import advprop
    n = _n_train(cfg["n_train"], "cifar10", 200)
    nt, s = cfg["n_test"], cfg["eval_steps"]
    jobs = []
    for name, method, width, seed, eps in advprop.plan(cfg):
        if piece is not None and piece.only is not None and name not in piece.only:
            continue
        arch = Arch(cfg["arch"], width, "cifar10")
        per = 3 if method == "vanilla" else 2 * (eps + 1) + 6
        jobs.append(_train(arch, n, cfg["epochs"], per, cfg["batch_size"], 200, 3,
                           what=f"{name} train"))
        ev = nt * (1 + _pgd_passes(s)) * (2 if method == "advprop" else 1)
        ev += cfg["n_corrupt"] * len(cfg["corruptions"]) * len(cfg["severities"])
        jobs.append(Job(arch, ev, 256, f"{name} eval"))
    return jobs


def workload_bat(cfg: dict, piece: Piece | None = None) -> list[Job]:
    stage = piece.stage if piece is not None else "all"
    jobs = []
    n = _n_train(cfg["n_train"], cfg["dataset"], cfg["n_val"])
    nt = cfg["n_test"]
    mem_sets = []
    if stage in ("all",) or stage == f"memorization:{cfg['dataset']}":
        mem_sets.append((cfg["dataset"], True))
    if cfg["contrast"] != "none" and (stage == "all" or stage == f"memorization:{cfg['contrast']}"):
        mem_sets.append((cfg["contrast"], False))
    for ds, proxy in mem_sets:
        arch = Arch(cfg["mem_arch"], cfg["mem_width"], ds)
        m = n * cfg["mem_fraction"]
        per = 3 if cfg["mem_method"] == "standard" else 2 * cfg["train_steps"] + 3
        jobs.append(Job(arch, cfg["mem_k"] * (cfg["mem_epochs"] * m * per + n + nt),
                        cfg["mem_batch_size"], f"{cfg['mem_k']} subset models {ds}",
                        models=cfg["mem_k"]))
        if proxy:
            jobs.append(Job(arch, cfg["mem_epochs"] * (n * 3 + n) + 2 * (n + nt),
                            cfg["mem_batch_size"], f"proxy {ds}"))
    if stage in ("all", "run"):
        arch = Arch(cfg["arch"], cfg["width"], cfg["dataset"])
        k, s = cfg["train_steps"], cfg["eval_steps"]
        runs = [("pgd_at", 2 * k + 3, n), ("trades", 2 * k + 7, n)]
        runs += [(f"bat-a{a:g}", 2 * k + 3, n) for a in cfg["alphas"]]
        atyp = 0.3   # stated guess of the atypical fraction for the typical+f runs' sizes
        runs += [(f"typical+{f:g}", 2 * k + 3, n * (1 - atyp * (1 - f)))
                 for f in cfg["atypical_fractions"] if f < 1]
        for name, per, size in runs:
            jobs.append(_train(arch, size, cfg["epochs"], per, cfg["batch_size"],
                               cfg["n_val"], s, what=f"{name} train"))
            ev = nt * (1 + _pgd_passes(s, cfg["restarts"])) + _aa(cfg["autoattack"], nt)
            if name == "pgd_at":
                ev += cfg["epochs"] * min(cfg["curve_test"], nt) * (1 + _pgd_passes(s))
            jobs.append(Job(arch, ev, 256, f"{name} eval"))
    return jobs


WORKLOADS = {"he": workload_he, "intro": workload_intro, "lmt": workload_lmt,
             "advprop": workload_advprop, "bat": workload_bat}


def piece_jobs(piece: Piece, dry_run: bool = False) -> list[Job]:
    return WORKLOADS[piece.chapter](piece_config(piece, dry_run), piece)


def piece_seconds(piece: Piece, dry_run: bool = False, rates: dict | None = None) -> float:
    return PIECE_OVERHEAD_S * (not dry_run) + sum(
        job_seconds(j, rates) for j in piece_jobs(piece, dry_run))


# ----------------------------------------------------------------------------- done / ledger

def library_digest(root: Path | None = None) -> str:
    """sha256 over the library's Python sources (path and content): what 'same code' means
    on a machine without git."""
    base = Path(root or PROJECT_ROOT) / "repro"
    h = hashlib.sha256()
    for f in sorted(base.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def read_ledger(path: Path | None = None) -> dict:
    f = Path(path or LEDGER)
    return json.loads(f.read_text()) if f.exists() else {}


def _run_present(chapter: str, folder: str, published_root: Path | None = None) -> bool:
    pub = Path(published_root or results.PUBLISHED_ROOT)
    return any((d / "DONE").exists() for d in (pub / chapter / "results" / folder,
                                              results.results_root() / chapter / folder))


def is_done(piece: Piece, ledger: dict, dry_run: bool = False,
            published_root: Path | None = None) -> bool:
    """Listed in the ledger for this exact piece + config + library version, with every run
    folder present (published or in the local cache)."""
    entry = ledger.get(piece.id)
    if not entry or entry.get("spec_hash") != spec_hash(piece, dry_run):
        return False
    return all(_run_present(piece.chapter, f, published_root) for f in entry["folders"])


def weight(piece: Piece) -> float:
    """Claims a piece decides, each paper's headline claim counted twice (``HEADLINE``)."""
    return sum(HEADLINE.get(c, 1) for c in piece.claims)


def order_pieces(pieces=None, dry_run: bool = False, rates: dict | None = None) -> list[Piece]:
    """Greedy order by (weighted) claims decided per estimated minute, never before a
    piece's needs.

    A piece is valued with the not-yet-placed pieces that depend on it (what it unblocks):
    claims of the chain over seconds of the chain, so a prerequisite that decides nothing
    by itself (e.g. the memorization estimate) ranks with the claims it leads to."""
    pieces = list(pieces or PIECES)
    secs = {p.id: max(1.0, piece_seconds(p, dry_run, rates)) for p in pieces}
    ids = {p.id for p in pieces}

    def chain(p, placed):
        out, todo = {p.id}, [p.id]
        while todo:
            cur = todo.pop()
            for q in pieces:
                if cur in q.needs and q.id not in out and q.id not in placed:
                    out.add(q.id)
                    todo.append(q.id)
        return out

    def value(p, placed):
        c = chain(p, placed)
        return (sum(weight(BY_ID[i]) for i in c) / (sum(secs[i] for i in c) / 60),
                weight(p) / (secs[p.id] / 60), -secs[p.id])

    out, placed = [], set()
    while len(out) < len(pieces):
        ready = [p for p in pieces if p.id not in placed
                 and all(n in placed or n not in ids for n in p.needs)]
        best = max(ready, key=lambda p: value(p, placed))
        out.append(best)
        placed.add(best.id)
    return out


# ----------------------------------------------------------------------------- plan

def plan_rows(dry_run: bool = False, rates: dict | None = None, ledger: dict | None = None,
              published_root: Path | None = None) -> list[dict]:
    ledger = read_ledger() if ledger is None else ledger
    rows = []
    for p in order_pieces(dry_run=dry_run, rates=rates):
        jobs = piece_jobs(p, dry_run)
        s = piece_seconds(p, dry_run, rates)
        flops = sum(j.passes * forward_flops(j.arch) for j in jobs)
        rows.append({"id": p.id, "chapter": p.chapter, "title": p.title,
                     "runs": [j.what.rsplit(" ", 1)[0] for j in jobs if j.what.endswith("train")
                              or "subset" in j.what or j.what.startswith("proxy")],
                     "archs": sorted({j.arch.label() for j in jobs}),
                     "pflop": flops / 1e15, "seconds": s, "claims": list(p.claims),
                     "needs": list(p.needs),
                     "done": is_done(p, ledger, dry_run, published_root)})
    return rows


def largest_runnable(budget: float = WINDOW_RUN_S) -> float:
    """The largest estimate a piece may have and still start in an empty window's run."""
    return budget - PREFLIGHT_S - PACK_RESERVE_S


def first_window(rows: list[dict], budget: float = WINDOW_RUN_S) -> list[str]:
    """The pending pieces a `campaign run --budget-s WINDOW_RUN_S` would start, in order."""
    left, done, chosen = largest_runnable(budget), {r["id"] for r in rows if r["done"]}, []
    for r in rows:
        if r["done"] or any(n not in done for n in r["needs"]):
            continue
        if SAFETY * r["seconds"] <= left and len(chosen) < MAX_PIECE_FILES:
            chosen.append(r["id"])
            done.add(r["id"])
            left -= r["seconds"]
    return chosen


def format_plan(rows: list[dict], calibration: dict | None = None) -> str:
    lines = ["GPU campaign: the gpu presets in pieces (estimated H200 seconds from counted "
             "operations; see repro/campaign.py's docstring)",
             f"  rate: {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 (measured matmul, device "
             f"docs) x efficiency {EFFICIENCY_64} at 64 channels (x sqrt(c/64) below; stated), "
             f"+ {LAUNCH_S * 1e6:.0f} us launch per module per forward-equivalent batch, "
             f"+ {PIECE_OVERHEAD_S:.0f} s start-up per piece", ""]
    head = f"{'#':>2} {'piece':<17} {'est s':>6} {'PFLOP':>6} {'w/min':>6} {'status':<8} claims"
    lines.append(head + "   (w/min: claims decided per minute, headline claims x2)")
    total = 0.0
    for i, r in enumerate(rows, 1):
        total += r["seconds"]
        rate = weight(BY_ID[r["id"]]) / (max(1.0, r["seconds"]) / 60)
        status = "done" if r["done"] else "pending"
        lines.append(f"{i:>2} {r['id']:<17} {r['seconds']:>6.0f} {r['pflop']:>6.2f} "
                     f"{rate:>6.2f} {status:<8} {', '.join(r['claims']) or '-'}")
        lines.append(f"{'':>3} {r['title']}; runs: {', '.join(r['runs'])}"
                     + (f"; after {', '.join(r['needs'])}" if r["needs"] else ""))
    worst = max(r["seconds"] for r in rows)
    lines += ["", f"total {total / 60:.1f} H200-minutes (budget {TOTAL_GPU_S / 60:.0f}); "
              f"largest piece {worst / 60:.1f} min (limit {MAX_PIECE_S / 60:.0f}; a piece "
              f"starts in a {WINDOW_RUN_S} s run only if {SAFETY} x its estimate <= "
              f"{largest_runnable():.0f} s)",
              f"next window (`campaign run --budget-s {WINDOW_RUN_S}`, ~{PREFLIGHT_S} s "
              f"preflight): {', '.join(first_window(rows)) or 'nothing pending'}"]
    nxt = first_window(rows)
    heads = [i for i in nxt if any(c in HEADLINE for c in BY_ID[i].claims)]
    if heads:
        lines[-1] += f" (it runs {', '.join(heads)} first: headline claims)"
    if nxt:
        needed = sorted({d for i in nxt for d in BY_ID[i].datasets})
        lines.append(f"stage for it: python3 tools/gpu_stage.py {' '.join(needed)}   "
                     "(then tools/gpu-window.md)")
    if calibration:
        lines += ["", f"CPU calibration (this machine, {calibration['threads']} threads): "
                  "seconds per forward-equivalent image pass, measured per architecture at "
                  f"its training batch size (<= {calibration['batch']}):"]
        lines += [f"  {a:<34} {v * 1e3:8.3f} ms" for a, v in calibration["s_per_pass"].items()]
        lines.append("each chapter's laptop preset predicted as counted passes x those "
                     "rates, against its publication's compute wall time:")
        for c, v in calibration["chapters"].items():
            ratio = f"{v['measured_s'] / v['predicted_s']:.2f}x" if v["measured_s"] else "-"
            lines.append(f"  {c:<8} predicted {v['predicted_s']:>8.0f} s  published "
                         f"{v['measured_s'] or 0:>8.0f} s  measured/predicted {ratio}")
    return "\n".join(lines)


def cpu_calibration(batch: int = 128) -> dict:
    """Check the pass counts against real runs: time an attack and a training step of every
    architecture the *laptop* presets use, here on the CPU (``time_arch``), predict each
    chapter's laptop preset as passes x measured seconds per pass, and set that beside the
    compute wall time its publication recorded. (BAT's subset models are left out of both:
    the prediction skips them and the measured time drops the publication's
    ``upstream_wall_time_s``.)"""
    import torch
    from repro import publish
    device = torch.device("cpu")
    rates: dict[str, float] = {}
    chapters = {}
    for chapter in experiments.CHAPTERS:
        rec = publish.record(chapter)
        cfg = experiments.get(chapter).SPEC.resolve("laptop")
        jobs = [j for j in WORKLOADS[chapter](cfg, None) if "subset" not in j.what]
        for j in jobs:   # at the run's own training batch size (at most ``batch``)
            if j.arch.label() not in rates:
                rates[j.arch.label()] = time_arch(j.arch, min(j.batch, batch), device,
                                                  steps=2)["s_per_pass"]
        pred = sum(j.passes * rates[j.arch.label()] for j in jobs)
        measured = (rec["compute_wall_time_s"] - (rec.get("upstream_wall_time_s") or 0)
                    if rec and rec.get("preset") == "laptop" else None)
        chapters[chapter] = {"predicted_s": pred, "measured_s": measured}
    return {"batch": batch, "threads": torch.get_num_threads(),
            "s_per_pass": rates, "chapters": chapters}


# ----------------------------------------------------------------------------- preflight

def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_arch(arch: Arch, batch: int, device, steps: int = 3) -> dict:
    """Seconds per forward-equivalent image of ``arch``: a PGD attack step (2 passes) and a
    training step (3 passes), bf16 autocast + channels_last on CUDA, after one warm-up."""
    import torch
    from repro import attacks
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = build_model(arch).to(device, memory_format=fmt)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *SHAPES[arch.dataset], device=device, generator=g)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES[arch.dataset], (batch,), device=device, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def attack(n):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=n, generator=g)

    def train(n):
        model.train()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    out = {}
    for name, fn, passes in (("attack", attack, 2), ("train", train, 3)):
        fn(1)
        _sync(device)
        t = time.perf_counter()
        fn(steps)
        _sync(device)
        out[name] = (time.perf_counter() - t) / (steps * batch * passes)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"arch": arch.label(), "batch": batch, "s_per_pass_attack": out["attack"],
            "s_per_pass_train": out["train"],
            "s_per_pass": (2 * out["attack"] + 3 * out["train"]) / 5,
            "achieved_tflops": forward_flops(arch) / ((2 * out["attack"] + 3 * out["train"]) / 5)
            / 1e12}


def _matmul_check(device, n: int) -> dict:
    import torch
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    ref = (a.double() @ b.double())
    got = (a.bfloat16() @ b.bfloat16()).double()
    rel = float((got - ref).norm() / ref.norm())
    ab, bb = a.bfloat16(), b.bfloat16()
    ab @ bb
    _sync(device)
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        ab @ bb
    _sync(device)
    dt = (time.perf_counter() - t) / reps
    return {"n": n, "rel_error_vs_float64": rel, "ok": rel < 2e-2,
            "tflops": 2 * n ** 3 / dt / 1e12}


_COMPILE_SNIPPET = """
import json, sys, time, torch
t = time.perf_counter()
device, backend = sys.argv[1], sys.argv[2]
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).to(device)
x = torch.rand(4, 3, 8, 8, device=device)
with torch.no_grad():
    err = float((torch.compile(model, backend=backend)(x) - model(x)).abs().max())
print(json.dumps({"max_abs_diff": err, "seconds": time.perf_counter() - t}))
"""


def _start_compile_check(device, backend: str) -> tuple:
    """Start the ``torch.compile`` check in a child process (it compiles on the CPU cores
    while the preflight times the GPU); ``_finish_compile_check`` collects it."""
    proc = subprocess.Popen([sys.executable, "-c", _COMPILE_SNIPPET, str(device), backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, backend, time.perf_counter()


def _finish_compile_check(started: tuple, timeout: float = 120.0) -> dict:
    """Does ``torch.compile`` work here? It compiles beside the pieces and must not eat the
    window: past ``timeout`` seconds since its start the child is killed, and on any failure
    the campaign trains eager (it does anyway: no chapter sets ``TrainConfig.compile``)."""
    proc, backend, t = started
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t)))
        if proc.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip()
                               else f"exit {proc.returncode}")
        got = json.loads(out.strip().splitlines()[-1])
        return {"backend": backend, "ok": got["max_abs_diff"] < 1e-3, **got}
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to eager
        proc.kill()
        proc.communicate()
        return {"backend": backend, "ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                "seconds": time.perf_counter() - t, "fallback": "eager"}


def _call(fn, **kwargs):
    """Call a benchmark's ``run`` with the keyword arguments it (still) accepts; errors are
    recorded, never raised (another module owns the benchmark's signature)."""
    import inspect
    try:
        params = inspect.signature(fn).parameters
        return fn(**{k: v for k, v in kwargs.items() if k in params})
    except Exception as e:  # noqa: BLE001 - a benchmark failure must not stop the campaign
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def hot_paths(device) -> dict:
    """The calls ``sync_check`` watches: a PGD attack with restarts, an FGSM-RS step, and an
    epoch of augmented training batches from data resident on ``device``."""
    import torch
    from repro import attacks, data, models
    model = models.build("preact_resnet18", 10, mean_std=data.MEAN_STD["cifar10"],
                         width=8).to(device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(64, 3, 32, 32, device=device, generator=g)
    y = torch.randint(0, 10, (64,), device=device, generator=g)
    xs = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    ys = torch.randint(0, 10, (256,), device=device, generator=g)
    return {
        "pgd": lambda: attacks.pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=5,
                                   restarts=2, generator=g),
        "fgsm_rs": lambda: attacks.fgsm(model, x, y, eps=8 / 255, alpha=10 / 255,
                                        random_start=True, generator=g),
        "train_batches": lambda: list(data.train_batches(xs, ys, 64, seed=0, epoch=0)),
    }


def sync_check(device) -> dict:
    """Host synchronisations inside the hot paths (``hot_paths``), counted by CUDA's sync
    debug mode (not checked on a CPU). Each should be 0: a sync stalls the launch queue."""
    import warnings
    import torch
    if device.type != "cuda":
        return {"checked": False, "why": "sync debug mode needs CUDA"}
    out = {"checked": True}
    for name, fn in hot_paths(device).items():
        fn()   # warm-up: first calls may allocate or pick kernels
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        msgs = [str(w.message).splitlines()[0] for w in caught
                if "synchroniz" in str(w.message).lower()]
        out[name] = {"syncs": len(msgs), "first": msgs[:2]}
    return out


def _safe(fn, *args, **kwargs):
    """A preflight step that fails is recorded, never raised: the window must go on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def preflight(pieces: list[Piece], device, dry_run: bool, log=print,
              budget_s: float | None = None) -> dict:
    """CUDA + bf16 work, torch.compile works or falls back, every (architecture, batch) the
    pending pieces use timed on this device, and the two benchmarks."""
    import torch
    from repro.benchmarks import pgd as bench_pgd
    from repro.benchmarks import train as bench_train
    rec: dict[str, Any] = {"kind": "repro-preflight", "device": results.device_name(device), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "dry_run": dry_run,
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    if device.type == "cuda":
        rec["capability"] = list(torch.cuda.get_device_capability(device))
        rec["bf16_supported"] = torch.cuda.is_bf16_supported()
    rec["matmul_bf16"] = _safe(_matmul_check, device, 256 if dry_run else 8192)
    log(f"[preflight] bf16 matmul: {rec['matmul_bf16']}")
    compiling = _start_compile_check(device, "eager" if dry_run else "inductor")
    rec["sync_check"] = _safe(sync_check, device)
    log(f"[preflight] host syncs in hot paths: {rec['sync_check']}")
    seen, timings, counted = set(), [], 0.0
    for p in pieces:   # only pieces that could start: counted estimates up to 2x the budget
        counted += piece_seconds(p, dry_run)
        if budget_s is not None and counted > 2 * budget_s and timings:
            break
        for j in piece_jobs(p, dry_run):
            key = (j.arch, j.batch)
            if j.what.endswith("eval") or key in seen:
                continue
            seen.add(key)
            t = _safe(time_arch, j.arch, j.batch, device, steps=1 if dry_run else 3)
            log(f"[preflight] {t}")
            if "error" not in t:   # an architecture that failed keeps its counted estimate
                timings.append(t)
    rec["timings"] = timings
    rec["rates"] = {}
    for t in timings:   # the slowest batch size measured per architecture
        rec["rates"][t["arch"]] = max(rec["rates"].get(t["arch"], 0.0), t["s_per_pass"])
    rec["bench_pgd"] = _call(bench_pgd.run, device=str(device),
                             batch_size=32 if dry_run else 512, iters=1 if dry_run else 10,
                             warmup=1, width=8 if dry_run else 64)
    log(f"[preflight] bench pgd: {rec['bench_pgd']}")
    rec["bench_train"] = _call(bench_train.run, device=str(device),
                               batch_size=16 if dry_run else 128, steps=1 if dry_run else 10,
                               warmup=1 if dry_run else 3, width=8 if dry_run else 64)
    log(f"[preflight] bench train: {rec['bench_train']}")
    rec["compile"] = compiling   # collected by the caller: the compiler may still be busy
    rec["seconds"] = time.perf_counter() - t0
    return rec


# ----------------------------------------------------------------------------- one piece

def run_piece(piece: Piece, dry_run: bool = False, progress: bool = False) -> dict:
    """Compute one piece in this process; returns {name: run folder} of the runs it made or
    reused (the caller packs those)."""
    module = experiments.get(piece.chapter)
    preset, overrides = preset_for(dry_run), piece_overrides(piece, dry_run)
    if piece.stage.startswith("memorization:"):
        from repro.experiments import common
        dataset = piece.stage.split(":", 1)[1]
        import torch
        cfg = module.SPEC.resolve(preset, **overrides)
        torch.manual_seed(cfg["seed"])       # as bat.run does before its memorization runs
        device = common.pick_device(cfg["device"])
        ds = common.load_dataset(dataset, n_train=cfg["n_train"], n_test=cfg["n_test"],
                                 n_val=cfg["n_val"])
        main = dataset == cfg["dataset"]
        mem = module.memorization_run(cfg, ds, device, progress, with_proxy=main)
        runs = {"memorization" if main else "memorization_contrast": mem.path}
        if main:
            runs["proxy"] = module.proxy_run(cfg, ds, device, progress).path
        return {k: str(v) for k, v in runs.items()}
    kwargs = dict(overrides)
    if piece.only is not None:
        kwargs["only"] = list(piece.only)
    out = module.run(preset, progress=progress, **kwargs)
    return {name: r["path"] for name, r in out["runs"].items()}


# ----------------------------------------------------------------------------- run

def _small_files(folder: Path):
    from repro.publish import SMALL_FILES
    for rel in SMALL_FILES:
        f = folder / rel
        if f.is_file():
            yield rel, f


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def pack_piece(piece_id: str, chapter: str, folders: dict, out: Path, log_text: str,
               manifest: dict) -> Path:
    """One tar.gz: <chapter>/<run folder>/<small files>, piece.json (manifest) and log.txt
    (the piece's output, last 1 MB); refuses a file of 16 MB or more."""
    dest = out / f"piece-{piece_id}.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for name, path in folders.items():
            path = Path(path)
            for rel, f in _small_files(path):
                tar.add(f, arcname=f"{chapter}/{path.name}/{rel}")
        blob = json.dumps({**manifest, "piece": piece_id, "chapter": chapter,
                           "runs": {n: Path(p).name for n, p in folders.items()}},
                          indent=1).encode()
        for name, data in (("piece.json", blob), ("log.txt", log_text[-1_000_000:].encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if dest.stat().st_size >= MAX_FILE_BYTES:
        raise RuntimeError(f"{dest} is {dest.stat().st_size / 1e6:.1f} MB (limit 16 MB)")
    return dest


def read_stamp() -> dict:
    """The commit the tree was sent from: ``.device/<part>/stamp.json`` (written by
    tools/gpu-stage.sh; the device machine has no .git), else git here."""
    for f in sorted((PROJECT_ROOT / ".device").glob("*/stamp.json")):
        stamp = json.loads(f.read_text())
        # staged before the library changed? then its commit does not name this code
        stamp["matches_library"] = stamp.get("library_digest") == library_digest()
        return stamp
    return {"commit": results.git_commit(), "source": "git"}


def campaign_run(budget_s: float, out: Path, *, dry_run: bool = False,
                 pieces: list[str] | None = None, work: Path | None = None, log=print) -> dict:
    """Preflight, then the pending pieces that fit the budget (each in its own process,
    killed at the budget), then pack. Returns the manifest written to out/campaign.json."""
    import torch
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work or results.results_root() / "_campaign")   # logs, records: not brought back
    work.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("piece-*.tar.gz")) + [out / "campaign.json"]:
        stale.unlink(missing_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    if not dry_run and device.type != "cuda":
        raise SystemExit("campaign run needs CUDA (use --dry-run on a CPU)")
    ledger = read_ledger()
    chosen = [BY_ID[i] for i in pieces] if pieces else [
        p for p in order_pieces(dry_run=dry_run)
        if not is_done(p, ledger, dry_run) and (not dry_run or p.id in DRY_PIECES)]
    manifest: dict[str, Any] = {
        "kind": "repro-campaign", "dry_run": dry_run, "budget_s": budget_s,
        "repro_version": repro.__version__, "library_digest": library_digest(),
        "stamp": read_stamp(), "device": results.device_name(device),
        "torch": torch.__version__, "started": _dt.datetime.now(_dt.timezone.utc)
        .isoformat(timespec="seconds"), "pieces": {}}
    if not pieces:   # a window runs its headline pieces first (they are why it was lent)
        first = set(first_window(plan_rows(dry_run, ledger=ledger), budget_s))
        chosen.sort(key=lambda p: not (p.id in first and any(c in HEADLINE for c in p.claims)))
    try:
        pre = preflight(chosen, device, dry_run, log, budget_s=budget_s)
    except Exception as e:  # noqa: BLE001 - without rates the counted estimates still hold
        pre = {"kind": "repro-preflight", "error": f"{type(e).__name__}: {e}"[:500],
               "rates": {}, "dry_run": dry_run, "compile": None}
        log(f"[preflight] failed: {pre['error']}")
    compiling = pre.pop("compile")
    if compiling is None:
        pre["compile"] = {"ok": False, "error": "not started"}
    elif compiling[0].poll() is not None:   # done already: record it now
        pre["compile"] = _finish_compile_check(compiling)
        log(f"[preflight] torch.compile: {pre['compile']}")
    (out / "preflight.json").write_text(json.dumps(pre, indent=1, default=str))
    rates = pre["rates"]
    done_now = {p.id for p in PIECES if is_done(p, ledger, dry_run)}
    env = dict(os.environ)
    if dry_run:
        env["REPRO_CAMPAIGN_BLOCK"] = ",".join(NOT_ON_DEVICE)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    for p in chosen:
        est0 = piece_seconds(p, dry_run)
        est = piece_seconds(p, dry_run, rates) + (PIECE_OVERHEAD_S if dry_run else 0)
        entry = {"chapter": p.chapter, "estimate_counted_s": round(est0, 1),
                 "estimate_preflight_s": round(est, 1), "spec_hash": spec_hash(p, dry_run)}
        manifest["pieces"][p.id] = entry
        left = budget_s - (time.monotonic() - start) - PACK_RESERVE_S
        missing = [n for n in p.needs if n not in done_now]
        if missing:
            entry["status"] = f"skipped: needs {', '.join(missing)}"
        elif SAFETY * est > left:
            entry["status"] = f"skipped: {SAFETY} x {est:.0f} s would not fit {left:.0f} s"
        elif len([e for e in manifest["pieces"].values() if e.get("file")]) >= MAX_PIECE_FILES:
            entry["status"] = "skipped: no file left to bring it back"
        if "status" in entry:
            log(f"[campaign] {p.id}: {entry['status']}")
            continue
        try:
            _run_one(p, entry, est, est0, left, dry_run, env, work, out, manifest, done_now, log)
        except Exception as e:  # noqa: BLE001 - the runner goes on with the next piece
            entry["status"] = f"runner error: {type(e).__name__}: {e}"[:500]
            log(f"[campaign] {p.id}: {entry['status']}")
    _finish(manifest, pre, compiling, budget_s, start, out, log)
    return manifest


def _run_one(p, entry, est, est0, left, dry_run, env, work, out, manifest, done_now, log):
    """Run one piece in a child process killed at ``left`` seconds; pack what it made."""
    record = work / f"piece-{p.id}.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "repro", "campaign", "piece", p.id, "--record", str(record)]
    if dry_run:
        cmd.append("--dry-run")
    log(f"[campaign] {p.id}: starting (estimate {est:.0f} s, {left:.0f} s left)")
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(PROJECT_ROOT), timeout=max(1.0, left),
                              capture_output=True, text=True)
        entry["returncode"] = proc.returncode
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        entry["returncode"] = "timeout"
        text = _text(e.stdout) + _text(e.stderr)
    (work / f"piece-{p.id}.log").write_text(text)
    tail = text[-3000:]
    entry["measured_s"] = round(time.monotonic() - t, 1)
    got = json.loads(record.read_text()) if record.exists() else None
    if got and entry["returncode"] == 0:
        entry["status"] = "done"
        entry["runs"] = got["runs"]
        done_now.add(p.id)
    else:
        entry["status"] = "failed" if entry["returncode"] != "timeout" else "timeout"
        entry["log_tail"] = tail
        got = {"runs": _finished_runs(p)}   # runs finished before the failure still count
        entry["runs"] = got["runs"]
    if entry["runs"]:
        f = pack_piece(p.id, p.chapter, entry["runs"], out, text,
                       {k: manifest[k] for k in ("library_digest", "stamp", "device",
                                                 "torch", "repro_version", "dry_run")}
                       | {"status": entry["status"], "spec_hash": entry["spec_hash"]})
        entry["file"] = f.name
    log(f"[campaign] {p.id}: {entry['status']} in {entry['measured_s']:.0f} s "
        f"(estimated {est0:.0f} s counted, {est:.0f} s after preflight)")


def _finish(manifest, pre, compiling, budget_s, start, out, log):
    if "compile" not in pre:   # the compile check ran beside the pieces; wait briefly
        left = budget_s - (time.monotonic() - start) - 5
        pre["compile"] = _finish_compile_check(
            compiling, timeout=time.perf_counter() - compiling[2] + max(1.0, min(30.0, left)))
        log(f"[preflight] torch.compile: {pre['compile']}")
        (out / "preflight.json").write_text(json.dumps(pre, indent=1, default=str))
    manifest["compile"] = pre["compile"]
    manifest["wall_s"] = round(time.monotonic() - start, 1)
    (out / "campaign.json").write_text(json.dumps(manifest, indent=1, default=str))
    files = [f for f in out.iterdir() if f.is_file()]
    if len(files) > MAX_FILES:
        log(f"[campaign] warning: {len(files)} files in {out}; the device tool brings back 8")


def _finished_runs(piece: Piece) -> dict:
    """Run folders of this piece's chapter finished in this session's cache (after a piece
    failed or timed out part-way). The cache is per session, so these are this campaign's."""
    root = results.results_root() / piece.chapter
    return {d.name: str(d) for d in sorted(root.glob("*")) if (d / "DONE").exists()} \
        if root.exists() else {}


# ----------------------------------------------------------------------------- ingest

class IngestError(RuntimeError):
    pass


def _check_run(folder: Path, manifest: dict, allow_cpu: bool) -> list[str]:
    problems = []
    cfg = json.loads((folder / "config.json").read_text())
    key = folder.name.rsplit("-", 1)[-1]
    if results.config_key(cfg) != key:
        problems.append(f"{folder.name}: key {key} != config_key(config.json) "
                        f"{results.config_key(cfg)} (other library version or edited config)")
    prov = json.loads((folder / "provenance.json").read_text())
    if not str(prov.get("device", "")).startswith("cuda") and not allow_cpu:
        problems.append(f"{folder.name}: computed on {prov.get('device')!r}, not a GPU")
    if prov.get("torch") != manifest.get("torch"):
        problems.append(f"{folder.name}: torch {prov.get('torch')} != the session's "
                        f"{manifest.get('torch')}")
    if prov.get("repro_version") != repro.__version__:
        problems.append(f"{folder.name}: repro {prov.get('repro_version')} != {repro.__version__}")
    if not (folder / "DONE").exists():
        problems.append(f"{folder.name}: not finished (no DONE)")
    return problems


def ingest(files: list[Path], *, published_root: Path | None = None,
           results_layout: bool = False, ledger_path: Path | None = None,
           allow_dry_run: bool = False, log=print) -> dict:
    """Check and place the runs of campaign archives (see the module doc). With
    ``results_layout`` the runs go to ``<root>/<chapter>/<folder>`` (a results cache, as in
    the dry run) instead of ``<root>/<chapter>/results/<folder>``. Refuses, with the reasons,
    any archive whose library digest differs from this checkout's or whose runs fail a
    check (or that comes from a dry run, unless ``allow_dry_run``); nothing of a refused
    archive is placed, the others are, and then ``IngestError`` lists the refusals."""
    import tempfile
    root = Path(published_root or results.PUBLISHED_ROOT)
    ledger_path = Path(ledger_path or root / "campaign-ledger.json")
    ledger = read_ledger(ledger_path)
    digest = library_digest()
    placed: dict[str, list[str]] = {}
    refused: list[str] = []
    for f in map(Path, files):
        if f.name.endswith(".json"):
            rec = json.loads(f.read_text())
            if rec.get("kind") == "repro-preflight" and not rec.get("dry_run"):
                root.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, root / "campaign-preflight.json")
                log(f"[ingest] {f} -> {root / 'campaign-preflight.json'}")
            if rec.get("kind") == "repro-campaign":
                for pid, e in rec.get("pieces", {}).items():
                    log(f"[ingest] {pid:<17} {e.get('status')}: estimated "
                        f"{e.get('estimate_counted_s')} s counted, "
                        f"{e.get('estimate_preflight_s')} s after preflight, measured "
                        f"{e.get('measured_s', '-')} s")
            continue
        if not f.name.endswith(".tar.gz"):
            log(f"[ingest] {f.name}: not a campaign archive, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(f) as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if m.name.startswith(("/", "..")) or ".." in
                   Path(m.name).parts or not (m.isfile() or m.isdir())]
            if bad or any(m.name.endswith(".pt") for m in members):
                refused.append(f"{f}: unsafe or checkpoint members {bad[:3]}")
                continue
            tar.extractall(tmp)
            man = json.loads((Path(tmp) / "piece.json").read_text())
            problems = []
            if man.get("library_digest") != digest:
                problems.append(f"library digest {man.get('library_digest')} (stamp commit "
                                f"{man.get('stamp', {}).get('commit')}) != this checkout's "
                                f"{digest}: check out that commit to ingest")
            chapter = man["chapter"]
            folders = [Path(tmp) / chapter / name for name in man["runs"].values()]
            if man.get("dry_run") and not allow_dry_run:
                problems.append("a dry run's toy results (computed on a CPU) never enter the book")
            for folder in folders:
                problems += _check_run(folder, man, allow_cpu=allow_dry_run and bool(man.get("dry_run")))
            if problems:
                refused.append(f"{f} refused:\n  " + "\n  ".join(problems))
                log(f"[ingest] {refused[-1]}")
                continue
            for folder in folders:
                dest = (root / chapter / folder.name) if results_layout else \
                    (root / chapter / "results" / folder.name)
                if dest.exists():
                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(folder, dest)
                prov_f = dest / "provenance.json"
                prov = json.loads(prov_f.read_text())
                if not prov.get("commit") and man.get("stamp", {}).get("commit"):
                    prov["commit"] = man["stamp"]["commit"]
                    prov["commit_source"] = "campaign stamp (the device machine has no git)"
                    results._write_json(prov_f, prov)
                placed.setdefault(man["piece"], []).append(folder.name)
            if man.get("status") == "done":
                ledger[man["piece"]] = {"spec_hash": man["spec_hash"],
                                        "folders": [p.name for p in folders],
                                        "device": man["device"], "torch": man["torch"],
                                        "commit": man.get("stamp", {}).get("commit"),
                                        "ingested": _dt.datetime.now(_dt.timezone.utc)
                                        .isoformat(timespec="seconds")}
            log(f"[ingest] {f.name}: {man['piece']} ({man.get('status')}), "
                f"{len(folders)} runs -> {root / chapter}")
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    results._write_json(ledger_path, ledger)
    if refused:
        raise IngestError("\n".join(refused) + (f"\n(placed meanwhile: {placed})" if placed else ""))
    return {"placed": placed, "ledger": ledger}


def _cells(piece: Piece, keys: list[str], dry_run: bool) -> set:
    """The combinations of the list-valued restricting parameters a piece covers."""
    import itertools
    cfg = piece_config(piece, dry_run)
    return set(itertools.product(*[tuple(cfg[k]) for k in keys]))


def publish_overrides(chapter: str, ledger: dict, dry_run: bool = False) -> dict | None:
    """Overrides under which ``publish`` renders ``chapter`` from done pieces only (so it
    recomputes nothing): all of the chapter's pieces done -> {} (the whole preset); some ->
    the union of their list-valued restrictions if the done pieces cover every combination
    of it (HE's variants; LMT's datasets x methods), else the restrictions of the done piece
    that decides the most claims; None when no done piece can be published alone (AdvProp's
    ``only`` pieces, BAT's stages: their chapters publish once all their pieces are in)."""
    mine = [p for p in PIECES if p.chapter == chapter]
    done = [p for p in mine if p.id in ledger]
    if not done:
        return None
    if len(done) == len(mine):
        return {}
    if any(p.only is not None or p.stage != "run" or
           any(not isinstance(v, list) for v in p.overrides.values()) for p in done):
        return None
    keys = sorted({k for p in done for k in p.overrides})
    covered = set().union(*(_cells(p, keys, dry_run) for p in done))
    merged = {k: [] for k in keys}
    for p in done:
        cfg = piece_config(p, dry_run)
        for k in keys:
            merged[k] += [x for x in cfg[k] if x not in merged[k]]
    import itertools
    if set(itertools.product(*[tuple(merged[k]) for k in keys])) <= covered:
        return merged
    best = max(done, key=lambda p: (weight(p), -len(p.overrides)))
    cfg = piece_config(best, dry_run)
    return {k: list(cfg[k]) for k in keys}


# ----------------------------------------------------------------------------- dry run

def run_dry(out: Path, budget_s: float = 110.0, log=print) -> dict:
    """plan -> run (preflight, pieces, packing) -> ingest -> publish, at toy size on the CPU,
    with every cache in ``out`` (nothing of the book or the local cache is touched)."""
    from repro import publish
    out = Path(out)
    t0 = time.monotonic()
    old = os.environ.get("REPRO_RESULTS")
    device_side, cpu_side = out / "device-results", out / "cpu-results"
    try:
        os.environ["REPRO_RESULTS"] = str(device_side)
        rows = plan_rows(dry_run=True, ledger={})
        log(format_plan(rows))
        manifest = campaign_run(budget_s, out / "back", dry_run=True, work=out / "work",
                                log=log)
        files = sorted((out / "back").glob("*"))
        os.environ["REPRO_RESULTS"] = str(cpu_side)
        ing = ingest(files, published_root=cpu_side, results_layout=True,
                     ledger_path=out / "ledger.json", allow_dry_run=True, log=log)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep)
        published = {}
        for chapter in sorted({BY_ID[p].chapter for p in ing["placed"]}):
            ov = publish_overrides(chapter, ing["ledger"], dry_run=True)
            if ov is None:
                continue
            piece = next(p for p in PIECES if p.chapter == chapter and p.id in ing["ledger"])
            ov = {**DRY_OVERRIDES.get(chapter, {}), **piece_overrides(piece, True), **ov}
            rec = publish.publish(chapter, "smoke", ov, root=out / "published",
                                  allow_smoke=True, progress=False, log=log)
            published[chapter] = rec
    finally:
        if old is None:
            os.environ.pop("REPRO_RESULTS", None)
        else:
            os.environ["REPRO_RESULTS"] = old
    new_local = sorted(str(p) for p in cpu_side.rglob("DONE")
                       if p.parent.name not in {f for v in ing["placed"].values() for f in v})
    summary = {"manifest": manifest, "placed": ing["placed"],
               "published": {c: r["runs"] for c, r in published.items()},
               "recomputed_on_cpu_side": new_local, "seconds": time.monotonic() - t0}
    log(f"[dry-run] {json.dumps({k: v for k, v in summary.items() if k != 'manifest'}, default=str)}")
    return summary


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("plan", help="the ordered pieces, their estimates and status")
    a.add_argument("--calibrate", action="store_true",
                   help="time this CPU and compare predicted with published laptop times")
    a.add_argument("--json", action="store_true")
    a = sub.add_parser("run", help="preflight, the pending pieces that fit, pack")
    a.add_argument("--budget-s", type=float, default=WINDOW_RUN_S)
    a.add_argument("--out", required=True)
    a.add_argument("--dry-run", action="store_true",
                   help="toy size on the CPU: plan, run, pack, ingest and publish under OUT")
    a.add_argument("--piece", action="append", help="run only these pieces (repeatable)")
    a = sub.add_parser("ingest", help="check and place campaign archives (CPU machine)")
    a.add_argument("files", nargs="+")
    a = sub.add_parser("piece", help="(internal) compute one piece in this process")
    a.add_argument("id", choices=sorted(BY_ID))
    a.add_argument("--record", required=True)
    a.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)

    if args.action == "plan":
        rows = plan_rows()
        cal = cpu_calibration() if args.calibrate else None
        print(json.dumps({"pieces": rows, "calibration": cal}, indent=1, default=str)
              if args.json else format_plan(rows, cal))
        return 0
    if args.action == "run":
        if args.dry_run:
            s = run_dry(Path(args.out))
            ok = all(e.get("status") == "done" for e in s["manifest"]["pieces"].values())
            return 0 if ok and s["published"] and not s["recomputed_on_cpu_side"] else 1
        m = campaign_run(args.budget_s, Path(args.out), pieces=args.piece)
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "log_tail"}
                          for k, v in m["pieces"].items()}, indent=1))
        return 0
    if args.action == "ingest":
        rc = 0
        try:
            ingest([Path(f) for f in args.files])
        except IngestError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 2
        ledger = read_ledger()
        for chapter in experiments.CHAPTERS:
            ov = publish_overrides(chapter, ledger)
            from repro import publish
            current = publish.record(chapter)
            if ov is not None and current and current.get("preset") == "paper":
                print(f"not publishing {chapter} at gpu: its page is a paper-preset run "
                      f"(the ingested runs are kept under book/published/{chapter}/results/)")
            elif ov is not None:
                flags = " ".join(f"-p {k} '{json.dumps(v)}'" for k, v in ov.items())
                print(f"publish with: python -m repro publish {chapter} --preset gpu {flags}".rstrip())
        return rc
    if args.action == "piece":
        # The GPU machine has no papermill, Jupyter, pandas or seaborn: the dry run blocks
        # them here (REPRO_CAMPAIGN_BLOCK), so a piece that needs one fails on the CPU first.
        for name in filter(None, os.environ.get("REPRO_CAMPAIGN_BLOCK", "").split(",")):
            sys.modules[name] = None   # `import name` now raises ImportError
        piece = BY_ID[args.id]
        t = time.monotonic()
        runs = run_piece(piece, dry_run=args.dry_run)
        Path(args.record).write_text(json.dumps({"runs": runs, "seconds": time.monotonic() - t}))
        return 0
    return 2
