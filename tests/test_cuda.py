"""Device-only checks: the code paths a GPU window runs that the CPU suite cannot show, on the
accelerator, with tiny models (about a minute on one GPU in all).

Skipped without CUDA. ``REPRO_TEST_DEVICE=cpu`` runs them on the CPU (to check the tests
themselves); on a GPU machine:

    python -m pytest -q tests/test_cuda.py

What each guards: a resumed run restores its RNG states (they must stay CPU ByteTensors);
every chapter's objective takes a step under CUDA bf16 autocast with float32 losses and
logs; the batched subset-model ensemble (vmap of BN models, bf16) trains, resumes and
scores; ``train_batches`` copies device data back to the CPU without a race; the
minimum-distance attacks (DeepFool's batched backward through eval-mode BN) and the LMT
training estimator (block power iteration, QR, eigvalsh) agree with the CPU; AutoAttack runs.
"""
import os

import numpy as np
import pytest
import torch

from repro import attacks, data, ensemble, evaluate, lipschitz, models, objectives, train
from repro.train import TrainConfig

DEVICE = os.environ.get("REPRO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs CUDA (REPRO_TEST_DEVICE=cpu "
                                                       "runs these on the CPU)")


@pytest.fixture
def device():
    return torch.device(DEVICE)


def _cnn(ds, seed=0, **kw):
    torch.manual_seed(seed)
    in_size = ds.x_train.shape[-1]
    return models.build("small_cnn", ds.num_classes, mean_std=ds.mean_std, width=4,
                        in_size=in_size, **kw)


class _StopAt(objectives.Standard):
    def __init__(self, stop_at=None):
        super().__init__()
        self._stop_at = stop_at

    def __call__(self, model, batch, state):
        if state.step == self._stop_at:
            raise KeyboardInterrupt("stopped")
        return super().__call__(model, batch, state)


def test_resume_on_the_device(tmp_path, mnist, device):
    """Resume restores the RNG states from the checkpoint (CPU ByteTensors) and ends where an
    uninterrupted run ends (to float tolerance: cuDNN may pick other kernels)."""
    ds = mnist.limit(n_train=200, n_val=20)
    cfg = TrainConfig(steps=6, batch_size=40, lr=0.05, augment=True,
                      checkpoint_every=2, val_size=20, val_steps=1)
    whole = _cnn(mnist, norm="bn")
    torch.backends.cudnn.benchmark = False
    train.train(whole, _StopAt(), ds, cfg, tmp_path / "whole", device=device, progress=False)
    # on only for the fixed-shape training steps: evaluation's many shapes would each re-tune
    assert torch.backends.cudnn.benchmark is False
    with pytest.raises(KeyboardInterrupt):
        train.train(_cnn(mnist, norm="bn"), _StopAt(3), ds, cfg, tmp_path / "cut",
                    device=device, progress=False)
    resumed = _cnn(mnist, norm="bn")
    result = train.train(resumed, _StopAt(), ds, cfg, tmp_path / "cut", device=device,
                         progress=False)
    assert result.resumed_from == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_objectives_step_under_device_bf16_autocast(mnist, device):
    """Each chapter's (model, objective) pair of ``test_precision._bf16_cases`` takes one
    step under the device's bf16 autocast: float32 finite loss, logs and gradients."""
    from test_precision import _bf16_cases
    x, y = mnist.x_train[:40].float().div(255).to(device), mnist.y_train[:40].to(device)
    batch = objectives.Batch(x, y, torch.arange(40, device=device))
    failures = {}
    for name, (head, norm, make) in _bf16_cases().items():
        model = _cnn(mnist, norm=norm, head=head).to(device).train()
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        state = objectives.StepState(0, 0, 10, 10, train.step_generator(0, 0, device))
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, logs = make()(model, batch, state)
            loss.backward()
            bad = [k for k, v in logs.items() if torch.is_tensor(v)
                   and (v.dtype != torch.float32 or not torch.isfinite(v))]
            if loss.dtype != torch.float32 or not torch.isfinite(loss) or bad:
                failures[name] = f"loss {loss.dtype} {loss.item()}, logs {bad}"
        except Exception as e:  # noqa: BLE001 - collect every case's failure
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, failures


def test_ensemble_on_the_device(tmp_path, cifar10, device):
    """BAT's subset models as one vmapped BN ensemble under the device's default precision
    (bf16 autocast on CUDA): trains, resumes from its epoch checkpoint, and scores."""
    ds = cifar10.limit(n_train=120, n_val=0, n_test=40)  # the first window stages CIFAR-10
    subsets = [np.arange(0, 84), np.arange(36, 120)]
    cfg = TrainConfig(epochs=2, batch_size=28, lr=0.05, augment=True, val_every=0, val_size=0)
    ens = ensemble.train_ensemble([_cnn(ds, 1, norm="bn"), _cnn(ds, 2, norm="bn")], ds.x_train,
                                  ds.y_train, subsets, [1, 2], cfg, device=device,
                                  folder=tmp_path)
    ckpt = torch.load(tmp_path / "ensemble.pt", map_location="cpu", weights_only=True)
    ckpt["epoch"] = 1
    assert ckpt["config"] == cfg.to_dict()
    torch.save(ckpt, tmp_path / "ensemble.pt")  # resume the second epoch from the saved end
    again = ensemble.train_ensemble([_cnn(ds, 1, norm="bn"), _cnn(ds, 2, norm="bn")],
                                    ds.x_train, ds.y_train, subsets, [1, 2], cfg,
                                    device=device, folder=tmp_path)
    got = ensemble.correct(again, ds.x_test, ds.y_test, device=device)
    assert got.shape == (2, 40) and got.dtype == bool
    assert all(torch.isfinite(v).all() for v in ens.params.values())


def test_train_batches_from_device_data_to_the_cpu(cifar10, device):
    """Device-resident images copied back per batch (device="cpu") are exactly the CPU's
    batches: no non-blocking copy into pinned memory read before it lands."""
    x, y = cifar10.x_train[:512], cifar10.y_train[:512]
    want = list(data.train_batches(x, y, 128, seed=3, epoch=1))
    got = list(data.train_batches(x.to(device), y.to(device), 128, seed=3, epoch=1,
                                  device="cpu"))
    assert len(got) == len(want)
    for (a, ya), (b, yb) in zip(want, got):
        assert b.device.type == "cpu" and torch.equal(a, b) and torch.equal(ya, yb)


def test_min_distance_attacks_and_lmt_estimator_match_the_cpu(mnist, device):
    """DeepFool (a vmapped backward through eval-mode BN) and C&W on the device find the
    CPU's distances, and the LMT training estimator (block 8: QR, eigvalsh) its bound."""
    torch.manual_seed(0)
    model = _cnn(mnist, norm="bn").eval()
    x, y = mnist.x_test[:32].float() / 255, mnist.y_test[:32]
    cpu = {"df": attacks.deepfool_l2(model, x, y, steps=10)[1],
           "cw": attacks.cw_l2(model, x, y, steps=10, binary_search_steps=2)[1]}
    est_cpu = lipschitz.LipschitzEstimator(model, (1, 28, 28), pairwise=True, power_steps=2,
                                           linear_steps=3, block=8)
    bound_cpu = est_cpu()
    model.to(device)
    xd, yd = x.to(device), y.to(device)
    dev = {"df": attacks.deepfool_l2(model, xd, yd, steps=10)[1].cpu(),
           "cw": attacks.cw_l2(model, xd, yd, steps=10, binary_search_steps=2)[1].cpu()}
    for k in cpu:
        ok = torch.isfinite(cpu[k]) & torch.isfinite(dev[k])
        assert ok.float().mean() > 0.8, k
        # TF32 convolutions on CUDA: agreement to ~1e-2, not to fp32 rounding
        torch.testing.assert_close(dev[k][ok], cpu[k][ok], rtol=5e-2, atol=1e-2, msg=k)
    est = lipschitz.LipschitzEstimator(model, (1, 28, 28), pairwise=True, power_steps=2,
                                       linear_steps=3, block=8).to(device)
    bound = est()
    assert bound.device.type == device.type and bound.dtype == torch.float32
    torch.testing.assert_close(bound.cpu(), bound_cpu.detach(), rtol=1e-2, atol=1e-4)
    assert est.exact() == pytest.approx(est_cpu.exact(), rel=1e-6)


def test_autoattack_on_the_device(mnist, device):
    model = _cnn(mnist, norm="bn").to(device).eval()
    res = evaluate.autoattack(model, mnist.x_test[:16], mnist.y_test[:16], eps=0.1,
                              version="fast", n_iter=3, batch_size=16, device=device)
    assert res.n == 16 and res.clean.dtype == bool
