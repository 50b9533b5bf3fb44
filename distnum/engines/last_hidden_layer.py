"""Nudges of the last hidden layer (W1 and b1 of the chapter's net): what one nudge changes
is one hidden unit, for some samples.

Nudging W_L[i, j] by s moves a_L[n, j] by s * z[n, i] (z the layer's input), so only the
sample values of sample_values.py see it; for each, only z_L[n, j] changes, by some d, and
the logits move by d * W_{L+1}[j, :]. The kernel really evaluates each needed nudged loss
    l_n = log(sum_k exp(a'[n, k] - max_n)) - (a'[n, t_n] - max_n),
a' the nudged logits, once per sign.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.engines.sample_values import add_differences, needed_values
from distnum.vecmath import JIT, activate, exp, fma, log


@numba.njit(**JIT)
def loss_differences(
    unit_start, req_pixel, req_slot, pixel_start, value_id, value_sample, value,
    a1, z1, shifted_logits, labels, W2, relu, h, out,
):  # fmt: skip
    """out[slot] = sum over the entries of (pixel, unit) of l_n(+h) - l_n(-h).

    The requests (pixel, slot) for hidden unit j are req_*[unit_start[j]:unit_start[j+1]];
    a1, z1 (B, H) (the last hidden layer's a_L, z_L) and shifted_logits (B, K) = logits -
    max are the unperturbed forward pass, W2 (H, K) the output layer's weights, labels (B,),
    relu whether the activation is ReLU (else the sigmoid)."""
    num_classes = shifted_logits.shape[1]
    num_values = value.size
    # what every unit reuses, laid out by sample value so that the loops below are contiguous
    logits = np.empty((num_classes, num_values))
    target = np.empty(num_values)
    for v in range(num_values):
        n = value_sample[v]
        target[v] = shifted_logits[n, labels[n]]
        for k in range(num_classes):
            logits[k, v] = shifted_logits[n, k]
    needed = np.zeros(num_values, dtype=np.bool_)
    chosen = np.empty(num_values, dtype=np.int64)
    logits_buf = np.empty((num_classes, num_values))
    target_buf = np.empty(num_values)
    a_base = np.empty(num_values)
    z_base = np.empty(num_values)
    step_per_h = np.empty(num_values)
    w_target = np.empty(num_values)
    d = np.empty(num_values)
    total = np.empty(num_values)
    loss = np.empty(num_values)
    loss_plus = np.empty(num_values)
    difference = np.empty(num_values)
    for j in range(unit_start.size - 1):
        first, stop = unit_start[j], unit_start[j + 1]
        if first == stop:
            continue
        count = needed_values(first, stop, req_pixel, pixel_start, value_id, needed, chosen)
        if count == num_values:
            unit_logits, unit_target = logits[:, :count], target[:count]
        else:
            for k in range(num_classes):
                for q in range(count):
                    logits_buf[k, q] = logits[k, chosen[q]]
            for q in range(count):
                target_buf[q] = target[chosen[q]]
            unit_logits, unit_target = logits_buf[:, :count], target_buf[:count]
        w = W2[j]
        for q in range(count):
            n = value_sample[chosen[q]]
            a_base[q] = a1[n, j]
            z_base[q] = z1[n, j]
            step_per_h[q] = value[chosen[q]]
            w_target[q] = w[labels[n]]
        for sign in (1.0, -1.0):
            step = sign * h
            for q in range(count):  # the forward pass's activation, of the nudged a1[n, j]
                d[q] = activate(fma(step, step_per_h[q], a_base[q]), relu) - z_base[q]
                total[q] = 0.0
            for k in range(num_classes):
                wk = w[k]
                row = unit_logits[k]
                for q in range(count):
                    total[q] += exp(fma(d[q], wk, row[q]))
            for q in range(count):  # as the loss is defined: the sum over k in order 0..K-1
                loss[q] = log(total[q]) - fma(d[q], w_target[q], unit_target[q])
            if sign > 0:
                loss_plus[:count] = loss[:count]
        for q in range(count):
            difference[chosen[q]] = loss_plus[q] - loss[q]
        add_differences(first, stop, req_pixel, req_slot, pixel_start, value_id, difference, out)
