"""MultiLayerNet (chapter 6): the book's network, and the fast engine at any depth against
the literal algorithm and against backprop."""

import numpy as np
import pytest

from distnum.engines import FastEngine, FullEngine
from distnum.gradcheck import near_kinks
from distnum.models import MultiLayerNet, ParamLayout, TwoLayerNet, forward
from distnum.sharding import make_shards, unit_major_order

H = 1e-4
NETS = [  # (hidden sizes, activation, weight decay)
    ((7, 6), "sigmoid", 0.0),
    ((7, 6), "relu", 0.0),
    ((7, 6, 5), "sigmoid", 0.1),
    ((7, 6, 5), "relu", 0.0),
    ((7, 6, 5), "relu", 0.3),
]


def small_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """12 inputs of 12 values, a third of them zero and some repeated in a row, as pixels."""
    rng = np.random.default_rng(seed)
    x = rng.choice([0.0, 0.0, 1.0, 0.5], size=(12, 12)) * rng.uniform(0.2, 1.0, (12, 12)).round(1)
    return x, rng.integers(0, 4, 12)


def book_loss(net: MultiLayerNet, x: np.ndarray, t: np.ndarray) -> float:
    """The book's MultiLayerNet.loss, written with numpy: affine and activation layers,
    softmax with cross-entropy, plus 0.5 * lambda * sum(W ** 2) per layer."""
    layout, z = net.layout, x
    for layer in range(1, layout.depth + 1):
        a = z @ net.params[f"W{layer}"] + net.params[f"b{layer}"]
        z = np.maximum(a, 0) if layout.activation == "relu" else 1 / (1 + np.exp(-a))
    shifted = a - a.max(axis=1, keepdims=True)
    y = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    data = -np.mean(np.log(y[np.arange(len(t)), t]))
    decay = sum(0.5 * layout.weight_decay * np.sum(net.params[f"W{k}"] ** 2)
                for k in range(1, layout.depth + 1))  # fmt: skip
    return data + decay


def test_params_are_views_named_layer_by_layer():
    net = MultiLayerNet(784, [100, 100], 10, seed=0)
    layout = net.layout
    assert layout.names == ("W1", "b1", "W2", "b2", "W3", "b3")
    assert layout.size == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10 == 89610
    assert net.flat_params.dtype == np.float64 and net.flat_params.shape == (89610,)
    for name in layout.names:
        assert np.shares_memory(net.params[name], net.flat_params)
    net.params["W2"][3, 4] = 7.0
    assert net.flat_params[layout.slices["W2"].start + 3 * 100 + 4] == 7.0
    assert layout.describe() == "784-100-100-10 relu"


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        ("relu", np.sqrt(2 / 784)),
        ("he", np.sqrt(2 / 784)),
        ("sigmoid", np.sqrt(1 / 784)),
        (0.05, 0.05),
    ],
)
def test_weights_start_at_the_books_scales(init, expected):
    net = MultiLayerNet(784, [300, 200], 10, weight_init_std=init, seed=3)
    assert net.params["W1"].std() == pytest.approx(expected, rel=0.02)
    if isinstance(init, str):  # He and Xavier scale each layer by its own fan-in
        scale = np.sqrt((2.0 if init in ("relu", "he") else 1.0) / 300)
        assert net.params["W2"].std() == pytest.approx(scale, rel=0.03)
    assert all(np.all(net.params[f"b{k}"] == 0) for k in (1, 2, 3))
    assert np.array_equal(net.flat_params,
                          MultiLayerNet(784, [300, 200], 10, weight_init_std=init,
                                        seed=3).flat_params)  # fmt: skip


def test_hidden_sizes_as_a_number_or_a_sequence():
    assert MultiLayerNet(784, 50, 10).layout == MultiLayerNet(784, (50,), 10).layout
    assert MultiLayerNet(784, np.array([30, 20]), 10).layout.hidden_sizes == (30, 20)
    assert MultiLayerNet(784, [30, 20], 10, weight_init_std="He", seed=1).params["W1"].std() == (
        pytest.approx(np.sqrt(2 / 784), rel=0.05)
    )


def test_two_layer_net_is_the_one_hidden_layer_sigmoid_case():
    two = TwoLayerNet(20, 6, 4, weight_init_std=0.5, seed=5)
    multi = MultiLayerNet(20, [6], 4, activation="sigmoid", weight_init_std=0.5, seed=5)
    assert two.layout == multi.layout and np.array_equal(two.flat_params, multi.flat_params)
    x, t = small_batch()
    x = np.hstack([x, x[:, :8]])
    assert two.loss(x, t) == multi.loss(x, t)


@pytest.mark.parametrize(("hidden", "activation", "decay"), NETS)
def test_loss_and_accuracy_match_the_book(hidden, activation, decay):
    net = MultiLayerNet(12, hidden, 4, activation, weight_init_std=0.8,
                        weight_decay_lambda=decay, seed=1)  # fmt: skip
    x, t = small_batch(1)
    assert net.loss(x, t) == pytest.approx(book_loss(net, x, t), rel=1e-12)
    assert net.loss(x, t) == net.loss(x, np.eye(4)[t])
    assert net.accuracy(x, t) == np.mean(net.predict(x).argmax(axis=1) == t)


@pytest.mark.parametrize(("hidden", "activation", "decay"), NETS)
def test_fast_engine_equals_the_literal_algorithm_on_every_coordinate(hidden, activation, decay):
    net = MultiLayerNet(12, hidden, 4, activation, weight_init_std=0.8,
                        weight_decay_lambda=decay, seed=2)  # fmt: skip
    x, t = small_batch(2)
    everything = np.arange(net.layout.size)
    before = net.flat_params.copy()
    fast = FastEngine(net.layout, everything)(net.flat_params, x, t, H)
    full = FullEngine(net.layout, everything)(net.flat_params, x, t, H)
    assert np.array_equal(net.flat_params, before)
    assert np.max(np.abs(fast - full)) <= 1e-9
    assert np.max(np.abs(full)) > 1e-3  # a gradient that is not all zeros


@pytest.mark.parametrize(("hidden", "activation", "decay"), NETS)
def test_numerical_gradients_match_backprop(hidden, activation, decay):
    net = MultiLayerNet(12, hidden, 4, activation, weight_init_std=0.8,
                        weight_decay_lambda=decay, seed=3)  # fmt: skip
    x, t = small_batch(3)
    # ReLU's kink: a central difference across it is no derivative; none lies this close
    pre = forward(net.layout, net.params, x).pre[:-1]
    assert min(np.min(np.abs(a)) for a in pre) > 1e-3
    analytic = net.layout.flatten(net.gradient(x, t))
    for engine in ("fast", "full"):
        numerical = net.layout.flatten(net.numerical_gradient(x, t, engine=engine))
        assert np.max(np.abs(numerical - analytic)) / np.max(np.abs(analytic)) < 1e-7, engine


@pytest.mark.parametrize("layer", [1, 2])
def test_gradchecks_kink_bound_leaves_out_what_differs_from_backprop(layer):
    """gradcheck.near_kinks: a unit put at its kink on one sample marks the nudges that
    move it, from its own layer and from the layer below; every unmarked nudge's central
    difference agrees with backprop, the marked ones' need not."""
    net = MultiLayerNet(12, [7, 6], 4, "relu", weight_init_std=0.8, seed=3)
    x, t = small_batch(3)
    net.params[f"b{layer}"][2] -= forward(net.layout, net.params, x).pre[layer - 1][0, 2]
    near = near_kinks(net, x, H)
    slices = net.layout.slices
    assert near[slices[f"b{layer}"].start + 2]  # its own bias moves it by h
    # the unit, or (layer 2) any first-layer unit, here unit 0, that feeds the one at its kink
    assert near[slices["W1"]].reshape(12, 7)[x[0] != 0][:, 2 if layer == 1 else 0].any()
    assert not near[slices["W3"]].any() and not near[slices["b3"]].any()  # the softmax's side
    assert 0 < near.sum() < near.size / 2
    analytic = net.layout.flatten(net.gradient(x, t))
    numerical = net.layout.flatten(net.numerical_gradient(x, t, engine="fast"))
    scale = np.max(np.abs(analytic))
    assert np.max(np.abs(numerical - analytic)[~near]) / scale < 1e-7
    assert np.max(np.abs(numerical - analytic)[near]) / scale > 1e-3  # the kink shows


def test_gradchecks_kink_bound_marks_a_unit_at_its_kink_that_some_path_does_not_reach():
    """A blank image with zero biases puts every unit at its kink; a zero weight leaves a
    unit above with no path from one below (0 / 0 in the bound): still marked."""
    net = MultiLayerNet(4, [3, 3], 2, "relu", weight_init_std=0.8, seed=3)
    x, t = np.array([[0.5, 0.2, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]]), np.array([0, 1])
    net.params["b1"][:] = net.params["b2"][:] = 0.0
    net.params["W2"][1, 0] = 0.0
    near = near_kinks(net, x, H)
    assert near[net.layout.slices["b1"]].all() and near[net.layout.slices["b2"]].all()
    analytic = net.layout.flatten(net.gradient(x, t))
    numerical = net.layout.flatten(net.numerical_gradient(x, t, engine="fast"))
    assert np.max(np.abs(numerical - analytic)[net.layout.slices["b1"]]) > 1e-3  # kinks


def test_a_sigmoid_net_has_no_kinks():
    net = MultiLayerNet(12, [7, 6], 4, "sigmoid", weight_init_std=0.8, seed=3)
    assert not near_kinks(net, small_batch(3)[0], 1.0).any()


def test_a_relu_unit_at_zero_under_both_nudges_adds_exactly_nothing():
    net = MultiLayerNet(12, [7, 6], 4, "relu", weight_init_std=0.8, seed=4)
    net.params["b1"][2] = -100.0  # unit 2 of the first hidden layer is dead for every input
    x, t = small_batch(4)
    dead = net.layout.slices["W1"].start + np.arange(12) * 7 + 2
    fast = FastEngine(net.layout, dead)(net.flat_params, x, t, H)
    full = FullEngine(net.layout, dead)(net.flat_params, x, t, H)
    assert np.all(fast == 0.0) and np.all(full == 0.0)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_shards_give_the_same_bits_at_any_depth(activation):
    net = MultiLayerNet(12, [7, 6, 5], 4, activation, weight_init_std=0.8,
                        weight_decay_lambda=0.1, seed=5)  # fmt: skip
    x, t = small_batch(5)
    size = net.layout.size
    whole = FastEngine(net.layout, np.arange(size))(net.flat_params, x, t, H)
    rng = np.random.default_rng(5)
    for count in (2, 3, 7):
        parts = np.array_split(rng.permutation(size), count)
        pieced = np.empty(size)
        for part in parts:
            pieced[part] = FastEngine(net.layout, part)(net.flat_params, x, t, H)
        assert np.array_equal(pieced, whole)


def test_shards_walk_every_index_once_layer_by_layer():
    layout = ParamLayout(12, (7, 6, 5), 4, "relu")
    order = unit_major_order(layout)
    assert np.array_equal(np.sort(order), np.arange(layout.size))
    first_w2 = layout.slices["W2"].start
    assert np.all(order[:first_w2] < first_w2)  # layer 1's units come first
    shards = make_shards(layout, np.full(12, 0.5), 3)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(layout.size))


def test_784_100_100_10_relu_fast_equals_full_on_mnist(mnist_batch):
    x, t = mnist_batch
    net = MultiLayerNet(784, [100, 100], 10, seed=6)
    rng = np.random.default_rng(6)
    slices = net.layout.slices
    # every layer's share: W1 entries of busy and empty pixels, every bias, W2, W3
    chosen = np.concatenate([rng.choice(slices["W1"].stop, 400, replace=False),
                             np.arange(slices["b1"].start, slices["b1"].stop),
                             rng.choice(np.arange(slices["W2"].start, slices["W2"].stop), 200),
                             np.arange(slices["W3"].start, net.layout.size)])  # fmt: skip
    chosen = np.unique(chosen)
    fast = FastEngine(net.layout, chosen)(net.flat_params, x, t, H)
    full = FullEngine(net.layout, chosen)(net.flat_params, x, t, H)
    assert np.max(np.abs(fast - full)) <= 1e-9


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((784, [], 10), "at least one hidden layer"),
        ((784, [100, 0], 10), "whole numbers >= 1"),
        ((784, [100], 10, "tanh"), "activation 'tanh' is unknown; choose one of sigmoid, relu"),
        ((784, [100], 10, "relu", "kaiming"), "weight_init_std 'kaiming' is unknown"),
        ((784, [100], 10, "relu", -1.0), "must be finite and > 0"),
        ((784, [100], 10, "relu", None), "weight_init_std None is not a number"),
        ((784, [100], 10, "relu", True), "weight_init_std True is not a number"),
        ((784, [100], 10, "relu", "relu", -0.1), "weight decay -0.1 must be a finite number"),
        ((784, [100], 10, "relu", "relu", float("nan")), "weight decay nan"),
    ],
)
def test_bad_architecture_is_refused_with_the_fix(arguments, message):
    with pytest.raises(ValueError, match=message):
        MultiLayerNet(*arguments)


@pytest.mark.parametrize("hidden", [(7, 6), (7, 6, 5)])
def test_relu_units_at_their_kink_are_recomputed_exactly(hidden):
    # units of the second hidden layer put at (or a rounding away from) zero for a sample:
    # there a nudge below crosses the kink, and the logits are no linear map of it
    net = MultiLayerNet(12, hidden, 4, "relu", weight_init_std=0.8, seed=8)
    x, t = small_batch(8)
    z1 = forward(net.layout, net.params, x).inputs[1]
    for sample, unit in ((0, 1), (3, 4), (5, 0)):
        net.params["b2"][unit] = -(z1[sample] @ net.params["W2"][:, unit])
    pre = forward(net.layout, net.params, x).pre[1]
    assert np.min(np.abs(pre[[0, 3, 5], [1, 4, 0]])) < 1e-12
    layer_one = np.arange(net.layout.slices["b1"].stop)
    fast = FastEngine(net.layout, layer_one)(net.flat_params, x, t, H)
    full = FullEngine(net.layout, layer_one)(net.flat_params, x, t, H)
    assert np.max(np.abs(fast - full)) <= 1e-9
