"""The fast engine: the same central differences as the full one, each nudged loss
evaluated by reusing everything the nudge leaves alone (DESIGN.md section 3).

Per call: one unperturbed forward pass, then first_layer.py evaluates the nudges of W1 and
b1 and second_layer.py those of W2 and b2, each over only the indices of the shard.
"""

from __future__ import annotations

import numpy as np

from distnum.engines import first_layer, second_layer
from distnum.engines.base import checked_indices, checked_params
from distnum.functions import shifted_logits
from distnum.gradient import check_h
from distnum.models import ParamLayout, checked_batch, forward


class FastEngine:
    """Central differences of the batch loss over `indices`, by incremental evaluation.

    The shard's indices are sorted into the kernels' order once, here."""

    def __init__(self, layout: ParamLayout, indices: np.ndarray) -> None:
        self.layout = layout
        indices = checked_indices(layout, indices)
        self.size = indices.size
        hidden_size, w2_start = layout.hidden_size, layout.slices["W2"].start
        # W1[i, j] is flat i * H + j; b1[j] follows W1 and so reads as "pixel I" of unit j
        first = np.flatnonzero(indices < w2_start)
        pixel, unit = np.divmod(indices[first], hidden_size)
        order = np.lexsort((pixel, unit))
        self.unit_start = np.searchsorted(unit[order], np.arange(hidden_size + 1))
        self.first_pixel, self.first_slot = pixel[order], first[order]
        # W2[j, c] is flat W2.start + j * K + c; b2[c] follows W2 and so reads as "unit H"
        self.second_slot = np.flatnonzero(indices >= w2_start)
        self.second_unit, self.second_class = np.divmod(
            indices[self.second_slot] - w2_start, layout.output_size
        )

    def work(self, x: np.ndarray) -> dict[str, int]:
        """What one call on the batch x (B, I) evaluates: nudged per-sample losses, exp
        (the sigmoid's included) and log. A first-layer nudge of unit j is evaluated once
        per sample value its shard's pixels need, then costs K + 1 exp and one log; a
        second-layer one once per sample, one exp and one log."""
        entries = first_layer.input_entries(np.ascontiguousarray(x, dtype=np.float64))
        first = 0
        for j in range(self.layout.hidden_size):
            pixels = self.first_pixel[self.unit_start[j] : self.unit_start[j + 1]]
            if pixels.size:
                ranges = [entries.value_id[entries.pixel_start[i] : entries.pixel_start[i + 1]]
                          for i in pixels]  # fmt: skip
                first += 2 * np.unique(np.concatenate(ranges)).size
        second = 2 * self.second_slot.size * x.shape[0]
        classes = self.layout.output_size
        return {"nudged_losses": first + second, "exp": first * (classes + 1) + second,
                "log": first + second}  # fmt: skip

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        """g (len(indices),) for the parameters flat (layout.size,), a batch x (B, I) and its
        labels, class indices (B,) or one-hot rows (B, K)."""
        h = check_h(h)
        params = self.layout.views(checked_params(flat))
        x, labels = checked_batch(self.layout, x, labels)
        a1, z1, a2 = forward(params, x)  # the one forward pass the nudges start from
        shifted = shifted_logits(a2)
        sums = np.zeros(self.size)
        if self.first_slot.size:
            first_layer.loss_differences(
                self.unit_start, self.first_pixel, self.first_slot,
                *first_layer.input_entries(x),
                a1, z1, shifted, labels, params["W2"], h, sums,
            )  # fmt: skip
        if self.second_slot.size:
            second_sums = np.empty(self.second_slot.size)
            second_layer.loss_differences(
                self.second_unit, self.second_class, z1, shifted, labels, h, second_sums
            )
            sums[self.second_slot] = second_sums
        return sums / (2.0 * h * x.shape[0])
