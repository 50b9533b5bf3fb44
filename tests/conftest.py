"""Shared fixtures: the real MNIST set (skipped when absent unless DISTNUM_REQUIRE_DATA=1)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

# the tests' Ray (ray_session) authenticates with a token, as `ray start` sets one up; Ray
# reads this when it is first imported (a Ray that ray.init starts sets it too)
os.environ["RAY_AUTH_MODE"] = "token"

from run_helpers import actor_processes

from distnum.data import has_all_files, load_mnist

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


# the modules that take longest, first: pytest-xdist hands the two processes whole modules in
# this order, so that they end at about the same time rather than one waiting on the other
LONGEST_FIRST = ["test_run_life.py", "test_cluster.py", "test_faults.py", "test_notebook.py",
                 "test_netns_cluster.py", "test_train_multilayer.py", "test_train.py",
                 "test_cli_engines.py", "test_golden.py", "test_delta_form.py"]  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


def real_mnist_dir() -> Path:
    """DISTNUM_DATA if it holds MNIST; otherwise skip, or fail when the data is required."""
    named = os.environ.get("DISTNUM_DATA")
    if named and has_all_files(Path(named)):
        return Path(named)
    reason = (
        f"DISTNUM_DATA={named!r} holds no MNIST IDX files"
        if named
        else "real MNIST not found: set DISTNUM_DATA to a folder with the four IDX files"
    )
    if os.environ.get("DISTNUM_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason} (DISTNUM_REQUIRE_DATA=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return real_mnist_dir()


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """((x_train, t_train), (x_test, t_test)), normalized, labels as indices."""
    return load_mnist(data_dir=mnist_dir)


@pytest.fixture(scope="session")
def mnist_batch(mnist):
    """A fixed real minibatch of 100: x (100, 784), t (100,)."""
    (x_train, t_train), _ = mnist
    mask = np.random.default_rng(2016).choice(len(x_train), 100)
    return x_train[mask], t_train[mask]


def load_local_cluster():
    """cluster/local_cluster.py, the script that starts and stops a Ray of one's own."""
    spec = importlib.util.spec_from_file_location("local_cluster", CLUSTER / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tests_ray() -> dict:
    """One Ray for the tests of this process (pytest-xdist runs the suite in two, each with
    its own): a head of 2 CPUs, no dashboard, started as `ray start` starts one, with a port
    of its own for its dashboard agent (a Ray started by ray.init takes Ray's default, 52365,
    and every other Ray started meanwhile, such as each `distnum train` the tests run as a
    process, then waits 3-4 s for its agent's port). Gives local_cluster.start's description
    of it ("address", "session"); stopped by pid at the end, leaving no process."""
    local_cluster = load_local_cluster()
    state = Path(f"/tmp/distnum-tests-{os.getpid()}")  # short: Ray's socket paths must be
    try:
        yield local_cluster.start(2, [], local_cluster.free_port(), None, state)
    finally:
        local_cluster.stop(state)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(tests_ray):
    """The tests' Ray (tests_ray), this process connected to it, for the tests that compute
    in this process (starting a Ray costs seconds)."""
    import ray

    ray.init(address=tests_ray["address"], log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A small MNIST-format data set: 60 training and 20 test images of random pixels."""
    from idx_files import write_fake_mnist

    directory = tmp_path_factory.mktemp("tiny-mnist")
    write_fake_mnist(directory, n_train=60, n_test=20)
    return directory


@pytest.fixture(scope="session")
def bench_mnist(tmp_path_factory) -> Path:
    """An MNIST-format set with room for bench's batches of 100: 200 training and 20 test
    images of random pixels, for the benchmarks' tests (what they check is not MNIST's)."""
    from idx_files import write_fake_mnist

    directory = tmp_path_factory.mktemp("bench-mnist")
    write_fake_mnist(directory, n_train=200, n_test=20)
    return directory


@pytest.fixture
def joining(tests_ray) -> list[str]:
    """The options that make a `distnum train` started as a process join the tests' Ray (in
    a second or so) rather than start its own (5-7 s): for the tests of what a run does,
    not of how it starts or ends Ray."""
    return ["--address", tests_ray["address"]]


@pytest.fixture
def tests_ray_workers(tests_ray) -> Callable[[], list[psutil.Process]]:
    """A function giving the worker actors' processes in the tests' Ray: those of the one run
    a test has joined to it (a Ray holds one run's actors at a time), never another test
    process's, whose Ray is its own."""
    local_cluster = load_local_cluster()

    def processes() -> list[psutil.Process]:
        return actor_processes(local_cluster.cluster_processes(tests_ray["session"]),
                               "GradientWorker")  # fmt: skip

    return processes
