"""Estimates from counted operations: forward-pass equivalents per job, FLOPs per pass
(counted on the meta device), seconds at a measured or stated rate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from repro.campaign.pieces import BY_ID, Piece, piece_config

# Counting (see the package docstring): the H200's measured rate and stated efficiencies.
H200_BF16_FLOPS = 788e12   # measured 8192^3 bf16 matmul, KINDS.md (2026-10-28)
EFFICIENCY_64 = 0.12       # stated: fraction of that reached by a 64-channel ResNet step
LAUNCH_S = 4e-6            # stated: launch overhead per module per forward-equivalent batch
CLEAN_FRACTION = 0.8       # stated: AutoAttack's first attack runs on correctly classified
ROBUST_FRACTION = 0.45     # images, the later ones only on those still robust
PIECE_OVERHEAD_S = 20.0    # per piece: python + torch import, CUDA init, data load
RUN_OVERHEAD_S = 1.0       # stated, per trained model: setup, the dataset's copy to the GPU,
                           # per-epoch checkpoints, evaluation batches copied from the CPU
TRAIN_SIZE = {"mnist": 60000, "cifar10": 50000, "cifar100": 50000}
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}
CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100}
# Forward-equivalent passes per attacked image of AutoAttack's attacks: APGD-CE (100
# iterations, forward + input gradient) on the correctly classified images; then, on those
# still robust, APGD-T (9 targets x 100) for 'fast', plus FAB-T (9 x 100, ~3 passes each:
# forward + two-class Jacobian) and Square (5000 forward queries) for 'standard'.
AA_FIRST = 2 * 100
AA_LATER = {"fast": 2 * 900, "standard": 2 * 900 + 3 * 900 + 5000}


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
        if piece is not None and piece.only is not None and name not in piece.only:
            continue
        base = name[:-3] if name.endswith("_he") else name
        jobs.append(_train(arch, n, cfg["epochs"], per[base], cfg["batch_size"],
                           cfg["val_size"], what=f"{name} train"))
        ev = nt * (1 + 2 * _pgd_passes(s, cfg["restarts"]))          # clean, CE and C&W PGD
        # eps curve: the point at the attack's own eps reuses the attack stage (1 restart)
        ev += sum(1 for e in cfg["eps_grid"] if e and not (
            e == cfg["eps"] and cfg["restarts"] == 1)) * nt * _pgd_passes(s)
        ev += min(nt, he.GEOMETRY_MAX) * (2 * s + 2)                   # feature geometry
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


def _atypical_fraction(cfg: dict) -> float:
    """The share of atypical training examples, for the typical+f runs' sizes: the published
    split's where its scores are on disk (CIFAR-10: 10.8%), else a stated guess of 0.3."""
    if cfg["split_source"] == "official":
        from repro import typicality
        try:
            cal = typicality.calibration(cfg["t"])
            if cfg["dataset"] == "cifar100":
                return cal.fraction
            return float((typicality.reference(cfg["dataset"], "cscore") < cal.threshold).mean())
        except (typicality.NoOfficialScoresError, FileNotFoundError):
            pass
    return 0.3


def workload_bat(cfg: dict, piece: Piece | None = None) -> list[Job]:
    stage = piece.stage if piece is not None else "all"
    jobs = []
    if stage.startswith("memorization-shard:"):   # models i, i + N, ... of the K
        from repro import memorization
        from repro.experiments.bat import mem_k_for
        ds, shard = stage.split(":", 1)[1].split(":")
        n = _n_train(cfg["n_train"], ds, cfg["n_val"])
        k = len(memorization.shard_models(mem_k_for(cfg, ds), memorization.parse_shard(shard)))
        per = 3 if cfg["mem_method"] == "standard" else 2 * cfg["train_steps"] + 3
        arch = Arch(cfg["mem_arch"], cfg["mem_width"], ds)
        return [Job(arch, k * (cfg["mem_epochs"] * n * cfg["mem_fraction"] * per + n
                               + cfg["n_test"]), cfg["mem_batch_size"],
                    f"{k} subset models {ds}", models=k)]
    n = _n_train(cfg["n_train"], cfg["dataset"], cfg["n_val"])
    nt = cfg["n_test"]
    mem_sets = []
    if stage in ("all",) or stage == f"memorization:{cfg['dataset']}":
        mem_sets.append((cfg["dataset"], True))
    if cfg["contrast"] != "none" and (stage == "all" or stage == f"memorization:{cfg['contrast']}"):
        mem_sets.append((cfg["contrast"], False))
    from repro.experiments.bat import mem_k_for
    sharded = piece is not None and f"{piece.id}-shard0" in BY_ID   # its models: the shards
    for ds, proxy in mem_sets:
        arch = Arch(cfg["mem_arch"], cfg["mem_width"], ds)
        m = n * cfg["mem_fraction"]
        per = 3 if cfg["mem_method"] == "standard" else 2 * cfg["train_steps"] + 3
        k = mem_k_for(cfg, ds)
        if not (sharded and ds == cfg["dataset"]):   # else the shard pieces train them
            jobs.append(Job(arch, k * (cfg["mem_epochs"] * m * per + n + nt),
                            cfg["mem_batch_size"], f"{k} subset models {ds}", models=k))
        if proxy:
            jobs.append(Job(arch, cfg["mem_epochs"] * (n * 3 + n) + 2 * (n + nt),
                            cfg["mem_batch_size"], f"proxy {ds}"))
    if stage in ("all", "run", "train", "evaluate"):
        arch = Arch(cfg["arch"], cfg["width"], cfg["dataset"])
        k, s = cfg["train_steps"], cfg["eval_steps"]
        runs = [("pgd_at", 2 * k + 3, n), ("trades", 2 * k + 7, n)]
        runs += [(f"bat-a{a:g}", 2 * k + 3, n) for a in cfg["alphas"]]
        atyp = _atypical_fraction(cfg)
        runs += [(f"typical+{f:g}", 2 * k + 3, n * (1 - atyp * (1 - f)))
                 for f in cfg["atypical_fractions"] if f < 1]
        if piece is not None and piece.only is not None:
            runs = [r for r in runs if r[0] in piece.only]
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
    """The jobs of ``piece``: a ``train`` piece's training jobs, an ``evaluate`` piece's
    evaluation jobs (its training is the piece before it), else all."""
    jobs = WORKLOADS[piece.chapter](piece_config(piece, dry_run), piece)
    if piece.stage == "train":
        return [j for j in jobs if not j.what.endswith("eval")]
    if piece.stage == "evaluate":
        return [j for j in jobs if j.what.endswith("eval")]
    return jobs


def piece_seconds(piece: Piece, dry_run: bool = False, rates: dict | None = None) -> float:
    return PIECE_OVERHEAD_S * (not dry_run) + sum(
        job_seconds(j, rates) for j in piece_jobs(piece, dry_run))
