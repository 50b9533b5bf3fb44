"""Nudges of the output layer (W2 and b2 of the chapter's net): what one nudge changes is
one logit column.

Nudging W_{L+1}[j, c] by s moves the logits a[:, c] by s * z_L[:, j] (b_{L+1}[c]: by s),
for every sample, and nothing else. The kernel really evaluates each nudged per-sample loss,
l_n = log(rest[n, c] + exp(a2'[n, c] - max_n)) - (a2'[n, t_n] - max_n), where
rest[n, c] = sum over k != c of exp(a2[n, k] - max_n) is what the nudge leaves alone.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.vecmath import JIT, exp, fma, log


@numba.njit(**JIT)
def loss_differences(req_unit, req_class, z1, shifted_logits, labels, h, out):
    """out[r] = sum over samples of l_n(+h) - l_n(-h) for W_{L+1}[req_unit[r], req_class[r]],
    z1 (B, H) the last hidden layer's z_L; req_unit == H stands for b_{L+1} (an input of 1
    for every sample)."""
    batch_size, num_classes = shifted_logits.shape
    hidden_size = z1.shape[1]
    # by column, so that the per-sample loops below are contiguous
    inputs = np.ones((hidden_size + 1, batch_size))  # row H: b2's input
    inputs[:hidden_size] = z1.T
    logits = np.ascontiguousarray(shifted_logits.T)
    is_target = np.zeros((num_classes, batch_size))
    target = np.empty(batch_size)
    for n in range(batch_size):
        is_target[labels[n], n] = 1.0
        target[n] = shifted_logits[n, labels[n]]
    rest = np.zeros((num_classes, batch_size))
    for c in range(num_classes):
        for k in range(num_classes):
            if k != c:
                for n in range(batch_size):
                    rest[c, n] += exp(logits[k, n])
    difference = np.empty(batch_size)
    for r in range(req_unit.size):
        z, c = inputs[req_unit[r]], req_class[r]
        own, logit, other = is_target[c], logits[c], rest[c]
        for n in range(batch_size):
            step = h * z[n]
            plus = log(other[n] + exp(logit[n] + step)) - fma(own[n], step, target[n])
            minus = log(other[n] + exp(logit[n] - step)) - fma(own[n], -step, target[n])
            difference[n] = plus - minus
        total = 0.0
        for n in range(batch_size):
            total += difference[n]
        out[r] = total
