"""Splitting the flat parameter indices into shards of equal estimated cost.

The fast engine's work is organised by hidden unit: a unit's W1 column, its b1 entry and
its W2 row all start from the same unperturbed activations, and the nudged losses of one
unit's W1 entries share their evaluations across pixels of equal value. So shards are cut
from the indices taken unit by unit (W1[:, j], b1[j], W2[j, :] for j = 0, 1, ...; b2 last),
at points of equal cumulative cost; a shard holds whole units except where a cut falls
inside one.

Estimated costs: a W1 entry costs in proportion to the samples whose pixel is non-zero (for
MNIST about 19 % on average, none at the borders); a b1 entry touches every sample; a W2 or
b2 entry touches every sample too, at a lower cost per sample.
"""

from __future__ import annotations

import numpy as np

from distnum.models import ParamLayout

# Relative cost per sample touched, measured with the fast engine on real MNIST batches:
# a first-layer nudge evaluates a sigmoid and K exponentials per sign, a second-layer one
# a single exponential.
FIRST_LAYER_COST = 1.0
SECOND_LAYER_COST = 0.6


def index_costs(layout: ParamLayout, pixel_density: np.ndarray) -> np.ndarray:
    """Estimated cost (layout.size,) of each flat index, given each pixel's fraction of
    non-zero values in the training set (input_size,)."""
    slices = layout.slices
    costs = np.empty(layout.size)
    costs[slices["W1"]] = FIRST_LAYER_COST * np.repeat(pixel_density, layout.hidden_size)
    costs[slices["b1"]] = FIRST_LAYER_COST
    costs[slices["W2"].start :] = SECOND_LAYER_COST
    return costs


def unit_major_order(layout: ParamLayout) -> np.ndarray:
    """All flat indices, hidden unit by hidden unit: W1[:, j], b1[j], W2[j, :]; then b2."""
    views = layout.views(np.arange(layout.size, dtype=np.float64))
    per_unit = np.hstack([views["W1"].T, views["b1"][:, None], views["W2"]])
    return np.concatenate([per_unit.ravel(), views["b2"]]).astype(np.int64)


def make_shards(
    layout: ParamLayout, pixel_density: np.ndarray, num_shards: int
) -> list[np.ndarray]:
    """num_shards index sets of near-equal estimated cost that together hold every flat
    index once. A shard is empty only when there are more shards than indices."""
    order = unit_major_order(layout)
    cumulative = np.cumsum(index_costs(layout, pixel_density)[order])
    targets = cumulative[-1] * np.arange(1, num_shards) / num_shards
    bounds = np.concatenate([[0], np.searchsorted(cumulative, targets), [order.size]])
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
