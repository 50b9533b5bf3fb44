"""What both engines check, and the one BLAS thread they compute with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from threadpoolctl import ThreadpoolController

from distnum.models import ParamLayout

_threadpools = ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the forward passes inside with BLAS on one thread: a matrix product's bits
    depend on how many threads share it, and a gradient must not depend on the process
    (driver, actor, 1 or 2 cores) that computes it."""
    with _threadpools.limit(limits=1, user_api="blas"):
        yield


def checked_indices(layout: ParamLayout, indices: np.ndarray) -> np.ndarray:
    """indices as an int64 array, each a valid flat parameter index of layout."""
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= layout.size):
        raise ValueError(f"parameter indices must lie in [0, {layout.size})")
    return indices


def checked_params(flat: np.ndarray) -> np.ndarray:
    if flat.dtype != np.float64:
        raise ValueError(
            f"parameters are {flat.dtype}; distnum computes in float64 only "
            "(a central difference with h = 1e-4 means nothing in float32)"
        )
    return flat
