"""The command line's argument routing (the chapters' runs are tested elsewhere)."""
import pytest

from repro import cli


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
