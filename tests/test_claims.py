"""The claims registry's data (repro/claims_data/*.json) and the book's one verdict rule
(repro.claims): every branch of the rule on hand-made estimates, the paired SE against its
formula, the floors, and the chapters' claims on the published runs."""
import json
import math
import tomllib
import zipfile
from fnmatch import fnmatch

import numpy as np
import pytest

from repro import claims, experiments, publish

PAPERS = ("intro", "he", "lmt", "advprop", "bat")


# ----------------------------------------------------------------------------- the data

def _raw(paper):
    return json.loads((claims.DATA_DIR / f"{paper}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("paper", PAPERS)
def test_every_claim_has_every_field_and_a_source(paper):
    raw = _raw(paper)
    assert raw["paper"] == paper and raw["about"]
    for c in raw["claims"]:
        assert set(claims.FIELDS) <= set(c), (c["id"], set(claims.FIELDS) - set(c))
        assert c["id"].startswith(paper + ".")
        for f in ("text", "paper_value", "source", "quantity", "effect_note"):
            assert isinstance(c[f], str) and c[f].strip(), (c["id"], f)
        assert set(c["setting"]) == {"dataset", "architecture", "eps", "attack"}, c["id"]
        assert c["direction"] in ("+", "-")
        assert c["effect"] is None or isinstance(c["effect"], (int, float))
        assert isinstance(c["floor"]["requires"], dict) and c["floor"]["why"].strip()
        # A number stated as the paper's must name where it is stated.
        if any(ch.isdigit() for ch in c["paper_value"]):
            assert c["source"] and "no source" not in c["source"], c["id"]
        if c["paper_value"] == claims.NOT_TRANSCRIBED:
            assert c["effect"] is None, c["id"]
        # The effect, where there is one, lies in the claimed direction from the null.
        if c["effect"] is not None:
            d = 1 if c["direction"] == "+" else -1
            assert d * (c["effect"] - c["null"]) > 0, c["id"]


def test_ids_are_unique_across_the_book():
    ids = [c["id"] for p in PAPERS for c in _raw(p)["claims"]]
    assert len(ids) == len(set(ids))


def test_every_claim_a_chapter_evaluates_is_in_the_data():
    data = {c["id"] for p in PAPERS for c in _raw(p)["claims"]}
    for paper in PAPERS:
        for c in claims.claims_for(paper):
            assert c.id in data, f"{c.id} is evaluated by the {paper} chapter but not in the data"
            if c.evaluate is not None:
                assert c.text == claims.get(c.id).text


def test_numbers_that_could_not_be_confirmed_are_not_transcribed():
    # Values the book quoted before without a source at hand must not come back as data.
    values = {c.id: c.paper_value for cs in claims.REGISTRY.values() for c in cs}
    for cid in ("he.pgd-gain", "he.orthogonal"):
        assert values[cid] == claims.NOT_TRANSCRIBED, cid
    # the LMT reference numbers, now with their source: BCP's README (sungyoon-lee/bcp, 85defee)
    assert values["lmt.mnist-clean"] == "86.48" and values["lmt.mnist-verified"] == "40.55"
    assert "sungyoon-lee/bcp" in claims.get("lmt.mnist-verified").source
    assert values["he.rb-clean"] == "85.14" and values["he.rb-aa"] == "53.74"
    assert values["advprop.clean-gain-b7"] == "84.5 → 85.2 (+0.7)"
    assert values["advprop.clean-gain-r50"] == "76.67 → 77.42 (+0.75)"
    assert claims.get("advprop.clean-gain-b7").effect == pytest.approx(0.7)


def test_the_data_ships_with_the_package():
    project = tomllib.loads((experiments.PROJECT_ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["repro"]
    for f in claims.DATA_DIR.glob("*.json"):
        assert any(fnmatch(f"claims_data/{f.name}", p) for p in patterns), f.name


@pytest.mark.slow
def test_a_built_wheel_contains_the_data(tmp_path):
    import shutil
    import subprocess
    import sys
    src = tmp_path / "src"   # build from a copy: setuptools leaves build/ in the source tree
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(experiments.PROJECT_ROOT / f, src / f)
    shutil.copytree(experiments.PROJECT_ROOT / "repro", src / "repro",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("repro-*.whl"))).namelist()
    for p in PAPERS:
        assert f"repro/claims_data/{p}.json" in names


def test_a_data_file_missing_a_field_is_refused(tmp_path, monkeypatch):
    raw = _raw("bat")
    del raw["claims"][0]["floor"]
    (tmp_path / "bat.json").write_text(json.dumps(raw))
    monkeypatch.setattr(claims, "DATA_DIR", tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        claims.load_data("bat")


# ----------------------------------------------------------------------------- estimates

def test_paired_se_is_the_sd_of_the_differences_over_root_n():
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.4, rng.random(400) < 0.5
    d = b.astype(float) - a
    e = claims.paired(a, b)
    assert e.value == pytest.approx(100 * d.mean())
    assert e.se == pytest.approx(100 * d.std(ddof=1) / math.sqrt(400))
    lo, hi = e.interval
    assert (lo, hi) == pytest.approx((e.value - 1.959964 * e.se, e.value + 1.959964 * e.se))
    assert e.mde == pytest.approx((1.959964 + 0.841621) * e.se)   # 2.80 · SE
    # identical predictions carry no difference and no noise
    assert claims.paired(a, a).se == 0 and claims.paired(a, a).value == 0


def test_pairing_removes_the_noise_two_models_share():
    # b is a's predictions with 10 of 1,000 images flipped to correct: the unpaired binomial
    # SE of a difference would be ~2.2 points; the paired one sees only the 10 flips.
    a = np.zeros(1000, bool)
    a[:500] = True
    b = a.copy()
    b[500:510] = True
    e = claims.paired(a, b)
    assert e.value == pytest.approx(1.0) and e.se < 0.35
    assert e.interval[0] > 0


def test_several_seeds_add_the_seed_spread():
    one = np.array([1, 0] * 50, float)
    same = claims.per_example(np.stack([one, one]))
    assert same.seeds == 2 and same.se == pytest.approx(claims.per_example(one).se)
    spread = claims.per_example(np.stack([one, one - 0.5]))   # seed means differ by 0.5
    assert spread.se > same.se
    assert spread.se == pytest.approx(100 * math.sqrt(
        (one - 0.25).var(ddof=1) / 100 + np.var([0.5, 0.0], ddof=1) / 2))


def test_across_seeds_uses_t_quantiles_and_one_seed_has_no_interval():
    e = claims.across_seeds([0.50, 0.52, 0.51], [0.53, 0.53, 0.55])
    assert e.df == 2 and e.value == pytest.approx(100 * np.mean([0.03, 0.01, 0.04]))
    assert e.interval[1] - e.value == pytest.approx(4.3027 * e.se)
    single = claims.across_seeds([0.5], [0.6])
    assert not single.has_interval
    assert claims.verdict(single) == claims.INCONCLUSIVE


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 11):
        assert claims.T975[df - 1] == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
        assert claims.T80[df - 1] == pytest.approx(stats.t.ppf(0.80, df), abs=1e-4)
    assert claims.Z975 == pytest.approx(stats.norm.ppf(0.975), abs=1e-6)
    assert claims.Z80 == pytest.approx(stats.norm.ppf(0.80), abs=1e-6)


# ----------------------------------------------------------------------------- the rule

def est(value, se, n=1000):
    return claims.Estimate(value, se, n)


@pytest.mark.parametrize("value,se,effect,verdict", [
    (3.0, 1.0, None, claims.REPRODUCED),        # interval [1.0, 5.0] excludes 0
    (3.0, 1.0, 2.0, claims.REPRODUCED),         # ... and holds the paper's effect
    (3.0, 1.0, 4.0, claims.REPRODUCED),         # the paper's effect inside: still reproduced
    (3.0, 0.5, 8.0, claims.PARTLY),             # significant but significantly smaller
    (1.0, 1.0, 5.0, claims.PARTLY),             # right direction, not significant, < paper
    (1.0, 1.0, 2.0, claims.INCONCLUSIVE),       # interval holds 0 and the paper's effect
    (1.0, 1.0, None, claims.INCONCLUSIVE),      # qualitative claim, interval holds 0
    (-1.0, 1.0, None, claims.INCONCLUSIVE),     # wrong sign but 0 not excluded
    (-0.5, 1.0, 5.0, claims.NOT_REPRODUCED),    # holds 0, excludes the paper's effect, x ≤ 0
    (-3.0, 1.0, None, claims.NOT_REPRODUCED),   # significantly the other way
    (-3.0, 1.0, 2.0, claims.NOT_REPRODUCED),
])
def test_every_branch_of_the_rule(value, se, effect, verdict):
    assert claims.verdict(est(value, se), effect=effect) == verdict


def test_below_the_floor_nothing_is_refuted_or_confirmed():
    for value in (-5.0, 0.0, 5.0):
        assert claims.verdict(est(value, 0.5), effect=2.0, floor_met=False) == \
            claims.INCONCLUSIVE
    assert claims.verdict(None) == claims.NOT_YET_RUN


def test_direction_and_null_move_the_rule():
    # "the gap is below 2 points": direction -1, null 2
    assert claims.verdict(est(0.4, 0.1), direction=-1, null=2) == claims.REPRODUCED
    assert claims.verdict(est(1.8, 0.5), direction=-1, null=2) == claims.INCONCLUSIVE
    assert claims.verdict(est(4.0, 0.5), direction=-1, null=2) == claims.NOT_REPRODUCED
    # an exact count: no sampling error
    assert claims.verdict(claims.exact(0), direction=-1, null=0.5) == claims.REPRODUCED
    assert claims.verdict(claims.exact(1), direction=-1, null=0.5) == claims.NOT_REPRODUCED
    with pytest.raises(ValueError):
        claims.verdict(est(1, 1), effect=-2.0)   # an effect against the claimed direction


def test_floor_checks_name_what_fails():
    floor = {"requires": {"full_training_set": True, "baseline_clean_min": 0.75,
                          "mem_se_max": 0.05, "architecture_in": ["wrn34_20"]}, "why": "x"}
    ok = claims.check_floor(floor, {"full_training_set": True, "baseline_clean": 0.8,
                                    "mem_se": 0.01, "architecture": "wrn34_20"})
    assert ok.met is True and "floor met" in ok.why
    bad = claims.check_floor(floor, {"full_training_set": False, "baseline_clean": 0.22,
                                     "mem_se": 0.01})
    assert bad.met is False
    assert "full_training_set" in bad.why and "baseline_clean = 0.22" in bad.why
    assert "architecture = None" in bad.why and "mem_se" not in bad.why
    assert claims.check_floor({"requires": {}, "why": "none"}, {}).met is None


def test_judge_carries_the_floor_and_the_power():
    c = claims.get("he.pgd-gain")
    facts = {"full_training_set": True, "baseline_clean": 0.8, "test_images": 10000,
             "seeds": 2}
    big = claims.judge(c.id, est(2.0, 0.5, 10000), facts)
    assert big.verdict == claims.REPRODUCED and big.floor_met is True
    assert big.mde == pytest.approx(2.801585 * 0.5, rel=1e-4)
    small = claims.judge(c.id, est(-6.0, 1.0, 200), {**facts, "test_images": 200})
    assert small.verdict == claims.INCONCLUSIVE and small.floor_met is False
    assert "test_images = 200" in small.floor_why and "Not judged" in small.note


def test_an_evaluator_that_ignores_the_floor_cannot_refute(monkeypatch):
    import dataclasses
    c = dataclasses.replace(claims.get("he.pgd-gain"),
                            evaluate=lambda r: claims.Outcome("x", claims.NOT_REPRODUCED))
    out = c.judge({"runs": {}})
    assert out.verdict == claims.INCONCLUSIVE and "floor" in out.note
    ok = dataclasses.replace(c, evaluate=lambda r: claims.Outcome("x", claims.REPRODUCED))
    assert ok.judge({"runs": {}}).verdict == claims.REPRODUCED


def test_combine_needs_every_part():
    r, p, i, n = (claims.Outcome("", v, floor_met=True) for v in
                  (claims.REPRODUCED, claims.PARTLY, claims.INCONCLUSIVE, claims.NOT_REPRODUCED))
    assert claims.combine([r, r], "").verdict == claims.REPRODUCED
    assert claims.combine([r, p], "").verdict == claims.PARTLY
    assert claims.combine([r, i], "").verdict == claims.INCONCLUSIVE
    assert claims.combine([r, i, n], "").verdict == claims.NOT_REPRODUCED
    assert claims.combine([r, claims.invalid("", "bug")], "").floor_met is None


# ----------------------------------------------------------------------------- chapters

def _he_result(correct: dict, n_train=None, clean=0.8, pairing=True, extra_seeds=(1,)):
    """Runs with these per-example results, repeated at each extra seed (``name@s<seed>``,
    as ``he.run`` keys them)."""
    runs = {}
    correct = {**correct, **{f"{n}@s{s}": v for s in extra_seeds for n, v in correct.items()}}
    for name, (pgd, cw, auto) in correct.items():
        pgd, cw, auto = (np.array(v, bool) for v in (pgd, cw, auto))
        metrics = {"keys": {"pgd": "pgd20", "cw": "cw20"},
                   "accuracy": {"clean": clean, "pgd20": pgd.mean(), "cw20": cw.mean(),
                                "worst": (pgd & cw).mean()},
                   "autoattack": {"accuracy": auto.mean(), "version": "fast", "n": len(auto)}}
        arrays = {"correct_pgd20": pgd, "correct_cw20": cw, "correct_autoattack": auto,
                  "correct_clean": np.ones(len(pgd), bool)}
        config = {"objective": {"name": name, **({"pairing": "mean"} if pairing else {})}}
        runs[name] = {"metrics": metrics, "arrays": arrays, "config": config}
    return {"config": {"preset": "gpu", "architecture": "preact_resnet18", "n_train": n_train,
                       "epochs": 8, "variants": ["pgd_at", "trades", "alp"],
                       "extra_seeds": list(extra_seeds)}, "runs": runs}


def test_he_claims_call_a_pgd_only_gain_an_artefact():
    from repro.experiments import he
    n = 2000
    base = ([1] * 600 + [0] * 1400,) * 3
    # HE: PGD-CE accuracy jumps by 30 points, C&W and AutoAttack see a loss of 5
    fake = ([1] * 1200 + [0] * 800, [1] * 500 + [0] * 1500, [1] * 500 + [0] * 1500)
    result = _he_result({"pgd_at": base, "pgd_at_he": fake})
    by_id = {c.id: c for c in he.CLAIMS}
    assert by_id["he.pgd-gain"].judge(result).verdict == claims.REPRODUCED
    assert by_id["he.pgd-gain"].judge(result).value == pytest.approx(30.0)
    assert by_id["he.aa-gain"].judge(result).verdict == claims.NOT_REPRODUCED
    assert by_id["he.rb-clean"].judge(result).verdict == claims.INCONCLUSIVE  # not WRN-34-20
    assert by_id["he.orthogonal"].judge(result).verdict == claims.NOT_YET_RUN
    # the same numbers from 2,000 training images: below the floor, never "not reproduced"
    small = _he_result({"pgd_at": base, "pgd_at_he": fake}, n_train=2000, clean=0.22)
    assert by_id["he.aa-gain"].judge(small).verdict == claims.INCONCLUSIVE
    assert by_id["he.aa-gain"].judge(small).floor_met is False
    assert he.gain(result, "pgd_at", "worst").n == n
    assert he.gain(result, "pgd_at", "worst").seeds == 2   # paired over images and seeds
    # one seed: below the floor (seeds_min 2), whatever the effect
    one = _he_result({"pgd_at": base, "pgd_at_he": fake}, extra_seeds=())
    assert by_id["he.pgd-gain"].judge(one).verdict == claims.INCONCLUSIVE
    assert "seeds = 1" in by_id["he.pgd-gain"].judge(one).floor_why
    # the baseline's clean accuracy for the floor is its lowest over the seeds
    two = _he_result({"pgd_at": base, "pgd_at_he": fake})
    two["runs"]["pgd_at@s1"]["metrics"]["accuracy"]["clean"] = 0.70
    assert by_id["he.pgd-gain"].judge(two).floor_met is False


def test_he_alp_runs_without_the_fixed_pairing_are_not_evidence():
    from repro.experiments import he
    good = ([1] * 1200 + [0] * 800,) * 3
    base = ([1] * 600 + [0] * 1400,) * 3
    runs = {"pgd_at": base, "pgd_at_he": base, "trades": base, "trades_he": good,
            "alp": base, "alp_he": good}
    fixed = he.CLAIMS[-1].judge(_he_result(runs))
    assert fixed.verdict == claims.REPRODUCED
    old = he.CLAIMS[-1].judge(_he_result(runs, pairing=False))
    assert old.verdict == claims.INCONCLUSIVE and he.ALP_PENDING in old.ours
    assert he.run_valid(_he_result(runs, pairing=False), "alp")[0] is False
    assert he.run_valid(_he_result(runs, pairing=False), "trades")[0] is True
    table = he.gain_table(_he_result(runs, pairing=False))
    assert set(table[table.method == "ALP"].evidence) == {he.ALP_PENDING}


@pytest.mark.parametrize("chapter", [c for c in ("intro", "he", "lmt", "advprop", "bat")
                                     if publish.record(c) is not None])
def test_published_runs_are_never_refuted_below_their_floor(chapter):
    _, result = publish.load(chapter)
    for c in claims.claims_for(chapter):
        o = c.judge(result)
        assert o.verdict in claims.VERDICTS
        if o.verdict == claims.NOT_REPRODUCED:
            assert o.floor_met is True, c.id
        if o.verdict not in (claims.NOT_YET_RUN,) and o.interval is not None:
            assert o.mde is not None and o.mde >= 0
        if chapter == "he" and o.verdict != claims.NOT_YET_RUN:
            assert "alp" not in c.id


def test_every_lmt_claim_is_judged_by_the_rule_with_its_floor():
    # no LMT evaluator decides its own verdict: each checks the floor its data states
    from repro.experiments import lmt
    assert {c.id for c in lmt.CLAIMS} == {c.id for c in claims.REGISTRY["lmt"]}
    loaded = publish.load("lmt")
    if loaded is None:
        pytest.skip("no published LMT run")
    for c in claims.claims_for("lmt"):
        o = c.judge(loaded[1])
        assert o.verdict != claims.NOT_YET_RUN, (c.id, o.note)
        assert o.floor_met is not None and o.floor_why.startswith("floor"), c.id
        assert o.mde is not None, c.id


@pytest.mark.parametrize("chapter", ["he", "advprop", "bat"])
def test_published_laptop_he_and_advprop_are_below_their_floors(chapter):
    # the case: 21–28% clean on 2,000 CIFAR-10 images decides nothing
    loaded = publish.load(chapter)
    if loaded is None or loaded[0]["preset"] != "laptop":
        pytest.skip(f"{chapter} is not published at the laptop preset")
    for c in claims.claims_for(chapter):
        o = c.judge(loaded[1])
        assert o.verdict == claims.INCONCLUSIVE and o.floor_met is False, c.id


def test_proportion_se_is_binomial_inside_and_positive_at_the_edges():
    mid = claims.proportion(0.5, 10_000)
    assert abs(mid.se - 0.5) < 0.001           # Wald: 100·√(0.25/10000) = 0.5 points
    full = claims.proportion(1.0, 960)          # LMT's 960/960 tight certificates
    assert 0.1 < full.se < 0.3 and full.mde > 0.3
    assert full.interval[0] < 100 and full.interval[0] > 99.0
