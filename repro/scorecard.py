"""The reproduction scorecard: every claim of the four papers (and the introduction's checks),
the paper's number, ours, the run it came from, and a verdict, all generated from the
published results (``book/published/``) through the claims registry (``repro.claims``).

    python -m repro.scorecard book/chapters/scorecard.md     # what `make book` does

Nothing is recomputed: a chapter without a published run (or without an evaluator for a
claim) is listed as "not yet run".
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from repro import claims, experiments, publish

BADGE = {claims.REPRODUCED: "bdg-success", claims.PARTLY: "bdg-warning",
         claims.INCONCLUSIVE: "bdg-info", claims.NOT_REPRODUCED: "bdg-danger",
         claims.NOT_YET_RUN: "bdg-muted"}


def rows(root: Path | None = None, *, judge_smoke: bool = False) -> list[dict]:
    """One row per claim: paper, claim, paper value, ours, run provenance, verdict, and
    whether the run met the claim's scale floor (``floor_met``: True / False / None when not
    checked, ``floor_why``) and the smallest effect it could detect (``mde``, points, 80%
    power at a two-sided 5% level; None when the evaluator gives no interval).

    A publication at the ``smoke`` preset is not judged (its numbers mean nothing) unless
    ``judge_smoke`` (tests)."""
    out = []
    for paper, paper_claims in claims.all_claims().items():
        loaded = publish.load(claims.PAPERS[paper]["chapter"], root)
        rec, result = loaded if loaded else (None, None)
        smoke_only = rec is not None and rec["preset"] == "smoke" and not judge_smoke
        for c in paper_claims:
            o = (claims.Outcome("—", claims.NOT_YET_RUN, note="only a smoke run is published")
                 if smoke_only else c.judge(result))
            run = None
            if rec is not None and o.verdict != claims.NOT_YET_RUN:
                run = {"preset": rec["preset"], "devices": rec["devices"], "seed": rec["seed"],
                       "commits": rec["commits"], "computed": rec["computed"]}
            out.append({"paper": paper, "id": c.id, "claim": c.text,
                        "paper_value": c.paper_value, "unit": c.unit, "source": c.source,
                        "ours": o.ours, "value": o.value, "note": o.note,
                        "verdict": o.verdict, "run": run, "floor_met": o.floor_met,
                        "floor_why": o.floor_why, "mde": o.mde, "interval": o.interval,
                        "floor": (c.floor or {}).get("why", "")})
    return out


def badge(verdict: str) -> str:
    """A verdict as a coloured badge (MyST, sphinx-design)."""
    return f"{{{BADGE[verdict]}}}`{verdict}`"


def anchor(claim_id: str) -> str:
    """The label of a claim's card on the scorecard (chapters' verdict boxes link to it)."""
    return "claim-" + claim_id.replace(".", "-").replace("_", "-")


def short_device(d: str) -> str:
    return d.split(":")[0] if d else "?"


def seed_words(seed) -> str:
    """A publication record's ``seed`` in words: "seed 0", or "seeds 0, 1" for a list."""
    if isinstance(seed, (list, tuple)):
        return (f"seed {seed[0]}" if len(seed) == 1
                else "seeds " + ", ".join(str(s) for s in seed))
    return f"seed {seed}"


def _run_words(run: dict) -> str:
    return (f"`{run['preset']}`, {'/'.join(short_device(d) for d in run['devices'])}, "
            f"{seed_words(run['seed'])}")


def card(r: dict) -> list[str]:
    """One claim as a card: verdict, claim, the paper's number and ours; the floor, the
    smallest detectable effect and the run folded into a dropdown (details on demand)."""
    paper_val = r["paper_value"] + (f" ({r['unit']})" if r["unit"] else "")
    if r["source"]:
        paper_val += f" <small>— {r['source']}</small>"
    ours = r["ours"] + (f" <small>— {r['note']}</small>" if r["note"] else "")
    floor = {True: "floor met", False: "floor not met", None: "no floor check"}[r["floor_met"]]
    mde = f"detectable {r['mde']:.1f} points" if r["mde"] is not None else "no interval"
    run = f"run {_run_words(r['run'])}" if r["run"] else "no judged run"
    details = []
    if r["floor_why"]:
        details.append(f"**Scale floor:** {r['floor_why']}")
    if r["floor"] and r["floor"] not in (r["floor_why"] or ""):
        details.append(f"**Why this floor:** {r['floor']}")
    if r["mde"] is not None:
        details.append(f"**Detectable:** {r['mde']:.1f} points (the smallest true effect this "
                       "run detects with 80% power)")
    if r["run"]:
        details.append(f"**Run:** {_run_words(r['run'])}, library commit "
                       + ", ".join(f"`{c}`" for c in r["run"]["commits"])
                       + f", computed {str(r['run']['computed'])[:10]}")
    return [f"({anchor(r['id'])})=", "::::{card}", ":class-card: claim-card", "",
            f"{badge(r['verdict'])} **{r['claim']}** <small>`{r['id']}`</small>", "",
            f"**Paper:** {paper_val}", "", f"**Ours:** {ours}", "",
            f":::{{dropdown}} {floor} · {mde} · {run}", ":class-container: claim-details", "",
            "\n\n".join(details or ["No run judged this claim yet."]), ":::", "::::", ""]


def markdown(root: Path | None = None) -> str:
    table = rows(root)
    counts = Counter(r["verdict"] for r in table)
    lines = [
        "# Reproduction scorecard", "",
        "Every claim the book checks: the papers' own claims and numbers, ours, the run they "
        "come from, and a verdict. This page is generated from the published results "
        "(`book/published/`) by `python -m repro.scorecard` at build time; no number on it is "
        "typed by hand. A claim stays *not yet run* until its chapter provides an evaluator "
        "and a published (`laptop`, `overnight`, `gpu` or `paper`) run; `smoke` runs are "
        "never judged.", "",
        f"**{len(table)} claims:** " + ", ".join(
            f"{badge(v)} {counts.get(v, 0)}" for v in claims.VERDICTS), "",
        "| paper | verdicts | published run |", "|---|---|---|",
    ]
    for paper, info in claims.PAPERS.items():
        per = Counter(r["verdict"] for r in table if r["paper"] == paper)
        rec = publish.record(info["chapter"], root)
        pub = (f"`{rec['preset']}`, {'/'.join(short_device(d) for d in rec['devices'])}"
               if rec else "none yet")
        lines.append(f"| [{info['short']}](#scorecard-{paper}) | "
                     + " ".join(f"{badge(v)} {per[v]}" for v in claims.VERDICTS if per[v])
                     + f" | {pub} |")
    lines += [
        "", "**The rule.** Each claim states the paper's effect and a *scale floor* below which "
        "it is not tested (both in `repro/claims_data/`, with their sources). Estimates are "
        "paired differences over the same test images (and seeds), with a 95% interval: "
        "*reproduced* when the interval excludes 0 in the paper's direction; *partly* when "
        "the direction holds but the effect is smaller than the paper's or not significant; "
        "*not reproduced* only at or above the floor, with an interval that excludes the "
        "paper's effect; *inconclusive* below the floor, or when the interval holds both 0 "
        "and the paper's effect. *Detectable* is the smallest true effect the run would "
        "detect with 80% power (2.8 × SE; t quantiles for seed-level estimates). Each claim "
        "below is a card: its verdict, the paper's number and ours; the floor, the detectable "
        "effect and the run unfold under it.", ""]
    for paper, info in claims.PAPERS.items():
        prows = [r for r in table if r["paper"] == paper]
        chapter = info["chapter"]
        lines += [f"(scorecard-{paper})=", f"## {info['short']}", "", f"*{info['title']}*", ""]
        if chapter in experiments.CHAPTERS:
            link = f"[the {info['short']} chapter]({chapter}.ipynb)"
        else:
            link = "its chapter (not written yet)"
        rec = publish.record(chapter, root)
        if rec is None:
            lines.append(f"No published run yet for {link}.")
        else:
            devices = ", ".join(rec["devices"])
            lines.append(
                f"Published run of {link}: preset `{rec['preset']}`, device {devices}, "
                f"{seed_words(rec['seed'])}, computed {str(rec['computed'])[:10]}, "
                f"{rec['compute_wall_time_s'] / 60:.1f} min of compute.")
        lines.append("")
        for r in prows:
            lines += card(r)
    return "\n".join(lines)


def write(path: Path, root: Path | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(root))
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = write(Path(argv[0]) if argv else Path("book/chapters/scorecard.md"))
    n = Counter(r["verdict"] for r in rows())
    print(f"scorecard -> {out}: " + ", ".join(f"{v} {n.get(v, 0)}" for v in claims.VERDICTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
