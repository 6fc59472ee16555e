"""Run folders keyed by config + library version; metrics, arrays and provenance.

A chapter's experiment is a set of runs (each trained model, each evaluation). Each run
lives in ``RESULTS/<chapter>/<name>-<key>/`` where ``key`` hashes the run's full config and
``repro.__version__``, so re-executing a notebook reuses finished work and any change of
config computes afresh. Published results under ``book/published/<chapter>/results/`` are
searched too, which is how a run computed on a GPU machine renders on a CPU one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import repro
from repro.data import PROJECT_ROOT

PUBLISHED_ROOT = PROJECT_ROOT / "book" / "published"


def results_root() -> Path:
    env = os.environ.get("REPRO_RESULTS")
    return Path(env) if env else PROJECT_ROOT / "results"


def config_key(config: dict) -> str:
    payload = json.dumps({"config": config, "repro": repro.__version__}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain",
                                "--untracked-files=no", "--", "repro"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device=None) -> str:
    import torch
    from repro.train import resolve_device
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    if dev.type == "mps":
        return f"mps: Apple GPU ({platform.machine()})"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def provenance(device=None) -> dict[str, Any]:
    import torch
    return {"repro_version": repro.__version__, "commit": git_commit(),
            "device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "host": socket.gethostname(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


class Run:
    """One run folder: config.json, metrics.json, arrays.npz, provenance.json, DONE."""

    def __init__(self, path: Path, config: dict):
        self.path = Path(path)
        self.config = config

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def prepare(self) -> "Run":
        from repro import distributed
        if not distributed.is_writer():  # under torchrun rank 0 alone writes run folders
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json(self.path / "config.json", self.config)
        return self

    def save(self, metrics: dict, arrays: dict[str, np.ndarray] | None = None, *,
             wall_time_s: float | None = None, device=None) -> None:
        """Write the results and mark the run finished (arrays first, DONE last); under
        torchrun only on rank 0 (the other ranks computed the same results)."""
        from repro import distributed
        if not distributed.is_writer():
            return
        self.prepare()
        if arrays:
            tmp = self.path / "arrays.tmp.npz"
            np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, self.path / "arrays.npz")
        _write_json(self.path / "metrics.json", metrics)
        prov = provenance(device)
        prov["wall_time_s"] = None if wall_time_s is None else round(wall_time_s, 2)
        _write_json(self.path / "provenance.json", prov)
        (self.path / "DONE").write_text(prov["date"] + "\n")

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def arrays(self) -> dict[str, np.ndarray]:
        f = self.path / "arrays.npz"
        if not f.exists():
            return {}
        with np.load(f, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}

    def provenance(self) -> dict:
        return json.loads((self.path / "provenance.json").read_text())

    def __repr__(self) -> str:
        return f"Run({self.path}, done={self.done})"


def find_run(chapter: str, name: str, config: dict) -> Run:
    """The run for this config: a finished local or published one if any, else a new local
    folder (not yet created)."""
    folder = f"{name}-{config_key(config)}"
    local = Run(results_root() / chapter / folder, config)
    if local.done:
        return local
    published = Run(PUBLISHED_ROOT / chapter / "results" / folder, config)
    if published.done:
        return published
    return local


def cached(chapter: str, name: str, config: dict,
           compute: Callable[[Run], tuple[dict, dict | None]], *, device=None,
           log: Callable[[str], None] | None = print) -> Run:
    """Return the finished run for ``config``, computing it with ``compute(run)`` if needed.

    ``compute`` gets the (created) run folder, may keep checkpoints in it so an interrupted
    computation resumes, and returns ``(metrics, arrays)``.
    """
    from repro import distributed
    run = find_run(chapter, name, config)
    if distributed.agree(run.done):  # under torchrun: rank 0's view, so every rank computes or none
        run = find_run(chapter, name, config)
        if log:
            log(f"[cache] {chapter}/{name}: reusing {run.path}")
        return run
    run.prepare()
    start = time.time()
    metrics, arrays = compute(run)
    run.save(metrics, arrays, wall_time_s=time.time() - start, device=device)
    distributed.barrier()  # rank 0's files exist before any rank reads them
    return run


def compute_time(runs) -> dict:
    """``compute_wall_time_s``: what computing a publication's runs took, each run folder
    counted once (a result may list one run under two names, e.g. BAT's ``typical+1`` is
    ``pgd_at``) and with the unpublished inputs they were derived from
    (``upstream_wall_time_s``, also given alone)."""
    seen = {}
    for r in runs:  # dicts with folder, wall_time_s and (optional) upstream_wall_time_s
        seen[r["folder"]] = r
    own = sum(r.get("wall_time_s") or 0 for r in seen.values())
    upstream = sum(r.get("upstream_wall_time_s") or 0 for r in seen.values())
    return {"compute_wall_time_s": round(own + upstream, 1),
            "upstream_wall_time_s": round(upstream, 1)}


def clear(chapter: str) -> None:
    """Delete a chapter's local results (published ones are kept)."""
    shutil.rmtree(results_root() / chapter, ignore_errors=True)
