"""Shared fixtures: the real MNIST set (skipped when absent unless DISTNUM_REQUIRE_DATA=1)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from distnum.data import has_all_files, load_mnist


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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (starting one costs seconds), shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """A small MNIST-format data set: 60 training and 20 test images of random pixels."""
    from idx_files import write_fake_mnist

    directory = tmp_path_factory.mktemp("tiny-mnist")
    write_fake_mnist(directory, n_train=60, n_test=20)
    return directory
