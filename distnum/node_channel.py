"""A step between the driver and the worker actors: the data in shared memory on each
node, a Unix socket per actor for "go" and "done", and one TCP connection per other node.

The driver writes the parameters and the batch's indices once per step into a file in
/dev/shm that every actor on its node maps (one copy per node, however many actors), and
each actor copies its slice there, at its place among the slices in worker order. The
sockets carry a few bytes each way, and tell the driver at once when an actor's process is
gone (the connection ends). A Ray Compiled Graph moves the same data through channels of its
own, at about 1.4 ms per step on these 2-core machines, where this takes about 0.1-0.3 ms
(measured by `distnum bench --workers`).

With the fast engine the node's actors also share the step's tables in that file: each
computes its share of the batch's rows, marks its rows done with the step's number, and waits
for the others' marks before computing its slice from all the rows (fill_shared_rows).

Each other node has a relay (an actor of no CPU) that does the driver's part there: the
driver sends it the step once over TCP (the parameters, the batch, its rows of the loss
batch), and it answers with its actors' slices and losses. So the bytes crossing the network
per step are one copy of the parameters in and the node's own slice out, whatever the
number of actors on the node.
"""

from __future__ import annotations

import hmac
import itertools
import mmap
import os
import secrets
import select
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SHARED_DIR = Path("/dev/shm")
# what the rows of a request ask for, each row's value: its training sample's loss, or whether
# the network classifies its training or test sample right (1.0 or 0.0)
LOSSES, TRAIN_CORRECT, TEST_CORRECT = 0, 1, 2
# driver -> actor: whether to compute the gradient, the batch's size, what the rows ask for,
# the first and stop rows whose values this actor computes, the step's number, and the
# actor's place among the node's actors that share the step's tables and their number (0:
# none shared, each computes its own)
GO = struct.Struct("<qqqqqqqq")
DONE = struct.Struct("<Bdq")  # actor -> driver: failed?, seconds computing, message bytes
HELLO = struct.Struct("<q")  # actor -> driver on connecting: its worker number
HELLO_TIMEOUT_S = 10.0
# driver -> relay: whether to compute the gradient, the batch's size, the relay's rows, what
# they ask for, the wait limit; then the parameters, the batch and the rows
REQUEST = struct.Struct("<qqqqd")
READY = b"R"  # relay -> driver, once every actor of its node is connected
SECRET_BYTES = 32
# an actor waiting for the others' rows of the tables: at first it only yields its core, then
# naps, so that an actor that shares its core with another (more actors than cores) gives it
SPIN_S = 100e-6
NAP_S = 50e-6


class WorkerLost(RuntimeError):
    """An actor's connection ended (its process is gone), or a relay's (an actor of its
    node is gone, or the relay or its node)."""

    def __init__(self, who: int | str) -> None:
        name = f"worker actor {who}" if isinstance(who, int) else who
        super().__init__(f"{name}'s connection ended")


class ChannelUnavailable(RuntimeError):
    """An actor could not open the channel: a compiled graph must carry the steps."""


class StepGivenUp(Exception):
    """The driver closed an actor's connection while it waited for the other actors of its
    node: it gave the step up."""


class WorkerRaised(RuntimeError):
    """The actor's engine raised; the message is its type and first line."""


def available() -> bool:
    return SHARED_DIR.is_dir() and os.access(SHARED_DIR, os.W_OK) and hasattr(socket, "AF_UNIX")


class SharedStep:
    """The mapped file: parameters (size,) float64, the slices (size,) float64 (worker 0's
    shard, worker 1's, ...: the gradient in shard order), batch (max_batch,) int64, loss batch
    (max_batch,) int64 and its per-sample losses (max_batch,) float64, the step each of the
    node's actors has done its rows of the tables for (actors,) int64 (minus it if they
    failed), then the tables (table_bytes), in that order."""

    def __init__(self, path: str, size: int, max_batch: int, actors: int,
                 table_bytes: int) -> None:  # fmt: skip
        self.path, self.size, self.max_batch = path, size, max_batch
        with open(path, "r+b") as file:
            self.map = mmap.mmap(file.fileno(), bytes_for(size, max_batch, actors, table_bytes))
        self.params = np.frombuffer(self.map, np.float64, size, 0)
        self.slices = np.frombuffer(self.map, np.float64, size, 8 * size)
        self.batch = np.frombuffer(self.map, np.int64, max_batch, 16 * size)
        self.loss_batch = np.frombuffer(self.map, np.int64, max_batch, 8 * (2 * size + max_batch))
        self.losses = np.frombuffer(self.map, np.float64, max_batch,
                                    8 * (2 * size + 2 * max_batch))  # fmt: skip
        self.done_rows = np.frombuffer(self.map, np.int64, actors,
                                       8 * (2 * size + 3 * max_batch))  # fmt: skip
        self.tables = memoryview(self.map)[tables_offset(size, max_batch, actors) :]

    @classmethod
    def create(cls, size: int, max_batch: int, actors: int, table_bytes: int) -> SharedStep:
        descriptor, path = tempfile.mkstemp(prefix=f"distnum-step-{os.getpid()}-",
                                            dir=SHARED_DIR)  # fmt: skip
        try:  # allocated now: a full /dev/shm is an error here, not a SIGBUS at a step
            os.posix_fallocate(descriptor, 0, bytes_for(size, max_batch, actors, table_bytes))
            return cls(path, size, max_batch, actors, table_bytes)
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
        for view in ("params", "slices", "batch", "loss_batch", "losses", "done_rows"):
            self.__dict__.pop(view, None)  # views go first
        try:
            self.tables.release()
            self.map.close()
        except BufferError:  # a view still held (by a traceback, say): unmapped with it
            pass


def tables_offset(size: int, max_batch: int, actors: int) -> int:
    return -(-8 * (2 * size + 3 * max_batch + actors) // 64) * 64  # a cache line's start


def bytes_for(size: int, max_batch: int, actors: int, table_bytes: int) -> int:
    return tables_offset(size, max_batch, actors) + max(table_bytes, 1)


class NodeChannel:
    """The driver's end on its node (or a relay's on its own): the shared file, one
    connection per worker actor of the node, and one per relay of another node."""

    def __init__(self, size: int, max_batch: int, workers: Sequence[int],
                 order: np.ndarray | None = None, table_rows: int = 0,
                 table_bytes: int = 0) -> None:  # fmt: skip
        """workers: the numbers of the node's actors; order: where each value of the slices
        belongs in the gradient (the shards concatenated), for gradient(); table_bytes: room
        for the tables of a batch of up to table_rows samples, which the actors then share
        (each computes its share of the rows), else 0."""
        self.shared = SharedStep.create(size, max_batch, len(workers), table_bytes)
        self.order, self.table_rows = order, table_rows if table_bytes else 0
        self.steps = 0  # requests sent, each one's number in its GO
        self.connections: dict[int, socket.socket | None] = dict.fromkeys(workers)
        self.hosts: list[HostLink] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # an abstract address: no file to leave behind, in this network namespace only
        self.address = f"\0distnum-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            self.listener.bind(self.address)
            self.listener.listen(len(self.connections) + 16)  # room for strangers, turned away
        except OSError as error:
            self.close()
            raise ChannelUnavailable(f"cannot listen on a Unix socket: {error}") from None

    def accept(self, timeout_s: float, failed: Callable[[], bool]) -> None:
        """Wait for the node's actors to connect; ChannelUnavailable when failed() says one
        cannot (its serving ended), TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        waiting = set(self.connections)
        self.listener.settimeout(0.2)
        while waiting:
            if time.monotonic() > deadline:  # checked even while strangers keep connecting
                raise TimeoutError(f"worker actors {sorted(waiting)} did not connect")
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                if failed():
                    raise ChannelUnavailable from None
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
        if batch.size == 0:  # "no gradient wanted" in the protocol
            raise ValueError("an empty batch has no gradient; give at least one sample")
        self.shared.params[:] = flat
        longest = self.run(batch, loss_batch, sleep_s, limit_s)
        losses = None if loss_batch is None else self.shared.losses[: loss_batch.size].copy()
        grad = np.empty_like(flat)
        grad[self.order] = self.shared.slices  # one pass puts every slice in its place
        return grad, longest, losses

    def row_values(self, flat: np.ndarray, rows: np.ndarray, kind: int,
                   limit_s: float) -> np.ndarray:  # fmt: skip
        """The values (R,) at flat of the samples numbered in rows alone: what kind asks for
        (LOSSES, TRAIN_CORRECT or TEST_CORRECT)."""
        self.shared.params[:] = flat
        self.run(None, rows, 0.0, limit_s, kind)
        return self.shared.losses[: rows.size].copy()

    def run(self, batch: np.ndarray | None, loss_batch: np.ndarray | None, sleep_s: float,
            limit_s: float, kind: int = LOSSES) -> float:  # fmt: skip
        """One request with the parameters in place: every actor of the node and every
        relay at once, the loss batch's rows (values of the kind asked for) split in
        proportion to their actors."""
        batch = np.empty(0, np.int64) if batch is None else batch
        loss_batch = np.empty(0, np.int64) if loss_batch is None else loss_batch
        if max(batch.size, loss_batch.size) > self.shared.max_batch:
            raise ValueError(f"a batch of {max(batch.size, loss_batch.size)} samples; at most "
                             f"{self.shared.max_batch} (the largest data set)")  # fmt: skip
        self.shared.batch[: batch.size] = batch
        self.shared.loss_batch[: loss_batch.size] = loss_batch
        actors = [1] * len(self.connections) + [host.actors for host in self.hosts]
        spans = row_spans(actors, loss_batch.size)
        local_spans, host_spans = spans[: len(self.connections)], spans[len(self.connections) :]
        self.steps += 1
        sharing = len(self.connections) if 0 < batch.size <= self.table_rows else 0
        for place, ((worker, connection), (first, stop)) in enumerate(
            zip(self.connections.items(), local_spans, strict=True)
        ):
            try:
                connection.sendall(GO.pack(batch.size > 0, batch.size, kind, first, stop,
                                           self.steps, place, sharing))  # fmt: skip
            except OSError:
                raise WorkerLost(worker) from None
        for host, (first, stop) in zip(self.hosts, host_spans, strict=True):
            host.send(self.shared.params, batch, loss_batch[first:stop], kind, limit_s)
        started = time.monotonic()
        time.sleep(sleep_s)  # the actors compute; waking early only costs a CPU they need
        poller = select.poll()  # not select(): it fails on descriptors past 1023
        pending: dict[int, int | tuple[HostLink, int, int]] = {}
        for worker, connection in self.connections.items():
            poller.register(connection, select.POLLIN)
            pending[connection.fileno()] = worker
        for host, (first, stop) in zip(self.hosts, host_spans, strict=True):
            poller.register(host.connection, select.POLLIN)
            pending[host.connection.fileno()] = (host, first, stop)
        longest = 0.0
        while pending:
            left_ms = 1000 * (limit_s - (time.monotonic() - started))
            ready = poller.poll(max(left_ms, 0.0))
            if not ready:
                raise TimeoutError(f"no answer from {len(pending)} worker actors or relays "
                                   f"in {limit_s:.0f} s")  # fmt: skip
            for descriptor, _ in ready:
                member = pending.pop(descriptor)
                poller.unregister(descriptor)
                if isinstance(member, tuple):
                    host, first, stop = member
                    seconds = host.receive(self.shared.slices, batch.size > 0,
                                           self.shared.losses[first:stop])  # fmt: skip
                else:
                    seconds = done(self.connections[member], member)
                longest = max(longest, seconds)
        return longest

    def add_host(self, host: HostLink) -> None:
        self.hosts.append(host)

    def drop(self, worker: int) -> None:
        """Forget worker's connection (its actor is being replaced, or the run ends)."""
        connection, self.connections[worker] = self.connections[worker], None
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Every connection closed (each actor's serving ends with its own, each relay's
        too), the file too."""
        for worker in self.connections:
            self.drop(worker)
        for host in self.hosts:
            host.connection.close()
        self.hosts = []
        self.listener.close()
        self.shared.close()
        self.shared.unlink()


def done(connection: socket.socket, who: int | str) -> float:
    """The seconds computing that an answer gives; WorkerRaised with the message of one
    that failed, WorkerLost when the connection ended."""
    try:
        failed, seconds, length = DONE.unpack(receive(connection, DONE.size))
        message = receive(connection, length).decode()
    except (OSError, EOFError):
        raise WorkerLost(who) from None
    if failed:
        raise WorkerRaised(message)
    return seconds


class HostLink:
    """The driver's end of the TCP connection to a relay on another node: each step the
    parameters go once to all that node's actors, and their slices come back, each straight
    into its place (a range of the slices in shard order)."""

    def __init__(self, endpoint: tuple[str, int], secret: bytes, ranges: list[slice],
                 timeout_s: float, failed: Callable[[], bool]) -> None:  # fmt: skip
        """Connect, and wait until the relay says its node's actors (one per range) are
        connected: ChannelUnavailable when failed() says one cannot, TimeoutError after
        timeout_s."""
        self.name = f"the relay at {endpoint[0]}:{endpoint[1]}"
        self.ranges, self.actors = ranges, len(ranges)
        self.bytes_sent = self.bytes_received = 0  # for `distnum bench`
        try:
            self.connection = socket.create_connection(endpoint, timeout=timeout_s)
        except OSError as error:
            raise ChannelUnavailable(f"cannot reach {self.name}: {error}") from None
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.connection.sendall(secret)
            deadline = time.monotonic() + timeout_s
            self.connection.settimeout(0.2)
            while True:
                try:
                    if receive(self.connection, 1) == READY:
                        break
                except TimeoutError:
                    pass
                if failed():
                    raise ChannelUnavailable(f"an actor on {self.name}'s node cannot serve")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} was not ready in {timeout_s:.0f} s")
            self.connection.settimeout(None)
        except BaseException as error:
            self.connection.close()
            if isinstance(error, (OSError, EOFError)) and not isinstance(error, TimeoutError):
                raise WorkerLost(self.name) from error  # the relay's connection ended
            raise

    def send(self, params: np.ndarray, batch: np.ndarray, rows: np.ndarray, kind: int,
             limit_s: float) -> None:  # fmt: skip
        header = REQUEST.pack(batch.size > 0, batch.size, rows.size, kind, limit_s)
        parts = [header, params, batch.astype(np.int64), rows.astype(np.int64)]
        # a relay that stops reading (its process hung) would block the driver for good
        self.connection.settimeout(limit_s)
        try:
            for part in parts:
                self.connection.sendall(part)
        except OSError:
            raise WorkerLost(self.name) from None
        self.bytes_sent += sum(memoryview(part).nbytes for part in parts)

    def receive(self, slices: np.ndarray, wanted: bool, losses: np.ndarray) -> float:
        """The relay's answer: its actors' slices into their ranges of slices (if wanted),
        its rows' losses into losses; the longest time one of its actors spent computing."""
        seconds = done(self.connection, self.name)
        parts = [slices[r] for r in self.ranges] if wanted else []
        try:
            for part in [*parts, losses]:
                receive_into(self.connection, part)
        except (OSError, EOFError):
            raise WorkerLost(self.name) from None
        self.bytes_received += DONE.size + sum(part.nbytes for part in [*parts, losses])
        return seconds


def receive_into(connection: socket.socket, array: np.ndarray) -> np.ndarray:
    """array (contiguous) filled from the connection, with no copy."""
    view, got = memoryview(array).cast("B"), 0
    while got < view.nbytes:
        chunk = connection.recv_into(view[got:])
        if not chunk:
            raise EOFError("the connection ended")
        got += chunk
    return array


def relay(listener: socket.socket, secret: bytes, channel: NodeChannel, ranges: list[slice],
          timeout_s: float) -> None:  # fmt: skip
    """A relay's loop on its node, once channel's actors are connected: the driver's
    connection accepted (only with the secret), then each request run on the node's actors
    and answered with their slices (their ranges of the slices in shard order, in the order
    of ranges) and their losses, until the driver closes the
    connection. An actor lost ends the loop, and so the driver's connection: the driver
    replaces what died and connects again."""
    listener.settimeout(timeout_s)
    while True:
        connection, _ = listener.accept()  # TimeoutError: no driver came
        connection.settimeout(HELLO_TIMEOUT_S)
        try:
            if hmac.compare_digest(receive(connection, SECRET_BYTES), secret):
                break
        except (OSError, EOFError):
            pass
        connection.close()  # a stranger
    listener.close()
    connection.settimeout(None)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    shared = channel.shared
    try:
        connection.sendall(READY)
        while True:
            wanted, batch_size, rows, kind, limit_s = REQUEST.unpack(
                receive(connection, REQUEST.size))  # fmt: skip
            receive_into(connection, shared.params)
            batch = receive_into(connection, np.empty(batch_size, np.int64))
            loss_rows = receive_into(connection, np.empty(rows, np.int64))
            try:  # the driver's limit, which starts later, is the one that applies
                seconds = channel.run(batch if wanted else None, loss_rows, 0.0, 2 * limit_s,
                                      kind)  # fmt: skip
            except WorkerRaised as error:  # the other actors' answers are left unread: end
                message = str(error).encode()
                connection.sendall(DONE.pack(1, 0.0, len(message)) + message)
                return
            connection.sendall(DONE.pack(0, seconds, 0))
            for part in [shared.slices[r] for r in ranges] if wanted else []:
                connection.sendall(part)
            connection.sendall(shared.losses[:rows])
    except (EOFError, OSError, WorkerLost, TimeoutError):
        return  # the driver closed the connection, or an actor here is lost: it will see
    finally:
        connection.close()


def receive(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise EOFError("the connection ended")
        data += chunk
    return data


def serve(address: str, path: str, size: int, max_batch: int, actors: int, table_rows: int,
          table_bytes: int, worker: int, place: slice, work) -> None:  # fmt: skip
    """The actor's end, until the driver closes the connection. Per request: the values of
    its share of the loss batch's rows, if any, and its slice, if asked, copied to its place
    among the slices. work is the actor's GradientWorker: its row_values((flat, rows), kind)
    and gradient_slice((flat, batch)) -> (slice, seconds),
    and, where the node's actors share the step's tables (of up to table_rows samples),
    share_tables(buffer, table_rows) once, fill_tables(flat, batch, first, stop) for its
    rows and slice_from_tables(flat, batch)."""
    shared = SharedStep(path, size, max_batch, actors, table_bytes)
    params = shared.params[:]
    params.flags.writeable = False  # as the compiled graph hands them over: read-only
    if table_rows:
        work.share_tables(shared.tables, table_rows)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
        connection.sendall(HELLO.pack(worker))
        driver = select.poll()  # not select(): it fails on descriptors past 1023
        driver.register(connection, select.POLLIN)
        while True:
            wanted, batch_size, kind, first, stop, step, among, sharing = GO.unpack(
                receive(connection, GO.size))  # fmt: skip
            started = time.perf_counter()
            try:
                if stop > first:  # more actors than rows leaves some with none
                    rows = shared.loss_batch[first:stop].copy()
                    shared.losses[first:stop] = work.row_values((params, rows), kind)
                seconds = time.perf_counter() - started  # computing, as the slice's below
                if wanted:
                    batch = shared.batch[:batch_size].copy()
                    if sharing:
                        fill_shared_rows(work, params, batch, shared.done_rows[:sharing],
                                         step, among, driver)  # fmt: skip
                        grad = work.slice_from_tables(params, batch)
                        seconds = time.perf_counter() - started
                    else:
                        grad, slice_s = work.gradient_slice((params, batch))
                        seconds += slice_s
                    shared.slices[place] = grad
            except StepGivenUp:
                return
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
        work.share_tables(None)
        shared.close()


def row_spans(weights: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """The first and stop row of each share of rows, the shares in proportion to weights."""
    bounds = np.rint(np.cumsum([0, *weights]) * (rows / sum(weights))).astype(np.int64)
    return [(int(first), int(stop)) for first, stop in itertools.pairwise(bounds)]


def row_span(place: int, parts: int, rows: int) -> tuple[int, int]:
    """The first and stop row of the place-th of parts equal shares of rows."""
    return row_spans([1] * parts, rows)[place]


def fill_shared_rows(work, params: np.ndarray, batch: np.ndarray, done_rows: np.ndarray,
                     step: int, among: int, driver: select.poll) -> None:  # fmt: skip
    """This actor's rows of the step's tables (the among-th share of done_rows.size), then
    a wait until every actor sharing them has done its own. StepGivenUp when the driver
    closes the connection meanwhile (an actor of the node died, say): driver polls it."""
    first, stop = row_span(among, done_rows.size, batch.size)
    try:
        if stop > first:
            work.fill_tables(params, batch, first, stop)
    except BaseException:
        done_rows[among] = -step
        raise
    done_rows[among] = step  # x86-64 stores are seen in order: the rows before the mark
    spin_until = time.perf_counter() + SPIN_S
    while not np.all(done_rows == step):
        if np.any(done_rows == -step):
            raise RuntimeError("another worker actor of this node failed on its rows of the "
                               "step's tables")  # fmt: skip
        if driver.poll(0):  # the driver sends nothing during a step: it closed the connection
            raise StepGivenUp
        if time.perf_counter() < spin_until:
            os.sched_yield()
        else:  # a core shared with an actor still computing: leave it to that one
            time.sleep(NAP_S)
