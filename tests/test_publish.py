"""`python -m repro publish`: a chapter's executed notebook and its runs' small files land in
book/published/<chapter>/ with a publication record, and the scorecard judges from them."""
import json

import pytest

from repro import claims, experiments, publish, results, scorecard

ROOT = experiments.PROJECT_ROOT


@pytest.mark.parametrize("args,fragment", [
    (["--preset", "smoke"], "smoke runs prove only that the code runs"),
    (["--preset", "laptop", "-p", "epochz", "2"], "unknown parameter 'epochz'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
])
def test_cli_publish_refuses_before_any_work(args, fragment, capsys, monkeypatch):
    from repro import cli
    monkeypatch.setattr(experiments.get("intro"), "run",
                        lambda *a, **k: pytest.fail("publish started work"))
    assert cli.main(["publish", "intro", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_publish_is_wired(capsys):
    from repro import cli   # in this process (tests/test_cli.py runs `python -m repro` itself)
    with pytest.raises(SystemExit) as e:
        cli.main(["publish", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--preset" in out and "--allow-smoke" in out


def test_copy_run_takes_small_files_only(tmp_path):
    src, dst = tmp_path / "run", tmp_path / "out"
    (src / "train").mkdir(parents=True)
    for f in ("config.json", "metrics.json", "provenance.json", "DONE", "arrays.npz",
              "train/metrics.jsonl", "train/result.json", "train/best.pt", "train/final.pt",
              "train/last.pt.tmp"):
        (src / f).write_text("x")
    copied = publish.copy_run(src, dst)
    assert sorted(copied) == sorted(publish.SMALL_FILES)
    assert not list(dst.rglob("*.pt")) and not list(dst.rglob("*.tmp"))
    (src / "DONE").unlink()
    with pytest.raises(publish.PublishError, match="not finished"):
        publish.copy_run(src, tmp_path / "again")


def test_prepare_for_book_hides_the_empty_parameters_cell(tmp_path):
    nb = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "preset = 'smoke'",
         "outputs": []},
        {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
         "source": "preset = 'laptop'", "outputs": []},
        {"cell_type": "code", "metadata": {}, "source": "",
         "outputs": [{"output_type": "stream", "name": "stdout",
                      "text": f"reusing {ROOT}/results/intro/x\n"}]}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    src = tmp_path / "in.ipynb"
    src.write_text(json.dumps(nb))
    out = json.loads(publish.prepare_for_book(src, tmp_path / "out" / "c.ipynb").read_text())
    assert "remove-cell" in out["cells"][0]["metadata"]["tags"]
    assert "remove-cell" not in out["cells"][1]["metadata"]["tags"]
    assert out["cells"][2]["outputs"][0]["text"] == "reusing results/intro/x\n"


@pytest.mark.slow
def test_publish_intro_at_smoke(tmp_path, data_root):
    root = tmp_path / "published"
    rec = publish.publish("intro", "smoke", {}, root=root, allow_smoke=True, progress=False)
    base = root / "intro"
    assert (base / "intro.ipynb").is_file() and (base / publish.RECORD).is_file()
    assert set(rec["runs"]) == {"standard", "pgd_at"}
    for run in rec["runs"].values():
        folder = base / run["folder"]
        assert (folder / "DONE").is_file() and (folder / "metrics.json").is_file()
        assert (folder / "train" / "metrics.jsonl").is_file()
    assert not list(base.rglob("*.pt"))
    assert rec["total_bytes"] < publish.MAX_BYTES
    assert rec["preset"] == "smoke" and rec["seed"] == 0 and rec["devices"]
    assert rec["commits"] and rec["computed"] and rec["compute_wall_time_s"] > 0
    nb = (base / "intro.ipynb").read_text()
    assert str(ROOT) not in nb and '"output_type": "error"' not in nb

    loaded_rec, result = publish.load("intro", root)
    assert loaded_rec == rec
    assert result["runs"]["pgd_at"]["metrics"]["accuracy"]["clean"] == \
        rec["summary"]["pgd_at"]["clean"]
    # The scorecard judges the intro claims from the published files alone.
    rows = [r for r in scorecard.rows(root) if r["paper"] == "intro"]
    assert rows and {r["verdict"] for r in rows} == {claims.NOT_YET_RUN}, "smoke is not judged"
    rows = [r for r in scorecard.rows(root, judge_smoke=True) if r["paper"] == "intro"]
    assert rows and all(r["verdict"] in claims.VERDICTS for r in rows)
    judged = [r for r in rows if r["verdict"] != claims.NOT_YET_RUN]
    assert judged and all(r["run"]["preset"] == "smoke" for r in judged)

    # Publishing again replaces the folder: no stale folder is left behind, but a finished
    # run this publication does not use (e.g. ingested from a GPU campaign) is kept.
    (base / "results" / "stale").mkdir()
    other_config = {"chapter": "intro", "preset": "gpu", "note": "ingested"}
    other = base / "results" / f"pgd_at-{results.config_key(other_config)}"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(other_config))
    (other / "DONE").write_text("done")
    wrong = base / "results" / "pgd_at-000000000000"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(other_config))
    (wrong / "DONE").write_text("done")
    # An earlier configuration of the same preset is superseded, not kept.
    old_config = {"chapter": "intro", "preset": "smoke", "epochs": 99}
    superseded = base / "results" / f"pgd_at-{results.config_key(old_config)}"
    superseded.mkdir()
    (superseded / "config.json").write_text(json.dumps(old_config))
    (superseded / "DONE").write_text("done")
    rec2 = publish.publish("intro", "smoke", {}, root=root, allow_smoke=True, progress=False)
    assert not (base / "results" / "stale").exists()
    assert not (base / "results" / superseded.name).exists(), "same preset: superseded"
    assert not (base / "results" / wrong.name).exists(), "a folder whose key mismatches is dropped"
    assert (base / "results" / other.name / "DONE").is_file()
    assert rec2["kept_runs"] == [other.name]
    assert not any(other.name in f for f in rec2["files"])
    assert not list(root.glob(".intro.*"))


def test_keep_other_runs_drops_what_a_publication_supersedes(tmp_path):
    """Another preset's runs are kept; the same preset's are superseded, all of them on a full
    republication, only the recomputed run names on a partial one (``-p datasets [...]``)."""
    old, new = tmp_path / "old", tmp_path / "new"
    new.mkdir()
    (new / "cifar-lmt-abc").mkdir()  # what the new publication computed

    def finished(name, config):
        folder = old / f"{name}-{results.config_key(config)}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "DONE").write_text("done")
        return folder.name

    gpu = finished("cifar-lmt", {"preset": "gpu", "c": 1})
    mnist = finished("mnist-lmt", {"preset": "paper", "c": 1})
    cifar = finished("cifar-lmt", {"preset": "paper", "c": 2})
    partial = publish.keep_other_runs(old, new, "paper", partial=True)
    assert sorted(partial) == sorted([gpu, mnist]) and cifar not in partial
    new2 = tmp_path / "new2"
    new2.mkdir()
    assert publish.keep_other_runs(old, new2, "paper") == [gpu]
    # A run key without the preset: superseded when the earlier publication of the preset used it.
    keyless = finished("vanilla", {"c": 3})
    new4 = tmp_path / "new4"
    new4.mkdir()
    assert keyless in publish.keep_other_runs(old, new4, "paper")
    (tmp_path / "new5").mkdir()
    assert keyless not in publish.keep_other_runs(old, tmp_path / "new5", "paper",
                                                  used_before={keyless})
    new3 = tmp_path / "new3"
    new3.mkdir()
    assert publish.keep_other_runs(old, new3, None) == sorted([gpu, mnist, cifar, keyless])


def test_banner_states_the_training_precision_and_how_to_rerun_it():
    from repro import report
    run = lambda amp, device="cpu: x": {  # noqa: E731
        "provenance": {"device": device, "commit": "c", "date": "2026-12-03T00:00:00",
                       "wall_time_s": 1.0, "torch": "2.13"},
        "metrics": {"training": {"precision": {"amp": amp}} if amp else {"history": []}}}
    result = {"config": {"preset": "overnight", "seed": 0},
              "runs": {"a": run("bf16"), "b": run("bf16"), "c": run("fp32"),
                       "d": run(None), "e": {**run(None), "metrics": {}}}}
    assert report.training_precision(result["runs"]["a"]) == "bf16"
    assert report.training_precision(result["runs"]["d"]) == "fp32 (inferred)"  # no record
    assert report.training_precision(result["runs"]["e"]) is None   # trained nothing
    text = report.provenance_banner(result).data
    assert "bf16 (2 runs)" in text and "fp32 (1 run)" in text and "REPRO_AMP=fp32" in text
    assert "Reduced scale" in text and "`overnight`" in text
    cuda = {"config": {"preset": "gpu", "seed": 0},
            "runs": {"a": run(None, "cuda: NVIDIA H200")}}
    assert "bf16 (inferred) (1 run)" in report.provenance_banner(cuda).data
