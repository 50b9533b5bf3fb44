"""The chapter's networks: SimpleNet (4.4.2), TwoLayerNet (4.5) and chapter 6's MultiLayerNet.

Every parameter lives in ONE flat float64 vector, laid out W1, b1, W2, b2, ..., each
row-major; `net.params["W1"]` and the others are views into it. A "parameter index" is an
index into that vector everywhere in distnum: engines take index sets, shards are index
sets, the driver gathers gradient slices by index.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numba
import numpy as np
import psutil

from distnum.functions import (
    cross_entropy_error,
    label_indices,
    mean_loss,
    relu,
    sigmoid,
    softmax,
    softmax_cross_entropy_per_sample,
    sum_of_squares,
)
from distnum.gradient import DEFAULT_H
from distnum.vecmath import JIT, fma

ACTIVATIONS = {"sigmoid": sigmoid, "relu": relu}


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


def hidden_setting(hidden: int | Sequence[int]) -> int | list[int]:
    """Hidden sizes as runs record them: one number for one layer (the chapter's 50), else a
    list ([100, 100])."""
    sizes = [int(n) for n in hidden] if isinstance(hidden, (list, tuple)) else [int(hidden)]
    return sizes[0] if len(sizes) == 1 else sizes


@dataclass(frozen=True)
class ParamLayout:
    """A network as distnum computes it: layer sizes n_0 = input_size, n_1..n_L =
    hidden_sizes, n_{L+1} = output_size; W_l (n_{l-1}, n_l) and b_l (n_l,) for l = 1..L+1,
    in that order in the flat vector; one activation for the hidden layers; and the weight
    decay lambda, whose 0.5 * lambda * sum(W_l ** 2) the loss adds (b_l not included, as in
    the book). hidden_sizes may be given as one int (the chapter's net: 784, 50, 10)."""

    input_size: int
    hidden_sizes: tuple[int, ...]
    output_size: int
    activation: str = "sigmoid"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        hidden = self.hidden_sizes
        hidden = (hidden,) if isinstance(hidden, (int, np.integer)) else tuple(hidden)
        sizes = (self.input_size, *hidden, self.output_size)
        if not hidden or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                             or n < 1 for n in sizes):  # fmt: skip
            raise ValueError(f"layer sizes {sizes}: give whole numbers >= 1 and at least one "
                             "hidden layer, such as 784, [100, 100], 10")  # fmt: skip
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is unknown; choose one of "
                             f"{', '.join(ACTIVATIONS)}")  # fmt: skip
        decay = self.weight_decay
        number = isinstance(decay, (int, float, np.floating)) and not isinstance(decay, bool)
        if not (number and np.isfinite(decay) and decay >= 0):
            raise ValueError(f"weight decay {decay!r} must be a finite number >= 0, such as 0.1")
        object.__setattr__(self, "hidden_sizes", tuple(int(n) for n in hidden))
        object.__setattr__(self, "weight_decay", float(decay))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """(n_0, ..., n_{L+1}): the input, each hidden layer, the output."""
        return (self.input_size, *self.hidden_sizes, self.output_size)

    @cached_property
    def depth(self) -> int:
        """L + 1, the number of affine layers."""
        return len(self.hidden_sizes) + 1

    @cached_property
    def names(self) -> tuple[str, ...]:
        """W1, b1, ..., W{L+1}, b{L+1}, in the flat vector's order."""
        return tuple(f"{kind}{layer}" for layer in range(1, self.depth + 1) for kind in "Wb")

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        sizes = self.sizes
        out = {}
        for layer in range(1, self.depth + 1):
            out[f"W{layer}"] = (sizes[layer - 1], sizes[layer])
            out[f"b{layer}"] = (sizes[layer],)
        return out

    @cached_property
    def slices(self) -> dict[str, slice]:
        """The flat index range of each parameter array."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            stop = start + int(np.prod(shape))
            out[name] = slice(start, stop)
            start = stop
        return out

    @cached_property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes.values())

    @property
    def hidden(self) -> int | list[int]:
        """The hidden sizes as distnum's options give them (hidden_setting)."""
        return hidden_setting(self.hidden_sizes)

    def describe(self) -> str:
        """The sizes joined by dashes and the activation: "784-100-100-10 relu"."""
        return "-".join(map(str, self.sizes)) + f" {self.activation}"

    def flatten(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """One flat float64 vector (size,) from arrays shaped like the parameters."""
        return np.concatenate([np.ravel(arrays[name]) for name in self.names]).astype(np.float64)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views (sharing memory) into a flat vector of this layout."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat parameters have shape {flat.shape}, expected ({self.size},)")
        return {name: flat[self.slices[name]].reshape(shape) for name, shape in self.shapes.items()}


class ParamViews(MutableMapping):
    """net.params: W1, b1, ... as views of the flat vector.

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
        raise TypeError("a network's parameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


class Activations(NamedTuple):
    """The forward pass of a batch of N: inputs[l] (N, n_l) is what affine layer l + 1 reads
    (inputs[0] the batch, then each hidden layer's activations z_l), pre[l] (N, n_{l+1}) what
    it computes (a_{l+1}); pre[-1] are the logits (N, K)."""

    inputs: list[np.ndarray]
    pre: list[np.ndarray]

    @property
    def logits(self) -> np.ndarray:
        return self.pre[-1]


@numba.njit(**JIT)
def affine(x, W, b):
    """x W + b for x (N, I), W (I, J), b (J,), in one fixed order on every CPU: out[n, j]
    adds x[n, i] W[i, j] for i = 0, 1, ... (each an fma, one rounding), then b[j]. A zero
    x[n, i] adds nothing, so it is skipped: most of an MNIST image is zero pixels, and a
    ReLU layer's outputs are often zero."""
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


def forward(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray) -> Activations:
    """The network's one forward pass, for a checked batch x (N, I) (see checked_inputs):
    a_l = z_{l-1} W_l + b_l, z_l = activation(a_l), z_0 = x, the last a the logits; the
    same bits on every CPU."""
    activation = ACTIVATIONS[layout.activation]
    inputs, pre = [x], []
    for layer in range(1, layout.depth + 1):
        pre.append(affine(inputs[-1], params[f"W{layer}"], params[f"b{layer}"]))
        if layer < layout.depth:
            inputs.append(activation(pre[-1]))
    return Activations(inputs, pre)


def per_sample_losses(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
                      labels: np.ndarray) -> np.ndarray:  # fmt: skip
    """Softmax cross-entropy (N,) of each sample of a checked batch x (N, I) against class
    indices (N,): each row's depends on that row alone (weight decay not included)."""
    return softmax_cross_entropy_per_sample(forward(layout, params, x).logits, labels)


def classified_right(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:  # fmt: skip
    """(N,) bool: whether each row of a checked batch x (N, I) has its largest logit at its
    label's class (N,); each row's depends on that row alone."""
    return np.argmax(forward(layout, params, x).logits, axis=1) == labels


def decay_term(layout: ParamLayout, params: dict[str, np.ndarray]) -> float:
    """0.5 * lambda * sum(W_l ** 2), added layer by layer as the book adds it; 0.0 without
    weight decay."""
    if layout.weight_decay == 0.0:
        return 0.0
    total = 0.0
    for layer in range(1, layout.depth + 1):
        total += 0.5 * layout.weight_decay * sum_of_squares(params[f"W{layer}"].ravel())
    return total


def total_loss(layout: ParamLayout, params: dict[str, np.ndarray],
               per_sample: np.ndarray) -> float:  # fmt: skip
    """The loss from the per-sample losses (N,), wherever they were computed: their mean
    (distnum.functions.mean_loss) plus the weight decay term."""
    return mean_loss(per_sample) + decay_term(layout, params)


def batch_loss(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
               labels: np.ndarray) -> float:  # fmt: skip
    """The loss of a checked batch x (N, I) against class indices (N,): the mean softmax
    cross-entropy, plus the weight decay term."""
    return total_loss(layout, params, per_sample_losses(layout, params, x, labels))


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


INIT_NAMES = {"relu": 2.0, "he": 2.0, "sigmoid": 1.0, "xavier": 1.0}  # sqrt(gain / fan_in)


def init_name(name: str) -> str:
    """A named initial scale as runs record it: "relu" for relu or He, "sigmoid" for
    sigmoid or Xavier, in any case; other names unchanged (init_scale refuses them)."""
    lowered = name.lower()
    return {"he": "relu", "xavier": "sigmoid"}.get(lowered, lowered)


def default_init_std(activation: str) -> str | float:
    """The initial weights' scale when none is given: the chapter's 0.01 for sigmoid nets
    (the notebook's), He's for ReLU nets (the book's 6.2.3)."""
    return "relu" if activation == "relu" else 0.01


def init_scale(weight_init_std: str | float, fan_in: int) -> float:
    """The standard deviation of a layer's initial weights: "relu" or "he" sqrt(2 / fan_in),
    "sigmoid" or "xavier" sqrt(1 / fan_in) (the book's 6.2), or the number given."""
    if isinstance(weight_init_std, str):
        if init_name(weight_init_std) not in INIT_NAMES:
            raise ValueError(f"weight_init_std {weight_init_std!r} is unknown; give 'relu' "
                             "(He), 'sigmoid' (Xavier) or a number such as 0.01")  # fmt: skip
        return float(np.sqrt(INIT_NAMES[init_name(weight_init_std)] / fan_in))
    number = isinstance(weight_init_std, (int, float, np.integer, np.floating))
    if isinstance(weight_init_std, bool) or not number:
        raise ValueError(f"weight_init_std {weight_init_std!r} is not a number; give 'relu' "
                         "(He), 'sigmoid' (Xavier) or a number such as 0.01")  # fmt: skip
    scale = float(weight_init_std)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"weight_init_std {weight_init_std!r} must be finite and > 0")
    return scale


def check_fits_in_memory(layout: ParamLayout, copies: int, name: str) -> None:
    """A ValueError naming the option (name) when copies arrays of the layout's parameters
    cannot fit in this machine's free memory: said before any is allocated."""
    needed = 8 * layout.size * copies
    free = psutil.virtual_memory().available
    if needed > free:
        raise ValueError(f"{name} makes a net of {layout.size:,} parameters, whose arrays need "
                         f"about {needed / 2**30:.1f} GiB; this machine has "
                         f"{free / 2**30:.1f} GiB free: give fewer hidden units")  # fmt: skip


class MultiLayerNet:
    """Chapter 6's network: (affine, activation) x L, affine, softmax cross-entropy, plus
    0.5 * weight_decay_lambda * sum(W ** 2).

    All parameters live in `flat_params` (float64, `layout.size`); `params` holds views
    W1, b1, ..., W{L+1}, b{L+1}. Weights start as scale * standard normal draws from the
    seed, layer by layer; biases at zero."""

    def __init__(
        self,
        input_size: int,
        hidden_size_list: Sequence[int],
        output_size: int,
        activation: str = "relu",
        weight_init_std: str | float = "relu",
        weight_decay_lambda: float = 0.0,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.layout = ParamLayout(input_size, hidden_size_list, output_size, activation,
                                  weight_decay_lambda)  # fmt: skip
        # the parameters and a gradient of them
        check_fits_in_memory(self.layout, 2, f"hidden_size_list={hidden_size_list!r}")
        self.flat_params = np.zeros(self.layout.size, dtype=np.float64)
        self.params = ParamViews(self.layout.views(self.flat_params))
        rng = np.random.default_rng(seed)
        for layer in range(1, self.layout.depth + 1):
            shape = self.layout.shapes[f"W{layer}"]
            scale = init_scale(weight_init_std, shape[0])
            self.params[f"W{layer}"] = scale * rng.standard_normal(shape)

    def labels(self, t: np.ndarray) -> np.ndarray:
        """Class indices (N,) from labels given as indices or one-hot rows."""
        return label_indices(t, self.layout.output_size)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, K) of a batch x (N, I)."""
        x = checked_inputs(self.layout, x)
        return softmax(forward(self.layout, self.params, x).logits)

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        """Mean softmax cross-entropy of x (N, I) against t, class indices (N,) or one-hot
        rows (N, K), computed stably from the logits (log-sum-exp); plus the weight decay."""
        return batch_loss(self.layout, self.params, *checked_batch(self.layout, x, t))

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float:
        """The fraction of x (N, I) whose largest logit is its label's, t as for loss."""
        x, labels = checked_batch(self.layout, x, t)
        return float(np.mean(classified_right(self.layout, self.params, x, labels)))

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
        return backprop(self.layout, self.params, *checked_batch(self.layout, x, t))


def blas_forward(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray) -> Activations:
    """The forward pass with numpy's BLAS matrix products and its exp, as the book writes
    it: faster than forward() where BLAS is, but its bits depend on the machine's CPU and
    BLAS. For timing a plain numpy backprop (distnum bench), never for a result."""
    inputs, pre = [x], []
    for layer in range(1, layout.depth + 1):
        pre.append(np.dot(inputs[-1], params[f"W{layer}"]) + params[f"b{layer}"])
        if layer < layout.depth:
            a = pre[-1]
            inputs.append(np.maximum(a, 0.0) if layout.activation == "relu"
                          else 1.0 / (1.0 + np.exp(-a)))  # fmt: skip
    return Activations(inputs, pre)


def backprop(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
             labels: np.ndarray, forward_pass=forward) -> dict[str, np.ndarray]:  # fmt: skip
    """The loss's gradient by backpropagation (numpy's BLAS, so its bits may differ between
    machines), arrays shaped like the params, for a checked batch x (N, I) and class indices
    (N,); after distnum's forward pass, or another (blas_forward)."""
    inputs, pre = forward_pass(layout, params, x)
    batch_size = x.shape[0]
    delta = softmax(pre[-1])  # d loss / d a_l, from the top down
    delta[np.arange(batch_size), labels] -= 1.0
    delta /= batch_size
    grads = {}
    for layer in range(layout.depth, 0, -1):
        W = params[f"W{layer}"]
        grads[f"W{layer}"] = np.dot(inputs[layer - 1].T, delta)
        if layout.weight_decay:
            grads[f"W{layer}"] += layout.weight_decay * W
        grads[f"b{layer}"] = np.sum(delta, axis=0)
        if layer > 1:
            z = inputs[layer - 1]
            slope = z * (1.0 - z) if layout.activation == "sigmoid" else pre[layer - 2] > 0
            delta = np.dot(delta, W.T) * slope
    return {name: grads[name] for name in layout.names}


class TwoLayerNet(MultiLayerNet):
    """The chapter's 784-50-10 style network: affine, sigmoid, affine, softmax cross-entropy,
    weights 0.01 * standard normal draws (W1, then W2)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        weight_init_std: float = 0.01,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        super().__init__(input_size, [hidden_size], output_size, "sigmoid", weight_init_std,
                         seed=seed)  # fmt: skip
