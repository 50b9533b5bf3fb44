"""Nudges of a hidden layer below the last (W1 and b1 of 784-100-100-10): what one nudge
changes is one unit of its layer, for some samples, and every layer above it, for those.

Nudging W_l[i, j] by +-h moves z_l[n, j] by d, only for the sample values of
sample_values.py; the changes then go up as changes (deltas.py): layer l+1's
pre-activations move by d W_{l+1}[j, :], each of its units by its own change, the layer
above by the sum of those changes times its weights, and so on; the logits by u, and the
loss by log1p(sum_c p_c expm1(u_c)) - u_t. No unmoved value is ever subtracted from a moved
one. Where z_l[n, j] stays put under both nudges (a ReLU unit at zero) the nudged network
equals the unnudged one on that sample: its delta is exactly 0, and is not evaluated.
The sample values are taken a sample at a time (at most BLOCK at once), so that a block's
changes stay in cache while every layer above is computed, and a unit above that moves for
none of them (a ReLU unit at zero) is skipped.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.engines.deltas import relu_change, sigmoid_change, sigmoid_change_by, unit_change
from distnum.engines.last_hidden_layer import loss_difference
from distnum.engines.sample_values import add_differences, needed_values
from distnum.engines.unnudged import moments_of
from distnum.vecmath import (
    DEGREE,
    EXPM1_SERIES_MAX,
    JIT,
    SERIES_MAX,
    expm1,
    expm1_series,
    fma,
    log1p,
    log1p_series,
)

BLOCK = 128

# The helpers below each work on a whole block of up to BLOCK values, so they are called, not
# inlined by numba (inline="always"): a call costs nothing beside a block's work (784-100-100-10
# ReLU: the same time per gradient either way), while inlining them would add about 15 s to
# compiling loss_differences on a fresh install.


@numba.njit(**JIT)
def moved_sums(p, W, size, change, moves, out):
    """out[q] = sum over m, in order 0, 1, ..., of change[m, q] W[m, p] (each an fma), for
    q < size: how far unit p's pre-activation (or logit p) moves with the changes of the
    layer below. Rows m that are all zero (moves[m] False) add nothing and are skipped."""
    for q in range(size):
        out[q] = 0.0
    for m in range(W.shape[0]):
        if moves[m]:
            w = W[m, p]
            for q in range(size):
                out[q] = fma(change[m, q], w, out[q])


@numba.njit(**JIT)
def any_moves(change, m, size):
    """Whether row m of change (its first size entries) holds a change."""
    for q in range(size):
        if change[m, q] != 0.0:
            return True
    return False


@numba.njit(**JIT)
def short(x, size):
    """Whether every |x[q]|, q < size, lies in the domain of vecmath's series, so that a loop
    can take the series with no branch (and vectorise): the same bits as expm1 and log1p."""
    largest = 0.0
    for q in range(size):
        largest = max(largest, abs(x[q]))
    return largest <= SERIES_MAX


@numba.njit(**JIT)
def unit_changes(relu, tables, k, p, n, size, moved, out, row):
    """out[row, q] = the change of unit p of hidden layer k (sample n) when its
    pre-activation moves by moved[q], q < size; tables[k] = (a, z, s r, r) by unit (4, n_k,
    B)."""
    table = tables[k]
    a, s, sr, r = table[0, p, n], table[1, p, n], table[2, p, n], table[3, p, n]
    if relu:
        for q in range(size):
            out[row, q] = relu_change(a, moved[q])
    elif short(moved, size):  # no move of e**-a by half: sigmoid_change_by's common case
        for q in range(size):
            out[row, q] = sigmoid_change(sr, r, expm1_series(-moved[q]))
    else:
        for q in range(size):
            out[row, q] = sigmoid_change_by(a, s, sr, r, moved[q])


@numba.njit(**JIT)
def linear_response(j, n, layer, largest, tables, weights, g, g_abs, g_next, g_abs_next, lost,
                    out):  # fmt: skip
    """For a ReLU net: whether no unit above unit j of hidden layer `layer` (0-based) can
    cross its kink on sample n when j's output moves by any d with |d| <= largest; then the
    layers above are exactly linear in d on that sample, and the logits move by exactly
    u_c = d out[c], out = W_{l+1}[j, :] restricted to the units that are active, times
    W_{l+2}, ..., to W_{L+1} (out (K,), each product and sum compensated, Neumaier's, so
    that out is exact to an ulp of itself, not of the sum of the products' sizes). The test is
    rigorous: a unit active at a > 0 stays so when a minus the most its pre-activation can
    move is above 0 (that most from sums of absolute values, g_abs, with room for the
    rounding of g), a unit at a <= 0 stays at 0 when a plus it is at most 0."""
    W = weights[0]
    for p in range(W.shape[1]):
        g[p] = W[j, p]
        g_abs[p] = abs(W[j, p])
    for k in range(len(weights) - 1):
        a = tables[layer + 1 + k]
        W_next = weights[k + 1]
        for p in range(W_next.shape[0]):
            most = largest * g_abs[p] * (1.0 + 2.0**-40) if k else largest * g_abs[p]
            if a[0, p, n] > 0.0:
                if a[0, p, n] - most <= 0.0:
                    return False
            elif a[0, p, n] + most > 0.0:
                return False
            else:  # at 0 under any such move: nothing goes through it
                g[p] = 0.0
                g_abs[p] = 0.0
        target = out if k == len(weights) - 2 else g_next
        for r in range(W_next.shape[1]):
            target[r] = 0.0
            g_abs_next[r] = 0.0
            lost[r] = 0.0
        for p in range(W_next.shape[0]):
            if g_abs[p] != 0.0:
                for r in range(W_next.shape[1]):  # each product and sum with its error kept
                    product = g[p] * W_next[p, r]
                    total = target[r] + product
                    kept = product - (total - target[r])
                    lost[r] += fma(g[p], W_next[p, r], -product) + (
                        kept if abs(target[r]) >= abs(product)
                        else (target[r] - (total - product)))  # fmt: skip
                    target[r] = total
                    g_abs_next[r] = fma(g_abs[p], abs(W_next[p, r]), g_abs_next[r])
        for r in range(W_next.shape[1]):
            target[r] += lost[r]
        if k < len(weights) - 2:
            for r in range(W_next.shape[1]):
                g[r], g_abs[r] = g_next[r], g_abs_next[r]
    return True


@numba.njit(**JIT)
def loss_differences(
    unit_start, req_pixel, req_slot, pixel_start, value_id, value_sample, value,
    layer, tables, weights, probabilities, labels, relu, h, out,
):  # fmt: skip
    """out[slot] = sum over the entries of (pixel, unit) of delta(+h) - delta(-h).

    The requests (pixel, slot) for unit j of hidden layer `layer` are
    req_*[unit_start[j]:unit_start[j+1]]; tables[k] (4, n_k, B) holds a_k, z_k, s r and r
    (= sigma(-a_k), for the sigmoid) of hidden layer k (0-based) by unit; weights W_{l+1},
    ..., W_{L+1}; probabilities (K, B) the softmax by class; labels (B,)."""
    num_values = value.size
    widest = 0
    for w in weights:
        widest = max(widest, w.shape[1])
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
    nudged = tables[layer]
    num_classes = output_weights.shape[1]
    g, g_abs = np.empty(widest), np.empty(widest)
    g_next, g_abs_next, lost = np.empty(widest), np.empty(widest), np.empty(widest)
    column = np.empty((num_classes, 1))  # the logits' response to d, as moments_of reads it
    response = column[:, 0]
    moment_column, power = np.empty((DEGREE, 1)), np.empty(1)
    moments = moment_column[:, 0]
    largest_input = np.ones(value_sample[-1] + 1 if value_sample.size else 0)
    for v in range(num_values):  # |d| <= h |input| for ReLU: the most a unit moves, by sample
        largest_input[value_sample[v]] = max(largest_input[value_sample[v]], abs(value[v]))
    for j in range(unit_start.size - 1):
        first, stop = unit_start[j], unit_start[j + 1]
        if first == stop:
            continue
        count = needed_values(first, stop, req_pixel, pixel_start, value_id, needed, chosen)
        moved = 0
        a, s, sr, r = nudged[0, j], nudged[1, j], nudged[2, j], nudged[3, j]
        for q in range(count):  # unit j's change under each nudge
            v = chosen[q]
            n = value_sample[v]
            plus = unit_change(relu, a[n], s[n], sr[n], r[n], h * value[v])
            minus = unit_change(relu, a[n], s[n], sr[n], r[n], -h * value[v])
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
            largest = h * largest_input[n]
            if relu and linear_response(j, n, layer, largest, tables, weights, g, g_abs,
                                        g_next, g_abs_next, lost, response):  # fmt: skip
                y = 0.0
                for c in range(num_classes):
                    y = max(y, largest * abs(response[c]))
                if y <= EXPM1_SERIES_MAX:  # (else: propagated below, unit by unit)
                    moments_of(probabilities[:, n], column, moment_column, power)
                    # the logits move by d response: delta = log1p(S) - d response[t_n]
                    c = (moments[0], moments[1], moments[2], moments[3], moments[4], moments[5])
                    target_response = response[labels[n]]
                    for q in range(size):
                        difference[moving[block + q]] = loss_difference(
                            change_plus[block + q], change_minus[block + q], c,
                            target_response, False)  # fmt: skip
                    block += size
                    continue
            for sign in (1.0, -1.0):
                source = change_plus if sign > 0 else change_minus
                for q in range(size):
                    d[q] = source[block + q]
                W = weights[0]
                for m in range(W.shape[1]):  # the layer above: a_{l+1} moves by d W_{l+1}[j]
                    w = W[j, m]
                    for q in range(size):
                        acc[q] = d[q] * w
                    unit_changes(relu, tables, layer + 1, m, n, size, acc, change, m)
                    moves[m] = any_moves(change, m, size)
                for k in range(1, len(weights) - 1):  # each layer above that
                    W = weights[k]
                    for p in range(W.shape[1]):
                        moved_sums(p, W, size, change, moves, acc)
                        unit_changes(relu, tables, layer + 1 + k, p, n, size, acc,
                                     change_next, p)  # fmt: skip
                        moves_next[p] = any_moves(change_next, p, size)
                    change, change_next = change_next, change
                    moves, moves_next = moves_next, moves
                for q in range(size):
                    total[q] = 0.0
                label = labels[n]
                for c in range(output_weights.shape[1]):  # the sum over c in order 0..K-1
                    moved_sums(c, output_weights, size, change, moves, acc)
                    pc = probabilities[c, n]
                    if short(acc, size):
                        for q in range(size):
                            total[q] += pc * expm1_series(acc[q])
                    else:
                        for q in range(size):
                            total[q] += pc * expm1(acc[q])
                    if c == label:
                        for q in range(size):
                            target[q] = acc[q]
                if short(total, size):
                    for q in range(size):
                        acc[q] = log1p_series(total[q]) - target[q]
                else:
                    for q in range(size):
                        acc[q] = log1p(total[q]) - target[q]
                for q in range(size):
                    if sign > 0:
                        loss_plus[q] = acc[q]
                    else:
                        difference[moving[block + q]] = loss_plus[q] - acc[q]
            block += size
        add_differences(first, stop, req_pixel, req_slot, pixel_start, value_id, difference, out)
