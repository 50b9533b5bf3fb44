"""The notebook's printed values (chapter 4.2-4.4) come out of the library."""

import numpy as np
import pytest

from distnum.functions import (
    cross_entropy_error,
    mean_squared_error,
    sigmoid,
    softmax,
    softmax_cross_entropy,
)
from distnum.gradient import gradient_descent, numerical_diff, numerical_gradient
from distnum.models import SimpleNet

T = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
Y1 = np.array([0.1, 0.05, 0.6, 0.0, 0.05, 0.1, 0.0, 0.1, 0.0, 0.0])
Y2 = np.array([0.1, 0.05, 0.1, 0.0, 0.05, 0.1, 0.0, 0.6, 0.0, 0.0])


def f1(x):
    return 0.01 * x**2 + 0.1 * x


def f2(x):
    return np.sum(x**2)


def test_mean_squared_error():
    assert mean_squared_error(Y1, T) == pytest.approx(0.0975, abs=1e-15)
    assert mean_squared_error(Y2, T) == pytest.approx(0.5975, abs=1e-15)


def test_cross_entropy_error_one_sample():
    assert cross_entropy_error(Y1, T) == pytest.approx(0.510825457099, abs=1e-9)
    assert cross_entropy_error(Y2, T) == pytest.approx(2.30258409299, abs=1e-9)
    assert cross_entropy_error(Y1, 2) == cross_entropy_error(Y1, T)


def test_cross_entropy_error_batch_one_hot_and_indices():
    y = np.stack([Y1, Y2])
    expected = (cross_entropy_error(Y1, T) + cross_entropy_error(Y2, T)) / 2
    assert cross_entropy_error(y, np.stack([T, T])) == pytest.approx(expected, rel=1e-15)
    assert cross_entropy_error(y, np.array([2, 2])) == pytest.approx(expected, rel=1e-15)


def test_softmax_is_stable_and_batched():
    big = np.array([1010.0, 1000.0, 990.0])
    p = softmax(big)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)
    batch = softmax(np.stack([big, big - 1000]))
    np.testing.assert_allclose(batch[0], batch[1], rtol=1e-15)
    assert sigmoid(np.array([-1000.0]))[0] == 0.0


def test_softmax_cross_entropy_from_logits_does_not_overflow():
    logits = np.array([[1000.0, 0.0, -1000.0]])
    assert softmax_cross_entropy(logits, np.array([0])) == 0.0
    assert softmax_cross_entropy(logits, np.array([2])) == 2000.0


def test_numerical_diff_printed_values():
    assert numerical_diff(f1, 5) == 0.1999999999990898
    assert numerical_diff(f1, 10) == 0.2999999999986347


def test_partial_derivatives_printed_values():
    assert numerical_diff(lambda x0: x0**2 + 4.0**2, 3.0) == 6.00000000000378
    assert numerical_diff(lambda x1: 3.0**2 + x1**2, 4.0) == 7.999999999999119


@pytest.mark.parametrize(
    "point, expected", [((3.0, 4.0), (6, 8)), ((0.0, 2.0), (0, 4)), ((3.0, 0.0), (6, 0))]
)
def test_numerical_gradient_of_sum_of_squares(point, expected):
    x = np.array(point)
    np.testing.assert_allclose(numerical_gradient(f2, x), expected, atol=1e-7)
    assert tuple(x) == point, "numerical_gradient must leave its input as it found it"


def test_numerical_gradient_any_shape_and_restores():
    x = np.arange(12.0).reshape(3, 4) / 7
    before = x.copy()
    grad = numerical_gradient(f2, x)
    assert grad.shape == (3, 4)
    np.testing.assert_allclose(grad, 2 * before, atol=1e-7)
    assert np.array_equal(x, before)


def test_numerical_gradient_rejects_bad_input():
    with pytest.raises(ValueError, match="float array"):
        numerical_gradient(f2, np.array([3, 4]))
    for bad_h in (0.0, -1e-4, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"must be finite, > 0 and <= 1"):
            numerical_gradient(f2, np.array([3.0, 4.0]), h=bad_h)


def test_gradient_descent_printed_values():
    init_x = np.array([-3.0, 4.0])
    np.testing.assert_allclose(gradient_descent(f2, init_x, lr=0.1, step_num=100), 0, atol=1e-9)
    too_large = gradient_descent(f2, init_x, lr=10.0, step_num=100)
    assert [f"{v:.8e}" for v in too_large] == ["-2.58983747e+13", "-1.29524862e+12"]
    too_small = gradient_descent(f2, init_x, lr=1e-10, step_num=100)
    assert [f"{v:.8f}" for v in too_small] == ["-2.99999994", "3.99999992"]
    assert tuple(init_x) == (-3.0, 4.0)


def test_simple_net_printed_values():
    W = np.array([[-0.53572577, 0.65692054, 0.1165997], [-0.37309075, -1.30970997, -0.51098734]])
    net = SimpleNet(W)
    x, t = np.array([0.6, 0.9]), np.array([0, 0, 1])
    p = net.predict(x)
    np.testing.assert_allclose(p, [-0.65721714, -0.78458665, -0.38992879], atol=1e-6)
    assert np.argmax(p) == 2
    assert net.loss(x, t) == pytest.approx(0.891736898302, abs=1e-6)
    dW = numerical_gradient(lambda _: net.loss(x, t), net.W)
    expected = [[0.18827514, 0.165759, -0.35403414], [0.28241271, 0.24863849, -0.53105121]]
    np.testing.assert_allclose(dW, expected, atol=1e-6)
