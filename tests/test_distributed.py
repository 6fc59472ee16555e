"""Data-parallel training (repro.distributed) on the CPU with gloo and 2 processes launched by
torchrun: N = 1 and N = 2 end with the same weights and metrics; a killed 2-process run
resumes to the uninterrupted one; the single-process path gives what the trainer gave before
data parallelism existed. The model is BN-free (tests/ddp_worker.py says why)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")

# tests/ddp_worker.py run by the library before data parallelism (commit 0fc1873, one process,
# torch 2.13 CPU): the history's metrics and the final weights' sums.
REFERENCE = {
    "history": [{"epoch": 1, "step": 6, "loss": 2.362767537434896, "adv_acc": 0.0,
                 "val_clean": 0.025, "val_robust": 0.0},
                {"epoch": 2, "step": 12, "loss": 2.321506222089132,
                 "adv_acc": 0.025000000682969887, "val_clean": 0.025, "val_robust": 0.0}],
    "weight_sums": {"conv1.weight": -0.918977284047287, "conv1.bias": 0.09392209630459547,
                    "conv2.weight": -1.9416044375975616, "conv2.bias": -0.39850566582754254,
                    "fc1.weight": -6.229477207485388, "fc1.bias": -0.2885484043508768,
                    "head.weight": 0.8730308710364625, "head.bias": 0.11412542127072811},
}
METRICS = ("loss", "adv_acc", "val_clean", "val_robust")


def _run(run_dir, nproc=1, exit_at=None, check=True, objective="pgd_at"):
    cmd = [sys.executable, str(WORKER), str(run_dir), "--objective", objective]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if exit_at is not None:
        cmd += ["--exit-at", str(exit_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    return out


def _weights(run_dir):
    return torch.load(Path(run_dir) / "final.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("ddp")
    return {n: (base / f"n{n}", _run(base / f"n{n}", nproc=n)) for n in (1, 2)}


def test_single_process_is_unchanged(runs):
    _, one = runs[1]
    assert one["world_size"] == 1
    for got, want in zip(one["history"], REFERENCE["history"], strict=True):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for k, v in REFERENCE["weight_sums"].items():
        assert one["weight_sums"][k] == pytest.approx(v, rel=1e-6), k


def test_two_processes_equal_one(runs):
    (dir1, one), (dir2, two) = runs[1], runs[2]
    assert two["world_size"] == 2
    w1, w2 = _weights(dir1), _weights(dir2)
    assert w1.keys() == w2.keys()
    moved = sum(float((w1[k] - torch.load(dir1 / "best.pt", weights_only=True)[k]).abs().sum())
                for k in w1) + sum(abs(v) for v in one["weight_sums"].values())
    assert moved > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    for r1, r2 in zip(one["history"], two["history"], strict=True):
        assert r1["step"] == r2["step"]
        for k in METRICS:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), k
    # rank 0 alone wrote the run folder: one metrics.jsonl mirroring the history
    lines = (dir2 / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [6, 12]
    assert not (dir2 / "checkpoint.pt").exists() and (dir2 / "result.json").exists()


@pytest.mark.parametrize("objective, logs", [
    ("trades", ("loss", "natural", "kl", "acc", "adv_acc")),
    ("lmt", ("loss", "acc", "lipschitz"))])
def test_two_processes_equal_one_with_other_objectives(tmp_path, data_root, objective, logs):
    """TRADES: a KL attack and two training forwards (clean and adversarial) through DDP
    before one backward. LMT: a Lipschitz bound that walks the (DDP-wrapped) model, with
    persistent power-iteration vectors on every rank."""
    one = _run(tmp_path / "n1", objective=objective)
    two = _run(tmp_path / "n2", nproc=2, objective=objective)
    w1, w2 = _weights(tmp_path / "n1"), _weights(tmp_path / "n2")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    for r1, r2 in zip(one["history"], two["history"], strict=True):
        for k in logs:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-7), k


def test_killed_two_process_run_resumes_to_the_uninterrupted_one(runs, tmp_path):
    dir2, two = runs[2]
    killed = _run(tmp_path / "r", nproc=2, exit_at=9, check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "r" / "result.json").exists()
    resumed = _run(tmp_path / "r", nproc=2)
    assert resumed["resumed_from"] == 8, "the last checkpoint (checkpoint_every=2) before step 9"
    w, ref = _weights(tmp_path / "r"), _weights(dir2)
    for k in ref:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    for r1, r2 in zip(two["history"], resumed["history"], strict=True):
        for k in METRICS:
            assert r2[k] == pytest.approx(r1[k], rel=1e-6, abs=1e-7), k


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
    for r in range(2):
        g = torch.Generator().manual_seed(3)
        with distributed.SliceRandomness(g, local_n=3, global_n=6, offset=3 * r):
            part = draws(g, 3)
            other = torch.rand((3, 2))  # global generator: untouched
        for a, b in zip(part[:4], full[:4]):
            torch.testing.assert_close(a, b[3 * r:3 * r + 3], rtol=0, atol=0)
        torch.testing.assert_close(part[4], full[4], rtol=0, atol=0)
        assert other.shape == (3, 2)
    # without the slicing, a rank's random starts are not its rows of the global draw
    g = torch.Generator().manual_seed(3)
    assert not torch.equal(torch.rand((3, 3, 2), generator=g), full[0][3:])


def test_single_process_hooks_are_the_identity():
    par = distributed.context()
    assert isinstance(par, distributed.Single) and par.is_writer and distributed.world_size() == 1
    m = torch.nn.Linear(2, 2)
    assert par.wrap(m, torch.device("cpu")) is m and par.prepare(m, torch.device("cpu")) is m
    assert distributed.agree("x") == "x"


def test_torchrun_experiment_writes_once_and_matches_one_process(tmp_path, data_root):
    """``torchrun -m repro experiment``: rank 0 writes the run folders (under the same cache
    keys as a one-process run), the standard model's metrics equal the one-process run's, and
    a second torchrun reuses the finished runs on every rank (no rank trains alone)."""
    args = ["-m", "repro", "experiment", "intro", "--preset", "smoke", "-p", "n_train", "600",
            "-p", "n_test", "40", "-p", "eval_steps", "2", "-p", "eps_grid", "[0.0, 0.1]"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    root = Path(__file__).resolve().parents[1]

    def run(cmd, results):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "REPRO_RESULTS": str(results)}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    log = run(torchrun + args, tmp_path / "two")
    assert "finished in" in log and "on 2 processes" in log
    run([sys.executable] + args, tmp_path / "one")
    two = sorted(p.name for p in (tmp_path / "two" / "intro").iterdir())
    one = sorted(p.name for p in (tmp_path / "one" / "intro").iterdir())
    assert two == one and len(two) == 2
    for name in two:
        folder = tmp_path / "two" / "intro" / name
        assert (folder / "DONE").exists() and not (folder / "train" / "checkpoint.pt").exists()
        assert not list(folder.rglob("*.tmp*"))
    std = next(n for n in two if n.startswith("standard"))
    m1 = json.loads((tmp_path / "one" / "intro" / std / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "intro" / std / "metrics.json").read_text())
    assert m2["accuracy"] == pytest.approx(m1["accuracy"], abs=1e-9)
    h1, h2 = m1["training"]["history"], m2["training"]["history"]
    assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)
    again = run(torchrun + args, tmp_path / "two")
    assert again.count("[cache] intro/") >= 2 * 2, "both runs reused on both ranks"
