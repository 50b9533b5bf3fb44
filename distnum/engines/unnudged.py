"""What every nudge of a step starts from: the unnudged forward pass of the batch, and the
tables the delta form reads (deltas.py), computed once per call.

    inputs, pre     z_0 = x, z_1..z_L and a_1..a_L, the logits: distnum.models.forward;
                    for ReLU, the a_1 that a nudge of W_1 or b_1 may carry across the kink
                    recomputed exact to an ulp (exact_near_kinks)
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
from distnum.vecmath import EXPM1_SERIES_MAX, JIT, SERIES_MAX, fma

LANES = 8  # units whose changes the last hidden layer's kernel adds at once: one vector


class Unnudged(NamedTuple):
    inputs: list[np.ndarray]
    pre: list[np.ndarray]
    rest: list[np.ndarray] | None
    probabilities: np.ndarray
    labels: np.ndarray


def unnudged(layout: ParamLayout, params: dict[str, np.ndarray], x: np.ndarray,
             labels: np.ndarray, h: float) -> Unnudged:  # fmt: skip
    """The tables of a checked batch x (B, I) and its class indices labels (B,), for nudges
    of +-h."""
    inputs, pre = forward(layout, params, x)
    rest = [sigmoid(-a) for a in pre[:-1]] if layout.activation == "sigmoid" else None
    probabilities = _softmax(pre[-1])
    if layout.activation == "relu":
        pre = [exact_near_kinks(pre[0], x, params["W1"], params["b1"], h), *pre[1:]]
    return Unnudged(inputs, pre, rest, probabilities, labels)


@numba.njit(**JIT)
def exact_near_kinks(a, x, W, b, h):
    """a (B, H), the first hidden layer's pre-activations x W + b of the batch x (B, I), with
    each that a nudge of W or b by +-h may carry across ReLU's kink recomputed exact to an
    ulp of itself; a copy. Across the kink a unit's change is -a or a + d, a itself: the
    forward pass's a, a sum of terms of about 1e-2 that cancel, is off by up to about 1e-16,
    which a central difference divides by 2h. Recomputed: x[n] . W[:, j] + b[j] in the
    order i = 0, 1, ..., then b, as a compensated sum (Ogita, Rump and Oishi's Dot2: each
    product's rounding error by an fma, each sum's by TwoSum, their total added last).
    Which: |a| <= h max(1, |x[n, i]|) (the most a nudge moves it) plus a bound on the
    forward pass's rounding, (I + 2) eps sum_i |x[n, i]| max_i |W[i, j]| + |b[j]|. The
    others are left as they are: a nudge moves them by d on one side of the kink, a
    change that does not read a."""
    batch_size, input_size = x.shape
    out = a.copy()
    column_largest = np.zeros(W.shape[1])
    for i in range(input_size):
        for j in range(W.shape[1]):
            column_largest[j] = max(column_largest[j], abs(W[i, j]))
    slack = (input_size + 2) * 2.0**-52
    for n in range(batch_size):
        largest, total_size = 1.0, 0.0
        for i in range(input_size):
            largest = max(largest, abs(x[n, i]))
            total_size += abs(x[n, i])
        for j in range(W.shape[1]):
            rounding = slack * (total_size * column_largest[j] + abs(b[j]))
            if abs(a[n, j]) > h * largest + 2.0 * rounding:
                continue
            high, low = 0.0, 0.0
            for i in range(input_size + 1):
                if i < input_size:
                    product = x[n, i] * W[i, j]
                    low += fma(x[n, i], W[i, j], -product)
                else:
                    product = b[j]
                total = high + product
                back = total - high
                low += (high - (total - back)) + (product - back)
                high = total
            out[n, j] = high + low
    return out


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


@numba.njit(inline="always", **JIT)
def moments_of(p, by_class, out, power):
    """out[k-1, j] = sum over the classes c, in order 0..K-1, of p[c] by_class[c, j]**k (the
    power a product at a time), then divided by k!, for k = 1..out.shape[0] and each column
    j: the coefficients of sum_c p_c expm1(d w_c) = sum_k d**k out[k-1, j] for the weights
    w = by_class[:, j] (p (K,), by_class (K, J), power (J,) room to work in)."""
    out[:, :] = 0.0
    for c in range(p.size):
        for j in range(power.size):
            power[j] = p[c]
        for k in range(out.shape[0]):
            for j in range(power.size):
                power[j] *= by_class[c, j]
                out[k, j] += power[j]
    factorial = 1.0
    for k in range(out.shape[0]):
        factorial *= k + 1
        for j in range(power.size):
            out[k, j] /= factorial


@numba.njit(**JIT)
def moment_table(probabilities, W, degree):
    """moments_of each sample's probabilities (B, K) for the outgoing weights W (H, K) of
    every unit: (B, degree, H), M_k[n, j] / k! = sum_c p[n, c] W[j, c]**k / k!."""
    by_class = np.ascontiguousarray(W.T)  # (K, H): the loops over units contiguous
    out = np.empty((probabilities.shape[0], degree, W.shape[0]))
    power = np.empty(W.shape[0])
    for n in range(probabilities.shape[0]):
        moments_of(probabilities[n], by_class, out[n], power)
    return out
