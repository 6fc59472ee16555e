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
    loss, _ = objectives.pgd_at_he(s=10, m=0.2)(model, batch, _state())
    assert seen == {"ratio": pytest.approx(10.0, rel=1e-5), "loss": "ce"}
    # ... and the training loss is the margin loss on the (here unperturbed) batch
    with torch.no_grad():
        expected = losses.he_cross_entropy(model(x), batch.y, 10, 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_official_defaults_and_registry():
    p, t, a = objectives.build("pgd_at_he"), objectives.build("trades_he"), objectives.build("alp_he")
    assert (p.s, p.m) == (10.0, 0.2)
    assert (t.beta, t.s, t.m) == (6.0, 15.0, 0.2)
    assert (a.beta, a.s, a.m) == (0.5, 20.0, 0.3)
    assert p.config()["name"] == "pgd_at_he" and p.config()["s"] == 10.0


def test_he_objectives_refuse_a_linear_head(mnist):
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    batch = Batch(mnist.x_train[:4].float() / 255, mnist.y_train[:4], torch.arange(4))
    with pytest.raises(ValueError, match="hypersphere"):
        objectives.pgd_at_he(steps=1)(model, batch, _state())


@pytest.mark.parametrize("name", ["pgd_at_he", "trades_he", "alp_he"])
def test_he_objectives_train_on_a_real_batch(mnist, name):
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8, head="hypersphere")
    objective = objectives.build(name, eps=0.1, alpha=0.04, steps=3)
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


# ----------------------------------------------------------------------------- the chapter

def test_chapter_builds_each_run_with_the_right_head_and_objective(cifar10):
    from repro.experiments import he
    cfg = he.SPEC.resolve("laptop")
    assert he.run_names(cfg["variants"]) == ["pgd_at", "pgd_at_he", "trades", "trades_he",
                                             "alp", "alp_he"]
    for name, cls, s, m in [("pgd_at_he", objectives.PGDATHE, 10, 0.2),
                            ("trades_he", objectives.TRADESHE, 15, 0.2),
                            ("alp_he", objectives.ALPHE, 20, 0.3)]:
        obj = he.make_objective(name, cfg)
        assert isinstance(obj, cls) and (obj.s, obj.m) == (s, m)
        assert obj.eps == pytest.approx(8 / 255) and obj.steps == cfg["train_steps"]
        assert he.make_objective(name, {**cfg, "s": 5.0, "m": 0.1}).s == 5.0
    assert isinstance(he.make_objective("trades", cfg), objectives.TRADES)
    assert he.make_objective("alp", cfg).beta == 0.5
    small = {**cfg, "width": 4}
    heads = {he_: type(he._model_fn(small, cifar10, he_)().head).__name__ for he_ in (False, True)}
    assert heads == {False: "Linear", True: "HypersphereHead"}
