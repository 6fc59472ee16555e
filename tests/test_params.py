import re

import pytest

from repro import experiments, params
from repro.experiments import common
from repro.params import Param, ParameterError, Spec

SPEC = Spec("demo", [
    Param("epochs", "int", "training epochs", ge=1),
    Param("eps", "float", "attack radius", ge=0, le=1),
    Param("arch", "str", "network", choices=("small_cnn", "preact_resnet18")),
    Param("radii", "list[float]", "certification radii", ge=0, min_items=1),
    Param("limit", "int", "max images (None: all)", optional=True, ge=1),
    Param("n_test", "int", "test images", ge=1),
    Param("n_aa", "int", "test images given to AutoAttack", ge=0, le="n_test"),
], presets={
    "smoke": {"epochs": 1, "eps": 0.1, "arch": "small_cnn", "radii": [0.5], "limit": 100,
              "n_test": 50, "n_aa": 10},
    "laptop": {"epochs": 5, "eps": 0.1, "arch": "small_cnn", "radii": [0.5, 1], "limit": None,
               "n_test": 50, "n_aa": 10},
})


def test_resolve_applies_overrides_and_keeps_preset_for_ellipsis():
    cfg = SPEC.resolve("smoke", epochs=3, eps=...)
    assert cfg == {"chapter": "demo", "preset": "smoke", "epochs": 3, "eps": 0.1,
                   "arch": "small_cnn", "radii": [0.5], "limit": 100, "n_test": 50, "n_aa": 10}
    assert SPEC.resolve("laptop")["radii"] == [0.5, 1.0]  # ints widened to float
    assert SPEC.resolve("smoke", limit=params.PRESET)["limit"] == 100  # ...: the preset decides
    assert SPEC.resolve("laptop")["limit"] is None  # an optional parameter's preset value


def test_none_is_a_value_only_for_optional_parameters():
    """Issue 13: `-p n_train None` used to keep the preset's 3000 images while `params` said
    "None: all". None now always means what the parameter's help says."""
    assert SPEC.resolve("smoke", limit=None)["limit"] is None
    with pytest.raises(ParameterError, match=r"'epochs' cannot be None.*pass \.\.\."):
        SPEC.resolve("smoke", epochs=None)


def test_ranges_are_checked_like_types():
    """Issue 13: `-p epochs -1` trained nothing and cached untrained models as finished."""
    for name, bad, msg in [("epochs", -1, ">= 1, got -1"), ("epochs", 0, ">= 1, got 0"),
                           ("eps", -0.1, ">= 0"), ("eps", 8.0, "<= 1"),
                           ("radii", [0.5, -1], ">= 0 (every item), got -1.0"),
                           ("radii", [], "at least 1 item"), ("limit", 0, ">= 1"),
                           ("n_aa", 51, "<= 50 (n_test)")]:
        with pytest.raises(ParameterError, match=rf"parameter {name!r} .*{re.escape(msg)}"):
            SPEC.resolve("smoke", **{name: bad})
    assert SPEC.resolve("smoke", eps=1, n_aa=50, limit=1)["n_aa"] == 50  # bounds inclusive
    with pytest.raises(ParameterError, match=r"'n_aa' must be <= 5 \(n_test\), got 10"):
        SPEC.resolve("smoke", n_test=5)  # a bound on another parameter: the preset's n_aa
    describe = SPEC.describe()
    assert "epochs (int) >= 1:" in describe and "eps (float) in [0, 1]:" in describe
    assert "radii (list[float]) items >= 0, at least 1 item:" in describe
    assert "n_aa (int) in [0, n_test]:" in describe
    with pytest.raises(ValueError, match="unknown parameter 'n_tst'"):
        Spec("x", [Param("a", "int", "", le="n_tst")], presets={"smoke": {"a": 1}})
    with pytest.raises(ParameterError, match="'a' must be >= 1"):  # presets are checked too
        Spec("x", [Param("a", "int", "", ge=1)], presets={"smoke": {"a": 0}}).resolve("smoke")


def test_unknown_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(ParameterError) as e:
        SPEC.resolve("smoke", epoch=3)
    msg = str(e.value)
    assert "'epoch'" in msg and "epochs (int) >= 1" in msg and "eps (float) in [0, 1]" in msg


def test_ill_typed_values():
    for name, bad in [("epochs", 2.5), ("epochs", "3"), ("epochs", True), ("eps", "0.1"),
                      ("radii", 0.5), ("radii", ["a"])]:
        with pytest.raises(ParameterError, match=repr(name)):
            SPEC.resolve("smoke", **{name: bad})
    with pytest.raises(ParameterError, match="valid choices"):
        SPEC.resolve("smoke", arch="vgg")


def test_unknown_preset_lists_presets():
    with pytest.raises(ParameterError, match="unknown preset 'huge'.*smoke.*laptop"):
        SPEC.resolve("huge")


def test_spec_rejects_incomplete_presets():
    with pytest.raises(ValueError, match="missing"):
        Spec("x", [Param("a", "int", "")], presets={"smoke": {}})


def test_from_notebook_catches_injected_unknown_names():
    import math
    ns = {"preset": "smoke", "epochs": 2, "eps": ..., "math": math, "In": [], "_": 1}
    assert params.from_notebook(SPEC, dict(ns))["epochs"] == 2
    with pytest.raises(ParameterError, match="'epochz'"):
        params.from_notebook(SPEC, {**ns, "epochz": 4})
    with pytest.raises(ParameterError, match="unknown preset"):
        params.from_notebook(SPEC, {**ns, "preset": "big"})


def test_parse_cli_value_like_papermill():
    assert params.parse_cli_value("3") == 3 and params.parse_cli_value("0.5") == 0.5
    assert params.parse_cli_value("[1, 2]") == [1, 2] and params.parse_cli_value("None") is None
    assert params.parse_cli_value("true") is True and params.parse_cli_value("pgd") == "pgd"
    # 'none' is a choice of some parameters (BAT's contrast, autoattack): it must not become
    # None, which means "the preset's value" (it once silently re-ran the preset's contrast)
    assert params.parse_cli_value("none") == "none"
    from repro.experiments import bat
    assert bat.SPEC.resolve("laptop", contrast=params.parse_cli_value("none"))["contrast"] == "none"


@pytest.mark.parametrize("chapter", list(experiments.CHAPTERS))
def test_every_chapter_declares_ranges_and_refuses_values_outside_them(chapter):
    spec = experiments.get(chapter).SPEC
    for preset in spec.presets:  # the presets themselves are in range
        spec.resolve(preset)
    numeric = [p for p in spec.params if p.type in ("int", "float", "list[int]", "list[float]")]
    assert [p.name for p in numeric if not p.bounds()] == []  # every number has a range
    for p in numeric:
        low, strict = (p.gt, True) if p.gt is not None else (p.ge, False)
        if isinstance(low, (int, float)):
            bad = low if strict else low - 1
            bad = [bad] if p.type.startswith("list") else bad
            with pytest.raises(ParameterError, match=rf"parameter {p.name!r} must be >"):
                spec.resolve("smoke", **{p.name: bad})
        if p.min_items:
            with pytest.raises(ParameterError, match=rf"{p.name!r} needs at least"):
                spec.resolve("smoke", **{p.name: []})
    with pytest.raises(ParameterError, match="must be <= 10000"):  # larger than any test set
        spec.resolve("smoke", n_test=10001)


def test_declared_split_sizes_are_the_datasets_and_more_is_refused(data_root):
    """The n_train / n_test bounds in the chapter specs are the real split sizes (checked
    before any work); load_dataset refuses more than a split has (it used to cut silently:
    n_test=20000 ran on 10,000 images under the name n_test=20000)."""
    for chapter, name, val_size in [("intro", "mnist", None), ("he", "cifar10", 1000),
                                    ("bat", "cifar10", None), ("advprop", "cifar10", None)]:
        spec = experiments.get(chapter).SPEC
        n_train, n_test = spec.by_name["n_train"].le, spec.by_name["n_test"].le
        ds = common.load_dataset(name, n_train=n_train, n_test=n_test, val_size=val_size)
        assert (len(ds.y_train), len(ds.y_test)) == (n_train, n_test), chapter
        with pytest.raises(ParameterError, match=rf"n_train={n_train + 1}, but {name} has "
                                                 rf"{n_train} train images"):
            common.load_dataset(name, n_train=n_train + 1, n_test=None, val_size=val_size)
        with pytest.raises(ParameterError, match=rf"n_test={n_test + 1}, but {name} has "
                                                 rf"{n_test} test images"):
            common.load_dataset(name, n_train=None, n_test=n_test + 1, val_size=val_size)
