"""What is done: the library digest, the ledger of finished pieces, and the check that a
piece's runs are all present."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from repro import results
from repro.data import PROJECT_ROOT
from repro.campaign.pieces import Piece, spec_hash

LEDGER = results.PUBLISHED_ROOT / "campaign-ledger.json"


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


def _run_present(chapter: str, folder: str, published_root: Path | None = None,
                 trained_only: bool = False) -> bool:
    """A finished run folder, published or in the local cache; ``trained_only`` (a ``train``
    piece's): its finished training (train/result.json, written last) in the local cache
    suffices (weights never leave the machine)."""
    pub = Path(published_root or results.PUBLISHED_ROOT)
    local = results.results_root() / chapter / folder
    return (any((d / "DONE").exists() for d in (pub / chapter / "results" / folder, local))
            or (trained_only and (local / "train" / "result.json").exists()))


def is_done(piece: Piece, ledger: dict, dry_run: bool = False,
            published_root: Path | None = None) -> bool:
    """Listed in the ledger for this exact piece + config + library version, with every run
    folder present (published or in the local cache; a ``train`` piece's trained weights
    in the local cache: on a fresh machine it trains again)."""
    entry = ledger.get(piece.id)
    if not entry or entry.get("spec_hash") != spec_hash(piece, dry_run):
        return False
    return all(_run_present(piece.chapter, f, published_root, piece.stage == "train")
               for f in entry["folders"])
