"""The full engine: the literal algorithm of the book, one complete forward pass of the
network per nudge. The reference the fast engine is checked against."""

from __future__ import annotations

import numpy as np

from distnum.engines.base import ShardEngine, checked_params
from distnum.gradient import central_differences
from distnum.models import batch_loss, checked_batch


class FullEngine(ShardEngine):
    """Central differences of the batch loss over `indices`, by full forward passes."""

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        """g (len(indices),) for the parameters flat (layout.size,), a batch x (B, I) and its
        labels, class indices (B,) or one-hot rows (B, K)."""
        x, labels = checked_batch(self.layout, x, labels)
        nudged = checked_params(flat).copy()  # a private copy: flat may be read-only
        params = self.layout.views(nudged)
        layout = self.layout
        return central_differences(
            lambda _: batch_loss(layout, params, x, labels), nudged, self.indices, h
        )
