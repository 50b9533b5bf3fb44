"""TwoLayerNet: one flat parameter vector with named views; numerical vs backprop gradient."""

import numpy as np
import pytest

from distnum.functions import softmax
from distnum.models import TwoLayerNet


def max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_params_are_views_of_one_flat_float64_vector():
    net = TwoLayerNet(784, 50, 10, seed=0)
    assert net.flat_params.dtype == np.float64 and net.flat_params.shape == (39760,)
    shapes = {name: net.params[name].shape for name in net.layout.names}
    assert shapes == {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    for name in net.layout.names:
        assert np.shares_memory(net.params[name], net.flat_params)
    net.params["W1"][3, 7] = 42.0  # a write through a view lands in the vector ...
    assert net.flat_params[3 * 50 + 7] == 42.0
    net.flat_params[39760 - 1] = -1.0  # ... and a write to the vector shows in the view
    assert net.params["b2"][9] == -1.0
    net.params["b1"] -= 0.5  # the book's update loop keeps them in sync too
    assert np.all(net.flat_params[39200:39250] == -0.5)
    net.params["W2"] = np.ones((50, 10))
    assert np.shares_memory(net.params["W2"], net.flat_params)
    assert np.all(net.flat_params[39250:39750] == 1.0)


def test_initialisation_is_seeded_and_scaled():
    a, b = TwoLayerNet(784, 50, 10, seed=3), TwoLayerNet(784, 50, 10, seed=3)
    assert np.array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, TwoLayerNet(784, 50, 10, seed=4).flat_params)
    assert a.params["W1"].std() == pytest.approx(0.01, rel=0.02)
    assert np.all(a.params["b1"] == 0) and np.all(a.params["b2"] == 0)


def test_loss_accepts_one_hot_or_indices_and_matches_the_book():
    rng = np.random.default_rng(1)
    net = TwoLayerNet(784, 50, 10, weight_init_std=0.5, seed=1)
    x, t = rng.random((20, 784)), rng.integers(0, 10, 20)
    one_hot = np.eye(10)[t]
    assert net.loss(x, t) == net.loss(x, one_hot)
    y = net.predict(x)
    np.testing.assert_allclose(y.sum(axis=1), 1.0)
    book = -np.mean(np.log(y[np.arange(20), t]))
    assert net.loss(x, t) == pytest.approx(book, rel=1e-12)
    assert net.accuracy(x, t) == net.accuracy(x, one_hot) == np.mean(y.argmax(1) == t)


def test_loss_is_stable_for_huge_logits():
    net = TwoLayerNet(4, 3, 2, seed=0)
    net.params["W2"] = np.array([[1e4, -1e4]] * 3)
    x = np.ones((1, 4))
    assert net.loss(x, np.array([0])) == pytest.approx(0.0, abs=1e-300)
    assert np.isfinite(net.loss(x, np.array([1])))
    assert np.all(np.isfinite(softmax(net.predict(x))))


def test_small_net_numerical_gradient_matches_backprop():
    rng = np.random.default_rng(5)
    net = TwoLayerNet(20, 6, 4, weight_init_std=0.5, seed=5)
    x, t = rng.random((8, 20)), rng.integers(0, 4, 8)
    before = net.flat_params.copy()
    numerical, analytic = net.numerical_gradient(x, t), net.gradient(x, t)
    assert np.array_equal(net.flat_params, before)
    for name in net.layout.names:
        assert numerical[name].shape == net.params[name].shape
        assert max_relative_error(numerical[name], analytic[name]) < 1e-7


def test_mnist_numerical_gradient_matches_backprop(mnist_batch):
    x, t = mnist_batch
    net = TwoLayerNet(784, 50, 10, seed=0)
    numerical, analytic = net.numerical_gradient(x, t), net.gradient(x, t)
    for name in net.layout.names:
        assert max_relative_error(numerical[name], analytic[name]) <= 1e-6, name
