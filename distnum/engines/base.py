"""What every engine holds and checks; one BLAS thread for the training loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from threadpoolctl import ThreadpoolController

from distnum.models import ParamLayout

_threadpools = ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Keep BLAS to one thread inside: idle OpenBLAS threads spin on the cores the worker
    actors need. (Nothing that feeds the parameters calls BLAS: the network's matrix
    products are distnum.models.affine, whose bits depend on no library or CPU.)"""
    with _threadpools.limit(limits=1, user_api="blas"):
        yield


def checked_indices(layout: ParamLayout, indices: np.ndarray) -> np.ndarray:
    """indices as an int64 array, each a valid flat parameter index of layout."""
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= layout.size):
        raise ValueError(f"parameter indices must lie in [0, {layout.size})")
    return indices


class ShardEngine:
    """What an engine over a shard's flat parameter indices holds: the layout and the
    indices, checked once, here."""

    def __init__(self, layout: ParamLayout, indices: np.ndarray) -> None:
        self.layout = layout
        self.indices = checked_indices(layout, indices)


def checked_params(flat: np.ndarray) -> np.ndarray:
    """flat as a read-only array, if it is float64 (its shape is checked by
    ParamLayout.views). Read-only always: an engine never writes the parameters, and its
    kernels then see one type whether flat came from Ray's object store (read-only) or not,
    so numba compiles each of them once, not twice (about 30 s on a fresh install)."""
    flat = np.asarray(flat)
    if flat.dtype != np.float64:
        raise ValueError(
            f"parameters are {flat.dtype}; distnum computes in float64 only "
            "(a central difference with h = 1e-4 means nothing in float32)"
        )
    read_only = flat.view()
    read_only.flags.writeable = False
    return read_only
