"""Objectives and their loss terms, on a tiny batch of real MNIST images."""
from pathlib import Path

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


def test_logit_pairing_is_the_official_mse():
    """AT_HE CIFAR-10/losses.py pairs with F.mse_loss(logits, logits_adv): a mean over the
    batch *and* the classes."""
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(losses.logit_pairing(a, b), torch.tensor(10.0 / 6))  # (9 + 1) / 6
    assert torch.allclose(losses.logit_pairing(a, b), F.mse_loss(b, a))
    assert torch.allclose(losses.logit_pairing(a, b, reduction="none"), torch.tensor([3.0, 1 / 3]))
    assert torch.allclose(losses.logit_pairing(a, b, reduction="sum"), torch.tensor(10 / 3))
    clean = torch.tensor([[0.9, -0.2, 0.1, 0.4], [-0.5, 0.3, 0.8, 0.0], [0.2, 0.2, -0.7, 0.6]])
    adv = torch.tensor([[0.1, 0.5, 0.0, 0.3], [-0.4, 0.9, 0.1, -0.2], [0.6, -0.1, -0.2, 0.2]])
    assert torch.allclose(losses.logit_pairing(adv, clean), F.mse_loss(clean, adv))
    assert torch.allclose(losses.logit_pairing(adv, clean, reduction="none").mean(),
                          F.mse_loss(clean, adv))
    # under bf16 autocast inputs it is computed in float32
    assert losses.logit_pairing(adv.bfloat16(), clean.bfloat16()).dtype == torch.float32


def test_state_fraction_and_objective_config():
    assert StepState(1, 25, 100, 50).fraction == 0.25
    trades = objectives.build("trades", beta=3.0)
    assert trades.config() == {"name": "trades", "beta": 3.0, "eps": 8 / 255, "alpha": 2 / 255,
                               "steps": 10, "norm": "linf"}
    # the HE argument leaves configs without HE as they were (they key the results cache)
    assert objectives.pgd_at().config() == {"name": "pgd_at", "eps": 8 / 255,
                                            "alpha": 2 / 255, "steps": 10, "norm": "linf"}
    assert objectives.fgsm_rs().config() == {"name": "fgsm_rs", "eps": 8 / 255,
                                             "alpha": 10 / 255}
    assert objectives.standard().config() == {"name": "standard"}
    # ALP's config changed with its pairing term: runs with the old (summed) term are not reused
    assert objectives.alp().config() == {"name": "alp", "beta": 0.5, "eps": 8 / 255,
                                         "alpha": 2 / 255, "steps": 10, "norm": "linf",
                                         "adv_weight": 0.5, "pairing": "mse"}
    assert trades.state_dict() == {}
    with pytest.raises(ValueError, match="unknown objective"):
        objectives.build("mart")


# ----------------------------------------------------------------------------- published runs

PUBLISHED = Path(__file__).resolve().parents[1] / "book" / "published"


def _published(chapter):
    import json
    out = []
    for d in sorted((PUBLISHED / chapter / "results").glob("*")):
        if (d / "config.json").exists():
            out.append((d.name, json.loads((d / "config.json").read_text())))
    return out


def test_published_runs_keep_their_cache_keys():
    """Every published run is found by the code that builds the runs (the results cache is
    keyed by the full config, objective included): a change that silently altered a
    published run's key would make the book recompute it, or show runs the code no longer
    makes."""
    from repro import results
    from repro.experiments import advprop, he
    runs = _published("he")
    assert {c["method"] for _, c in runs} >= {"pgd_at", "alp", "pgd_at_he", "alp_he"}
    for folder, c in runs:
        assert results.config_key(c) == folder.rsplit("-", 1)[1]  # stored keys are what they say
        cfg = {k: v for k, v in c.items() if k not in ("method", "train", "objective")}
        rebuilt = results.config_key(he.run_config(c["method"], {**cfg, "device": "cpu",
                                                                  "variants": []}))
        assert rebuilt == folder.rsplit("-", 1)[1], folder
    runs = _published("advprop")
    assert len(runs) >= 10
    for folder, c in runs:
        rebuilt = advprop.run_config(c, c["method"], c["width"], c["seed"], c["eps"])
        assert results.config_key(rebuilt) == folder.rsplit("-", 1)[1], folder
        if c["method"] != "vanilla":  # the port's attacker makes another run
            port = advprop.run_config(c, c["method"], c["width"], c["seed"], c["eps"], "port")
            assert results.config_key(port) != folder.rsplit("-", 1)[1]
    # the other chapters build their objectives with the same library calls
    checked = 0
    for chapter in ("intro", "bat"):
        for folder, c in _published(chapter):
            obj = c.get("objective")
            if not obj:
                continue
            kw = {k: v for k, v in obj.items() if k != "name"}
            if obj["name"] == "bat":
                import numpy as np
                flags = np.zeros(obj["n_atypical"] + 1, bool)
                flags[:obj["n_atypical"]] = True
                kw = {k: v for k, v in kw.items() if k not in ("n_atypical", "atypical_digest")}
                got = objectives.build("bat", atypical=flags, **kw).config()
                got = {k: v for k, v in got.items() if k != "atypical_digest"}
                want = {k: v for k, v in obj.items() if k != "atypical_digest"}
                assert got == want, folder
            else:
                assert objectives.build(obj["name"], **kw).config() == obj, folder
            checked += 1
    assert checked >= 4
