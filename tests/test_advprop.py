"""AdvProp objective (repro.objectives.AdvProp): exclusive BN routing on a real CIFAR-10 batch,
the attacker's settings, the shared-BN baseline."""
import copy

import pytest
import torch

from repro import data, objectives
from repro.models import DualBatchNorm2d, bn_route, build
from repro.objectives import Batch, StepState


@pytest.fixture(scope="module")
def batch():
    ds = data.load("cifar10").limit(n_train=32)
    x = data.to_float(ds.x_train)
    return Batch(x, ds.y_train, torch.arange(len(x)))


def model(norm="dual_bn"):
    torch.manual_seed(0)
    return build("preact_resnet18", 10, mean_std=data.MEAN_STD["cifar10"], width=4, norm=norm)


def state(seed=0):
    return StepState(0, 0, 10, 10, generator=torch.Generator().manual_seed(seed))


def stats(m, route):
    """The running statistics (buffers) of every dual BN's ``route`` half."""
    return {f"{n}.{k}": v.clone() for n, mod in m.named_modules() if isinstance(mod, DualBatchNorm2d)
            for k, v in getattr(mod, route).named_buffers()}


def params(m, route):
    return {f"{n}.{k}": p.detach().clone() for n, mod in m.named_modules()
            if isinstance(mod, DualBatchNorm2d) for k, p in getattr(mod, route).named_parameters()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("route", ["main", "aux"])
def test_a_step_on_one_route_leaves_the_other_untouched(batch, route):
    m = model().train()
    other = "aux" if route == "main" else "main"
    before_s, before_p = stats(m, other), params(m, other)
    mine = stats(m, route)
    opt = sgd(m)
    x = batch.x if route == "main" else objectives.advprop(eps=2 / 255).attack(m, batch.x, batch.y)
    with bn_route(m, route):
        loss = torch.nn.functional.cross_entropy(m(x), batch.y)
    loss.backward()
    opt.step()
    assert same(before_s, stats(m, other)) and same(before_p, params(m, other))
    assert not same(mine, stats(m, route))  # the routed BNs did learn statistics


def test_objective_step_routes_clean_to_main_and_adversarial_to_aux(batch):
    m = model().train()
    ref = copy.deepcopy(m)
    obj = objectives.advprop(eps=2 / 255)
    opt = sgd(m)
    loss, logs = obj(m, batch, state(3))
    loss.backward()
    opt.step()
    # Recompute what each BN should have seen: clean -> main, the same PGD images -> aux.
    x_adv = obj.attack(ref, batch.x, batch.y, state(3).generator)
    with torch.no_grad():
        with bn_route(ref, "main"):
            ref(batch.x)
        with bn_route(ref, "aux"):
            ref(x_adv)
    for route in ("main", "aux"):
        got, want = stats(m, route), stats(ref, route)
        assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-6) for k in got), route
    assert set(logs) >= {"ce_clean", "ce_adv", "acc", "adv_acc"}
    assert torch.allclose(loss, 0.5 * (logs["ce_clean"] + logs["ce_adv"]))


def test_attack_changes_no_statistics_and_stays_in_ball(batch):
    m = model().train()
    s = stats(m, "main"), stats(m, "aux")
    obj = objectives.advprop(eps=3 / 255)
    x_adv = obj.attack(m, batch.x, batch.y, torch.Generator().manual_seed(0))
    assert same(s[0], stats(m, "main")) and same(s[1], stats(m, "aux")) and m.training
    assert (x_adv - batch.x).abs().max() <= 3 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(mod.route == "main" for mod in m.modules() if isinstance(mod, DualBatchNorm2d))


def test_attacker_settings_and_targeted_labels(batch):
    for k in (1, 2, 3, 4):
        o = objectives.advprop(eps=k / 255)
        assert o.steps == k + 1 and o.alpha == pytest.approx(1 / 255)
    assert objectives.build("advprop", eps=4 / 255).config()["steps"] == 5
    m = model()
    o = objectives.advprop(eps=2 / 255, targeted=True)
    a = o.attack(m, batch.x, batch.y, torch.Generator().manual_seed(1))
    b = o.attack(m, batch.x, batch.y, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # the random targets are wrong labels, spread over the other classes, drawn from the
    # attack's generator
    t = torch.cat([o.targets(m, batch.x, batch.y, torch.Generator().manual_seed(s))
                   for s in range(20)])
    y = batch.y.repeat(20)
    assert (t != y).all() and t.min() >= 0 and t.max() < 10
    assert len(torch.unique((t - y) % 10)) == 9   # every shift 1..9 occurs
    assert not torch.equal(o.targets(m, batch.x, batch.y, torch.Generator().manual_seed(1)),
                           o.targets(m, batch.x, batch.y, torch.Generator().manual_seed(2)))


def test_port_attacker_targets_and_starts_as_the_pytorch_port(batch, monkeypatch):
    """attacker="port" (tingxueronghua/pytorch-classification-advprop attacker.py): target
    (y + U{0..K-1}) mod K, which is y with probability 1/K; a uniform random start for the
    whole batch with probability P(N(0,1) > 0.2) ≈ 0.42, else the clean images."""
    from repro import attacks
    import math
    port = objectives.advprop(eps=2 / 255, attacker="port")
    assert port.targeted and port.attacker == "port"
    assert port.config()["attacker"] == "port"
    assert "attacker" not in objectives.advprop(eps=2 / 255).config()
    assert port.PORT_START_PROB == pytest.approx(0.5 * math.erfc(0.2 / math.sqrt(2)), abs=1e-12)
    with pytest.raises(ValueError, match="attacker"):
        objectives.advprop(attacker="fgsm")
    m = model()
    # targets: the port's draw, y included; the paper-style targeted draw never gives y
    y = batch.y.repeat(50)
    x = batch.x[:1].expand(len(y), -1, -1, -1)
    t_port = port.targets(m, x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(t_port, (y + torch.randint(0, 10, y.shape, generator=g)) % 10)
    assert 0.06 < (t_port == y).float().mean() < 0.14  # 1/K = 0.1 of 1600 draws
    wrong = objectives.advprop(eps=2 / 255, targeted=True).targets(
        m, x, y, torch.Generator().manual_seed(0))
    assert (wrong != y).all()
    # the start: one draw per batch, from the generator's seed, ~42% random
    starts = [port.random_start(torch.Generator().manual_seed(i)) for i in range(2000)]
    assert 0.38 < sum(starts) / len(starts) < 0.46
    assert starts == [port.random_start(torch.Generator().manual_seed(i)) for i in range(2000)]
    assert objectives.advprop(eps=2 / 255).random_start(torch.Generator()) is True
    # and the attack uses them: targeted PGD with the port's start flag
    seen = []
    real = attacks.pgd

    def spy(*a, **kw):
        seen.append((kw["targeted"], kw["random_start"]))
        return real(*a, **kw)
    monkeypatch.setattr(attacks, "pgd", spy)
    for i in range(6):
        x_adv = port.attack(m, batch.x, batch.y, torch.Generator().manual_seed(i))
        assert (x_adv - batch.x).abs().max() <= 2 / 255 + 1e-6
    assert seen == [(True, starts[i]) for i in range(6)]


def test_chapter_runs_with_the_port_attacker_are_other_runs():
    from repro.experiments import advprop as chapter
    cfg = chapter.SPEC.resolve("smoke")
    obj = chapter._objective("advprop", 1, False, "port")
    assert obj.attacker == "port" and obj.steps == 2
    assert chapter._objective("vanilla", None, False, "port").config() == {"name": "standard"}
    assert "attacker" not in chapter.run_key(cfg, "advprop", 8, 0, 1)
    assert chapter.run_key(cfg, "advprop", 8, 0, 1, "port")["attacker"] == "port"
    assert "attacker" not in chapter.run_key(cfg, "vanilla", 8, 0, None, "port")
    with pytest.raises(ValueError, match="attacker"):
        chapter.run("smoke", attacker="fgsm")


def test_differences_from_the_official_code_are_recorded():
    from repro.experiments import advprop as chapter
    keys = {"aspect", "official", "ours", "why", "source"}
    assert len(chapter.DIFFERENCES) >= 3
    for d in chapter.DIFFERENCES:
        assert set(d) == keys and all(isinstance(v, str) and v.strip() for v in d.values()), d


def test_inference_uses_main_bn(batch):
    m = model().eval()
    with torch.no_grad():
        out = m(batch.x)
        with bn_route(m, "main"):
            assert torch.equal(out, m(batch.x))


def test_shared_bn_baseline(batch):
    obj = objectives.build("advprop_shared_bn", eps=1 / 255)
    assert obj.name == "advprop_shared_bn" and not obj.aux_bn
    m = model("bn").train()
    loss, logs = obj(m, batch, state())
    loss.backward()
    assert torch.isfinite(loss) and logs["adv_acc"] is not None
    with pytest.raises(ValueError, match="DualBatchNorm2d"):
        objectives.advprop()(model("bn"), batch, state())


def _fake_result(clean, cfg_over=None, n=10000):
    """A result dict in run()'s shape with given clean accuracies per run name: each model
    gets the first round(c·n) test images right (so models' errors overlap), at full scale
    (the whole training set) unless ``cfg_over`` says otherwise."""
    import numpy as np
    from repro.experiments import advprop as chapter
    over = {"seeds": [0, 1], "n_train": None, **(cfg_over or {})}
    cfg = {**chapter.SPEC.resolve("smoke"), "n_test": n, "n_corrupt": n, **over}
    runs = {}
    for name, method, width, seed, eps in chapter.plan(cfg):
        c = clean(method, width, seed, eps)
        m = {"clean": c, "pgd": 0.0, "corruption_mean": c - 0.1, "clean_on_corruption_subset": c,
             "corruptions": {"contrast/3": c - 0.1}}
        if method == "advprop":
            m["aux_bn"] = {"clean": c - 0.05, "pgd": 0.01}
        runs[name] = {"metrics": m, "arrays": {"correct_clean": np.arange(n) < round(c * n)}}
    result = {"config": cfg, "runs": runs}
    result["summary"] = chapter.summarize(result)
    return result


def test_plan_shares_runs_between_comparison_and_ablation():
    from repro.experiments import advprop as chapter
    cfg = chapter.SPEC.resolve("laptop")
    names = [r[0] for r in chapter.plan(cfg)]
    assert len(names) == len(set(names))
    big, small = cfg["widths"][-1], cfg["widths"][0]
    assert names[:3] == [f"vanilla_w{big}_s0", f"shared_bn_w{big}_e1_s0", f"advprop_w{big}_e1_s0"]
    expected = 3 * len(cfg["seeds"]) + (1 + len(cfg["eps_grid"])) + (len(cfg["eps_grid"]) - 1)
    assert len(names) == expected and f"advprop_w{small}_e{cfg['eps_grid'][-1]}_s0" in names


def test_claim_verdicts_follow_the_numbers():
    from repro import claims
    from repro.experiments import advprop as chapter
    judge = {c.id: c for c in chapter.CLAIMS}
    # AdvProp ahead by a point for both seeds on 10,000 images; bigger model best at the
    # strongest eps
    good = _fake_result(lambda m, w, s, e: {"vanilla": 0.92, "shared_bn": 0.90}.get(m)
                        or 0.93 + (0.001 * e if w == 8 else -0.001 * e),
                        {"seeds": [0, 1, 2]})
    assert good["summary"]["advprop_minus_vanilla_clean"]["mean"] == pytest.approx(0.01 + 0.001)
    for cid in ("advprop.clean-gain-b7", "advprop.aux-bn", "advprop.bigger-stronger",
                "advprop.corruptions"):
        assert judge[cid].judge(good).verdict == claims.REPRODUCED, cid
    # mixed signs over two seeds: the interval holds 0 and the paper's 0.7 -> inconclusive
    mixed = _fake_result(lambda m, w, s, e: 0.92 if m != "advprop" else (0.94 if s == 0 else 0.91))
    assert judge["advprop.clean-gain-b7"].judge(mixed).verdict == claims.INCONCLUSIVE
    # AdvProp behind for both seeds at full scale: refuted
    bad = _fake_result(lambda m, w, s, e: 0.92 if m != "advprop" else 0.91)
    assert judge["advprop.clean-gain-r50"].judge(bad).verdict == claims.NOT_REPRODUCED
    # the same on 2,000 training images at 25% clean: below the floor, nothing decided
    small = _fake_result(lambda m, w, s, e: 0.25 if m != "advprop" else 0.24, {"n_train": 2000})
    out = judge["advprop.clean-gain-b7"].judge(small)
    assert out.verdict == claims.INCONCLUSIVE and out.floor_met is False
    assert {c.id for c in claims.claims_for("advprop")} == set(judge)


def test_corruption_claim_pairs_over_images_where_the_runs_keep_them(cifar10):
    """The evaluation keeps per-image correctness per corruption x severity set, in the
    order of metrics["corruptions"]; the corruption claim then pairs AdvProp and vanilla
    over the same corrupted images (and seeds), not only over per-seed means."""
    import numpy as np
    import torch
    from repro import claims, corruptions
    from repro.experiments import advprop as chapter
    from repro.experiments import common
    cfg = chapter.SPEC.resolve("smoke", n_test=20, n_corrupt=10, eval_steps=1)
    ds = cifar10.limit(n_train=10, n_val=10, n_test=20)
    sets = [("contrast", 3), ("gaussian_noise", 1)]
    corrupted = {(c, s): corruptions.corrupt_uint8(ds.x_test[:10], c, s, seed=0)
                 for c, s in sets}
    model = common.model_for("preact_resnet18", ds, width=4)().eval()
    metrics, arrays = chapter._evaluate(model, ds, cfg, corrupted, torch.device("cpu"), False)
    assert arrays["correct_corrupt"].shape == (2, 10)
    for row, key in zip(arrays["correct_corrupt"], metrics["corruptions"]):
        assert row.mean() == metrics["corruptions"][key]

    n = 10000
    result = _fake_result(lambda m, w, s, e: {"vanilla": 0.92, "shared_bn": 0.90}.get(m, 0.93),
                          {"seeds": [0, 1, 2]})
    for name, r in result["runs"].items():
        c = r["metrics"]["corruption_mean"]
        r["arrays"]["correct_corrupt"] = np.stack([np.arange(n) < round(c * n)] * 2)
    out = {c.id: c for c in chapter.CLAIMS}["advprop.corruptions"].judge(result)
    assert out.verdict == claims.REPRODUCED
    assert "paired over the same corrupted images" in out.note
    assert chapter.corruption_stack(result, "advprop").shape == (3, n)
    del result["runs"]["advprop_w8_e1_s2"]["arrays"]["correct_corrupt"]   # an older run
    assert chapter.corruption_stack(result, "advprop") is None
    assert "one value per seed" in {c.id: c for c in chapter.CLAIMS}[
        "advprop.corruptions"].judge(result).note


def test_extra_seeds_train_vanilla_and_advprop_only_and_feed_their_claims():
    """``extra_seeds`` (overnight: [2]) adds vanilla and AdvProp runs, not shared BN: the
    AdvProp − vanilla claims pair over all three seeds (the corruption floor's 3), the
    AdvProp − shared-BN claim over the two seeds both were trained at."""
    import numpy as np
    from repro import claims
    from repro.experiments import advprop as chapter
    assert chapter.SPEC.resolve("overnight")["extra_seeds"] == [2]
    result = _fake_result(lambda m, w, s, e: {"vanilla": 0.92, "shared_bn": 0.90}.get(m, 0.93),
                          {"extra_seeds": [2]})
    names = set(result["runs"])
    assert {"vanilla_w8_s2", "advprop_w8_e1_s2"} <= names and "shared_bn_w8_e1_s2" not in names
    assert chapter.method_seeds(result["config"], "shared_bn") == [0, 1]
    for name, r in result["runs"].items():
        c = r["metrics"]["corruption_mean"]
        r["arrays"]["correct_corrupt"] = np.stack([np.arange(10000) < round(c * 10000)] * 2)
    judge = {c.id: c for c in chapter.CLAIMS}
    assert chapter.clean_gain(result).seeds == 3
    assert chapter.clean_gain(result, "shared_bn").seeds == 2
    assert "3 seed(s)" in judge["advprop.clean-gain-b7"].judge(result).ours
    corr = judge["advprop.corruptions"].judge(result)
    assert corr.verdict == claims.REPRODUCED and corr.floor_met
    assert judge["advprop.aux-bn"].judge(result).verdict == claims.REPRODUCED
    s = result["summary"]
    assert s["methods"]["vanilla"]["clean"]["n"] == 3 == s["advprop_minus_vanilla_clean"]["n"]
    assert s["methods"]["shared_bn"]["clean"]["n"] == 2 == s["advprop_minus_shared_clean"]["n"]
    assert list(chapter.table(result)["seeds"]) == [3, 2, 3]
    # without the third seed the corruption claim stays below its floor (seeds_min 3)
    two = _fake_result(lambda m, w, s, e: {"vanilla": 0.92, "shared_bn": 0.90}.get(m, 0.93))
    assert judge["advprop.corruptions"].judge(two).floor_met is False
