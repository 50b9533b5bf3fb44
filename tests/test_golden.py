"""Golden digests: the same bits on any x86-64 CPU.

The constants below were measured on an Intel Xeon (AVX-512); they must hold on any x86-64
machine (an AMD EPYC with AVX2 gave other bits before the network's arithmetic was fixed in
order). Nothing that feeds the parameters depends on a CPU feature or a library's kernel
choice: the matrix products, exp, log and sums are distnum's own numba loops, with every
fused multiply-add asked for explicitly. A change to that arithmetic changes these digests:
then measure them again, here and in the README (the notebook run's digest), on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import llvmlite.binding
import numpy as np
import pytest

from distnum.training import train

# On TwoLayerNet(784, 50, 10, seed=0) and conftest's mnist_batch (100 real MNIST images):
# sha256 of the fast engine's gradient (float64 bytes), h = 1e-4, and of predict's
# probabilities (100, 10) followed by the loss, as the metrics compute them
FAST_GRADIENT_SHA256 = "a9efd9d2102d62ab90354ea5d1f4cfd18407de89adb8746cae7667f5fc3cea44"
FORWARD_SHA256 = "0a44f4b433164deb16513e42d3b463c2cb808b9c044956d429e81a23c098e35f"
# params_sha256 of `distnum train --iters 100 --workers 2` with the other options at their
# defaults (seed 0, batch 100, lr 0.1, hidden 50, fast engine)
RUN_100_STEPS_SHA256 = "bd2fa41e8648a411f661946637beecc833e9125b6e9c516c5934ff8a60d5ac8f"
# and its metrics.jsonl: sha256 of the 100 step losses (float64 bytes), the final accuracies
RUN_100_STEPS_LOSSES_SHA256 = "1726b50e886f0e7768e4500b45ffaa9b970caaffd0c587df4f04483641011ee6"
RUN_100_STEPS_ACCURACIES = {"train_acc": 0.1925, "test_acc": 0.1949}

DIGESTS = """
import hashlib
import numpy as np
from distnum.data import load_mnist
from distnum.engines import FastEngine
from distnum.models import TwoLayerNet
(x_train, t_train), _ = load_mnist(data_dir={data_dir!r})
batch = np.random.default_rng(2016).choice(len(x_train), 100)  # the conftest's mnist_batch
x, t = x_train[batch], t_train[batch]
net = TwoLayerNet(784, 50, 10, seed=0)
grad = FastEngine(net.layout, np.arange(net.layout.size))(net.flat_params, x, t, 1e-4)
print(hashlib.sha256(grad).hexdigest())
print(hashlib.sha256(net.predict(x).tobytes() + np.float64(net.loss(x, t)).tobytes()).hexdigest())
"""


def digests(data_dir, env: dict[str, str]) -> list[str]:
    """The golden gradient's and forward pass's digests, computed by DIGESTS in a fresh
    process with env added to the environment."""
    done = subprocess.run(
        [sys.executable, "-c", DIGESTS.format(data_dir=str(data_dir))],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("cpu", ["", "haswell", "generic", "host features"])
def test_same_bits_when_numba_targets_another_cpu(mnist_dir, tmp_path, cpu):
    """The golden digests, with the kernels compiled for this CPU as distnum asks (its
    widest vectors), for Haswell (AVX2 and FMA, like an AMD EPYC), for a generic x86-64
    (SSE2, no FMA: its fma is the C library's, in software), and for this CPU as LLVM
    would by default (256-bit vectors where it has AVX-512), each into an empty cache so
    that nothing compiled before is reused."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    if cpu == "host features":
        env["NUMBA_CPU_FEATURES"] = llvmlite.binding.get_host_cpu_features().flatten()
    elif cpu:
        env["NUMBA_CPU_NAME"] = cpu
    assert digests(mnist_dir, env) == [FAST_GRADIENT_SHA256, FORWARD_SHA256]


def test_short_run_digests(ray_session, mnist_dir, tmp_path):
    """The parameters, and the metrics computed from the same forward pass."""
    summary = train(iters=100, workers=2, data_dir=str(mnist_dir), out=str(tmp_path), quiet=True)
    assert summary["params_sha256"] == RUN_100_STEPS_SHA256
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([record["loss"] for record in records if "loss" in record])
    assert losses.size == 100
    assert hashlib.sha256(losses.tobytes()).hexdigest() == RUN_100_STEPS_LOSSES_SHA256
    (last,) = [record for record in records if "test_acc" in record]
    assert {name: last[name] for name in RUN_100_STEPS_ACCURACIES} == RUN_100_STEPS_ACCURACIES
