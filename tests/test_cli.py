"""The command line: argument routing, error messages (in this process through cli.main, and
once end to end through a `python -m repro` subprocess) and the one meaning of None on every
path (the chapters' runs are tested elsewhere)."""
import os
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
from papermill.cli import _resolve_type as papermill_value  # how papermill's CLI reads -p

from repro import cli, params


def test_bench_help_reaches_the_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "python -m repro bench train" in out and "--batch-size" in out


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    assert cli.main(["bench"]) == 0
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "pgd" in out and "train" in out


def test_bench_unknown_name_fails(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors (issue 13)
# In-process through cli.main (what `python -m repro` calls: repro/__main__.py is
# `sys.exit(main())`): each `python -m repro` process re-imports torch, 3-5 s on CI. One test
# keeps the real process end to end (exit status and stderr of `python -m repro`).

ROOT = Path(__file__).resolve().parents[1]
TINY_INTRO = ["experiment", "intro", "-p", "n_train", "200", "-p", "n_test", "10",
              "-p", "train_steps", "1", "-p", "eval_steps", "1", "-p", "eps_grid", "[0.0]"]


def _cli(*args, **env):
    # PYTHONPATH: a notebook kernel (cwd notebooks/) imports this checkout's repro too
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "repro", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **env})


def _main(capsys, *args) -> tuple[int, str]:
    """``python -m repro ARGS`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]  # progress bars also go to stderr


def _is_missing_mnist_message(stderr: str) -> bool:
    return (stderr.startswith("error: DataNotFoundError: dataset 'mnist' not found")
            and "REPRO_DATA" in stderr and "Traceback" not in stderr
            and stderr.rstrip().endswith("[--debug shows the traceback]"))


def test_python_m_repro_end_to_end(tmp_path):
    """The real process: `python -m repro` exits with main's status and prints its one-line
    message, no traceback (the other error tests call main in this process)."""
    r = _cli("data", "show", "mnist", REPRO_DATA=str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert _is_missing_mnist_message(r.stderr), r.stderr


def test_missing_dataset_prints_the_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    from repro import data
    monkeypatch.setenv("REPRO_DATA", str(tmp_path))
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    for args in (["data", "show", "mnist"], TINY_INTRO):
        code, err = _main(capsys, *args)
        assert code == 1 and _is_missing_mnist_message(err), (args, err)
    # --debug, before or after the command: the exception itself leaves main (traceback)
    for args in (["--debug", "data", "show", "mnist"], ["data", "show", "mnist", "--debug"]):
        with pytest.raises(data.DataNotFoundError):
            cli.main(args)


def test_bad_parameters_exit_2_before_any_work(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    cases = [(["-p", "epochs", "-1"], "error: parameter 'epochs' must be >= 1, got -1"),
             (["-p", "n_test", "20000"], "error: parameter 'n_test' must be <= 10000, got 20000"),
             (["-p", "epochs", "None"], "error: parameter 'epochs' cannot be None"),
             (["-p", "epoch", "3"], "error: unknown parameter 'epoch'")]
    for command, args, message in [("experiment", *case) for case in cases] + \
            [("run", *case) for case in cases[:3:2]]:  # run: the same check, before papermill
        code, err = _main(capsys, command, "intro", *args)
        assert code == 2 and err.startswith(message), (args, err)
        assert "Traceback" not in err
    # beyond a split's size where no spec bound knows the dataset (LMT's n_train): refused when
    # the data are loaded, before that dataset's training
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    code, err = _main(capsys, "experiment", "lmt", "-p", "datasets", "['cifar10']",
                      "-p", "n_train", "48001")
    assert code == 2 and "Traceback" not in err
    assert _last_line(err).startswith(
        "error: n_train=48001, but cifar10 has 48000 train images after the validation split")
    assert not list(tmp_path.iterdir())  # nothing trained, nothing cached


def test_corrupt_checkpoint_prints_the_message_not_a_traceback(tmp_path, data_root,
                                                                monkeypatch, capsys):
    from repro import train
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    code, err = _main(capsys, *TINY_INTRO)
    assert code == 0, err
    # turn the finished standard run into an interrupted one whose checkpoint is garbage
    (run,) = (tmp_path / "intro").glob("standard-*")
    (run / "DONE").unlink()
    (run / "train" / "result.json").unlink()
    checkpoint = run / "train" / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    code, err = _main(capsys, *TINY_INTRO)
    assert code == 1 and "Traceback" not in err
    assert _last_line(err).startswith(
        f"error: CheckpointError: checkpoint {checkpoint} is corrupt or unreadable")
    assert "delete it to start the run over" in _last_line(err)
    with pytest.raises(train.CheckpointError):
        cli.main(["--debug", *TINY_INTRO])


# ----------------------------------------------------------------------------- None (issue 13)

def test_none_means_the_same_through_params_cli_and_papermill(monkeypatch, capsys, tmp_path,
                                                              notebook_namespace):
    """Issue 13: `-p n_train None` ran the smoke preset's 3000 images while `params` said
    "None: all 55,000". Now None is the value "all" on every path, and only leaving the
    parameter out (or `...`, the notebooks' default) keeps the preset's value."""
    from repro.experiments import intro
    assert cli.main(["params", "intro"]) == 0
    assert "n_train (int or None) in [1, 55000]: training images (None: all 55,000)" in \
        capsys.readouterr().out
    # python -m repro experiment
    seen = []
    monkeypatch.setattr(intro, "run", lambda preset, **o: seen.append(
        intro.SPEC.resolve(preset, **o)) or {})
    for args in (["-p", "n_train", "None"], ["-p", "n_train", "null"], [],
                 ["-p", "n_train", "..."], ["-p", "n_train", "7"]):
        assert cli.main(["experiment", "intro", *args]) == 0
    assert [c["n_train"] for c in seen] == [None, None, 3000, 3000, 7]
    # python -m repro run: what it hands papermill, injected into the real notebook
    handed = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda nb, out, parameters, **kw: handed.append(parameters))
    for args in (["-p", "n_train", "None"], []):
        assert cli.main(["run", "intro", *args, "--output", str(tmp_path / "o.ipynb")]) == 0
    got = [params.from_notebook(intro.SPEC, notebook_namespace("intro", p))["n_train"]
           for p in handed]
    assert got == [None, 3000]
    # papermill alone (`papermill notebooks/intro.ipynb out.ipynb -p n_train None`)
    ns = notebook_namespace("intro", {"n_train": papermill_value("None")})
    assert params.from_notebook(intro.SPEC, ns)["n_train"] is None
    assert params.from_notebook(intro.SPEC, notebook_namespace("intro", None))["n_train"] == 3000
    # a parameter without a None meaning refuses it on every path
    assert cli.main(["experiment", "intro", "-p", "epochs", "None"]) == 2
    with pytest.raises(params.ParameterError, match="'epochs' cannot be None"):
        params.from_notebook(intro.SPEC, notebook_namespace("intro", {"epochs": None}))


@pytest.mark.slow
def test_a_failing_notebook_cell_is_one_message(tmp_path, monkeypatch, capsys):
    """`run` validates, then papermill's error (whose text is the cell's whole traceback)
    becomes the cell's exception in one line."""
    monkeypatch.setenv("REPRO_DATA", str(tmp_path))
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path / "results"))
    # the kernel (cwd notebooks/) imports this checkout's repro
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    code, err = _main(capsys, "run", "intro", "--output", str(tmp_path / "out.ipynb"))
    assert code == 1 and "Traceback" not in err
    message = err[err.index("error: "):]  # after the kernel's own log lines
    assert message.startswith("error: the notebook failed in cell ")
    assert "DataNotFoundError: dataset 'mnist' not found" in message.splitlines()[0]
    assert message.rstrip().endswith("[--debug shows the traceback]")
