"""Splitting the flat parameter indices into shards of equal estimated cost.

The fast engine's work is organised by hidden unit: a unit's incoming weights and its bias
start from the same unperturbed activations, and the nudged losses of one unit's inputs
share their evaluations across inputs of equal value. So shards are cut from the indices in
the order the engine walks them, layer by layer and unit by unit (W_l[:, j], b_l[j]; for
the last hidden layer also its outgoing row W_{L+1}[j, :]; b_{L+1} last), at points of
equal cumulative cost; a shard holds whole units except where a cut falls inside one.

Estimated cost of an index: the samples it touches times the work of one evaluation of its
layer. A W1 entry touches the samples whose pixel is non-zero (for MNIST about 19 % on
average, none at the borders), a deeper weight or a bias every sample (ReLU zeros are not
known in advance); an evaluation in the last hidden layer costs HIDDEN_LAYER_COST, one below
it that plus the layers above it recomputed, one in the output layer OUTPUT_LAYER_COST.
"""

from __future__ import annotations

import numpy as np

from distnum.models import ParamLayout

# Relative cost per sample touched, measured with the fast engine on real MNIST batches:
# a last-hidden-layer nudge evaluates an activation and K exponentials per sign, an
# output-layer one a single exponential; FMAS_PER_EXP multiply-adds cost about one exp.
HIDDEN_LAYER_COST = 1.0
OUTPUT_LAYER_COST = 0.6
FMAS_PER_EXP = 8.0


def evaluation_cost(layout: ParamLayout, layer: int) -> float:
    """The estimated cost of one nudged sample in hidden layer `layer` (1..L)."""
    sizes = layout.sizes
    above = sum(sizes[k] * sizes[k + 1] for k in range(layer + 1, layout.depth))
    return HIDDEN_LAYER_COST * (1.0 + above / FMAS_PER_EXP / (layout.output_size + 1))


def index_costs(layout: ParamLayout, pixel_density: np.ndarray) -> np.ndarray:
    """Estimated cost (layout.size,) of each flat index, given each pixel's fraction of
    non-zero values in the training set (input_size,)."""
    slices, sizes = layout.slices, layout.sizes
    costs = np.empty(layout.size)
    for layer in range(1, layout.depth):
        cost = evaluation_cost(layout, layer)
        density = pixel_density if layer == 1 else np.ones(sizes[layer - 1])
        costs[slices[f"W{layer}"]] = cost * np.repeat(density, sizes[layer])
        costs[slices[f"b{layer}"]] = cost
    costs[slices[f"W{layout.depth}"].start :] = OUTPUT_LAYER_COST
    return costs


def unit_major_order(layout: ParamLayout) -> np.ndarray:
    """All flat indices, layer by layer and unit by unit: W_l[:, j], b_l[j] (and for the
    last hidden layer W_{L+1}[j, :]); then b_{L+1}."""
    views = layout.views(np.arange(layout.size, dtype=np.float64))
    depth, parts = layout.depth, []
    for layer in range(1, depth):
        per_unit = [views[f"W{layer}"].T, views[f"b{layer}"][:, None]]
        if layer == depth - 1:
            per_unit.append(views[f"W{depth}"])
        parts.append(np.hstack(per_unit).ravel())
    parts.append(views[f"b{depth}"])
    return np.concatenate(parts).astype(np.int64)


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
