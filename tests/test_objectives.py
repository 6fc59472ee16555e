"""Objectives and their loss terms, on a tiny batch of real MNIST images."""
import pytest
import torch
import torch.nn.functional as F

from repro import losses, models, objectives
from repro.objectives import Batch, StepState


def _batch(mnist, n=64):
    x = mnist.x_train[:n].float() / 255
    return Batch(x, mnist.y_train[:n], torch.arange(n))


@pytest.mark.parametrize("make", [
    objectives.standard,
    lambda: objectives.pgd_at(eps=0.1, alpha=0.04, steps=3),
    lambda: objectives.trades(beta=6.0, eps=0.1, alpha=0.04, steps=3),
    lambda: objectives.alp(beta=0.5, eps=0.1, alpha=0.04, steps=3),
    lambda: objectives.fgsm_rs(eps=0.1, alpha=0.125),
], ids=["standard", "pgd_at", "trades", "alp", "fgsm_rs"])
def test_loss_decreases_on_a_real_batch(mnist, make):
    torch.manual_seed(0)
    model = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=8)
    objective = make()
    batch = _batch(mnist)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(25):
        state = StepState(0, step, 25, 25, torch.Generator().manual_seed(step))
        model.train()
        loss, logs = objective(model, batch, state)
        assert torch.isfinite(loss) and loss.dim() == 0
        assert "loss" in logs and all(float(v) == float(v) for v in logs.values())
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.training  # attacks restore the train mode
    final = objective(model, batch, StepState(0, 99, 12, 12, torch.Generator().manual_seed(0)))[0]
    assert final.item() < 0.85 * first, (first, final.item())


def test_trades_kl_matches_official_form():
    torch.manual_seed(0)
    clean, adv = torch.randn(5, 10), torch.randn(5, 10)
    official = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="sum") / 5
    assert torch.allclose(losses.trades_kl(adv, clean), official, atol=1e-6)
    assert losses.trades_kl(clean, clean).abs() < 1e-6
    assert losses.trades_kl(adv, clean, reduction="none").shape == (5,)


def test_logit_pairing():
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(losses.logit_pairing(a, b), torch.tensor(5.0))  # (9 + 1) / 2


def test_state_fraction_and_objective_config():
    assert StepState(1, 25, 100, 50).fraction == 0.25
    trades = objectives.build("trades", beta=3.0)
    assert trades.config() == {"name": "trades", "beta": 3.0, "eps": 8 / 255, "alpha": 2 / 255,
                               "steps": 10, "norm": "linf"}
    assert trades.state_dict() == {}
    with pytest.raises(ValueError, match="unknown objective"):
        objectives.build("mart")
