"""The fast engine: the same central differences as the full one, each nudged loss
evaluated by reusing everything the nudge leaves alone (DESIGN.md sections 3 and 10).

Per call: one unperturbed forward pass, then, over only the indices of the shard, the
kernel of each layer the shard's indices fall in:
    lower_hidden_layers.py  a hidden layer below the last: its unit, and every layer above
    last_hidden_layer.py    the last hidden layer (W1, b1 of the chapter's net): its unit,
                            and the logits by d * W_{L+1}[j, :]
    output_layer.py         the output layer (W2, b2 of the chapter's net): one logit column
The weight decay term changes only in the nudged weight's square; that one term is
evaluated at both nudges, the others are equal and cancel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba.typed import List

from distnum.engines import last_hidden_layer, lower_hidden_layers, output_layer
from distnum.engines.base import ShardEngine, checked_params
from distnum.engines.sample_values import input_entries
from distnum.functions import shifted_logits
from distnum.gradient import check_h
from distnum.models import ParamLayout, checked_batch, checked_inputs, forward


class HiddenRequests(NamedTuple):
    """A shard's indices in hidden layer `layer` (1..L), grouped by unit: unit j's are
    pixel[unit_start[j]:unit_start[j + 1]] (W_l[i, j] as input i, b_l[j] as input n_{l-1}),
    their positions in the shard slot[...] likewise."""

    layer: int
    unit_start: np.ndarray
    pixel: np.ndarray
    slot: np.ndarray


class FastEngine(ShardEngine):
    """Central differences of the batch loss over `indices`, by incremental evaluation.

    The shard's indices are sorted into the kernels' order once, here."""

    def __init__(self, layout: ParamLayout, indices: np.ndarray) -> None:
        super().__init__(layout, indices)
        indices = self.indices
        self.size = indices.size
        slices, sizes = layout.slices, layout.sizes
        self.hidden = []
        for layer in range(1, layout.depth):
            start, stop = slices[f"W{layer}"].start, slices[f"b{layer}"].stop
            slot = np.flatnonzero((indices >= start) & (indices < stop))
            if slot.size:
                pixel, unit = np.divmod(indices[slot] - start, sizes[layer])
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

    def work(self, flat: np.ndarray, x: np.ndarray) -> dict[str, int]:
        """What one call at the parameters flat on the batch x (B, I) evaluates at most (a
        lower layer's unit that stays put is skipped): nudged per-sample losses, exp (the
        sigmoid's included) and log. A hidden-layer nudge of unit j is evaluated once per
        sample value its shard's inputs need; an output-layer one once per sample, one exp
        and one log."""
        layout, batch = self.layout, checked_inputs(self.layout, x)
        inputs = forward(layout, layout.views(checked_params(flat)), batch).inputs
        sigmoid = layout.activation == "sigmoid"
        hidden = exp_count = 0
        for requests in self.hidden:
            entries = input_entries(inputs[requests.layer - 1])
            evaluated = 0
            for j in range(requests.unit_start.size - 1):
                pixels = requests.pixel[requests.unit_start[j] : requests.unit_start[j + 1]]
                if pixels.size:
                    ranges = [entries.value_id[entries.pixel_start[i] : entries.pixel_start[i + 1]]
                              for i in pixels]  # fmt: skip
                    evaluated += 2 * np.unique(np.concatenate(ranges)).size
            above = layout.sizes[requests.layer + 1 : layout.depth]  # the hidden layers above
            activations = 1 + sum(above) if sigmoid else 0
            hidden += evaluated
            exp_count += evaluated * (layout.output_size + activations)
        output = 2 * self.output_slot.size * x.shape[0]
        return {"nudged_losses": hidden + output, "exp": exp_count + output,
                "log": hidden + output}  # fmt: skip

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        """g (len(indices),) for the parameters flat (layout.size,), a batch x (B, I) and its
        labels, class indices (B,) or one-hot rows (B, K)."""
        h = check_h(h)
        layout = self.layout
        params = layout.views(checked_params(flat))
        x, labels = checked_batch(layout, x, labels)
        inputs, pre = forward(layout, params, x)  # the one forward pass the nudges start from
        shifted = shifted_logits(pre[-1])
        relu = layout.activation == "relu"
        depth = layout.depth
        sums = np.zeros(self.size)
        if any(requests.layer < depth - 1 for requests in self.hidden):
            # what lower_hidden_layers reads, laid out once for every lower layer: the layers
            # above it by unit (n_k, B), and the logits by class (K, B)
            pre_by_unit = [np.ascontiguousarray(a.T) for a in pre[:-1]]
            post_by_unit = [np.ascontiguousarray(z.T) for z in inputs]
            logits_by_class = np.ascontiguousarray(shifted.T)
        for requests in self.hidden:
            layer = requests.layer
            common = (requests.unit_start, requests.pixel, requests.slot,
                      *input_entries(inputs[layer - 1]), pre[layer - 1], inputs[layer])  # fmt: skip
            if layer == depth - 1:
                last_hidden_layer.loss_differences(
                    *common, shifted, labels, params[f"W{depth}"], relu, h, sums
                )
            else:
                above = range(layer + 1, depth)
                lower_hidden_layers.loss_differences(
                    *common,
                    List([params[f"W{k}"] for k in range(layer + 1, depth + 1)]),
                    List([pre_by_unit[k - 1] for k in above]),
                    List([post_by_unit[k] for k in above]),
                    logits_by_class, labels, relu, h, sums,
                )  # fmt: skip
        if self.output_slot.size:
            output_sums = np.empty(self.output_slot.size)
            output_layer.loss_differences(
                self.output_unit, self.output_class, inputs[-1], shifted, labels, h, output_sums
            )
            sums[self.output_slot] = output_sums
        gradient = sums / (2.0 * h * x.shape[0])
        if layout.weight_decay and self.weight_slot.size:
            half_decay = 0.5 * layout.weight_decay
            w = flat[self.weight_index]
            plus, minus = w + h, w - h  # the nudged weights, as the full engine makes them
            nudged_terms = half_decay * (plus * plus) - half_decay * (minus * minus)
            gradient[self.weight_slot] += nudged_terms / (2.0 * h)
        return gradient
