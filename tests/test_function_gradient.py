"""distnum.numerical_gradient: any function's central differences over Ray actors, with the
bits of the book's single-process numerical_gradient for any number of workers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import distnum
from distnum.distributed import WorkerFailed
from distnum.gradient import numerical_gradient as book_numerical_gradient
from distnum.models import SimpleNet

# Functions made inside functions: cloudpickle ships them by value, as it does a user's
# functions defined in a notebook or a script (a test module's own it would ship by name,
# for workers that cannot import it).


def make_wavy():
    def wavy(x: np.ndarray) -> float:
        """Not a network: every entry matters, none linearly."""
        return float(np.sum(np.sin(x) * x**2) + np.prod(np.cos(x[..., :1])))

    return wavy


def make_unshippable():
    lock = threading.Lock()  # pickle cannot ship it

    def f(x: np.ndarray) -> float:
        with lock:
            return float(x.sum())

    return f


wavy = make_wavy()


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5)])
def test_same_bits_as_the_book_for_1_2_and_3_workers(ray_session, shape):
    x = np.random.default_rng(1).normal(size=shape)
    expected = book_numerical_gradient(wavy, x.copy())
    for workers in (1, 2, 3):
        got = distnum.numerical_gradient(wavy, x, workers=workers, quiet=True)
        assert got.shape == shape and got.tobytes() == expected.tobytes(), workers
    assert np.array_equal(x, np.random.default_rng(1).normal(size=shape))  # x left as it was


def test_the_books_closure_over_the_weights_still_sees_the_nudges(ray_session):
    """4.4.2: f ignores its argument and reads net.W, the array being nudged."""
    net = SimpleNet(seed=0)
    x, t = np.array([0.6, 0.9]), np.array([0, 0, 1])

    def f(W):
        return net.loss(x, t)

    expected = book_numerical_gradient(f, net.W)
    got = distnum.numerical_gradient(f, net.W, workers=2, quiet=True)
    assert got.tobytes() == expected.tobytes() and np.abs(got).max() > 0.01


def test_an_exception_in_f_comes_back_as_one_line_with_its_type(ray_session):
    def f(x):
        if x[3] > 10:
            raise ZeroDivisionError("no loss here\nsecond line")
        return float(x.sum())

    x = np.array([0.0, 1.0, 2.0, 10.0 - 1e-5, 4.0])
    with pytest.raises(
        WorkerFailed, match=r"^a worker actor raised ZeroDivisionError: no loss here$"
    ):
        distnum.numerical_gradient(f, x, workers=2, quiet=True)


def test_f_must_return_one_number(ray_session):
    with pytest.raises(
        ValueError, match=r"f returned an array of shape \(3,\); .* one real number"
    ):
        distnum.numerical_gradient(lambda x: x * 2, np.ones(3))
    with pytest.raises(
        WorkerFailed, match=r"raised ValueError: f returned an array of shape \(3,\)"
    ):
        distnum.numerical_gradient(lambda x: x * 2, np.ones(3), workers=2, quiet=True)
    with pytest.raises(ValueError, match="f returned str"):
        distnum.numerical_gradient(lambda x: "loss", np.ones(3))


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: distnum.numerical_gradient(wavy, np.ones(3), workers=0), "workers=0"),
        (lambda: distnum.numerical_gradient(wavy, np.ones(3), workers=True), "workers=True"),
        (lambda: distnum.numerical_gradient(wavy, np.arange(3), workers=2), "dtype int64"),
        (lambda: distnum.numerical_gradient(wavy, np.ones((3, 4)).T, workers=2), "contiguous"),
        (lambda: distnum.numerical_gradient(wavy, np.ones(3), h=0, workers=2), "h=0"),
        (
            lambda: distnum.numerical_gradient(make_unshippable(), np.ones(3), workers=2),
            "cannot be shipped",
        ),
        # as strict as train: the same checks, the same messages
        (
            lambda: distnum.numerical_gradient(wavy, np.ones(3), h="1e-4", workers=2),
            r"h='1e-4' is not a number; give one such as 1e-4",
        ),
        (
            lambda: distnum.numerical_gradient(wavy, np.ones(3), h=10, workers=2),
            r"h=10 must be finite, > 0 and <= 1",
        ),
        (
            lambda: distnum.numerical_gradient(wavy, np.ones(3), h=1e-300, workers=2),
            r"h=1e-300 vanishes next to x's entries of size 1",
        ),
        (lambda: distnum.numerical_gradient(5, np.ones(3), workers=2), r"f=5 is not a function"),
        (
            lambda: distnum.numerical_gradient(wavy, np.ones((0, 3)), workers=2),
            r"x has shape \(0, 3\), no entries",
        ),
    ],
)
def test_bad_arguments_are_refused_before_ray(call, problem):
    with pytest.raises(ValueError, match=problem):
        call()


def test_more_workers_than_the_cluster_holds_is_one_line(ray_session):
    with pytest.raises(ValueError, match=r"^workers=1000000: 1000000 worker actors need about "
                                         r".* give at most \d+"):  # fmt: skip
        distnum.numerical_gradient(wavy, np.ones(3), workers=10**6, quiet=True)
