"""Nudges of the last hidden layer (W1 and b1 of the chapter's net): what one nudge changes
is one hidden unit, for some samples.

Nudging W_L[i, j] by +-h moves a_L[n, j] by +-h z[n, i] (z the layer's input), so only
the sample values of sample_values.py see it; for each, z_L[n, j] moves by d (deltas.py),
the logits by d W_{L+1}[j, :], and the sample's loss by
    delta = log1p(S) - d W_{L+1}[j, t_n],   S = sum_c p_c expm1(d W_{L+1}[j, c]),
S from the moments of unnudged.py (its series: no exp, no log) or, where the series would
be long (a large h, large weights), class by class with expm1. A sample value's delta(+h) -
delta(-h) is computed for LANES units at once (a vector of the CPU), then each (pixel, unit)
of the shard adds those of its entries in sample order.
"""

from __future__ import annotations

import numba
import numpy as np

from distnum.engines.deltas import relu_change, sigmoid_change
from distnum.vecmath import JIT, expm1, fma, log1p, log1p_series

LANES = 8  # units whose changes the kernel adds at once: one vector


@numba.njit(**JIT)
def value_changes(values, value_count, first, stop, h, relu, out):
    """out[0, n, k] and out[1, n, k] for rows n = first..stop-1 and k < value_count[n]: what
    nudging by +h and by -h a weight whose input is values[n, k] does to the unit, as the
    kernel below takes it: m = expm1(-d) of d = +-h values[n, k] for the sigmoid, d itself
    for ReLU. A table of the step's, once per sample value."""
    for n in range(first, stop):
        for k in range(value_count[n]):
            nudge = h * values[n, k]
            out[0, n, k] = nudge if relu else expm1(-nudge)
            out[1, n, k] = -nudge if relu else expm1(nudge)


@numba.njit(inline="always", **JIT)
def moment_series(d, c):
    """c[0] d + c[1] d**2 + ... + c[5] d**6 (c a tuple), in Horner's order with fmas."""
    tail = fma(d, c[5], c[4])
    tail = fma(tail, d, c[3])
    tail = fma(tail, d, c[2])
    tail = fma(tail, d, c[1])
    return fma(tail, d, c[0]) * d


@numba.njit(inline="always", **JIT)
def loss_difference(d_plus, d_minus, c, target, short):
    """delta(+h) - delta(-h) of a sample whose unit moves by d_plus and d_minus, its loss
    by log1p(S) - d W_{L+1}[j, t_n] (target), S by the moments c (a tuple). short (a
    constant at each call): every S lies within log1p's series domain, so that log1p is its
    series with no branch and the caller's loop vectorises (the same bits as log1p there)."""
    s_plus, s_minus = moment_series(d_plus, c), moment_series(d_minus, c)
    log_plus = log1p_series(s_plus) if short else log1p(s_plus)
    log_minus = log1p_series(s_minus) if short else log1p(s_minus)
    return fma(-d_plus, target, log_plus) - fma(-d_minus, target, log_minus)


@numba.njit(**JIT)
def loss_differences(
    pixels, slot_of, first_unit, pixel_start, value_id, value_sample, value_changes,
    unit_tables, w_target, moments, W_out, probabilities, short_logs, relu, out,
):  # fmt: skip
    """out[slot_of[p, u]] = sum over the entries of pixels[p] of delta(+h) - delta(-h) for
    unit first_unit + u, where slot_of[p, u] >= 0.

    unit_tables (2, B, H): for the sigmoid s r and r of each (sample, unit), for ReLU a_L
    (twice); w_target (B, H): W_{L+1}[j, t_n]; moments (B, DEGREE, H), or (B, 0, H) for S
    class by class, from W_out (H, K) and probabilities (B, K); short_logs: whether every
    S lies in log1p's series domain (else log1p decides for each: the same bits);
    value_changes (2, V): each sample value's change (value_changes) for +h and -h."""
    num_units = slot_of.shape[1]
    batch_size = unit_tables.shape[1]
    # the sample values the shard's pixels need, each once, in order (so by sample), at
    # positions q where each sample's run starts at a multiple of LANES (the gaps nudge by 0)
    num_values = value_changes.shape[1]
    needed = np.zeros(num_values, dtype=np.bool_)
    for p in range(pixels.size):
        for e in range(pixel_start[pixels[p]], pixel_start[pixels[p] + 1]):
            needed[value_id[e]] = True
    sample_start = np.zeros(batch_size + 1, dtype=np.int64)
    for v in range(num_values):
        if needed[v]:
            sample_start[value_sample[v] + 1] += 1
    for n in range(batch_size):
        run = (sample_start[n + 1] + LANES - 1) // LANES * LANES
        sample_start[n + 1] = sample_start[n] + run
    count = sample_start[batch_size]
    index_of = np.full(num_values, -1)
    plus = np.zeros(count)  # per position: m = expm1(-d) (sigmoid) or d, for +h
    minus = np.zeros(count)  # and for -h
    fill = sample_start[:-1].copy()
    for v in range(num_values):
        if needed[v]:
            q = fill[value_sample[v]]
            fill[value_sample[v]] += 1
            index_of[v] = q
            plus[q], minus[q] = value_changes[0, v], value_changes[1, v]
    entry_position = np.empty(value_id.size, dtype=np.int64)  # each entry's q
    for e in range(value_id.size):
        entry_position[e] = index_of[value_id[e]]
    by_moments = moments.shape[1] > 0
    by_unit = np.empty((LANES, count))  # a lane's differences, as computed
    difference = np.empty((count, LANES))  # a value's, as added up
    acc = np.empty(LANES)
    for first in range(0, num_units, LANES):
        width = min(LANES, num_units - first)
        for u in range(width):
            j = first_unit + first + u
            for n in range(batch_size):
                lo, hi = sample_start[n], sample_start[n + 1]
                first_table, second_table = unit_tables[0, n, j], unit_tables[1, n, j]
                target = w_target[n, j]
                c = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
                if by_moments:
                    c = (moments[n, 0, j], moments[n, 1, j], moments[n, 2, j],
                         moments[n, 3, j], moments[n, 4, j], moments[n, 5, j])  # fmt: skip
                if by_moments and short_logs:  # the common case, with no branch: vectorised
                    if relu:
                        for q in range(lo, hi):
                            d_plus = relu_change(first_table, plus[q])
                            d_minus = relu_change(first_table, minus[q])
                            by_unit[u, q] = loss_difference(d_plus, d_minus, c, target, True)
                    else:
                        for q in range(lo, hi):
                            d_plus = sigmoid_change(first_table, second_table, plus[q])
                            d_minus = sigmoid_change(first_table, second_table, minus[q])
                            by_unit[u, q] = loss_difference(d_plus, d_minus, c, target, True)
                    continue
                for q in range(lo, hi):  # the same, each choice made for each value
                    both = 0.0
                    for change, sign in ((plus[q], 1.0), (minus[q], -1.0)):
                        if relu:
                            d = relu_change(first_table, change)
                        else:
                            d = sigmoid_change(first_table, second_table, change)
                        if by_moments:
                            total = moment_series(d, c)
                        else:  # S class by class
                            total = 0.0
                            for k in range(W_out.shape[1]):
                                total += probabilities[n, k] * expm1(d * W_out[j, k])
                        loss = fma(-d, target, log1p(total))
                        both = loss if sign > 0 else both - loss
                    by_unit[u, q] = both
        for first_q in range(0, count, LANES):  # transposed a tile at a time
            for u in range(LANES):
                for k in range(LANES):
                    difference[first_q + k, u] = by_unit[u, first_q + k]
        for p in range(pixels.size):
            acc[:] = 0.0
            for e in range(pixel_start[pixels[p]], pixel_start[pixels[p] + 1]):
                row = entry_position[e]
                for u in range(LANES):
                    acc[u] += difference[row, u]
            for u in range(width):
                slot = slot_of[p, first + u]
                if slot >= 0:
                    out[slot] = acc[u]
