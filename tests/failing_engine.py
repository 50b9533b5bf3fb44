"""An engine that raises on its third call: a real exception inside a real worker actor."""

import numpy as np


class FailingEngine:
    def __init__(self, layout, indices):
        self.size = len(indices)
        self.calls = 0

    def __call__(self, flat, x, labels, h):
        self.calls += 1
        if self.calls == 3:  # the first call is the actor's warm-up
            raise RuntimeError("injected failure in the engine")
        return np.zeros(self.size)
