"""``python -m repro campaign ...``: plan, run, status, ingest and the internal piece command.

    python -m repro campaign plan [--calibrate]                     # GPU pieces (gpu preset)
    python -m repro campaign plan --device cpu --preset overnight   # CPU pieces, CPU-hours here
    python -m repro campaign run --budget-s 540 --out DIR           # on a lent GPU
    python -m repro campaign run --device cpu --preset overnight [--budget-s N] [--commit]
    python -m repro campaign status --device cpu --preset overnight
    python -m repro campaign ingest DIR/*                           # GPU results, on a CPU
    python -m repro campaign run --dry-run --out DIR                # the GPU path at toy size
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from repro import experiments
from repro.campaign import cpu
from repro.campaign.dryrun import run_dry
from repro.campaign.ingest import IngestError, ingest, publish_overrides
from repro.campaign.ledger import read_ledger
from repro.campaign.pieces import BY_ID
from repro.campaign.plan import WINDOW_RUN_S, cpu_calibration, format_plan, plan_rows
from repro.campaign.window import campaign_run, run_piece

PRESETS = {"gpu": ("gpu",), "cpu": ("overnight",)}


def _device_preset(p: argparse.ArgumentParser, args) -> tuple[str, str]:
    preset = args.preset or PRESETS[args.device][0]
    if preset not in PRESETS[args.device]:
        p.error(f"--device {args.device} runs the preset(s) {', '.join(PRESETS[args.device])}, "
                f"not {preset!r}")
    return args.device, preset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)

    def where(a):
        a.add_argument("--device", choices=sorted(PRESETS), default="gpu",
                       help="gpu: a lent H200's pieces (gpu preset); cpu: this machine's "
                            "(overnight preset)")
        a.add_argument("--preset", help="gpu for --device gpu, overnight for --device cpu")

    a = sub.add_parser("plan", help="the ordered pieces, their estimates and status")
    where(a)
    a.add_argument("--calibrate", action="store_true",
                   help="(gpu) time this CPU and compare predicted with published laptop times")
    a.add_argument("--remeasure", action="store_true", help="(cpu) time this CPU again")
    a.add_argument("--json", action="store_true")
    a = sub.add_parser("run", help="the pending pieces (gpu: those that fit the window)")
    where(a)
    a.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds (gpu: default {WINDOW_RUN_S}; cpu: none, run to the end)")
    a.add_argument("--out", help="(gpu) where the archives for the trip back go")
    a.add_argument("--dry-run", action="store_true",
                   help="(gpu) toy size on the CPU: plan, run, pack, ingest and publish under OUT")
    a.add_argument("--piece", action="append", help="run only these pieces (repeatable)")
    a.add_argument("--commit", action="store_true",
                   help="(cpu) commit each finished piece's small files at once")
    a = sub.add_parser("status", help="(cpu) what is done, running and left")
    where(a)
    a = sub.add_parser("ingest", help="check and place campaign archives (CPU machine)")
    a.add_argument("files", nargs="+")
    a = sub.add_parser("piece", help="(internal) compute one piece in this process")
    a.add_argument("id", choices=sorted(BY_ID))
    a.add_argument("--record", required=True)
    a.add_argument("--dry-run", action="store_true")
    a.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = p.parse_args(argv)

    if args.action == "plan":
        device, preset = _device_preset(p, args)
        if device == "cpu":
            rows, r = cpu.plan_rows(preset, remeasure=args.remeasure)
            print(json.dumps({"pieces": rows, "rates": r}, indent=1, default=str)
                  if args.json else cpu.format_plan(rows, r, preset))
            return 0
        rows = plan_rows()
        cal = cpu_calibration() if args.calibrate else None
        print(json.dumps({"pieces": rows, "calibration": cal}, indent=1, default=str)
              if args.json else format_plan(rows, cal))
        return 0
    if args.action == "status":
        _, preset = _device_preset(p, args)
        if args.device != "cpu":
            p.error("status is for the CPU campaign (--device cpu); a GPU window reports in "
                    "its campaign.json")
        print(cpu.format_status(preset))
        return 0
    if args.action == "run":
        device, preset = _device_preset(p, args)
        if device == "cpu":
            status = cpu.campaign_run(preset, budget_s=args.budget_s, pieces=args.piece,
                                      commit=args.commit)
            bad = [k for k, v in status["pieces"].items()
                   if str(v.get("status", "")).startswith("failed")]
            return 1 if bad else 0
        if not args.out:
            p.error("--out is required for a GPU window (--device gpu)")
        if args.dry_run:
            s = run_dry(Path(args.out))
            ok = all(e.get("status") == "done" for e in s["manifest"]["pieces"].values())
            return 0 if ok and s["published"] and not s["recomputed_on_cpu_side"] else 1
        m = campaign_run(WINDOW_RUN_S if args.budget_s is None else args.budget_s,
                         Path(args.out), pieces=args.piece)
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
        runs = run_piece(piece, dry_run=args.dry_run, progress=args.progress)
        Path(args.record).write_text(json.dumps({"runs": runs, "seconds": time.monotonic() - t}))
        return 0
    return 2
