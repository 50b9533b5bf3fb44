"""Bad batches are refused with one line before any kernel runs: the numba kernels index
arrays with the labels, and an unchecked label once corrupted memory (issue 10)."""

import re
import subprocess
import sys

import numpy as np
import pytest

from distnum.engines import FastEngine, FullEngine
from distnum.functions import softmax, softmax_cross_entropy
from distnum.gradient import central_differences
from distnum.models import TwoLayerNet, affine

NET = TwoLayerNet(12, 4, 10, weight_init_std=0.5, seed=0)
X5 = np.random.default_rng(0).random((5, 12))
LABELS5 = np.array([0, 1, 2, 3, 4])
EXPECTED = r"give class indices \(N,\) in \[0, 10\) or one-hot rows \(N, 10\)"

BAD_LABELS = {
    "too large": ([0, 1, 2, 3, 10], "label 10 is not a class index; " + EXPECTED),
    "negative": ([0, 1, 2, 3, -1000], "label -1000 is not a class index; " + EXPECTED),
    "huge": ([0, 1, 2, 3, 1_000_000], "label 1000000 is not a class index; " + EXPECTED),
    "wrong count": ([0, 1, 2], "3 labels for 5 inputs in x; give one label per row of x"),
    "one-hot, wrong count": (np.eye(10)[:3], "3 labels for 5 inputs in x"),
    "floats": ([0.0, 1.0, 2.0, 3.0, 4.0], "labels have dtype float64, not integers; " + EXPECTED),
    "one-hot of wrong width": (np.eye(9)[:5], r"labels have shape \(5, 9\); " + EXPECTED),
    "3-D": (np.zeros((5, 10, 1)), r"labels have shape \(5, 10, 1\)"),
    "strings": (list("01234"), "labels have dtype <U1, not integers"),
}
BAD_X = {
    "wrong width": (np.ones((5, 11)), r"x has shape \(5, 11\); give a batch \(N, 12\)"),
    "one input, 1-D": (np.ones(12), r"x has shape \(12,\); give a batch \(N, 12\), one input per"),
    "3-D": (np.ones((5, 3, 4)), r"x has shape \(5, 3, 4\)"),
    "no inputs": (np.ones((0, 12)), r"x has shape \(0, 12\), no inputs; give at least one row"),
    "strings": (np.full((5, 12), "a"), r"x has dtype <U1; give numbers"),
}


def fast_engine(x, t):
    return FastEngine(NET.layout, np.arange(NET.layout.size))(NET.flat_params, x, t, 1e-4)


def full_engine(x, t):
    return FullEngine(NET.layout, np.arange(NET.layout.size))(NET.flat_params, x, t, 1e-4)


ENTRY_POINTS = {
    "FastEngine": fast_engine,
    "FullEngine": full_engine,
    "numerical_gradient fast": lambda x, t: NET.numerical_gradient(x, t, engine="fast"),
    "numerical_gradient full": lambda x, t: NET.numerical_gradient(x, t, engine="full"),
    "gradient (backprop)": NET.gradient,
    "loss": NET.loss,
    "accuracy": NET.accuracy,
}


def refused(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_are_refused(entry, case):
    labels, message = BAD_LABELS[case]
    refused(lambda: ENTRY_POINTS[entry](X5, labels), message)


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "predict"])
@pytest.mark.parametrize("case", list(BAD_X))
def test_bad_inputs_are_refused(entry, case):
    x, message = BAD_X[case]
    labels = LABELS5[: len(x)] if x.ndim and len(x) <= 5 else LABELS5
    if entry == "predict":
        refused(lambda: NET.predict(x), message)
    else:
        refused(lambda: ENTRY_POINTS[entry](x, labels), message)


def test_good_batches_in_any_label_form_give_the_same_gradient():
    """uint8 labels (as load_mnist gives them), int64, a list, one-hot rows; float32 x."""
    reference = fast_engine(X5, LABELS5)
    for labels in (LABELS5.astype(np.uint8), list(LABELS5), np.eye(10)[LABELS5]):
        assert np.array_equal(fast_engine(X5, labels), reference)
    x32 = X5.astype(np.float32)
    assert np.array_equal(fast_engine(x32, LABELS5), fast_engine(x32.astype(np.float64), LABELS5))


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 2, 2), ()])
def test_logits_without_classes_or_of_too_many_dimensions_are_refused(shape):
    message = re.escape(f"logits of shape {shape}; give a vector (K,) or rows (N, K), K >= 1")
    refused(lambda: softmax(np.zeros(shape)), message)
    refused(lambda: softmax_cross_entropy(np.zeros(shape), np.zeros(3, dtype=int)), message)


@pytest.mark.parametrize("W, b", [(np.ones((11, 4)), np.ones(4)), (np.ones((12, 4)), np.ones(3))])
def test_affine_refuses_arrays_that_do_not_fit(W, b):
    message = re.escape("x (N, I), W (I, J) and b (J,) do not fit together")
    refused(lambda: affine(X5, W, b), message)


def test_central_differences_refuses_indices_outside_x():
    with pytest.raises(ValueError, match=re.escape("indices must lie in [0, 2)")):
        central_differences(lambda v: float(v.sum()), np.zeros(2), [0, 2])


@pytest.mark.parametrize("bad_label", [11, 1_000_000, -1])
def test_the_memory_corruption_repro_now_ends_with_an_error(bad_label):
    """Issue 10's repro, in a process of its own: it died of SIGSEGV (or 'double free') and
    now gets a ValueError and exits normally."""
    code = (
        "import numpy as np\n"
        "from distnum import TwoLayerNet\n"
        "x5 = np.random.default_rng(0).random((5, 784))\n"
        "try:\n"
        f"    TwoLayerNet(784, 10, 10, seed=0).numerical_gradient(x5, [0, 1, 2, 3, {bad_label}])\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"label {bad_label} is not a class index; give class indices")
