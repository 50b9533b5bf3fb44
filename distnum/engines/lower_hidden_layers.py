"""Nudges of a hidden layer below the last (W1 and b1 of 784-100-100-10): what one nudge
changes is one unit of its layer, for some samples, and every layer above it, for those.

Nudging W_l[i, j] by s changes z_l[n, j] by some d, only for the sample values of
sample_values.py; the next layer's pre-activations then move by d * W_{l+1}[j, :], and
each layer above is recomputed for that sample from the change below it (a unit whose
output does not move adds nothing), up to the logits. Where z_l[n, j] stays put under both
nudges (a ReLU unit at zero, or a saturated sigmoid) the nudged network equals the
unnudged one on that sample: its l_n(+h) - l_n(-h) is exactly 0, not an approximation, and
is not evaluated. The others are, each once per sign, as the loss is defined:
    l_n = log(sum_k exp(a'[n, k] - max_n)) - (a'[n, t_n] - max_n).
The sample values are taken a sample at a time (at most BLOCK at once), so that a block's
changes stay in cache while every layer above is recomputed, and a unit above that moves
for none of them (a ReLU unit at zero) is skipped.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.engines.sample_values import add_differences, needed_values
from distnum.vecmath import JIT, activate, exp, fma, log

BLOCK = 128


@numba.njit(inline="always", **JIT)
def moved_sums(p, W, base, n, size, change, moves, out):
    """out[q] = base[p, n] + sum over m, in order 0, 1, ..., of change[m, q] W[m, p] (each an
    fma), for q < size: unit p's pre-activation (or logit) for sample n, moved by the changes
    of the layer below. Rows m of change that are all zero (moves[m] False) add nothing and
    are skipped: a ReLU unit that stays at zero."""
    for q in range(size):
        out[q] = base[p, n]
    for m in range(W.shape[0]):
        if moves[m]:
            w = W[m, p]
            for q in range(size):
                out[q] = fma(change[m, q], w, out[q])


@numba.njit(inline="always", **JIT)
def any_moves(change, m, size):
    """Whether row m of change (its first size entries) holds a change."""
    for q in range(size):
        if change[m, q] != 0.0:
            return True
    return False


@numba.njit(**JIT)
def loss_differences(
    unit_start, req_pixel, req_slot, pixel_start, value_id, value_sample, value,
    pre, post, weights, pre_above, post_above, shifted_logits, labels, relu, h, out,
):  # fmt: skip
    """out[slot] = sum over the entries of (pixel, unit) of l_n(+h) - l_n(-h).

    The requests (pixel, slot) for unit j are req_*[unit_start[j]:unit_start[j+1]]; pre,
    post (B, n_l) are the nudged layer's a_l and z_l; weights W_{l+1}, ..., W_{L+1}; pre_above
    and post_above a_k and z_k transposed (n_k, B) for k = l+1..L; shifted_logits
    transposed (K, B); labels (B,); relu whether the activation is ReLU (else the sigmoid)."""
    num_values = value.size
    widest = 0
    for layer in range(len(weights)):
        widest = max(widest, weights[layer].shape[1])
    needed = np.zeros(num_values, dtype=np.bool_)
    chosen = np.empty(num_values, dtype=np.int64)
    moving = np.empty(num_values, dtype=np.int64)
    change_plus = np.empty(num_values)
    change_minus = np.empty(num_values)
    difference = np.empty(num_values)
    change = np.empty((widest, BLOCK))
    change_next = np.empty((widest, BLOCK))
    moves = np.empty(widest, dtype=np.bool_)
    moves_next = np.empty(widest, dtype=np.bool_)
    d = np.empty(BLOCK)
    acc = np.empty(BLOCK)
    total = np.empty(BLOCK)
    target = np.empty(BLOCK)
    loss_plus = np.empty(BLOCK)
    output_weights = weights[len(weights) - 1]
    for j in range(unit_start.size - 1):
        first, stop = unit_start[j], unit_start[j + 1]
        if first == stop:
            continue
        count = needed_values(first, stop, req_pixel, pixel_start, value_id, needed, chosen)
        moved = 0
        for q in range(count):  # the forward pass's activation, of the nudged a_l[n, j]
            v = chosen[q]
            n = value_sample[v]
            plus = activate(fma(h, value[v], pre[n, j]), relu) - post[n, j]
            minus = activate(fma(-h, value[v], pre[n, j]), relu) - post[n, j]
            difference[v] = 0.0
            if plus != 0.0 or minus != 0.0:
                moving[moved], change_plus[moved], change_minus[moved] = v, plus, minus
                moved += 1
        block = 0
        while block < moved:  # one sample's moving values at a time
            n = value_sample[moving[block]]
            size = 1
            while (size < BLOCK and block + size < moved
                   and value_sample[moving[block + size]] == n):  # fmt: skip
                size += 1
            for sign in (1.0, -1.0):
                source = change_plus if sign > 0 else change_minus
                for q in range(size):
                    d[q] = source[block + q]
                W, A, Z = weights[0], pre_above[0], post_above[0]
                for m in range(W.shape[1]):  # the layer above: a_{l+1} moves by d * W_{l+1}[j]
                    w, a, z = W[j, m], A[m, n], Z[m, n]
                    for q in range(size):
                        change[m, q] = activate(fma(d[q], w, a), relu) - z
                    moves[m] = any_moves(change, m, size)
                for layer in range(1, len(weights) - 1):  # each layer above that
                    W, A, Z = weights[layer], pre_above[layer], post_above[layer]
                    for p in range(W.shape[1]):
                        moved_sums(p, W, A, n, size, change, moves, acc)
                        z = Z[p, n]
                        for q in range(size):
                            change_next[p, q] = activate(acc[q], relu) - z
                        moves_next[p] = any_moves(change_next, p, size)
                    change, change_next = change_next, change
                    moves, moves_next = moves_next, moves
                for q in range(size):
                    total[q] = 0.0
                label = labels[n]
                for k in range(output_weights.shape[1]):  # the sum over k in order 0..K-1
                    moved_sums(k, output_weights, shifted_logits, n, size, change, moves, acc)
                    for q in range(size):
                        total[q] += exp(acc[q])
                    if k == label:
                        for q in range(size):
                            target[q] = acc[q]
                for q in range(size):
                    loss = log(total[q]) - target[q]
                    if sign > 0:
                        loss_plus[q] = loss
                    else:
                        difference[moving[block + q]] = loss_plus[q] - loss
            block += size
        add_differences(first, stop, req_pixel, req_slot, pixel_start, value_id, difference, out)
