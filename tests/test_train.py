"""distnum train: determinism over worker counts, outputs, progress, and failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import failing_engine
import numpy as np
import psutil
import pytest
from run_helpers import actor_processes, assert_nothing_left, descendants

from distnum.distributed import ShardedGradient, WorkerFailed
from distnum.engines import FastEngine
from distnum.gradcheck import train_with_backprop
from distnum.models import TwoLayerNet
from distnum.training import params_sha256, train


def distnum_train(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distnum", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_same_bits_with_any_worker_count_and_without_ray(ray_session, mnist_dir, tmp_path):
    def run(name: str, seed: int = 5, **options) -> dict:
        return train(iters=20, seed=seed, data_dir=str(mnist_dir), out=str(tmp_path / name),
                     quiet=True, **options)  # fmt: skip

    runs = {workers: run(f"w{workers}", workers=workers) for workers in (1, 2, 3)}
    local = run("local", local=True)
    digests = {summary["params_sha256"] for summary in [*runs.values(), local]}
    assert len(digests) == 1, digests
    assert runs[3]["workers"] == 3 and sum(runs[3]["actors_per_node"].values()) == 3
    assert run("seed6", seed=6, local=True)["params_sha256"] not in digests


def test_outputs(ray_session, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    summary = train(
        iters=20, batch_size=10, lr=0.5, data_dir=str(tiny_mnist), out=str(out), quiet=True
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "test_acc" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all(np.isfinite(r["loss"]) and r["seconds"] > 0 for r in steps)
    # 60 images in batches of 10: an epoch every 6 steps, and the end
    assert [r["step"] for r in epochs] == [6, 12, 18, 20]
    assert all(0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 for r in epochs)
    with np.load(out / "params.npz", allow_pickle=False) as params:
        assert sorted(params.files) == ["W1", "W2", "b1", "b2"]
        flat = np.concatenate([params[k].ravel() for k in ("W1", "b1", "W2", "b2")])
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["params_sha256"] == params_sha256(flat)
    assert saved["params_sha256"] == hashlib.sha256(flat.astype("<f8").tobytes()).hexdigest()
    assert saved["workers"] == 2  # the CPUs this Ray reports
    for key in (
        "iters",
        "engine",
        "final_loss",
        "train_acc",
        "test_acc",
        "wall_s",
        "steps_per_s",
        "actors_per_node",
    ):
        assert key in saved
    assert saved["final_loss"] == steps[-1]["loss"]


def test_more_workers_than_cpus_share_them(ray_session, tiny_mnist, tmp_path):
    summary = train(
        iters=5,
        batch_size=10,
        workers=5,
        data_dir=str(tiny_mnist),
        out=str(tmp_path / "five"),
        quiet=True,
    )
    assert summary["workers"] == 5 and sum(summary["actors_per_node"].values()) == 5
    assert summary["transport"] == "shared memory"  # all on this node


def test_full_engine_trains_the_same_way(ray_session, tiny_mnist, tmp_path):
    """Same run with each engine: parameters agree to the engines' ~1e-12."""
    finals = {}
    for engine in ("fast", "full"):
        out = tmp_path / engine
        train(
            iters=3,
            batch_size=10,
            hidden=4,
            engine=engine,
            workers=2,
            data_dir=str(tiny_mnist),
            out=str(out),
            quiet=True,
        )
        with np.load(out / "params.npz") as params:
            finals[engine] = params["W1"].copy()
    np.testing.assert_allclose(finals["fast"], finals["full"], rtol=0, atol=1e-10)


def gradient_workers() -> list[psutil.Process]:
    """The GradientWorker actors of this process's Ray (its descendants), alive."""
    return actor_processes(psutil.Process().children(recursive=True), "GradientWorker")


def test_worker_exception_ends_the_run_with_a_clear_error(ray_session, tiny_mnist, tmp_path):
    ray_session.cloudpickle.register_pickle_by_value(failing_engine)
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match="RuntimeError: injected failure in the engine"):
        train(
            iters=50,
            batch_size=10,
            workers=2,
            engine=failing_engine.FailingEngine,
            data_dir=str(tiny_mnist),
            out=str(tmp_path / "fails"),
            quiet=True,
        )
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 20
    while gradient_workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gradient_workers() == []


def test_quiet_and_not_a_terminal_prints_a_line_per_epoch(tiny_mnist, tmp_path, joining):
    run = distnum_train("--iters", "12", "--batch-size", "10", "--workers", "2", "--data-dir",
                        str(tiny_mnist), "--out", str(tmp_path / "cli"), *joining)  # fmt: skip
    stdout, stderr = run.communicate(timeout=180)
    assert run.returncode == 0, stderr
    lines = stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step")] == ["6", "12"]
    assert lines[-1].startswith("done: 12 steps") and "test_acc" in lines[-1]
    assert "step/s" not in stderr and "\r" not in stderr  # no progress bar off a terminal


def test_unreachable_address_fails_fast(tiny_mnist, tmp_path):
    started = time.monotonic()
    run = distnum_train(
        "--address",
        "127.0.0.1:9",
        "--batch-size",
        "10",
        "--data-dir",
        str(tiny_mnist),
        "--out",
        str(tmp_path / "x"),
    )
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert run.returncode == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:9" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_promptly_and_leaves_no_process(tiny_mnist, tmp_path):
    out = tmp_path / "interrupted"
    run = distnum_train(
        "--iters",
        "1000000",
        "--batch-size",
        "10",
        "--workers",
        "2",
        "--data-dir",
        str(tiny_mnist),
        "--out",
        str(out),
        "--quiet",
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not metrics.exists() or metrics.read_text().count("test_acc") < 2
    ):
        time.sleep(0.2)
    assert run.poll() is None, run.communicate()
    ray_processes = descendants(run)
    run.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = run.communicate(timeout=60)
    assert time.monotonic() - stopped < 30
    assert run.returncode == 130
    assert "stopped by SIGINT at step" in stderr
    assert_nothing_left(ray_processes)
    assert os.path.exists(metrics)


@pytest.mark.parametrize(("workers", "rows"), [(2, 100), (3, 7), (2, 1)])
def test_the_workers_loss_has_the_bits_of_one_process(ray_session, mnist, workers, rows):
    """The step's loss, each actor computing its share of the rows (one may get none)."""
    (x_train, t_train), _ = mnist
    net = TwoLayerNet(784, 12, 10, seed=3)
    batch = np.random.default_rng(rows).choice(len(x_train), rows)
    gradient = ShardedGradient(net.layout, "fast", 1e-4, x_train, t_train, workers)
    try:
        assert gradient.transport == "shared memory"
        loss = gradient.loss(net.flat_params, batch)
    finally:
        gradient.close()
    assert loss == net.loss(x_train[batch], t_train[batch])


def test_the_workers_accuracies_are_one_processes(ray_session, mnist):
    """The training and test accuracies, each actor classifying its share of the samples:
    the numbers net.accuracy gives."""
    (x_train, t_train), (x_test, t_test) = mnist
    net = TwoLayerNet(784, 12, 10, seed=3)
    train_with_backprop(net, x_train, t_train, 300, np.random.default_rng(0))
    gradient = ShardedGradient(net.layout, "fast", 1e-4, x_train, t_train, 2, x_test=x_test,
                               t_test=t_test)  # fmt: skip
    try:
        found = gradient.accuracies(net.flat_params)
    finally:
        gradient.close()
    assert found == (net.accuracy(x_train, t_train), net.accuracy(x_test, t_test))
    assert 0.2 < found[1] < 1.0  # trained a little: not one class for all


def test_actors_without_the_channel_get_a_compiled_graph(ray_session, mnist, monkeypatch,
                                                         tmp_path):  # fmt: skip
    """As in a container with its own /dev/shm: the actors' serving ends at once, and the
    steps go through a compiled graph, with the same bits."""
    from distnum import node_channel

    created = []

    def unreachable(*args) -> node_channel.SharedStep:
        shared = real_create(*args)
        created.append(shared.path)
        shared.path = str(tmp_path / "elsewhere")  # what the actors are told to open
        return shared

    real_create = node_channel.SharedStep.create
    monkeypatch.setattr(node_channel.SharedStep, "create", staticmethod(unreachable))
    (x_train, t_train), _ = mnist
    net = TwoLayerNet(784, 12, 10, seed=3)
    batch = np.random.default_rng(0).choice(len(x_train), 50)
    gradient = ShardedGradient(net.layout, "fast", 1e-4, x_train, t_train, 2)
    try:
        assert gradient.transport == "compiled graph"
        grad, _ = gradient(net.flat_params, batch)
    finally:
        gradient.close()
        for path in created:
            os.unlink(path)
    local = FastEngine(net.layout, np.arange(net.layout.size))
    assert np.array_equal(grad, local(net.flat_params, x_train[batch], t_train[batch], 1e-4))
