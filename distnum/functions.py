"""Activations and loss functions of chapters 3, 4 and 6, as the book names them.

sigmoid, softmax and the softmax cross-entropy are the network's own arithmetic: numba
loops over the exp and log of distnum/vecmath.py, in one fixed order, so that they give the
same bits on every CPU (numpy picks its exp, and the order of its sums, per CPU).
`softmax_cross_entropy_per_sample` is the one definition of the network's loss: the loss of
TwoLayerNet, its backprop and the full engine come from it, and the fast engine evaluates
the same formula on its nudged logits, from the same shifted_logits.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum import vecmath
from distnum.vecmath import JIT, exp, fma, log


@numba.njit(**JIT)
def _sigmoid(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = vecmath.sigmoid(x[i])
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), elementwise, float64 of x's shape; exactly 0 where exp(-x) overflows."""
    x = np.asarray(x, dtype=np.float64)
    return _sigmoid(x.ravel()).reshape(x.shape)


def relu(x: np.ndarray) -> np.ndarray:
    """max(x, 0) elementwise, float64 of x's shape, as the book's Relu: 0.0 where x <= 0
    (-0.0 included), nan kept."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.0, 0.0, x)


@numba.njit(**JIT)
def sum_of_squares(values):
    """sum(v ** 2) of a 1-D float64 array, each square added in index order with one fma:
    the same bits on every CPU (numpy's sum picks its order per CPU)."""
    total = 0.0
    for v in values:
        total = fma(v, v, total)
    return total


@numba.njit(**JIT)
def shifted_logits(logits):
    """logits (N, K) minus each row's max, so that exp of them cannot overflow."""
    out = np.empty_like(logits)
    for n in range(logits.shape[0]):
        peak = logits[n, 0]
        for k in range(1, logits.shape[1]):
            peak = logits[n, k] if logits[n, k] > peak else peak
        for k in range(logits.shape[1]):
            out[n, k] = logits[n, k] - peak
    return out


@numba.njit(**JIT)
def _softmax(logits):
    out = shifted_logits(logits)
    for n in range(out.shape[0]):
        total = 0.0
        for k in range(out.shape[1]):
            out[n, k] = exp(out[n, k])
            total += out[n, k]
        for k in range(out.shape[1]):
            out[n, k] /= total
    return out


def rows_of_logits(x: np.ndarray) -> np.ndarray:
    """x (K,) or (N, K), K >= 1, as a C-contiguous float64 array (N, K) for the kernels."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise ValueError(f"logits of shape {x.shape}; give a vector (K,) or rows (N, K), K >= 1")
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a vector (K,) or a batch (N, K), shifted by the max
    so that large inputs do not overflow."""
    return _softmax(rows_of_logits(x)).reshape(np.shape(x))


def mean_squared_error(y: np.ndarray, t: np.ndarray) -> float:
    """The book's sum of squares error, 0.5 * sum((y - t)**2)."""
    return 0.5 * float(np.sum((y - t) ** 2))


def label_indices(t: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices int64 (N,) from labels given as integer indices (N,) or one-hot rows
    (N, num_classes), each checked: the kernels index arrays with them.

    Rows that are not one-hot (soft targets) are read as their argmax, as the book does."""
    t = np.asarray(t)
    expected = f"give class indices (N,) in [0, {num_classes}) or one-hot rows (N, {num_classes})"
    if t.ndim == 2 and t.shape[1] == num_classes:
        return np.argmax(t, axis=1).astype(np.int64)
    if t.ndim != 1:
        raise ValueError(f"labels have shape {t.shape}; {expected}")
    if t.dtype.kind not in "iu":
        raise ValueError(f"labels have dtype {t.dtype}, not integers; {expected}")
    lowest, highest = (t.min(), t.max()) if t.size else (0, 0)
    if lowest < 0 or highest >= num_classes:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"label {bad} is not a class index; {expected}")
    return t.astype(np.int64)


def cross_entropy_error(y: np.ndarray, t: np.ndarray) -> float:
    """Mean cross-entropy of probabilities y, (K,) or (N, K), against labels t.

    t holds one-hot rows shaped like y, or class indices: a scalar for one sample, (N,) for
    a batch. The 1e-7 keeps log finite where y is 0, as in the book (and gives its printed
    values). The notebook's version reshaped t where it meant y, and failed on one-hot t."""
    y = np.asarray(y, dtype=np.float64)
    t = np.asarray(t)
    if y.ndim == 1:
        y = y.reshape(1, y.size)
        t = t.reshape(1, t.size) if t.size == y.size else t.reshape(1)
    indices = label_indices(t, y.shape[1])
    batch_size = y.shape[0]
    if indices.size != batch_size:
        raise ValueError(f"{indices.size} labels for {batch_size} rows of y; give one per row")
    return -float(np.sum(np.log(y[np.arange(batch_size), indices] + 1e-7))) / batch_size


@numba.njit(**JIT)
def _per_sample_losses(logits, labels):
    shifted = shifted_logits(logits)
    out = np.empty(logits.shape[0])
    for n in range(logits.shape[0]):
        total = 0.0
        for k in range(logits.shape[1]):
            total += exp(shifted[n, k])
        out[n] = log(total) - shifted[n, labels[n]]
    return out


def softmax_cross_entropy_per_sample(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample loss l_n = log(sum_k exp(s_nk)) - s_n,t_n (N,), with s the logits (N, K)
    minus each row's max and t_n the class indices or one-hot rows labels. Computed from the
    logits, so no probability underflows to log(0); the sum over k in order 0..K-1."""
    logits = rows_of_logits(logits)
    labels = label_indices(labels, logits.shape[1])
    if labels.size != logits.shape[0]:
        raise ValueError(f"{labels.size} labels for {logits.shape[0]} rows of logits; "
                         "give one label per row")  # fmt: skip
    return _per_sample_losses(logits, labels)


@numba.njit(**JIT)
def _mean(values):
    """The mean of values (N,) in index order, the sum compensated (Neumaier): a central
    difference of two batch losses would show the rounding error of a plain sum of N. An
    infinite loss gives an infinite mean (its compensation, inf - inf, would be nan)."""
    total = 0.0
    lost = 0.0  # what the additions to total have rounded away
    for value in values:
        new_total = total + value
        if abs(total) >= abs(value):
            lost += (total - new_total) + value
        else:
            lost += (value - new_total) + total
        total = new_total
    return (total + lost if np.isfinite(total) else total) / values.size


def mean_loss(per_sample: np.ndarray) -> float:
    """The batch's loss from its per-sample losses (N,): added in sample order (compensated),
    divided by N; the same bits wherever the per-sample losses were computed."""
    return float(_mean(np.ascontiguousarray(per_sample, dtype=np.float64)))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of logits (N, K) against labels, indices (N,) or one-hot:
    the per-sample losses added in sample order (compensated), divided by N."""
    return mean_loss(softmax_cross_entropy_per_sample(logits, labels))
