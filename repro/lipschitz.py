"""L2 Lipschitz bounds composed layer by layer, LMT training, and certified radii.

Lipschitz-Margin Training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018). A network's L2
Lipschitz constant L is bounded by composing per-layer bounds: a product along a chain, a sum
over the branches of a residual add. Linear layers (conv, linear) contribute their operator
norm on the *true* operator, i.e. the conv applied to input-shaped tensors with its stride and
padding, not the reshaped kernel matrix; BatchNorm (inference statistics) max|γ/σ|; input
normalisation 1/min(std); ReLU, flatten, dropout and identity 1; pooling the factors derived
in ``maxpool_bound`` / ``linear_pool_norm``.

Two uses, kept apart on purpose:

* Training (``LipschitzEstimator``): one power-iteration step per SGD step on persistent
  vectors (buffers, so they are checkpointed); the returned bound is differentiable in the
  weights, treating the vector as a constant (sigma = ||A u||). Its value is an *estimate*.
* Certification (``network_bound``): a rigorous upper bound computed in float64 from scratch,
  never from the training vectors. Per linear layer: the exact spectral norm of the dense
  operator (SVD) when it is small, else the norm of a circulant operator that contains the
  zero-padded conv as a sub-block (``conv2d_norm_upper``), which is an upper bound by
  construction. Power iteration is run too, to report how tight that upper bound is. Every
  rigorous number is inflated by a relative ``SLACK`` (1e-8) that covers float64 rounding.

The LMT loss adds sqrt(2)·c·L to every non-target logit (``lmt_logits``), scaled per example
as in the official code; LMT++ uses the per-pair bound ||w_t - w_i||·L_penultimate of the
last linear layer instead. The certified
radius is margin / (sqrt(2)·L), or min_i (z_t - z_i) / L_(t,i) with pairwise bounds.

Every public function validates its arguments before any work (``repro.validate``; the table
is ``book/validation.md``): shapes (positive integers, channels matching the layer), iteration
counts and tolerances, dtypes named by strings or ``torch.dtype``, Lipschitz bounds (a finite
L > 0, or a (K, K) pairwise matrix of finite values >= 0) and the logits/labels they certify.

Plans: a model is walked once into a tree of nodes (``Chain`` product, ``Sum`` residual add,
``Const``, ``Scale`` for BN-like layers, ``LinearMap`` for conv/linear operators). Rules are
looked up by module class; ``register_bound`` adds rules for new blocks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from repro import validate as V
from repro.data import to_float

SQRT2 = math.sqrt(2.0)
# Relative inflation of every rigorous float64 bound: SVD / FFT rounding is ~1e-13 relative.
SLACK = 1e-8
# Dense operators with at most this many entries (float64: 8 bytes each) and one side of at
# most DENSE_SIDE get an exact SVD (O(side²·other) time); larger convs use the circulant bound.
DENSE_LIMIT = 1 << 22
DENSE_SIDE = 1024

Shape = tuple


class UnsupportedLayerError(TypeError):
    """No sound Lipschitz rule exists (or is registered) for a module."""


# ----------------------------------------------------------------------------- plan nodes
class Node:
    """A piece of the bound. ``evaluate(ctx)`` dispatches to the context, which decides
    whether it is a training estimate or a rigorous certificate."""

    def evaluate(self, ctx):
        raise NotImplementedError(type(self).__name__)

    def linear_maps(self) -> list["LinearMap"]:
        return []


@dataclass(eq=False)
class Const(Node):
    """A parameter-free layer whose bound is known at planning time (ReLU, pooling...)."""
    name: str
    value: float
    kind: str

    def evaluate(self, ctx):
        return ctx.const(self)


@dataclass(eq=False)
class Scale(Node):
    """An elementwise affine layer whose bound is a differentiable function of its module
    (BatchNorm: max|γ|/sqrt(running_var + eps)); ``fn(module, dtype) -> 0-dim tensor``."""
    name: str
    module: nn.Module
    fn: Callable[[nn.Module, torch.dtype], torch.Tensor]
    kind: str

    def evaluate(self, ctx):
        return ctx.scale(self)


@dataclass(eq=False)
class LinearMap(Node):
    """A bias-free linear operator ``apply(x, weight)`` on inputs of ``(1, *in_shape)``.
    ``kind`` is "linear" (weight is the matrix), "conv2d" (zero-padded Conv2d), or "generic"."""
    name: str
    module: nn.Module
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    in_shape: Shape
    out_shape: Shape
    kind: str

    def evaluate(self, ctx):
        return ctx.linear(self)

    def linear_maps(self):
        return [self]


@dataclass(eq=False)
class Chain(Node):
    """Composition: bounds multiply."""
    parts: list

    def evaluate(self, ctx):
        out = ctx.one()
        for p in self.parts:
            out = out * p.evaluate(ctx)
        return out

    def linear_maps(self):
        return [m for p in self.parts for m in p.linear_maps()]

    def flat(self) -> list:
        return [q for p in self.parts for q in (p.flat() if isinstance(p, Chain) else [p])]


@dataclass(eq=False)
class Sum(Node):
    """Residual add of branches: bounds add (an identity branch is ``Const(..., 1.0)``)."""
    branches: list

    def evaluate(self, ctx):
        out = ctx.zero()
        for b in self.branches:
            out = out + b.evaluate(ctx)
        return out

    def linear_maps(self):
        return [m for b in self.branches for m in b.linear_maps()]


# ----------------------------------------------------------------------------- rule registry
Rule = Callable[[nn.Module, Shape, str], "tuple[Node, Shape]"]
_RULES: dict[type, Rule] = {}


def register_bound(*classes: type) -> Callable[[Rule], Rule]:
    """Decorator: ``rule(module, in_shape, name) -> (node, out_shape)`` for these classes
    (subclasses too, unless they have their own rule). Rules recurse with ``plan``."""
    for i, cls in enumerate(classes):
        if not isinstance(cls, type):
            raise TypeError(f"lipschitz.register_bound: classes[{i}] must be a class (a type), "
                            f"got {V._show(cls)}")

    def deco(rule: Rule) -> Rule:
        if not callable(rule):
            raise TypeError(f"lipschitz.register_bound: the rule must be a callable "
                            f"rule(module, in_shape, name), got {type(rule).__name__}")
        for cls in classes:
            _RULES[cls] = rule
        return rule
    return deco


def plan(module: nn.Module, in_shape: Sequence[int], name: str = "") -> tuple[Node, Shape]:
    """Walk ``module`` (inputs of per-example shape ``in_shape``, positive integers) into a
    bound plan."""
    W = "lipschitz.plan"
    V.module(W, "module", module)
    in_shape = V.shape(W, "in_shape", in_shape)
    if not isinstance(name, str):
        raise TypeError(f"{W}: name must be a str, got {type(name).__name__}")
    if type(module).__name__ == "OptimizedModule":  # torch.compile wrapper: same parameters
        module = module._orig_mod
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls](module, tuple(in_shape), name)
    raise UnsupportedLayerError(
        f"no Lipschitz rule for {type(module).__name__} at {name or '<root>'!r}; "
        "register one with repro.lipschitz.register_bound")


def _join(name: str, attr: str) -> str:
    """Dotted module path, as in ``model.named_modules()`` (the root is "")."""
    return f"{name}.{attr}" if name else attr


def _child(module: nn.Module, attr: str, shape: Shape, name: str) -> tuple[Node, Shape]:
    return plan(getattr(module, attr), shape, _join(name, attr))


def _sequence(steps, shape: Shape) -> tuple[Chain, Shape]:
    """Plan modules applied one after another: ``steps`` are (module, name) pairs."""
    parts = []
    for module, name in steps:
        node, shape = plan(module, shape, name)
        parts.append(node)
    return Chain(parts), shape


def _out_shape(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Shape) -> Shape:
    """Per-example output shape of ``fn`` via a meta-device call (no compute, no state)."""
    x = torch.empty((1, *in_shape), device="meta")
    return tuple(fn(x).shape[1:])


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta")


@register_bound(nn.Sequential)
def _sequential_rule(m, shape, name):
    return _sequence([(c, _join(name, k)) for k, c in m.named_children()], shape)


@register_bound(nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Tanh, nn.ReLU6)
def _one_lipschitz(m, shape, name):
    # |f'| <= 1 elementwise; dropout is the identity at inference, which is what we certify.
    return Const(name, 1.0, type(m).__name__), shape


@register_bound(nn.LeakyReLU)
def _leaky_relu(m, shape, name):
    return Const(name, max(1.0, abs(m.negative_slope)), "LeakyReLU"), shape


@register_bound(nn.Sigmoid)
def _sigmoid(m, shape, name):
    return Const(name, 0.25, "Sigmoid"), shape


@register_bound(nn.Flatten)
def _flatten(m, shape, name):
    return Const(name, 1.0, "Flatten"), _out_shape(m, shape)


# ----------------------------------------------------------------------------- linear operators
def _conv_apply(conv: nn.Module):
    # Bias-free forward with any padding mode (the bias only shifts, it has no Lipschitz cost).
    return lambda x, w: conv._conv_forward(x, w, None)


@register_bound(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_rule(m, shape, name):
    apply = _conv_apply(m)
    out = _out_shape(lambda x: apply(x, _meta(m.weight)), shape)
    kind = "conv2d" if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" else "generic"
    return LinearMap(name, m, apply, shape, out, kind), out


@register_bound(nn.Linear)
def _linear_rule(m, shape, name):
    if tuple(shape) != (m.in_features,):
        raise ValueError(f"{name}: Linear({m.in_features}, ...) planned on inputs of shape "
                         f"{shape}; wrong input_shape, or a rule that mirrors forward() wrongly")
    return LinearMap(name, m, lambda x, w: F.linear(x, w), shape, (m.out_features,), "linear"), \
        (m.out_features,)


def _adjoint(node: LinearMap, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A^T y through autograd: exact for any linear ``apply`` (stride, padding, groups...)."""
    with torch.enable_grad():
        x = torch.zeros((y.shape[0], *node.in_shape), dtype=y.dtype, device=y.device,
                        requires_grad=True)
        (g,) = torch.autograd.grad(node.apply(x, w), x, y)
    return g


def _transpose_apply(node: LinearMap, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A^T y without autograd for Linear and integer-padded, zero-padded Conv2d (the
    training estimator's hot path: one autograd graph per power step costs more than the
    convolution on a single image); ``_adjoint`` otherwise. Equal to ``_adjoint``
    (tests/test_lipschitz.py)."""
    m = node.module
    if node.kind == "linear":
        return y @ w
    if node.kind == "conv2d" and not isinstance(m.padding, str):
        (h, wd), (oh, ow) = node.in_shape[-2:], y.shape[-2:]
        extra = [size - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for size, o, s, p, d, k in
                 ((h, oh, m.stride[0], m.padding[0], m.dilation[0], m.kernel_size[0]),
                  (wd, ow, m.stride[1], m.padding[1], m.dilation[1], m.kernel_size[1]))]
        if all(0 <= e < max(s, d) for e, s, d in zip(extra, m.stride, m.dilation)):
            return F.conv_transpose2d(y, w, None, m.stride, m.padding, tuple(extra), m.groups,
                                      m.dilation)
    return _adjoint(node, y, w)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


def _orthonormal(u: torch.Tensor) -> torch.Tensor:
    """Rows of ``u`` (k, ...) made orthonormal (QR); k = 1: normalised."""
    if u.shape[0] == 1:
        return _unit(u)
    q, _ = torch.linalg.qr(u.flatten(1).T)
    return q.T.reshape(u.shape)


def _block_sigma(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value of ``m`` (k, n) = A applied to k orthonormal vectors: the
    Rayleigh-Ritz value of ||A|| on their span (a lower bound on ||A||, attained by a unit
    vector of the span); differentiable. k = 1: ||A u||."""
    if m.shape[0] == 1:
        return m.norm()
    return torch.linalg.eigvalsh(m @ m.T)[-1].clamp_min(0).sqrt()


def power_iteration(node: LinearMap, *, max_iters: int = 2000, tol: float = 1e-12,
                    dtype: torch.dtype = torch.float64, seed: int = 0,
                    u: torch.Tensor | None = None) -> tuple[float, torch.Tensor, int]:
    """Power iteration on A^T A for the true operator of ``node``: returns (sigma, u, iters).

    sigma = ||A u|| is a *lower* bound on ||A|| (it is attained by u); iteration stops when
    it grows by less than ``tol`` relative. Use ``operator_norm_bounds`` for an upper bound.
    Validated: ``node`` a LinearMap (from ``plan``); ``max_iters`` int >= 0 (0: ||A u0||);
    ``tol`` finite >= 0; ``dtype`` float32 | float64 (or its name); ``seed`` an int; ``u``
    None or a tensor with prod(in_shape) entries.
    """
    W = "lipschitz.power_iteration"
    V.module(W, "node", node, LinearMap)
    max_iters = V.count(W, "max_iters", max_iters, min=0)
    tol = V.nonneg(W, "tol", tol)
    dtype = V.dtype(W, "dtype", dtype, (torch.float32, torch.float64))
    seed = V.integer(W, "seed", seed)
    if u is not None:
        V.tensor(W, "u", u)
        if u.numel() != math.prod(node.in_shape):
            raise ValueError(f"{W}: u must have {math.prod(node.in_shape)} entries (shape "
                             f"(1, *{node.in_shape})), got shape {tuple(u.shape)}")
        u = u.reshape(1, *node.in_shape)
    w = node.module.weight.detach().to(dtype)
    if u is None:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn((1, *node.in_shape), generator=g, dtype=dtype)
    u = _unit(u.to(device=w.device, dtype=dtype))
    sigma, it = 0.0, 0
    with torch.no_grad():
        for it in range(1, max_iters + 1):
            v = node.apply(u, w)
            new = v.norm().item()
            u = _unit(_adjoint(node, v, w))
            if new - sigma <= tol * new:
                sigma = new
                break
            sigma = new
        sigma = max(sigma, node.apply(u, w).norm().item())
    return sigma, u, it


def dense_matrix(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: Shape,
                 dtype=torch.float64, device=None, chunk: int = 2048) -> torch.Tensor:
    """The matrix (n_out, n_in) of a linear map, by applying it to basis vectors
    (``in_shape`` positive integers; ``dtype`` float32 | float64; ``chunk`` >= 1)."""
    W = "lipschitz.dense_matrix"
    if not callable(fn):
        raise TypeError(f"{W}: fn must be a callable linear map, got {type(fn).__name__}")
    in_shape = V.shape(W, "in_shape", in_shape)
    dtype = V.dtype(W, "dtype", dtype, (torch.float32, torch.float64))
    device = V.device(W, "device", device, auto=False)
    chunk = V.count(W, "chunk", chunk)
    n = math.prod(in_shape)
    cols = []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        e = torch.zeros(k, n, dtype=dtype, device=device)
        e[torch.arange(k), torch.arange(start, start + k)] = 1
        cols.append(fn(e.view(k, *in_shape)).reshape(k, -1))
    return torch.cat(cols).T


def spectral_norm_dense(a: torch.Tensor) -> float:
    """Largest singular value of a 2-D matrix (float64)."""
    V.tensor("lipschitz.spectral_norm_dense", "a", a)
    if a.dim() != 2:
        raise ValueError(f"lipschitz.spectral_norm_dense: a must be a 2-D matrix, got shape "
                         f"{tuple(a.shape)}")
    return torch.linalg.matrix_norm(a.double(), ord=2).item()


def _conv_input(where: str, conv, shape, name: str) -> tuple[int, int, int]:
    """``conv`` is an nn.Conv2d and ``shape`` its per-example input (C, H, W)."""
    V.module(where, "conv", conv, nn.Conv2d)
    shape = V.shape(where, name, shape, ndim=3, what="(C, H, W)")
    if shape[0] != conv.in_channels:
        raise ValueError(f"{where}: {name} must start with conv.in_channels = "
                         f"{conv.in_channels} channels, got {shape}")
    return shape


def _left_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":  # torch puts the odd extra pixel on the right
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def conv2d_norm_upper(conv: nn.Conv2d, in_shape: Shape, out_shape: Shape | None = None,
                      max_batch_bytes: int = 1 << 28, weight: torch.Tensor | None = None):
    """Rigorous upper bound on ||conv|| for a zero-padded Conv2d on inputs of ``in_shape``.

    Derivation (per spatial dim, dilation folded into the kernel): output o reads input
    s·o + t for kernel offsets t = j - p. Write t = s·q + r (0 <= r < s); with the polyphase
    components x_r[m] = x[s·m + r] (an orthogonal rearrangement) the conv is a *stride-1*
    correlation y[o] = Σ_{r,q} K_r[q] x_r[o + q] with c_in·s² input channels. Embedded in a
    circular grid of N >= max(M - q_min, out + q_max) points (M = ceil(H/s)), no wrapped index
    reaches the support of x_r, so the conv equals select ∘ circulant ∘ embed, hence
    ||conv|| <= ||circulant|| = max over the N_h×N_w DFT frequencies of σ_max of the
    c_out × c_in·s² symbol matrix (per group). Exact up to float64 rounding (see SLACK).

    ``weight=None``: a float (float64, from the module's weight). ``weight`` given: a 0-dim
    tensor in its dtype, differentiable in it (the training bound of ``LipschitzEstimator``
    with ``method="upper"``; eigvalsh's gradient is that of the top eigenvalue).
    Validated: ``conv`` an nn.Conv2d; ``in_shape`` (C, H, W) with C = conv.in_channels;
    ``out_shape`` None or 3 positive integers; ``max_batch_bytes`` >= 1; ``weight`` None or
    a tensor of conv.weight's shape.
    """
    W = "lipschitz.conv2d_norm_upper"
    _conv_input(W, conv, in_shape, "in_shape")
    if out_shape is not None:
        out_shape = V.shape(W, "out_shape", out_shape, ndim=3, what="(C, H, W)")
    max_batch_bytes = V.count(W, "max_batch_bytes", max_batch_bytes)
    if weight is not None:
        V.tensor(W, "weight", weight)
        if weight.shape != conv.weight.shape:
            raise ValueError(f"{W}: weight must have conv.weight's shape "
                             f"{tuple(conv.weight.shape)}, got {tuple(weight.shape)}")
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError("conv2d_norm_upper needs zero padding")
    differentiable = weight is not None
    # on the weight's device: batched eigensolves like a GPU
    w = weight if differentiable else conv.weight.detach().double()
    dh, dw = conv.dilation
    if (dh, dw) != (1, 1):
        kh, kw = w.shape[-2:]
        wd = w.new_zeros(*w.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    co, cig, kh, kw = w.shape
    (sh, sw), (ph, pw) = conv.stride, _left_padding(conv)
    if out_shape is None:
        out_shape = _out_shape(lambda x: _conv_apply(conv)(x, _meta(conv.weight)), in_shape)
    (H, W), (Ho, Wo) = in_shape[-2:], out_shape[-2:]

    def grid(k, s, p, size, out):
        q_min, q_max = (-p) // s, (k - 1 - p) // s
        n = max(-(-size // s) - q_min, out + q_max, q_max - q_min + 1)
        return q_min, q_max - q_min + 1, n

    qh0, Qh, Nh = grid(kh, sh, ph, H, Ho)
    qw0, Qw, Nw = grid(kw, sw, pw, W, Wo)
    phase = w.new_zeros(co, cig, sh, sw, Qh, Qw)
    for jh in range(kh):
        for jw in range(kw):
            th, tw = jh - ph, jw - pw
            phase[:, :, th % sh, tw % sw, th // sh - qh0, tw // sw - qw0] = w[:, :, jh, jw]
    g = conv.groups
    phase = phase.reshape(g, co // g, cig * sh * sw, Qh, Qw)
    # Placing q at index q - q_min multiplies the whole symbol by one phase: σ unchanged.
    spec = torch.fft.fft2(phase, s=(Nh, Nw)).permute(3, 4, 0, 1, 2)  # (Nh, Nw, g, co/g, ci s²)
    if differentiable:
        gram = spec @ spec.mH if spec.shape[-2] <= spec.shape[-1] else spec.mH @ spec
        return torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0).sqrt()
    rows = max(1, max_batch_bytes // max(1, spec[0].numel() * 16))
    best = 0.0
    for start in range(0, Nh, rows):
        m = spec[start:start + rows]
        # σ_max² = λ_max of the smaller Gram matrix: a Hermitian eigensolve, cheaper than an SVD.
        gram = m @ m.mH if m.shape[-2] <= m.shape[-1] else m.mH @ m
        best = max(best, torch.linalg.eigvalsh(gram)[..., -1].max().item())
    return math.sqrt(max(best, 0.0))


@dataclass
class LayerBound:
    """One layer of a certificate: ``upper`` is rigorous, ``lower`` is attained (so the
    true per-layer norm lies in [lower, upper])."""
    name: str
    kind: str
    lower: float
    upper: float
    method: str


def operator_norm_bounds(node: LinearMap, *, dense_limit: int = DENSE_LIMIT,
                         max_iters: int = 300, tol: float = 1e-7) -> LayerBound:
    """(lower, upper) on ||A|| in float64: exact SVD of the dense operator when it is small
    (``dense_limit`` entries, a side <= DENSE_SIDE) or a plain Linear, else power iteration
    (lower; only a diagnostic of tightness) and the circulant bound (upper, rigorous) for
    zero-padded Conv2d. Anything else is refused rather than bounded unsoundly.
    Validated: ``node`` a LinearMap; ``dense_limit``, ``max_iters`` ints >= 0; ``tol``
    finite >= 0."""
    W = "lipschitz.operator_norm_bounds"
    V.module(W, "node", node, LinearMap)
    dense_limit = V.count(W, "dense_limit", dense_limit, min=0)
    max_iters = V.count(W, "max_iters", max_iters, min=0)
    tol = V.nonneg(W, "tol", tol)
    w = node.module.weight.detach().double().cpu()
    n_in, n_out = math.prod(node.in_shape), math.prod(node.out_shape)
    if node.kind == "linear" or (n_in * n_out <= dense_limit and min(n_in, n_out) <= DENSE_SIDE):
        a = w if node.kind == "linear" else dense_matrix(lambda x: node.apply(x, w), node.in_shape)
        s = spectral_norm_dense(a)
        return LayerBound(node.name, node.kind, s, s * (1 + SLACK), "svd")
    if node.kind == "conv2d":
        lower, _, _ = power_iteration(node, max_iters=max_iters, tol=tol)
        upper = conv2d_norm_upper(node.module, node.in_shape, node.out_shape) * (1 + SLACK)
        return LayerBound(node.name, node.kind, lower, max(upper, lower), "circulant")
    raise UnsupportedLayerError(
        f"{node.name}: operator too large for a dense SVD and not a zero-padded Conv2d; "
        "raise dense_limit to certify it")


def conv2d_operator_norm(conv: nn.Conv2d, input_shape: Sequence[int], iters: int = 2000,
                         dtype: torch.dtype = torch.float64) -> float:
    """Power-iteration value of the true conv operator on ``input_shape`` (C, H, W): a lower
    bound that converges to ||conv|| (stride and padding included). Validated: ``conv`` an
    nn.Conv2d; ``input_shape`` 3 positive integers with C = conv.in_channels; ``iters``
    int >= 1; ``dtype`` float32 | float64 (or its name)."""
    W = "lipschitz.conv2d_operator_norm"
    input_shape = _conv_input(W, conv, input_shape, "input_shape")
    iters = V.count(W, "iters", iters)
    dtype = V.dtype(W, "dtype", dtype, (torch.float32, torch.float64))
    node, _ = plan(conv, input_shape, "conv")
    return power_iteration(node, max_iters=iters, dtype=dtype)[0]


def linear_norm(linear: nn.Linear) -> float:
    """Exact spectral norm of a Linear layer's weight (float64 SVD)."""
    V.module("lipschitz.linear_norm", "linear", linear, nn.Linear)
    return spectral_norm_dense(linear.weight.detach())


# ----------------------------------------------------------------------------- BN, input norm
def _bn_fn(bn: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if bn.running_var is None:
        raise UnsupportedLayerError("BatchNorm without running statistics has a data-dependent "
                                    "Lipschitz constant; use track_running_stats=True")
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype).abs()
    return scale.max()


def batchnorm_bound(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """max_c |γ_c| / sqrt(running_var_c + eps): BN at inference is a per-channel affine map.
    The same (inference) bound is used during training, as in the paper; differentiable in γ."""
    V.module("lipschitz.batchnorm_bound", "bn", bn, nn.modules.batchnorm._BatchNorm)
    return _bn_fn(bn, bn.running_var.dtype if bn.running_var is not None else torch.float32)


@register_bound(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _bn_rule(m, shape, name):
    if m.running_var is None:
        _bn_fn(m, torch.float32)  # raises the explanation at planning time
    return Scale(name, m, _bn_fn, "BatchNorm"), shape


# ----------------------------------------------------------------------------- pooling
def _window_count(size: int, out: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Largest number of pooling windows (along one dim) that contain one input position."""
    counts = [0] * size
    for o in range(out):
        for j in range(k):
            i = o * s - p + j * d
            if 0 <= i < size:
                counts[i] += 1
    return max(counts)


def _adaptive_window_count(size: int, out: int) -> int:
    counts = [0] * size
    for o in range(out):
        for i in range((o * size) // out, -((-(o + 1) * size) // out)):
            counts[i] += 1
    return max(counts)


def maxpool_bound(pool: nn.Module, in_shape: Shape) -> float:
    """sqrt(n), n = the largest number of windows one input pixel belongs to.

    |max(a_w) - max(b_w)| <= max_{i in w} |a_i - b_i|, so ||Δy||² <= Σ_w Σ_{i in w} Δx_i²
    = Σ_i n_i Δx_i² <= n ||Δx||². Attained when one pixel is the max of all its windows,
    so it is the exact Lipschitz constant. n = n_h·n_w; for kernel k, stride s: <= ceil(k/s)².
    """
    W = "lipschitz.maxpool_bound"
    V.module(W, "pool", pool, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
    in_shape = V.shape(W, "in_shape", in_shape)
    if len(in_shape) < 2:
        raise ValueError(f"{W}: in_shape must be (C, H, W) or (H, W), got {in_shape}")
    out = _out_shape(pool, in_shape)
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        n = _adaptive_window_count(in_shape[-2], out[-2]) * \
            _adaptive_window_count(in_shape[-1], out[-1])
    else:
        k, s, p, d = (nn.modules.utils._pair(v) for v in
                      (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding,
                       pool.dilation))
        n = math.prod(_window_count(in_shape[-2 + a], out[-2 + a], k[a], s[a], p[a], d[a])
                      for a in (0, 1))
    return math.sqrt(n)


def linear_pool_norm(pool: nn.Module, in_shape: Shape, dense_limit: int = 4096) -> float:
    """||A|| of a (linear) average pooling on ``in_shape``; channels are independent and
    identical, so A = I_C ⊗ A_1 and ||A|| = ||A_1|| on one channel.

    Exact (dense SVD) when H·W <= ``dense_limit``; otherwise the Schur bound
    ||A_1|| <= sqrt(||A_1||_1 ||A_1||_inf) from its (nonnegative) column and row sums.
    For k = s without padding both give 1/k; a global average over H×W gives 1/sqrt(HW).
    """
    W = "lipschitz.linear_pool_norm"
    V.module(W, "pool", pool)
    in_shape = V.shape(W, "in_shape", in_shape)
    if len(in_shape) < 2:
        raise ValueError(f"{W}: in_shape must be (C, H, W) or (H, W), got {in_shape}")
    dense_limit = V.count(W, "dense_limit", dense_limit, min=0)
    one = (1, *in_shape[1:])
    if math.prod(one) <= dense_limit:
        return spectral_norm_dense(dense_matrix(lambda x: pool(x), one)) * (1 + SLACK)
    x = torch.ones((1, *one), dtype=torch.float64, requires_grad=True)
    rows = pool(x)
    (cols,) = torch.autograd.grad(rows.sum(), x)
    return math.sqrt(rows.max().item() * cols.max().item()) * (1 + SLACK)


@register_bound(nn.MaxPool2d, nn.AdaptiveMaxPool2d)
def _maxpool_rule(m, shape, name):
    return Const(name, maxpool_bound(m, shape), type(m).__name__), _out_shape(m, shape)


@register_bound(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
def _avgpool_rule(m, shape, name):
    return Const(name, linear_pool_norm(m, shape), type(m).__name__), _out_shape(m, shape)


def pooling_bound(pool: nn.Module, in_shape: Sequence[int]) -> float:
    """Lipschitz bound of a pooling layer on per-example inputs of ``in_shape`` (C, H, W)."""
    W = "lipschitz.pooling_bound"
    V.module(W, "pool", pool, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d,
                               nn.AdaptiveAvgPool2d))
    in_shape = V.shape(W, "in_shape", in_shape, ndim=3, what="(C, H, W)")
    node, _ = plan(pool, in_shape, "pool")
    return node.value


# ----------------------------------------------------------------------------- residual helper
def residual(main: Node, shortcut: Node | None, name: str) -> Sum:
    """``main(x) + shortcut(x)``; ``shortcut=None`` is the identity (bound 1)."""
    V.module("lipschitz.residual", "main", main, Node)
    if shortcut is not None:
        V.module("lipschitz.residual", "shortcut", shortcut, Node)
    return Sum([main, shortcut if shortcut is not None else Const(_join(name, "identity"), 1.0,
                                                                     "identity")])


# ----------------------------------------------------------------------------- evaluation
class _EstimateCtx:
    """Training: ``steps`` power steps per linear map on persistent vectors, the value
    ||A u||; differentiable."""

    def __init__(self, vectors: dict[LinearMap, torch.Tensor], device, dtype=torch.float32,
                 steps: int = 1, linear_steps: int | None = None):
        self.vectors, self.device, self.dtype, self.steps = vectors, device, dtype, steps
        self.linear_steps = steps if linear_steps is None else linear_steps

    def one(self):
        return torch.ones((), device=self.device, dtype=self.dtype)

    def zero(self):
        return torch.zeros((), device=self.device, dtype=self.dtype)

    def const(self, node):
        return torch.tensor(node.value, device=self.device, dtype=self.dtype)

    def scale(self, node):
        return node.fn(node.module, self.dtype)

    def linear(self, node):
        buf = self.vectors[node]
        w = node.module.weight.to(self.dtype)
        with torch.no_grad():
            u = buf.to(device=w.device, dtype=self.dtype)
            steps = self.linear_steps if node.kind == "linear" else self.steps
            for _ in range(steps):  # steps = 0: the value at the stored vectors
                u = _orthonormal(_transpose_apply(node, node.apply(u, w.detach()), w.detach()))
            buf.copy_(u)
        # u is a constant: d sigma / dW = v u^T (block: the top Ritz pair's)
        return _block_sigma(node.apply(u, w).flatten(1))


class _ExactCtx:
    """Certification: float64, per-layer (lower, upper) computed once and cached."""

    def __init__(self, **opts):
        self.opts, self.records, self.which = opts, {}, "upper"

    def one(self):
        return 1.0

    def zero(self):
        return 0.0

    def _record(self, node, lower, upper, method):
        if node not in self.records:
            self.records[node] = LayerBound(node.name, node.kind, lower, upper, method)
        return getattr(self.records[node], self.which)

    def const(self, node):
        return self._record(node, node.value, node.value, "closed form")

    def scale(self, node):
        v = node.fn(node.module, torch.float64).item()
        return self._record(node, v, v * (1 + SLACK), "closed form")

    def linear(self, node):
        if node not in self.records:
            self.records[node] = operator_norm_bounds(node, **self.opts)
        return getattr(self.records[node], self.which)


def split_head(root: Node) -> tuple[Chain, LinearMap]:
    """Split a plan into (everything before the last Linear, that Linear) for LMT++.
    Trailing 1-Lipschitz identities (dropout, flatten...) after the Linear are not allowed:
    they would change the logits the pairwise bound talks about."""
    V.module("lipschitz.split_head", "root", root, Node)
    parts = root.flat() if isinstance(root, Chain) else [root]
    if not parts or not (isinstance(parts[-1], LinearMap) and parts[-1].kind == "linear"):
        raise UnsupportedLayerError("pairwise (LMT++) bounds need a network ending in nn.Linear")
    return Chain(parts[:-1]), parts[-1]


def _pairwise(weight: torch.Tensor, penultimate: torch.Tensor) -> torch.Tensor:
    """[t, i] = ||w_t - w_i|| · L_penultimate: Lipschitz bound of z_t - z_i (0 on the diagonal)."""
    return torch.linalg.vector_norm(weight[:, None, :] - weight[None, :, :], dim=-1) * penultimate


@dataclass
class BoundReport:
    """A certificate. ``lipschitz`` is a rigorous upper bound on the L2 Lipschitz constant of
    the logits; ``estimate`` composes the attained per-layer values instead (what power
    iteration alone would report: not rigorous, shows the slack). ``pairwise[t, i]`` bounds the
    Lipschitz constant of z_t - z_i (LMT++), when the network ends in a Linear layer."""
    lipschitz: float
    estimate: float
    pairwise: torch.Tensor | None
    layers: list[LayerBound] = field(default_factory=list)

    def radius(self, logits: torch.Tensor, y: torch.Tensor, pairwise: bool = False):
        if pairwise and self.pairwise is None:
            raise UnsupportedLayerError("this network has no pairwise bound")
        return certified_radius(logits, y, self.pairwise if pairwise else self.lipschitz)


def network_bound(model: nn.Module, input_shape: Sequence[int], *,
                  dense_limit: int = DENSE_LIMIT, max_iters: int = 300,
                  tol: float = 1e-7) -> BoundReport:
    """Rigorous float64 Lipschitz bound of ``model`` (in eval semantics: BN running stats,
    dropout off) on inputs of per-example shape ``input_shape``. Computed from scratch.
    ``max_iters`` only buys the power-iteration diagnostic (``estimate``, per-layer ``lower``);
    0 skips it (the upper bound does not depend on it). Validated: ``model`` a Module;
    ``input_shape`` positive integers; ``dense_limit``, ``max_iters`` ints >= 0; ``tol``
    finite >= 0."""
    W = "lipschitz.network_bound"
    V.module(W, "model", model)
    input_shape = V.shape(W, "input_shape", input_shape)
    dense_limit = V.count(W, "dense_limit", dense_limit, min=0)
    max_iters = V.count(W, "max_iters", max_iters, min=0)
    tol = V.nonneg(W, "tol", tol)
    root, _ = plan(model, input_shape)
    ctx = _ExactCtx(dense_limit=dense_limit, max_iters=max_iters, tol=tol)
    upper = float(root.evaluate(ctx))
    if not math.isfinite(upper):
        raise ValueError(f"non-finite Lipschitz bound ({upper}): the model has inf/nan weights")
    ctx.which = "lower"
    estimate = float(root.evaluate(ctx))
    pairwise = None
    try:
        pen, head = split_head(root)
    except UnsupportedLayerError:
        pass
    else:
        ctx.which = "upper"
        pen_upper = float(pen.evaluate(ctx))
        pairwise = _pairwise(head.module.weight.detach().double().cpu(), pen_upper) * (1 + SLACK)
    return BoundReport(upper, estimate, pairwise, list(ctx.records.values()))


# ----------------------------------------------------------------------------- training estimator
class LipschitzEstimator(nn.Module):
    """Training-time bound with persistent power-iteration vectors (buffers: checkpointed).

    ``forward()`` does ``power_steps`` power steps per conv (``linear_steps`` per Linear;
    the paper and the official code: 1 each) and returns the bound, differentiable in the
    model's weights (BN γ included): a 0-dim L, or with ``pairwise=True`` the (K, K) matrix
    ``[t, i] = ||w_t - w_i||·L_penultimate`` (LMT++). ``forward(steps=0)`` evaluates at the
    stored vectors without moving them. Each map contributes ||A u|| (||u|| = 1), a lower
    bound on ||A||.

    Why more than one step: the training loss pushes down exactly the direction u has found
    (Adam moves every weight by ~lr per step, ~1% of the norm along u), so one power step
    per optimiser step trails the weights. Measured on the MNIST CNN (LMT++, c = 1, Adam
    1e-3, batch 50): 1 step per step, 0.81-0.86 of the exact bound; 3 steps, 0.86-0.92;
    5, 0.90-0.95; 10, 0.94-0.95 (the fully connected layer lagged most, at 0.90, though its
    spectral gap is the largest; Linear steps cost microseconds, so they get their own
    count). Rescaling each layer to its rigorous bound every 20-100 steps overshot and
    drifted by up to 15% in between. ``exact()`` is the rigorous float64 value of the same
    quantity (L, or L_penultimate when pairwise), for monitoring.
    The model is referenced, not registered, so this module's state_dict holds only the
    vectors. Move it with the model (``.to``).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *, pairwise: bool = False,
                 seed: int = 0, power_steps: int = 1, linear_steps: int | None = None,
                 block: int = 1):
        super().__init__()
        W = "lipschitz.LipschitzEstimator"
        V.module(W, "model", model)
        input_shape = V.shape(W, "input_shape", input_shape)
        pairwise = V.flag(W, "pairwise", pairwise)
        seed = V.integer(W, "seed", seed)
        power_steps = V.count(W, "power_steps", power_steps)
        linear_steps = V.count(W, "linear_steps", linear_steps, none=True)
        linear_steps = power_steps if linear_steps is None else linear_steps
        block = V.count(W, "block", block)
        self._plan, _ = plan(model, input_shape)
        self.pairwise, self.power_steps = pairwise, int(power_steps)
        self.linear_steps, self.block = int(linear_steps), int(block)
        if pairwise:
            self._plan, self._head = split_head(self._plan)
        self._keys: dict[LinearMap, str] = {}
        g = torch.Generator().manual_seed(seed)
        for node in self._plan.linear_maps():
            key = "u_" + (node.name.replace(".", "_") or "op")
            while key in self._buffers:
                key += "_"
            self.register_buffer(key, _orthonormal(
                torch.randn((self.block, *node.in_shape), generator=g)))
            self._keys[node] = key

    @property
    def names(self) -> dict[str, str]:
        """Vector buffer key -> layer name."""
        return {k: n.name for n, k in self._keys.items()}

    def _vectors(self):
        vectors = {node: self._buffers[key] for node, key in self._keys.items()}
        # Compute where the weights live; vectors follow (copied back if the estimator was
        # left behind on another device, which costs a transfer per step).
        device = next(iter(vectors)).module.weight.device if vectors else torch.device("cpu")
        return vectors, device

    def forward(self, steps: int | None = None) -> torch.Tensor:
        if steps is not None:
            steps = V.count("lipschitz.LipschitzEstimator.forward", "steps", steps, min=0)
        vectors, device = self._vectors()
        steps, linear = ((self.power_steps, self.linear_steps) if steps is None
                         else (steps, steps))
        with torch.autocast(device_type=device.type, enabled=False):
            bound = self._plan.evaluate(_EstimateCtx(vectors, device, steps=steps,
                                                     linear_steps=linear))
            if self.pairwise:
                bound = _pairwise(self._head.module.weight.float(), bound)
        return bound

    @torch.no_grad()
    def sync(self, iters: int = 50) -> None:
        """``iters`` power steps per linear map from the stored vectors (no host sync)."""
        iters = V.count("lipschitz.LipschitzEstimator.sync", "iters", iters, min=0)
        vectors, device = self._vectors()
        with torch.autocast(device_type=device.type, enabled=False):
            self._plan.evaluate(_EstimateCtx(vectors, device, steps=iters))

    @torch.no_grad()
    def value(self) -> float:
        """The estimate at the stored vectors, as a float: L, or L_penultimate if pairwise
        (the factor ``exact()`` is compared with). Moves no vector."""
        vectors, device = self._vectors()
        with torch.autocast(device_type=device.type, enabled=False):
            return float(self._plan.evaluate(_EstimateCtx(vectors, device, steps=0)))

    def exact(self) -> float:
        """Rigorous float64 upper bound of what ``value()`` estimates (``network_bound``'s
        per-layer rules, no power iteration)."""
        return float(self._plan.evaluate(_ExactCtx(dense_limit=DENSE_LIMIT, max_iters=0,
                                                   tol=1e-7)))


# ----------------------------------------------------------------------------- LMT loss
LMT_FORMS = ("official", "full")


def lmt_logits(logits: torch.Tensor, y: torch.Tensor, c: float, bound: torch.Tensor,
               form: str = "official") -> torch.Tensor:
    """Logits with LMT's margin: a_i = sqrt(2)·c·L for a scalar bound L (Prop. 1), or
    a_i = c·bound[y, i] for a (K, K) pairwise bound (LMT++, Prop. 2: bound[y, i] =
    ||w_y - w_i||·L_penultimate, no sqrt(2)); a_y = 0. Shapes: logits (N, K), y (N,).

    ``form="official"`` (the official Chainer code, ytsmiling/lmt ``src/function/last_fc.py``,
    ``Lmt`` and ``LmtFc``): the added margin is scaled per example by
    f = min_{i != y} clip((z_y - z_i) / a_i, 0, 1), a constant (not differentiated), so
    logits + f·a. A misclassified example (f = 0) gets plain cross-entropy; a correct one
    whose margin is below the target gets the margin it already has (z_y ties with the
    closest class); one certified at radius c (f = 1) gets the full a, and keeps pushing L
    down. ``form="full"``: logits + a for every example (the paper's equation as written).
    Gradients reach the bound through a in both forms.

    Validated (shapes and dtypes only: no host sync, this runs every training step):
    ``logits`` float (N, K); ``y`` int64 (N,); ``c`` finite >= 0; ``bound`` a number, a
    0-dim tensor or a (K, K) tensor; ``form`` in ``LMT_FORMS``."""
    W = "lipschitz.lmt_logits"
    form = V.choice(W, "form", form, LMT_FORMS)
    c = V.nonneg(W, "c", c)
    _logits_labels(W, logits, y)
    if isinstance(bound, torch.Tensor):
        k = logits.shape[1]
        if bound.dim() not in (0, 2) or (bound.dim() == 2 and bound.shape != (k, k)):
            raise ValueError(f"{W}: bound must be a scalar Lipschitz constant or a ({k}, {k}) "
                             f"pairwise matrix, got shape {tuple(bound.shape)}")
    else:
        V.nonneg(W, "bound", bound)
    bound = torch.as_tensor(bound, dtype=logits.dtype, device=logits.device)
    other = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    add = c * (SQRT2 * bound * other if bound.dim() == 0 else bound[y] * other)
    if form == "official":
        with torch.no_grad():
            a, margin = add.detach(), logits.detach().gather(1, y[:, None]) - logits.detach()
            # a_i = 0 (the target, or a zero bound): the pair needs no margin, ratio 1 iff
            # the margin is not negative (the official kernel's "margin >= a" test)
            ratio = torch.where(a > 0, margin / a.clamp_min(torch.finfo(a.dtype).tiny),
                                (margin >= 0).to(a.dtype))
            factor = ratio.clamp(0, 1).amin(1, keepdim=True)
        add = factor * add
    return logits + add


class LMTMarginLoss(nn.Module):
    """Cross-entropy on ``lmt_logits``; ``c`` is an attribute so a schedule can change it."""

    def __init__(self, c: float, form: str = "official"):
        super().__init__()
        W = "lipschitz.LMTMarginLoss"
        self.c, self.form = V.nonneg(W, "c", c), V.choice(W, "form", form, LMT_FORMS)

    def forward(self, logits, y, bound):
        return F.cross_entropy(lmt_logits(logits, y, self.c, bound, self.form), y)


def lmt_c(epoch: float, c: float, warmup_epochs: float, start: float | None = None) -> float:
    """c ramped geometrically from ``start`` (default c/1000) to ``c`` over ``warmup_epochs``
    (our choice of ramp: the paper's notes only say c starts small; 0 warmup = constant c).
    Validated: ``epoch`` finite; ``c`` finite >= 0 (> 0 for a ramp without ``start``);
    ``warmup_epochs`` finite >= 0; ``start`` None or finite > 0."""
    W = "lipschitz.lmt_c"
    epoch = V.number(W, "epoch", epoch)
    c = V.nonneg(W, "c", c)
    warmup_epochs = V.nonneg(W, "warmup_epochs", warmup_epochs)
    start = V.positive(W, "start", start, none=True)
    if warmup_epochs > 0 and epoch < warmup_epochs and c == 0 and start is None:
        raise ValueError(f"{W}: c must be > 0 for a geometric warm-up from c/1000 (or give "
                         f"start), got c=0")
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return c
    start = c / 1000 if start is None else start
    return start * (c / start) ** (max(epoch, 0.0) / warmup_epochs)


# ----------------------------------------------------------------------------- certification
def certified_radius(logits: torch.Tensor, y: torch.Tensor, bound) -> torch.Tensor:
    """Signed L2 radius within which the prediction cannot change: margin / (sqrt(2)·L), or
    min_{i != y} (z_y - z_i) / bound[y, i] for a pairwise bound. Negative = misclassified;
    an example is certified at radius r iff radius > r (strict: ties are not robust).

    Validated first: ``logits`` float (N, K); ``y`` int64 (N,) in [0, K); ``bound`` a finite
    Lipschitz constant > 0 (number or 0-dim tensor) or a (K, K) matrix of finite values
    >= 0 (one host sync for the label range and the matrix)."""
    W = "lipschitz.certified_radius"
    _logits_labels(W, logits, y)
    V.labels(W, y, num_classes=logits.shape[1])
    bound = _check_bound(W, bound, logits.shape[1])
    return _certified_radius(logits, y, bound.to(logits.device))


def _logits_labels(where: str, logits, y) -> None:
    """Host-only: float logits (N, K), int64 labels (N,)."""
    V.tensor(where, "logits", logits)
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"{where}: logits must be a float tensor (N, K), got dtype "
                         f"{logits.dtype} and shape {tuple(logits.shape)}")
    V.tensor(where, "y", y)
    if y.dtype != torch.int64 or y.shape != logits.shape[:1]:
        raise ValueError(f"{where}: y must be int64 class indices of shape "
                         f"({logits.shape[0]},), got dtype {y.dtype} and shape "
                         f"{tuple(y.shape)}")


def _check_bound(where: str, bound, k: int | None) -> torch.Tensor:
    """A certificate's bound: a finite Lipschitz constant L > 0 (a number or a 0-dim tensor),
    or a (k, k) pairwise matrix (any square one when k is None) of finite values >= 0.
    One host sync for a tensor. Returns the bound as a float64 tensor."""
    if isinstance(bound, torch.Tensor):
        square = bound.dim() == 2 and bound.shape[0] == bound.shape[1]
        if not (bound.dim() == 0 or (square and (k is None or bound.shape[0] == k))):
            want = f"({k}, {k})" if k is not None else "(K, K)"
            raise ValueError(f"{where}: bound must be a Lipschitz constant (a number or a 0-dim "
                             f"tensor) or a {want} pairwise matrix, got shape "
                             f"{tuple(bound.shape)}")
        b = bound.detach().double() if bound.device.type != "mps" else bound.detach().float()
        if b.numel() == 0:
            return b.double()
        finite, lo = torch.stack([torch.isfinite(b).all().to(b.dtype), b.amin()]).tolist()
        if bound.dim() == 0:
            if finite != 1.0 or lo <= 0:
                raise ValueError(f"{where}: bound (the Lipschitz constant) must be a finite "
                                 f"number > 0, got {lo!r}")
        elif finite != 1.0 or lo < 0:
            raise ValueError(f"{where}: bound (the pairwise matrix) must hold finite values "
                             f">= 0, got " + ("non-finite values" if finite != 1.0 else
                                              f"a minimum of {lo:.4g}"))
        return bound.detach().double()
    V.positive(where, "bound (the Lipschitz constant)", bound)
    return torch.as_tensor(bound, dtype=torch.float64)


def _certified_radius(logits: torch.Tensor, y: torch.Tensor, bound) -> torch.Tensor:
    logits = logits.double()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=logits.device)
    diff = logits.gather(1, y[:, None]) - logits  # z_y - z_i
    target = F.one_hot(y, logits.shape[1]).bool()
    if bound.dim() == 0:
        return diff.masked_fill(target, math.inf).min(1).values / (SQRT2 * bound)
    pair = bound[y]
    r = torch.where(pair > 0, diff / pair.clamp_min(1e-300),
                    torch.where(diff > 0, math.inf, torch.where(diff < 0, -math.inf, 0.0)))
    return r.masked_fill(target, math.inf).min(1).values


def certified_accuracy(radius: torch.Tensor, radii: Sequence[float]) -> list[float]:
    """Fraction certified at each radius (radius 0 = plain accuracy). ``radius`` a 1-D
    tensor; ``radii`` finite numbers >= 0."""
    W = "lipschitz.certified_accuracy"
    V.tensor(W, "radius", radius)
    if radius.dim() != 1:
        raise ValueError(f"{W}: radius must be a 1-D tensor of radii, got shape "
                         f"{tuple(radius.shape)}")
    if isinstance(radii, (str, bytes)) or not hasattr(radii, "__iter__"):
        raise TypeError(f"{W}: radii must be a sequence of finite numbers >= 0, got "
                        f"{V._show(radii)}")
    radii = [V.nonneg(W, f"radii[{i}]", r.item() if hasattr(r, "item") else r)
             for i, r in enumerate(radii)]
    return [(radius > r).double().mean().item() for r in radii]


@torch.no_grad()
def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound, *,
            batch_size: int = 500) -> torch.Tensor:
    """Certified radii of (x, y) under ``bound`` (a float L or a pairwise matrix, e.g. from
    ``network_bound``), with logits from a float64 eval-mode copy of the model so rounding of
    the margin is negligible next to it. ``x``: uint8 or float images in [0, 1] (the radius is
    in [0, 1]-pixel units; ``ValueError`` otherwise, see ``repro.attacks.check_images``).
    Validated first: ``model`` a Module; ``y`` int64 (N,) in [0, K) (K: the model's outputs);
    ``bound`` as in ``certified_radius``; ``batch_size`` >= 1."""
    W = "lipschitz.certify"
    V.module(W, "model", model)
    batch_size = V.count(W, "batch_size", batch_size)
    y_range = V.batch(W, x, y, allow_uint8=True, ndim=None, min_ndim=2)
    bound = _check_bound(W, bound, None)
    net = copy.deepcopy(model).double().eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i:i + batch_size].to(next(net.parameters()).device)).double()
        z = net(xb)
        if i == 0:  # the model's number of classes, against the labels and the bound
            k = V.logits(W, z, len(xb))
            V.classes(W, y_range, k)
            if bound.dim() == 2 and bound.shape[0] != k:
                raise ValueError(f"{W}: bound must be a ({k}, {k}) pairwise matrix for the "
                                 f"model's {k} outputs, got shape {tuple(bound.shape)}")
        out.append(_certified_radius(z, y[i:i + batch_size].to(xb.device),
                                     bound.to(xb.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------- repro.models
# These rules mirror the forward() of repro's models; tests/test_lipschitz.py checks them
# against secant quotients of the real modules, so a changed forward shows up as a failure.
from repro.models.heads import HypersphereHead  # noqa: E402
from repro.models.norms import DualBatchNorm2d, Normalize  # noqa: E402
from repro.models.preact_resnet import PreActBlock, PreActResNet  # noqa: E402
from repro.models.small_cnn import SmallCNN  # noqa: E402
from repro.models.wide_resnet import WideBasicBlock, WideResNet  # noqa: E402


@register_bound(Normalize)
def _normalize_rule(m, shape, name):
    return Scale(name, m, lambda mod, dt: 1.0 / mod.std.to(dt).abs().min(), "Normalize"), shape


@register_bound(DualBatchNorm2d)
def _dual_bn_rule(m, shape, name):
    # The route active when the bound is evaluated ("main" at inference).
    return Scale(name, m, lambda mod, dt: _bn_fn(mod.active, dt), "BatchNorm"), shape


@register_bound(HypersphereHead)
def _hypersphere_rule(m, shape, name):
    raise UnsupportedLayerError(
        f"{name}: the hypersphere head normalises features, f/||f|| has Lipschitz constant "
        "1/||f|| (unbounded near 0), so no global Lipschitz bound (and no LMT certificate) "
        "applies; use head='linear'")


@register_bound(PreActBlock, WideBasicBlock)
def _preact_block_rule(m, shape, name):
    # out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + skip, with skip = x (identity) or
    # shortcut(relu(bn1(x))) (projection): L = L_bn1·(L_c1·L_bn2·L_c2 + L_sc) or ... + 1.
    bn1, _ = _child(m, "bn1", shape, name)
    conv1, mid = _child(m, "conv1", shape, name)
    bn2, _ = _child(m, "bn2", mid, name)
    conv2, out = _child(m, "conv2", mid, name)
    if m.projects:
        shortcut, _ = _child(m, "shortcut", shape, name)
        return Chain([bn1, Sum([Chain([conv1, bn2, conv2]), shortcut])]), out
    return residual(Chain([bn1, conv1, bn2, conv2]), None, name), out


def _flatten_shape(shape: Shape) -> Shape:
    return (math.prod(shape),)


@register_bound(SmallCNN)
def _small_cnn_rule(m, shape, name):
    body, shape = _sequence([(getattr(m, a), _join(name, a)) for a in
                             ("normalize", "conv1", "bn1", "conv2", "bn2")], shape)
    fc1, shape = _child(m, "fc1", _flatten_shape(shape), name)
    head, shape = _child(m, "head", shape, name)
    return Chain([body, fc1, head]), shape


def _resnet_rule(stages: Sequence[str]) -> Rule:
    def rule(m, shape, name):
        body, shape = _sequence([(getattr(m, a), _join(name, a)) for a in
                                 ("normalize", "conv1", *stages, "bn")], shape)
        pool = nn.AdaptiveAvgPool2d(1)
        gap = Const(_join(name, "avgpool"), linear_pool_norm(pool, shape), "AdaptiveAvgPool2d")
        head, shape = _child(m, "head", _flatten_shape(_out_shape(pool, shape)), name)
        return Chain([body, gap, head]), shape
    return rule


register_bound(PreActResNet)(_resnet_rule(("layer1", "layer2", "layer3", "layer4")))
register_bound(WideResNet)(_resnet_rule(("block1", "block2", "block3")))
