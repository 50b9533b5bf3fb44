"""Engines: the central differences g_k = (L(theta + h e_k) - L(theta - h e_k)) / 2h of a
network's loss over a set of flat parameter indices (a shard), as that shard's slice.

    full.py                  the literal algorithm: one complete forward pass per nudge
    fast.py                  the same numbers, each nudged loss evaluated reusing what the
                             nudge leaves alone; its kernels:
      sample_values.py         the distinct (sample, input value) pairs a layer's nudges need
      lower_hidden_layers.py   nudges of hidden layers below the last
      last_hidden_layer.py     nudges of the last hidden layer (the chapter's W1 and b1)
      output_layer.py          nudges of the output layer (the chapter's W2 and b2)
    backprop.py              not a central difference: backprop's gradient, for reference runs

Both start from distnum.models.forward and the loss of distnum.functions, whose arithmetic
(with distnum/vecmath.py's exp and log) has one fixed order on every CPU: so has theirs.

An engine is built once per shard (an actor keeps it) and called once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from distnum.engines.backprop import BackpropEngine
from distnum.engines.fast import FastEngine
from distnum.engines.full import FullEngine
from distnum.models import ParamLayout

ENGINES = {"fast": FastEngine, "full": FullEngine, "backprop": BackpropEngine}


class Engine(Protocol):
    def __call__(
        self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float
    ) -> np.ndarray: ...


EngineFactory = Callable[[ParamLayout, np.ndarray], Engine]


def shares_tables(engine: str | EngineFactory) -> bool:
    """Whether the engine's shards can share the step's tables (FastEngine.from_tables)."""
    return engine == "fast" or engine is FastEngine


def make_engine(engine: str | EngineFactory, layout: ParamLayout, indices: np.ndarray) -> Engine:
    """The engine for the flat parameter indices of a shard: "fast", "full", or any factory
    (layout, indices) -> engine, such as an engine class of your own."""
    if callable(engine):
        return engine(layout, indices)
    try:
        return ENGINES[engine](layout, indices)
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}") from None
