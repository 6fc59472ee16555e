import pytest

from repro import params
from repro.params import Param, ParameterError, Spec

SPEC = Spec("demo", [
    Param("epochs", "int", "training epochs"),
    Param("eps", "float", "attack radius"),
    Param("arch", "str", "network", choices=("small_cnn", "preact_resnet18")),
    Param("radii", "list[float]", "certification radii"),
    Param("limit", "int", "max images", optional=True),
], presets={
    "smoke": {"epochs": 1, "eps": 0.1, "arch": "small_cnn", "radii": [0.5], "limit": 100},
    "laptop": {"epochs": 5, "eps": 0.1, "arch": "small_cnn", "radii": [0.5, 1], "limit": None},
})


def test_resolve_applies_overrides_and_keeps_preset_for_none():
    cfg = SPEC.resolve("smoke", epochs=3, eps=None)
    assert cfg == {"chapter": "demo", "preset": "smoke", "epochs": 3, "eps": 0.1,
                   "arch": "small_cnn", "radii": [0.5], "limit": 100}
    assert SPEC.resolve("laptop")["radii"] == [0.5, 1.0]  # ints widened to float
    assert SPEC.resolve("smoke", limit=None)["limit"] == 100  # None: the preset decides
    assert SPEC.resolve("laptop")["limit"] is None  # an optional parameter's preset value


def test_unknown_parameter_names_it_and_lists_valid_ones():
    with pytest.raises(ParameterError) as e:
        SPEC.resolve("smoke", epoch=3)
    msg = str(e.value)
    assert "'epoch'" in msg and "epochs (int)" in msg and "eps (float)" in msg


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
    ns = {"preset": "smoke", "epochs": 2, "eps": None, "math": math, "In": [], "_": 1}
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
