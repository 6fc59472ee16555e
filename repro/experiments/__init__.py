"""One module per chapter. Each defines ``SPEC`` (its parameters and presets) and
``run(preset="smoke", **overrides) -> dict``, which computes (or reuses from the results cache)
everything its notebook shows, without Jupyter."""
from __future__ import annotations

import importlib
from pathlib import Path

from repro.data import PROJECT_ROOT

# Chapter name -> module; the notebook is notebooks/<name>.ipynb.
CHAPTERS = {
    "intro": "repro.experiments.intro",
    "he": "repro.experiments.he",
    "lmt": "repro.experiments.lmt",
    "advprop": "repro.experiments.advprop",
    "bat": "repro.experiments.bat",
}
NOTEBOOKS = PROJECT_ROOT / "notebooks"


def get(chapter: str):
    if chapter not in CHAPTERS:
        raise KeyError(f"unknown chapter {chapter!r}; chapters: {', '.join(CHAPTERS)}")
    return importlib.import_module(CHAPTERS[chapter])


def notebook_path(chapter: str) -> Path:
    get(chapter)
    return NOTEBOOKS / f"{chapter}.ipynb"
