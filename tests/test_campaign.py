"""The GPU campaign: the plan fits its budget, pieces cover the gpu presets, ingest refuses
what does not check out, and the dry run goes plan -> preflight -> pieces -> pack -> ingest ->
publish on the CPU."""
import json
import tarfile

import numpy as np
import pytest

from repro import campaign, claims, experiments, results


def test_plan_fits_the_budget_and_the_first_window_settles_a_headline():
    rows = campaign.plan_rows(ledger={})
    assert [r["id"] for r in rows] and {r["id"] for r in rows} == {p.id for p in campaign.PIECES}
    total = sum(r["seconds"] for r in rows)
    assert total <= campaign.TOTAL_GPU_S, total
    for r in rows:  # every piece can start in an empty window and is <= 8 H200-minutes
        assert campaign.SAFETY * r["seconds"] <= campaign.largest_runnable(), r
        assert r["seconds"] <= campaign.MAX_PIECE_S
    # needs come first
    pos = {r["id"]: i for i, r in enumerate(rows)}
    assert all(pos[n] < pos[r["id"]] for r in rows for n in r["needs"])
    first = campaign.first_window(rows)
    assert "he-pgd" in first, first
    # he-pgd is the headline of issue 16: PreAct-ResNet-18, full CIFAR-10, AA on >= 1000
    cfg = campaign.piece_config(campaign.BY_ID["he-pgd"])
    assert cfg["architecture"] == "preact_resnet18" and cfg["width"] is None
    assert cfg["n_train"] is None and cfg["n_aa"] >= 1000 and cfg["autoattack"] != "none"
    assert "he.aa-gain" in campaign.BY_ID["he-pgd"].claims
    text = campaign.format_plan(rows)
    assert "he-pgd" in text and "H200-minutes" in text and "TFLOP/s" in text


def test_pieces_resolve_and_name_real_claims():
    for p in campaign.PIECES:
        cfg = campaign.piece_config(p)       # strict: an unknown override raises
        assert cfg["preset"] == "gpu"
        ids = {c.id for c in claims.claims_for(p.chapter)}
        assert set(p.claims) <= ids, (p.id, set(p.claims) - ids)
        assert all(n in campaign.BY_ID for n in p.needs)


def test_pieces_cover_every_run_of_each_gpu_preset():
    from repro.experiments import advprop, he, lmt
    he_cfg = he.SPEC.resolve("gpu")
    got = {v for p in campaign.PIECES if p.chapter == "he" for v in p.overrides["variants"]}
    assert got == set(he_cfg["variants"])
    lmt_cfg = lmt.SPEC.resolve("gpu")
    got = set()
    for p in campaign.PIECES:
        if p.chapter == "lmt":
            cfg = campaign.piece_config(p)
            got |= {(d, m) for d in cfg["datasets"] for m in cfg["methods"]}
    assert got == {(d, m) for d in lmt_cfg["datasets"] for m in lmt_cfg["methods"]}
    ad_cfg = advprop.SPEC.resolve("gpu")
    got = [n for p in campaign.PIECES if p.chapter == "advprop" for n in p.only]
    assert sorted(got) == sorted(r[0] for r in advprop.plan(ad_cfg)) and len(got) == len(set(got))
    bat_stages = {p.stage for p in campaign.PIECES if p.chapter == "bat"}
    assert bat_stages == {"memorization:cifar100", "memorization:cifar10", "run"}


def test_counted_flops_match_the_architecture():
    # PreAct-ResNet-18 on 32x32: 0.56 GMACs (the figure quoted for ResNet-18 on CIFAR)
    f = campaign.forward_flops(campaign.Arch("preact_resnet18", None, "cifar10"))
    assert 1.05e9 < f < 1.15e9
    # a quarter of the channels: about a sixteenth of the FLOPs
    f16 = campaign.forward_flops(campaign.Arch("preact_resnet18", 16, "cifar10"))
    assert 0.05 < f16 / f < 0.08
    assert campaign.modules(campaign.Arch("preact_resnet18", None, "cifar10")) > \
        campaign.modules(campaign.Arch("small_cnn", None, "mnist"))
    # PGD-AT with k steps costs 2k+3 forward-equivalents per image, plus validation
    cfg = campaign.piece_config(campaign.BY_ID["he-pgd"])
    train = campaign.workload_he(cfg)[0]
    assert train.passes >= cfg["epochs"] * 49000 * (2 * cfg["train_steps"] + 3)


def _fake_run(root, chapter, name, config, device_label=None):
    run = results.Run(root / chapter / f"{name}-{results.config_key(config)}", config)
    run.save({"accuracy": {"clean": 0.5}}, {"correct_clean": np.array([True, False])},
             wall_time_s=1.0)
    (run.path / "train").mkdir(exist_ok=True)
    (run.path / "train" / "final.pt").write_bytes(b"weights")   # must never travel
    if device_label:
        prov = json.loads((run.path / "provenance.json").read_text())
        prov["device"] = device_label
        (run.path / "provenance.json").write_text(json.dumps(prov))
    return run


def _manifest(dry_run=False, digest=None):
    import torch
    return {"library_digest": digest or campaign.library_digest(), "stamp": {"commit": "abc"},
            "device": "cuda: NVIDIA H200", "torch": torch.__version__, "repro_version": "x",
            "dry_run": dry_run, "status": "done", "spec_hash": "h"}


def test_pack_keeps_small_files_and_ingest_places_checked_runs(tmp_path):
    run = _fake_run(tmp_path / "dev", "he", "pgd_at", {"a": 1}, "cuda: NVIDIA H200")
    prov = json.loads((run.path / "provenance.json").read_text())
    prov["commit"] = None   # as on the device machine, which has no git
    (run.path / "provenance.json").write_text(json.dumps(prov))
    f = campaign.pack_piece("he-pgd", "he", {"pgd_at": str(run.path)}, tmp_path, "log",
                            _manifest())
    with tarfile.open(f) as tar:
        names = tar.getnames()
    assert not any(n.endswith(".pt") for n in names) and "piece.json" in names
    assert f"he/{run.path.name}/metrics.json" in names
    pub = tmp_path / "published"
    out = campaign.ingest([f], published_root=pub, log=lambda *_: None)
    dest = pub / "he" / "results" / run.path.name
    assert (dest / "DONE").exists() and not (dest / "train" / "final.pt").exists()
    prov = json.loads((dest / "provenance.json").read_text())
    assert prov["commit"] == "abc"   # the manifest's stamp, where git had none
    assert "campaign stamp" in prov["commit_source"]
    assert out["ledger"]["he-pgd"]["folders"] == [run.path.name]


@pytest.mark.parametrize("tamper", ["config", "cpu", "library", "dry"])
def test_ingest_refuses_what_does_not_check_out(tmp_path, tamper):
    device = None if tamper == "cpu" else "cuda: NVIDIA H200"
    run = _fake_run(tmp_path / "dev", "he", "pgd_at", {"a": 1}, device)
    if tamper == "config":
        (run.path / "config.json").write_text(json.dumps({"a": 2}))
    man = _manifest(dry_run=tamper == "dry", digest="0" * 16 if tamper == "library" else None)
    f = campaign.pack_piece("he-pgd", "he", {"pgd_at": str(run.path)}, tmp_path, "", man)
    pub = tmp_path / "published"
    good = _fake_run(tmp_path / "dev2", "he", "pgd_at_he", {"b": 1}, "cuda: NVIDIA H200")
    ok = campaign.pack_piece("he-ok", "he", {"pgd_at_he": str(good.path)}, tmp_path / "dev2",
                             "", _manifest())
    with pytest.raises(campaign.IngestError, match={"config": "config_key", "cpu": "not a GPU",
                                                    "library": "library digest",
                                                    "dry": "dry run"}[tamper]):
        campaign.ingest([f, ok], published_root=pub, log=lambda *_: None)
    # the refused archive placed nothing; the good one beside it was placed and recorded
    assert sorted(p.name for p in (pub / "he" / "results").iterdir()) == [good.path.name]
    assert list(campaign.read_ledger(pub / "campaign-ledger.json")) == ["he-ok"]


def test_done_pieces_are_skipped(tmp_path):
    piece = campaign.BY_ID["he-pgd"]
    pub = tmp_path / "published"
    folder = pub / "he" / "results" / "pgd_at-000000000000"
    folder.mkdir(parents=True)
    (folder / "DONE").write_text("x")
    ledger = {"he-pgd": {"spec_hash": campaign.spec_hash(piece), "folders": [folder.name]}}
    assert campaign.is_done(piece, ledger, published_root=pub)
    rows = campaign.plan_rows(ledger=ledger, published_root=pub)
    assert [r["done"] for r in rows if r["id"] == "he-pgd"] == [True]
    assert "he-pgd" not in campaign.first_window(rows)
    # another config (or library version) of the piece is not done; neither is a lost folder
    assert not campaign.is_done(piece, {"he-pgd": {**ledger["he-pgd"], "spec_hash": "x"}},
                                published_root=pub)
    (folder / "DONE").unlink()
    assert not campaign.is_done(piece, ledger, published_root=pub)


def test_staging_stamp_uses_the_campaign_digest():
    import importlib.util
    from repro.data import PROJECT_ROOT
    spec = importlib.util.spec_from_file_location("gpu_stage", PROJECT_ROOT / "tools" / "gpu_stage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.library_digest(PROJECT_ROOT) == campaign.library_digest()


def test_publish_overrides_union_the_done_pieces():
    ledger = {"he-pgd": {}, "he-trades": {}}
    assert campaign.publish_overrides("he", ledger) == {"variants": ["pgd_at", "trades"]}
    assert campaign.publish_overrides("he", {**ledger, "he-alp": {}}) == {}
    assert campaign.publish_overrides("lmt", {}) is None
    # LMT: MNIST x all methods + CIFAR-10 x two methods do not cover a product: the piece
    # that decides more claims alone is published (nothing may be recomputed on a CPU; the
    # MNIST piece decides none: the paper-preset run does); both CIFAR halves do
    assert campaign.publish_overrides("lmt", {"lmt-mnist": {}, "lmt-cifar-a": {}}) == \
        {"datasets": ["cifar10"], "methods": ["standard", "lmt"]}
    got = campaign.publish_overrides("lmt", {"lmt-cifar-a": {}, "lmt-cifar-b": {}})
    assert got["datasets"] == ["cifar10"] and len(got["methods"]) == 4
    # AdvProp's `only` pieces and BAT's stages publish once their chapter is complete
    assert campaign.publish_overrides("advprop", {"advprop-s0": {}}) is None
    assert campaign.publish_overrides("bat", {"bat-mem-cifar100": {}}) is None


@pytest.mark.slow
def test_dry_run_goes_from_plan_to_publish(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    # budget_s: the dry run checks the path, not the speed; its default (110 s, a window's
    # share) timed the piece out on a loaded 2-core machine
    s = campaign.run_dry(tmp_path, budget_s=900, log=lambda *_: None)
    pieces = s["manifest"]["pieces"]
    assert pieces["he-pgd"]["status"] == "done", pieces   # with papermill, pandas... blocked
    back = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert back == ["campaign.json", "piece-he-pgd.tar.gz", "preflight.json"]
    assert all((tmp_path / "back" / n).stat().st_size < campaign.MAX_FILE_BYTES for n in back)
    pre = json.loads((tmp_path / "back" / "preflight.json").read_text())
    assert pre["matmul_bf16"]["ok"] and pre["rates"] and "img_s" in pre["bench_pgd"]
    assert "speedup" in pre["bench_train"]
    assert set(s["placed"]["he-pgd"]) == {p.rsplit("/", 1)[-1]
                                         for p in pieces["he-pgd"]["runs"].values()}
    # published from the ingested runs: nothing recomputed on the CPU side
    assert set(s["published"]["he"]) == {"pgd_at", "pgd_at_he"}
    assert s["recomputed_on_cpu_side"] == []
    nb = (tmp_path / "published" / "he" / "he.ipynb").read_text()
    assert '"output_type": "error"' not in nb


def test_the_docs_give_the_campaign_commands_and_the_window_sequence():
    from repro.data import PROJECT_ROOT
    page = (PROJECT_ROOT / "book" / "how-to-run.md").read_text()
    for cmd in ("campaign plan", "campaign run --budget-s", "campaign ingest", "--dry-run",
                "--piece he-pgd", "tools/gpu-window.md"):
        assert cmd in page, cmd
    window = (PROJECT_ROOT / "tools" / "gpu-window.md").read_text()
    for step in ("tools/gpu_stage.py", 'carry=[".device/p1"]', "unpack.sh",
                 f"--budget-s {campaign.WINDOW_RUN_S}", "campaign ingest", "give_back"):
        assert step in window, step


def test_hot_paths_run_and_on_cuda_do_not_synchronise():
    import torch
    for name, fn in campaign.hot_paths(torch.device("cpu")).items():
        out = fn()
        assert out is not None and (len(out) == 4 if name == "train_batches" else
                                    out.shape == (64, 3, 32, 32)), name
    assert campaign.sync_check(torch.device("cpu"))["checked"] is False
    if not torch.cuda.is_available():
        pytest.skip("the sync count itself needs CUDA (the campaign's preflight records it)")
    got = campaign.sync_check(torch.device("cuda"))
    assert all(got[k]["syncs"] == 0 for k in ("pgd", "fgsm_rs", "train_batches")), got


def test_a_piece_that_outruns_the_budget_is_killed_and_reported(tmp_path, monkeypatch):
    import os
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    piece = campaign.BY_ID["he-pgd"]
    entry, manifest = {"spec_hash": "h"}, {"pieces": {}}
    env = dict(os.environ)
    campaign._run_one(piece, entry, 1.0, 1.0, 0.5, True, env, tmp_path, tmp_path, manifest,
                      set(), lambda *_: None)
    assert entry["status"] == "timeout" and entry["returncode"] == "timeout"
    # killed at the budget, not run to the end: no run of the piece finished
    assert not list(tmp_path.rglob("DONE"))
    assert entry["runs"] == {} and "file" not in entry   # nothing finished, nothing packed
    assert not list(tmp_path.glob("piece-*.tar.gz"))
