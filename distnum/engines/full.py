"""The full engine: the literal algorithm of the book, one complete forward pass of the
network per nudge. The reference the fast engine is checked against."""

from __future__ import annotations

import numpy as np

from distnum.gradient import central_differences
from distnum.models import ParamLayout, batch_loss


class FullEngine:
    """Central differences of the batch loss over `indices`, by full forward passes."""

    def __init__(self, layout: ParamLayout, indices: np.ndarray) -> None:
        self.layout = layout
        self.indices = checked_indices(layout, indices)

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        params = self.layout.views(checked_params(flat))
        return central_differences(lambda _: batch_loss(params, x, labels), flat, self.indices, h)


def checked_indices(layout: ParamLayout, indices: np.ndarray) -> np.ndarray:
    """indices as an int64 array, each a valid flat parameter index of layout."""
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= layout.size):
        raise ValueError(f"parameter indices must lie in [0, {layout.size})")
    return indices


def checked_params(flat: np.ndarray) -> np.ndarray:
    if flat.dtype != np.float64:
        raise ValueError(
            f"parameters are {flat.dtype}; distnum computes in float64 only "
            "(a central difference with h = 1e-4 means nothing in float32)"
        )
    return flat
