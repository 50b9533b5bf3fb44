"""Nudges of W1 and b1: what one nudge changes is one hidden unit, for some samples.

Nudging W1[i, j] by s moves a1[n, j] by s * x[n, i], so only samples with x[n, i] != 0 see
it; for each of them only z1[n, j] changes, by some d, and the logits move by d * W2[j, :].
b1[j] is the same with an input of 1 for every sample.

What sample n's nudged network computes depends on the pixel only through its value
x[n, i]: two pixels of one image with the same value (many are 1.0) give the very same
nudged network on that sample. So the work is organised by "sample values", the distinct
(sample, value) pairs of the batch, 1.0 included for the bias: for each hidden unit and
sign the kernel really evaluates each needed one's nudged loss
    l_n = log(sum_k exp(a2'[n, k] - max_n)) - (a2'[n, t_n] - max_n),
once, and every parameter it belongs to adds l_n(+h) - l_n(-h) in sample order: the same
sums, in the same order, whatever else a shard holds.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from distnum.vecmath import JIT, bits_of, exp, fma, log, sigmoid


class InputEntries(NamedTuple):
    """The batch x (B, I) as entries (pixel i, sample n) with x[n, i] != 0, sorted by pixel
    then sample, followed by one bias entry per sample (pixel I, value 1).

    pixel_start (I + 2,): the entries of pixel i are pixel_start[i]:pixel_start[i + 1].
    value_id (E,): each entry's sample value, an index into value_sample and value (V,)."""

    pixel_start: np.ndarray
    value_id: np.ndarray
    value_sample: np.ndarray
    value: np.ndarray


def input_entries(x: np.ndarray) -> InputEntries:
    return InputEntries(*_input_entries(np.ascontiguousarray(x, dtype=np.float64)))


@numba.njit(**JIT)
def _input_entries(x):
    batch_size, input_size = x.shape
    # a sample's distinct values found through a small hash table of their bits: which of
    # two equal values is evaluated does not matter, their nudged networks are the same
    table_size = 1 << max(int(np.ceil(np.log2(2 * (input_size + 1)))), 4)
    slot_value_id = np.full(table_size, -1, dtype=np.int64)
    used_slots = np.empty(input_size + 1, dtype=np.int64)
    pixel_count = np.zeros(input_size + 1, dtype=np.int64)
    entry_pixel = np.empty(x.size + batch_size, dtype=np.int64)
    entry_value_id = np.empty(x.size + batch_size, dtype=np.int64)
    distinct = np.empty(x.size + batch_size)
    value_sample = np.empty(x.size + batch_size, dtype=np.int64)
    e = 0
    num_values = 0
    for n in range(batch_size):
        num_used = 0
        for i in range(input_size + 1):  # this sample's entries, the bias (pixel I, 1.0) last
            v = 1.0 if i == input_size else x[n, i]
            if v == 0.0:
                continue
            bits = bits_of(v)
            slot = ((bits * -7046029254386353131) >> 40) & (table_size - 1)
            while slot_value_id[slot] >= 0 and distinct[slot_value_id[slot]] != v:
                slot = (slot + 1) & (table_size - 1)
            if slot_value_id[slot] < 0:
                slot_value_id[slot] = num_values
                used_slots[num_used] = slot
                num_used += 1
                distinct[num_values] = v
                value_sample[num_values] = n
                num_values += 1
            entry_pixel[e] = i
            entry_value_id[e] = slot_value_id[slot]
            pixel_count[i] += 1
            e += 1
        for u in range(num_used):
            slot_value_id[used_slots[u]] = -1
    # entries ordered by pixel, then sample (a counting sort, stable in sample order)
    pixel_start = np.zeros(input_size + 2, dtype=np.int64)
    pixel_start[1:] = np.cumsum(pixel_count)
    fill = pixel_start[:-1].copy()
    value_id = np.empty(e, dtype=np.int64)
    for q in range(e):
        value_id[fill[entry_pixel[q]]] = entry_value_id[q]
        fill[entry_pixel[q]] += 1
    return pixel_start, value_id, value_sample[:num_values].copy(), distinct[:num_values].copy()


@numba.njit(**JIT)
def loss_differences(
    unit_start, req_pixel, req_slot, pixel_start, value_id, value_sample, value,
    a1, z1, shifted_logits, labels, W2, h, out,
):  # fmt: skip
    """out[slot] = sum over the entries of (pixel, unit) of l_n(+h) - l_n(-h).

    The requests (pixel, slot) for hidden unit j are req_*[unit_start[j]:unit_start[j+1]];
    a1, z1 (B, H) and shifted_logits (B, K) = a2 - max are the unperturbed forward pass,
    W2 (H, K), labels (B,)."""
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
        # the sample values this unit's requested parameters need, each once
        for r in range(first, stop):
            for e in range(pixel_start[req_pixel[r]], pixel_start[req_pixel[r] + 1]):
                needed[value_id[e]] = True
        count = 0
        for v in range(num_values):
            if needed[v]:
                needed[v] = False
                chosen[count] = v
                count += 1
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
            for q in range(count):  # the forward pass's sigmoid, of the nudged a1[n, j]
                d[q] = sigmoid(fma(step, step_per_h[q], a_base[q])) - z_base[q]
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
        for r in range(first, stop):  # in sample order within each parameter
            acc = 0.0
            for e in range(pixel_start[req_pixel[r]], pixel_start[req_pixel[r] + 1]):
                acc += difference[value_id[e]]
            out[req_slot[r]] = acc
