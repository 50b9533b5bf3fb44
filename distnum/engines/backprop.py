"""The backprop engine: not a central difference, the analytic gradient of the shard's
indices, for reference runs: the same net, batches and optimizer as a numerical run, so
that the two runs differ in their gradients alone (`distnum train --engine backprop`).

Its matrix products are numpy's BLAS, whose bits may differ between machines; each shard
computes the whole gradient and keeps its slice."""

from __future__ import annotations

import numpy as np

from distnum.engines.base import ShardEngine, checked_params
from distnum.models import backprop, checked_batch


class BackpropEngine(ShardEngine):
    """Backprop's gradient over `indices`, called as the other engines are (h unused)."""

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        """g (len(indices),) for the parameters flat (layout.size,), a batch x (B, I) and its
        labels, class indices (B,) or one-hot rows (B, K)."""
        params = self.layout.views(checked_params(flat))
        x, labels = checked_batch(self.layout, x, labels)
        return self.layout.flatten(backprop(self.layout, params, x, labels))[self.indices]
