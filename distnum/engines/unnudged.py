"""What every nudge of a step starts from: the unnudged forward pass of the batch, and the
tables the delta form reads (deltas.py), computed once per call.

    inputs, pre     z_0 = x, z_1..z_L and a_1..a_L, the logits: distnum.models.forward
    rest            for the sigmoid, r_l = sigma(-a_l) = 1 - z_l, each accurate (1 - z_l
                    would lose the digits of a saturated unit)
    probabilities   p = softmax(logits) (B, K)
    moments         M_k[n, j] / k! = sum_c p[n, c] W_{L+1}[j, c]**k / k! (B, DEGREE, H_L):
                    the change of sample n's loss when the last hidden layer's unit j moves
                    by d is log1p(sum_k d**k M_k[n, j] / k!) - d W_{L+1}[j, t_n], the series
                    of sum_c p_c expm1(d W_{L+1}[j, c]) to DEGREE terms
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from distnum.functions import _softmax, sigmoid
from distnum.models import ParamLayout, forward
from distnum.vecmath import EXPM1_SERIES_MAX, JIT, SERIES_MAX

LANES = 8  # units whose changes the last hidden layer's kernel adds at once: one vector


class Unnudged(NamedTuple):
    inputs: list[np.ndarray]
    pre: list[np.ndarray]
    rest: list[np.ndarray] | None
    probabilities: np.ndarray
    labels: np.ndarray


def unnudged(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
             labels: np.ndarray) -> Unnudged:  # fmt: skip
    """The tables of a checked batch x (B, I) and its class indices labels (B,)."""
    inputs, pre = forward(layout, params, x)
    rest = [sigmoid(-a) for a in pre[:-1]] if layout.activation == "sigmoid" else None
    return Unnudged(inputs, pre, rest, _softmax(pre[-1]), labels)


def largest_change(layout: ParamLayout, h: float, layer_input: np.ndarray) -> float:
    """A bound on |d|, how far a nudge of +-h of a weight or bias of a hidden layer reading
    layer_input moves one of its units: h times the largest input (1 for the bias), times
    the largest slope of the activation (1/4 for the sigmoid)."""
    largest = max(1.0, float(np.max(np.abs(layer_input))))
    return h * largest * (0.25 if layout.activation == "sigmoid" else 1.0)


def by_moments(largest_logit_change: float) -> tuple[bool, bool]:
    """Whether S = sum_c p_c expm1(u_c) is evaluated by the moments' series (to DEGREE
    terms, which leave a remainder below half an ulp of the largest |u_c| when no logit
    moves by more than largest_logit_change), else class by class with expm1; and whether
    every S then lies in log1p's series domain (|S| <= expm1(y) <= 2 y)."""
    y = largest_logit_change
    return y <= EXPM1_SERIES_MAX, 2.0 * y <= SERIES_MAX


@numba.njit(**JIT)
def moment_table(probabilities, W, degree):
    """M_k[n, j] / k! for k = 1..degree, (B, degree, H): each M_k the sum over the classes in
    order 0..K-1 of p[n, c] W[j, c]**k (the power a product at a time), then divided by k!."""
    batch_size, num_classes = probabilities.shape
    hidden = W.shape[0]
    by_class = np.ascontiguousarray(W.T)  # (K, H), so that the loops over units are contiguous
    out = np.zeros((batch_size, degree, hidden))
    power = np.empty(hidden)
    for n in range(batch_size):
        for c in range(num_classes):
            w = by_class[c]
            for j in range(hidden):
                power[j] = probabilities[n, c]
            for k in range(degree):
                for j in range(hidden):
                    power[j] *= w[j]
                    out[n, k, j] += power[j]
        factorial = 1.0
        for k in range(degree):
            factorial *= k + 1
            for j in range(hidden):
                out[n, k, j] /= factorial
    return out
