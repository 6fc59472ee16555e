"""Precision, layout and device choices: what amp="auto" resolves to, that a run records it
and never resumes under another one, that published runs keep their cache keys, and that
evaluation computes in fp32 even inside a caller's bf16 autocast while training attacks may
use bf16."""
import functools
import json
import platform
from pathlib import Path

import pytest
import torch

from repro import attacks, evaluate, models, objectives, results, train
from repro.train import CheckpointError, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.1


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="reads the x86 CPU flags from /proc/cpuinfo")
def test_cpu_native_bf16_matches_this_cpus_flags():
    flags = _cpu_flags()
    has_native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert train.cpu_native_bf16() == (has_native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    expected = "bf16" if train.cpu_native_bf16() else "fp32"
    rec = train.resolve_precision(TrainConfig(), "cpu")
    assert rec["amp"] == expected and rec["device"] == "cpu" and rec["channels_last"] is False


def test_cpu_native_bf16_needs_the_instructions(monkeypatch):
    caps = dict(torch.cpu.get_capabilities())
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {**caps, "avx512_bf16": False, "amx_bf16": False, "bf16": False,
                                 "sve_bf16": False})
    assert train.cpu_native_bf16() is False


def test_resolve_precision_choices(monkeypatch):
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: True)
    assert train.resolve_precision(TrainConfig(), "cpu")["amp"] == "bf16"
    assert train.resolve_precision(TrainConfig(amp="fp32"), "cpu")["amp"] == "fp32"
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    auto = train.resolve_precision(TrainConfig(), "cpu")
    assert auto["amp"] == "fp32" and "without native bf16" in auto["why"]
    assert train.resolve_precision(TrainConfig(amp="bf16"), "cpu")["amp"] == "bf16"
    assert train.resolve_precision(TrainConfig(channels_last=True), "cpu")["channels_last"] is True
    mps = train.resolve_precision(TrainConfig(), "mps")
    assert mps["amp"] == "fp32" and mps["channels_last"] is False
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: True)
    monkeypatch.setenv("REPRO_AMP", "fp32")  # the reader's way to force fp32 under "auto"
    forced = train.resolve_precision(TrainConfig(), "cpu")
    assert forced["amp"] == "fp32" and "REPRO_AMP" in forced["why"]
    assert train.resolve_precision(TrainConfig(amp="bf16"), "cpu")["amp"] == "bf16"
    monkeypatch.setenv("REPRO_AMP", "fp16")
    with pytest.raises(ValueError, match="REPRO_AMP"):
        train.resolve_precision(TrainConfig(), "cpu")
    monkeypatch.delenv("REPRO_AMP")
    with pytest.raises(ValueError, match="amp must be"):
        train.resolve_precision(TrainConfig(amp="fp16"), "cpu")
    assert isinstance(train.autocast_context(TrainConfig(amp="bf16"), "cpu"), torch.autocast)


def test_repro_compile_overrides_the_config(monkeypatch):
    assert train.resolve_precision(TrainConfig(), "cpu")["compile"] is False
    monkeypatch.setenv("REPRO_COMPILE", "1")
    on = train.resolve_precision(TrainConfig(), "cpu")
    assert on["compile"] is True and "REPRO_COMPILE=1" in on["why"]
    monkeypatch.setenv("REPRO_COMPILE", "0")
    assert train.resolve_precision(TrainConfig(compile=True), "cpu")["compile"] is False
    monkeypatch.setenv("REPRO_COMPILE", "yes")
    with pytest.raises(ValueError, match="REPRO_COMPILE"):
        train.resolve_precision(TrainConfig(), "cpu")


def test_compiled_training_steps_match_eager_and_leave_the_model_uncompiled(tmp_path, mnist,
                                                                            monkeypatch):
    """REPRO_COMPILE=1 compiles the training steps only: the same losses as eager to float
    tolerance, and the returned model (validation, final evaluation) is not compiled."""
    ds = mnist.limit(n_train=60, n_val=0)
    cfg = TrainConfig(steps=3, batch_size=20, lr=0.01, augment=False, val_every=0)
    obj = objectives.standard()   # one graph to compile (an attack adds the eval-mode one)
    eager_model = _model(mnist)
    eager = train.train(eager_model, obj, ds, cfg, tmp_path / "eager", progress=False)
    monkeypatch.setenv("REPRO_COMPILE", "1")
    model = _model(mnist)
    compiled = train.train(model, obj, ds, cfg, tmp_path / "compiled", progress=False)
    assert compiled.precision["compile"] is True and eager.precision["compile"] is False
    assert not hasattr(model, "_orig_mod") and model._compiled_call_impl is None
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_cpu_warns_about_onednn_1x1_bug():
    """oneDNN #6035: channels_last 1x1 strided convs with < 16 input channels get wrong weight
    gradients (this machine crashed at width 4), so forcing channels_last there warns."""
    narrow = models.build("preact_resnet18", 10, mean_std=((0.5,) * 3, (0.25,) * 3), width=4)
    with pytest.warns(RuntimeWarning, match="oneDNN issue #6035"):
        train._warn_onednn_1x1(narrow)
    wide = models.build("preact_resnet18", 10, mean_std=((0.5,) * 3, (0.25,) * 3), width=16)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train._warn_onednn_1x1(wide)


def test_auto_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert train.resolve_device("auto").type == "mps" and train.resolve_device(None).type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train.resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.resolve_device("auto").type == "cuda"
    assert train.resolve_device("cpu").type == "cpu"


class _Probe(torch.nn.Module):
    """Wraps a model and records the dtype of every logits tensor it returns."""

    def __init__(self, model):
        super().__init__()
        self.model, self.dtypes = model, []

    def forward(self, x):
        out = self.model(x)
        self.dtypes.append(out.dtype)
        return out


class _StopAt(objectives.FGSMRS):
    """FGSM-RS training that records the logits dtypes of each step and stops at one step."""

    def __init__(self, stop_at=None):
        super().__init__(eps=EPS, alpha=1.25 * EPS)
        self._stop_at = stop_at

    def __call__(self, model, batch, state):
        if state.step == self._stop_at:
            raise KeyboardInterrupt("stopped")
        return super().__call__(model, batch, state)


def _model(mnist):
    torch.manual_seed(0)
    return _Probe(models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4, norm="bn"))


def test_bf16_training_attacks_bf16_but_validates_fp32(tmp_path, mnist):
    """Training steps (the FGSM-RS attack and the update) run under bf16; the validation
    that selects best.pt runs in fp32; result.json says what ran."""
    ds = mnist.limit(n_train=60, n_val=20)
    model = _model(mnist)
    seen = {}

    def validate(m):
        start = len(model.dtypes)
        out = train.validate_robust(m, ds.x_val, ds.y_val, cfg, torch.device("cpu"))
        seen["val"], seen["val_autocast"] = model.dtypes[start:], torch.is_autocast_enabled("cpu")
        return out

    class Recording(_StopAt):
        def __call__(self, m, batch, state):
            out = super().__call__(m, batch, state)
            seen["train"] = list(model.dtypes)
            return out

    cfg = TrainConfig(steps=3, batch_size=20, lr=0.01, augment=False, amp="bf16",
                      val_size=20, val_steps=2)
    result = train.train(model, Recording(), ds, cfg, tmp_path, progress=False, validate=validate)
    assert seen["train"] and set(seen["train"]) == {torch.bfloat16}   # attack + loss forwards
    assert seen["val"] and set(seen["val"]) == {torch.float32}        # clean + PGD + scoring
    assert seen["val_autocast"] is False  # the trainer opens no autocast around validation
    assert result.precision["amp"] == "bf16" and result.precision["device"] == "cpu"
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["precision"] == result.precision
    again = train.train(model, Recording(), ds, cfg, tmp_path, progress=False)
    assert again.cached and again.precision == result.precision


def test_resume_refuses_another_resolved_precision(tmp_path, mnist, monkeypatch):
    """amp="auto" can mean fp32 on one CPU and bf16 on another: half a run in each is
    neither, so resuming under the other meaning is refused."""
    ds = mnist.limit(n_train=100, n_val=0)
    cfg = TrainConfig(steps=5, batch_size=20, lr=0.01, augment=False, checkpoint_every=2,
                      val_every=0)
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    with pytest.raises(KeyboardInterrupt):
        train.train(_model(mnist), _StopAt(3), ds, cfg, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["precision"]["amp"] == "fp32"
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: True)
    with pytest.raises(CheckpointError, match="trained in fp32 but amp='auto' means bf16"):
        train.train(_model(mnist), _StopAt(), ds, cfg, tmp_path, progress=False)
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: False)
    result = train.train(_model(mnist), _StopAt(), ds, cfg, tmp_path, progress=False)
    assert result.resumed_from == 2 and result.precision["amp"] == "fp32"


def test_evaluation_inside_bf16_autocast_computes_fp32(mnist):
    """Every evaluation entry point gives the same answer inside a bf16 autocast as outside,
    and its model calls all return float32 logits."""
    torch.manual_seed(0)
    model = _Probe(models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4, norm="bn")).eval()
    x, y = mnist.x_test[:24], mnist.y_test[:24]
    xf = x.float() / 255
    pgd = functools.partial(attacks.pgd, eps=EPS, alpha=0.04, steps=3,
                            generator=torch.Generator().manual_seed(1))

    def run_all():
        pgd.keywords["generator"].manual_seed(1)
        out = {"predict": evaluate.predict(model, x),
               "robust": evaluate.robust_eval(model, x, y, {"pgd": pgd}, progress=False).accuracy(),
               "zero": evaluate.zero_gradient_fraction(model, x, y),
               "cw": attacks.cw_l2(model, xf, y, steps=5, binary_search_steps=2)[1],
               "deepfool": attacks.deepfool_l2(model, xf, y, steps=5)[1],
               "validate": train.validate_robust(model, x, y, TrainConfig(val_size=24, val_steps=2),
                                                 torch.device("cpu"))}
        return out

    model.dtypes.clear()
    plain = run_all()
    assert model.dtypes and set(model.dtypes) == {torch.float32}
    model.dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(xf[:2]).dtype == torch.bfloat16  # the autocast is really on
        model.dtypes.clear()
        under = run_all()
    assert model.dtypes and set(model.dtypes) == {torch.float32}
    assert torch.equal(plain["predict"], under["predict"])
    assert plain["robust"] == under["robust"] and plain["zero"] == under["zero"]
    assert plain["validate"] == under["validate"]
    assert torch.equal(plain["cw"], under["cw"]) and torch.equal(plain["deepfool"], under["deepfool"])


def test_autoattack_inside_bf16_autocast_computes_fp32(mnist):
    torch.manual_seed(0)
    model = _Probe(models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)).eval()
    x, y = mnist.x_test[:8], mnist.y_test[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluate.autoattack(model, x, y, eps=EPS, version="fast", n_iter=2, batch_size=8)
    assert model.dtypes and set(model.dtypes) == {torch.float32}


def test_published_runs_keep_their_cache_keys(tmp_path, monkeypatch):
    """Re-executing a chapter must find its published runs: every published config still
    hashes to its folder's key (amp="auto" is part of the key as written, so the meaning of
    "auto" on a new machine does not move published runs; their provenance says what ran)."""
    configs = sorted((ROOT / "book" / "published").glob("*/results/*/config.json"))
    assert configs, "no published runs found"
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))  # no local run may shadow a published one
    for path in configs:
        folder = path.parent
        config = json.loads(path.read_text())
        name, key = folder.name.rsplit("-", 1)
        assert results.config_key(config) == key, folder
        chapter = folder.parent.parent.name
        found = results.find_run(chapter, name, config)
        assert found.done and found.path.resolve() == folder.resolve(), folder


def test_train_benchmark_reports_what_the_trainer_ran(cifar10):
    """`bench train` times both paths on real CIFAR-10 batches and says which precision and
    layout its repro path used (speed itself is judged from the printed figures, not here)."""
    from repro.benchmarks import train as bench
    r = bench.run("cpu", batch_size=8, steps=1, warmup=1, width=4, rounds=2, amp="fp32",
                  channels_last=False)
    assert r["repro_precision"] == {"amp": "fp32", "channels_last": False, "compile": False}
    assert r["reference_img_s"] > 0 and r["repro_img_s"] > 0 and len(r["speedup_per_round"]) == 2
    assert len(r["repro_warmup_s"]) == 2 and r["timed_steps"] == 2
    assert r["speedup_cpu_time"] > 0 and r["repro_img_per_cpu_s"] > 0


def test_bf16_vs_fp32_tool_trains_both_precisions_and_judges_in_fp32(tmp_path, data_root):
    """tools/bf16_vs_fp32.py (the issue-17 comparison) at toy size: one run per precision,
    each recorded as what it ran, both evaluated on the same test images."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bf16_vs_fp32", Path(__file__).resolve().parents[1] / "tools" / "bf16_vs_fp32.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--recipe", "mnist-pgd", "--toy", "--seeds", "0", "--device", "cpu",
                      "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "toy" / "mnist-pgd" / "summary.json").read_text())
    ran = {r["amp"]: r["precision"]["amp"] for r in summary["rows"]}
    assert ran == {"fp32": "fp32", "bf16": "bf16"}
    (diff,) = summary["paired_bf16_minus_fp32"]
    assert set(diff) == {"seed", "clean_diff", "pgd_diff"}
    assert all(0 <= r["clean"] <= 1 and r["pgd"] <= r["clean"] for r in summary["rows"])


def test_resume_reads_the_checkpoint_onto_the_cpu(tmp_path, mnist, monkeypatch):
    """A CUDA run that resumes: ``torch.load(map_location=<cuda>)`` put the checkpoint's RNG
    states on the GPU, where ``torch.set_rng_state`` / ``torch.cuda.set_rng_state`` refuse
    them (shown below with a meta tensor, the CPU's stand-in for a non-CPU one) and the numpy
    state's ``.numpy()`` raises; Adam's ``step`` counters would also land on the GPU. So the
    trainer reads the checkpoint onto the CPU and copies weights, optimiser state and sums onto
    its device itself. (The CUDA failure itself needs a GPU; this pins the contract.)"""
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(torch.get_rng_state().to("meta"))
    ds = mnist.limit(n_train=100, n_val=0)
    cfg = TrainConfig(steps=4, batch_size=20, lr=0.01, augment=False, checkpoint_every=2,
                      val_every=0)
    with pytest.raises(KeyboardInterrupt):
        train.train(_model(mnist), _StopAt(3), ds, cfg, tmp_path, progress=False)
    seen, real = [], train.load_checkpoint
    monkeypatch.setattr(train, "load_checkpoint",
                        lambda path, map_location=None: seen.append(map_location)
                        or real(path, map_location=map_location))
    result = train.train(_model(mnist), _StopAt(), ds, cfg, tmp_path, progress=False)
    assert result.resumed_from == 2 and seen == ["cpu"]


def _bf16_cases():
    """Every chapter's (model, objective) pair as the gpu presets train them, shrunk: on CUDA
    the trainer's amp="auto" is bf16 autocast, which the CPU suite runs only when forced."""
    he = objectives.default_he
    atyp = torch.arange(40) % 3 == 0
    return {
        "intro-pgd_at": ("linear", "none", lambda: objectives.pgd_at(steps=2)),
        "he-pgd_at_he": ("hypersphere", "bn", lambda: objectives.build("pgd_at_he", steps=2)),
        "he-trades": ("linear", "bn", lambda: objectives.build("trades", steps=2)),
        "he-trades_he": ("hypersphere", "bn", lambda: objectives.build("trades_he", steps=2)),
        "he-alp_he": ("hypersphere", "bn", lambda: objectives.build("alp_he", steps=2)),
        "fgsm_rs_he-graph": ("hypersphere_graph", "bn",
                             lambda: objectives.build("fgsm_rs_he", weight_norm="graph")),
        "advprop": ("linear", "dual_bn", lambda: objectives.advprop(eps=2 / 255, steps=2)),
        "advprop-port": ("linear", "dual_bn",
                         lambda: objectives.advprop(eps=2 / 255, steps=2, attacker="port")),
        "advprop-shared_bn": ("linear", "bn",
                              lambda: objectives.advprop_shared_bn(eps=2 / 255, steps=2)),
        "bat": ("linear", "bn", lambda: objectives.bat(atyp, steps=2)),
        "bat_he": ("hypersphere", "bn", lambda: objectives.bat(atyp, steps=2, he=he("bat"))),
        "lmt_plus": ("linear", "none", lambda: objectives.lmt(c=1.0, plus=True, power_steps=2,
                                                              linear_steps=3, block=2)),
    }


@pytest.mark.parametrize("case", list(_bf16_cases()))
def test_objectives_under_bf16_autocast_keep_float32_losses(case, mnist):
    """One training step of each chapter's objective under CPU bf16 autocast (the CUDA
    default): the loss and every logged value are finite float32 (the losses are computed in
    float32 from bf16 activations), gradients reach every trainable weight in float32, and
    the loss is the fp32 step's to bf16 tolerance."""
    head, norm, make = _bf16_cases()[case]
    x, y = mnist.x_train[:40].float() / 255, mnist.y_train[:40]
    batch = objectives.Batch(x, y, torch.arange(40))
    out = {}
    for amp in ("fp32", "bf16"):  # the same initial weights and BN statistics for both
        torch.manual_seed(0)
        model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4, norm=norm,
                             head=head).train()
        obj, state = make(), objectives.StepState(0, 0, 10, 10, torch.Generator().manual_seed(3))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, logs = obj(model, batch, state)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (amp, loss)
        for k, v in logs.items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32 and torch.isfinite(v), (amp, k, v)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        out[amp] = loss.item()
    assert out["bf16"] == pytest.approx(out["fp32"], rel=0.05), out
