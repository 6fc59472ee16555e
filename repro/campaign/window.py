"""A GPU window's run: the pending pieces that fit the budget, each in a child process
killed at the budget, packed as small-file archives for the trip back."""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import repro
from repro import experiments, results
from repro.data import PROJECT_ROOT
from repro.campaign.estimate import PIECE_OVERHEAD_S, piece_seconds
from repro.campaign.ledger import is_done, library_digest, read_ledger
from repro.campaign.pieces import BY_ID, DRY_PIECES, HEADLINE, PIECES, Piece, piece_overrides, preset_for, spec_hash
from repro.campaign.plan import MAX_FILES, MAX_FILE_BYTES, MAX_PIECE_FILES, PACK_RESERVE_S, SAFETY, first_window, order_pieces, plan_rows
from repro.campaign.preflight import _finish_compile_check, preflight

# Not installed on the GPU machine (device docs, issue 16): a dry run's pieces run without them.
NOT_ON_DEVICE = ("papermill", "nbformat", "nbclient", "jupyter_client", "ipykernel", "IPython",
                 "pandas", "seaborn")


# ----------------------------------------------------------------------------- one piece

def run_piece(piece: Piece, dry_run: bool = False, progress: bool = False) -> dict:
    """Compute one piece in this process; returns {name: run folder} of the runs it made or
    reused (the caller packs those)."""
    module = experiments.get(piece.chapter)
    preset, overrides = preset_for(dry_run, piece), piece_overrides(piece, dry_run)
    if piece.stage.startswith("memorization"):
        # BAT: "memorization-shard:<data>:<i>/<N>" trains shard i/N of the K subset models
        # (one file per model); "memorization:<data>" merges them into the estimate
        from repro import memorization
        from repro.experiments import common
        import torch
        dataset, _, shard = piece.stage.split(":", 1)[1].partition(":")
        cfg = module.SPEC.resolve(preset, **overrides)
        torch.manual_seed(cfg["seed"])       # as bat.run does before its memorization runs
        device = common.pick_device(cfg["device"])
        ds = common.load_dataset(dataset, n_train=cfg["n_train"], n_test=cfg["n_test"],
                                 n_val=cfg["n_val"])
        if shard:
            st = module.train_subset_shard(cfg, ds, device, memorization.parse_shard(shard),
                                           progress)
            return {f"subsets-{dataset}": st["folder"]}
        main = dataset == cfg["dataset"]
        mem = module.memorization_run(cfg, ds, device, progress, with_proxy=main)
        runs = {"memorization" if main else "memorization_contrast": mem.path}
        if main:
            runs["proxy"] = module.proxy_run(cfg, ds, device, progress).path
        return {k: str(v) for k, v in runs.items()}
    kwargs = dict(overrides)
    if piece.only is not None:
        kwargs["only"] = list(piece.only)
    if piece.stage == "train":
        # training only; the piece's evaluation is the next piece, which finds the weights
        from repro.experiments import common
        try:
            with common.stop_after_training():
                out = module.run(preset, progress=progress, **kwargs)
        except common.TrainedOnly as stopped:
            return {stopped.name: str(stopped.path)}
        return {name: r["path"] for name, r in out["runs"].items()}   # found finished
    out = module.run(preset, progress=progress, **kwargs)
    return {name: r["path"] for name, r in out["runs"].items()}


# ----------------------------------------------------------------------------- run

def _small_files(folder: Path):
    from repro.publish import SMALL_FILES
    for rel in SMALL_FILES:
        f = folder / rel
        if f.is_file():
            yield rel, f


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def pack_piece(piece_id: str, chapter: str, folders: dict, out: Path, log_text: str,
               manifest: dict) -> Path:
    """One tar.gz: <chapter>/<run folder>/<small files>, piece.json (manifest) and log.txt
    (the piece's output, last 1 MB); refuses a file of 16 MB or more."""
    dest = out / f"piece-{piece_id}.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for name, path in folders.items():
            path = Path(path)
            for rel, f in _small_files(path):
                tar.add(f, arcname=f"{chapter}/{path.name}/{rel}")
        blob = json.dumps({**manifest, "piece": piece_id, "chapter": chapter,
                           "runs": {n: Path(p).name for n, p in folders.items()}},
                          indent=1).encode()
        for name, data in (("piece.json", blob), ("log.txt", log_text[-1_000_000:].encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if dest.stat().st_size >= MAX_FILE_BYTES:
        raise RuntimeError(f"{dest} is {dest.stat().st_size / 1e6:.1f} MB (limit 16 MB)")
    return dest


def read_stamp() -> dict:
    """The commit the tree was sent from: ``.device/<part>/stamp.json`` (written by
    tools/gpu-stage.sh; the device machine has no .git), else git here."""
    for f in sorted((PROJECT_ROOT / ".device").glob("*/stamp.json")):
        stamp = json.loads(f.read_text())
        # staged before the library changed? then its commit does not name this code
        stamp["matches_library"] = stamp.get("library_digest") == library_digest()
        return stamp
    return {"commit": results.git_commit(), "source": "git"}


def campaign_run(budget_s: float, out: Path, *, dry_run: bool = False,
                 pieces: list[str] | None = None, work: Path | None = None, log=print) -> dict:
    """Preflight, then the pending pieces that fit the budget (each in its own process,
    killed at the budget), then pack. Returns the manifest written to out/campaign.json."""
    import torch
    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work or results.results_root() / "_campaign")   # logs, records: not brought back
    work.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("piece-*.tar.gz")) + [out / "campaign.json"]:
        stale.unlink(missing_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    if not dry_run and device.type != "cuda":
        raise SystemExit("campaign run needs CUDA (use --dry-run on a CPU)")
    ledger = read_ledger()
    chosen = [BY_ID[i] for i in pieces] if pieces else [
        p for p in order_pieces(dry_run=dry_run)
        if not is_done(p, ledger, dry_run) and (not dry_run or p.id in DRY_PIECES)]
    manifest: dict[str, Any] = {
        "kind": "repro-campaign", "dry_run": dry_run, "budget_s": budget_s,
        "repro_version": repro.__version__, "library_digest": library_digest(),
        "stamp": read_stamp(), "device": results.device_name(device),
        "torch": torch.__version__, "started": _dt.datetime.now(_dt.timezone.utc)
        .isoformat(timespec="seconds"), "pieces": {}}
    if not pieces:   # a window runs its headline pieces first (they are why it was lent)
        first = set(first_window(plan_rows(dry_run, ledger=ledger), budget_s))
        chosen.sort(key=lambda p: not (p.id in first and any(c in HEADLINE for c in p.claims)))
    try:
        pre = preflight(chosen, device, dry_run, log, budget_s=budget_s)
    except Exception as e:  # noqa: BLE001 - without rates the counted estimates still hold
        pre = {"kind": "repro-preflight", "error": f"{type(e).__name__}: {e}"[:500],
               "rates": {}, "dry_run": dry_run, "compile": None}
        log(f"[preflight] failed: {pre['error']}")
    compiling = pre.pop("compile")
    if compiling is None:
        pre["compile"] = {"ok": False, "error": "not started"}
    elif compiling[0].poll() is not None:   # done already: record it now
        pre["compile"] = _finish_compile_check(compiling)
        log(f"[preflight] torch.compile: {pre['compile']}")
    (out / "preflight.json").write_text(json.dumps(pre, indent=1, default=str))
    rates = pre["rates"]
    done_now = {p.id for p in PIECES if is_done(p, ledger, dry_run)}
    env = dict(os.environ)
    if dry_run:
        env["REPRO_CAMPAIGN_BLOCK"] = ",".join(NOT_ON_DEVICE)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    for p in chosen:
        est0 = piece_seconds(p, dry_run)
        est = piece_seconds(p, dry_run, rates) + (PIECE_OVERHEAD_S if dry_run else 0)
        entry = {"chapter": p.chapter, "estimate_counted_s": round(est0, 1),
                 "estimate_preflight_s": round(est, 1), "spec_hash": spec_hash(p, dry_run)}
        manifest["pieces"][p.id] = entry
        left = budget_s - (time.monotonic() - start) - PACK_RESERVE_S
        missing = [n for n in p.needs if n not in done_now]
        if missing:
            entry["status"] = f"skipped: needs {', '.join(missing)}"
        elif SAFETY * est > left:
            entry["status"] = f"skipped: {SAFETY} x {est:.0f} s would not fit {left:.0f} s"
        elif len([e for e in manifest["pieces"].values() if e.get("file")]) >= MAX_PIECE_FILES:
            entry["status"] = "skipped: no file left to bring it back"
        if "status" in entry:
            log(f"[campaign] {p.id}: {entry['status']}")
            continue
        try:
            _run_one(p, entry, est, est0, left, dry_run, env, work, out, manifest, done_now, log)
        except Exception as e:  # noqa: BLE001 - the runner goes on with the next piece
            entry["status"] = f"runner error: {type(e).__name__}: {e}"[:500]
            log(f"[campaign] {p.id}: {entry['status']}")
    _finish(manifest, pre, compiling, budget_s, start, out, log)
    return manifest


def _run_one(p, entry, est, est0, left, dry_run, env, work, out, manifest, done_now, log):
    """Run one piece in a child process killed at ``left`` seconds; pack what it made."""
    record = work / f"piece-{p.id}.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "repro", "campaign", "piece", p.id, "--record", str(record)]
    if dry_run:
        cmd.append("--dry-run")
    log(f"[campaign] {p.id}: starting (estimate {est:.0f} s, {left:.0f} s left)")
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(PROJECT_ROOT), timeout=max(1.0, left),
                              capture_output=True, text=True)
        entry["returncode"] = proc.returncode
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        entry["returncode"] = "timeout"
        text = _text(e.stdout) + _text(e.stderr)
    (work / f"piece-{p.id}.log").write_text(text)
    tail = text[-3000:]
    entry["measured_s"] = round(time.monotonic() - t, 1)
    got = json.loads(record.read_text()) if record.exists() else None
    if got and entry["returncode"] == 0:
        entry["status"] = "done"
        entry["runs"] = got["runs"]
        done_now.add(p.id)
    else:
        entry["status"] = "failed" if entry["returncode"] != "timeout" else "timeout"
        entry["log_tail"] = tail
        got = {"runs": _finished_runs(p)}   # runs finished before the failure still count
        entry["runs"] = got["runs"]
    if entry["runs"]:
        f = pack_piece(p.id, p.chapter, entry["runs"], out, text,
                       {k: manifest[k] for k in ("library_digest", "stamp", "device",
                                                 "torch", "repro_version", "dry_run")}
                       | {"status": entry["status"], "spec_hash": entry["spec_hash"]})
        entry["file"] = f.name
    log(f"[campaign] {p.id}: {entry['status']} in {entry['measured_s']:.0f} s "
        f"(estimated {est0:.0f} s counted, {est:.0f} s after preflight)")


def _finish(manifest, pre, compiling, budget_s, start, out, log):
    if "compile" not in pre:   # the compile check ran beside the pieces; wait briefly
        left = budget_s - (time.monotonic() - start) - 5
        pre["compile"] = _finish_compile_check(
            compiling, timeout=time.perf_counter() - compiling[2] + max(1.0, min(30.0, left)))
        log(f"[preflight] torch.compile: {pre['compile']}")
        (out / "preflight.json").write_text(json.dumps(pre, indent=1, default=str))
    manifest["compile"] = pre["compile"]
    manifest["wall_s"] = round(time.monotonic() - start, 1)
    (out / "campaign.json").write_text(json.dumps(manifest, indent=1, default=str))
    files = [f for f in out.iterdir() if f.is_file()]
    if len(files) > MAX_FILES:
        log(f"[campaign] warning: {len(files)} files in {out}; the device tool brings back 8")


def _finished_runs(piece: Piece) -> dict:
    """Run folders of this piece's chapter finished in this session's cache (after a piece
    failed or timed out part-way). The cache is per session, so these are this campaign's."""
    root = results.results_root() / piece.chapter
    return {d.name: str(d) for d in sorted(root.glob("*")) if (d / "DONE").exists()} \
        if root.exists() else {}
