"""The fast engine's exp and log agree with numpy's to 2 units in the last place."""

import os
import subprocess
import sys

import llvmlite.binding
import numpy as np

from distnum.vecmath import exp_array, log_array


def ulps(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference) / np.spacing(np.abs(reference))))


def test_exp_over_its_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-708, 709.7, 1_000_001), rng.uniform(-40, 1, 500_000)])
    assert ulps(exp_array(x), np.exp(x)) <= 2.0
    tiny = np.linspace(-745, -708, 10_001)  # subnormal results: absolute error of one step
    assert np.max(np.abs(exp_array(tiny) - np.exp(tiny))) <= 5e-324 * 2


def test_exp_special_values():
    x = np.array([np.nan, np.inf, -np.inf, 710.0, 1000.0, -746.0, -1000.0, 0.0, -0.0])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(exp_array(x), np.exp(x))


def test_log_over_its_whole_range():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            np.exp(rng.uniform(-700, 700, 1_000_000)),
            rng.uniform(0.5, 20.0, 500_000),
            np.array([5e-324, 1e-310, 2.2250738585072014e-308, np.finfo(float).max, 2.0, np.e]),
        ]
    )
    reference = np.log(x)
    nonzero = reference != 0
    assert ulps(log_array(x)[nonzero], reference[nonzero]) <= 2.0
    assert log_array(np.array([1.0]))[0] == 0.0


def test_log_special_values():
    x = np.array([0.0, -0.0, -1.0, np.nan, np.inf, -np.inf])
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(log_array(x), np.log(x))


WIDE_VECTORS = """
from numba.core import config
import distnum.vecmath
print(config.CPU_FEATURES)
"""


def test_wide_vectors_only_where_the_cpu_has_them_and_the_user_chose_nothing():
    host = llvmlite.binding.get_host_cpu_features().flatten()
    unset = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}

    def features(**env: str) -> str:
        done = subprocess.run([sys.executable, "-c", WIDE_VECTORS], capture_output=True,
                              text=True, env={**unset, **env}, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    wide = "+avx512f" in host.split(",")
    assert features() == (f"{host},-prefer-256-bit" if wide else "None")
    assert features(NUMBA_CPU_NAME="haswell") == "None"
    assert features(NUMBA_CPU_FEATURES="+avx2") == "+avx2"
