"""The full and fast engines: exact agreement, agreement with backprop, shard independence."""

import numpy as np
import pytest

from distnum.engines import FastEngine, FullEngine, make_engine
from distnum.engines.sample_values import input_entries
from distnum.engines.unnudged import StepTables
from distnum.functions import label_indices
from distnum.gradcheck import sample_indices, train_with_backprop
from distnum.models import MultiLayerNet, TwoLayerNet
from distnum.node_channel import row_span

H = 1e-4


@pytest.fixture(scope="module", params=["initial", "trained"])
def net(request, mnist):
    """TwoLayerNet(784, 50, 10) at its initial weights, and after 300 backprop steps."""
    network = TwoLayerNet(784, 50, 10, seed=7)
    if request.param == "trained":
        (x_train, t_train), _ = mnist
        train_with_backprop(network, x_train, t_train, 300, np.random.default_rng(7))
    return network


def all_indices(net):
    return np.arange(net.layout.size)


def test_fast_and_full_agree_and_match_backprop(net, mnist_batch):
    x, t = mnist_batch
    layout = net.layout
    fast = FastEngine(layout, all_indices(net))(net.flat_params, x, t, H)
    indices = sample_indices(net, 2000, np.random.default_rng(0))
    full = FullEngine(layout, indices)(net.flat_params, x, t, H)
    assert np.max(np.abs(fast[indices] - full)) <= 1e-9
    backprop = layout.flatten(net.gradient(x, t))
    for name, part in layout.slices.items():
        scale = np.max(np.abs(backprop[part]))
        assert np.max(np.abs(fast[part] - backprop[part])) / scale <= 1e-6, name
        inside = (indices >= part.start) & (indices < part.stop)
        sampled_error = np.abs(full[inside] - backprop[indices[inside]])
        assert np.max(sampled_error) / scale <= 1e-6, name


def shard_partitions(size, hidden):
    rng = np.random.default_rng(3)
    everything = np.arange(size)
    column = np.arange(5, 784 * hidden, hidden)  # every W1 entry of hidden unit 5
    rest = np.setdiff1d(everything, column)
    return {
        "1 shard": [everything],
        "2 shards": np.array_split(everything, 2),
        "3 shards": np.array_split(everything, 3),
        "7 shards": np.array_split(everything, 7),
        "ragged": np.split(everything, [1, 17, 20000, 39201, 39700]),
        "random interleaved": np.array_split(rng.permutation(size), 5),
        "one W1 column cut in two": [column[:300], np.concatenate([column[300:], rest])],
    }


@pytest.mark.parametrize("partition", list(shard_partitions(39760, 50)))
def test_shards_give_the_same_bits(net, mnist_batch, partition):
    x, t = mnist_batch
    layout = net.layout
    whole = FastEngine(layout, all_indices(net))(net.flat_params, x, t, H)
    gathered = np.full(layout.size, np.nan)
    shards = shard_partitions(layout.size, layout.hidden_sizes[0])[partition]
    for shard in shards:
        gathered[shard] = FastEngine(layout, shard)(net.flat_params, x, t, H)
    assert np.array_equal(gathered, whole)


@pytest.mark.parametrize("shares", [2, 3, 7])
@pytest.mark.parametrize("kind", ["784-50-10 sigmoid", "784-30-20-10 relu, decay"])
def test_tables_filled_in_shares_of_rows_give_the_same_bits(mnist_batch, kind, shares):
    """As the actors of a node fill the step's tables: each its share of the rows, through
    tables of its own over one buffer; every shard's slice from them, then, has the bits of
    one process's whole gradient (7 shares of 6 rows: some have none)."""
    x, t = mnist_batch
    x, t = (x[:6], t[:6]) if shares == 7 else (x, t)
    if kind.startswith("784-50-10"):
        net = TwoLayerNet(784, 50, 10, seed=5)
    else:
        net = MultiLayerNet(784, [30, 20], 10, activation="relu", weight_decay_lambda=0.1,
                            seed=5)  # fmt: skip
    layout = net.layout
    whole = FastEngine(layout, all_indices(net))(net.flat_params, x, t, H)
    buffer = bytearray(StepTables.nbytes(layout, x.shape[0]))
    params = layout.views(net.flat_params)
    for k in range(shares):
        first, stop = row_span(k, shares, x.shape[0])
        if stop > first:
            StepTables(layout, x.shape[0], buffer).fill(params, x[first:stop], first, H)
    tables, labels = StepTables(layout, x.shape[0], buffer), label_indices(t, 10)
    gathered = np.full(layout.size, np.nan)
    for shard in np.array_split(all_indices(net), shares):
        gathered[shard] = FastEngine(layout, shard).from_tables(net.flat_params, tables, labels, H)
    assert np.array_equal(gathered, whole)


def test_engines_on_a_small_net_with_any_inputs():
    """Negative and repeated input values, soft labels read as indices, several h."""
    rng = np.random.default_rng(11)
    net = TwoLayerNet(12, 4, 3, weight_init_std=0.8, seed=11)
    x = np.round(rng.normal(size=(9, 12)), 1) * (rng.random((9, 12)) < 0.6)
    t = net.labels(rng.random((9, 3)))
    everything = all_indices(net)
    for h in (1e-3, 1e-4, 1e-5):
        fast = FastEngine(net.layout, everything)(net.flat_params, x, t, h)
        full = FullEngine(net.layout, everything)(net.flat_params, x, t, h)
        np.testing.assert_allclose(fast, full, rtol=0, atol=1e-9)
    numerical = net.numerical_gradient(x, t, engine="full")
    for name, grad in net.gradient(x, t).items():
        assert np.max(np.abs(numerical[name] - grad)) / np.max(np.abs(grad)) < 1e-6


def test_engines_leave_parameters_untouched(mnist_batch):
    x, t = mnist_batch
    net = TwoLayerNet(784, 50, 10, seed=1)
    before = net.flat_params.copy()
    for engine in ("fast", "full"):
        make_engine(engine, net.layout, np.arange(100))(net.flat_params, x, t, H)
        assert np.array_equal(net.flat_params, before)


def test_numerical_gradient_engines_agree(mnist_batch):
    x, t = mnist_batch
    net = TwoLayerNet(784, 50, 10, seed=2)
    fast = net.numerical_gradient(x, t)  # engine="fast" is the default
    one_hot = net.numerical_gradient(x, np.eye(10)[t], engine="fast")
    for name in fast:
        assert np.array_equal(fast[name], one_hot[name])
    small = TwoLayerNet(30, 5, 10, seed=2)
    full_small = small.numerical_gradient(x[:, :30], t, engine="full")
    fast_small = small.numerical_gradient(x[:, :30], t, engine="fast")
    for name in full_small:
        np.testing.assert_allclose(fast_small[name], full_small[name], rtol=0, atol=1e-9)


@pytest.mark.parametrize("bad_h", [0.0, -1e-4, float("nan"), float("inf"), "x"])
def test_h_is_checked(bad_h):
    net = TwoLayerNet(4, 3, 2, seed=0)
    x, t = np.ones((2, 4)), np.array([0, 1])
    for engine in ("fast", "full"):
        with pytest.raises(ValueError, match="h="):
            make_engine(engine, net.layout, np.arange(5))(net.flat_params, x, t, bad_h)


def test_float32_and_bad_indices_and_unknown_engine_are_refused():
    net = TwoLayerNet(4, 3, 2, seed=0)
    x, t = np.ones((2, 4)), np.array([0, 1])
    with pytest.raises(ValueError, match="float64 only"):
        FastEngine(net.layout, np.arange(5))(net.flat_params.astype(np.float32), x, t, H)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 23\)"):
        FullEngine(net.layout, np.array([23]))
    with pytest.raises(ValueError, match="unknown engine 'slow'; choose one of fast, full"):
        make_engine("slow", net.layout, np.arange(5))


def test_input_entries_give_each_samples_distinct_values_once():
    rng = np.random.default_rng(3)
    x = rng.choice([0.0, 0.0, 0.0, 1.0, 0.5, 1 / 255, 7.25, -3.0], size=(9, 40))
    x[4] = 0.0  # a blank image: the bias entry alone
    entries = input_entries(x)
    pixel_of = np.repeat(np.arange(41), np.diff(entries.pixel_start))
    assert list(entries.pixel_start[[0, -1]]) == [0, np.count_nonzero(x) + 9]
    # each entry's value and sample are those of its pixel; the bias is 1.0
    with_bias = np.hstack([x, np.ones((9, 1))])
    samples = entries.value_sample[entries.value_id]
    assert np.array_equal(entries.value[entries.value_id], with_bias[samples, pixel_of])
    for i in range(41):  # a pixel's entries in sample order, its zeros left out
        in_pixel = samples[entries.pixel_start[i] : entries.pixel_start[i + 1]]
        assert np.array_equal(in_pixel, np.flatnonzero(with_bias[:, i]))
    # one value id per distinct (sample, value) pair
    pairs = {(n, v) for n, v in zip(entries.value_sample, entries.value, strict=True)}
    assert len(pairs) == entries.value.size == sum(len(set(row[row != 0])) for row in with_bias)


def test_work_counts_what_the_fast_engine_evaluates(net, mnist_batch):
    x, _ = mnist_batch
    layout = net.layout
    (hidden,), classes, batch = layout.hidden_sizes, layout.output_size, len(x)
    values = input_entries(x).value.size  # distinct (sample, value) pairs
    first, second = 2 * hidden * values, 2 * (hidden + 1) * classes * batch
    whole = FastEngine(layout, np.arange(layout.size)).work(net.flat_params, x)
    assert whole == {"nudged_losses": first + second}
    # W1[:, 0] cut in two: each half evaluates the sample values its pixels need
    column = np.arange(layout.input_size) * hidden
    halves = [FastEngine(layout, half).work(net.flat_params, x)["nudged_losses"]
              for half in np.split(column, 2)]  # fmt: skip
    assert 2 * values < sum(halves) < 4 * values
