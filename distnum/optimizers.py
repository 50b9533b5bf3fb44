"""The optimizers of chapter 6 (the book's common/optimizer.py), on the flat parameter vector.

Each holds its state as flat float64 vectors beside the parameters (velocity, moments) and
updates them elementwise in the book's order of operations, so a step gives the bits the
book's per-array update gives. `state()` and `load_state()` carry that state through a
checkpoint, so that a resumed run goes on bit for bit.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-7  # the book's, in AdaGrad, RMSprop and Adam


class Optimizer:
    """update(flat, grad) changes flat (size,) in place."""

    name = ""
    default_lr = 0.01
    state_names: tuple[str, ...] = ()

    def __init__(self, size: int, lr: float) -> None:
        self.lr = lr
        self.iterations = 0
        for name in self.state_names:
            setattr(self, name, np.zeros(size))

    def update(self, flat: np.ndarray, grad: np.ndarray) -> None:
        self.iterations += 1
        self.step(flat, grad)

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """The state vectors by name, and the updates done as "iterations" (a 0-d int64)."""
        vectors = {name: getattr(self, name).copy() for name in self.state_names}
        return {**vectors, "iterations": np.array(self.iterations, dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """The state saved by state(), checked: the names, shapes and values a checkpoint
        read back must have; a ValueError names what is wrong."""
        expected = {*self.state_names, "iterations"}
        if set(state) != expected:
            raise ValueError(f"{self.name} state has {sorted(state)}; expected {sorted(expected)}")
        iterations = state["iterations"]
        if iterations.shape != () or iterations.dtype.kind != "i" or iterations < 0:
            raise ValueError(f"{self.name} state: iterations must be a count >= 0")
        for name in self.state_names:
            vector, own = state[name], getattr(self, name)
            if vector.shape != own.shape or vector.dtype != np.float64:
                raise ValueError(f"{self.name} state: {name} is {vector.dtype} {vector.shape}; "
                                 f"expected float64 {own.shape}")  # fmt: skip
            if not np.all(np.isfinite(vector)):
                raise ValueError(f"{self.name} state: {name} is not finite")
        for name in self.state_names:
            getattr(self, name)[:] = state[name]
        self.iterations = int(iterations)


class SGD(Optimizer):
    name, default_lr = "sgd", 0.1  # the chapter-4 run's rate

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        flat -= self.lr * grad


class Momentum(Optimizer):
    name, state_names = "momentum", ("v",)
    momentum = 0.9

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        self.v[:] = self.momentum * self.v - self.lr * grad
        flat += self.v


class Nesterov(Optimizer):
    name, state_names = "nesterov", ("v",)
    momentum = 0.9

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        self.v *= self.momentum
        self.v -= self.lr * grad
        flat += self.momentum * self.momentum * self.v
        flat -= (1 + self.momentum) * self.lr * grad


class AdaGrad(Optimizer):
    name, state_names = "adagrad", ("h",)

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        self.h += grad * grad
        flat -= self.lr * grad / (np.sqrt(self.h) + EPSILON)


class RMSprop(Optimizer):
    name, state_names = "rmsprop", ("h",)
    decay_rate = 0.99

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        self.h *= self.decay_rate
        self.h += (1 - self.decay_rate) * grad * grad
        flat -= self.lr * grad / (np.sqrt(self.h) + EPSILON)


class Adam(Optimizer):
    name, default_lr, state_names = "adam", 0.001, ("m", "v")
    beta1, beta2 = 0.9, 0.999

    def step(self, flat: np.ndarray, grad: np.ndarray) -> None:
        t = self.iterations
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        self.m += (1 - self.beta1) * (grad - self.m)
        self.v += (1 - self.beta2) * (grad**2 - self.v)
        flat -= lr_t * self.m / (np.sqrt(self.v) + EPSILON)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam)}


def make_optimizer(name: str, size: int, lr: float | None = None) -> Optimizer:
    """The optimizer called name for size parameters, at lr (its book default if None)."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}"
                         ) from None  # fmt: skip
    return cls(size, cls.default_lr if lr is None else lr)
