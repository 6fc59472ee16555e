import numpy as np

from repro import results


def test_cached_computes_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    calls = []

    def compute(run):
        calls.append(run.path)
        return {"acc": 0.5}, {"correct": np.array([True, False])}

    cfg = {"epochs": 1, "eps": 0.1}
    run = results.cached("demo", "train", cfg, compute, log=None)
    again = results.cached("demo", "train", dict(cfg), compute, log=None)
    assert len(calls) == 1 and again.path == run.path and again.done
    assert again.metrics() == {"acc": 0.5}
    assert again.arrays()["correct"].tolist() == [True, False]
    prov = again.provenance()
    assert prov["device"].startswith("cpu") and prov["wall_time_s"] >= 0 and "torch" in prov
    results.cached("demo", "train", {"epochs": 2, "eps": 0.1}, compute, log=None)
    assert len(calls) == 2  # another config is another run


def test_interrupted_run_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    cfg = {"a": 1}
    run = results.find_run("demo", "x", cfg).prepare()
    (run.path / "ckpt").write_text("partial")  # a computation that died before save()
    seen = []
    out = results.cached("demo", "x", cfg, lambda r: (seen.append((r.path / "ckpt").exists()) or ({}, None)),
                         log=None)
    assert seen == [True] and out.done  # same folder, so its checkpoints are there to resume


def test_published_runs_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "local"))
    monkeypatch.setattr(results, "PUBLISHED_ROOT", tmp_path / "published")
    cfg = {"preset": "gpu"}
    folder = f"train-{results.config_key(cfg)}"
    results.Run(tmp_path / "published" / "demo" / "results" / folder, cfg).save({"acc": 0.9})
    run = results.cached("demo", "train", cfg, lambda r: 1 / 0, log=None)
    assert run.metrics() == {"acc": 0.9}


def test_key_depends_on_library_version(monkeypatch):
    import repro
    k1 = results.config_key({"a": 1})
    monkeypatch.setattr(repro, "__version__", "9.9.9")
    assert results.config_key({"a": 1}) != k1


def test_compute_time_counts_each_folder_once_with_its_upstream():
    runs = [{"folder": "results/pgd_at-1", "wall_time_s": 300.0},
            {"folder": "results/pgd_at-1", "wall_time_s": 300.0},   # typical+1 is pgd_at
            {"folder": "results/memorization-2", "wall_time_s": 0.2,
             "upstream_wall_time_s": 420.0},                        # its subset models
            {"folder": "results/proxy-3", "wall_time_s": None}]
    assert results.compute_time(runs) == {"compute_wall_time_s": 720.2,
                                          "upstream_wall_time_s": 420.0}
