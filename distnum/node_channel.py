"""A step between the driver and the worker actors on its own node: the data in shared
memory, a Unix socket per actor for "go" and "done".

The driver writes the parameters and the batch's indices once per step into a file in
/dev/shm that every actor on the node maps (one copy per node, however many actors), and
each actor writes its slice straight into the gradient there, at its shard's indices. The
sockets carry a few bytes each way, and tell the driver at once when an actor's process is
gone (the connection ends). A Ray Compiled Graph moves the same data through channels of its
own, at about 1.4 ms per step on these 2-core machines, where this takes about 0.1-0.3 ms
(measured by `distnum bench --workers`); it stays for actors on other nodes.
"""

from __future__ import annotations

import mmap
import os
import secrets
import select
import socket
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED_DIR = Path("/dev/shm")
# driver -> actor: whether to compute the gradient, the batch's size, and the first and stop
# rows of the loss batch whose per-sample losses this actor computes
GO = struct.Struct("<qqqq")
DONE = struct.Struct("<Bdq")  # actor -> driver: failed?, seconds computing, message bytes
HELLO = struct.Struct("<q")  # actor -> driver on connecting: its worker number
HELLO_TIMEOUT_S = 10.0


class WorkerLost(RuntimeError):
    """An actor's connection ended: its process is gone."""

    def __init__(self, worker: int) -> None:
        super().__init__(f"worker actor {worker}'s connection ended")


class ChannelUnavailable(RuntimeError):
    """An actor could not open the channel: a compiled graph must carry the steps."""


class WorkerRaised(RuntimeError):
    """The actor's engine raised; the message is its type and first line."""


def available() -> bool:
    return SHARED_DIR.is_dir() and os.access(SHARED_DIR, os.W_OK) and hasattr(socket, "AF_UNIX")


class SharedStep:
    """The mapped file: parameters (size,) float64, gradient (size,) float64, batch
    (max_batch,) int64, loss batch (max_batch,) int64 and its per-sample losses (max_batch,)
    float64, in that order."""

    def __init__(self, path: str, size: int, max_batch: int) -> None:
        self.path, self.size, self.max_batch = path, size, max_batch
        with open(path, "r+b") as file:
            self.map = mmap.mmap(file.fileno(), bytes_for(size, max_batch))
        self.params = np.frombuffer(self.map, np.float64, size, 0)
        self.gradient = np.frombuffer(self.map, np.float64, size, 8 * size)
        self.batch = np.frombuffer(self.map, np.int64, max_batch, 16 * size)
        self.loss_batch = np.frombuffer(self.map, np.int64, max_batch, 8 * (2 * size + max_batch))
        self.losses = np.frombuffer(self.map, np.float64, max_batch,
                                    8 * (2 * size + 2 * max_batch))  # fmt: skip

    @classmethod
    def create(cls, size: int, max_batch: int) -> SharedStep:
        descriptor, path = tempfile.mkstemp(prefix=f"distnum-step-{os.getpid()}-",
                                            dir=SHARED_DIR)  # fmt: skip
        try:  # allocated now: a full /dev/shm is an error here, not a SIGBUS at a step
            os.posix_fallocate(descriptor, 0, bytes_for(size, max_batch))
            return cls(path, size, max_batch)
        except OSError as error:
            os.unlink(path)
            raise ChannelUnavailable(f"no room in {SHARED_DIR}: {error}") from None
        finally:
            os.close(descriptor)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass  # unlinked already

    def close(self) -> None:
        del self.params, self.gradient, self.batch, self.loss_batch, self.losses  # views go first
        self.map.close()


def bytes_for(size: int, max_batch: int) -> int:
    return 8 * (2 * size + 3 * max_batch)


class NodeChannel:
    """The driver's end: the shared file, and one connection per worker actor."""

    def __init__(self, size: int, max_batch: int, num_workers: int) -> None:
        self.shared = SharedStep.create(size, max_batch)
        self.connections: list[socket.socket | None] = [None] * num_workers
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # an abstract address: no file to leave behind, in this network namespace only
        self.address = f"\0distnum-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.listener.bind(self.address)
            self.listener.listen(num_workers + 16)  # room for strangers, turned away
        except OSError as error:
            self.close()
            raise ChannelUnavailable(f"cannot listen on a Unix socket: {error}") from None

    def accept(self, expected: set[int], timeout_s: float, failed) -> None:
        """Wait for the actors numbered in expected to connect; ChannelUnavailable when
        failed() says one cannot (its serving ended), TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        waiting = set(expected)
        self.listener.settimeout(0.2)
        while waiting:
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                if failed():
                    raise ChannelUnavailable from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker actors {sorted(waiting)} did not connect"
                                       ) from None  # fmt: skip
                continue
            worker = self.hello(connection)
            if worker in waiting:
                self.drop(worker)
                self.connections[worker] = connection
                waiting.discard(worker)
            else:
                connection.close()
        # every actor has mapped the file: its name can go, so that nothing is left in
        # /dev/shm whatever ends the driver (the memory goes with the last mapping)
        self.shared.unlink()

    def hello(self, connection: socket.socket) -> int | None:
        """The worker number a new connection gives, if it comes from a process of this user
        (any local process can reach an abstract address) and says so in time."""
        peer = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", peer)
        if uid != os.getuid():
            return None
        connection.settimeout(HELLO_TIMEOUT_S)
        try:
            (worker,) = HELLO.unpack(receive(connection, HELLO.size))
        except (OSError, EOFError):
            return None
        connection.settimeout(None)
        return worker

    def gradient(
        self, flat: np.ndarray, batch: np.ndarray, loss_batch: np.ndarray | None,
        sleep_s: float, limit_s: float,
    ) -> tuple[np.ndarray, float, np.ndarray | None]:  # fmt: skip
        """The gradient for flat (size,) on the batch's indices, the longest time an actor
        spent computing (its losses included), and the per-sample losses at flat of
        loss_batch's indices, if given (each actor its share of the rows). Raises
        WorkerLost, WorkerRaised, or TimeoutError after limit_s."""
        longest = self.run(flat, batch, loss_batch, sleep_s, limit_s)
        losses = None if loss_batch is None else self.shared.losses[: loss_batch.size].copy()
        return self.shared.gradient.copy(), longest, losses

    def losses(self, flat: np.ndarray, loss_batch: np.ndarray, limit_s: float) -> np.ndarray:
        """The per-sample losses (B,) at flat of loss_batch's indices alone."""
        self.run(flat, None, loss_batch, 0.0, limit_s)
        return self.shared.losses[: loss_batch.size].copy()

    def run(self, flat: np.ndarray, batch: np.ndarray | None, loss_batch: np.ndarray | None,
            sleep_s: float, limit_s: float) -> float:  # fmt: skip
        batch = np.empty(0, np.int64) if batch is None else batch
        loss_batch = np.empty(0, np.int64) if loss_batch is None else loss_batch
        if max(batch.size, loss_batch.size) > self.shared.max_batch:
            raise ValueError(f"a batch of {max(batch.size, loss_batch.size)} samples; at most "
                             f"{self.shared.max_batch} (the training set's size)")  # fmt: skip
        self.shared.params[:] = flat
        self.shared.batch[: batch.size] = batch
        self.shared.loss_batch[: loss_batch.size] = loss_batch
        rows = np.linspace(0, loss_batch.size, len(self.connections) + 1).astype(np.int64)
        for worker, connection in enumerate(self.connections):
            try:
                connection.sendall(GO.pack(batch.size > 0, batch.size, rows[worker],
                                           rows[worker + 1]))  # fmt: skip
            except OSError:
                raise WorkerLost(worker) from None
        started = time.monotonic()
        time.sleep(sleep_s)  # the actors compute; waking early only costs a CPU they need
        poller = select.poll()  # not select(): it fails on descriptors past 1023
        pending = {}
        for worker, connection in enumerate(self.connections):
            poller.register(connection, select.POLLIN)
            pending[connection.fileno()] = worker
        longest = 0.0
        while pending:
            left_ms = 1000 * (limit_s - (time.monotonic() - started))
            ready = poller.poll(max(left_ms, 0.0))
            if not ready:
                raise TimeoutError(f"no answer from worker actors {sorted(pending.values())} "
                                   f"in {limit_s:.0f} s")  # fmt: skip
            for descriptor, _ in ready:
                worker = pending.pop(descriptor)
                poller.unregister(descriptor)
                try:
                    failed, seconds, length = DONE.unpack(
                        receive(self.connections[worker], DONE.size)
                    )
                    message = receive(self.connections[worker], length).decode()
                except (OSError, EOFError):
                    raise WorkerLost(worker) from None
                if failed:
                    raise WorkerRaised(message)
                longest = max(longest, seconds)
        return longest

    def drop(self, worker: int) -> None:
        """Forget worker's connection (its actor is being replaced, or the run ends)."""
        connection, self.connections[worker] = self.connections[worker], None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Every connection closed (each actor's serving ends with its own), the file too."""
        for worker in range(len(self.connections)):
            self.drop(worker)
        self.listener.close()
        self.shared.close()
        self.shared.unlink()


def receive(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise EOFError("the connection ended")
        data += chunk
    return data


def serve(address: str, path: str, size: int, max_batch: int, worker: int, indices: np.ndarray,
          gradient_slice, losses) -> None:  # fmt: skip
    """The actor's end, until the driver closes the connection. Per request: the per-sample
    losses((flat, rows)) of its share of the loss batch's rows, if any, and the slice
    gradient_slice((flat, batch)) -> (slice, seconds), if asked, written into the gradient at
    indices."""
    shared = SharedStep(path, size, max_batch)
    params = shared.params[:]
    params.flags.writeable = False  # as the compiled graph hands them over: read-only
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
        connection.sendall(HELLO.pack(worker))
        while True:
            wanted, batch_size, first, stop = GO.unpack(receive(connection, GO.size))
            started = time.perf_counter()
            try:
                if stop > first:  # more actors than rows leaves some with none
                    rows = shared.loss_batch[first:stop].copy()
                    shared.losses[first:stop] = losses((params, rows))
                seconds = time.perf_counter() - started  # computing, as the slice's below
                if wanted:
                    grad, slice_s = gradient_slice((params, shared.batch[:batch_size].copy()))
                    shared.gradient[indices] = grad
                    seconds += slice_s
            except Exception as error:
                lines = str(error).strip().splitlines()
                message = f"{type(error).__name__}: {lines[0] if lines else ''}".encode()
                connection.sendall(DONE.pack(1, 0.0, len(message)) + message)
                continue
            connection.sendall(DONE.pack(0, seconds, 0))
    except (EOFError, OSError):
        return  # the driver closed the connection: the run ends, or this actor reconnects
    finally:
        connection.close()
        del params
        shared.close()
