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


class RowEntries(NamedTuple):
    """The same entries a sample at a time, as the samples' rows are computed (by several
    processes, each its own rows): row n's entries are the pixels entry_pixel[n, :count]
    with x[n, i] != 0, ascending, then the bias (I), count = entry_count[n]; entry_value[n, e]
    the index of the entry's value among the row's distinct values,
    values[n, :value_count[n]], in order of first appearance; largest[n] = max |x[n, i]|."""

    entry_pixel: np.ndarray
    entry_value: np.ndarray
    values: np.ndarray
    entry_count: np.ndarray
    value_count: np.ndarray
    largest: np.ndarray

    @classmethod
    def empty(cls, batch_size: int, input_size: int) -> RowEntries:
        return cls(np.empty((batch_size, input_size + 1), np.int32),
                   np.empty((batch_size, input_size + 1), np.int32),
                   np.empty((batch_size, input_size + 1)), np.empty(batch_size, np.int64),
                   np.empty(batch_size, np.int64), np.empty(batch_size))  # fmt: skip


def input_entries(x: np.ndarray) -> InputEntries:
    """The entries of a layer's input x (B, I)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    rows = RowEntries.empty(*x.shape)
    fill_rows(x, 0, *rows)
    return gathered(rows, x.shape[0])


def gathered(rows: RowEntries, batch_size: int) -> InputEntries:
    """The entries of the first batch_size rows, by pixel then sample."""
    value = by_value(rows.values, rows.value_count, batch_size)
    return InputEntries(*_gathered(rows.entry_pixel, rows.entry_value, rows.entry_count,
                                   rows.value_count, batch_size), value)  # fmt: skip


@numba.njit(**JIT)
def by_value(table, value_count, batch_size):
    """(V,) what table (B, W) holds for each sample value, in the order of their ids: row
    n's first value_count[n], for the first batch_size rows."""
    out = np.empty(value_count[:batch_size].sum())
    v = 0
    for n in range(batch_size):
        for k in range(value_count[n]):
            out[v] = table[n, k]
            v += 1
    return out


@numba.njit(**JIT)
def fill_rows(x, first, entry_pixel, entry_value, values, entry_count, value_count, largest):
    """RowEntries of the rows of x (R, I), into rows first, first + 1, ... of the arrays."""
    batch_size, input_size = x.shape
    # a sample's distinct values found through a small hash table of their bits: which of
    # two equal values is evaluated does not matter, their nudged networks are the same
    table_size = 1 << max(int(np.ceil(np.log2(2 * (input_size + 1)))), 4)
    slot_value = np.full(table_size, -1, dtype=np.int64)
    used_slots = np.empty(input_size + 1, dtype=np.int64)
    for r in range(batch_size):
        n = first + r
        num_used, e, num_values, peak = 0, 0, 0, 0.0
        for i in range(input_size + 1):  # this sample's entries, the bias (pixel I, 1.0) last
            v = 1.0 if i == input_size else x[r, i]
            if v == 0.0:
                continue
            if i < input_size:
                peak = max(peak, abs(v))
            bits = bits_of(v)
            slot = ((bits * -7046029254386353131) >> 40) & (table_size - 1)
            while slot_value[slot] >= 0 and values[n, slot_value[slot]] != v:
                slot = (slot + 1) & (table_size - 1)
            if slot_value[slot] < 0:
                slot_value[slot] = num_values
                used_slots[num_used] = slot
                num_used += 1
                values[n, num_values] = v
                num_values += 1
            entry_pixel[n, e] = i
            entry_value[n, e] = slot_value[slot]
            e += 1
        for u in range(num_used):
            slot_value[used_slots[u]] = -1
        entry_count[n], value_count[n], largest[n] = e, num_values, peak


@numba.njit(**JIT)
def _gathered(entry_pixel, entry_value, entry_count, value_count, batch_size):
    """pixel_start, value_id and value_sample of InputEntries from the rows."""
    input_size = entry_pixel.shape[1] - 1
    value_start = np.zeros(batch_size + 1, dtype=np.int64)
    pixel_start = np.zeros(input_size + 2, dtype=np.int64)
    for n in range(batch_size):
        value_start[n + 1] = value_start[n] + value_count[n]
        for e in range(entry_count[n]):
            pixel_start[entry_pixel[n, e] + 1] += 1
    for i in range(input_size + 1):
        pixel_start[i + 1] += pixel_start[i]
    # entries ordered by pixel, then sample (a counting sort, stable in sample order)
    fill = pixel_start[:-1].copy()
    value_id = np.empty(pixel_start[-1], dtype=np.int64)
    value_sample = np.empty(value_start[-1], dtype=np.int64)
    for n in range(batch_size):
        for e in range(entry_count[n]):
            value_id[fill[entry_pixel[n, e]]] = value_start[n] + entry_value[n, e]
            fill[entry_pixel[n, e]] += 1
        value_sample[value_start[n] : value_start[n + 1]] = n
    return pixel_start, value_id, value_sample


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
