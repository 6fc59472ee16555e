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
    if piece.stage.startswith("memorization-shard:"):
        return _shard_present(piece, entry, ledger, dry_run, published_root)
    return all(_run_present(piece.chapter, f, published_root, piece.stage == "train")
               for f in entry["folders"])


def _shard_present(piece: Piece, entry: dict, ledger: dict, dry_run: bool,
                   published_root: Path | None) -> bool:
    """A shard of subset models (never published) is there while each of its model files is
    in the local cache, or once the piece that merges the shards is done (its estimate is
    published; the models are not needed again)."""
    from repro import memorization
    from repro.campaign.pieces import BY_ID, piece_config
    from repro.experiments.bat import mem_k_for
    if any(is_done(q, ledger, dry_run, published_root) for q in BY_ID.values()
           if piece.id in q.needs and q.stage.startswith("memorization:")):
        return True
    dataset, shard = piece.stage.split(":", 1)[1].split(":")
    k = mem_k_for(piece_config(piece, dry_run), dataset)
    models = results.results_root() / piece.chapter / entry["folders"][0] / "models"
    return all(memorization.model_path(models, i).exists()
               for i in memorization.shard_models(k, memorization.parse_shard(shard)))
