"""The trainer: exact resume after SIGKILL, NaN stop, checkpoint errors, schedules, batches."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro import data, models, objectives
from repro.train import (CheckpointError, NonFiniteLossError, TrainConfig, epoch_batches, lr_at,
                         train)

WORKER = Path(__file__).with_name("train_worker.py")


def _metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in lines]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _import_worker():
    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spawn(run_dir, delay, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(run_dir), "--step-delay", str(delay),
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(run_dir):
    resumed = subprocess.run([sys.executable, str(WORKER), str(run_dir)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return int(resumed.stdout.split("resumed_from")[1].split()[0])


def _assert_same_run(reference, got):
    """Every logged value of metrics.jsonl (all but wall-clock seconds), both weight files and
    the checkpoint selection equal those of the uninterrupted run."""
    ref_metrics, got_metrics = _metrics(reference), _metrics(got)
    assert len(ref_metrics) == 3 and ref_metrics == got_metrics
    for name in ("final.pt", "best.pt"):
        a, b = _weights(reference / name), _weights(got / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_result = json.loads((reference / "result.json").read_text())
    got_result = json.loads((got / "result.json").read_text())
    assert ref_result["best_metric"] == got_result["best_metric"]
    assert ref_result["best_step"] == got_result["best_step"]


@pytest.mark.precision
def test_sigkill_and_resume_match_an_uninterrupted_run(tmp_path, mnist):
    """A run SIGKILLed mid-way and resumed ends bit-for-bit where the uninterrupted run ends,
    in the precision amp="auto" resolves to (make test's second pass: the other one)."""
    reference = _spawn(tmp_path / "reference", 0.0)
    victim = _spawn(tmp_path / "killed", 0.03)
    # killed at step 25 with checkpoints only at epoch ends: it resumes from the epoch-end
    # checkpoint of step 20 (the running loss/accuracy sums must start the epoch from zero)
    epoch_end = _spawn(tmp_path / "epoch_end", 0.0, "--checkpoint-every", "0", "--die-at-step", "25")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists():
        assert victim.poll() is None, victim.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(0.2)  # a little further into the run, past the first checkpoint
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "result.json").exists()

    steps_per_epoch, total = 400 // 20, 3 * 400 // 20
    resumed_from = _resume(tmp_path / "killed")
    assert 0 < resumed_from < total
    epoch_end.wait(timeout=300)
    assert epoch_end.returncode == -signal.SIGKILL, epoch_end.communicate()
    assert len(_metrics(tmp_path / "epoch_end")) == 1
    assert _resume(tmp_path / "epoch_end") == steps_per_epoch
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert "resumed_from None" in out

    assert {"loss", "adv_acc", "val_clean", "val_robust", "lr"} <= set(
        _metrics(tmp_path / "reference")[0])
    _assert_same_run(tmp_path / "reference", tmp_path / "killed")
    _assert_same_run(tmp_path / "reference", tmp_path / "epoch_end")
    ref_result = json.loads((tmp_path / "reference" / "result.json").read_text())
    assert ref_result["best_step"] % steps_per_epoch == 0

    # a finished run folder returns at once, and loads the final weights into the model
    torch.manual_seed(123)
    ds = mnist.limit(n_train=400, n_val=60)
    model = models.build("small_cnn", 10, mean_std=ds.mean_std, width=4)
    worker = _import_worker()

    class Untouchable(worker.Slowed):   # same objective config; any training step fails
        def __call__(self, *a, **kw):
            raise AssertionError("a finished run trained again")

    result = train(model, Untouchable(0.0), ds, worker.CONFIG, tmp_path / "reference",
                   progress=False)
    assert result.cached
    final = _weights(tmp_path / "reference" / "final.pt")
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())


class NaNAt(objectives.Standard):
    """Standard training whose loss turns NaN at one step."""

    def __init__(self, step):
        self.nan_at = step

    def __call__(self, model, batch, state):
        loss, logs = super().__call__(model, batch, state)
        return (loss * float("nan") if state.step == self.nan_at else loss), logs


def _small(mnist):
    return mnist.limit(n_train=200, n_val=20)


CFG = TrainConfig(epochs=2, batch_size=20, lr=0.05, augment=False, checkpoint_every=3, val_every=0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, mnist):
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    with pytest.raises(NonFiniteLossError, match="at step 7 ") as info:
        train(model, NaNAt(7), _small(mnist), CFG, tmp_path, progress=False)
    assert info.value.step == 7
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # no NaN update
    assert not (tmp_path / "final.pt").exists()


def test_checkpoint_errors_are_clear(tmp_path, mnist):
    ds = _small(mnist)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    with pytest.raises(NonFiniteLossError):
        train(model, NaNAt(4), ds, CFG, tmp_path / "run", progress=False)
    # another model
    wider = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8)
    with pytest.raises(CheckpointError, match="is for a different model"):
        train(wider, NaNAt(4), ds, CFG, tmp_path / "run", progress=False)
    # another configuration
    with pytest.raises(CheckpointError, match=r"different configuration \(lr: 0.05 -> 0.1"):
        train(model, NaNAt(4), ds, TrainConfig(**{**vars(CFG), "lr": 0.1}), tmp_path / "run",
              progress=False)
    # truncated and garbage files
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(model, NaNAt(4), ds, CFG, tmp_path / "run", progress=False)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(model, NaNAt(4), ds, CFG, tmp_path / "run", progress=False)


@pytest.mark.precision
def test_training_learns_and_logs(tmp_path, mnist):
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8)
    cfg = TrainConfig(epochs=2, batch_size=50, optimizer="adam", lr=2e-3, weight_decay=0,
                      schedule="constant", augment=False, val_size=200, val_eps=0.1,
                      val_alpha=0.04, val_steps=3)
    result = train(model, objectives.standard(), mnist.limit(n_train=2000), cfg, tmp_path,
                   progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.history[-1]["val_clean"] > 0.8
    assert result.best_metric == max(r["val_robust"] for r in result.history)
    assert (tmp_path / "best.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_steps_override_epochs(tmp_path, mnist):
    cfg = TrainConfig(steps=7, batch_size=20, lr=0.01, augment=False, val_every=0)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    result = train(model, objectives.standard(), _small(mnist), cfg, tmp_path, progress=False)
    assert result.total_steps == 7 and result.history[-1]["step"] == 7


def test_accelerator_options_run_on_cpu(tmp_path, mnist):
    """bf16 autocast, channels_last and a hypersphere head through the same loop (the
    CUDA defaults), exercised on CPU so the code path is tested without a GPU."""
    cfg = TrainConfig(steps=2, batch_size=20, lr=0.01, augment=False, amp="bf16",
                      channels_last=True, val_size=20, val_steps=1)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4, norm="bn",
                         head="hypersphere")
    result = train(model, objectives.trades(steps=1), _small(mnist), cfg, tmp_path, progress=False)
    assert result.history[-1]["step"] == 2 and "val_robust" in result.history[-1]


def test_schedules():
    c = TrainConfig(lr=0.1, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_at(c, s, 100, 10) for s in (0, 49, 50, 74, 75)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])
    c = TrainConfig(lr=0.1, schedule="multistep", milestones=(2, 3))  # in epochs
    assert [lr_at(c, s, 40, 10) for s in (19, 20, 30)] == pytest.approx([0.1, 0.01, 0.001])
    c = TrainConfig(lr=0.2, schedule="onecycle")
    lrs = [lr_at(c, s, 100, 10) for s in range(100)]
    assert lrs[0] > 0 and max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) == 39
    assert lrs[-1] == pytest.approx(0.0)
    c = TrainConfig(lr=0.1, schedule="cosine")
    assert lr_at(c, 0, 100, 10) == pytest.approx(0.1) and lr_at(c, 50, 100, 10) == pytest.approx(0.05)


def test_epoch_batches_match_data_train_batches(cifar10):
    x, y = cifar10.x_train[:300], cifar10.y_train[:300]
    ours = list(epoch_batches(x, y, 64, seed=5, epoch=2, start_step=1))
    theirs = list(data.train_batches(x, y, 64, seed=5, epoch=2, start_step=1))
    assert [s for s, _ in ours] == [1, 2, 3]
    for (_, b), (xb, yb) in zip(ours, theirs):
        assert torch.equal(b.x, xb) and torch.equal(b.y, yb)
        assert torch.equal(y[b.index], yb)
