"""The CPU campaign: every chapter's ``overnight`` preset in pieces, run on a 2-core CPU by one
background process that survives being killed, across sessions.

    python -m repro campaign plan --device cpu --preset overnight   # pieces, CPU-hours, done?
    nohup python -m repro campaign run --device cpu --preset overnight --commit &   # run
    python -m repro campaign status --device cpu --preset overnight # done / running / left

**Pieces** are ``OVERNIGHT_PIECES`` (``repro.campaign.pieces``): one trained model each where
the chapter's ``run()`` can select one, or that model's training and its evaluation as two
pieces (``stage`` "train" / "evaluate") where together they pass ``MAX_PIECE_S``. **Estimates** are the counted forward-pass
equivalents of ``repro.campaign.estimate`` times seconds per pass *measured on this CPU*
(``time_arch`` of every architecture and batch the pieces use): training jobs at the
precision the trainer resolves here (bf16 where the CPU has native bf16, else fp32),
evaluation jobs in fp32 (evaluation always is; compiled or not). The rates are kept in
``RESULTS/_campaign/cpu-rates.json`` per CPU model, thread count, torch and precision, so
``plan`` measures once (about a minute) and ``--remeasure`` measures again.

**Running.** ``run`` computes the pending pieces in order (a piece whose ``needs`` are not
done waits), each in a child process (``python -m repro campaign piece ID``), with the
child's progress bars in ``RESULTS/_campaign/cpu-overnight/<piece>.log`` and the runner's
own lines (start, estimate, ETA every few minutes, end) in ``log.txt``; ``status.json``
says what is done, running and left. A kill at any point loses at most the current epoch
of training (epoch-end checkpoints) or the current evaluation: the next ``run`` finds the
piece's finished runs in the cache, resumes its unfinished training from its checkpoint and
never recomputes a finished piece. ``--budget-s`` stops the runner (and the running piece,
which resumes later) after that many seconds, so a session can end cleanly.

**What is kept.** A finished piece's runs are copied, small files only (``publish
.SMALL_FILES``: never checkpoints), to ``book/published/<chapter>/results/`` where
``publish`` finds them, and entered in the ledger ``book/published/campaign-ledger.json``
with the device, precision, estimated and measured seconds. With ``--commit`` the runner
commits exactly those files (``git commit -- <paths>``: nothing else staged is touched).

**Fastest path.** The trainer's ``amp="auto"`` picks bf16 where the CPU has it natively.
``torch.compile`` is measured once per CPU kind (``measure_compile``: the trainer's PGD-AT
step of a width-32 PreAct-ResNet-18, eager against compiled, and the compile warm-up) and
turned on for the pieces (``REPRO_COMPILE=1`` in their environment) where it is at least
``COMPILE_MIN_SPEEDUP`` faster and its warm-up is under ``COMPILE_MAX_WARMUP`` of the
piece: on a 2-core AVX-512-bf16 EPYC it was 1.29x faster after a 44 s warm-up (bench train,
PGD-10, batch 128), while on this project's AVX2 CPU a compiled step was slower and took 6
minutes to compile (book/how-to-run.md). What ran is in every run's ``precision`` record and
in the ledger; a piece that fails compiled is retried eager once. ``REPRO_COMPILE`` set for
the runner overrides the choice. Evaluation (fp32) is decided the same way from its own
measurement (``measure_eval_compile``: an fp32 PGD attack, eager against compiled; 2.07x on
that EPYC) and turned on with ``REPRO_COMPILE_EVAL=1`` (``common.evaluation_model``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from repro import results
from repro.campaign.estimate import Job, piece_jobs
from repro.campaign.ledger import LEDGER, is_done, read_ledger
from repro.campaign.pieces import BY_ID, Piece, pieces_for, spec_hash
from repro.data import PROJECT_ROOT

MAX_PIECE_S = 2 * 3600       # design rule: a piece fits well inside a 3-hour session
PIECE_OVERHEAD_S = 30.0      # per piece: python + torch import, data load (measured ~20 s)
RUN_OVERHEAD_S = 10.0        # per trained model: model build, checkpoints, result files
ETA_EVERY_S = 300.0          # the runner logs progress this often
COMPILE_MIN_SPEEDUP = 1.1    # compile pieces only if the compiled step is this much faster
COMPILE_MAX_WARMUP = 0.02    # ... and compiling costs less than this fraction of the piece


def state_dir(preset: str) -> Path:
    return results.results_root() / "_campaign" / f"cpu-{preset}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the CPU

def cpu_kind() -> dict:
    """What the estimates depend on: the CPU model, its bf16/AVX flags, threads, torch and
    the precision the trainer's amp="auto" resolves to here."""
    import platform
    import torch
    from repro.train import TrainConfig, resolve_precision
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    keep = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    amp = resolve_precision(TrainConfig(), torch.device("cpu"))
    return {"model": model, "flags": keep, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "train_amp": amp["amp"], "why": amp["why"],
            "compile": amp["compile"]}


def _kind_key(kind: dict) -> str:
    return f"{kind['model']}|{kind['threads']}t|torch {kind['torch']}|{kind['train_amp']}"


def measure_rates(jobs: list[Job], train_amp: str, log=print) -> dict[str, dict]:
    """Seconds per forward-equivalent image pass on this CPU, per architecture (at the
    largest training batch its jobs use): ``train`` at the training precision, ``eval`` an
    fp32 attack step (what evaluation runs)."""
    import torch
    from repro.campaign.preflight import time_arch
    device, out = torch.device("cpu"), {}
    batches: dict = {}
    for j in jobs:
        if not j.what.endswith("eval"):
            batches[j.arch] = max(batches.get(j.arch, 0), min(j.batch, 256))
    for j in jobs:   # architectures that only evaluate (none today) at a common batch
        batches.setdefault(j.arch, 128)
    for arch, batch in batches.items():
        t0 = time.perf_counter()
        tr = time_arch(arch, batch, device, steps=2, amp=train_amp)
        ev = time_arch(arch, batch, device, steps=2, amp="fp32")
        out[arch.label()] = {"batch": batch, "train": tr["s_per_pass"],
                             "eval": ev["s_per_pass_attack"],
                             "measured_in_s": round(time.perf_counter() - t0, 1)}
        log(f"[rates] {arch.label()}: batch {batch}, train ({train_amp}) "
            f"{tr['s_per_pass'] * 1e3:.2f} ms/pass, eval (fp32 attack) "
            f"{ev['s_per_pass_attack'] * 1e3:.2f} ms/pass")
    return out


def rates(pieces: list[Piece], *, remeasure: bool = False, log=print) -> dict:
    """The measured rates for ``pieces``' architectures on this CPU, from the rate file
    when it has them for this CPU kind, else measured now (and added to it)."""
    kind = cpu_kind()
    f = results.results_root() / "_campaign" / "cpu-rates.json"
    store = json.loads(f.read_text()) if f.exists() else {}
    mine = store.get(_kind_key(kind), {"kind": kind, "rates": {}})
    jobs = [j for p in pieces for j in piece_jobs(p)]
    missing = [j for j in jobs if remeasure or j.arch.label() not in mine["rates"]]
    if missing:
        log(f"[rates] measuring {len({j.arch for j in missing})} architecture(s) on "
            f"{kind['model']} ({kind['threads']} threads, training in {kind['train_amp']})")
        mine["rates"].update(measure_rates(missing, kind["train_amp"], log))
        mine["measured"] = _now()
        store[_kind_key(kind)] = mine
        f.parent.mkdir(parents=True, exist_ok=True)
        results._write_json(f, store)
    return {"kind": kind, "rates": mine["rates"], "measured": mine.get("measured")}


def measure_compile(width: int = 32, batch: int = 128, steps: int = 4, warmup: int = 2,
                    log=print) -> dict:
    """The trainer's PGD-10 adversarial-training step (``repro.benchmarks.train``) eager and
    compiled on this CPU at the training precision: images/s of each and the compiled run's
    warm-up (compiling included). A compile failure is recorded, not raised."""
    import torch
    from repro import data, models
    from repro.benchmarks.train import time_repro
    ds = data.load("cifar10").limit(n_train=(warmup + steps + 1) * batch, n_val=0, n_test=0)
    torch.manual_seed(0)
    state = models.build("preact_resnet18", 10, mean_std=ds.mean_std, width=width).state_dict()

    def timed(compile_: bool):
        m = models.build("preact_resnet18", 10, mean_std=ds.mean_std, width=width)
        m.load_state_dict(state)
        (wall, _), warm, precision = time_repro(m, ds, batch, steps, warmup,
                                                torch.device("cpu"), compile_)
        return batch / float(sorted(wall)[len(wall) // 2]), warm, precision

    out: dict[str, Any] = {"model": f"preact_resnet18(width={width})", "batch": batch,
                           "timed_steps": steps, "measured": _now()}
    eager, _, precision = timed(False)
    out.update(eager_img_s=round(eager, 2), amp=precision.get("amp"))
    try:
        compiled, warm, _ = timed(True)
        out.update(compiled_img_s=round(compiled, 2), speedup=round(compiled / eager, 3),
                   compile_warmup_s=round(warm, 1))
    except Exception as e:  # noqa: BLE001 - compile is optional: eager it is
        out.update(error=f"{type(e).__name__}: {e}"[:300], speedup=0.0)
    log(f"[compile] eager {out['eager_img_s']} img/s, compiled "
        f"{out.get('compiled_img_s', '-')} img/s (warm-up {out.get('compile_warmup_s', '-')} s)")
    return out


def measure_eval_compile(width: int = 32, batch: int = 256, steps: int = 5,
                         repeats: int = 3, log=print) -> dict:
    """An evaluation's fp32 PGD attack (``repro.attacks.pgd``, ``steps`` steps on ``batch``
    random images) on a width-``width`` PreAct-ResNet-18, eager against ``torch.compile``:
    milliseconds per image-pass (forward + input gradient = 2 passes a step, best of
    ``repeats``) and the compiled warm-up. A compile failure is recorded, not raised."""
    import torch
    from repro import attacks, models
    from repro.data import MEAN_STD
    torch.manual_seed(0)
    model = models.build("preact_resnet18", 10, mean_std=MEAN_STD["cifar10"],
                         width=width).eval()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def attack(m, n):
        return attacks.pgd(m, x, y, eps=8 / 255, alpha=2 / 255, steps=n,
                           generator=torch.Generator().manual_seed(0))

    def timed(m):
        t = time.perf_counter()
        attack(m, 1)
        warm = time.perf_counter() - t
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            attack(m, steps)
            best = min(best, time.perf_counter() - t)
        return best / (steps * 2 * batch) * 1e3, warm

    out: dict[str, Any] = {"model": f"preact_resnet18(width={width})", "batch": batch,
                           "attack": f"fp32 PGD-{steps}", "measured": _now()}
    eager, _ = timed(model)
    out["eager_ms_per_pass"] = round(eager, 4)
    try:
        compiled, warm = timed(torch.compile(model))
        out.update(compiled_ms_per_pass=round(compiled, 4), speedup=round(eager / compiled, 3),
                   compile_warmup_s=round(warm, 1))
    except Exception as e:  # noqa: BLE001 - compile is optional: eager it is
        out.update(error=f"{type(e).__name__}: {e}"[:300], speedup=0.0)
    log(f"[compile] evaluation: eager {out['eager_ms_per_pass']} ms/pass, compiled "
        f"{out.get('compiled_ms_per_pass', '-')} ms/pass (warm-up "
        f"{out.get('compile_warmup_s', '-')} s)")
    return out


def compile_check(*, remeasure: bool = False, log=print) -> dict:
    """``measure_compile`` for this CPU kind, kept beside the rates."""
    kind = cpu_kind()
    f = results.results_root() / "_campaign" / "cpu-rates.json"
    store = json.loads(f.read_text()) if f.exists() else {}
    mine = store.setdefault(_kind_key(kind), {"kind": kind, "rates": {}})
    changed = False
    if remeasure or "compile" not in mine:
        log("[compile] measuring eager against compiled training steps (a few minutes, once)")
        mine["compile"] = measure_compile(log=log)
        changed = True
    if remeasure or "evaluation" not in mine["compile"]:
        log("[compile] measuring eager against compiled evaluation attacks (a minute, once)")
        mine["compile"]["evaluation"] = measure_eval_compile(log=log)
        changed = True
    if changed:
        f.parent.mkdir(parents=True, exist_ok=True)
        results._write_json(f, store)
    return mine["compile"]


def use_compile(check: dict, piece_s: float, env: str = "REPRO_COMPILE",
                compiles: int = 1) -> tuple[bool, str]:
    """Whether a piece of ``piece_s`` estimated seconds trains (evaluates, with ``env``
    "REPRO_COMPILE_EVAL" and the evaluation's check) compiled, and why. ``compiles``: how
    many models it compiles (each pays the warm-up: BAT's subset-model shards train 150)."""
    forced = os.environ.get(env, "").strip()
    if forced in ("0", "1"):
        return forced == "1", f"{env}={forced} set for the runner"
    speed, warm = check.get("speedup") or 0.0, check.get("compile_warmup_s") or float("inf")
    warm *= max(1, compiles)
    ok = speed >= COMPILE_MIN_SPEEDUP and warm <= COMPILE_MAX_WARMUP * piece_s
    return ok, (f"compiled step {speed:.2f}x eager, warm-up {warm:.0f} s"
                + (f" ({compiles} models)" if compiles > 1 else "")
                + f" ({'<=' if warm <= COMPILE_MAX_WARMUP * piece_s else 'not <='} "
                f"{COMPILE_MAX_WARMUP:.0%} of the piece) and "
                f"speed-up {'>=' if speed >= COMPILE_MIN_SPEEDUP else '<'} "
                f"{COMPILE_MIN_SPEEDUP}")


def piece_compiles(piece: Piece, check: dict, rates_: dict) -> tuple[bool, str]:
    """``use_compile`` for ``piece``'s training; a piece that trains nothing (an
    ``evaluate`` piece) is not."""
    models = sum(j.models for j in piece_jobs(piece))
    if not models:
        return False, "nothing to train"
    return use_compile(check, piece_seconds(piece, rates_), compiles=models)


def piece_compiles_eval(piece: Piece, check: dict, rates_: dict) -> tuple[bool, str]:
    """``use_compile`` for ``piece``'s evaluation (``REPRO_COMPILE_EVAL`` in its
    environment), from the evaluation's own measurement (``measure_eval_compile``)."""
    if not any(j.what.endswith("eval") for j in piece_jobs(piece)):
        return False, "nothing to evaluate"
    ev = (check or {}).get("evaluation")
    if not ev and not os.environ.get("REPRO_COMPILE_EVAL", "").strip():
        return False, "evaluation compile not measured"
    return use_compile(ev or {}, piece_seconds(piece, rates_), env="REPRO_COMPILE_EVAL")


def job_seconds(job: Job, rates_: dict, train_speedup: float = 1.0,
                eval_speedup: float = 1.0) -> float:
    """Counted passes x the measured seconds per pass, divided by the measured speed-up of
    a compiled training step (``train_speedup``) or evaluation attack (``eval_speedup``)
    where the piece compiles them."""
    r = rates_[job.arch.label()]
    per = r["eval"] / eval_speedup if job.what.endswith("eval") else r["train"] / train_speedup
    return job.passes * per + job.models * RUN_OVERHEAD_S


def piece_seconds(piece: Piece, rates_: dict, check: dict | None = None) -> float:
    """Estimated seconds of ``piece``; with ``check`` (``compile_check``), its training and
    its evaluation compiled where ``piece_compiles`` / ``piece_compiles_eval`` would compile
    them, plus their warm-ups."""
    jobs = piece_jobs(piece)
    if not check:
        return PIECE_OVERHEAD_S + sum(job_seconds(j, rates_) for j in jobs)
    train_c = piece_compiles(piece, check, rates_)[0]
    eval_c = piece_compiles_eval(piece, check, rates_)[0]
    ev = check.get("evaluation") or {}
    warm = (sum(j.models for j in jobs) * check.get("compile_warmup_s", 0.0) if train_c else 0)
    warm += (sum(1 for j in jobs if j.what.endswith("eval"))
             * ev.get("compile_warmup_s", 0.0) if eval_c else 0)
    return PIECE_OVERHEAD_S + warm + sum(
        job_seconds(j, rates_, check["speedup"] if train_c else 1.0,
                    (ev.get("speedup") or 1.0) if eval_c else 1.0) for j in jobs)


def time_left(estimate_s: float, before_s: float) -> float:
    """What a resumed piece has left: its estimate less the time it ran before (training
    resumes from its last checkpoint), at least a tenth of it (the last epoch or stage is
    lost, the start-up paid again)."""
    return max(estimate_s - before_s, 0.1 * estimate_s)


# ----------------------------------------------------------------------------- plan

def order(pieces: list[Piece]) -> list[Piece]:
    """The pieces in the data's order, each after the pieces it needs."""
    out, placed = [], set()
    todo = list(pieces)
    while todo:
        ready = [p for p in todo if all(n in placed or n not in BY_ID for n in p.needs)]
        if not ready:
            raise ValueError(f"pieces with circular needs: {[p.id for p in todo]}")
        out.append(ready[0])
        placed.add(ready[0].id)
        todo.remove(ready[0])
    return out


def read_status(preset: str) -> dict:
    f = state_dir(preset) / "status.json"
    return json.loads(f.read_text()) if f.exists() else {}


def runner_alive(status: dict) -> bool:
    pid = status.get("pid")
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    cmd = Path(f"/proc/{pid}/cmdline")
    return not cmd.exists() or b"campaign" in cmd.read_bytes()


def plan_rows(preset: str = "overnight", *, remeasure: bool = False, log=print,
              ledger: dict | None = None) -> tuple[list[dict], dict]:
    pieces = order(pieces_for(preset))
    r = dict(rates(pieces, remeasure=remeasure, log=log))
    r["compile"] = compile_check(remeasure=remeasure, log=log)
    ledger = read_ledger() if ledger is None else ledger
    status = read_status(preset)
    running = status.get("running") if runner_alive(status) else None
    rows = []
    for p in pieces:
        done = is_done(p, ledger)
        entry = (status.get("pieces") or {}).get(p.id, {})
        rows.append({"id": p.id, "chapter": p.chapter, "title": p.title,
                     "seconds": piece_seconds(p, r["rates"], r["compile"]),
                     "compile": piece_compiles(p, r["compile"], r["rates"])[0],
                     "compile_eval": piece_compiles_eval(p, r["compile"], r["rates"])[0],
                     "jobs": [(j.what, j.arch.label()) for j in piece_jobs(p)],
                     "claims": list(p.claims), "needs": list(p.needs),
                     "state": "done" if done else "running" if p.id == running
                     else entry.get("status", "pending"),
                     # the trainer's own time where a process before this piece trained it
                     "measured_s": max((v for v in (entry.get("measured_s"),
                                                    (ledger.get(p.id) or {}).get("training_s"))
                                        if v), default=None)})
    return rows, r


def _compile_line(check: dict) -> str:
    if not check:
        return "  torch.compile: not measured"
    if check.get("error"):
        line = f"  torch.compile: failed here ({check['error']}): every piece trains eager"
    else:
        line = (f"  torch.compile (measured {check.get('measured', '-')}, the trainer's PGD-10 "
                f"step of {check.get('model')}, batch {check.get('batch')}): eager "
                f"{check.get('eager_img_s')} img/s, compiled {check.get('compiled_img_s')} "
                f"img/s ({check.get('speedup')}x) after a {check.get('compile_warmup_s')} s "
                f"warm-up; pieces compile where the speed-up is >= {COMPILE_MIN_SPEEDUP} and "
                f"the warm-up <= {COMPILE_MAX_WARMUP:.0%} of the piece")
    ev = check.get("evaluation")
    if ev and ev.get("error"):
        line += f"\n  evaluation compile failed here ({ev['error']}): evaluations run eager"
    elif ev:
        line += (f"\n  evaluation ({ev.get('attack')} of {ev.get('model')}, batch "
                 f"{ev.get('batch')}): eager {ev.get('eager_ms_per_pass')} ms/pass, compiled "
                 f"{ev.get('compiled_ms_per_pass')} ms/pass ({ev.get('speedup')}x) after a "
                 f"{ev.get('compile_warmup_s')} s warm-up; the same rule")
    return line


def format_plan(rows: list[dict], r: dict, preset: str = "overnight") -> str:
    k = r["kind"]
    lines = [f"CPU campaign: the `{preset}` presets in pieces, estimated on this machine",
             f"  CPU: {k['model']} [{' '.join(k['flags']) or 'no AVX flags read'}], "
             f"{k['threads']} threads, torch {k['torch']}; training in {k['train_amp']} "
             f"({k['why']}), evaluation in fp32",
             _compile_line(r.get("compile") or {}),
             f"  rates measured {r.get('measured') or '-'} (seconds per forward-equivalent "
             "image pass x the counted passes of each job; `--remeasure` to time again):"]
    for label, v in r["rates"].items():
        lines.append(f"    {label:<34} train {v['train'] * 1e3:7.3f} ms/pass, "
                     f"eval {v['eval'] * 1e3:7.3f} ms/pass (batch {v['batch']})")
    lines += ["", f"{'#':>2} {'piece':<30} {'est h':>6} {'state':<10} claims"]
    per_chapter: dict[str, float] = {}
    for i, row in enumerate(rows, 1):
        h = row["seconds"] / 3600
        per_chapter[row["chapter"]] = per_chapter.get(row["chapter"], 0.0) + h
        flag = "  > 2 h" if row["seconds"] > MAX_PIECE_S else ""
        meas = (f" (measured {row['measured_s'] / 3600:.2f} h)"
                if row.get("measured_s") else "")
        lines.append(f"{i:>2} {row['id']:<30} {h:>6.2f} {row['state']:<10} "
                     f"{', '.join(row['claims']) or '-'}{flag}{meas}"
                     + ("  [compiled: " + " + ".join(
                         w for w, on in (("training", row.get("compile")),
                                         ("evaluation", row.get("compile_eval"))) if on) + "]"
                        if row.get("compile") or row.get("compile_eval") else ""))
        lines.append(f"{'':>3} {row['title']}" + (f"; after {', '.join(row['needs'])}"
                                                   if row["needs"] else ""))
    lines += ["", "per chapter (estimated CPU-hours on this machine): "
              + ", ".join(f"{c} {h:.1f}" for c, h in per_chapter.items())
              + f"; total {sum(per_chapter.values()):.1f}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run

def place_runs(chapter: str, folders: dict[str, str],
               published_root: Path | None = None) -> list[Path]:
    """Copy each finished run folder's small files to ``<published>/<chapter>/results/``;
    returns the files written."""
    from repro.campaign.window import _small_files
    root = Path(published_root or results.PUBLISHED_ROOT)
    written = []
    for path in map(Path, folders.values()):
        if not (path / "DONE").exists():
            continue
        dest = root / chapter / "results" / path.name
        if dest.resolve() == path.resolve():
            continue   # already the published copy
        for rel, f in _small_files(path):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)
            written.append(dest / rel)
    return written


def git_commit(paths: list[Path], message: str, log=print) -> str | None:
    """Commit exactly ``paths`` (other staged or modified files are left alone)."""
    rel = [str(Path(p).resolve().relative_to(PROJECT_ROOT)) for p in paths]
    if not rel:
        return None
    try:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "add", "--", *rel], check=True,
                       capture_output=True, text=True, timeout=60)
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "commit", "-q", "-m", message,
                              "--", *rel], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log(f"[campaign] git commit failed: {out.stderr.strip()[-500:]}")
            return None
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        log(f"[campaign] git commit failed: {e}")
        return None


def training_seconds(folders) -> float | None:
    """The trainer's own wall time of these runs, summed over every epoch whatever process
    ran it (``train/result.json``): a piece's ``measured_s`` counts only its last process,
    so a model trained before its piece was split or restarted shows its cost here."""
    total, found = 0.0, False
    for folder in folders:
        f = Path(folder) / "train" / "result.json"
        if f.exists():
            total += float(json.loads(f.read_text()).get("seconds") or 0.0)
            found = True
    return round(total, 1) if found else None


class _Runner:
    """One ``campaign run --device cpu``: the pending pieces in order, one child at a time.
    ``dry_run``: each piece at the smoke preset cut to toy size (the GPU dry run's
    overrides), for tests of the runner itself."""

    def __init__(self, preset: str, budget_s: float | None, commit: bool, log,
                 dry_run: bool = False, published_root: Path | None = None):
        self.preset, self.budget_s, self.commit = preset, budget_s, commit
        self.dry_run = dry_run
        self.published = Path(published_root or results.PUBLISHED_ROOT)
        self.ledger_path = self.published / LEDGER.name
        self.dir = state_dir(preset)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self._log_file = (self.dir / "log.txt").open("a")
        self._echo = log
        self.status: dict[str, Any] = read_status(preset)
        self.status.update({"pid": os.getpid(), "started": _now(), "preset": preset,
                            "budget_s": budget_s, "running": None})
        self.status.setdefault("pieces", {})
        self.child: subprocess.Popen | None = None
        self.current: tuple[dict, float, float] | None = None   # (entry, start, run before)

    def log(self, msg: str) -> None:
        line = f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if self._echo:
            self._echo(line)

    def save(self) -> None:
        self.status["updated"] = _now()
        results._write_json(self.dir / "status.json", self.status)

    def left(self) -> float:
        return float("inf") if self.budget_s is None else \
            self.budget_s - (time.monotonic() - self.start)

    def run_piece(self, p: Piece, est: float, compile_: bool = False, why: str = "",
                  compile_eval: bool = False, why_eval: str = "") -> dict:
        entry = self.status["pieces"].setdefault(p.id, {})
        if entry.get("status") == "running" and entry.get("ran_s"):
            # its runner was killed outright (a session's end): the last heartbeat is the
            # time it had run, which the resumed piece adds to its own
            entry["measured_before_s"] = entry["ran_s"]
        entry.pop("ran_s", None)
        entry.update({"chapter": p.chapter, "estimate_s": round(est, 1),
                      "spec_hash": spec_hash(p, self.dry_run), "started": _now(),
                      "status": "running", "compile": compile_, "compile_why": why,
                      "compile_eval": compile_eval, "compile_eval_why": why_eval})
        entry.pop("ended", None)
        self.status["running"] = p.id
        self.save()
        record = self.dir / f"{p.id}.record.json"
        record.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "repro", "campaign", "piece", p.id, "--record",
               str(record), "--progress"] + (["--dry-run"] if self.dry_run else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "REPRO_COMPILE": "1" if compile_ else "0",
               "REPRO_COMPILE_EVAL": "1" if compile_eval else "0"}
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
                                            ).strip(os.pathsep)
        before = entry.get("measured_before_s", 0.0)
        eta = _dt.datetime.now() + _dt.timedelta(seconds=time_left(est, before))
        self.log(f"[campaign] {p.id}: {'resuming' if before else 'starting'} ({p.title}); "
                 f"estimate {est / 3600:.2f} h"
                 + (f", {before / 3600:.2f} h of it run before" if before else "")
                 + f", ETA {eta:%H:%M}; torch.compile of training {'on' if compile_ else 'off'}"
                 f" ({why}), of evaluation {'on' if compile_eval else 'off'} ({why_eval}); "
                 f"progress in {self.dir / (p.id + '.log')}")
        t = time.monotonic()
        self.current = (entry, t, before)
        with (self.dir / f"{p.id}.log").open("a") as out:
            out.write(f"\n===== {_now()} {' '.join(cmd)}\n")
            out.flush()
            self.child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          cwd=str(PROJECT_ROOT), start_new_session=True)
            last = time.monotonic()
            while self.child.poll() is None:
                # wake at the budget's end, not up to 5 s after it
                time.sleep(min(5.0, max(0.05, self.left())))
                if self.left() <= 0 and self.child.poll() is None:
                    self.log(f"[campaign] {p.id}: budget spent; stopping it (its training "
                             "resumes from the last checkpoint next time)")
                    self.stop_child()
                    break
                if time.monotonic() - last >= ETA_EVERY_S:
                    last = time.monotonic()
                    ran = last - t
                    entry["ran_s"] = round(ran + before, 1)   # the heartbeat a kill leaves
                    self.save()
                    self.log(f"[campaign] {p.id}: running {(ran + before) / 60:.0f} min of an "
                             f"estimated {est / 60:.0f} ({100 * (ran + before) / est:.0f}%)")
            rc = self.child.wait()
            self.child = None
        measured = time.monotonic() - t
        self.current = None
        entry.pop("ran_s", None)
        entry.update({"measured_s": round(measured + entry.get("measured_before_s", 0), 1),
                      "returncode": rc, "ended": _now()})
        got = json.loads(record.read_text()) if record.exists() and rc == 0 else None
        if got:
            entry["status"] = "done"
            entry["runs"] = got["runs"]
            entry.pop("measured_before_s", None)
        else:
            entry["status"] = "interrupted" if self.left() <= 0 else f"failed (exit {rc})"
            entry["measured_before_s"] = entry["measured_s"]   # resumed time adds up
        self.status["running"] = None
        self.save()
        self.log(f"[campaign] {p.id}: {entry['status']} after {measured / 60:.1f} min "
                 f"(estimated {est / 60:.1f})")
        return entry

    def finish_piece(self, p: Piece, entry: dict, kind: dict) -> None:
        written = place_runs(p.chapter, entry["runs"], self.published)
        ledger = read_ledger(self.ledger_path)
        before = ledger.get(p.id)
        ledger[p.id] = {"spec_hash": entry["spec_hash"],
                        "folders": [Path(f).name for f in entry["runs"].values()],
                        "device": results.device_name("cpu"), "cpu": kind,
                        "compile": entry.get("compile"),
                        "compile_eval": entry.get("compile_eval"),
                        "estimated_s": entry["estimate_s"], "measured_s": entry["measured_s"],
                        "training_s": (None if p.stage == "evaluate"   # its -train piece's
                                       else training_seconds(entry["runs"].values())),
                        "commit": results.git_commit(), "finished": entry["ended"]}
        if before and before.get("folders") == ledger[p.id]["folders"]:
            # the same runs, found in the cache after the piece's spec changed (a parameter
            # that keys no run, a title): the time is the earlier computation's
            keep = ("estimated_s", "measured_s", "training_s", "commit", "finished", "cpu",
                    "compile", "device", "note")
            ledger[p.id].update({k: before[k] for k in keep if k in before},
                                rechecked=entry["ended"])
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        results._write_json(self.ledger_path, ledger)
        self.log(f"[campaign] {p.id}: {len(written)} small files placed under "
                 f"{self.published / p.chapter / 'results'}, ledger updated")
        if self.commit:
            sha = git_commit(written + [self.ledger_path], f"campaign ({self.preset}, CPU): piece {p.id} "
                             f"finished in {entry['measured_s'] / 3600:.2f} h (estimated "
                             f"{entry['estimate_s'] / 3600:.2f} h); its runs' small files",
                             self.log)
            if sha:
                entry["commit"] = sha
                self.log(f"[campaign] {p.id}: committed {sha}")
        self.save()

    def interrupted(self) -> None:
        """The runner is stopping by a signal: the running piece is interrupted, and the
        time it ran is kept for its resumption (as a budget's end keeps it)."""
        if self.current is not None:
            entry, t, before = self.current
            entry.pop("ran_s", None)
            entry.update(status="interrupted", ended=_now(),
                         measured_before_s=round(before + time.monotonic() - t, 1))
            self.current = None
        self.status["running"] = None
        self.save()

    def stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGTERM)
            try:
                self.child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)


def campaign_run(preset: str = "overnight", *, budget_s: float | None = None,
                 pieces: list[str] | None = None, commit: bool = False, log=print,
                 dry_run: bool = False, published_root: Path | None = None,
                 measured: dict | None = None) -> dict:
    """Run the pending pieces of ``preset`` on this CPU (see the module doc); returns the
    status record. ``dry_run`` and ``published_root``: see ``_Runner``; ``measured``: rates
    as ``rates()`` returns them, instead of reading or measuring them (tests)."""
    status = read_status(preset)
    if runner_alive(status) and status.get("pid") != os.getpid():
        raise SystemExit(f"a campaign runner is already running (pid {status['pid']}): "
                         f"python -m repro campaign status --device cpu --preset {preset}")
    chosen = [BY_ID[i] for i in pieces] if pieces else order(pieces_for(preset))
    r = measured or rates(chosen, log=log)
    check = r.get("compile") if measured else compile_check(log=log)
    runner = _Runner(preset, budget_s, commit, log, dry_run, published_root)

    def on_term(signum, frame):   # a kill of the runner stops its child too
        runner.log(f"[campaign] signal {signum}: stopping")
        runner.stop_child()
        runner.interrupted()
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, on_term)
    runner.log(f"[campaign] runner {os.getpid()} started: {len(chosen)} pieces, budget "
               f"{'none' if budget_s is None else f'{budget_s / 3600:.2f} h'}; CPU "
               f"{r['kind']['model']}, training in {r['kind']['train_amp']}")
    runner.save()
    try:
        for p in chosen:
            ledger = read_ledger(runner.ledger_path)
            if is_done(p, ledger, dry_run, runner.published):
                continue
            waiting = [n for n in p.needs if n in BY_ID and
                       not is_done(BY_ID[n], ledger, dry_run, runner.published)]
            if waiting:
                runner.log(f"[campaign] {p.id}: waits for {', '.join(waiting)}")
                continue
            if runner.left() <= 0:
                runner.log("[campaign] budget spent: the remaining pieces wait for the next run")
                break
            compiled, why = piece_compiles(p, check or {}, r["rates"])
            compiled_eval, why_eval = piece_compiles_eval(p, check or {}, r["rates"])
            est = piece_seconds(p, r["rates"], check)
            entry = runner.run_piece(p, est, compiled, why, compiled_eval, why_eval)
            if ((compiled or compiled_eval) and entry["status"].startswith("failed")
                    and runner.left() > 0):
                runner.log(f"[campaign] {p.id}: failed compiled; retrying eager")
                entry = runner.run_piece(p, est, False, "retry after a compiled failure",
                                         False, "retry after a compiled failure")
            if entry["status"] == "done":
                runner.finish_piece(p, entry, r["kind"])
            elif runner.left() <= 0:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        runner.status["running"] = None
        runner.status["pid"] = None
        runner.status["stopped"] = _now()
        runner.save()
        runner.log("[campaign] runner stopped")
        runner._log_file.close()
    return runner.status


def format_status(preset: str = "overnight") -> str:
    status = read_status(preset)
    alive = runner_alive(status)
    ledger = read_ledger()
    lines = [f"CPU campaign `{preset}`: runner "
             + (f"running (pid {status['pid']}, since {status.get('started')})" if alive
                else "not running") + f"; state in {state_dir(preset)}"]
    for p in order(pieces_for(preset)):
        e = (status.get("pieces") or {}).get(p.id, {})
        if is_done(p, ledger):
            state = "done"
        elif alive and status.get("running") == p.id:
            started = _dt.datetime.fromisoformat(e["started"])
            ran = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
            est, before = e.get("estimate_s", 0), e.get("measured_before_s", 0)
            eta = started + _dt.timedelta(seconds=time_left(est, before))
            state = (f"running {(ran + before) / 60:.0f} min of ~{est / 60:.0f} "
                     f"(ETA {eta.astimezone():%H:%M})")
        else:
            state = e.get("status", "pending")
            if state == "running":   # its runner died: the next run resumes it
                state = "interrupted (resumes)"
        meas = (f", measured {e['measured_s'] / 3600:.2f} h vs estimated "
                f"{e['estimate_s'] / 3600:.2f} h" if e.get("measured_s") and
                e.get("estimate_s") else "")
        trained = (ledger.get(p.id) or {}).get("training_s") or 0
        if meas and trained > e["measured_s"]:   # weights trained by an earlier process
            meas += f" (the trainer's own time: {trained / 3600:.2f} h)"
        lines.append(f"  {p.id:<30} {state}{meas}")
    running = status.get("running")
    if alive and running and running not in {p.id for p in pieces_for(preset)}:
        lines.append(f"  {running:<30} running: a piece of the plan the runner started with "
                     "(its runs are cached; the current plan's pieces find them)")
    return "\n".join(lines)
