"""The fast engine: the central differences of the full one, each nudged loss evaluated as
the exact change it makes (the delta form, deltas.py), reusing everything the nudge leaves
alone (DESIGN.md sections 3, 10 and 11).

Per call: the unnudged pass and its tables (unnudged.py; over Ray, filled by the node's
actors together, and from_tables is called), then, over only the indices of the shard, the
kernel of each layer the shard's indices fall in:
    lower_hidden_layers.py  a hidden layer below the last: its unit, and every layer above
    last_hidden_layer.py    the last hidden layer (W1, b1 of the chapter's net): its unit,
                            and the logits by d * W_{L+1}[j, :]
    output_layer.py         the output layer (W2, b2 of the chapter's net): one logit column
The weight decay term changes only in the nudged weight's square, by exactly
0.5 lambda ((w + h)**2 - w**2) = lambda h (w + h / 2) (and likewise for -h).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba.typed import List

from distnum.engines import last_hidden_layer, lower_hidden_layers, output_layer
from distnum.engines.base import ShardEngine, checked_params
from distnum.engines.sample_values import input_entries
from distnum.engines.unnudged import StepTables, Unnudged, by_moments, largest_change
from distnum.gradient import check_h
from distnum.models import ParamLayout, checked_batch, checked_inputs, forward
from distnum.vecmath import SERIES_MAX


class HiddenRequests(NamedTuple):
    """A shard's indices in hidden layer `layer` (1..L-1, below the last), grouped by unit:
    unit j's are pixel[unit_start[j]:unit_start[j + 1]] (W_l[i, j] as input i, b_l[j] as
    input n_{l-1}), their positions in the shard slot[...] likewise."""

    layer: int
    unit_start: np.ndarray
    pixel: np.ndarray
    slot: np.ndarray


class LastHiddenRequests(NamedTuple):
    """A shard's indices in the last hidden layer, as a table: the inputs it nudges
    (pixels, ascending; the bias as input n_{L-1}) by the units first_unit, first_unit + 1,
    ..., with slot_of[p, u] the position in the shard of (pixels[p], first_unit + u), or -1."""

    pixels: np.ndarray
    first_unit: int
    slot_of: np.ndarray


class FastEngine(ShardEngine):
    """Central differences of the batch loss over `indices`, by incremental evaluation.

    The shard's indices are sorted into the kernels' order once, here."""

    def __init__(self, layout: ParamLayout, indices: np.ndarray) -> None:
        super().__init__(layout, indices)
        indices = self.indices
        self.size = indices.size
        slices, sizes = layout.slices, layout.sizes
        self.hidden = []
        self.last_hidden = None
        for layer in range(1, layout.depth):
            start, stop = slices[f"W{layer}"].start, slices[f"b{layer}"].stop
            slot = np.flatnonzero((indices >= start) & (indices < stop))
            if not slot.size:
                continue
            pixel, unit = np.divmod(indices[slot] - start, sizes[layer])
            if layer == layout.depth - 1:
                pixels, row = np.unique(pixel, return_inverse=True)
                first_unit = int(unit.min())
                slot_of = np.full((pixels.size, int(unit.max()) + 1 - first_unit), -1)
                slot_of[row, unit - first_unit] = slot
                self.last_hidden = LastHiddenRequests(pixels, first_unit, slot_of)
            else:
                order = np.lexsort((pixel, unit))
                unit_start = np.searchsorted(unit[order], np.arange(sizes[layer] + 1))
                self.hidden.append(HiddenRequests(layer, unit_start, pixel[order], slot[order]))
        # W_{L+1}[j, c] is flat start + j * K + c; b_{L+1}[c] reads as "unit n_L"
        output_start = slices[f"W{layout.depth}"].start
        self.output_slot = np.flatnonzero(indices >= output_start)
        self.output_unit, self.output_class = np.divmod(
            indices[self.output_slot] - output_start, layout.output_size
        )
        weights = np.zeros(layout.size, dtype=np.bool_)
        for layer in range(1, layout.depth + 1):
            weights[slices[f"W{layer}"]] = True
        self.weight_slot = np.flatnonzero(weights[indices])
        self.weight_index = indices[self.weight_slot]
        self.tables: StepTables | None = None  # this process's, for calls with a batch
        # the hidden layers whose sample values the kernels read
        self.nudged_layers = {requests.layer for requests in self.hidden}
        if self.last_hidden is not None:
            self.nudged_layers.add(layout.depth - 1)

    def work(self, flat: np.ndarray, x: np.ndarray) -> dict[str, int]:
        """What one call at the parameters flat on the batch x (B, I) evaluates at most (a
        lower layer's unit that stays put is skipped): nudged per-sample losses, each as its
        change. A hidden-layer nudge of unit j is evaluated once per sample value its
        shard's inputs need; an output-layer one once per sample."""
        layout, batch = self.layout, checked_inputs(self.layout, x)
        inputs = forward(layout, layout.views(checked_params(flat)), batch).inputs

        def values(entries, pixels: np.ndarray) -> int:  # the sample values pixels need
            ranges = [entries.value_id[entries.pixel_start[i] : entries.pixel_start[i + 1]]
                      for i in pixels]  # fmt: skip
            return np.unique(np.concatenate(ranges)).size if ranges else 0

        hidden = 0
        for requests in self.hidden:
            entries = input_entries(inputs[requests.layer - 1])
            for j in range(requests.unit_start.size - 1):
                pixels = requests.pixel[requests.unit_start[j] : requests.unit_start[j + 1]]
                hidden += 2 * values(entries, pixels)
        if self.last_hidden is not None:  # each of its units, for every value its pixels need
            entries = input_entries(inputs[layout.depth - 2])
            units = self.last_hidden.slot_of.shape[1]
            hidden += 2 * values(entries, self.last_hidden.pixels) * units
        return {"nudged_losses": hidden + 2 * self.output_slot.size * x.shape[0]}

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        """g (len(indices),) for the parameters flat (layout.size,), a batch x (B, I) and its
        labels, class indices (B,) or one-hot rows (B, K)."""
        h = check_h(h)
        params = self.layout.views(checked_params(flat))
        x, labels = checked_batch(self.layout, x, labels)
        if self.tables is None or self.tables.capacity < x.shape[0]:  # kept: 1-2 MB each time
            self.tables = StepTables(self.layout, x.shape[0])
        self.tables.fill(params, x, 0, h)
        return self.from_tables(flat, self.tables, labels, h)

    def from_tables(self, flat: np.ndarray, tables: StepTables, labels: np.ndarray,
                    h: float) -> np.ndarray:  # fmt: skip
        """g as __call__ gives it, from the tables at flat of the batch whose class indices
        are labels (B,), their first B rows filled (unnudged.py), checked."""
        layout = self.layout
        params = layout.views(checked_params(flat))
        base = tables.unnudged(labels, self.nudged_layers)
        sums = np.zeros(self.size)
        if self.hidden:
            self.lower_layers(params, base, h, sums)
        if self.last_hidden is not None:
            self.last_layer(params, base, h, sums)
        if self.output_slot.size:
            self.output_layer(base, h, sums)
        gradient = sums / (2.0 * h * base.labels.size)
        if layout.weight_decay and self.weight_slot.size:
            decay = layout.weight_decay
            w = flat[self.weight_index]
            plus, minus = decay * h * (w + 0.5 * h), -decay * h * (w - 0.5 * h)
            gradient[self.weight_slot] += (plus - minus) / (2.0 * h)
        return gradient

    def lower_layers(self, params: dict, base: Unnudged, h: float, sums: np.ndarray) -> None:
        """The nudges of the hidden layers below the last, into sums."""
        layout, depth = self.layout, self.layout.depth
        relu = layout.activation == "relu"
        tables = List()  # by unit: a, z, s r and r of each hidden layer (B columns)
        for k in range(depth - 1):
            a, z = base.pre[k], base.hidden[k]
            r = np.zeros_like(a) if relu else base.rest[k]
            tables.append(np.ascontiguousarray(np.stack([a.T, z.T, (z * r).T, r.T])))
        probabilities = np.ascontiguousarray(base.probabilities.T)
        for requests in self.hidden:
            layer = requests.layer
            lower_hidden_layers.loss_differences(
                requests.unit_start, requests.pixel, requests.slot,
                *base.entries[layer - 1], layer - 1, tables,
                List([params[f"W{k}"] for k in range(layer + 1, depth + 1)]),
                probabilities, base.labels, relu, h, sums,
            )  # fmt: skip

    def last_layer(self, params: dict, base: Unnudged, h: float, sums: np.ndarray) -> None:
        """The nudges of the last hidden layer, into sums."""
        layout, depth = self.layout, self.layout.depth
        relu = layout.activation == "relu"
        a, z = base.pre[depth - 2], base.hidden[depth - 2]
        W_out = params[f"W{depth}"]
        if relu:
            unit_tables = np.stack([a, a])
        else:
            r = base.rest[depth - 2]
            unit_tables = np.stack([z * r, r])
        w_target = np.ascontiguousarray(W_out.T[base.labels])
        peak = base.peaks[depth - 2]
        largest_logit_change = largest_change(layout, h, peak) * np.max(np.abs(W_out))
        moments_first, short_logs = by_moments(largest_logit_change)
        moments = base.moments if moments_first else np.empty((base.labels.size, 0, W_out.shape[0]))
        requests, entries = self.last_hidden, base.entries[depth - 2]
        last_hidden_layer.loss_differences(
            requests.pixels, requests.slot_of, requests.first_unit, entries.pixel_start,
            entries.value_id, entries.value_sample, base.value_changes, unit_tables, w_target,
            moments, W_out, base.probabilities, short_logs, relu, sums,
        )  # fmt: skip

    def output_layer(self, base: Unnudged, h: float, sums: np.ndarray) -> None:
        """The nudges of the output layer, into sums."""
        z = base.hidden[-1]
        short = h * max(1.0, float(np.max(np.abs(z)))) <= SERIES_MAX  # every u, and p expm1(u)
        output_sums = np.empty(self.output_slot.size)
        output_layer.loss_differences(
            self.output_unit, self.output_class, z, base.probabilities, base.labels, h, short,
            output_sums,
        )  # fmt: skip
        sums[self.output_slot] = output_sums
