"""Nudges of the output layer (W2 and b2 of the chapter's net): what one nudge changes is one
logit column.

Nudging W_{L+1}[j, c] by +-h moves the logits a[:, c] by u = +-h z_L[:, j] (b_{L+1}[c]: by
+-h), for every sample, and nothing else; sample n's loss moves by
    delta = log1p(p[n, c] expm1(u)) - u [c == t_n]       (deltas.py)
expm1 and log1p by their series alone (no exp, no log) while h times the largest z_L keeps
them short, else by vecmath's functions, which take the same series where it serves.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.vecmath import JIT, expm1, expm1_series, fma, log1p, log1p_series


@numba.njit(inline="always", **JIT)
def short_loss_change(p, is_target, u):
    """How far a sample's loss moves when logit c, whose softmax is p, moves by u:
    log1p(p expm1(u)) - u [c == t], for |u| within the series' domain (the series alone)."""
    return fma(-is_target, u, log1p_series(p * expm1_series(u)))


@numba.njit(**JIT)
def loss_change(p, is_target, u):
    """The same for any u. A call, not inlined: only a large h takes it, and inlining
    expm1 and log1p here would add seconds to every fresh compile."""
    return fma(-is_target, u, log1p(p * expm1(u)))


@numba.njit(**JIT)
def loss_differences(req_unit, req_class, z, probabilities, labels, h, short, out):
    """out[r] = sum over samples of delta(+h) - delta(-h) for W_{L+1}[req_unit[r],
    req_class[r]], z (B, H) the last hidden layer's z_L; req_unit == H stands for b_{L+1}
    (an input of 1 for every sample). short: whether h times every z lies within the
    series' domain (SERIES_MAX), so that they are used without a branch (the same bits)."""
    batch_size, num_classes = probabilities.shape
    hidden_size = z.shape[1]
    # by column, so that the per-sample loops below are contiguous
    inputs = np.ones((hidden_size + 1, batch_size))  # row H: b_{L+1}'s input
    for j in range(hidden_size):
        for n in range(batch_size):
            inputs[j, n] = z[n, j]
    p = np.ascontiguousarray(probabilities.T)
    is_target = np.zeros((num_classes, batch_size))
    for n in range(batch_size):
        is_target[labels[n], n] = 1.0
    difference = np.empty(batch_size)
    for r in range(req_unit.size):
        z_j, c = inputs[req_unit[r]], req_class[r]
        p_c, own = p[c], is_target[c]
        if short:
            for n in range(batch_size):
                u = h * z_j[n]
                difference[n] = (short_loss_change(p_c[n], own[n], u)
                                 - short_loss_change(p_c[n], own[n], -u))  # fmt: skip
        else:
            for n in range(batch_size):
                u = h * z_j[n]
                difference[n] = (loss_change(p_c[n], own[n], u)
                                 - loss_change(p_c[n], own[n], -u))  # fmt: skip
        total = 0.0
        for n in range(batch_size):
            total += difference[n]
        out[r] = total
