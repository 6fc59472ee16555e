"""The CPU campaign (repro/campaign/cpu.py): the overnight pieces cover every chapter and
resolve, estimates come from measured rates x counted passes, and the runner computes a real
piece (at toy size: the GPU dry run's overrides), places its small files, records it in the
ledger, never reruns it, and after a kill at its budget resumes it to the same result."""
import json

import pytest

from repro import experiments
from repro.campaign import cpu, estimate, pieces

# Fixed rates (s per forward-equivalent pass), so the plan's arithmetic is checked exactly
# without timing this machine.
FAKE = {"kind": {"model": "test CPU", "flags": ["avx2"], "threads": 2, "torch": "x",
                 "train_amp": "fp32", "why": "test", "compile": False},
        "measured": "now", "rates": {}}


def _fake_rates(rate_train=1e-3, rate_eval=5e-4):
    out = dict(FAKE, rates={})
    for p in pieces.pieces_for("overnight"):
        for j in estimate.piece_jobs(p):
            out["rates"][j.arch.label()] = {"batch": j.batch, "train": rate_train,
                                            "eval": rate_eval}
    return out


def test_overnight_pieces_cover_every_chapter_and_resolve():
    ps = pieces.pieces_for("overnight")
    assert {p.chapter for p in ps} == set(experiments.CHAPTERS)
    for p in ps:
        cfg = pieces.piece_config(p)
        assert cfg["preset"] == "overnight"
        assert all(n in pieces.BY_ID for n in p.needs)
        for c in p.claims:   # claim ids are real
            assert any(c == x.id for x in __import__("repro.claims", fromlist=["x"])
                       .claims_for(p.chapter))
    with pytest.raises(ValueError, match="no campaign pieces for preset 'laptop'"):
        pieces.pieces_for("laptop")
    # needs come first in the run order
    order = [p.id for p in cpu.order(ps)]
    for p in ps:
        assert all(order.index(n) < order.index(p.id) for n in p.needs)


def test_estimate_is_counted_passes_times_measured_rates(monkeypatch):
    r = _fake_rates(rate_train=1e-3, rate_eval=5e-4)
    p = pieces.BY_ID["he-o-pgd_at-s0"]
    jobs = estimate.piece_jobs(p)
    train = sum(j.passes for j in jobs if not j.what.endswith("eval"))
    ev = sum(j.passes for j in jobs if j.what.endswith("eval"))
    models = sum(j.models for j in jobs)
    want = cpu.PIECE_OVERHEAD_S + 1e-3 * train + 5e-4 * ev + models * cpu.RUN_OVERHEAD_S
    assert cpu.piece_seconds(p, r["rates"]) == pytest.approx(want)
    # PGD-2 training of 20 epochs on 49,000 images: 7 passes per image (2 x 2 attack + 3)
    cfg = pieces.piece_config(p)
    assert train >= cfg["epochs"] * 49000 * (2 * cfg["train_steps"] + 3)
    monkeypatch.setattr(cpu, "rates", lambda *a, **k: r)
    monkeypatch.setattr(cpu, "compile_check", lambda **k: {})
    rows, _ = cpu.plan_rows("overnight", ledger={})
    text = cpu.format_plan(rows, r)
    assert "he-o-pgd_at-s0" in text and "per chapter" in text and "test CPU" in text
    assert {row["chapter"] for row in rows} == set(experiments.CHAPTERS)


def test_rates_are_measured_once_per_cpu_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    calls = []

    def fake_measure(jobs, amp, log):
        calls.append(sorted({j.arch.label() for j in jobs}))
        return {j.arch.label(): {"batch": 1, "train": 1.0, "eval": 2.0} for j in jobs}
    monkeypatch.setattr(cpu, "measure_rates", fake_measure)
    ps = [pieces.BY_ID["he-o-pgd_at-s0"]]
    a = cpu.rates(ps, log=lambda *_: None)
    b = cpu.rates(ps, log=lambda *_: None)
    assert a["rates"] == b["rates"] and len(calls) == 1
    cpu.rates(ps, remeasure=True, log=lambda *_: None)
    assert len(calls) == 2
    stored = json.loads((tmp_path / "_campaign" / "cpu-rates.json").read_text())
    assert len(stored) == 1 and "train_amp" in next(iter(stored.values()))["kind"]


@pytest.mark.slow
def test_runner_computes_places_records_and_never_reruns(tmp_path, monkeypatch, data_root):
    """One real piece at toy size (HE's first overnight piece under the dry run's smoke
    overrides): stopped at a 1-second budget it is interrupted and leaves no finished run;
    the next run completes it, places its small files and enters it in the ledger; a third
    run computes nothing."""
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    pub = tmp_path / "published"
    piece = "he-o-pgd_at-s0"
    kw = dict(pieces=[piece], dry_run=True, published_root=pub, measured=_fake_rates(),
              log=lambda *_: None)

    first = cpu.campaign_run("overnight", budget_s=1, **kw)
    assert first["pieces"][piece]["status"] == "interrupted"
    assert not list((tmp_path / "results").rglob("DONE"))
    assert not (pub / "campaign-ledger.json").exists()

    second = cpu.campaign_run("overnight", **kw)
    entry = second["pieces"][piece]
    assert entry["status"] == "done", entry
    assert entry["measured_s"] > 0 and set(entry["runs"]) == {"pgd_at"}
    folder = next(iter(entry["runs"].values())).rsplit("/", 1)[-1]
    placed = pub / "he" / "results" / folder
    assert (placed / "DONE").exists() and (placed / "metrics.json").exists()
    assert not list(placed.rglob("*.pt")), "checkpoints never leave the cache"
    ledger = json.loads((pub / "campaign-ledger.json").read_text())
    assert ledger[piece]["folders"] == [folder]
    assert ledger[piece]["spec_hash"] == pieces.spec_hash(pieces.BY_ID[piece], dry_run=True)

    log_before = (cpu.state_dir("overnight") / f"{piece}.log").read_text()
    third = cpu.campaign_run("overnight", **kw)
    assert third["pieces"][piece]["status"] == "done"
    assert (cpu.state_dir("overnight") / f"{piece}.log").read_text() == log_before, \
        "a finished piece is never run again"
    assert "done" in cpu.format_status("overnight").split(piece)[1].splitlines()[0]


def test_pieces_compile_only_where_it_was_measured_to_pay(monkeypatch):
    monkeypatch.delenv("REPRO_COMPILE", raising=False)
    r = _fake_rates(rate_train=1e-3, rate_eval=5e-4)
    p = pieces.BY_ID["he-o-pgd_at-s0"]
    eager = cpu.piece_seconds(p, r["rates"])
    fast = {"speedup": 1.29, "compile_warmup_s": 44.0}   # measured here (module docstring)
    assert cpu.use_compile(fast, eager)[0]
    assert not cpu.use_compile({**fast, "speedup": 1.05}, eager)[0]     # too little gain
    assert not cpu.use_compile({**fast, "compile_warmup_s": 361.0}, 600.0)[0]   # too slow
    assert not cpu.use_compile({"error": "no compiler", "speedup": 0.0}, eager)[0]
    jobs = estimate.piece_jobs(p)
    train = sum(j.passes for j in jobs if not j.what.endswith("eval")) * 1e-3
    want = eager - train + train / 1.29 + 44.0
    assert cpu.piece_seconds(p, r["rates"], fast) == pytest.approx(want)
    monkeypatch.setenv("REPRO_COMPILE", "0")   # the runner's environment decides
    assert cpu.use_compile(fast, eager) == (False, "REPRO_COMPILE=0 set for the runner")
