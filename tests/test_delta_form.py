"""The delta form: expm1 and log1p as distnum evaluates them, each unit's exact change, and the
fast engine against the truth, every nudged loss evaluated to 50 digits (mpmath)."""

from __future__ import annotations

import mpmath
import numba
import numpy as np
import pytest

from distnum.engines import FastEngine, FullEngine
from distnum.engines.deltas import relu_change, sigmoid_change, sigmoid_change_by
from distnum.engines.unnudged import exact_near_kinks
from distnum.gradcheck import exact_central_differences, train_with_backprop
from distnum.models import MultiLayerNet, TwoLayerNet, batch_loss, checked_batch, forward
from distnum.vecmath import (
    DEGREE,
    EXPM1_SERIES_MAX,
    HALF_ULP,
    JIT,
    LOG1P_SERIES_MAX,
    SERIES_MAX,
    expm1_array,
    expm1_remainder,
    log1p_array,
    log1p_remainder,
)

EPS = np.finfo(float).eps


def ulps(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference) / np.spacing(np.abs(reference))))


def exact(function, values) -> np.ndarray:
    with mpmath.workdps(50):
        return np.array([float(function(mpmath.mpf(float(v)))) for v in values])


# --- expm1 and log1p ----------------------------------------------------------------------


def test_expm1_and_log1p_are_within_a_few_ulps_everywhere():
    """Their series (an ulp or so, where the engines take them) and Kahan's forms beyond
    (exp's and log's own 2 ulps, and a rounding or two more), against numpy's."""
    rng = np.random.default_rng(0)
    series = np.concatenate([rng.uniform(-SERIES_MAX, SERIES_MAX, 200_000),
                             np.geomspace(1e-300, SERIES_MAX, 20_000),
                             -np.geomspace(1e-300, SERIES_MAX, 20_000)])  # fmt: skip
    beyond = np.concatenate([rng.uniform(-40.0, 700.0, 200_000),
                             np.geomspace(SERIES_MAX, 1.0, 20_000),
                             -np.geomspace(SERIES_MAX, 0.999, 20_000)])  # fmt: skip
    for x, within in ((series, 2.0), (beyond, 4.0)):
        assert ulps(expm1_array(x), np.expm1(x)) <= within
        y = x[x > -1.0]
        assert ulps(log1p_array(y), np.log1p(y)) <= within
    both_sides = np.array([-SERIES_MAX, SERIES_MAX, np.nextafter(SERIES_MAX, 1.0)])
    assert ulps(expm1_array(both_sides), exact(mpmath.expm1, both_sides)) <= 1.0
    assert ulps(log1p_array(both_sides), exact(mpmath.log1p, both_sides)) <= 1.0


def test_expm1_and_log1p_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 800.0, -800.0])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(expm1_array(x), np.expm1(x))
    y = np.array([0.0, -0.0, np.inf, np.nan, -1.0, -2.0, 1e308])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(log1p_array(y), np.log1p(y))


def test_the_series_domains_keep_the_remainder_below_half_an_ulp():
    """The bound the domains are chosen by, checked against the true remainder at the edge:
    |f(x) - series(x)| / |f(x)| below 2**-54 for |x| <= the domain's edge, in 50 digits."""
    for function, terms, edge, bound in (
        (mpmath.expm1, lambda k: mpmath.mpf(1) / mpmath.factorial(k), EXPM1_SERIES_MAX,
         expm1_remainder),
        (mpmath.log1p, lambda k: mpmath.mpf(-1) ** (k + 1) / k, LOG1P_SERIES_MAX,
         log1p_remainder),
    ):  # fmt: skip
        assert bound(DEGREE, edge) * (1 + edge) <= HALF_ULP < bound(DEGREE, 2 * edge)
        with mpmath.workdps(50):
            for x in (mpmath.mpf(edge), mpmath.mpf(-edge)):
                series = mpmath.fsum(terms(k) * x**k for k in range(1, DEGREE + 1))
                assert abs(function(x) - series) / abs(function(x)) < HALF_ULP
    assert SERIES_MAX == min(EXPM1_SERIES_MAX, LOG1P_SERIES_MAX)


# --- a unit's change ------------------------------------------------------------------------


@numba.njit(**JIT)
def sigmoid_changes(a, d):
    """sigma(a + d) - sigma(a) as the engines compute it: sigmoid_change where |d| <= 1,
    sigmoid_change_by for any move."""
    out = np.empty((2, a.size))
    for k in range(a.size):
        s = 1.0 / (1.0 + np.exp(-a[k]))
        r = 1.0 / (1.0 + np.exp(a[k]))
        out[0, k] = sigmoid_change(s * r, r, np.expm1(-d[k]))
        out[1, k] = sigmoid_change_by(a[k], s, s * r, r, d[k])
    return out


def test_a_sigmoid_units_change_is_exact_to_a_few_ulps_of_itself():
    rng = np.random.default_rng(1)
    a = rng.uniform(-30.0, 30.0, 400)
    small = rng.choice([-1.0, 1.0], 400) * np.geomspace(1e-12, 1.0, 400)
    large = rng.uniform(-60.0, 60.0, 400)
    with mpmath.workdps(50):

        def truth(a_k, d_k):
            a_k, d_k = mpmath.mpf(float(a_k)), mpmath.mpf(float(d_k))
            return float(1 / (1 + mpmath.exp(-(a_k + d_k))) - 1 / (1 + mpmath.exp(-a_k)))

        for moves, rows in ((small, (0, 1)), (large, (1,))):
            computed = sigmoid_changes(a, moves)
            reference = np.array([truth(x, d) for x, d in zip(a, moves, strict=True)])
            for row in rows:  # the difference of the two values would be off by 1e-16 / d
                assert ulps(computed[row], reference) <= 8.0, row


@numba.njit(**JIT)
def relu_changes(a, d):
    out = np.empty(a.size)
    for k in range(a.size):
        out[k] = relu_change(a[k], d[k])
    return out


def test_a_relu_units_change_by_its_cases():
    a = np.array([1.0, 1.0, 1e-20, 0.0, -1.0, -1.0, -3e-5, 0.5])
    d = np.array([1e-4, -2.0, -1e-4, 1e-4, 1e-4, 2.0, 1e-4, -0.5])
    expected = np.array([1e-4, -1.0, -1e-20, 1e-4, 0.0, 1.0, -3e-5 + 1e-4, -0.5])
    np.testing.assert_array_equal(relu_changes(a, d), expected)


def test_first_layer_pre_activations_a_nudge_may_carry_across_the_kink_are_exact(mnist):
    """exact_near_kinks: each a_1 within the reach of a nudge of W1 or b1 (h max|x|) is
    recomputed to within an ulp of x W1 + b1 evaluated to 50 digits; the others keep the
    forward pass's bits."""
    (x_train, _), _ = mnist
    net = MultiLayerNet(784, [100, 100], 10, "relu", "relu", seed=0)
    params = net.layout.views(net.flat_params)
    x = x_train[np.random.default_rng(2016).choice(len(x_train), 10)]
    a = forward(net.layout, params, x).pre[0]
    h = 1e-4
    out = exact_near_kinks(a, x, params["W1"], params["b1"], h)
    reach = h * np.maximum(1.0, np.abs(x).max(axis=1))[:, None]
    near = np.abs(a) <= reach
    assert near.sum() >= 1, "the batch has a unit within a nudge of its kink"
    moved = out != a
    assert not (moved & ~near & (np.abs(a) > 2 * reach)).any()  # far ones keep their bits
    W1, b1 = params["W1"], params["b1"]
    with mpmath.workdps(50):
        for n, j in zip(*np.nonzero(near | moved), strict=True):
            terms = zip(x[n], W1[:, j], strict=True)
            exact_a = float(mpmath.fsum(mpmath.mpf(float(v)) * float(w) for v, w in terms) + b1[j])
            assert abs(out[n, j] - exact_a) <= np.spacing(abs(exact_a))
            assert abs(out[n, j] - exact_a) <= abs(a[n, j] - exact_a)  # never farther


# --- the fast engine against the truth ----------------------------------------------------

NETS = {
    "784-50-10 sigmoid": lambda: TwoLayerNet(784, 50, 10, seed=0),
    "784-100-100-10 relu, decay 0.1": lambda: MultiLayerNet(
        784, [100, 100], 10, "relu", "relu", 0.1, seed=0
    ),  # fmt: skip
    "784-30-20-10 sigmoid": lambda: MultiLayerNet(
        784, [30, 20], 10, "sigmoid", "sigmoid", seed=0
    ),  # fmt: skip
}
SAMPLE = 200  # coordinates of each array, or all of a smaller one


@pytest.fixture(scope="module", params=[(name, state) for name in NETS
                                        for state in ("initial", "trained")],
                ids=lambda p: f"{p[0]}, {p[1]}")  # fmt: skip
def net_and_batch(request, mnist):
    """A net at its initial weights or after 300 backprop steps, and 10 real images."""
    (x_train, t_train), _ = mnist
    name, state = request.param
    net = NETS[name]()
    if state == "trained":
        train_with_backprop(net, x_train, t_train, 300, np.random.default_rng(7))
    rows = np.random.default_rng(2016).choice(len(x_train), 10)
    return net, *checked_batch(net.layout, x_train[rows], t_train[rows])


def sampled(layout, rng) -> np.ndarray:
    return np.concatenate([rng.choice(np.arange(part.start, part.stop),
                                      min(SAMPLE, part.stop - part.start), replace=False)
                           for part in layout.slices.values()])  # fmt: skip


@pytest.mark.parametrize("h", [1e-2, 1e-4, 1e-6])
def test_fast_is_within_1e_15_of_the_50_digit_truth_and_near_the_literal(net_and_batch, h):
    net, x, labels = net_and_batch
    layout = net.layout
    indices = sampled(layout, np.random.default_rng(3))
    fast = FastEngine(layout, np.arange(layout.size))(net.flat_params, x, labels, h)[indices]
    full = FullEngine(layout, indices)(net.flat_params, x, labels, h)
    if h == 1e-4 or layout.describe() == "784-50-10 sigmoid":  # (the others' truth takes long)
        truth, kink = exact_central_differences(layout, net.flat_params, x, labels, h, indices)
        assert np.max(np.abs(fast - truth)[~kink]) <= 1e-15
        # across a ReLU kink above the first hidden layer the nudged loss depends on a
        # pre-activation of rounded inputs, known to about 1e-16: off by up to that over 2h
        # and the batch size (the first layer's the fast engine recomputes exact)
        assert np.max(np.abs(fast - truth)[kink], initial=0.0) <= 1e-16 * 30 / (2 * h * len(x))
        # the literal algorithm subtracts two losses L(theta +- h e_k) that agree in all but
        # their last digits: off by about eps L / h
        literal_error = 4 * EPS * batch_loss(layout, layout.views(net.flat_params), x, labels) / h
        assert np.max(np.abs(full - truth)[~kink]) <= literal_error
    assert np.max(np.abs(fast - full)) <= max(1e-9, 8 * EPS * 30 / h)  # L < 30 here
