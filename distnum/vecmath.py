"""exp, log and the sigmoid for numba loops: vectorised, and the same bits on every x86-64 CPU.

numba turns math.exp and math.log into calls to the C library, one element at a time: about
10 ns each on these CPUs, and the fast engine needs some 17 million of them per step; and
the C library and numpy pick their exp per CPU, which can change a last bit. These two are
written in plain arithmetic (range reduction, then a polynomial evaluated in Estrin's order
with fused multiply-adds), with no branches, so that LLVM vectorises the loops that call
them. Both are accurate to 2 units in the last place over the whole float64 range
(tests/test_vecmath.py checks them against numpy), they return inf, 0 and nan where exp and
log do, and they give the same bits for an element whichever lane of a vector it falls in.

Every operation is one IEEE-754 operation, rounded once, in the order written: no fastmath
flag lets LLVM reassociate or fuse, and each fused multiply-add is asked for explicitly
(fma), so a CPU with FMA units and one without compute the same bits.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import config, registry
from numba.extending import intrinsic


def prefer_wide_vectors() -> bool:
    """On a CPU with AVX-512, let LLVM vectorise with 512-bit registers, where it prefers 256
    bits by default: the fast engine runs about 12 % faster, with the same bits, as each lane
    computes what the scalar code would. It is a setting of numba's for the whole process,
    so it applies only before numba's first compilation here, and never over the user's own
    NUMBA_CPU_FEATURES or NUMBA_CPU_NAME. Returns whether it applied."""
    chosen = "NUMBA_CPU_FEATURES" in os.environ or "NUMBA_CPU_NAME" in os.environ
    if chosen or "_toplevel_target_context" in vars(registry.cpu_target):
        return False
    features = binding.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    config.CPU_FEATURES = features + ",-prefer-256-bit"
    return True


prefer_wide_vectors()  # before the first kernel below is compiled

LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * LN2_HI is exact for |k| < 2**20
LN2_LO = 1.90821492927058770002e-10
ROUND = 6755399441055744.0  # 1.5 * 2**52: adding it rounds to an integer kept in the low bits
ROUND_BITS = 0x4338000000000000
SQRT_HALF_BITS = 0x3FE6A09E667F3BCD  # the bits of sqrt(0.5)
MANTISSA = 0x000FFFFFFFFFFFFF
# No fastmath flag, not even "contract": with it LLVM fuses a * b + c where the target CPU
# has FMA and not where it has none, and the bits would depend on the machine.
JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@intrinsic
def bits_of(typingctx, x):
    """The IEEE-754 bits of a float64, as an int64."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float64 whose IEEE-754 bits are the int64 given."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (IEEE-754 fusedMultiplyAdd): the CPU's FMA instruction
    where it has one, else the C library's exact software fma; the same bits either way."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float64(types.float64, types.float64, types.float64), codegen


@numba.njit(inline="always", **JIT)
def exp(x: float) -> float:
    """e**x: x = k ln2 + r with |r| <= ln2 / 2, e**r by its degree-13 polynomial, then
    2**k applied as two powers of two so that neither overflows before the product does."""
    x = 710.0 if x > 710.0 else x  # keeps nan: comparisons with nan are false
    x = -746.0 if x < -746.0 else x
    t = fma(x, LOG2E, ROUND)
    k = t - ROUND
    r = fma(-k, LN2_LO, fma(-k, LN2_HI, x))
    r2 = r * r
    r4 = r2 * r2
    s0 = fma(fma(r, 1.0 / 6, 0.5), r2, 1.0 + r)
    s1 = fma(fma(r, 1.0 / 5040, 1.0 / 720), r2, fma(r, 1.0 / 120, 1.0 / 24))
    s2 = fma(fma(r, 1.0 / 39916800, 1.0 / 3628800), r2, fma(r, 1.0 / 362880, 1.0 / 40320))
    s3 = fma(r, 1.0 / 6227020800, 1.0 / 479001600)
    p = fma(fma(s3, r4, s2), r4 * r4, fma(s1, r4, s0))
    k_int = bits_of(t) - ROUND_BITS
    half = k_int >> 1
    return p * _float_of((half + 1023) << 52) * _float_of((k_int - half + 1023) << 52)


@numba.njit(inline="always", **JIT)
def log(x: float) -> float:
    """ln x: x = 2**k m with sqrt(1/2) <= m < sqrt(2), ln m = 2 atanh(s), s = (m-1)/(m+1),
    by its odd series to s**23. Subnormal x are scaled by 2**54 first."""
    subnormal = x < 2.2250738585072014e-308
    scaled = x * 18014398509481984.0 if subnormal else x
    bits = bits_of(scaled) - SQRT_HALF_BITS
    k = (bits >> 52) - (54 if subnormal else 0)
    m = _float_of((bits & MANTISSA) + SQRT_HALF_BITS)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    s4 = s2 * s2
    s8 = s4 * s4
    q0 = fma(s4, fma(s2, 1.0 / 9, 1.0 / 7), fma(s2, 1.0 / 5, 1.0 / 3))
    q1 = fma(s4, fma(s2, 1.0 / 17, 1.0 / 15), fma(s2, 1.0 / 13, 1.0 / 11))
    q2 = fma(s4, 1.0 / 23, fma(s2, 1.0 / 21, 1.0 / 19))
    series = s2 * fma(s8, fma(s8, q2, q1), q0)
    kf = _float_of(k + ROUND_BITS) - ROUND  # float(k) without int64 conversion, which AVX2 lacks
    result = fma(kf, LN2_HI, 2.0 * s + fma(2.0 * s, series, kf * LN2_LO))
    result = -np.inf if x == 0.0 else result
    result = np.nan if x < 0.0 else result
    return x if (x == np.inf or x != x) else result


@numba.njit(inline="always", **JIT)
def sigmoid(x: float) -> float:
    """1 / (1 + e**-x): 0 for x below about -745, where e**-x overflows to inf."""
    return 1.0 / (1.0 + exp(-x))


# expm1 and log1p, for the exact changes of the delta form (distnum/engines/deltas.py). Near
# 0 each is its power series, cut after DEGREE terms where what is left is below half an ulp
# of the result (series_bound); that is how the function is evaluated there, not an
# approximation of it. Farther out, Kahan's forms built on exp and log above (a few ulps).
# The series alone, expm1_series and log1p_series, are the same bits as the functions
# wherever |x| <= SERIES_MAX: a loop that knows all its arguments lie there calls them, with
# no branch, so that it vectorises.
DEGREE = 6
HALF_ULP = 2.0**-54  # half an ulp of any float64 y is at least |y| * 2**-54


def expm1_remainder(degree: int, bound: float) -> float:
    """A bound on |expm1(x) - its series to x**degree / degree!| / |x|, for |x| <= bound:
    sum over k > degree of bound**(k-1) / k!, as a geometric tail."""
    return bound**degree / math.factorial(degree + 1) / (1.0 - bound / (degree + 2))


def log1p_remainder(degree: int, bound: float) -> float:
    """A bound on |log1p(y) - its series to +-y**degree / degree| / |y|, for |y| <= bound < 1:
    the tail sum over k > degree of bound**(k-1) / k."""
    return bound**degree / (degree + 1) / (1.0 - bound)


def series_bound(remainder, degree: int) -> float:
    """The largest power of two b with remainder(degree, b) * (1 + b) below half an ulp of the
    result (whose size is at least |x| / (1 + |x|)): the series' domain |x| <= b."""
    bound = 0.5
    while remainder(degree, bound) * (1.0 + bound) > HALF_ULP:
        bound /= 2.0
    return bound


EXPM1_SERIES_MAX = series_bound(expm1_remainder, DEGREE)
LOG1P_SERIES_MAX = series_bound(log1p_remainder, DEGREE)
SERIES_MAX = min(EXPM1_SERIES_MAX, LOG1P_SERIES_MAX)


@numba.njit(inline="always", **JIT)
def expm1_series(x: float) -> float:
    """x + x**2/2! + ... + x**6/6!, in Horner's order with fmas: expm1 for |x| <= SERIES_MAX."""
    tail = fma(x, 1.0 / 720, 1.0 / 120)
    tail = fma(tail, x, 1.0 / 24)
    tail = fma(tail, x, 1.0 / 6)
    tail = fma(tail, x, 0.5)
    return fma(tail * x, x, x)


@numba.njit(inline="always", **JIT)
def log1p_series(y: float) -> float:
    """y - y**2/2 + ... - y**6/6, in Horner's order with fmas: log1p for |y| <= SERIES_MAX."""
    tail = fma(y, -1.0 / 6, 1.0 / 5)
    tail = fma(tail, y, -0.25)
    tail = fma(tail, y, 1.0 / 3)
    tail = fma(tail, y, -0.5)
    return fma(tail * y, y, y)


@numba.njit(inline="always", **JIT)
def expm1(x: float) -> float:
    """e**x - 1, accurate where x is tiny (the change of exp under a nudge): its series for
    |x| <= SERIES_MAX; else Kahan's (u - 1) x / log u with u = e**x, which cancels the
    rounding of u."""
    if abs(x) <= SERIES_MAX:
        return expm1_series(x)
    return _expm1_far(x)


@numba.njit(**JIT)
def _expm1_far(x: float) -> float:
    """expm1 beyond its series (a large nudge): called, not inlined at each of expm1's many
    call sites, where it would only add to numba's compile time."""
    if x > 709.0 or x < -38.0 or x != x:  # e**x - 1 is e**x, or -1, to the last bit
        return exp(x) - 1.0
    u = exp(x)
    return (u - 1.0) * x / log(u)


@numba.njit(inline="always", **JIT)
def log1p(y: float) -> float:
    """log(1 + y), accurate where y is tiny (a loss's relative change under a nudge): its
    series for |y| <= SERIES_MAX; else Kahan's log(u) y / (u - 1) with u = 1 + y, which
    cancels the rounding of u."""
    if abs(y) <= SERIES_MAX:
        return log1p_series(y)
    return _log1p_far(y)


@numba.njit(**JIT)
def _log1p_far(y: float) -> float:
    """log1p beyond its series: called, not inlined, as _expm1_far."""
    u = 1.0 + y
    if u == np.inf or y != y:
        return log(u)
    return log(u) * (y / (u - 1.0))


def elementwise(function):
    """function of one float64, over a 1-D float64 array: for tests and benchmarks (compiled
    at first use, not cached: numba caches no function made by another)."""

    @numba.njit(nogil=True, error_model="numpy")
    def over(x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = function(x[i])
        return out

    return over


exp_array, log_array = elementwise(exp), elementwise(log)
expm1_array, log1p_array = elementwise(expm1), elementwise(log1p)
