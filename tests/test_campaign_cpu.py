"""The CPU campaign (repro/campaign/cpu.py): the overnight pieces cover every chapter and
resolve, estimates come from measured rates x counted passes, and the runner computes a real
piece (at toy size: the GPU dry run's overrides), places its small files, records it in the
ledger, never reruns it, and after a kill at its budget resumes it to the same result."""
import dataclasses
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
    # AdvProp's pieces train exactly its overnight plan (extra_seeds' runs included), and
    # each of its claims but the gpu-only ablation is some piece's
    from repro.experiments import advprop
    plan = {r[0] for r in advprop.plan(advprop.SPEC.resolve("overnight"))}
    assert plan == {n for p in ps if p.chapter == "advprop" for n in p.only}
    assert "advprop_w32_e1_s2" in plan and "shared_bn_w32_e1_s2" not in plan
    decided = {c for p in ps if p.chapter == "advprop" for c in p.claims}
    assert decided == {c.id for c in advprop.CLAIMS} - {"advprop.bigger-stronger"}
    # needs come first in the run order
    order = [p.id for p in cpu.order(ps)]
    for p in ps:
        assert all(order.index(n) < order.index(p.id) for n in p.needs)


def test_estimate_is_counted_passes_times_measured_rates(monkeypatch):
    r = _fake_rates(rate_train=1e-3, rate_eval=5e-4)
    p = pieces.BY_ID["he-o-pgd_at-s0-train"]
    jobs = estimate.piece_jobs(p)
    train = sum(j.passes for j in jobs if not j.what.endswith("eval"))
    models = sum(j.models for j in jobs)
    want = cpu.PIECE_OVERHEAD_S + 1e-3 * train + models * cpu.RUN_OVERHEAD_S
    assert cpu.piece_seconds(p, r["rates"]) == pytest.approx(want)
    # PGD-2 training of 30 epochs on 49,000 images: 7 passes per image (2 x 2 attack + 3)
    cfg = pieces.piece_config(p)
    assert train >= cfg["epochs"] * 49000 * (2 * cfg["train_steps"] + 3)
    monkeypatch.setattr(cpu, "rates", lambda *a, **k: r)
    monkeypatch.setattr(cpu, "compile_check", lambda **k: {})
    rows, _ = cpu.plan_rows("overnight", ledger={})
    text = cpu.format_plan(rows, r)
    assert "he-o-pgd_at-s0-train" in text and "per chapter" in text and "test CPU" in text
    assert {row["chapter"] for row in rows} == set(experiments.CHAPTERS)


def test_a_model_split_in_two_pieces_is_its_training_then_its_evaluation():
    """A model whose training and evaluation pass 2 hours is a `train` piece and an
    `evaluate` piece after it: together exactly the model's jobs, each half only its own."""
    train, ev = pieces.BY_ID["he-o-pgd_at-s0-train"], pieces.BY_ID["he-o-pgd_at-s0-eval"]
    assert train.id in ev.needs and (train.only, train.overrides) == (ev.only, ev.overrides)
    tj, ej = estimate.piece_jobs(train), estimate.piece_jobs(ev)
    assert tj and all(not j.what.endswith("eval") and j.models == 1 for j in tj)
    assert ej and all(j.what.endswith("eval") and j.models == 0 for j in ej)
    whole = estimate.WORKLOADS["he"](pieces.piece_config(train), train)
    assert sorted(j.what for j in tj + ej) == sorted(j.what for j in whole)
    # the claims are decided by the evaluation, after every run it pairs with
    last = pieces.BY_ID["he-o-pgd_at_he-s1-eval"]
    assert set(last.claims) == {"he.pgd-gain", "he.aa-gain"}
    assert {"he-o-pgd_at_he-s1-train", "he-o-pgd_at-s0-eval", "he-o-pgd_at_he-s0-eval",
            "he-o-pgd_at-s1-eval"} <= set(last.needs)
    # an evaluation piece trains nothing, a training piece evaluates nothing: each compiles
    # only its own half, by that half's measurement
    r = _fake_rates()
    check = {"speedup": 2.0, "compile_warmup_s": 1.0,
             "evaluation": {"speedup": 2.07, "compile_warmup_s": 3.0}}
    assert not cpu.piece_compiles(ev, check, r["rates"])[0]
    assert cpu.piece_compiles(train, check, r["rates"])[0]
    assert cpu.piece_compiles_eval(ev, check, r["rates"])[0]
    assert not cpu.piece_compiles_eval(train, check, r["rates"])[0]
    slow_eval = {**check, "evaluation": {"speedup": 1.02, "compile_warmup_s": 3.0}}
    assert not cpu.piece_compiles_eval(ev, slow_eval, r["rates"])[0]
    assert not cpu.piece_compiles_eval(ev, {"speedup": 2.0}, r["rates"])[0]   # not measured
    # the compiled evaluation's estimate: its passes at the measured speed-up, + warm-up
    eager = cpu.piece_seconds(ev, r["rates"])
    want = cpu.PIECE_OVERHEAD_S + (eager - cpu.PIECE_OVERHEAD_S) / 2.07 + 3.0
    assert cpu.piece_seconds(ev, r["rates"], check) == pytest.approx(want)


def test_a_resumed_piece_is_estimated_from_what_it_ran_before():
    assert cpu.time_left(3600, 0) == 3600
    assert cpu.time_left(3600, 3000) == 600
    assert cpu.time_left(3600, 4000) == 360   # ran longer than estimated: at least a tenth


def test_rates_are_measured_once_per_cpu_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    calls = []

    def fake_measure(jobs, amp, log):
        calls.append(sorted({j.arch.label() for j in jobs}))
        return {j.arch.label(): {"batch": 1, "train": 1.0, "eval": 2.0} for j in jobs}
    monkeypatch.setattr(cpu, "measure_rates", fake_measure)
    ps = [pieces.BY_ID["he-o-pgd_at-s0-train"]]
    a = cpu.rates(ps, log=lambda *_: None)
    b = cpu.rates(ps, log=lambda *_: None)
    assert a["rates"] == b["rates"] and len(calls) == 1
    cpu.rates(ps, remeasure=True, log=lambda *_: None)
    assert len(calls) == 2
    stored = json.loads((tmp_path / "_campaign" / "cpu-rates.json").read_text())
    assert len(stored) == 1 and "train_amp" in next(iter(stored.values()))["kind"]


@pytest.mark.slow
def test_runner_computes_places_records_and_never_reruns(tmp_path, monkeypatch, data_root):
    """One real model at toy size (HE's first overnight model, its training piece then its
    evaluation piece, under the dry run's smoke overrides): stopped at a 1-second budget
    the training is interrupted and leaves no finished run; the next run trains it (and
    stops there: weights kept, nothing evaluated), then evaluates it, places its small files
    and enters both pieces in the ledger; a third run computes nothing."""
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    pub = tmp_path / "published"
    train, piece = "he-o-pgd_at-s0-train", "he-o-pgd_at-s0-eval"
    kw = dict(pieces=[train, piece], dry_run=True, published_root=pub,
              measured=_fake_rates(), log=lambda *_: None)

    first = cpu.campaign_run("overnight", budget_s=1, **kw)
    assert first["pieces"][train]["status"] == "interrupted"
    assert piece not in first["pieces"]
    assert not list((tmp_path / "results").rglob("DONE"))
    assert not (pub / "campaign-ledger.json").exists()

    # a runner killed outright (a session's end) leaves its piece "running" with the last
    # heartbeat: the resumed piece counts that time as run before
    status_path = cpu.state_dir("overnight") / "status.json"
    killed = json.loads(status_path.read_text())
    killed["pieces"][train].update(status="running", ran_s=1000.0)
    killed["pieces"][train].pop("measured_before_s", None)
    status_path.write_text(json.dumps(killed))

    # the training piece alone: trained weights, no evaluation, nothing placed
    alone = cpu.campaign_run("overnight", **{**kw, "pieces": [train]})
    assert 1000 < alone["pieces"][train]["measured_s"] < 1000 + 600
    assert "ran_s" not in alone["pieces"][train]
    folder = next(iter(alone["pieces"][train]["runs"].values())).rsplit("/", 1)[-1]
    run_dir = tmp_path / "results" / "he" / folder
    assert (run_dir / "train" / "result.json").exists() and not (run_dir / "DONE").exists()
    assert not (pub / "he").exists()

    second = cpu.campaign_run("overnight", **kw)
    entry = second["pieces"][piece]
    assert entry["status"] == "done", entry
    assert entry["measured_s"] > 0 and set(entry["runs"]) == {"pgd_at"}
    assert entry["runs"]["pgd_at"].rsplit("/", 1)[-1] == folder, "the trained run, evaluated"
    placed = pub / "he" / "results" / folder
    assert (placed / "DONE").exists() and (placed / "metrics.json").exists()
    assert not list(placed.rglob("*.pt")), "checkpoints never leave the cache"
    ledger = json.loads((pub / "campaign-ledger.json").read_text())
    assert ledger[piece]["folders"] == [folder] == ledger[train]["folders"]
    # the trainer's own time, whatever process trained it (the interrupted one included),
    # counted once: in the training piece's entry
    assert ledger[train]["training_s"] > 0 and ledger[piece]["training_s"] is None
    assert ledger[piece]["spec_hash"] == pieces.spec_hash(pieces.BY_ID[piece], dry_run=True)

    logs = {p: (cpu.state_dir("overnight") / f"{p}.log").read_text() for p in (train, piece)}
    third = cpu.campaign_run("overnight", **kw)
    assert third["pieces"][piece]["status"] == "done"
    for p in (train, piece):
        assert (cpu.state_dir("overnight") / f"{p}.log").read_text() == logs[p], \
            "a finished piece is never run again"
    assert "done" in cpu.format_status("overnight").split(piece)[1].splitlines()[0]

    # a spec change that keys no run (a title here) reruns the piece, which finds its runs
    # cached: the ledger keeps the earlier computation's time
    monkeypatch.setitem(pieces.BY_ID, piece, dataclasses.replace(
        pieces.BY_ID[piece], title="evaluation, retitled"))
    cpu.campaign_run("overnight", **kw)
    kept = json.loads((pub / "campaign-ledger.json").read_text())[piece]
    assert kept["measured_s"] == ledger[piece]["measured_s"] and "rechecked" in kept
    assert kept["spec_hash"] != ledger[piece]["spec_hash"]


def test_pieces_compile_only_where_it_was_measured_to_pay(monkeypatch):
    monkeypatch.delenv("REPRO_COMPILE", raising=False)
    r = _fake_rates(rate_train=1e-3, rate_eval=5e-4)
    p = pieces.BY_ID["he-o-pgd_at-s0-train"]
    eager = cpu.piece_seconds(p, r["rates"])
    fast = {"speedup": 1.29, "compile_warmup_s": 44.0}   # measured here (module docstring)
    assert cpu.use_compile(fast, eager)[0]
    assert not cpu.use_compile({**fast, "speedup": 1.05}, eager)[0]     # too little gain
    assert not cpu.use_compile({**fast, "compile_warmup_s": 361.0}, 600.0)[0]   # too slow
    assert not cpu.use_compile({"error": "no compiler", "speedup": 0.0}, eager)[0]
    jobs = estimate.piece_jobs(p)
    train = sum(j.passes for j in jobs if not j.what.endswith("eval")) * 1e-3
    want = eager - train + train / 1.29 + 44.0   # (the piece is all training)
    assert cpu.piece_seconds(p, r["rates"], fast) == pytest.approx(want)
    monkeypatch.setenv("REPRO_COMPILE", "0")   # the runner's environment decides
    assert cpu.use_compile(fast, eager) == (False, "REPRO_COMPILE=0 set for the runner")
    assert cpu.use_compile(fast, eager, env="REPRO_COMPILE_EVAL")[0]   # each its own
    monkeypatch.setenv("REPRO_COMPILE_EVAL", "0")
    ev = pieces.BY_ID["he-o-pgd_at-s0-eval"]
    assert cpu.piece_compiles_eval(ev, {"evaluation": fast}, r["rates"]) == \
        (False, "REPRO_COMPILE_EVAL=0 set for the runner")


def test_bat_subset_models_are_shards_of_at_most_two_hours_then_one_merge(tmp_path,
                                                                         monkeypatch):
    """BAT overnight's K = 600 CIFAR-10 subset models (the atypical test split's influence
    SE <= 0.05 needs hundreds) are BAT_SHARDS pieces, every model in exactly one; the merge
    piece waits for them and trains none itself. A shard is done while its model files are
    in the cache, or once the merge is done (its estimate is published, the models never)."""
    from repro import memorization, results
    from repro.experiments import bat
    merge = pieces.BY_ID["bat-o-mem-cifar10"]
    shards = [pieces.BY_ID[f"bat-o-mem-cifar10-shard{i}"] for i in range(pieces.BAT_SHARDS)]
    assert {s.id for s in shards} == set(merge.needs)
    cfg = pieces.piece_config(merge)
    k = bat.mem_k_for(cfg, "cifar10")
    assert k == 600 and bat.mem_k_for(cfg, "cifar100") == 32
    per_shard = [memorization.shard_models(k, memorization.parse_shard(s.stage.rsplit(":", 1)[1]))
                 for s in shards]
    assert sorted(i for m in per_shard for i in m) == list(range(k))
    jobs = [j for s in shards for j in estimate.piece_jobs(s)]
    assert sum(j.models for j in jobs) == k
    assert all(j.models == 0 or "proxy" in j.what for j in estimate.piece_jobs(merge))
    # each shard a quarter of the whole's training passes (1.36 h each at this CPU's rates)
    whole = estimate.WORKLOADS["bat"](cfg, dataclasses.replace(merge, id="unsharded"))
    k_job = next(j for j in whole if j.what == f"{k} subset models cifar10")
    assert sum(j.passes for j in jobs) == pytest.approx(k_job.passes)

    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    s0 = shards[0]
    ledger = {s0.id: {"spec_hash": pieces.spec_hash(s0), "folders": ["subsets-cifar10-x"]}}
    models = tmp_path / "bat" / "subsets-cifar10-x" / "models"
    models.mkdir(parents=True)
    from repro.campaign.ledger import is_done
    for i in per_shard[0][:-1]:
        memorization.model_path(models, i).touch()
    assert not is_done(s0, ledger, published_root=tmp_path / "pub")   # one model missing
    memorization.model_path(models, per_shard[0][-1]).touch()
    assert is_done(s0, ledger, published_root=tmp_path / "pub")
    for f in models.iterdir():
        f.unlink()
    assert not is_done(s0, ledger, published_root=tmp_path / "pub")
    merged = tmp_path / "pub" / "bat" / "results" / "memorization-cifar10-y"
    merged.mkdir(parents=True)
    (merged / "DONE").touch()
    ledger[merge.id] = {"spec_hash": pieces.spec_hash(merge),
                        "folders": ["memorization-cifar10-y"]}
    assert is_done(s0, ledger, published_root=tmp_path / "pub")
    assert results.results_root() == tmp_path


def test_a_runner_stopped_by_a_signal_keeps_its_piece_s_time(tmp_path, monkeypatch):
    """SIGTERM to the runner (``campaign_run``'s handler calls ``interrupted``) marks the
    running piece interrupted with the time it ran, counted on from what it ran before, so
    its resumption's ETA and measured time go on from there (not from zero)."""
    import time
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    runner = cpu._Runner("overnight", None, False, lambda *_: None,
                         published_root=tmp_path / "published")
    entry = runner.status["pieces"].setdefault("he-o-pgd_at-s0-train",
                                              {"status": "running", "ran_s": 60.0})
    runner.status["running"] = "he-o-pgd_at-s0-train"
    runner.current = (entry, time.monotonic() - 100.0, 50.0)   # 100 s now, 50 s before
    runner.interrupted()
    saved = json.loads((cpu.state_dir("overnight") / "status.json").read_text())
    got = saved["pieces"]["he-o-pgd_at-s0-train"]
    assert got["status"] == "interrupted" and "ran_s" not in got
    assert 150.0 <= got["measured_before_s"] < 160.0
    assert saved["running"] is None and runner.current is None
