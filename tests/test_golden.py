"""Golden digests: the same bits on any x86-64 CPU.

The constants below were measured on an AMD EPYC (AVX-512) with the delta-form engine (the
forward pass's also on an Intel Xeon, AVX-512, before it); they must hold on any x86-64
machine. Nothing that feeds the parameters depends on a CPU feature or a library's kernel
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

import numpy as np

from distnum.engines import FastEngine
from distnum.models import TwoLayerNet
from distnum.training import train

# On TwoLayerNet(784, 50, 10, seed=0) and conftest's mnist_batch (100 real MNIST images):
# sha256 of the fast engine's gradient (float64 bytes), h = 1e-4, and of predict's
# probabilities (100, 10) followed by the loss, as the metrics compute them
FAST_GRADIENT_SHA256 = "ca28441568c2ec3f3f2f0f65daa19147d6c6597ec8a2dcfb79e39f4e9a717bd2"
FORWARD_SHA256 = "0a44f4b433164deb16513e42d3b463c2cb808b9c044956d429e81a23c098e35f"
# params_sha256 of `distnum train --iters 100 --workers 2` with the other options at their
# defaults (seed 0, batch 100, lr 0.1, hidden 50, fast engine)
RUN_100_STEPS_SHA256 = "f2070eb4830b94bf600401c656c976849026fe4418786f1172b924f97cd9c922"
# and its metrics.jsonl: sha256 of the 100 step losses (float64 bytes), the final accuracies
RUN_100_STEPS_LOSSES_SHA256 = "435215ebbd612551f7352f515f668047586180b8b8693d738e84af21986a178d"
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


def start_digests(data_dir, env: dict[str, str]) -> subprocess.Popen:
    """DIGESTS in a fresh process with env added to the environment: it prints the golden
    gradient's and forward pass's digests."""
    return subprocess.Popen(
        [sys.executable, "-c", DIGESTS.format(data_dir=str(data_dir))],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_golden_gradient_and_forward_pass(mnist_batch):
    """The golden digests, from the kernels as distnum compiles them on this CPU (its widest
    vectors: 512 bits on one with AVX-512)."""
    x, t = mnist_batch
    net = TwoLayerNet(784, 50, 10, seed=0)
    grad = FastEngine(net.layout, np.arange(net.layout.size))(net.flat_params, x, t, 1e-4)
    assert hashlib.sha256(grad).hexdigest() == FAST_GRADIENT_SHA256
    forward = net.predict(x).tobytes() + np.float64(net.loss(x, t)).tobytes()
    assert hashlib.sha256(forward).hexdigest() == FORWARD_SHA256


def test_same_bits_when_numba_targets_another_cpu(mnist_dir, tmp_path):
    """The golden digests with the kernels compiled for Haswell (AVX2 and FMA, 256-bit
    vectors, like an AMD EPYC of that generation) and for a generic x86-64 (SSE2, 128-bit
    vectors, no FMA: its fma is the C library's, in software), each into an empty cache so
    that nothing compiled before is reused; the two compile at once."""
    targets = ["haswell", "generic"]
    runs = {cpu: start_digests(mnist_dir, {"NUMBA_CACHE_DIR": str(tmp_path / cpu),
                                           "NUMBA_CPU_NAME": cpu})
            for cpu in targets}  # fmt: skip
    printed = {cpu: run.communicate(timeout=900) for cpu, run in runs.items()}
    for cpu, run in runs.items():
        assert run.returncode == 0, (cpu, printed[cpu][1])
    results = {cpu: stdout.split() for cpu, (stdout, _) in printed.items()}
    assert results == {cpu: [FAST_GRADIENT_SHA256, FORWARD_SHA256] for cpu in targets}


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
