"""Campaigns: every chapter's preset cut into pieces that fit the machine at hand, one command
that runs the pending pieces, and results that come back into the book.

Two devices, one set of pieces-as-data:

* **GPU** (``--device gpu``, the ``gpu`` preset): pieces that fit a lent H200 window,
  preflighted, packed and brought back to a CPU machine for ingest (below).
* **CPU** (``--device cpu``, the ``overnight`` preset): pieces of about 2 hours of a 2-core
  CPU, run by one background process across sessions (``repro.campaign.cpu``).

The package, by role: ``pieces`` (the data), ``estimate`` (counted operations),
``ledger`` (what is done), ``plan`` (order and the printed table), ``preflight`` (a GPU
window's checks), ``window`` (a GPU window's run and packing), ``ingest`` (GPU results on a
CPU machine), ``dryrun`` (the GPU path at toy size), ``cpu`` (the CPU campaign), ``cli``.

    python -m repro campaign plan [--calibrate]          # ordered GPU pieces, estimates, done?
    python -m repro campaign plan --device cpu --preset overnight   # CPU pieces, CPU-hours
    python -m repro campaign run --budget-s 540 --out DIR   # on the GPU machine
    python -m repro campaign run --device cpu --preset overnight --commit   # on a CPU
    python -m repro campaign status --device cpu --preset overnight
    python -m repro campaign ingest DIR/*.tar.gz DIR/campaign.json   # on a CPU machine
    python -m repro campaign run --dry-run --out DIR     # the GPU path, toy size, on a CPU

The GPU campaign in detail (the CPU campaign's is ``repro.campaign.cpu``'s docstring):

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
from repro.campaign.pieces import (  # noqa: F401
    HEADLINE,
    Piece,
    PIECES,
    OVERNIGHT_PIECES,
    pieces_for,
    BY_ID,
    DRY_OVERRIDES,
    DRY_PIECES,
    preset_for,
    piece_overrides,
    piece_config,
    spec_hash,
    weight)
from repro.campaign.estimate import (  # noqa: F401
    H200_BF16_FLOPS,
    EFFICIENCY_64,
    LAUNCH_S,
    CLEAN_FRACTION,
    ROBUST_FRACTION,
    PIECE_OVERHEAD_S,
    RUN_OVERHEAD_S,
    TRAIN_SIZE,
    SHAPES,
    CLASSES,
    AA_FIRST,
    AA_LATER,
    Arch,
    Job,
    _build_kwargs,
    build_model,
    forward_flops,
    modules,
    channels,
    efficiency,
    job_seconds,
    _train,
    _aa,
    _pgd_passes,
    _n_train,
    workload_he,
    workload_intro,
    workload_lmt,
    workload_advprop,
    workload_bat,
    WORKLOADS,
    piece_jobs,
    piece_seconds)
from repro.campaign.ledger import (  # noqa: F401
    LEDGER,
    library_digest,
    read_ledger,
    _run_present,
    is_done)
from repro.campaign.plan import (  # noqa: F401
    SAFETY,
    PACK_RESERVE_S,
    MAX_PIECE_S,
    TOTAL_GPU_S,
    MAX_FILES,
    MAX_FILE_BYTES,
    MAX_PIECE_FILES,
    WINDOW_RUN_S,
    PREFLIGHT_S,
    order_pieces,
    plan_rows,
    largest_runnable,
    first_window,
    format_plan,
    cpu_calibration)
from repro.campaign.preflight import (  # noqa: F401
    _sync,
    time_arch,
    _matmul_check,
    _COMPILE_SNIPPET,
    _start_compile_check,
    _finish_compile_check,
    _call,
    hot_paths,
    sync_check,
    _safe,
    preflight)
from repro.campaign.window import (  # noqa: F401
    NOT_ON_DEVICE,
    run_piece,
    _small_files,
    _text,
    pack_piece,
    read_stamp,
    campaign_run,
    _run_one,
    _finish,
    _finished_runs)
from repro.campaign.ingest import (  # noqa: F401
    PREFLIGHT_RECORD,
    IngestError,
    _check_run,
    ingest,
    _cells,
    publish_overrides)
from repro.campaign.dryrun import (  # noqa: F401
    run_dry)
from repro.campaign.cli import (  # noqa: F401
    main)
