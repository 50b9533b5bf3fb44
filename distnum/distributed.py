"""Ray: worker actors that each hold one shard's engine, and the compiled graph that calls
them all once per step.

The training set goes into the object store once and every actor reads it from there
(zero-copy). Each step the driver sends the current parameters and the minibatch's indices;
each actor returns the central differences of its shard; the driver concatenates the slices
in index order.
"""

from __future__ import annotations

import collections
import os
import socket
import time

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode

from distnum.engines import EngineFactory, make_engine
from distnum.models import ParamLayout
from distnum.sharding import make_shards


class WorkerFailed(RuntimeError):
    """A worker actor raised an exception or died; the message says which and why."""


class LocalGradient:
    """The same computation in this process, over all indices at once: no Ray."""

    def __init__(self, layout: ParamLayout, engine: str | EngineFactory, h: float,
                 x_train: np.ndarray, t_train: np.ndarray) -> None:  # fmt: skip
        self.engine = make_engine(engine, layout, np.arange(layout.size))
        self.h, self.x_train, self.t_train = h, x_train, t_train
        self.num_workers = 0
        self.actors_per_node: dict[str, int] = {}

    def __call__(self, flat: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """The gradient (layout.size,) on the minibatch, and the seconds spent computing it."""
        started = time.perf_counter()
        grad = self.engine(flat, self.x_train[batch], self.t_train[batch], self.h)
        return grad, time.perf_counter() - started

    def close(self) -> None:
        pass


@ray.remote
class GradientWorker:
    """One shard: its engine, and the training set read from the object store."""

    def __init__(
        self, engine: str | EngineFactory, layout: ParamLayout, indices: np.ndarray, h: float,
        x_train: np.ndarray, t_train: np.ndarray,
    ) -> None:  # fmt: skip
        self.engine = make_engine(engine, layout, indices)
        self.h, self.x_train, self.t_train = h, x_train, t_train
        self.layout = layout

    def ready(self) -> str:
        """Compiles the kernels (or loads them from numba's cache) with one small call, on
        arrays like the steps' (the parameters arrive read-only); returns the node id."""
        flat = np.zeros(self.layout.size)
        flat.flags.writeable = False
        self.engine(flat, self.x_train[:2], self.t_train[:2], self.h)
        return ray.get_runtime_context().get_node_id()

    def gradient_slice(self, step: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
        flat, batch = step
        started = time.perf_counter()
        grad = self.engine(flat, self.x_train[batch], self.t_train[batch], self.h)
        return grad, time.perf_counter() - started


class ShardedGradient:
    """The driver's side: num_workers GradientWorker actors spread over the cluster's nodes,
    shards of equal estimated cost, and a Ray Compiled Graph calling them each step."""

    def __init__(
        self, layout: ParamLayout, engine: str | EngineFactory, h: float, x_train: np.ndarray,
        t_train: np.ndarray, num_workers: int,
    ) -> None:  # fmt: skip
        density = np.count_nonzero(x_train, axis=0) / len(x_train)
        shards = make_shards(layout, density, num_workers)
        self.shard_indices = np.concatenate(shards)  # where each gathered value belongs
        x_ref, t_ref = ray.put(x_train), ray.put(t_train)
        # more workers than CPUs share them, rather than wait for CPUs that never come
        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_worker = min(1.0, cpus / num_workers)
        self.workers = [
            GradientWorker.options(num_cpus=per_worker, scheduling_strategy="SPREAD").remote(
                engine, layout, shard, h, x_ref, t_ref
            )
            for shard in shards
        ]
        self.num_workers = num_workers
        self.graph = None
        nodes = ray.get([worker.ready.remote() for worker in self.workers])
        self.actors_per_node = dict(collections.Counter(nodes))
        with InputNode() as step:
            dag = MultiOutputNode([w.gradient_slice.bind(step) for w in self.workers])
        # room for the parameters in and a slice out without resizing the channels
        self.graph = dag.experimental_compile(_buffer_size_bytes=layout.size * 8 + (1 << 16))
        self.expected_compute_s = 0.0

    def __call__(self, flat: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """The gradient (layout.size,) gathered into index order, and the longest time one
        worker spent computing its slice."""
        result = self.graph.execute((flat, batch))
        # ray.get on a compiled graph spins on a CPU while it waits, a CPU the workers need
        # when they are as many as the cores: sleep through most of the expected wait first
        time.sleep(0.95 * self.expected_compute_s)
        try:
            slices = ray.get(result, timeout=-1)  # -1: no limit, a full-engine step can be long
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, BaseException) else error
            raise WorkerFailed(f"a worker actor raised {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayError as error:
            first_line = str(error).strip().splitlines()[0]
            raise WorkerFailed(f"a worker actor failed: {first_line}") from None
        compute_s = max(s for _, s in slices)
        self.expected_compute_s = min(compute_s, 1.05 * self.expected_compute_s or compute_s)
        grad = np.empty_like(flat)
        grad[self.shard_indices] = np.concatenate([g for g, _ in slices])
        return grad, compute_s

    def close(self) -> None:
        if self.graph is not None:
            self.graph.teardown()
            self.graph = None
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def connect(address: str | None) -> bool:
    """Join the Ray cluster at address (or RAY_ADDRESS), or start Ray on this machine.
    Returns whether this call started the connection, so whether to shut it down."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        return True
    if ":" in address and not address.startswith("ray://"):
        check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as error:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            hint = (
                "; a cluster started by `ray start` authenticates with a token: set "
                "RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
            )
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {error}{hint}") from None
    return True


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check, so that a wrong --address fails in seconds with a clear message."""
    host, _, port = address.removeprefix("http://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise ConnectionError(
            f"cannot reach a Ray cluster at {address} ({error}); start one with "
            "`ray start --head`, fix --address, or leave it out to run Ray on this machine"
        ) from None
