"""Sample values: the distinct (sample, input value) pairs a hidden layer's nudges need.

Nudging W_l[i, j] by s moves a_l[n, j] by s * z[n, i], z the layer's input (the pixels for
W1, the activations below otherwise), so only samples with z[n, i] != 0 see it: zero pixels
and ReLU zeros are left out. And what sample n's nudged network computes depends on the
input only through its value z[n, i]: two inputs of one sample with the same value (many
pixels are 1.0) give the very same nudged network on that sample. So the work of a hidden
unit is organised by sample values, 1.0 included for the bias: each needed one's nudged
loss is evaluated once per sign, and every parameter it belongs to adds
l_n(+h) - l_n(-h) in sample order: the same sums, in the same order, whatever else a shard
holds.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from distnum.vecmath import JIT, bits_of


class InputEntries(NamedTuple):
    """A layer's input x (B, I) as entries (pixel i, sample n) with x[n, i] != 0, sorted by pixel
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
    for i in range(input_size + 1):
        pixel_start[i + 1] = pixel_start[i] + pixel_count[i]
    fill = pixel_start[:-1].copy()
    value_id = np.empty(e, dtype=np.int64)
    for q in range(e):
        value_id[fill[entry_pixel[q]]] = entry_value_id[q]
        fill[entry_pixel[q]] += 1
    return pixel_start, value_id, value_sample[:num_values].copy(), distinct[:num_values].copy()


@numba.njit(**JIT)
def needed_values(first, stop, req_pixel, pixel_start, value_id, needed, chosen):
    """Writes into chosen the sample values, in increasing order, that the requests
    first:stop (their pixels req_pixel) need, each once; returns how many. needed (V,) is
    all False on entry and on return."""
    for r in range(first, stop):
        for e in range(pixel_start[req_pixel[r]], pixel_start[req_pixel[r] + 1]):
            needed[value_id[e]] = True
    count = 0
    for v in range(needed.size):
        if needed[v]:
            needed[v] = False
            chosen[count] = v
            count += 1
    return count


@numba.njit(**JIT)
def add_differences(first, stop, req_pixel, req_slot, pixel_start, value_id, difference, out):
    """out[req_slot[r]] = the sum, in sample order, of difference over the sample values of
    request r's pixel, for the requests first:stop."""
    for r in range(first, stop):
        acc = 0.0
        for e in range(pixel_start[req_pixel[r]], pixel_start[req_pixel[r] + 1]):
            acc += difference[value_id[e]]
        out[req_slot[r]] = acc
