"""Every public entry point validates its arguments before any work (repro.validate), and the
gradient-masking report covers Carlini et al. 2019's checklist and AutoAttack's checks.py.

One parametrized case per validated (function, argument): the bad value raises, and the
message names the function, the argument and the accepted range. A few good values still
run. Then each check added to ``evaluate.sanity_report`` is shown to fail on a model (or,
for the purely numeric verdicts, on measured numbers) that should fail it, and to pass on a
plain CNN. Real MNIST throughout; tiny models (width 4), so the file runs in seconds.
"""
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repro import attacks as A
from repro import data, models
from repro import evaluate as E
from repro import lipschitz as L
from repro import sanity as S
from repro import validate as V

N = 8


@pytest.fixture(scope="module")
def c(mnist):
    """Everything the bad-argument cases need: an untrained tiny CNN (validation happens
    before any forward that matters), real MNIST images as float and uint8, labels."""
    torch.manual_seed(0)
    m = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4).eval()
    conv = nn.Conv2d(1, 2, 3, padding=1)
    node, _ = L.plan(conv, (1, 6, 6), "conv")
    return types.SimpleNamespace(
        m=m, ds=mnist, xu=mnist.x_test[:N], x=data.to_float(mnist.x_test[:N]),
        y=mnist.y_test[:N], conv=conv, node=node,
        logits=torch.randn(N, 10), L=1.0)


def _attack(c, **kw):
    return A.pgd(c.m, c.x, c.y, **{"eps": 0.1, "alpha": 0.05, "steps": 1, **kw})


BAD = [
    # ---------------------------------------------------------------- attacks
    ("pgd-eps-negative", lambda c: _attack(c, eps=-0.1), ValueError,
     r"attacks\.pgd: eps must be a finite number >= 0, got -0\.1"),
    ("pgd-eps-nan", lambda c: _attack(c, eps=math.nan), ValueError,
     r"attacks\.pgd: eps must be a finite number >= 0, got nan"),
    ("pgd-eps-int-tensor", lambda c: _attack(c, eps=torch.tensor([1, 2])), TypeError,
     r"attacks\.pgd: eps must be a finite number >= 0 or a float tensor"),
    ("pgd-eps-radii-negative", lambda c: _attack(c, eps=-torch.ones(8, 1, 1, 1)), ValueError,
     r"attacks\.pgd: eps must be finite radii >= 0, got values in \[-1, -1\]"),
    ("pgd-eps-radii-shape", lambda c: _attack(c, eps=torch.ones(8, 2)), ValueError,
     r"attacks\.pgd: eps must be a number or per-example radii"),
    ("pgd-alpha", lambda c: _attack(c, alpha=-1), ValueError,
     r"attacks\.pgd: alpha must be a finite number >= 0"),
    ("pgd-steps-negative", lambda c: _attack(c, steps=-1), ValueError,
     r"attacks\.pgd: steps must be an integer >= 0, got -1"),
    ("pgd-steps-float", lambda c: _attack(c, steps=2.5), TypeError,
     r"attacks\.pgd: steps must be an integer >= 0, got 2\.5 \(float\)"),
    ("pgd-restarts", lambda c: _attack(c, restarts=0), ValueError,
     r"attacks\.pgd: restarts must be an integer >= 1, got 0"),
    ("pgd-norm", lambda c: _attack(c, norm="l1"), ValueError,
     r"attacks\.pgd: norm must be one of 'linf', 'l2' \(any case\), got 'l1'"),
    ("pgd-loss", lambda c: _attack(c, loss="xent"), ValueError,
     r"attacks\.pgd: loss must be one of 'ce', 'cw', 'kl' or a callable"),
    ("pgd-loss-type", lambda c: _attack(c, loss=3), TypeError,
     r"attacks\.pgd: loss must be one of 'ce', 'cw', 'kl' or a callable"),
    ("pgd-loss-kl-without-random-start",
     lambda c: _attack(c, loss="kl", random_start=False), ValueError,
     r"attacks\.pgd: loss='kl' needs random_start=True"),
    ("pgd-random_start", lambda c: _attack(c, random_start="yes"), TypeError,
     r"attacks\.pgd: random_start must be True or False"),
    ("pgd-targeted", lambda c: _attack(c, targeted=1), TypeError,
     r"attacks\.pgd: targeted must be True or False, got 1 \(int\)"),
    ("pgd-generator", lambda c: _attack(c, generator=0), TypeError,
     r"attacks\.pgd: generator must be None or a torch\.Generator"),
    ("pgd-model", lambda c: A.pgd(lambda x: x, c.x, c.y, eps=0.1, alpha=0.1, steps=1),
     TypeError, r"attacks\.pgd: model must be a torch\.nn\.Module"),
    ("pgd-x-uint8", lambda c: A.pgd(c.m, c.xu, c.y, eps=0.1, alpha=0.1, steps=1), ValueError,
     r"attacks\.pgd: x must be float pixels in \[0, 1\] \(convert uint8 images"),
    ("pgd-x-normalised", lambda c: A.pgd(c.m, c.x - 0.5, c.y, eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: x must be un-normalised float pixels in \[0, 1\]"),
    ("pgd-x-rank", lambda c: A.pgd(c.m, c.x.flatten(), c.y, eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: x must be a batch \(N, \.\.\.\) with at least 2 dimensions"),
    ("pgd-y-dtype", lambda c: A.pgd(c.m, c.x, c.y.int(), eps=0.1, alpha=0.1, steps=1),
     TypeError, r"attacks\.pgd: y must be int64 class indices"),
    ("pgd-y-length", lambda c: A.pgd(c.m, c.x, c.y[:3], eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: y must have one label per image of x \(length 8\), got "
                 r"length 3"),
    ("pgd-y-rank", lambda c: A.pgd(c.m, c.x, c.y[:, None], eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: y must be a 1-D tensor"),
    ("pgd-y-too-large", lambda c: A.pgd(c.m, c.x, c.y + 10, eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: y must hold class indices in \[0, 10\) \(the model has 10 "
                 r"outputs\), got labels in"),
    ("pgd-y-negative", lambda c: A.pgd(c.m, c.x, c.y - 10, eps=0.1, alpha=0.1, steps=1),
     ValueError, r"attacks\.pgd: y must hold class indices >= 0"),
    ("fgsm-eps", lambda c: A.fgsm(c.m, c.x, c.y, eps=-1), ValueError,
     r"attacks\.fgsm: eps must be a finite number >= 0"),
    ("fgsm-alpha", lambda c: A.fgsm(c.m, c.x, c.y, eps=0.1, alpha=math.inf), ValueError,
     r"attacks\.fgsm: alpha must be a finite number >= 0, got inf"),
    ("fgsm-loss", lambda c: A.fgsm(c.m, c.x, c.y, eps=0.1, loss="dlr"), ValueError,
     r"attacks\.fgsm: loss must be one of"),
    ("fgsm-rs-random_start", lambda c: A.fgsm(c.m, c.x, c.y, eps=0.1, random_start=None),
     TypeError, r"attacks\.fgsm: random_start must be True or False"),
    ("fgsm-y", lambda c: A.fgsm(c.m, c.x, c.y + 10, eps=0.1), ValueError,
     r"attacks\.fgsm: y must hold class indices in \[0, 10\)"),
    ("cw_l2-steps", lambda c: A.cw_l2(c.m, c.x, c.y, steps=0), ValueError,
     r"attacks\.cw_l2: steps must be an integer >= 1"),
    ("cw_l2-binary_search_steps", lambda c: A.cw_l2(c.m, c.x, c.y, binary_search_steps=0),
     ValueError, r"attacks\.cw_l2: binary_search_steps must be an integer >= 1"),
    ("cw_l2-lr", lambda c: A.cw_l2(c.m, c.x, c.y, lr=0), ValueError,
     r"attacks\.cw_l2: lr must be a finite number > 0, got 0"),
    ("cw_l2-confidence", lambda c: A.cw_l2(c.m, c.x, c.y, confidence=-1), ValueError,
     r"attacks\.cw_l2: confidence must be a finite number >= 0"),
    ("cw_l2-initial_const", lambda c: A.cw_l2(c.m, c.x, c.y, initial_const=-0.1), ValueError,
     r"attacks\.cw_l2: initial_const must be a finite number > 0"),
    ("cw_l2-y", lambda c: A.cw_l2(c.m, c.x, c.y + 10, steps=1, binary_search_steps=1),
     ValueError, r"attacks\.cw_l2: y must hold class indices in \[0, 10\)"),
    ("deepfool_l2-steps", lambda c: A.deepfool_l2(c.m, c.x, c.y, steps=0), ValueError,
     r"attacks\.deepfool_l2: steps must be an integer >= 1"),
    ("deepfool_l2-overshoot", lambda c: A.deepfool_l2(c.m, c.x, c.y, overshoot=-0.02),
     ValueError, r"attacks\.deepfool_l2: overshoot must be a finite number >= 0"),
    ("deepfool_l2-candidates", lambda c: A.deepfool_l2(c.m, c.x, c.y, candidates=1),
     ValueError, r"attacks\.deepfool_l2: candidates must be an integer >= 2"),
    ("deepfool_l2-y", lambda c: A.deepfool_l2(c.m, c.x, c.y + 10), ValueError,
     r"attacks\.deepfool_l2: y must hold class indices in \[0, 10\)"),
    ("project-eps", lambda c: A.project(c.x, c.x, -1, "linf"), ValueError,
     r"attacks\.project: eps must be a finite number >= 0"),
    ("project-norm", lambda c: A.project(c.x, c.x, 0.1, "l0"), ValueError,
     r"attacks\.project: norm must be one of 'linf', 'l2'"),
    ("project-shape", lambda c: A.project(c.x[:2], c.x, 0.1, "linf"), ValueError,
     r"attacks\.project: x_adv must have the shape of x"),
    ("margin-y", lambda c: A.margin(c.logits, c.y[:2]), ValueError,
     r"attacks\.margin: y must be int64 class indices of shape \(8,\)"),
    ("margin-logits", lambda c: A.margin(c.logits[0], c.y), ValueError,
     r"attacks\.margin: logits must be a 2-D tensor \(N, C\), got shape \(10,\)"),
    ("float32-device", lambda c: A.float32("tpu").__enter__(), ValueError,
     r"attacks\.float32: device must be 'cpu', 'cuda', 'cuda:N', 'mps' or a torch\.device"),
    ("eval_mode-model", lambda c: A.eval_mode("net").__enter__(), TypeError,
     r"attacks\.eval_mode: model must be a torch\.nn\.Module"),
    # ---------------------------------------------------------------- evaluate
    ("predict-batch_size", lambda c: E.predict(c.m, c.xu, batch_size=0), ValueError,
     r"evaluate\.predict: batch_size must be an integer >= 1, got 0"),
    ("predict-device", lambda c: E.predict(c.m, c.xu, device="gpu"), ValueError,
     r"evaluate\.predict: device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    ("predict-x", lambda c: E.predict(c.m, c.x * 255), ValueError,
     r"evaluate\.predict: x must be un-normalised float pixels in \[0, 1\]"),
    ("robust_eval-attacks-type", lambda c: E.robust_eval(c.m, c.xu, c.y, "pgd"), TypeError,
     r"evaluate\.robust_eval: attacks must be a mapping name -> attack or a list"),
    ("robust_eval-attacks-callable", lambda c: E.robust_eval(c.m, c.xu, c.y, {"a": 1}),
     TypeError, r"evaluate\.robust_eval: attacks\['a'\] must be a callable attack"),
    ("robust_eval-attacks-name", lambda c: E.robust_eval(c.m, c.xu, c.y, {1: A.fgsm}),
     TypeError, r"evaluate\.robust_eval: attacks must map string names"),
    ("robust_eval-threat-norm", lambda c: E.robust_eval(c.m, c.xu, c.y, {}, threat=("l1", 1)),
     ValueError, r"evaluate\.robust_eval: threat\[0\] \(norm\) must be one of 'linf', 'l2'"),
    ("robust_eval-threat-eps", lambda c: E.robust_eval(c.m, c.xu, c.y, {},
                                                       threat=("linf", -1)),
     ValueError, r"evaluate\.robust_eval: threat\[1\] \(eps\) must be a finite number >= 0"),
    ("robust_eval-threat-shape", lambda c: E.robust_eval(c.m, c.xu, c.y, {}, threat=0.1),
     TypeError, r"evaluate\.robust_eval: threat must be None or a pair \(norm, eps\)"),
    ("robust_eval-batch_size", lambda c: E.robust_eval(c.m, c.xu, c.y, {}, batch_size=-1),
     ValueError, r"evaluate\.robust_eval: batch_size must be an integer >= 1"),
    ("robust_eval-progress", lambda c: E.robust_eval(c.m, c.xu, c.y, {}, progress="no"),
     TypeError, r"evaluate\.robust_eval: progress must be True or False"),
    ("robust_eval-y-range", lambda c: E.robust_eval(c.m, c.xu, c.y + 10, {}), ValueError,
     r"evaluate\.robust_eval: y must hold class indices in \[0, 10\) \(the model has 10"),
    ("robust_eval-y-dtype", lambda c: E.robust_eval(c.m, c.xu, c.y.float(), {}), TypeError,
     r"evaluate\.robust_eval: y must be int64 class indices"),
    ("robust_eval-device", lambda c: E.robust_eval(c.m, c.xu, c.y, {}, device=0), TypeError,
     r"evaluate\.robust_eval: device must be 'auto', 'cpu'"),
    ("autoattack-eps", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0), ValueError,
     r"evaluate\.autoattack: eps must be a finite number > 0, got 0"),
    ("autoattack-norm", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, norm="L1"), ValueError,
     r"evaluate\.autoattack: norm must be one of 'linf', 'l2' \(any case\), got 'L1'"),
    ("autoattack-version", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, version="rand"),
     ValueError, r"evaluate\.autoattack: version must be one of 'standard', 'fast', got "
                 r"'rand'"),
    ("autoattack-batch_size", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, batch_size=0),
     ValueError, r"evaluate\.autoattack: batch_size must be an integer >= 1"),
    ("autoattack-seed", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, seed=-1), ValueError,
     r"evaluate\.autoattack: seed must be an integer >= 0"),
    ("autoattack-n_iter", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, n_iter=0),
     ValueError, r"evaluate\.autoattack: n_iter must be an integer >= 1 or None"),
    ("autoattack-n_target_classes",
     lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, n_target_classes=10), ValueError,
     r"evaluate\.autoattack: n_target_classes must be an integer in \[1, 9\], got 10"),
    ("autoattack-square_queries",
     lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, square_queries=0), ValueError,
     r"evaluate\.autoattack: square_queries must be an integer >= 1 or None"),
    ("autoattack-verbose", lambda c: E.autoattack(c.m, c.xu, c.y, eps=0.1, verbose="yes"),
     TypeError, r"evaluate\.autoattack: verbose must be True or False"),
    ("autoattack-x-rank", lambda c: E.autoattack(c.m, c.xu[:, 0], c.y, eps=0.1), ValueError,
     r"evaluate\.autoattack: x must be a batch of images of shape \(N, C, H, W\)"),
    ("autoattack-y-range", lambda c: E.autoattack(c.m, c.xu, c.y + 10, eps=0.1), ValueError,
     r"evaluate\.autoattack: y must hold class indices in \[0, 10\)"),
    ("zero_gradient_fraction-batch_size",
     lambda c: E.zero_gradient_fraction(c.m, c.xu, c.y, batch_size=0), ValueError,
     r"evaluate\.zero_gradient_fraction: batch_size must be an integer >= 1"),
    ("zero_gradient_fraction-y", lambda c: E.zero_gradient_fraction(c.m, c.xu, c.y[:2]),
     ValueError, r"evaluate\.zero_gradient_fraction: y must have one label per image"),
    ("sanity_report-eps", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=-0.1), ValueError,
     r"evaluate\.sanity_report: eps must be a finite number > 0"),
    ("sanity_report-norm", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, norm="l0"),
     ValueError, r"evaluate\.sanity_report: norm must be one of 'linf', 'l2'"),
    ("sanity_report-steps", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, steps=0),
     ValueError, r"evaluate\.sanity_report: steps must be an integer >= 1"),
    ("sanity_report-loss", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, loss="dlr"),
     ValueError, r"evaluate\.sanity_report: loss must be one of 'ce', 'cw', 'kl'"),
    ("sanity_report-large_eps",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, large_eps=0.05), ValueError,
     r"evaluate\.sanity_report: large_eps must be >= eps \(0\.1\) or None, got 0\.05"),
    ("sanity_report-aa_version",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, aa_version="plus"), ValueError,
     r"evaluate\.sanity_report: aa_version must be one of 'standard', 'fast'"),
    ("sanity_report-aa_n_iter", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1,
                                                          aa_n_iter=0),
     ValueError, r"evaluate\.sanity_report: aa_n_iter must be an integer >= 1 or None"),
    ("sanity_report-square_queries",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, square_queries=0), ValueError,
     r"evaluate\.sanity_report: square_queries must be an integer >= 1"),
    ("sanity_report-tol", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, tol=2),
     ValueError, r"evaluate\.sanity_report: tol must be a finite number in \[0, 1\], got 2"),
    ("sanity_report-gap_tol", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1,
                                                        gap_tol=-0.01),
     ValueError, r"evaluate\.sanity_report: gap_tol must be a finite number in \[0, 1\]"),
    ("sanity_report-batch_size", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1,
                                                           batch_size=0),
     ValueError, r"evaluate\.sanity_report: batch_size must be an integer >= 1"),
    ("sanity_report-seed", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, seed=1.5),
     TypeError, r"evaluate\.sanity_report: seed must be an integer >= 0"),
    ("sanity_report-restarts", lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, restarts=1),
     ValueError, r"evaluate\.sanity_report: restarts must be an integer >= 2, got 1"),
    ("sanity_report-eps_factors",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, eps_factors=(0.5, 0)), ValueError,
     r"evaluate\.sanity_report: eps_factors\[1\] must be a finite number > 0, got 0"),
    ("sanity_report-eps_factors-type",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, eps_factors=2.0), TypeError,
     r"evaluate\.sanity_report: eps_factors must be a sequence"),
    ("sanity_report-noise_samples",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, noise_samples=0), ValueError,
     r"evaluate\.sanity_report: noise_samples must be an integer >= 1"),
    ("sanity_report-random_passes",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, random_passes=1), ValueError,
     r"evaluate\.sanity_report: random_passes must be an integer >= 2"),
    ("sanity_report-surrogate",
     lambda c: E.sanity_report(c.m, c.xu, c.y, eps=0.1, surrogate="resnet"), TypeError,
     r"evaluate\.sanity_report: surrogate must be a torch\.nn\.Module"),
    ("sanity_report-x", lambda c: E.sanity_report(c.m, c.x[:, 0], c.y, eps=0.1), ValueError,
     r"evaluate\.sanity_report: x must be a batch of images of shape \(N, C, H, W\)"),
    ("sanity_report-y", lambda c: E.sanity_report(c.m, c.xu, c.y + 10, eps=0.1), ValueError,
     r"evaluate\.sanity_report: y must hold class indices in \[0, 10\)"),
    ("check_randomized-passes", lambda c: E.check_randomized(c.m, c.xu, c.y, passes=1),
     ValueError, r"evaluate\.check_randomized: passes must be an integer >= 2"),
    ("check_randomized-alpha", lambda c: E.check_randomized(c.m, c.xu, c.y, alpha=-1),
     ValueError, r"evaluate\.check_randomized: alpha must be a finite number >= 0"),
    ("check_softmax_output-alpha", lambda c: E.check_softmax_output(c.m, c.xu, alpha=-1),
     ValueError, r"evaluate\.check_softmax_output: alpha must be a finite number >= 0"),
    ("check_dynamic-batch_size", lambda c: E.check_dynamic(c.m, c.xu, batch_size=0),
     ValueError, r"evaluate\.check_dynamic: batch_size must be an integer >= 1"),
    # ---------------------------------------------------------------- lipschitz
    ("plan-in_shape", lambda c: L.plan(c.conv, (1, 0, 6)), ValueError,
     r"lipschitz\.plan: in_shape must be a sequence of one or more positive integers"),
    ("plan-module", lambda c: L.plan("conv", (1, 6, 6)), TypeError,
     r"lipschitz\.plan: module must be a torch\.nn\.Module"),
    ("power_iteration-max_iters", lambda c: L.power_iteration(c.node, max_iters=-1),
     ValueError, r"lipschitz\.power_iteration: max_iters must be an integer >= 0, got -1"),
    ("power_iteration-tol", lambda c: L.power_iteration(c.node, tol=-1e-3), ValueError,
     r"lipschitz\.power_iteration: tol must be a finite number >= 0"),
    ("power_iteration-dtype", lambda c: L.power_iteration(c.node, dtype="float16"),
     ValueError, r"lipschitz\.power_iteration: dtype must be one of float32, float64"),
    ("power_iteration-u", lambda c: L.power_iteration(c.node, u=torch.ones(5)), ValueError,
     r"lipschitz\.power_iteration: u must have 36 entries"),
    ("power_iteration-node", lambda c: L.power_iteration(c.conv), TypeError,
     r"lipschitz\.power_iteration: node must be a repro\.lipschitz\.LinearMap"),
    ("conv2d_operator_norm-input_shape",
     lambda c: L.conv2d_operator_norm(c.conv, (3, 6, 6)), ValueError,
     r"lipschitz\.conv2d_operator_norm: input_shape must start with conv\.in_channels = 1"),
    ("conv2d_operator_norm-input_shape-rank",
     lambda c: L.conv2d_operator_norm(c.conv, (6, 6)), ValueError,
     r"lipschitz\.conv2d_operator_norm: input_shape must be a sequence of 3 positive "
     r"integers \(C, H, W\)"),
    ("conv2d_operator_norm-iters", lambda c: L.conv2d_operator_norm(c.conv, (1, 6, 6),
                                                                    iters=0),
     ValueError, r"lipschitz\.conv2d_operator_norm: iters must be an integer >= 1"),
    ("conv2d_operator_norm-dtype",
     lambda c: L.conv2d_operator_norm(c.conv, (1, 6, 6), dtype=torch.int32), ValueError,
     r"lipschitz\.conv2d_operator_norm: dtype must be one of float32, float64"),
    ("conv2d_operator_norm-conv", lambda c: L.conv2d_operator_norm(nn.Linear(2, 2), (1, 6, 6)),
     TypeError, r"lipschitz\.conv2d_operator_norm: conv must be a torch\.nn\.Conv2d"),
    ("conv2d_norm_upper-in_shape", lambda c: L.conv2d_norm_upper(c.conv, (1, -6, 6)),
     ValueError, r"lipschitz\.conv2d_norm_upper: in_shape must be a sequence of 3 positive"),
    ("conv2d_norm_upper-weight",
     lambda c: L.conv2d_norm_upper(c.conv, (1, 6, 6), weight=torch.ones(2, 1, 5, 5)),
     ValueError, r"lipschitz\.conv2d_norm_upper: weight must have conv\.weight's shape"),
    ("operator_norm_bounds-dense_limit",
     lambda c: L.operator_norm_bounds(c.node, dense_limit=-1), ValueError,
     r"lipschitz\.operator_norm_bounds: dense_limit must be an integer >= 0"),
    ("network_bound-input_shape", lambda c: L.network_bound(c.m, (1, 28, 0)), ValueError,
     r"lipschitz\.network_bound: input_shape must be a sequence of one or more positive"),
    ("network_bound-max_iters", lambda c: L.network_bound(c.m, (1, 28, 28), max_iters=-5),
     ValueError, r"lipschitz\.network_bound: max_iters must be an integer >= 0"),
    ("network_bound-tol", lambda c: L.network_bound(c.m, (1, 28, 28), tol=math.nan),
     ValueError, r"lipschitz\.network_bound: tol must be a finite number >= 0"),
    ("LipschitzEstimator-power_steps",
     lambda c: L.LipschitzEstimator(c.m, (1, 28, 28), power_steps=0), ValueError,
     r"lipschitz\.LipschitzEstimator: power_steps must be an integer >= 1"),
    ("LipschitzEstimator-linear_steps",
     lambda c: L.LipschitzEstimator(c.m, (1, 28, 28), linear_steps=0), ValueError,
     r"lipschitz\.LipschitzEstimator: linear_steps must be an integer >= 1 or None"),
    ("LipschitzEstimator-block", lambda c: L.LipschitzEstimator(c.m, (1, 28, 28), block=0),
     ValueError, r"lipschitz\.LipschitzEstimator: block must be an integer >= 1"),
    ("LipschitzEstimator-input_shape", lambda c: L.LipschitzEstimator(c.m, "1x28x28"),
     TypeError, r"lipschitz\.LipschitzEstimator: input_shape must be a sequence"),
    ("lmt_logits-c", lambda c: L.lmt_logits(c.logits, c.y, -1.0, torch.tensor(1.0)),
     ValueError, r"lipschitz\.lmt_logits: c must be a finite number >= 0"),
    ("lmt_logits-form", lambda c: L.lmt_logits(c.logits, c.y, 0.1, torch.tensor(1.0),
                                               form="paper"),
     ValueError, r"lipschitz\.lmt_logits: form must be one of 'official', 'full'"),
    ("lmt_logits-bound", lambda c: L.lmt_logits(c.logits, c.y, 0.1, torch.ones(3, 3)),
     ValueError, r"lipschitz\.lmt_logits: bound must be a scalar Lipschitz constant or a "
                 r"\(10, 10\) pairwise matrix"),
    ("lmt_logits-y", lambda c: L.lmt_logits(c.logits, c.y[:3], 0.1, torch.tensor(1.0)),
     ValueError, r"lipschitz\.lmt_logits: y must be int64 class indices of shape \(8,\)"),
    ("LMTMarginLoss-c", lambda c: L.LMTMarginLoss(-0.5), ValueError,
     r"lipschitz\.LMTMarginLoss: c must be a finite number >= 0"),
    ("lmt_c-warmup_epochs", lambda c: L.lmt_c(0, 0.1, -1), ValueError,
     r"lipschitz\.lmt_c: warmup_epochs must be a finite number >= 0"),
    ("lmt_c-c", lambda c: L.lmt_c(0, math.inf, 5), ValueError,
     r"lipschitz\.lmt_c: c must be a finite number >= 0, got inf"),
    ("lmt_c-c-zero-ramp", lambda c: L.lmt_c(0, 0.0, 5), ValueError,
     r"lipschitz\.lmt_c: c must be > 0 for a geometric warm-up"),
    ("lmt_c-start", lambda c: L.lmt_c(0, 0.1, 5, start=0.0), ValueError,
     r"lipschitz\.lmt_c: start must be a finite number > 0 or None"),
    ("certified_radius-bound-zero", lambda c: L.certified_radius(c.logits, c.y, 0.0),
     ValueError, r"lipschitz\.certified_radius: bound \(the Lipschitz constant\) must be a "
                 r"finite number > 0, got 0\.0"),
    ("certified_radius-bound-inf", lambda c: L.certified_radius(c.logits, c.y,
                                                                torch.tensor(math.inf)),
     ValueError, r"lipschitz\.certified_radius: bound \(the Lipschitz constant\) must be a "
                 r"finite number > 0, got inf"),
    ("certified_radius-bound-pairwise-negative",
     lambda c: L.certified_radius(c.logits, c.y, -torch.ones(10, 10)), ValueError,
     r"lipschitz\.certified_radius: bound \(the pairwise matrix\) must hold finite values "
     r">= 0"),
    ("certified_radius-bound-shape", lambda c: L.certified_radius(c.logits, c.y,
                                                                  torch.ones(3, 3)),
     ValueError, r"lipschitz\.certified_radius: bound must be a Lipschitz constant .* or a "
                 r"\(10, 10\) pairwise matrix, got shape \(3, 3\)"),
    ("certified_radius-logits", lambda c: L.certified_radius(c.logits[0], c.y, 1.0),
     ValueError, r"lipschitz\.certified_radius: logits must be a float tensor \(N, K\)"),
    ("certified_radius-y", lambda c: L.certified_radius(c.logits, c.y + 10, 1.0), ValueError,
     r"lipschitz\.certified_radius: y must hold class indices in \[0, 10\)"),
    ("certified_accuracy-radii", lambda c: L.certified_accuracy(torch.zeros(4), [0.0, -0.5]),
     ValueError, r"lipschitz\.certified_accuracy: radii\[1\] must be a finite number >= 0"),
    ("certified_accuracy-radius", lambda c: L.certified_accuracy(torch.zeros(4, 1), [0.0]),
     ValueError, r"lipschitz\.certified_accuracy: radius must be a 1-D tensor"),
    ("certify-bound", lambda c: L.certify(c.m, c.xu, c.y, -2.0), ValueError,
     r"lipschitz\.certify: bound \(the Lipschitz constant\) must be a finite number > 0"),
    ("certify-bound-shape", lambda c: L.certify(c.m, c.xu, c.y, torch.ones(4, 4)),
     ValueError, r"lipschitz\.certify: bound must be a \(10, 10\) pairwise matrix"),
    ("certify-batch_size", lambda c: L.certify(c.m, c.xu, c.y, 1.0, batch_size=0),
     ValueError, r"lipschitz\.certify: batch_size must be an integer >= 1"),
    ("certify-y", lambda c: L.certify(c.m, c.xu, c.y + 10, 1.0), ValueError,
     r"lipschitz\.certify: y must hold class indices in \[0, 10\)"),
    ("linear_norm-linear", lambda c: L.linear_norm(c.conv), TypeError,
     r"lipschitz\.linear_norm: linear must be a torch\.nn\.Linear"),
    ("batchnorm_bound-bn", lambda c: L.batchnorm_bound(c.conv), TypeError,
     r"lipschitz\.batchnorm_bound: bn must be a torch\.nn\._BatchNorm"),
    ("maxpool_bound-pool", lambda c: L.maxpool_bound(nn.AvgPool2d(2), (1, 4, 4)), TypeError,
     r"lipschitz\.maxpool_bound: pool must be a torch\.nn\.MaxPool2d"),
    ("linear_pool_norm-dense_limit",
     lambda c: L.linear_pool_norm(nn.AvgPool2d(2), (1, 4, 4), dense_limit=-1), ValueError,
     r"lipschitz\.linear_pool_norm: dense_limit must be an integer >= 0"),
    ("pooling_bound-in_shape", lambda c: L.pooling_bound(nn.MaxPool2d(2), (4, 4)), ValueError,
     r"lipschitz\.pooling_bound: in_shape must be a sequence of 3 positive integers"),
    ("register_bound-classes", lambda c: L.register_bound("Conv2d"), TypeError,
     r"lipschitz\.register_bound: classes\[0\] must be a class"),
    # ---------------------------------------------------------------- data
    ("load-name", lambda c: data.load("svhn"), ValueError,
     r"data\.load: name must be one of 'mnist', 'cifar10', 'cifar100', got 'svhn'"),
    ("load-val_size-negative", lambda c: data.load("mnist", val_size=-1), ValueError,
     r"data\.load: val_size must be an integer >= 0 or None, got -1"),
    ("load-val_size-too-large", lambda c: data.load("mnist", val_size=60_000), ValueError,
     r"data\.load: val_size must be in \[0, 60000\) \(mnist has 60000 training images\)"),
    ("load-download", lambda c: data.load("mnist", download="yes"), TypeError,
     r"data\.load: download must be True or False"),
    ("load-seed", lambda c: data.load("mnist", seed=0.5), TypeError,
     r"data\.load: seed must be an integer"),
    ("load-root", lambda c: data.load("mnist", root=3), TypeError,
     r"data\.load: root must be None, a str or an os\.PathLike"),
    ("data_root-root", lambda c: data.data_root(3), TypeError,
     r"data\.data_root: root must be None, a str or an os\.PathLike"),
    ("prepare_offline-names", lambda c: data.prepare_offline(None, ["svhn"]), ValueError,
     r"data\.prepare_offline: names\[0\] must be one of 'mnist', 'cifar10', 'cifar100'"),
    ("limit-n_train-negative", lambda c: c.ds.limit(n_train=-1), ValueError,
     r"data\.Dataset\.limit: n_train must be an integer in \[0, \d+\] or None, got -1"),
    ("limit-n_test-too-many", lambda c: c.ds.limit(n_test=10_001), ValueError,
     r"data\.Dataset\.limit: n_test must be an integer in \[0, 10000\] or None, got 10001"),
    ("limit-n_val-float", lambda c: c.ds.limit(n_val=0.5), TypeError,
     r"data\.Dataset\.limit: n_val must be an integer"),
    ("Dataset.to-device", lambda c: c.ds.to("gpu"), ValueError,
     r"data\.Dataset\.to: device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a "
     r"torch\.device, got 'gpu'"),
    ("to_float-x", lambda c: data.to_float(c.y), ValueError,
     r"data\.to_float: x must be uint8 or float images, got dtype torch\.int64"),
    ("augment-pad", lambda c: data.augment(c.xu, pad=-1), ValueError,
     r"data\.augment: pad must be an integer >= 0, got -1"),
    ("augment-flip", lambda c: data.augment(c.xu, flip="no"), TypeError,
     r"data\.augment: flip must be True or False"),
    ("augment-x", lambda c: data.augment(c.xu[0]), ValueError,
     r"data\.augment: x must be a batch of uint8 or float images \(N, C, H, W\)"),
    ("augment-generator", lambda c: data.augment(c.xu, generator=1), TypeError,
     r"data\.augment: generator must be None or a torch\.Generator on the CPU"),
    ("batch_generator-epoch", lambda c: data.batch_generator(0, -1), ValueError,
     r"data\.batch_generator: epoch must be an integer >= 0"),
    ("batch_generator-step", lambda c: data.batch_generator(0, 0, -2), ValueError,
     r"data\.batch_generator: step must be an integer >= 0"),
    ("epoch_order-n", lambda c: data.epoch_order(-5, 0, 0), ValueError,
     r"data\.epoch_order: n must be an integer >= 0"),
    ("train_batches-batch_size",
     lambda c: data.train_batches(c.xu, c.y, 0, seed=0, epoch=0), ValueError,
     r"data\.train_batches: batch_size must be an integer >= 1, got 0"),
    ("train_batches-epoch", lambda c: data.train_batches(c.xu, c.y, 4, seed=0, epoch=-1),
     ValueError, r"data\.train_batches: epoch must be an integer >= 0"),
    ("train_batches-start_step",
     lambda c: data.train_batches(c.xu, c.y, 4, seed=0, epoch=0, start_step=-1), ValueError,
     r"data\.train_batches: start_step must be an integer >= 0"),
    ("train_batches-y", lambda c: data.train_batches(c.xu, c.y[:3], 4, seed=0, epoch=0),
     ValueError, r"data\.train_batches: y must be int64 labels of shape \(8,\)"),
    ("train_batches-device", lambda c: data.train_batches(c.xu, c.y, 4, seed=0, epoch=0,
                                                          device="cuda:x"),
     ValueError, r"data\.train_batches: device must be 'auto', 'cpu', 'cuda', 'cuda:N'"),
    ("steps_per_epoch-batch_size", lambda c: data.steps_per_epoch(100, 0), ValueError,
     r"data\.steps_per_epoch: batch_size must be an integer >= 1"),
    ("eval_batches-batch_size", lambda c: data.eval_batches(c.xu, c.y, 0), ValueError,
     r"data\.eval_batches: batch_size must be an integer >= 1"),
    ("eval_batches-x", lambda c: data.eval_batches(c.y, c.y, 4), ValueError,
     r"data\.eval_batches: x must be uint8 or float images"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_argument_is_refused_with_its_name_and_range(c, call, exc, match):
    with pytest.raises(exc, match=match):
        call(c)


def test_refusals_come_before_any_work(c):
    """A bad argument is caught before the model runs: a model that counts its forwards
    sees none (the label range is fetched together with the pixel range)."""
    class Counting(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.calls = m, 0

        def forward(self, x):
            self.calls += 1
            return self.m(x)
    m = Counting(c.m)
    for call in (lambda: A.pgd(m, c.x, c.y, eps=0.1, alpha=0.1, steps=3, restarts=0),
                 lambda: E.robust_eval(m, c.xu, c.y, {}, batch_size=0),
                 lambda: E.autoattack(m, c.xu, c.y, eps=0.1, version="x"),
                 lambda: E.sanity_report(m, c.xu, c.y, eps=0.1, tol=-1),
                 lambda: L.certify(m, c.xu, c.y, 0.0)):
        with pytest.raises((ValueError, TypeError)):
            call()
    assert m.calls == 0


def test_devices_named_by_strings():
    assert V.device("f", "device", "cpu") == torch.device("cpu")
    assert V.device("f", "device", torch.device("cpu")) == torch.device("cpu")
    assert V.device("f", "device", None) is None
    assert V.device("f", "device", "auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match=r"f: device must be 'auto', 'cpu', 'cuda', 'cuda:N', "
                                         r"'mps' or a torch\.device or None, got 'cuda0'"):
        V.device("f", "device", "cuda0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"f: device='cuda' but CUDA is not available"):
            V.device("f", "device", "cuda")
    else:
        with pytest.raises(ValueError, match=r"f: device='cuda:99' but this machine has"):
            V.device("f", "device", "cuda:99")
    assert V.dtype("f", "dtype", "torch.float64", (torch.float64,)) == torch.float64
    assert V.dtype("f", "dtype", "float32", (torch.float32,)) == torch.float32


def test_good_values_still_run(c):
    x, y = c.x, c.y
    # any case for norms, NumPy scalars for radii, None for fgsm's alpha
    adv = A.pgd(c.m, x, y, eps=np.float32(1.5), alpha=0.5, steps=np.int64(2), norm="L2")
    assert adv.shape == x.shape and ((adv - x).flatten(1).norm(dim=1) <= 1.5 + 1e-5).all()
    assert A.fgsm(c.m, x, y, eps=0.1, alpha=None, random_start=True,
                  generator=torch.Generator().manual_seed(0)).shape == x.shape
    assert A.pgd(c.m, x, y, eps=0.0, alpha=0.0, steps=0).equal(x)  # the edges of the ranges
    # per-example radii (LMT's certified radii attacked point by point), a 0-dim tensor
    radii = torch.linspace(0, 0.2, len(y)).view(-1, 1, 1, 1)
    adv = A.pgd(c.m, x, y, eps=radii, alpha=radii / 4, steps=2)
    assert ((adv - x).flatten(1).abs().amax(1) <= radii.flatten() + 1e-6).all()
    assert A.pgd(c.m, x, y, eps=torch.tensor(0.1), alpha=0.05, steps=1).shape == x.shape
    assert len(E.predict(c.m, c.xu, batch_size=3, device="cpu")) == N
    r = E.robust_eval(c.m, c.xu, y, [lambda m, xb, yb: xb], progress=False, device="cpu",
                      threat=("Linf", 0.1))
    assert r.n == N
    assert 0 <= E.zero_gradient_fraction(c.m, c.xu, y, batch_size=5) <= 1
    # lipschitz: dtypes by name, shapes as lists, a 0-dim tensor bound
    sigma = L.conv2d_operator_norm(c.conv, [1, 6, 6], iters=50, dtype="float64")
    assert sigma == L.conv2d_operator_norm(c.conv, (1, 6, 6), iters=50, dtype=torch.float64)
    assert L.power_iteration(c.node, max_iters=0, dtype="float32")[2] == 0
    radius = L.certified_radius(c.logits, y, torch.tensor(2.0))
    assert radius.shape == (N,)
    assert L.certified_accuracy(radius, np.array([0.0, 0.5])) == \
        L.certified_accuracy(radius, [0.0, 0.5])
    assert L.lmt_c(0, 0.0, 0) == 0.0 and L.lmt_c(1, 0.1, 2, start=0.001) > 0.001
    # data: limits up to what a split holds, empty splits, devices by name
    small = c.ds.limit(n_train=len(c.ds.y_train), n_val=0, n_test=np.int64(5))
    assert len(small.y_val) == 0 and len(small.y_test) == 5
    assert small.to("cpu").x_test.device.type == "cpu"
    batches = list(data.train_batches(c.xu, y, 4, seed=0, epoch=0, device="cpu"))
    assert len(batches) == 2 and batches[0][0].dtype == torch.float32
    assert len(list(data.eval_batches(c.xu, y, 3))) == 3 and data.steps_per_epoch(10, 3) == 3


def test_cifar10_entry_points_accept_three_channels(cifar10):
    """The same checks hold on 3-channel images: CIFAR-10 uint8 batches through augment,
    the conv operator norm of a 3-channel layer, and a limit within the split."""
    small = cifar10.limit(n_train=16, n_val=0, n_test=8)
    assert data.augment(small.x_train, generator=data.batch_generator(0, 0)).shape == \
        small.x_train.shape
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert L.conv2d_operator_norm(conv, (3, 8, 8), iters=20) > 0
    with pytest.raises(ValueError, match=r"input_shape must start with conv\.in_channels = 3"):
        L.conv2d_operator_norm(conv, (1, 8, 8))
    m = models.build("small_cnn", 10, mean_std=cifar10.mean_std, width=4, in_size=32)
    with pytest.raises(ValueError, match=r"evaluate\.predict: x must be un-normalised"):
        E.predict(m, data.to_float(small.x_test) * 255)
    assert len(E.predict(m, small.x_test)) == 8


# ----------------------------------------------------------------------------- sanity checks

class RandomizedDefence(nn.Module):
    """Dropout on the input that stays active in eval mode: a randomized defence."""

    def __init__(self, m, p=0.3):
        super().__init__()
        self.m, self.p = m, p

    def forward(self, x):
        return self.m(F.dropout(x, self.p, training=True))


class DynamicDefence(nn.Module):
    """One signed-gradient 'purification' step inside forward: a dynamic defence."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.m(z).logsumexp(1).sum(), z)
        return self.m((x - 0.01 * g.sign()).clamp(0, 1))


class Quantize(nn.Module):
    """Input quantisation without a straight-through gradient: a masked gradient."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class FirstLogits(nn.Module):
    def __init__(self, m, k):
        super().__init__()
        self.m, self.k = m, k

    def forward(self, x):
        return self.m(x)[:, :self.k]


@pytest.fixture(scope="module")
def trained(mnist):
    """A small CNN (width 4) trained for one pass over 6,400 MNIST digits (~90% accuracy,
    a few seconds at one thread)."""
    torch.manual_seed(0)
    m = models.build("small_cnn", 10, mean_std=mnist.mean_std, width=4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for xb, yb in data.train_batches(mnist.x_train[:6400], mnist.y_train[:6400], 64, seed=0,
                                     epoch=0, augment_images=False):
        loss = F.cross_entropy(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def xy64(mnist):
    return mnist.x_test[:64], mnist.y_test[:64]


FAST = dict(aa_n_iter=5, square_queries=20, noise_samples=20)
OLD = ("large_eps", "more_steps", "autoattack_not_above_pgd", "pgd_close_to_autoattack",
       "blackbox_not_better", "zero_gradients")
NEW = ("randomized_defence", "softmax_output", "dynamic_defence", "n_classes",
       "single_step_not_better", "steps_converged", "restarts_converged", "eps_monotone",
       "random_noise_not_better")


def test_model_checks_pass_on_a_plain_cnn(trained, xy64):
    x, y = xy64
    for check in (E.check_randomized(trained, x, y), E.check_softmax_output(trained, x),
                  E.check_dynamic(trained, x)):
        assert check.passed, str(check)
    assert E.check_randomized(trained, x, y).observed["correct_per_pass"] == [
        int((E.predict(trained, x) == y).sum())] * 5


def test_randomized_defence_is_flagged(trained, xy64):
    x, y = xy64
    check = E.check_randomized(RandomizedDefence(trained), x, y)
    assert not check.passed and check.name == "randomized_defence"
    assert check.observed["max_output_change"] > 1e-2 and "EOT" in check.message
    # an nn.Dropout module is not randomized: eval mode switches it off
    assert E.check_randomized(nn.Sequential(nn.Dropout(0.5), trained), x, y).passed


def test_softmax_output_is_flagged(trained, xy64):
    x, _ = xy64
    check = E.check_softmax_output(nn.Sequential(trained, nn.Softmax(1)), x)
    assert not check.passed and check.observed["max_row_sum_error"] < 1e-5
    assert "probabilities" in check.message
    assert E.check_softmax_output(nn.Sequential(trained, nn.LogSoftmax(1)), x).passed


def test_dynamic_defence_is_flagged(trained, xy64):
    x, _ = xy64
    check = E.check_dynamic(DynamicDefence(trained), x)
    assert not check.passed and check.observed["autograd_calls"] >= 1
    assert "grad" in check.observed["functions"]


def test_report_keeps_old_checks_and_adds_the_checklist(trained, xy64):
    x, y = xy64
    rep = E.sanity_report(trained, x, y, eps=0.1, steps=5, **FAST)
    names = [c.name for c in rep.checks]
    assert names[:6] == list(OLD) and names[6:] == list(NEW)  # old ones first, same order
    for name in OLD[:2] + ("zero_gradients",) + NEW[:5] + ("eps_monotone",
                                                          "random_noise_not_better"):
        assert rep[name].passed, str(rep[name])
    assert {"pgd-5", "pgd-50", "pgd-large-eps", "square", "white-box worst", "pgd-10",
            "pgd-5x2-restarts", "single-step", "pgd-0.5xeps", "pgd-2xeps",
            "random-noise"} <= set(rep.accuracy)
    assert rep.settings["steps"] == [5, 50] and rep.settings["not_run"] == {
        "transfer_not_better": "needs a surrogate model (surrogate=...)"}
    assert rep["eps_monotone"].observed["eps"] == [0.0, 0.05, 0.1, 0.2, 1.0]
    json.dumps(rep.to_dict())
    with pytest.raises(KeyError, match="no check 'nope'"):
        rep["nope"]


def test_report_flags_a_randomized_defence(trained, xy64):
    x, y = xy64
    rep = E.sanity_report(RandomizedDefence(trained, p=0.5), x[:16], y[:16], eps=0.1,
                          steps=2, **FAST)
    assert not rep["randomized_defence"].passed and not rep.passed


def test_steps_converged_flags_too_few_steps(trained, xy64):
    """One PGD step is not converged on a standard CNN: two steps are clearly stronger."""
    x, y = xy64
    rep = E.sanity_report(trained, x, y, eps=0.15, steps=1, **FAST)
    check = rep["steps_converged"]
    assert not check.passed and check.observed["drop"] > rep.settings["tol"]


def test_random_noise_and_transfer_beat_a_masked_model(trained, xy64):
    """Quantised inputs (no gradient at all): random noise and PGD transferred from the
    unmasked model fool examples the white-box attacks cannot."""
    x, y = xy64
    masked = nn.Sequential(Quantize(), trained)
    rep = E.sanity_report(masked, x, y, eps=0.2, steps=2, surrogate=trained,
                          **{**FAST, "noise_samples": 50})
    assert not rep["random_noise_not_better"].passed
    assert rep["random_noise_not_better"].observed["only_noise_fools"] > 0.1
    assert not rep["transfer_not_better"].passed
    assert rep["transfer_not_better"].observed["only_transfer_fools"] > 0.1
    assert "transfer" in rep.accuracy and rep.settings["not_run"] == {}
    assert not rep["zero_gradients"].passed  # and the original check still sees it


def test_n_classes_flags_a_three_class_model(trained, mnist):
    keep = mnist.y_test < 3
    x, y = mnist.x_test[keep][:16], mnist.y_test[keep][:16]
    rep = E.sanity_report(FirstLogits(trained, 3), x, y, eps=0.1, steps=2, **FAST)
    check = rep["n_classes"]
    assert not check.passed and check.observed["classes"] == 3
    assert "apgd-t" in check.observed["dropped"]


@pytest.mark.parametrize("check,bad,good", [
    (lambda a, b: S._single_step_check(a, b, 0.01), (0.30, 0.40), (0.40, 0.30)),
    (lambda a, b: S._steps_check(10, a, 20, b, 0.01), (0.50, 0.45), (0.50, 0.495)),
    (lambda a, b: S._restarts_check(10, 3, "r", a, b, 0.01), (0.50, 0.45), (0.50, 0.50)),
    (lambda a, b: S._eps_monotone_check([(0.0, 0.9), (0.1, a), (0.2, b)], 0.01),
     (0.3, 0.5), (0.5, 0.3)),
], ids=["single_step_not_better", "steps_converged", "restarts_converged", "eps_monotone"])
def test_numeric_verdicts_can_fail(check, bad, good):
    """The pass/fail rules of the attack-based checks, on measured accuracies: iterative
    PGD weaker than one step, accuracy still dropping when the steps or the restarts
    double, and accuracy rising with a larger eps are flagged."""
    assert not check(*bad).passed
    assert check(*good).passed


def test_eps_monotone_ignores_equal_budgets():
    """Two attacks at the same eps (e.g. eps_factors reaching large_eps) are not a rise."""
    assert S._eps_monotone_check([(0.0, 0.9), (1.0, 0.0), (1.0, 0.3)], 0.01).passed
