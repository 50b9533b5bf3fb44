"""numerical_gradient of any function, its indices sharded over Ray actors: the book's
numerical_gradient(f, x) (chapter 4.4) for an f that takes long.

Each actor gets its own copy of f and x, unpickled together (so an f that reads x through a
closure, as the book's `lambda W: net.loss(x, t)` reads net.W, still sees the x it nudges),
and computes the central differences of chunks of x's flat indices, one chunk at a time as
they are handed out. Every value is computed as in one process (distnum.gradient's
central_differences): for a deterministic f the result has the same bits, whatever the
number of workers.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import ray
from ray import cloudpickle

from distnum.distributed import (
    ACTOR_BASE_BYTES,
    WorkerFailed,
    connect,
    disconnect,
    first_line,
    worker_count_note,
    worker_failed,
)
from distnum.gradient import DEFAULT_H, central_differences, check_h, check_h_against, flat_view
from distnum.gradient import numerical_gradient as in_process
from distnum.progress import live_bar

CHUNKS_PER_WORKER = 8  # chunks handed out as workers finish: a slow one holds up little


@ray.remote
class FunctionWorker:
    """f and its own copy of x, unpickled together from one payload."""

    def __init__(self, payload: bytes, h: float) -> None:
        self.f, self.x = cloudpickle.loads(payload)
        self.h = h

    def differences(self, start: int, stop: int) -> np.ndarray:
        """The central differences of x's flat indices start..stop-1."""
        return central_differences(self.f, self.x, np.arange(start, stop), self.h)


def numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = DEFAULT_H,
                       workers: int | None = None, address: str | None = None,
                       quiet: bool = False) -> np.ndarray:  # fmt: skip
    """Central-difference gradient of f at x (any shape, float), as the book's
    numerical_gradient(f, x); with workers, over that many Ray actors (joining the cluster
    at address, or Ray on this machine), with a progress bar when it takes more than 2 s
    (unless quiet). f must return one real number and be deterministic; it can be anything
    cloudpickle ships. A worker's exception is raised here as WorkerFailed, one line with
    its type and message."""
    h = check_h(h)
    if not callable(f):
        raise ValueError(f"f={f!r} is not a function; give one that takes x and returns one "
                         "number, such as lambda x: float(np.sum(x ** 2))")  # fmt: skip
    x = np.asarray(x)
    check_h_against(h, flat_view(x), "x's entries")  # here, not in each worker
    if workers is None:
        return in_process(f, x, h)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}; give a number of worker actors >= 1, or None "
                         "to compute in this process")  # fmt: skip
    try:
        payload = cloudpickle.dumps((f, x))
    except Exception as error:
        raise ValueError(f"f cannot be shipped to Ray workers ({type(error).__name__}: "
                         f"{first_line(error)}); define it so that cloudpickle can pickle it"
                         ) from None  # fmt: skip
    owns_ray = connect(address)
    try:
        try:  # as train checks its workers: the memory they need, and the CPUs they share
            note = worker_count_note(workers, actor_bytes=ACTOR_BASE_BYTES + 2 * len(payload))
        except ValueError as error:
            raise ValueError(f"workers={workers}: {error}") from None
        if note:
            print(f"distnum: {note}", file=sys.stderr)
        return sharded(payload, x, h, workers, quiet)
    finally:
        disconnect(owns_ray)


def sharded(payload: bytes, x: np.ndarray, h: float, workers: int, quiet: bool) -> np.ndarray:
    """The gradient computed by `workers` actors, chunk by chunk."""
    chunk = max(1, math.ceil(x.size / (workers * CHUNKS_PER_WORKER)))
    chunks = [(start, min(start + chunk, x.size)) for start in range(0, x.size, chunk)]
    grad = np.empty(x.size, dtype=np.float64)
    cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / workers)
    actors = [FunctionWorker.options(num_cpus=cpus).remote(payload, h) for _ in range(workers)]
    bar = live_bar(x.size, "index", quiet=quiet, delay_s=2.0)
    waiting = list(reversed(chunks))
    running = {}  # result ref -> (actor, chunk)

    def hand_out(actor: ray.actor.ActorHandle) -> None:
        if waiting:
            start, stop = waiting.pop()
            running[actor.differences.remote(start, stop)] = (actor, (start, stop))

    try:
        for actor in actors:
            hand_out(actor)
        while running:
            (done,), _ = ray.wait(list(running))
            actor, (start, stop) = running.pop(done)
            try:
                grad[start:stop] = ray.get(done)
            except ray.exceptions.RayTaskError as error:
                raise worker_failed(error) from None
            except ray.exceptions.RayActorError as error:
                raise WorkerFailed(f"a worker actor died: {first_line(error)}") from None
            bar.update(stop - start)
            hand_out(actor)
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
    return grad.reshape(x.shape)
