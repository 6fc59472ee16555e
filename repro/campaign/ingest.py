"""Ingest on a CPU machine: check and place the runs of campaign archives, record the
pieces in the ledger, and say how to publish from done pieces only."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import tarfile
from pathlib import Path

import repro
from repro import results
from repro.campaign.ledger import library_digest, read_ledger
from repro.campaign.pieces import PIECES, Piece, piece_config, weight

PREFLIGHT_RECORD = results.PUBLISHED_ROOT / "campaign-preflight.json"


# ----------------------------------------------------------------------------- ingest

class IngestError(RuntimeError):
    pass


def _check_run(folder: Path, manifest: dict, allow_cpu: bool) -> list[str]:
    problems = []
    cfg = json.loads((folder / "config.json").read_text())
    key = folder.name.rsplit("-", 1)[-1]
    if results.config_key(cfg) != key:
        problems.append(f"{folder.name}: key {key} != config_key(config.json) "
                        f"{results.config_key(cfg)} (other library version or edited config)")
    prov = json.loads((folder / "provenance.json").read_text())
    if not str(prov.get("device", "")).startswith("cuda") and not allow_cpu:
        problems.append(f"{folder.name}: computed on {prov.get('device')!r}, not a GPU")
    if prov.get("torch") != manifest.get("torch"):
        problems.append(f"{folder.name}: torch {prov.get('torch')} != the session's "
                        f"{manifest.get('torch')}")
    if prov.get("repro_version") != repro.__version__:
        problems.append(f"{folder.name}: repro {prov.get('repro_version')} != {repro.__version__}")
    if not (folder / "DONE").exists():
        problems.append(f"{folder.name}: not finished (no DONE)")
    return problems


def ingest(files: list[Path], *, published_root: Path | None = None,
           results_layout: bool = False, ledger_path: Path | None = None,
           allow_dry_run: bool = False, log=print) -> dict:
    """Check and place the runs of campaign archives (see the module doc). With
    ``results_layout`` the runs go to ``<root>/<chapter>/<folder>`` (a results cache, as in
    the dry run) instead of ``<root>/<chapter>/results/<folder>``. Refuses, with the reasons,
    any archive whose library digest differs from this checkout's or whose runs fail a
    check (or that comes from a dry run, unless ``allow_dry_run``); nothing of a refused
    archive is placed, the others are, and then ``IngestError`` lists the refusals."""
    import tempfile
    root = Path(published_root or results.PUBLISHED_ROOT)
    ledger_path = Path(ledger_path or root / "campaign-ledger.json")
    ledger = read_ledger(ledger_path)
    digest = library_digest()
    placed: dict[str, list[str]] = {}
    refused: list[str] = []
    for f in map(Path, files):
        if f.name.endswith(".json"):
            rec = json.loads(f.read_text())
            if rec.get("kind") == "repro-preflight" and not rec.get("dry_run"):
                root.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, root / "campaign-preflight.json")
                log(f"[ingest] {f} -> {root / 'campaign-preflight.json'}")
            if rec.get("kind") == "repro-campaign":
                for pid, e in rec.get("pieces", {}).items():
                    log(f"[ingest] {pid:<17} {e.get('status')}: estimated "
                        f"{e.get('estimate_counted_s')} s counted, "
                        f"{e.get('estimate_preflight_s')} s after preflight, measured "
                        f"{e.get('measured_s', '-')} s")
            continue
        if not f.name.endswith(".tar.gz"):
            log(f"[ingest] {f.name}: not a campaign archive, skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp, tarfile.open(f) as tar:
            members = tar.getmembers()
            bad = [m.name for m in members if m.name.startswith(("/", "..")) or ".." in
                   Path(m.name).parts or not (m.isfile() or m.isdir())]
            if bad or any(m.name.endswith(".pt") for m in members):
                refused.append(f"{f}: unsafe or checkpoint members {bad[:3]}")
                continue
            tar.extractall(tmp)
            man = json.loads((Path(tmp) / "piece.json").read_text())
            problems = []
            if man.get("library_digest") != digest:
                problems.append(f"library digest {man.get('library_digest')} (stamp commit "
                                f"{man.get('stamp', {}).get('commit')}) != this checkout's "
                                f"{digest}: check out that commit to ingest")
            chapter = man["chapter"]
            folders = [Path(tmp) / chapter / name for name in man["runs"].values()]
            if man.get("dry_run") and not allow_dry_run:
                problems.append("a dry run's toy results (computed on a CPU) never enter the book")
            for folder in folders:
                problems += _check_run(folder, man, allow_cpu=allow_dry_run and bool(man.get("dry_run")))
            if problems:
                refused.append(f"{f} refused:\n  " + "\n  ".join(problems))
                log(f"[ingest] {refused[-1]}")
                continue
            for folder in folders:
                dest = (root / chapter / folder.name) if results_layout else \
                    (root / chapter / "results" / folder.name)
                if dest.exists():
                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(folder, dest)
                prov_f = dest / "provenance.json"
                prov = json.loads(prov_f.read_text())
                if not prov.get("commit") and man.get("stamp", {}).get("commit"):
                    prov["commit"] = man["stamp"]["commit"]
                    prov["commit_source"] = "campaign stamp (the device machine has no git)"
                    results._write_json(prov_f, prov)
                placed.setdefault(man["piece"], []).append(folder.name)
            if man.get("status") == "done":
                ledger[man["piece"]] = {"spec_hash": man["spec_hash"],
                                        "folders": [p.name for p in folders],
                                        "device": man["device"], "torch": man["torch"],
                                        "commit": man.get("stamp", {}).get("commit"),
                                        "ingested": _dt.datetime.now(_dt.timezone.utc)
                                        .isoformat(timespec="seconds")}
            log(f"[ingest] {f.name}: {man['piece']} ({man.get('status')}), "
                f"{len(folders)} runs -> {root / chapter}")
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    results._write_json(ledger_path, ledger)
    if refused:
        raise IngestError("\n".join(refused) + (f"\n(placed meanwhile: {placed})" if placed else ""))
    return {"placed": placed, "ledger": ledger}


def _cells(piece: Piece, keys: list[str], dry_run: bool) -> set:
    """The combinations of the list-valued restricting parameters a piece covers."""
    import itertools
    cfg = piece_config(piece, dry_run)
    return set(itertools.product(*[tuple(cfg[k]) for k in keys]))


def publish_overrides(chapter: str, ledger: dict, dry_run: bool = False) -> dict | None:
    """Overrides under which ``publish`` renders ``chapter`` from done pieces only (so it
    recomputes nothing): all of the chapter's pieces done -> {} (the whole preset); some ->
    the union of their list-valued restrictions if the done pieces cover every combination
    of it (HE's variants; LMT's datasets x methods), else the restrictions of the done piece
    that decides the most claims; None when no done piece can be published alone (AdvProp's
    ``only`` pieces, BAT's stages: their chapters publish once all their pieces are in)."""
    mine = [p for p in PIECES if p.chapter == chapter]
    done = [p for p in mine if p.id in ledger]
    if not done:
        return None
    if len(done) == len(mine):
        return {}
    if any(p.only is not None or p.stage != "run" or
           any(not isinstance(v, list) for v in p.overrides.values()) for p in done):
        return None
    keys = sorted({k for p in done for k in p.overrides})
    covered = set().union(*(_cells(p, keys, dry_run) for p in done))
    merged = {k: [] for k in keys}
    for p in done:
        cfg = piece_config(p, dry_run)
        for k in keys:
            merged[k] += [x for x in cfg[k] if x not in merged[k]]
    import itertools
    if set(itertools.product(*[tuple(merged[k]) for k in keys])) <= covered:
        return merged
    best = max(done, key=lambda p: (weight(p), -len(p.overrides)))
    cfg = piece_config(best, dry_run)
    return {k: list(cfg[k]) for k in keys}
