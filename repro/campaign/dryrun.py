"""The whole GPU path at toy size on a CPU: plan -> run -> pack -> ingest -> publish."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from repro.data import PROJECT_ROOT
from repro.campaign.ingest import ingest, publish_overrides
from repro.campaign.pieces import BY_ID, DRY_OVERRIDES, PIECES, piece_overrides
from repro.campaign.plan import format_plan, plan_rows
from repro.campaign.window import campaign_run

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
