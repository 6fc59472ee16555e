"""The verdict box at the top of a chapter page: the chapter's claims with their verdict
badges, each linking to the claim's card on the scorecard, and one sentence on the run (and
its scale) the verdicts come from.

The box is built when the book is assembled (``repro.publish.assemble``), from the same rows
as the scorecard (``repro.scorecard.rows``: the claims in ``repro/claims_data`` judged on the
published run by ``repro.claims``), so no verdict on a chapter page is typed by hand and the
box and the scorecard cannot disagree.
"""
from __future__ import annotations

from pathlib import Path

from repro import claims, publish, scorecard

BOX_CLASS = "verdicts"  # the admonition's CSS class; tools/browser_test.py looks for it
# Where a chapter's introduction ends: the line in its opening markdown that the box replaces.
MARKER = "<!-- verdicts -->"


def chapter_rows(chapter: str, root: Path | None = None) -> list[dict]:
    """The scorecard's rows of the claims that ``chapter`` tests."""
    return [r for r in scorecard.rows(root) if claims.PAPERS[r["paper"]]["chapter"] == chapter]


def scale_sentence(rows: list[dict], rec: dict | None) -> str:
    """One sentence: which run the verdicts come from, at what scale, and how many of the
    claims that run is too small to test."""
    if rec is None or rec["preset"] == "smoke":
        return ("No run of this chapter is published yet: the page shows a `smoke` execution, "
                "which proves the code runs and is never judged.")
    devices = "/".join(sorted({scorecard.short_device(d) for d in rec["devices"]}))
    run = (f"the published `{rec['preset']}` run ({devices}, "
           f"{scorecard.seed_words(rec['seed'])}, "
           f"{rec['compute_wall_time_s'] / 60:.0f} min of compute)")
    below = sum(r["floor_met"] is False for r in rows)
    if below == len(rows):
        floors = (f"it is below the scale floor of every claim, so each verdict is "
                  f"*inconclusive*, never *not reproduced*")
    elif below:
        floors = (f"it is below the scale floor of {below} of the {len(rows)} claims, which "
                  f"are therefore *inconclusive*, never *not reproduced*")
    else:
        floors = "it reaches the scale floor of every claim it judges"
    return f"Judged on {run}: {floors} ({{doc}}`the rule <scorecard>`)."


def box(chapter: str, root: Path | None = None) -> str | None:
    """The MyST markdown of ``chapter``'s verdict box (None: the chapter tests no claim)."""
    rows = chapter_rows(chapter, root)
    if not rows:
        return None
    items = [f"- {scorecard.badge(r['verdict'])} "
             f"{{ref}}`{_ref_title(r['claim'])} <{scorecard.anchor(r['id'])}>`" for r in rows]
    return "\n".join([f":::{{admonition}} Verdicts at a glance", f":class: {BOX_CLASS}", "",
                      *items, "", scale_sentence(rows, publish.record(chapter, root)), ":::"])


def _ref_title(text: str) -> str:
    """A claim's text as the title of a ``{ref}`` role (no backticks; ``<`` would end it)."""
    return text.replace("`", "'").replace("<", "‹")


def insert_box(nb: dict, chapter: str, root: Path | None = None) -> dict:
    """Put ``chapter``'s verdict box into the notebook ``nb`` (in place) right under its
    introduction: in place of the ``MARKER`` line of the markdown cells that precede the first
    code cell, else after those cells."""
    text = box(chapter, root)
    if text is None:
        return nb
    cells = nb["cells"]
    at = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    for cell in cells[:at]:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown" and MARKER in src:
            cell["source"] = src.replace(MARKER, text, 1)
            return nb
    cells.insert(at, {"cell_type": "markdown", "id": f"{chapter}-verdicts",
                      "metadata": {"tags": ["verdicts"]}, "source": text})
    return nb
