"""The plan: pieces ordered by claims decided per minute, what a window starts, the printed
table, and the CPU calibration of the cost model."""
from __future__ import annotations

from pathlib import Path

from repro import experiments
from repro.campaign.estimate import EFFICIENCY_64, H200_BF16_FLOPS, LAUNCH_S, PIECE_OVERHEAD_S, WORKLOADS, forward_flops, piece_jobs, piece_seconds
from repro.campaign.ledger import is_done, read_ledger
from repro.campaign.pieces import BY_ID, HEADLINE, PIECES, Piece, weight
from repro.campaign.preflight import time_arch

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
             "operations; see repro/campaign/__init__.py)",
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
