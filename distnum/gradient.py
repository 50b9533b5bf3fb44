"""Numerical differentiation and gradient descent (chapter 4.3 and 4.4)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np

from distnum.options import option

DEFAULT_H = 1e-4
MAX_H = 1.0  # a nudge beyond 1 measures no derivative of a net whose weights are ~0.01


def check_h(h: float) -> float:
    """h as a float, or a ValueError saying why it cannot be a step size: a real number
    (not a string, not a bool), finite, > 0 and <= MAX_H. The command line's --h and every
    function of the Python API check it here."""
    if isinstance(h, (bool, np.bool_)) or not isinstance(h, numbers.Real):
        raise ValueError(f"{option('h', h)} is not a number; give one such as 1e-4")
    value = float(h)
    if not (math.isfinite(value) and 0 < value <= MAX_H):
        raise ValueError(f"{option('h', h)} must be finite, > 0 and <= {MAX_H:g}; give one "
                         "such as 1e-4")  # fmt: skip
    return value


def check_h_against(h: float, values: np.ndarray, what: str) -> None:
    """A ValueError when h vanishes next to the largest of values (what they are), so that
    every nudged value would equal the unnudged one and every difference be 0."""
    largest = float(np.max(np.abs(values))) if np.size(values) else 0.0
    if largest + h == largest:
        raise ValueError(f"{option('h', h)} vanishes next to {what} of size {largest:.2g} "
                         f"(float64 spacing {np.spacing(largest):.1g}), so every difference "
                         "would be 0; give one such as 1e-4")  # fmt: skip


def numerical_diff(f: Callable[[float], float], x: float, h: float = DEFAULT_H) -> float:
    """Central difference (f(x + h) - f(x - h)) / 2h."""
    h = check_h(h)
    return (f(x + h) - f(x - h)) / (2 * h)


def flat_view(x: np.ndarray) -> np.ndarray:
    """x's entries as a flat view, if x is a contiguous float array, else a ValueError."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x has dtype {x.dtype}; give a float array such as np.array([3.0, 4.0])")
    if x.size == 0:
        raise ValueError(f"x has shape {x.shape}, no entries; give at least one")
    flat_x = x.reshape(-1)
    if not np.shares_memory(flat_x, x):
        raise ValueError("x must be contiguous, so that it can be nudged in place "
                         "(np.ascontiguousarray(x))")  # fmt: skip
    return flat_x


def central_differences(
    f: Callable[[np.ndarray], float],
    x: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    h: float = DEFAULT_H,
) -> np.ndarray:
    """(f(x + h e_k) - f(x - h e_k)) / 2h for each flat index k of x, in the order given.

    x is nudged in place, one entry at a time, and each entry is restored to its exact
    original value after its two evaluations, so x is left as it was found (f may read x
    through a view, as TwoLayerNet's loss does)."""
    h = check_h(h)
    flat_x = flat_view(x)
    indices = np.asarray(indices, dtype=np.intp)
    if indices.size and (indices.min() < 0 or indices.max() >= x.size):
        raise ValueError(f"indices must lie in [0, {x.size}), the flat indices of x")
    grad = np.empty(indices.size, dtype=np.float64)
    for position, k in enumerate(indices):
        original = flat_x[k]
        flat_x[k] = original + h
        loss_plus = one_number(f(x))
        flat_x[k] = original - h
        loss_minus = one_number(f(x))
        flat_x[k] = original
        grad[position] = (loss_plus - loss_minus) / (2 * h)
    return grad


def one_number(value: object) -> object:
    """value, if it is one real number (the loss), as f returned it: its own type keeps the
    book's arithmetic; else a ValueError saying what f must return."""
    if isinstance(value, (bool, np.bool_)) or not (
        isinstance(value, (int, float, np.integer, np.floating))
        or (isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf")
    ):
        described = (f"an array of shape {value.shape}" if isinstance(value, np.ndarray)
                     else type(value).__name__)  # fmt: skip
        raise ValueError(f"f returned {described}; numerical_gradient needs f(x) to return one "
                         "real number, the value to differentiate (a loss: reduce it, e.g. "
                         ".sum() or .mean())")  # fmt: skip
    return value


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = DEFAULT_H
) -> np.ndarray:
    """Central-difference gradient of f at x, an array of any shape (the book's 4.4)."""
    return central_differences(f, x, np.arange(x.size), h).reshape(x.shape)


def gradient_descent(
    f: Callable[[np.ndarray], float],
    init_x: np.ndarray,
    lr: float = 0.01,
    step_num: int = 100,
) -> np.ndarray:
    """step_num steps of x -= lr * grad f(x) from a copy of init_x (left untouched)."""
    x = np.array(init_x, dtype=np.float64)
    for _ in range(step_num):
        x -= lr * numerical_gradient(f, x)
    return x
