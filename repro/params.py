"""Chapter parameters: presets, per-parameter overrides, and strict validation.

papermill only *warns* on a parameter the notebook does not declare, so a typo like
``-p epoch 5`` silently runs the default. Here every chapter declares its parameters with
types and valid ranges; an unknown name, an ill-typed or out-of-range value or an unknown
preset stops the run before any work starts, with a message that names the culprit and lists
what is valid.

One meaning of a value everywhere (CLI ``-p``, papermill ``-p``, ``Spec.resolve``, the
notebooks): a parameter left out keeps the preset's value, and so does ``...`` (Ellipsis,
``PRESET``: the default of every name in the notebooks' parameters cells). ``None`` is a
value, accepted only by ``optional`` parameters, whose help says what it means (e.g.
``n_train``: all training images); elsewhere it is an error.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Callable

PRESETS = ("smoke", "laptop", "overnight", "gpu", "paper")
PRESET_HELP = {
    "smoke": "CPU, about a minute: a few hundred images, tiny widths; proves the pipeline",
    "laptop": "2 CPU cores, at most 30 minutes a chapter: real data, small models, short schedules",
    "overnight": "2 CPU cores, about 12 hours a chapter in resumable pieces of <= 2 hours "
                 "(python -m repro campaign plan --device cpu): the smallest setup that reaches "
                 "the floors of the chapter's effect claims",
    "gpu": "one H200, in pieces of <= 8 GPU-minutes (python -m repro campaign plan)",
    "paper": "the paper's own setup, for readers with hours of GPU",
}


class ParameterError(ValueError):
    """A chapter parameter is unknown, ill-typed, out of range, or names an unknown preset."""


PRESET = ...  # an override of ``...`` keeps the preset's value (like leaving it out)

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


@dataclass(frozen=True)
class Param:
    """One chapter parameter. ``ge``/``gt``/``le``/``lt``: inclusive/strict bounds of a number,
    or of every item of a list; a bound may name another numeric parameter of the same spec
    (e.g. ``le="n_test"``), checked once the whole config is known. ``min_items``: the
    shortest valid list."""

    name: str
    type: str  # "int", "float", "str", "bool", "list[float]", "list[int]", "list[str]"
    help: str
    choices: tuple | None = None
    optional: bool = False  # None is a valid value, meaning what ``help`` says (e.g. "all")
    ge: float | str | None = None
    gt: float | str | None = None
    le: float | str | None = None
    lt: float | str | None = None
    min_items: int = 0

    def bounds(self) -> list[tuple[str, Any, Callable]]:
        """(symbol, bound, test) of every declared bound."""
        return [(sym, getattr(self, k), test) for k, sym, test in _BOUNDS
                if getattr(self, k) is not None]

    def describe(self) -> str:
        kind = self.type + (" or None" if self.optional else "")
        each = "items " if self.type.startswith("list") else ""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = (self.le, "]") if self.le is not None else (self.lt, ")")
        if low[1] is not None and high[0] is not None:
            rng = [f"{each}in {low[0]}{low[1]}, {high[0]}{high[1]}"]
        else:
            rng = [f"{each}{sym} {b}" for sym, b, _ in self.bounds()]
        if self.min_items:
            rng.append(f"at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
        extra = f", one of {'|'.join(map(str, self.choices))}" if self.choices else ""
        return f"{self.name} ({kind}{extra}){' ' + ', '.join(rng) if rng else ''}: {self.help}"

    def check(self, value: Any, config: dict | None = None) -> Any:
        """Return the value (ints widened to float where a float is declared) or raise.
        ``config``: the other parameters' values, for bounds that name one of them."""
        if value is None:
            if self.optional:
                return None
            raise ParameterError(
                f"parameter {self.name!r} cannot be None: None is a value only for parameters "
                f"whose help gives it a meaning (shown as 'or None' by python -m repro params "
                f"CHAPTER). Leave {self.name!r} out, or pass ..., to keep the preset's value")
        ok, coerced = _check_type(self.type, value)
        if not ok:
            raise ParameterError(f"parameter {self.name!r} must be {self.type}"
                                 f"{' or None' if self.optional else ''}, got {value!r} "
                                 f"({type(value).__name__})")
        items = coerced if self.type.startswith("list") else [coerced]
        if self.choices is not None:
            bad = [v for v in items if v not in self.choices]
            if bad:
                raise ParameterError(f"parameter {self.name!r} got {bad[0]!r}; valid choices: "
                                     f"{', '.join(map(str, self.choices))}")
        if len(items) < self.min_items:
            raise ParameterError(f"parameter {self.name!r} needs at least {self.min_items} "
                                 f"item(s), got {value!r}")
        for sym, bound, test in self.bounds():
            what = ""
            if isinstance(bound, str):  # another parameter's value
                if config is None or config.get(bound) is None:
                    continue
                what, bound = f" ({bound})", config[bound]
            bad = [v for v in items if not test(v, bound)]
            if bad:
                got = (f" (every item), got {bad[0]!r} in {value!r}"
                       if self.type.startswith("list") else f", got {value!r}")
                raise ParameterError(f"parameter {self.name!r} must be {sym} {bound}{what}{got}")
        return coerced


def _check_type(kind: str, value: Any) -> tuple[bool, Any]:
    scalar = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
    }
    if kind in scalar:
        if not scalar[kind](value):
            return False, None
        return True, float(value) if kind == "float" else value
    if kind.startswith("list[") and kind.endswith("]"):
        inner = kind[5:-1]
        if not isinstance(value, (list, tuple)) or not all(scalar[inner](v) for v in value):
            return False, None
        return True, [float(v) if inner == "float" else v for v in value]
    raise ValueError(f"unsupported parameter type {kind!r}")


@dataclass
class Spec:
    """The parameters of one chapter and their values at each preset."""

    chapter: str
    params: list[Param]
    presets: dict[str, dict[str, Any]]
    by_name: dict[str, Param] = field(init=False)

    def __post_init__(self):
        self.by_name = {p.name: p for p in self.params}
        for p in self.params:
            for _, bound, _ in p.bounds():
                if isinstance(bound, str) and bound not in self.by_name:
                    raise ValueError(f"{self.chapter}: {p.name}'s bound names unknown "
                                     f"parameter {bound!r}")
        for preset, values in self.presets.items():
            if preset not in PRESETS:
                raise ValueError(f"{self.chapter}: unknown preset {preset!r} in spec")
            missing = set(self.by_name) - set(values)
            unknown = set(values) - set(self.by_name)
            if missing or unknown:
                raise ValueError(f"{self.chapter}/{preset}: preset values missing {sorted(missing)}"
                                 f" or unknown {sorted(unknown)}")

    def describe(self) -> str:
        lines = [f"preset (str): one of {', '.join(self.presets)}"]
        lines += [p.describe() for p in self.params]
        return "\n  ".join(lines)

    def resolve(self, preset: str = "smoke", **overrides) -> dict[str, Any]:
        """The full config for ``preset`` with ``overrides`` applied; strict: types, choices
        and ranges of every value (the presets' own too) are checked.

        An override of ``...`` (``PRESET``) keeps the preset's value: a notebook's parameters
        cell sets every name to ``...``, meaning "the preset decides". An override of None
        sets None, which only ``optional`` parameters accept (their help says what it means).
        """
        if not isinstance(preset, str) or preset not in self.presets:
            raise ParameterError(
                f"unknown preset {preset!r} for chapter {self.chapter!r}; valid presets: "
                + "; ".join(f"{p} ({PRESET_HELP[p]})" for p in self.presets))
        unknown = [k for k in overrides if k not in self.by_name]
        if unknown:
            raise ParameterError(
                f"unknown parameter {unknown[0]!r} for chapter {self.chapter!r}. "
                f"Valid parameters, their types and ranges:\n  {self.describe()}")
        config = dict(self.presets[preset])
        for name, value in overrides.items():
            if value is PRESET:
                continue
            config[name] = self.by_name[name].check(value)
        for name, value in config.items():  # the presets themselves must type-check too
            config[name] = self.by_name[name].check(value)
        for name, value in config.items():  # bounds that name another parameter
            self.by_name[name].check(value, config)
        return {"chapter": self.chapter, "preset": preset, **config}


# Names a Jupyter kernel defines by itself; never chapter parameters.
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_CHECKED = "_repro_params_checked"


def from_notebook(spec: Spec, namespace: dict) -> dict[str, Any]:
    """Validate a notebook's parameters (its globals after papermill's injected cell).

    Call it in the cell right after the parameters cell. Every plain value defined by then
    must be a declared parameter, so a name papermill injected but the notebook does not
    know is an error, not a silently ignored value.
    """
    first_time = not namespace.get(_CHECKED)
    given = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _KERNEL_NAMES:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value):
            continue
        if name == "preset" or name in spec.by_name:
            given[name] = value
        elif first_time:  # a re-run in a live session has the notebook's own later names
            raise ParameterError(
                f"unknown parameter {name!r} for chapter {spec.chapter!r}. "
                f"Valid parameters, their types and ranges:\n  {spec.describe()}")
    namespace[_CHECKED] = True
    preset = given.pop("preset", "smoke")
    return spec.resolve(preset, **given)


def parse_cli_value(text: str) -> Any:
    """Parse a ``-p name value`` string the way papermill does (YAML-like literals).
    ``None`` / ``null`` is None, a value (see the module docstring); ``...`` keeps the
    preset's value. Lower-case ``none`` stays a string: it is a valid choice of some
    parameters (e.g. BAT's ``contrast``, ``autoattack``), and papermill keeps it a string too."""
    import ast
    lowered = text.strip()
    if lowered in ("None", "null"):
        return None
    if lowered in ("True", "true"):
        return True
    if lowered in ("False", "false"):
        return False
    try:
        return ast.literal_eval(lowered)
    except (ValueError, SyntaxError):
        return text
