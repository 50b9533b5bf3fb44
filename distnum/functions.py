"""Activations and loss functions of chapters 3 and 4, as the book names them.

`softmax_cross_entropy_per_sample` is the one definition of the network's loss: the
loss of TwoLayerNet, its backprop, the full engine and the fast engine all come from it.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), elementwise; exp may overflow to inf, which gives the right 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a vector (K,) or a batch (N, K), shifted by the max
    so that large inputs do not overflow."""
    shifted = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=-1, keepdims=True)


def mean_squared_error(y: np.ndarray, t: np.ndarray) -> float:
    """The book's sum of squares error, 0.5 * sum((y - t)**2)."""
    return 0.5 * float(np.sum((y - t) ** 2))


def label_indices(t: np.ndarray, num_classes: int) -> np.ndarray:
    """Class indices (N,) from labels given as indices (N,) or one-hot rows (N, num_classes).

    Rows that are not one-hot (soft targets) are read as their argmax, as the book does."""
    t = np.asarray(t)
    if t.ndim == 2 and t.shape[1] == num_classes:
        return np.argmax(t, axis=1)
    if t.ndim != 1:
        raise ValueError(
            f"labels of shape {t.shape}: give class indices (N,) or one-hot rows (N, {num_classes})"
        )
    return t.astype(np.intp, copy=False)


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
    return -float(np.sum(np.log(y[np.arange(batch_size), indices] + 1e-7))) / batch_size


def softmax_cross_entropy_per_sample(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample loss l_n = logsumexp(a_n) - a_n[t_n] of logits a (N, K), labels t (N,) as
    indices. Computed from the logits, so no probability underflows to log(0)."""
    peak = np.max(logits, axis=1)
    shifted = logits - peak[:, None]
    log_sum_exp = np.log(np.sum(np.exp(shifted), axis=1))
    return log_sum_exp - shifted[np.arange(logits.shape[0]), labels]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of logits (N, K) against labels, indices (N,) or one-hot."""
    indices = label_indices(labels, logits.shape[1])
    return float(np.mean(softmax_cross_entropy_per_sample(logits, indices)))
