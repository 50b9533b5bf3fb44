"""The chapter's networks: SimpleNet (4.4.2) and TwoLayerNet (4.5).

TwoLayerNet keeps every parameter in ONE flat float64 vector, laid out W1, b1, W2, b2, each
row-major; `net.params["W1"]` and the others are views into it. A "parameter index" is an
index into that vector everywhere in distnum: engines take index sets, shards are index
sets, the driver gathers gradient slices by index.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from distnum.functions import (
    cross_entropy_error,
    label_indices,
    mean_loss,
    sigmoid,
    softmax,
    softmax_cross_entropy_per_sample,
)
from distnum.gradient import DEFAULT_H
from distnum.vecmath import JIT, fma

PARAM_NAMES = ("W1", "b1", "W2", "b2")


class SimpleNet:
    """The 2x3 single-layer net of 4.4.2: p = x W, loss = cross-entropy of softmax(p)."""

    def __init__(self, W: np.ndarray | None = None, seed: int | None = None) -> None:
        if W is None:
            W = np.random.default_rng(seed).standard_normal((2, 3))
        self.W = np.array(W, dtype=np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.dot(x, self.W)

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        return cross_entropy_error(softmax(self.predict(x)), t)


@dataclass(frozen=True)
class ParamLayout:
    """Where W1 (I, H), b1 (H,), W2 (H, K) and b2 (K,) sit in the flat parameter vector."""

    input_size: int
    hidden_size: int
    output_size: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        i, h, k = self.input_size, self.hidden_size, self.output_size
        return {"W1": (i, h), "b1": (h,), "W2": (h, k), "b2": (k,)}

    @property
    def slices(self) -> dict[str, slice]:
        """The flat index range of each parameter array."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            stop = start + int(np.prod(shape))
            out[name] = slice(start, stop)
            start = stop
        return out

    @property
    def size(self) -> int:
        return self.slices["b2"].stop

    def flatten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """One flat float64 vector (size,) from arrays shaped like the parameters."""
        return np.concatenate([np.ravel(arrays[name]) for name in PARAM_NAMES]).astype(np.float64)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (sharing memory) into a flat vector of this layout."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat parameters have shape {flat.shape}, expected ({self.size},)")
        return {name: flat[self.slices[name]].reshape(shape) for name, shape in self.shapes.items()}


class ParamViews(MutableMapping):
    """net.params: W1, b1, W2, b2 as views of the flat vector.

    Assigning `params["W1"] = array` copies into the view, so the book's
    `network.params[key] -= lr * grad[key]` updates the flat vector too."""

    def __init__(self, views: dict[str, np.ndarray]) -> None:
        self._views = views

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        view = self._views[name]
        if value is not view:
            view[...] = value

    def __delitem__(self, name: str) -> None:
        raise TypeError("TwoLayerNet's parameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


class Activations(NamedTuple):
    """The forward pass of a batch of N: a1, z1 (N, H) and the logits a2 (N, K)."""

    a1: np.ndarray
    z1: np.ndarray
    a2: np.ndarray


@numba.njit(**JIT)
def affine(x, W, b):
    """x W + b for x (N, I), W (I, J), b (J,), in one fixed order on every CPU: out[n, j]
    adds x[n, i] W[i, j] for i = 0, 1, ... (each an fma, one rounding), then b[j]. A zero
    x[n, i] adds nothing, so it is skipped: most of an MNIST image is zero pixels."""
    if W.shape[0] != x.shape[1] or b.size != W.shape[1]:
        raise ValueError("affine: x (N, I), W (I, J) and b (J,) do not fit together")
    out = np.empty((x.shape[0], W.shape[1]))
    row = np.empty(W.shape[1])
    for n in range(x.shape[0]):
        row[:] = 0.0
        for i in range(x.shape[1]):
            v = x[n, i]
            if v != 0.0:
                for j in range(row.size):  # vectorised over j: each lane one output
                    row[j] = fma(v, W[i, j], row[j])
        for j in range(row.size):
            out[n, j] = row[j] + b[j]
    return out


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> Activations:
    """The network's one forward pass: a1 = x W1 + b1, z1 = sigmoid(a1), a2 = z1 W2 + b2, for
    a checked batch x (N, I) (see checked_inputs); the same bits on every CPU."""
    a1 = affine(x, params["W1"], params["b1"])
    z1 = sigmoid(a1)
    return Activations(a1, z1, affine(z1, params["W2"], params["b2"]))


def per_sample_losses(params: dict[str, np.ndarray], x: np.ndarray,
                      labels: np.ndarray) -> np.ndarray:  # fmt: skip
    """Softmax cross-entropy (N,) of each sample of a checked batch x (N, I) against class
    indices (N,): each row's depends on that row alone."""
    return softmax_cross_entropy_per_sample(forward(params, x).a2, labels)


def batch_loss(params: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of a checked batch x (N, I) against class indices (N,)."""
    return mean_loss(per_sample_losses(params, x, labels))


def checked_inputs(layout: ParamLayout, x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous float64 batch (N, I), or a ValueError saying what to give."""
    x = np.asarray(x)
    size = layout.input_size
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x has dtype {x.dtype}; give numbers, a float64 array (N, {size})")
    if x.ndim != 2 or x.shape[1] != size:
        raise ValueError(f"x has shape {x.shape}; give a batch (N, {size}), one input per row "
                         "(one input alone: x.reshape(1, -1))")  # fmt: skip
    if x.shape[0] == 0:
        raise ValueError(f"x has shape {x.shape}, no inputs; give at least one row")
    return np.ascontiguousarray(x, dtype=np.float64)


def checked_batch(
    layout: ParamLayout, x: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """x as checked_inputs gives it, and its labels t (class indices or one-hot rows) as
    class indices int64 (N,), each in [0, K): the kernels index arrays with them."""
    x = checked_inputs(layout, x)
    labels = label_indices(t, layout.output_size)
    if labels.size != x.shape[0]:
        raise ValueError(f"{labels.size} labels for {x.shape[0]} inputs in x; give one label "
                         "per row of x")  # fmt: skip
    return x, labels


class TwoLayerNet:
    """784-50-10 style network: affine, sigmoid, affine, softmax cross-entropy.

    All parameters live in `flat_params` (float64, `layout.size`); `params` holds views."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        weight_init_std: float = 0.01,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.layout = ParamLayout(input_size, hidden_size, output_size)
        self.flat_params = np.zeros(self.layout.size, dtype=np.float64)
        self.params = ParamViews(self.layout.views(self.flat_params))
        rng = np.random.default_rng(seed)
        self.params["W1"] = weight_init_std * rng.standard_normal((input_size, hidden_size))
        self.params["W2"] = weight_init_std * rng.standard_normal((hidden_size, output_size))

    def labels(self, t: np.ndarray) -> np.ndarray:
        """Class indices (N,) from labels given as indices or one-hot rows."""
        return label_indices(t, self.layout.output_size)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, K) of a batch x (N, I)."""
        return softmax(forward(self.params, checked_inputs(self.layout, x)).a2)

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        """Mean softmax cross-entropy of x (N, I) against t, class indices (N,) or one-hot
        rows (N, K); computed stably from the logits (log-sum-exp)."""
        return batch_loss(self.params, *checked_batch(self.layout, x, t))

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float:
        """The fraction of x (N, I) whose largest logit is its label's, t as for loss."""
        x, labels = checked_batch(self.layout, x, t)
        return float(np.mean(np.argmax(forward(self.params, x).a2, axis=1) == labels))

    def numerical_gradient(
        self, x: np.ndarray, t: np.ndarray, h: float = DEFAULT_H, engine: str = "fast"
    ) -> dict[str, np.ndarray]:
        """Central-difference gradient of the loss, arrays shaped like the params; x and t
        as for loss.

        engine "fast" reuses what each nudge leaves alone; "full" runs one complete forward
        pass per nudge, as the book does. Both give the same numbers (to ~1e-12)."""
        from distnum.engines import make_engine  # engines build on this module

        x, labels = checked_batch(self.layout, x, t)
        all_indices = np.arange(self.layout.size)
        flat_grad = make_engine(engine, self.layout, all_indices)(self.flat_params, x, labels, h)
        return self.layout.views(flat_grad)

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Analytic backprop gradient, the reference the numerical gradients are checked
        against; x and t as for loss. Returns arrays shaped like the params."""
        x, labels = checked_batch(self.layout, x, t)
        a1, z1, a2 = forward(self.params, x)
        batch_size = x.shape[0]
        dy = softmax(a2)
        dy[np.arange(batch_size), labels] -= 1.0
        dy /= batch_size
        da1 = np.dot(dy, self.params["W2"].T) * z1 * (1.0 - z1)
        return {
            "W1": np.dot(x.T, da1),
            "b1": np.sum(da1, axis=0),
            "W2": np.dot(z1.T, dy),
            "b2": np.sum(dy, axis=0),
        }
