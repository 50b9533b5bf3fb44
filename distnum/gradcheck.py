"""distnum gradcheck: the fast engine against the full one and against backprop, on a real
batch, array by array."""

from __future__ import annotations

import numpy as np

from distnum.engines import FastEngine, FullEngine
from distnum.models import MultiLayerNet


def sample_indices(net: MultiLayerNet, w1_sample: int, rng: np.random.Generator) -> np.ndarray:
    """A random sample of W1's flat indices plus every other parameter's index, sorted."""
    w1 = net.layout.slices["W1"]
    chosen = rng.choice(w1.stop, size=min(w1_sample, w1.stop), replace=False)
    return np.sort(np.concatenate([chosen, np.arange(w1.stop, net.layout.size)]))


def train_with_backprop(
    net: MultiLayerNet, x: np.ndarray, t: np.ndarray, steps: int, rng: np.random.Generator,
    lr: float = 0.1, batch_size: int = 100,
) -> None:  # fmt: skip
    """A few SGD steps with backprop, to check gradients at weights that have learnt."""
    for _ in range(steps):
        mask = rng.choice(len(x), batch_size)
        grads = net.gradient(x[mask], t[mask])
        for name in net.layout.names:
            net.params[name] -= lr * grads[name]


def compare(
    net: MultiLayerNet, x: np.ndarray, labels: np.ndarray, h: float, w1_sample: int,
    rng: np.random.Generator,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per array: max |fast - full| on the sampled indices, and the max relative errors
    (max |a - b| / max |b|) of fast and of full against backprop."""
    layout = net.layout
    fast = FastEngine(layout, np.arange(layout.size))(net.flat_params, x, labels, h)
    indices = sample_indices(net, w1_sample, rng)
    full = FullEngine(layout, indices)(net.flat_params, x, labels, h)
    backprop = layout.flatten(net.gradient(x, labels))
    report = {}
    for name, part in layout.slices.items():
        inside = (indices >= part.start) & (indices < part.stop)
        sampled = indices[inside]
        scale = np.max(np.abs(backprop[part]))
        report[name] = {
            "checked_full": int(sampled.size),
            "fast_vs_full_abs": float(np.max(np.abs(fast[sampled] - full[inside]))),
            "fast_vs_backprop_rel": float(np.max(np.abs(fast[part] - backprop[part])) / scale),
            "full_vs_backprop_rel": float(np.max(np.abs(full[inside] - backprop[sampled])) / scale),
        }
    return report
