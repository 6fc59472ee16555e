"""Data-parallel training (repro.distributed) on the CPU with gloo and 2 processes launched by
torchrun: N = 1 and N = 2 end with the same weights and metrics (PGD-AT, TRADES, LMT); a
2-process run stopped mid-way resumes to the uninterrupted one; the single-process path gives
what the trainer gave before data parallelism existed; ``torchrun -m repro experiment``
writes once and matches one process. The model is BN-free (tests/ddp_worker.py says why).

One ``torchrun`` spawn serves every 2-process assertion (tests/ddp_worker.py --suite: the
runs, then the experiment command in the same processes); the one-process runs happen in
this process. Each spawn costs a Python start and a torch import per process."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro import cli, distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# tests/ddp_worker.py run by the library before data parallelism (commit 0fc1873, one process,
# torch 2.13 CPU; `REPRO_TREE=<0fc1873's tree> python tests/ddp_worker.py DIR`, a procedure
# that reproduces the earlier 240-image reference exactly): the history's metrics and the
# final weights' sums.
REFERENCE = {
    "history": [{"epoch": 1, "step": 3, "loss": 2.3661542733510337, "adv_acc": 0.0,
                 "val_clean": 0.125, "val_robust": 0.0},
                {"epoch": 2, "step": 6, "loss": 2.3431107997894287,
                 "adv_acc": 0.008333333457509676, "val_clean": 0.1, "val_robust": 0.0}],
    "weight_sums": {
        "conv1.weight": -0.9326390728820115, "conv1.bias": 0.14430266758427024,
        "conv2.weight": -0.9244562339881668, "conv2.bias": -0.28587094228714705,
        "fc1.weight": -2.4761923966370887, "fc1.bias": -0.10090098896762356,
        "head.weight": 0.8733348319074139, "head.bias": 0.11416507884860039},
}
METRICS = ("loss", "adv_acc", "val_clean", "val_robust")


# `python -m repro experiment intro` at toy size: one process (here) and two (torchrun)
EXPERIMENT = ["intro", "--preset", "smoke", "-p", "n_train", "600", "-p", "n_test", "40",
              "-p", "eval_steps", "2", "-p", "eps_grid", "[0.0, 0.1]"]


# The spawn's environment. REPRO_AMP=fp32: the experiment's runs (amp="auto") are compared
# for equality between N = 1 and N = 2; "auto" is bf16 on a CPU with native bf16, where the two
# process counts' different batch shapes round differently (clean 0.475 vs 0.5 measured on an
# AVX-512-bf16 EPYC). The worker's own runs pin amp="fp32" in their config.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "REPRO_AMP": "fp32"}


def _weights(run_dir):
    return torch.load(Path(run_dir) / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def one(tmp_path_factory, data_root):
    """The one-process runs, in this process (the same code as the workers' ``run``)."""
    base = tmp_path_factory.mktemp("n1")
    return {name: (base / name, worker.run(base / name, name)) for name in worker.OBJECTIVES}


@pytest.fixture(scope="module")
def two(tmp_path_factory, data_root):
    """The one torchrun spawn: 2-process runs of every objective, the stopped-and-resumed
    run, and ``experiment`` EXPERIMENT. Before it, the one-process experiment runs here;
    its PGD-AT run is handed to the 2-process experiment, which must reuse it on both ranks
    (no rank trains alone) and train the standard model itself."""
    base = tmp_path_factory.mktemp("n2")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("REPRO_RESULTS", str(base / "one"))
        mp.setenv("REPRO_AMP", "fp32")  # an equality test, in fp32 on every CPU (see ENV)
        assert cli.main(["experiment", *EXPERIMENT]) == 0
    finally:
        mp.undo()
    (adv,) = (base / "one" / "intro").glob("pgd_at-*")
    shutil.copytree(adv, base / "two" / "intro" / adv.name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(WORKER), "--suite", str(base / "runs"),
           "--experiment-results", str(base / "two"), "--", *EXPERIMENT]
    env = {**os.environ, **ENV}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((base / "runs" / "report.json").read_text())
    return {"base": base, "report": report, "log": out.stdout + out.stderr,
            "runs": {name: (base / "runs" / name, report[name]) for name in worker.OBJECTIVES}}


def test_single_process_is_unchanged(one):
    _, run = one["pgd_at"]
    assert run["world_size"] == 1
    for got, want in zip(run["history"], REFERENCE["history"], strict=True):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for k, v in REFERENCE["weight_sums"].items():
        assert run["weight_sums"][k] == pytest.approx(v, rel=1e-6), k


def test_two_processes_equal_one(one, two):
    (dir1, r1), (dir2, r2) = one["pgd_at"], two["runs"]["pgd_at"]
    assert r2["world_size"] == 2
    w1, w2 = _weights(dir1), _weights(dir2)
    assert w1.keys() == w2.keys()
    # training moved the weights far beyond the tolerance below (else equality is trivial)
    start = worker.initial_model().state_dict()
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    for h1, h2 in zip(r1["history"], r2["history"], strict=True):
        assert h1["step"] == h2["step"]
        for k in METRICS:
            assert h2[k] == pytest.approx(h1[k], rel=1e-5, abs=1e-7), k
    # rank 0 alone wrote the run folder: one metrics.jsonl mirroring the history
    lines = (dir2 / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3, 6]
    assert not (dir2 / "checkpoint.pt").exists() and (dir2 / "result.json").exists()


@pytest.mark.parametrize("objective, logs", [
    ("trades", ("loss", "natural", "kl", "acc", "adv_acc")),
    ("lmt", ("loss", "acc", "lipschitz"))])
def test_two_processes_equal_one_with_other_objectives(one, two, objective, logs):
    """TRADES: a KL attack and two training forwards (clean and adversarial) through DDP
    before one backward. LMT: a Lipschitz bound that walks the (DDP-wrapped) model, with
    persistent power-iteration vectors on every rank."""
    (dir1, r1), (dir2, r2) = one[objective], two["runs"][objective]
    assert r2["world_size"] == 2
    w1, w2 = _weights(dir1), _weights(dir2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    for h1, h2 in zip(r1["history"], r2["history"], strict=True):
        for k in logs:
            assert h2[k] == pytest.approx(h1[k], rel=1e-5, abs=1e-7), k


def test_stopped_two_process_run_resumes_to_the_uninterrupted_one(two):
    dir2, ref_run = two["runs"]["pgd_at"]
    report = two["report"]
    # stopped on every rank when step 5 started: no result, the step-4 checkpoint left
    assert report["stop"] == f"stopped at step {worker.STOP_AT}"
    assert "result.json" not in report["after_stop"] and "checkpoint.pt" in report["after_stop"]
    resumed = report["resumed"]
    assert resumed["resumed_from"] == 4, "the last checkpoint (checkpoint_every=2) before step 5"
    w, ref = _weights(two["base"] / "runs" / "resumed"), _weights(dir2)
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    for h1, h2 in zip(ref_run["history"], resumed["history"], strict=True):
        for k in METRICS:
            assert h2[k] == pytest.approx(h1[k], rel=1e-6, abs=1e-7), k


def test_slice_randomness_gives_each_rank_its_rows_of_the_global_draw():
    """What makes N = 2 equal N = 1 with random attack starts: rank r's draws are rows
    [r * n, (r + 1) * n) of the draws a single process makes for the global batch, for every
    form of draw the attacks use; other draws are left alone (identical on every rank)."""
    def draws(gen, n):
        return [torch.rand((n, 3, 2), generator=gen), torch.randn(n, 5, generator=gen),
                torch.randint(1, 10, (n,), generator=gen),
                torch.empty(n, 4).uniform_(-1, 1, generator=gen),
                torch.rand(7, generator=gen)]

    full = draws(torch.Generator().manual_seed(3), 6)
    torch.manual_seed(11)
    unsliced = torch.rand((3, 2))   # what the global generator gives outside the context
    for r in range(2):
        g = torch.Generator().manual_seed(3)
        torch.manual_seed(11)
        with distributed.SliceRandomness(g, local_n=3, global_n=6, offset=3 * r):
            part = draws(g, 3)
            other = torch.rand((3, 2))  # the global generator: not sliced, not advanced
        for a, b in zip(part[:4], full[:4]):
            torch.testing.assert_close(a, b[3 * r:3 * r + 3], rtol=0, atol=0)
        torch.testing.assert_close(part[4], full[4], rtol=0, atol=0)
        torch.testing.assert_close(other, unsliced, rtol=0, atol=0)
    # without the slicing, a rank's random starts are not its rows of the global draw
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(torch.rand((3, 3, 2), generator=g), full[0][3:])


def test_single_process_hooks_are_the_identity():
    par = distributed.context()
    assert isinstance(par, distributed.Single) and par.is_writer and distributed.world_size() == 1
    m = torch.nn.Linear(2, 2)
    assert par.wrap(m, torch.device("cpu")) is m and par.prepare(m, torch.device("cpu")) is m
    assert distributed.agree("x") == "x"


def test_torchrun_experiment_writes_once_and_matches_one_process(two):
    """``torchrun -m repro experiment`` (the command's code, in the spawn's processes): rank 0
    writes the run it trains under the same cache key as a one-process run, the standard
    model's metrics equal the one-process run's, and a finished run is reused on every rank
    (no rank trains alone)."""
    base, log = two["base"], two["log"]
    assert "finished in" in log and "on 2 processes" in log
    names = sorted(p.name for p in (base / "two" / "intro").iterdir())
    assert names == sorted(p.name for p in (base / "one" / "intro").iterdir())
    assert len(names) == 2
    std = next(n for n in names if n.startswith("standard"))
    folder = base / "two" / "intro" / std
    assert (folder / "DONE").exists() and not (folder / "train" / "checkpoint.pt").exists()
    assert not list(folder.rglob("*.tmp*"))
    m1 = json.loads((base / "one" / "intro" / std / "metrics.json").read_text())
    m2 = json.loads((folder / "metrics.json").read_text())
    assert m2["accuracy"] == pytest.approx(m1["accuracy"], abs=1e-9)
    h1, h2 = m1["training"]["history"], m2["training"]["history"]
    assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)
    assert "[cache] intro/standard" not in log, "the standard model was trained on 2 ranks"
    assert log.count("[cache] intro/pgd_at") >= 2, "the finished run reused on both ranks"
