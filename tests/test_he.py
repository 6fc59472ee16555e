"""HE (Pang et al. 2020): the margin loss, the scaled-logit attack view and the three HE
objectives, on real MNIST / CIFAR-10 batches with tiny models."""
import pytest
import torch
import torch.nn.functional as F

from repro import attacks, losses, models, objectives
from repro.objectives import Batch, StepState


def _state(step=0):
    return StepState(0, step, 20, 20, torch.Generator().manual_seed(step))


def test_margin_lowers_the_true_class_logit_by_exactly_s_times_m():
    torch.manual_seed(0)
    cos = torch.rand(16, 10) * 2 - 1
    y = torch.randint(0, 10, (16,))
    for s, m in [(10.0, 0.2), (15.0, 0.2), (20.0, 0.3)]:
        plain, margin = losses.he_logits(cos, y, s), losses.he_logits(cos, y, s, m)
        diff = plain - margin
        true = F.one_hot(y, 10).bool()
        assert torch.allclose(diff[true], torch.full((16,), s * m), atol=1e-5)
        assert torch.equal(diff[~true], torch.zeros_like(diff[~true]))
        assert torch.allclose(plain, s * cos)


def test_he_cross_entropy_matches_its_definition_and_grows_with_the_margin():
    torch.manual_seed(1)
    cos = torch.rand(8, 10) * 2 - 1
    y = torch.randint(0, 10, (8,))
    manual = -F.log_softmax(10 * (cos - 0.2 * F.one_hot(y, 10)), 1).gather(1, y[:, None]).mean()
    assert torch.allclose(losses.he_cross_entropy(cos, y, 10, 0.2), manual, atol=1e-6)
    per = losses.he_cross_entropy(cos, y, 10, 0.2, reduction="none")
    assert per.shape == (8,)
    assert (per > losses.he_cross_entropy(cos, y, 10, 0.0, reduction="none")).all()


def test_scaled_view_shares_the_model_and_scales_its_output(cifar10):
    torch.manual_seed(0)
    model = models.build("preact_resnet18", 10, mean_std=cifar10.mean_std, width=4,
                         head="hypersphere").eval()
    view = objectives.ScaledLogits(model, 10.0)
    x = cifar10.x_test[:4].float() / 255
    with torch.no_grad():
        cos = model(x)
        assert cos.abs().max() <= 1.0
        assert torch.allclose(view(x), 10 * cos)
        z, f = view(x, return_features=True)
        assert torch.allclose(z, 10 * cos) and f.shape[0] == 4
    assert list(view.parameters())[0] is list(model.parameters())[0]


def test_training_attack_sees_scaled_logits_without_margin(cifar10, monkeypatch):
    """The attack inside PGD-AT+HE ascends CE(s·cos θ, y): the model it gets outputs s·cos θ,
    with the default CE loss (no margin)."""
    torch.manual_seed(0)
    model = models.build("preact_resnet18", 10, mean_std=cifar10.mean_std, width=4,
                         head="hypersphere")
    seen = {}

    def spy(m, x, y, **kw):
        with torch.no_grad():
            seen["ratio"] = (m(x) / model(x)).mean().item()
        seen["loss"] = kw.get("loss", "ce")
        return x
    monkeypatch.setattr(attacks, "pgd", spy)
    x = cifar10.x_train[:8].float() / 255
    batch = Batch(x, cifar10.y_train[:8], torch.arange(8))
    model.eval()
    loss, _ = objectives.pgd_at(he=losses.HE(10, 0.2))(model, batch, _state())
    assert seen == {"ratio": pytest.approx(10.0, rel=1e-5), "loss": "ce"}
    # ... and the training loss is the margin loss on the (here unperturbed) batch
    with torch.no_grad():
        expected = losses.he_cross_entropy(model(x), batch.y, 10, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_official_defaults_and_registry():
    p, t, a = objectives.build("pgd_at_he"), objectives.build("trades_he"), objectives.build("alp_he")
    assert isinstance(p, objectives.PGDAT) and isinstance(t, objectives.TRADES)
    assert isinstance(a, objectives.ALP)
    assert (p.he.s, p.he.m) == (10.0, 0.2)
    assert (t.beta, t.he.s, t.he.m) == (6.0, 15.0, 0.2)
    assert (a.beta, a.he.s, a.he.m) == (0.5, 20.0, 0.3)
    assert p.he.weight_norm == "project"
    assert p.config() == {"name": "pgd_at_he", "eps": 8 / 255, "alpha": 2 / 255, "steps": 10,
                          "norm": "linf", "s": 10.0, "m": 0.2, "weight_norm": "project"}
    assert objectives.build("pgd_at_he", s=5, m=0.1).he == losses.HE(5.0, 0.1)
    assert objectives.build("fgsm_rs_he").config()["name"] == "fgsm_rs_he"
    assert objectives.build("standard_he").he == losses.HE(10.0, 0.2)
    assert objectives.pgd_at().he is None and "s" not in objectives.pgd_at().config()
    for bad in (dict(s=0.0), dict(m=-0.1), dict(weight_norm="lazy")):
        with pytest.raises(ValueError):
            losses.HE(**bad)
    with pytest.raises(TypeError, match="HE"):
        objectives.pgd_at(he=(10, 0.2))


def test_he_objectives_refuse_a_linear_head_or_another_weight_norm(mnist):
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    batch = Batch(mnist.x_train[:4].float() / 255, mnist.y_train[:4], torch.arange(4))
    with pytest.raises(ValueError, match="hypersphere"):
        objectives.pgd_at(steps=1, he=losses.HE())(model, batch, _state())
    graph = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4,
                         head="hypersphere_graph")
    with pytest.raises(ValueError, match="graph"):
        objectives.pgd_at(steps=1, he=losses.HE())(graph, batch, _state())
    objectives.pgd_at(steps=1, he=losses.HE(weight_norm="graph"))(graph, batch, _state())


@pytest.mark.parametrize("name", ["standard_he", "pgd_at_he", "trades_he", "alp_he",
                                  "fgsm_rs_he"])
def test_he_compositions_train_on_a_real_batch(mnist, name):
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8, head="hypersphere")
    kw = {} if name == "standard_he" else (dict(eps=0.1, alpha=0.125) if name == "fgsm_rs_he"
                                           else dict(eps=0.1, alpha=0.04, steps=3))
    objective = objectives.build(name, **kw)
    batch = Batch(mnist.x_train[:64].float() / 255, mnist.y_train[:64], torch.arange(64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(20):
        model.train()
        loss, logs = objective(model, batch, _state(step))
        assert torch.isfinite(loss) and loss.dim() == 0 and "loss" in logs
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.training  # the attack restored the train mode
    final = objective(model, batch, _state(99))[0].item()
    assert final < first
    norms = model.head.weight.detach().norm(dim=1)  # projected head: rows on the sphere
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


# ----------------------------------------------------------------------------- compositions
# Every HE composition against a formula written out here, on fixed hand-made tensors: a
# 4-input linear body and a 3-feature hypersphere head with 5 classes, fixed weights.

class _Tiny(models.FeatureClassifier):
    def __init__(self, head="hypersphere"):
        super().__init__()
        self.normalize = torch.nn.Identity()
        self.lin = torch.nn.Linear(4, 3)
        self.head = (models.HypersphereHead(3, 5) if head == "hypersphere"
                     else torch.nn.Linear(3, 5))
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.3, 0.8, -1.0, 2.0],
                                                [-1.5, 0.2, 0.7, 1.1]]))
            self.lin.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.head.weight.copy_(torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.5, 0.5],
                                                 [-1.0, 1.0, 0.0], [0.3, -0.6, 0.9],
                                                 [1.0, 1.0, -1.0]]))

    def body(self, x):
        return self.lin(x.flatten(1))


X = torch.tensor([[0.1, 0.9, 0.4, 0.3], [0.8, 0.2, 0.6, 0.1], [0.5, 0.5, 0.2, 0.9],
                  [0.3, 0.7, 0.8, 0.4], [0.9, 0.1, 0.3, 0.6], [0.2, 0.4, 0.9, 0.7]])
Y = torch.tensor([0, 1, 2, 3, 4, 1])
DELTA = 0.05 * torch.tensor([[1, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, 1],
                             [-1, 1, 1, -1], [1, -1, -1, 1], [-1, 1, -1, -1]], dtype=torch.float)
X_ADV = (X + DELTA).clamp(0, 1)


def _ce_margin(cos, y, s, m):
    """-log softmax(s·(cos − m·1_y))_y, per example, written out."""
    z = s * cos.clone()
    z[torch.arange(len(y)), y] -= s * m
    return torch.logsumexp(z, 1) - z[torch.arange(len(y)), y]


def _spy_attacks(monkeypatch, model, seen):
    def spy(m, x, y, **kw):
        with torch.no_grad():
            seen["scale"] = (m(x).float() / model(x).float()).mean().item()
        seen["loss"] = kw.get("loss", "ce")
        seen["random_start"] = kw.get("random_start", True)
        return X_ADV.clone()
    monkeypatch.setattr(attacks, "pgd", spy)
    monkeypatch.setattr(attacks, "fgsm", spy)


@pytest.mark.parametrize("base", ["standard", "pgd_at", "trades", "alp", "fgsm_rs", "bat"])
def test_each_he_composition_is_its_formula(monkeypatch, base):
    s, m, beta, alpha = 7.0, 0.25, 0.8, 1.5
    he = losses.HE(s, m)
    kw = {"trades": dict(beta=beta), "alp": dict(beta=beta)}.get(base, {})
    if base == "bat":
        atypical = torch.tensor([True, False, True, True, False, True])
        objective = objectives.bat(atypical, alpha=alpha, beta=0.0, he=he)
    else:
        objective = objectives.OBJECTIVES[base](he=he, **kw)
    model = _Tiny().eval()
    seen = {}
    _spy_attacks(monkeypatch, model, seen)
    loss, _ = objective(model, Batch(X, Y, torch.arange(6)), _state())
    with torch.no_grad():
        cos_c, cos_a = model(X), model(X_ADV)
    assert cos_c.abs().max() <= 1 and not torch.allclose(cos_c, cos_a)
    if base == "standard":
        expected = _ce_margin(cos_c, Y, s, m).mean()
        assert seen == {}  # no attack
    elif base in ("pgd_at", "fgsm_rs"):
        expected = _ce_margin(cos_a, Y, s, m).mean()
    elif base == "trades":
        log_pc, log_pa = F.log_softmax(s * cos_c, 1), F.log_softmax(s * cos_a, 1)
        kl = (log_pc.exp() * (log_pc - log_pa)).sum(1).mean()  # no margin in the KL
        expected = _ce_margin(cos_c, Y, s, m).mean() + beta * kl
    elif base == "alp":  # margin in both CEs, pairing on the unscaled cosines
        expected = (0.5 * _ce_margin(cos_c, Y, s, m).mean() + 0.5 * _ce_margin(cos_a, Y, s, m).mean()
                    + beta * ((cos_c - cos_a) ** 2).mean())
    else:  # bat: weights from softmax(s·cos θ(x_adv)), normalised weighted margin CE
        p = F.softmax(s * cos_a, 1)
        top_other = p.masked_fill(F.one_hot(Y, 5).bool(), -1).amax(1)
        wrong = cos_a.argmax(1) != Y
        w = torch.where(atypical & wrong, torch.exp(-alpha * top_other), torch.ones(6))
        assert (w < 1).any()  # the weighting is exercised
        expected = (w * _ce_margin(cos_a, Y, s, m)).sum() / w.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if base != "standard":  # the attack saw s·cos θ with no margin, and its own loss
        assert seen["scale"] == pytest.approx(s, rel=1e-5)
        assert seen["loss"] == ("kl" if base == "trades" else "ce")
    # the margin matters: the same objective with m = 0 gives another loss
    objective._he = losses.HE(s, 0.0)
    assert objective(model, Batch(X, Y, torch.arange(6)), _state())[0].item() != pytest.approx(
        loss.item(), rel=1e-3)


def test_alp_without_he_pairs_logits_with_the_official_mse(monkeypatch):
    model = _Tiny(head="linear").eval()
    seen = {}
    _spy_attacks(monkeypatch, model, seen)
    loss, logs = objectives.alp(beta=0.5)(model, Batch(X, Y, torch.arange(6)), _state())
    with torch.no_grad():
        z_c, z_a = model(X), model(X_ADV)
    expected = (0.5 * F.cross_entropy(z_c, Y) + 0.5 * F.cross_entropy(z_a, Y)
                + 0.5 * F.mse_loss(z_c, z_a))
    assert seen["scale"] == pytest.approx(1.0) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["pairing"].item() == pytest.approx(F.mse_loss(z_c, z_a).item(), rel=1e-6)


# ----------------------------------------------------------------------------- the chapter

def test_chapter_builds_each_run_with_the_right_head_and_objective(cifar10):
    from repro.experiments import he
    cfg = he.SPEC.resolve("gpu")  # all three variants (laptop: PGD-AT and ALP)
    assert he.run_names(cfg["variants"]) == ["pgd_at", "pgd_at_he", "trades", "trades_he",
                                             "alp", "alp_he"]
    assert he.run_names(he.SPEC.resolve("laptop")["variants"]) == ["pgd_at", "pgd_at_he",
                                                                   "alp", "alp_he"]
    for name, cls, s, m in [("pgd_at_he", objectives.PGDAT, 10, 0.2),
                            ("trades_he", objectives.TRADES, 15, 0.2),
                            ("alp_he", objectives.ALP, 20, 0.3)]:
        obj = he.make_objective(name, cfg)
        assert isinstance(obj, cls) and obj.he == losses.HE(s, m, "project")
        assert obj.eps == pytest.approx(8 / 255) and obj.steps == cfg["train_steps"]
        assert he.make_objective(name, {**cfg, "s": 5.0, "m": 0.1}).he.s == 5.0
        base = he.make_objective(name[:-3], cfg)
        assert type(base) is cls and base.he is None
    assert he.make_objective("alp", cfg).beta == 0.5
    small = {**cfg, "width": 4}
    heads = {he_: he._model_fn(small, cifar10, he_)().head for he_ in (False, True)}
    assert type(heads[False]).__name__ == "Linear"
    assert type(heads[True]).__name__ == "HypersphereHead" and heads[True].weight_norm == "project"


def test_differences_from_the_official_code_are_recorded():
    from repro.experiments import he
    keys = {"aspect", "official", "ours", "why", "source"}
    assert len(he.DIFFERENCES) >= 3
    for d in he.DIFFERENCES:
        assert set(d) == keys and all(isinstance(v, str) and v.strip() for v in d.values()), d



def test_evaluation_killed_after_a_stage_resumes_to_the_uninterrupted_result(tmp_path,
                                                                            cifar10):
    """HE's evaluation keeps each finished stage (common.EvalStages) with the attack
    generator's state after it: resuming with only the first stage on disk gives exactly the
    arrays and metrics of an uninterrupted evaluation, and of one with no folder at all."""
    import shutil
    import numpy as np
    from repro.experiments import common, he
    cfg = he.SPEC.resolve("smoke", n_test=24, eval_steps=2, eps_grid=[0.0, 8.0])
    ds = cifar10.limit(n_train=10, n_val=10, n_test=24)
    model = common.model_for("preact_resnet18", ds, width=4, head="hypersphere")().eval()
    cpu = torch.device("cpu")
    whole = he._evaluate(model, ds, cfg, cpu, False, tmp_path / "a")
    assert sorted(p.stem for p in (tmp_path / "a" / "eval").iterdir()) == \
        ["attacks", "eps_curve", "geometry"]
    (tmp_path / "b" / "eval").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "eval" / "attacks.npz", tmp_path / "b" / "eval")
    resumed = he._evaluate(model, ds, cfg, cpu, False, tmp_path / "b")
    plain = he._evaluate(model, ds, cfg, cpu, False, None)
    for other in (resumed, plain):
        assert other[0] == whole[0]
        assert sorted(other[1]) == sorted(whole[1])
        for k in whole[1]:
            np.testing.assert_array_equal(other[1][k], whole[1][k], err_msg=k)
    # the stage on disk is what was used: a tampered stage shows up in the result
    with np.load(tmp_path / "a" / "eval" / "attacks.npz") as d:
        arrays = {k: d[k] for k in d.files}
    arrays["correct_clean"] = ~arrays["correct_clean"]
    np.savez(tmp_path / "b" / "eval" / "attacks.npz", **arrays)
    for f in ("eps_curve", "geometry"):
        (tmp_path / "b" / "eval" / f"{f}.npz").unlink()
    tampered = he._evaluate(model, ds, cfg, cpu, False, tmp_path / "b")
    assert tampered[0]["eps_curve"]["accuracy"][0] == 1 - whole[0]["eps_curve"]["accuracy"][0]


def test_eps_curve_reuses_the_attack_at_its_eps_and_geometry_is_capped(cifar10, monkeypatch):
    """The eps curve's point at the evaluation's own eps is the attack stage's C&W-PGD
    accuracy (the same attack: 1 restart, same steps and step size), other radii are
    attacked afresh (a smaller radius is never less accurate here), and the feature geometry
    covers the first GEOMETRY_MAX test images only."""
    from repro.experiments import common, he
    monkeypatch.setattr(he, "GEOMETRY_MAX", 16)
    cfg = he.SPEC.resolve("smoke", n_test=40, eval_steps=3, eps_grid=[0.0, 2.0, 8.0],
                          restarts=1)
    ds = cifar10.limit(n_train=10, n_val=10, n_test=40)
    model = common.model_for("preact_resnet18", ds, width=4, head="hypersphere")().eval()
    metrics, arrays = he._evaluate(model, ds, cfg, torch.device("cpu"), False, None)
    cw = metrics["accuracy"][metrics["keys"]["cw"]]
    curve = metrics["eps_curve"]["accuracy"]
    assert curve[2] == cw and curve[0] == metrics["accuracy"]["clean"]
    assert curve[0] >= curve[1] >= curve[2]
    assert all(len(arrays[k]) == 16 for k in ("norm_clean", "angle_clean", "norm_adv"))


def test_hours_curve_uses_the_fastest_epoch_and_ends_at_the_test_point():
    """Contention and pauses only slow an epoch: hours are epochs x the fastest epoch, the
    measured times are kept, and each run ends with its test-set point (common.hours_curve,
    used by HE and AdvProp)."""
    from repro.experiments import common
    hist = [{"epoch": 1, "seconds": 300.0, "val_clean": 0.3, "val_robust": 0.2},
            {"epoch": 2, "seconds": 100.0, "val_clean": 0.5, "val_robust": 0.3},
            {"epoch": 3, "seconds": 4000.0, "val_clean": 0.6, "val_robust": 0.35}]
    runs = {"a": {"metrics": {"training": {"history": hist}, "clean": 0.61, "pgd": 0.33}},
            "untrained": {"metrics": {}}}
    df = common.hours_curve(runs, str.upper, lambda m: (m["clean"], m["pgd"], "test (9)"))
    assert list(df["run"].unique()) == ["A"]
    assert list(df["hours"]) == [100 / 3600, 200 / 3600, 300 / 3600, 300 / 3600]
    assert list(df["epoch_s"][:3]) == [300.0, 100.0, 4000.0]
    last = df.iloc[-1]
    assert (last["split"], last["clean"], last["robust"]) == ("test (9)", 61.0, 33.0)


@pytest.mark.slow
def test_frontier_runs_join_the_result_without_changing_the_others(tmp_path, monkeypatch,
                                                                     data_root):
    """``frontier_epochs``: PGD-AT also trained for fewer epochs (the accuracy-per-hour
    plot's points) under ``pgd_at@e<epochs>``; it is not part of any run's key, so the
    full runs are the ones a run without it finds, and no claim reads the shorter run."""
    from repro.experiments import he
    monkeypatch.setenv("REPRO_RESULTS", str(tmp_path))
    monkeypatch.setenv("REPRO_DATA", str(data_root))
    small = dict(n_train=64, n_test=16, val_size=8, batch_size=32, epochs=2, train_steps=1,
                 eval_steps=1, eps_grid=[0.0], progress=False)
    plain = he.run("smoke", **small)
    out = he.run("smoke", frontier_epochs=[1, 2], **small)   # 2 = epochs: nothing extra
    assert set(out["runs"]) == {"pgd_at", "pgd_at_he", "pgd_at@e1"}
    for name in ("pgd_at", "pgd_at_he"):
        assert out["runs"][name]["path"] == plain["runs"][name]["path"]
    history = out["runs"]["pgd_at@e1"]["metrics"]["training"]["history"]
    assert [h["epoch"] for h in history] == [1]
    assert he.label("pgd_at@e1") == "PGD-AT (1 epoch)" and he.split_name("pgd_at@e1") == \
        ("pgd_at", None) and he.label("pgd_at@e20") == "PGD-AT (20 epochs)"
    assert he.seeds_of(out, "pgd_at") == [("pgd_at", "pgd_at_he")]
    curve = he.hours_curve(out)
    assert "PGD-AT (1 epoch)" in set(curve["run"])
    assert "PGD-AT (1 epoch)" in he.table(out).index
