"""Argument checks shared by the public entry points (attacks, evaluation, certificates, data).

Every public function of ``repro.attacks``, ``repro.evaluate``, ``repro.lipschitz`` and
``repro.data`` checks its arguments with these helpers *before any work starts*. A value of
the wrong kind raises ``TypeError``, a value outside its accepted range ``ValueError``; the
message starts with the function, names the argument and states the accepted range::

    attacks.pgd: eps must be a finite number >= 0, got -0.1
    evaluate.robust_eval: y must hold class indices in [0, 10) (the model has 10
        outputs), got labels in [0, 10]
    data.load: name must be one of 'mnist', 'cifar10', 'cifar100', got 'svhn'

Cost: scalar checks are plain Python; tensor checks read shapes and dtypes only, except the
value checks of images and labels (``image_values``, ``labels``, ``batch``), which reduce on
the tensors' device and fetch the result in *one* host sync per call (``batch`` fetches the
image range and the label range together), never once per attack step. The table of every
validated argument is ``book/validation.md``.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = ["number", "positive", "nonneg", "in_range", "count", "integer", "flag", "choice",
           "norm", "device", "dtype", "shape", "module", "generator", "tensor", "image_values",
           "images", "labels", "batch", "classes", "logits"]


# ----------------------------------------------------------------------------- messages

def _show(value: Any) -> str:
    """How a rejected value appears in a message: short, never a whole tensor."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, type):
        return value.__name__
    if callable(value) and not isinstance(value, (nn.Module, torch.Generator)):
        return getattr(value, "__qualname__", type(value).__name__)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    return type(value).__name__


def _fail(where: str, name: str, rule: str, value: Any, exc: type = ValueError, *,
          shown: str | None = None):
    raise exc(f"{where}: {name} must be {rule}, got {_show(value) if shown is None else shown}")


def _is_real(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return False
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return False
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _g(v: float) -> str:
    return f"{v:g}"


def _range_rule(what: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{_g(lo)}, {_g(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {_g(lo)}"
    if hi is not None:
        return f"{what} {'<' if hi_open else '<='} {_g(hi)}"
    return what


# ----------------------------------------------------------------------------- scalars

def number(where: str, name: str, value: Any, *, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           none: bool = False) -> float | None:
    """A finite real number (not a bool, not a tensor) in the given range; returns a float.
    ``none=True``: ``None`` is accepted too (and returned)."""
    if value is None and none:
        return None
    rule = _range_rule("a finite number", lo, hi, lo_open, hi_open) + (" or None" if none else "")
    if not _is_real(value):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        _fail(where, name, rule, value)
    return v


def positive(where: str, name: str, value: Any, *, none: bool = False) -> float | None:
    """A finite number > 0."""
    return number(where, name, value, lo=0, lo_open=True, none=none)


def nonneg(where: str, name: str, value: Any, *, none: bool = False) -> float | None:
    """A finite number >= 0."""
    return number(where, name, value, lo=0, none=none)


def radius(where: str, name: str, value: Any, n: int | None = None):
    """A finite number >= 0, or per-example radii: a float tensor of finite values >= 0 with
    one value per example (shape (N,) or (N, 1, ..., 1)), e.g. LMT's certified radii handed
    to an attack. One host sync for a tensor (its min and max)."""
    if not isinstance(value, torch.Tensor):
        return nonneg(where, name, value)
    if not value.is_floating_point():
        _fail(where, name, "a finite number >= 0 or a float tensor of per-example radii",
              value, TypeError)
    if value.dim() > 0 and (n is not None and value.shape[0] != n or
                            any(d != 1 for d in value.shape[1:])):
        _fail(where, name, f"a number or per-example radii of shape ({n if n is not None else 'N'},)"
              " or (N, 1, ..., 1)", value, ValueError, shown=f"shape {tuple(value.shape)}")
    lo, hi = (float(v) for v in torch.stack([value.min(), value.max()]).double().cpu()) \
        if value.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0:
        _fail(where, name, "finite radii >= 0", value, ValueError,
              shown=f"values in [{lo:g}, {hi:g}]")
    return value


def in_range(where: str, name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
             hi_open: bool = False, none: bool = False) -> float | None:
    """A finite number in [lo, hi] (either end open on request)."""
    return number(where, name, value, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open,
                  none=none)


def count(where: str, name: str, value: Any, *, min: int | None = 1, max: int | None = None,
          none: bool = False) -> int | None:
    """An integer (Python or NumPy, not a bool or a float) in [min, max]; returns an int."""
    if value is None and none:
        return None
    rule = _range_rule("an integer", min, max, False, False) + (" or None" if none else "")
    if not _is_int(value):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    v = int(value)
    if (min is not None and v < min) or (max is not None and v > max):
        _fail(where, name, rule, value)
    return v


def integer(where: str, name: str, value: Any, *, none: bool = False) -> int | None:
    """Any integer (a seed)."""
    return count(where, name, value, min=None, none=none)


def flag(where: str, name: str, value: Any) -> bool:
    """``True`` or ``False`` (a NumPy bool too); not 0/1, not a string."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    _fail(where, name, "True or False", value, TypeError,
          shown=f"{_show(value)} ({_kind(value)})")


def choice(where: str, name: str, value: Any, choices: Iterable[str], *,
           ignore_case: bool = False) -> str:
    """One of ``choices`` (strings); returns the matching choice as spelled there."""
    choices = tuple(choices)
    rule = "one of " + ", ".join(repr(c) for c in choices) + (" (any case)" if ignore_case else "")
    if not isinstance(value, str):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    for c in choices:
        if value == c or (ignore_case and value.lower() == c.lower()):
            return c
    _fail(where, name, rule, value)


def norm(where: str, name: str, value: Any) -> str:
    """A threat model's norm: 'linf' or 'l2' in any case ('Linf', 'L2' as AutoAttack spells
    them); returns the lower-case form."""
    return choice(where, name, value, ("linf", "l2"), ignore_case=True)


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_DEVICE_RULE = "'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device"


def device(where: str, name: str, value: Any, *, none: bool = True, auto: bool = True,
           available: bool = True) -> torch.device | None:
    """A device named by a string ('cpu', 'cuda', 'cuda:N', 'mps'; 'auto' where ``auto``:
    CUDA if available, else MPS, else the CPU) or a ``torch.device``; returns a
    ``torch.device`` (``None`` stays ``None`` where ``none``). ``available``: the device must
    exist on this machine (CUDA compiled in and enough GPUs; MPS available)."""
    if value is None and none:
        return None
    rule = ("'auto', " if auto else "") + _DEVICE_RULE + (" or None" if none else "")
    if isinstance(value, str):
        text = value.strip().lower()
        if auto and text == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            mps = getattr(torch.backends, "mps", None)
            return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
        if not _DEVICE_RE.match(text):
            _fail(where, name, rule, value)
        dev = torch.device(text)
    elif isinstance(value, torch.device):
        dev = value
        if dev.type not in ("cpu", "cuda", "mps"):
            _fail(where, name, rule, value)
    else:
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    if available:
        if dev.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                raise ValueError(f"{where}: {name}={str(dev)!r} but CUDA is not available on "
                                 f"this machine (torch.cuda.is_available() is False); use "
                                 f"'cpu' or 'auto'")
            if dev.index is not None and dev.index >= n:
                raise ValueError(f"{where}: {name}={str(dev)!r} but this machine has {n} CUDA "
                                 f"device(s): use an index in [0, {n})")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise ValueError(f"{where}: {name}='mps' but MPS is not available on this "
                                 f"machine; use 'cpu' or 'auto'")
    return dev


def dtype(where: str, name: str, value: Any, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """A ``torch.dtype`` or its name ('float64', 'torch.float64', 'double'), one of
    ``allowed``; returns the ``torch.dtype``."""
    rule = "one of " + ", ".join(str(d).replace("torch.", "") for d in allowed) + \
        " (a torch.dtype or its name)"
    dt = value
    if isinstance(value, str):
        dt = getattr(torch, value.strip().removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype):
            _fail(where, name, rule, value)
    elif not isinstance(value, torch.dtype):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    if dt not in tuple(allowed):
        _fail(where, name, rule, value)
    return dt


def shape(where: str, name: str, value: Any, *, ndim: int | None = None,
          what: str = "") -> tuple[int, ...]:
    """A per-example shape: a tuple/list/``torch.Size`` of ``ndim`` (any number >= 1 if
    ``None``) positive integers; returns a tuple."""
    n = "one or more" if ndim is None else str(ndim)
    rule = f"a sequence of {n} positive integers" + (f" {what}" if what else "")
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, torch.Size)):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    if not all(_is_int(v) for v in value):
        _fail(where, name, rule, value, TypeError)
    if (ndim is not None and len(value) != ndim) or len(value) == 0 or \
            any(int(v) < 1 for v in value):
        _fail(where, name, rule, value)
    return tuple(int(v) for v in value)


def _cls_name(c: type) -> str:
    mod = "torch.nn" if c.__module__.startswith("torch.nn.modules") else c.__module__
    return f"{mod}.{c.__qualname__}"


def module(where: str, name: str, value: Any, cls: type | tuple = nn.Module) -> Any:
    """An instance of ``cls`` (default ``torch.nn.Module``)."""
    if not isinstance(value, cls):
        names = " or ".join(_cls_name(c) for c in (cls if isinstance(cls, tuple) else (cls,)))
        _fail(where, name, f"a {names}", value, TypeError,
              shown=f"{_show(value)} ({_kind(value)})")
    return value


def generator(where: str, name: str, value: Any, *, cpu: bool = False) -> torch.Generator | None:
    """``None`` or a ``torch.Generator`` (on the CPU where ``cpu``)."""
    if value is None:
        return None
    rule = "None or a torch.Generator" + (" on the CPU" if cpu else "")
    if not isinstance(value, torch.Generator):
        _fail(where, name, rule, value, TypeError, shown=f"{_show(value)} ({_kind(value)})")
    if cpu and value.device.type != "cpu":
        _fail(where, name, rule, value, shown=f"a generator on {value.device}")
    return value


def tensor(where: str, name: str, value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(where, name, "a torch.Tensor", value, TypeError,
              shown=f"{_show(value)} ({_kind(value)})")
    return value


# ----------------------------------------------------------------------------- images, labels

def _image_tensor(where: str, x: Any, *, name: str, allow_uint8: bool,
                  ndim: int | None, min_ndim: int | None) -> None:
    """Type, dtype and rank of an image batch: host-only."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} (images) must be a torch.Tensor, got {_kind(x)}")
    if not (x.is_floating_point() or (allow_uint8 and x.dtype == torch.uint8)):
        raise ValueError(
            f"{where}: {name} must be float pixels in [0, 1]"
            + (" or uint8 pixels" if allow_uint8 else
               " (convert uint8 images with repro.data.to_float)") + f", got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{where}: {name} must be a batch of images of shape (N, C, H, W) "
                         f"({ndim}-D), got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{where}: {name} must be a batch (N, ...) with at least {min_ndim} "
                         f"dimensions, got shape {tuple(x.shape)}")


def _range_verdict(where: str, name: str, lo: float, hi: float) -> None:
    if lo >= 0 and hi <= 1:  # False for NaN too
        return
    if math.isnan(lo) or math.isnan(hi):
        hint = ": the images contain NaN"
    elif lo < 0:
        hint = (": negative values look like images already normalised with a mean/std; pass "
                "the raw [0, 1] images (normalisation is the model's first layer)")
    else:
        hint = (": values above 1 look like 0..255 pixels; divide by 255 (or pass uint8 "
                "images where accepted). Pass un-normalised [0, 1] images; normalisation is "
                "the model's first layer")
    raise ValueError(f"{where}: {name} must be un-normalised float pixels in [0, 1], got "
                     f"values in [{lo:.4g}, {hi:.4g}]{hint}")


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _minmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(t.detach())
    return torch.stack([lo, hi]).to(_stat_dtype(t))


def image_values(x: torch.Tensor, where: str, *, allow_uint8: bool = False,
                 name: str = "images") -> None:
    """Refuse images that are not un-normalised pixels: float values in [0, 1] (or, where
    ``allow_uint8``, uint8 pixels 0..255, which ``repro.data.to_float`` maps to [0, 1]).

    Normalisation is the model's first layer (``repro.models.norms.Normalize``), so a batch
    already normalised with a mean/std, or float pixels in 0..255, would be attacked with an
    eps meant for [0, 1] and clamped into [0, 1] by every projection: results that mean
    nothing. One ``aminmax`` and one host sync per call (never per attack step); empty
    batches pass. Any rank (``images`` also checks the rank).
    ``repro.attacks.check_images`` is this check.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {_kind(x)}")
    if x.dtype == torch.uint8 and allow_uint8:
        return
    if not x.is_floating_point():
        raise ValueError(
            f"{where}: {name} must be float pixels in [0, 1]"
            + (" or uint8 pixels" if allow_uint8 else
               " (convert uint8 images with repro.data.to_float)") + f", got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = _minmax(x).tolist()  # the one host sync
    _range_verdict(where, name, lo, hi)


def images(where: str, x: Any, *, name: str = "x", allow_uint8: bool = False,
           ndim: int | None = 4, min_ndim: int | None = None) -> None:
    """An image batch: a tensor of rank ``ndim`` (4: N, C, H, W; ``None``: any rank of at
    least ``min_ndim``), float in [0, 1] (or uint8 where ``allow_uint8``). One host sync."""
    _image_tensor(where, x, name=name, allow_uint8=allow_uint8, ndim=ndim, min_ndim=min_ndim)
    image_values(x, where, allow_uint8=allow_uint8, name=name)


def _label_tensor(where: str, y: Any, n: int | None, name: str, n_name: str) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{where}: {name} (labels) must be a torch.Tensor of int64 class "
                        f"indices, got {_kind(y)}")
    if y.dtype != torch.int64:
        raise TypeError(f"{where}: {name} must be int64 class indices (torch.long; convert with "
                        f"{name}.long()), got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{where}: {name} must be a 1-D tensor of class indices (N,), got "
                         f"shape {tuple(y.shape)}")
    if n is not None and len(y) != n:
        raise ValueError(f"{where}: {name} must have one label per image of {n_name} "
                         f"(length {n}), got length {len(y)}")


def _label_verdict(where: str, name: str, lo: int, hi: int, num_classes: int | None) -> None:
    if num_classes is not None:
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{where}: {name} must hold class indices in [0, {num_classes}) "
                             f"(the model has {num_classes} outputs), got labels in "
                             f"[{lo}, {hi}]")
    elif lo < 0:
        raise ValueError(f"{where}: {name} must hold class indices >= 0, got labels in "
                         f"[{lo}, {hi}]")


def labels(where: str, y: Any, *, n: int | None = None, num_classes: int | None = None,
           name: str = "y", n_name: str = "x") -> tuple[int | None, int | None]:
    """Class labels: a 1-D int64 tensor of length ``n`` with 0 <= y (< ``num_classes`` where
    given). One host sync (``aminmax``); returns (min, max), (None, None) when empty, so the
    caller can compare the max with a model's output width later without another sync."""
    _label_tensor(where, y, n, name, n_name)
    if y.numel() == 0:
        return None, None
    lo, hi = (int(v) for v in _minmax(y).tolist())
    _label_verdict(where, name, lo, hi, num_classes)
    return lo, hi


def batch(where: str, x: Any, y: Any, *, allow_uint8: bool = False, ndim: int | None = 4,
          min_ndim: int | None = None, num_classes: int | None = None, x_name: str = "x",
          y_name: str = "y") -> tuple[int | None, int | None]:
    """Images and their labels (``images`` and ``labels``): shapes, dtypes, one label per
    image, pixel range and label range, with *one* host sync for both ranges when they live
    on the same device. Returns the label (min, max) like ``labels``."""
    _image_tensor(where, x, name=x_name, allow_uint8=allow_uint8, ndim=ndim, min_ndim=min_ndim)
    _label_tensor(where, y, len(x), y_name, x_name)
    need_x = x.is_floating_point() and x.numel() > 0
    need_y = y.numel() > 0
    if need_x and need_y and x.device == y.device:
        xlo, xhi, ylo, yhi = torch.cat([_minmax(x), _minmax(y).to(_stat_dtype(x))]).tolist()
    else:
        xlo = xhi = ylo = yhi = None
        if need_x:
            xlo, xhi = _minmax(x).tolist()
        if need_y:
            ylo, yhi = _minmax(y).tolist()
    if need_x:
        _range_verdict(where, x_name, xlo, xhi)
    if not need_y:
        return None, None
    ylo, yhi = int(ylo), int(yhi)
    _label_verdict(where, y_name, ylo, yhi, num_classes)
    return ylo, yhi


def classes(where: str, y_range: tuple[int | None, int | None], num_classes: int,
            name: str = "y") -> None:
    """The label range fetched by ``labels``/``batch`` against a model's output width:
    host-only, no sync."""
    lo, hi = y_range
    if hi is not None:
        _label_verdict(where, name, lo, hi, num_classes)


def logits(where: str, z: Any, n: int | None = None, what: str = "the model") -> int:
    """A model's output: 2-D logits (N, C) with C >= 1 (and N == ``n``); returns C."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{where}: {what} must return a tensor of logits (N, C), got "
                        f"{_kind(z)}")
    if z.dim() != 2 or (n is not None and z.shape[0] != n) or z.shape[1] < 1:
        want = f"({n}, C)" if n is not None else "(N, C)"
        raise ValueError(f"{where}: {what} must return logits of shape {want} with C >= 1 "
                         f"classes, got shape {tuple(z.shape)}")
    return int(z.shape[1])
