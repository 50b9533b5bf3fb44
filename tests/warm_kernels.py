"""Compile distnum's kernels into numba's cache, before the tests start (conftest.py's
pytest_sessionstart): one net's kernels per process, the two processes at once. Otherwise, in a
fresh environment, both of the suite's processes and the `distnum` processes their tests
start would each compile the same kernels at the same moment (1-2 minutes of the 2 cores).

    python tests/warm_kernels.py chapter|deep
"""

from __future__ import annotations

import sys

import numpy as np

from distnum.engines import ENGINES
from distnum.models import MultiLayerNet, TwoLayerNet

NETS = {
    "chapter": lambda: TwoLayerNet(784, 50, 10, seed=0),
    "deep": lambda: MultiLayerNet(784, [20, 20], 10, "relu", "relu", 0.1, seed=0),
}


def warm(name: str) -> None:
    net = NETS[name]()
    rng = np.random.default_rng(0)
    x, t = rng.random((4, 784)), rng.integers(0, 10, 4)
    net.accuracy(x, t)
    net.loss(x, t)
    for engine in ENGINES.values():  # the literal algorithm on a few coordinates: it is slow
        indices = np.arange(0, net.layout.size, 1 if engine is not ENGINES["full"] else 1000)
        engine(net.layout, indices)(net.flat_params, x, t, 1e-4)


if __name__ == "__main__":
    warm(sys.argv[1])
