"""What every nudge of a step starts from: the unnudged forward pass of the batch, and the
tables the delta form reads (deltas.py), computed once per step, a sample's row at a time.

    hidden, pre     z_1..z_L and a_1..a_{L+1}, the logits last: distnum.models.forward;
                    for ReLU, the a_1 that a nudge of W_1 or b_1 may carry across the kink
                    recomputed exact to an ulp (exact_near_kinks)
    rest            for the sigmoid, r_l = sigma(-a_l) = 1 - z_l, each accurate (1 - z_l
                    would lose the digits of a saturated unit)
    probabilities   p = softmax(logits) (B, K)
    moments         M_k[n, j] / k! = sum_c p[n, c] W_{L+1}[j, c]**k / k! (B, DEGREE, H_L):
                    the change of sample n's loss when the last hidden layer's unit j moves
                    by d is log1p(sum_k d**k M_k[n, j] / k!) - d W_{L+1}[j, t_n], the series
                    of sum_c p_c expm1(d W_{L+1}[j, c]) to DEGREE terms
    entries         each hidden layer's input z_0 = x, z_1, ... as its sample values
                    (sample_values.py), and its largest |value|
    value_changes   what nudging a weight of the last hidden layer does to its unit, for
                    each sample value of its input (last_hidden_layer.value_changes)

Every row depends on its sample alone, so the rows can be computed apart and put together
(StepTables): the actors of a node each compute their share of a step's rows into one
table in shared memory, and each reads all of them (distnum/node_channel.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from distnum.engines.last_hidden_layer import value_changes
from distnum.engines.sample_values import InputEntries, RowEntries, by_value, fill_rows, gathered
from distnum.functions import _softmax, sigmoid
from distnum.models import ParamLayout, forward
from distnum.vecmath import DEGREE, EXPM1_SERIES_MAX, JIT, SERIES_MAX, fma


class Unnudged(NamedTuple):
    """The tables of a batch of B: hidden[l - 1] (B, n_l) = z_l, pre[l - 1] (B, n_l) = a_l,
    rest as hidden (or None, for ReLU), probabilities (B, K), moments (B, DEGREE, n_L),
    entries[l - 1] and peaks[l - 1] the sample values of layer l's input and its largest
    |value| (for l = 1..L; None where not asked for), value_changes (2, V) for the sample
    values of entries[L - 1] (or None), labels (B,)."""

    hidden: list[np.ndarray]
    pre: list[np.ndarray]
    rest: list[np.ndarray] | None
    probabilities: np.ndarray
    moments: np.ndarray
    entries: list[InputEntries | None]
    peaks: list[float | None]
    value_changes: np.ndarray | None
    labels: np.ndarray


class StepTables:
    """The rows of the tables of a batch of up to `capacity` samples, in arrays over one
    buffer (of nbytes(layout, capacity) bytes; its own by default)."""

    def __init__(self, layout: ParamLayout, capacity: int, buffer=None) -> None:
        self.layout, self.capacity = layout, capacity
        if buffer is None:
            buffer = bytearray(self.nbytes(layout, capacity))
        arrays, offset = [], 0
        for shape, dtype in self.shapes(layout, capacity):
            count = int(np.prod(shape))
            arrays.append(np.frombuffer(buffer, dtype, count, offset).reshape(shape))
            offset += aligned(count * np.dtype(dtype).itemsize)
        depth = layout.depth
        self.pre, arrays = arrays[:depth], arrays[depth:]
        self.hidden, arrays = arrays[: depth - 1], arrays[depth - 1 :]
        self.rest, arrays = arrays[: depth - 1], arrays[depth - 1 :]
        self.probabilities, self.moments, self.changes, *arrays = arrays
        self.entries = [RowEntries(*arrays[6 * k : 6 * k + 6]) for k in range(depth - 1)]

    @staticmethod
    def shapes(layout: ParamLayout, capacity: int) -> list[tuple[tuple, type]]:
        sizes, depth = layout.sizes, layout.depth
        shapes = [((capacity, sizes[l]), np.float64) for l in range(1, depth + 1)]  # pre
        shapes += [((capacity, sizes[l]), np.float64) for l in range(1, depth)] * 2  # z, r
        shapes += [((capacity, sizes[depth]), np.float64),  # probabilities
                   ((capacity, DEGREE, sizes[depth - 1]), np.float64),  # moments
                   ((2, capacity, sizes[depth - 2] + 1), np.float64)]  # fmt: skip
        for l in range(1, depth):  # the entries of each hidden layer's input
            width = sizes[l - 1] + 1
            shapes += [((capacity, width), np.int32), ((capacity, width), np.int32),
                       ((capacity, width), np.float64), ((capacity,), np.int64),
                       ((capacity,), np.int64), ((capacity,), np.float64)]  # fmt: skip
        return shapes

    @classmethod
    def nbytes(cls, layout: ParamLayout, capacity: int) -> int:
        return sum(aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize)
                   for shape, dtype in cls.shapes(layout, capacity))  # fmt: skip

    def fill(self, params: dict[str, np.ndarray], x: np.ndarray, first: int, h: float) -> None:
        """The rows first, first + 1, ... for the checked samples x (R, I), at nudges of +-h."""
        layout, depth = self.layout, self.layout.depth
        rows = slice(first, first + x.shape[0])
        inputs, pre = forward(layout, params, x)
        if layout.activation == "relu":
            pre = [exact_near_kinks(pre[0], x, params["W1"], params["b1"], h), *pre[1:]]
        for table, value in zip(self.pre, pre, strict=True):
            table[rows] = value
        for l in range(1, depth):
            self.hidden[l - 1][rows] = inputs[l]
            if layout.activation == "sigmoid":
                self.rest[l - 1][rows] = sigmoid(-pre[l - 1])
            fill_rows(np.ascontiguousarray(inputs[l - 1]), first, *self.entries[l - 1])
        last = self.entries[depth - 2]
        value_changes(last.values, last.value_count, first, rows.stop, h,
                      layout.activation == "relu", self.changes)  # fmt: skip
        self.probabilities[rows] = probabilities = _softmax(pre[-1])
        fill_moments(probabilities, params[f"W{depth}"], self.moments[rows])

    def unnudged(self, labels: np.ndarray, nudged: set[int]) -> Unnudged:
        """The first B rows, filled, as the tables of that batch, labels (B,). The sample
        values (entries, peaks, value_changes) only of the hidden layers in nudged (1..L),
        those whose nudges a shard evaluates: None for the others (no work for tables a
        shard does not read)."""
        depth, rows = self.layout.depth, slice(0, labels.size)
        hidden = [z[rows] for z in self.hidden]
        rest = [r[rows] for r in self.rest] if self.layout.activation == "sigmoid" else None
        entries = [gathered(table, labels.size) if l in nudged else None
                   for l, table in enumerate(self.entries, start=1)]  # fmt: skip
        peaks = [float(np.max(table.largest[rows], initial=0.0)) if l in nudged else None
                 for l, table in enumerate(self.entries, start=1)]  # fmt: skip
        changes = None
        if depth - 1 in nudged:  # the last hidden layer's kernel reads them
            counts = self.entries[depth - 2].value_count
            changes = np.stack([by_value(side, counts, labels.size) for side in self.changes])
        return Unnudged(hidden, [a[rows] for a in self.pre], rest, self.probabilities[rows],
                        self.moments[rows], entries, peaks, changes, labels)  # fmt: skip


def aligned(nbytes: int) -> int:
    """nbytes rounded up to a cache line's 64: each table starts on one."""
    return -(-nbytes // 64) * 64


@numba.njit(**JIT)
def exact_near_kinks(a, x, W, b, h):
    """a (B, H), the first hidden layer's pre-activations x W + b of the batch x (B, I), with
    each that a nudge of W or b by +-h may carry across ReLU's kink recomputed exact to an
    ulp of itself; a copy. Across the kink a unit's change is -a or a + d, a itself: the
    forward pass's a, a sum of terms of about 1e-2 that cancel, is off by up to about 1e-16,
    which a central difference divides by 2h. Recomputed: x[n] . W[:, j] + b[j] in the
    order i = 0, 1, ..., then b, as a compensated sum (Ogita, Rump and Oishi's Dot2: each
    product's rounding error by an fma, each sum's by TwoSum, their total added last).
    Which: |a| <= h max(1, |x[n, i]|) (the most a nudge moves it) plus a bound on the
    forward pass's rounding, (I + 2) eps sum_i |x[n, i]| max_i |W[i, j]| + |b[j]|. The
    others are left as they are: a nudge moves them by d on one side of the kink, a
    change that does not read a."""
    batch_size, input_size = x.shape
    out = a.copy()
    column_largest = np.zeros(W.shape[1])
    for i in range(input_size):
        for j in range(W.shape[1]):
            column_largest[j] = max(column_largest[j], abs(W[i, j]))
    slack = (input_size + 2) * 2.0**-52
    for n in range(batch_size):
        largest, total_size = 1.0, 0.0
        for i in range(input_size):
            largest = max(largest, abs(x[n, i]))
            total_size += abs(x[n, i])
        for j in range(W.shape[1]):
            rounding = slack * (total_size * column_largest[j] + abs(b[j]))
            if abs(a[n, j]) > h * largest + 2.0 * rounding:
                continue
            high, low = 0.0, 0.0
            for i in range(input_size + 1):
                if i < input_size:
                    product = x[n, i] * W[i, j]
                    low += fma(x[n, i], W[i, j], -product)
                else:
                    product = b[j]
                total = high + product
                back = total - high
                low += (high - (total - back)) + (product - back)
                high = total
            out[n, j] = high + low
    return out


def largest_change(layout: ParamLayout, h: float, peak: float) -> float:
    """A bound on |d|, how far a nudge of +-h of a weight or bias of a hidden layer whose
    largest input is peak moves one of its units: h times the largest input (1 for the
    bias), times the largest slope of the activation (1/4 for the sigmoid)."""
    largest = max(1.0, peak)
    return h * largest * (0.25 if layout.activation == "sigmoid" else 1.0)


def by_moments(largest_logit_change: float) -> tuple[bool, bool]:
    """Whether S = sum_c p_c expm1(u_c) is evaluated by the moments' series (to DEGREE
    terms, which leave a remainder below half an ulp of the largest |u_c| when no logit
    moves by more than largest_logit_change), else class by class with expm1; and whether
    every S then lies in log1p's series domain (|S| <= expm1(y) <= 2 y)."""
    y = largest_logit_change
    return y <= EXPM1_SERIES_MAX, 2.0 * y <= SERIES_MAX


@numba.njit(inline="always", **JIT)
def moments_of(p, by_class, out, power):
    """out[k-1, j] = sum over the classes c, in order 0..K-1, of p[c] by_class[c, j]**k (the
    power a product at a time), then divided by k!, for k = 1..out.shape[0] and each column
    j: the coefficients of sum_c p_c expm1(d w_c) = sum_k d**k out[k-1, j] for the weights
    w = by_class[:, j] (p (K,), by_class (K, J), power (J,) room to work in)."""
    out[:, :] = 0.0
    for c in range(p.size):
        for j in range(power.size):
            power[j] = p[c]
        for k in range(out.shape[0]):
            for j in range(power.size):
                power[j] *= by_class[c, j]
                out[k, j] += power[j]
    factorial = 1.0
    for k in range(out.shape[0]):
        factorial *= k + 1
        for j in range(power.size):
            out[k, j] /= factorial


@numba.njit(**JIT)
def fill_moments(probabilities, W, out):
    """out (B, DEGREE, H) = moments_of each sample's probabilities (B, K) for the outgoing
    weights W (H, K) of every unit: M_k[n, j] / k! = sum_c p[n, c] W[j, c]**k / k!."""
    by_class = np.ascontiguousarray(W.T)  # (K, H): the loops over units contiguous
    power = np.empty(W.shape[0])
    for n in range(probabilities.shape[0]):
        moments_of(probabilities[n], by_class, out[n], power)
