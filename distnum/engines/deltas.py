"""The delta form (DESIGN.md section 11): what a nudge changes, computed as the change itself.

A nudged loss is L(theta) + delta, and delta is evaluated directly, never as the difference
of two nearly equal numbers: a central difference is (delta(+h) - delta(-h)) / 2h, each
delta exact to a few ulps of its own size. The rules, for one sample:
    a sigmoid unit moved by d:  sigma(a + d) - sigma(a) = -s r m / (1 + r m),
                                s = sigma(a), r = sigma(-a) = 1 - s, m = expm1(-d)
                                (from sigma(a + d) = 1 / (1 + e**-a (1 + m)), exactly);
    a ReLU unit moved by d:     by cases from a and a + d, never relu(a + d) - relu(a);
    the logits moved by u:      the loss moves by log1p(sum_c p_c expm1(u_c)) - u_t,
                                p = softmax of the unmoved logits, t the label
                                (log sum_c e**(z_c + u_c) - log sum_c e**z_c, exactly).
expm1 and log1p are distnum.vecmath's: their series where the argument is tiny, with a
remainder below half an ulp, and the functions themselves beyond.
"""

from __future__ import annotations

import numba

from distnum.vecmath import JIT, expm1, fma, sigmoid


@numba.njit(inline="always", **JIT)
def sigmoid_change(sr: float, r: float, m: float) -> float:
    """sigma(a + d) - sigma(a) for sr = s r, r = sigma(-a) and m = expm1(-d), when
    1 + r m >= 0.36 (|d| <= 1: a nudge of h <= 1 times an input in [0, 1])."""
    return -(sr * m) / fma(r, m, 1.0)


@numba.njit(inline="always", **JIT)
def sigmoid_change_by(a: float, s: float, sr: float, r: float, d: float) -> float:
    """sigma(a + d) - sigma(a) for a move d of any size: sigmoid_change, or where the move
    halves e**-a or more (1 + r m < 1/2) the two values themselves, which then differ by a
    factor of at least 3/2, so that their difference loses nothing."""
    m = expm1(-d)
    denominator = fma(r, m, 1.0)
    if denominator < 0.5:
        return sigmoid(a + d) - s
    return -(sr * m) / denominator


@numba.njit(inline="always", **JIT)
def relu_change(a: float, d: float) -> float:
    """relu(a + d) - relu(a), by cases: d itself where the unit stays active, -a or a + d
    where it crosses its kink, 0 where it stays at zero (relu(x) = 0 for x <= 0)."""
    moved = a + d
    if a > 0.0:
        return d if moved > 0.0 else -a
    return moved if moved > 0.0 else 0.0


@numba.njit(inline="always", **JIT)
def unit_change(relu: bool, a: float, s: float, sr: float, r: float, d: float) -> float:
    """How much a hidden unit's output moves when its pre-activation a moves by d: ReLU's
    (relu True) or the sigmoid's, s = sigma(a), sr = s r and r = sigma(-a) (unused for
    ReLU)."""
    if relu:
        return relu_change(a, d)
    return sigmoid_change_by(a, s, sr, r, d)
