"""The node channel on its own: real shared memory, real Unix sockets and a real TCP
connection to a relay, the actors' end and the relay's run in threads (Ray's actors run
them in their processes in the other tests)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from distnum import node_channel
from distnum.node_channel import HostLink, NodeChannel, WorkerLost, WorkerRaised

SIZE, MAX_BATCH = 10, 8
SHARDS = [np.array([0, 2, 4, 6, 8]), np.array([9, 7, 5, 3, 1])]
ORDER = np.concatenate(SHARDS)  # where each value of the slices belongs
PLACES = [slice(0, 5), slice(5, 10)]  # each shard's slice among them


class Work:
    """What an actor's GradientWorker does for serve(), in miniature: its slice is
    flat[shard] * batch.sum(), its rows' values rows * 0.5 + flat[0] + 100 * the kind asked
    for (0 for losses); with tables shared, each
    actor writes 2 * batch[n] into its rows n of one table, and reads the whole of it."""

    def __init__(self, shard: np.ndarray, hold: threading.Event | None = None) -> None:
        self.shard, self.hold = shard, hold  # hold: filling its rows waits for it
        self.table, self.filled = None, []

    def gradient_slice(self, step):
        flat, batch = step
        if batch[0] < 0:
            raise ArithmeticError("a negative sample\nsecond line")
        return flat[self.shard] * batch.sum(), 0.001

    def row_values(self, step, kind: int):
        flat, rows = step
        return rows * 0.5 + flat[0] + 100 * kind

    def share_tables(self, buffer, rows: int = 0) -> None:
        self.table = None if buffer is None else np.frombuffer(buffer, np.float64, rows)

    def fill_tables(self, flat, batch, first: int, stop: int) -> None:
        if self.hold is not None:
            self.hold.wait()
        if np.any(batch[first:stop] < 0):
            raise ArithmeticError("a negative sample in my rows")
        self.table[first:stop] = 2.0 * batch[first:stop]
        self.filled.append((first, stop))

    def slice_from_tables(self, flat, batch):
        return flat[self.shard] * (self.table[: batch.size].sum() / 2.0)


def start_actors(channel: NodeChannel, workers: list[int], works: list[Work] | None = None,
                 table_rows: int = 0) -> list[threading.Thread]:  # fmt: skip
    """An actor's serving, in a thread, for each worker number (with tables of table_rows
    samples shared by those of the channel, if table_rows)."""
    actors = []
    for k, work in zip(workers, works or [Work(SHARDS[k]) for k in workers], strict=True):
        args = (channel.address, channel.shared.path, SIZE, MAX_BATCH, len(channel.connections),
                table_rows, 8 * table_rows, k, PLACES[k], work)  # fmt: skip
        actors.append(threading.Thread(target=node_channel.serve, args=args))
        actors[-1].start()
    return actors


def joined(threads: list[threading.Thread]) -> bool:
    for thread in threads:
        thread.join(timeout=10)
    return not any(thread.is_alive() for thread in threads)


@pytest.fixture
def channel():
    channel = NodeChannel(SIZE, MAX_BATCH, [0, 1], ORDER)
    workers = start_actors(channel, [0, 1])
    yield channel, workers
    channel.close()
    assert joined(workers)  # serving ends with the connection


def test_steps_and_losses_through_shared_memory(channel, monkeypatch):
    channel, _ = channel
    monkeypatch.setattr(node_channel, "HELLO_TIMEOUT_S", 0.5)
    # strangers first: one says nothing, one claims a worker number that does not exist
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(channel.address)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.connect(channel.address)
    stranger.sendall(node_channel.HELLO.pack(7))
    channel.accept(timeout_s=30, failed=lambda: False)
    assert not Path(channel.shared.path).exists()  # mapped by all: its name is gone
    flat = np.arange(SIZE, dtype=np.float64)
    previous = None
    for batch in (np.array([1, 2]), np.array([3, 0, 1, 2, 4, 5, 6]), np.array([7])):
        grad, seconds, losses = channel.gradient(flat, batch, previous, 0.0, 10)
        assert np.array_equal(grad, flat * batch.sum()) and 0.001 <= seconds < 1
        assert losses is None if previous is None else np.array_equal(losses, previous * 0.5)
        assert np.array_equal(channel.row_values(flat, batch, node_channel.LOSSES, 10),
                              batch * 0.5)  # fmt: skip
        previous = batch
    with pytest.raises(ValueError, match="at most 8"):
        channel.gradient(flat, np.zeros(9, dtype=np.int64), None, 0.0, 10)
    silent.close()
    stranger.close()


def test_a_workers_exception_comes_back_as_one_line(channel):
    channel, _ = channel
    channel.accept(timeout_s=30, failed=lambda: False)
    with pytest.raises(WorkerRaised, match=r"^ArithmeticError: a negative sample$"):
        channel.gradient(np.zeros(SIZE), np.array([-1]), None, 0.0, 10)


def test_accept_gives_up_when_an_actor_cannot_serve():
    channel = NodeChannel(SIZE, MAX_BATCH, [0])
    try:
        with pytest.raises(node_channel.ChannelUnavailable):
            channel.accept(timeout_s=30, failed=lambda: True)
    finally:
        channel.close()
    assert not Path(channel.shared.path).exists()


# --- tables shared by a node's actors ----------------------------------------------------


@contextlib.contextmanager
def sharing(holds: list[threading.Event | None]):
    """A channel whose two actors share tables of MAX_BATCH rows; holds[k]: what actor k's
    filling of its rows waits for. Gives the channel and the two Works."""
    channel = NodeChannel(SIZE, MAX_BATCH, [0, 1], ORDER, MAX_BATCH, 8 * MAX_BATCH)
    works = [Work(SHARDS[k], hold) for k, hold in enumerate(holds)]
    actors = start_actors(channel, [0, 1], works, MAX_BATCH)
    try:
        channel.accept(timeout_s=30, failed=lambda: False)
        yield channel, works
    finally:
        for hold in holds:  # (a test that failed may have left one waiting)
            if hold is not None:
                hold.set()
        channel.close()
    assert joined(actors)


def test_each_actor_fills_its_share_of_the_rows_and_reads_them_all():
    with sharing([None, None]) as (channel, works):
        flat = np.arange(SIZE, dtype=np.float64)
        for batch in (np.array([1, 2, 3, 4, 5, 6, 7]), np.array([5]), np.array([3, 1])):
            grad, _, _ = channel.gradient(flat, batch, None, 0.0, 10)
            assert np.array_equal(grad, flat * batch.sum())
        # 7 rows as 4 + 3 (rounded halves), 1 row as 0 + 1 (one has none), 2 as 1 + 1
        assert works[0].filled == [(0, 4), (0, 1)] and works[1].filled == [(4, 7), (0, 1), (1, 2)]
        # a batch larger than the tables: each actor computes all of its own, as before
        channel.table_rows = 4
        grad, _, _ = channel.gradient(flat, np.array([1, 2, 3, 4, 5]), None, 0.0, 10)
        assert np.array_equal(grad, flat * 15) and len(works[0].filled) == 2


def test_one_actors_rows_failing_frees_the_other():
    """Actor 1's rows raise while actor 0 waits for them: both answer, at once."""
    with sharing([None, None]) as (channel, _):
        started = time.monotonic()
        with pytest.raises(WorkerRaised, match="negative sample in my rows|failed on its rows"):
            channel.gradient(np.zeros(SIZE), np.array([1, 2, 3, -4]), None, 0.0, 10)
        assert time.monotonic() - started < 5


def test_the_driver_giving_a_step_up_frees_an_actor_waiting_for_rows():
    """Actor 1 never fills its rows (its process stopped, say): the driver's limit passes,
    it closes the channel, and actor 0, waiting for those rows, ends its serving."""
    hold = threading.Event()
    with sharing([None, hold]) as (channel, works):
        with pytest.raises(TimeoutError):
            channel.gradient(np.zeros(SIZE), np.array([1, 2]), None, 0.0, 0.5)
        assert works[0].filled == [(0, 1)] and not works[1].filled


@contextlib.contextmanager
def two_nodes(strangers_first: bool = False):
    """The driver's channel with actor 0 on its node, and a relay for actor 1 on "another
    node" (its own channel, reached over TCP on 127.0.0.1); with strangers_first, strangers
    at the relay's port before the driver. Gives the driver's channel, the other node's,
    the relay's endpoint, the secret, the relay's thread and the strangers' connections."""
    driver = NodeChannel(SIZE, MAX_BATCH, [0], ORDER)
    here = start_actors(driver, [0])
    there = NodeChannel(SIZE, MAX_BATCH, [1])
    remote = start_actors(there, [1])
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = listener.getsockname()[:2]
    arrived = strangers(endpoint, socket.AF_INET) if strangers_first else []
    secret = b"s" * node_channel.SECRET_BYTES
    relay = threading.Thread(target=node_channel.relay,
                             args=(listener, secret, there, [PLACES[1]], 30))  # fmt: skip
    there.accept(timeout_s=30, failed=lambda: False)
    relay.start()
    driver.accept(timeout_s=30, failed=lambda: False)
    try:
        yield driver, there, endpoint, secret, relay, arrived
    finally:
        driver.close()
        for stranger in arrived:
            stranger.close()
        assert joined([relay])  # the relay ends with the driver's connection...
        there.close()  # (as HostRelay.serve closes its channel then)
        assert joined(here + remote)  # ...and its actors with its channel


@pytest.fixture
def relayed():
    with two_nodes() as (driver, there, endpoint, secret, relay, _):
        yield driver, there, endpoint, secret, relay


def test_a_relay_brings_its_nodes_slice_and_losses(relayed):
    driver, there, endpoint, secret, _ = relayed
    # a stranger without the secret is turned away, and the driver connects after it
    stranger = socket.create_connection(endpoint)
    stranger.sendall(b"x" * node_channel.SECRET_BYTES)
    assert stranger.recv(1) == b""
    driver.add_host(HostLink(endpoint, secret, [PLACES[1]], 30, failed=lambda: False))
    flat = np.arange(SIZE, dtype=np.float64)
    previous = None
    for batch in (np.array([1, 2]), np.array([3, 0, 1, 2, 4, 5, 6]), np.array([7])):
        grad, seconds, losses = driver.gradient(flat, batch, previous, 0.0, 10)
        assert np.array_equal(grad, flat * batch.sum()) and 0.001 <= seconds < 1
        assert (
            losses is None if previous is None else np.array_equal(losses, previous * 0.5 + flat[0])
        )
        assert np.array_equal(driver.row_values(flat, batch, node_channel.LOSSES, 10),
                              batch * 0.5 + flat[0])  # fmt: skip
        # what the rows ask for reaches the actors behind the relay too
        right = driver.row_values(flat, batch, node_channel.TEST_CORRECT, 10)
        assert np.array_equal(right, batch * 0.5 + flat[0] + 200)
        previous = batch
        flat = flat + 1  # new parameters reach the relay each step
    link = driver.hosts[0]
    # each step: one header and the parameters in, the node's slice and losses out
    assert link.bytes_sent > 3 * 8 * SIZE and link.bytes_received > 3 * 8 * SHARDS[1].size
    with pytest.raises(WorkerRaised, match=r"^ArithmeticError: a negative sample$"):
        driver.gradient(flat, np.array([-1]), None, 0.0, 10)


def test_an_actor_lost_behind_a_relay_ends_the_relays_connection(relayed):
    driver, there, endpoint, secret, relay = relayed
    driver.add_host(HostLink(endpoint, secret, [PLACES[1]], 30, failed=lambda: False))
    # the remote actor's connection ends, as when its process dies
    there.connections[1].shutdown(socket.SHUT_RDWR)
    with pytest.raises(WorkerLost, match="relay at 127.0.0.1"):
        driver.gradient(np.zeros(SIZE), np.array([1]), None, 0.0, 10)
    assert joined([relay])


# --- strangers ---------------------------------------------------------------------------


def strangers(address, family: int) -> list[socket.socket]:
    """Three connections that are not the run's: one that says nothing, one that sends a
    length prefix of 2**62 (as if to make its reader allocate that much) and stays, one that
    sends garbage and leaves."""
    made = []
    for payload, stays in ((b"", True), (struct.pack("<q", 2**62), True), (b"\xff" * 3, False)):
        connection = socket.socket(family, socket.SOCK_STREAM)
        connection.connect(address)
        connection.sendall(payload)
        if stays:
            made.append(connection)
        else:
            connection.close()
    return made


def test_strangers_at_the_relays_port_cost_the_run_a_bounded_wait(monkeypatch):
    """The relay reads a fixed 32-byte secret first, with a time limit: nothing a stranger
    sends is a length it acts on, and the driver behind them gets through."""
    monkeypatch.setattr(node_channel, "HELLO_TIMEOUT_S", 0.5)  # (10 s in a run)
    with two_nodes(strangers_first=True) as (driver, _, endpoint, secret, _, arrived):
        started = time.monotonic()
        driver.add_host(HostLink(endpoint, secret, [PLACES[1]], 30, failed=lambda: False))
        # at most one wait of HELLO_TIMEOUT_S per stranger that stays
        assert time.monotonic() - started < 2 * node_channel.HELLO_TIMEOUT_S + 2
        flat = np.arange(SIZE, dtype=np.float64)
        grad, _, _ = driver.gradient(flat, np.array([1, 2]), None, 0.0, 10)
        assert np.array_equal(grad, flat * 3)
        for stranger in arrived:  # each turned away: its connection closed by the relay
            stranger.settimeout(5)
            assert stranger.recv(1) == b""


def test_strangers_at_the_node_socket_are_turned_away(monkeypatch):
    """A stranger on the actors' Unix socket (any local process can reach an abstract
    address) gets a bounded wait and no place: the actors connect after it, and the steps
    go on."""
    monkeypatch.setattr(node_channel, "HELLO_TIMEOUT_S", 0.5)  # (10 s in a run)
    channel = NodeChannel(SIZE, MAX_BATCH, [0, 1], ORDER)
    arrived = strangers(channel.address, socket.AF_UNIX)
    workers = start_actors(channel, [0, 1])
    try:
        channel.accept(timeout_s=30, failed=lambda: False)
        flat = np.arange(SIZE, dtype=np.float64)
        grad, _, _ = channel.gradient(flat, np.array([2]), None, 0.0, 10)
        assert np.array_equal(grad, flat * 2)
        for stranger in arrived:
            stranger.settimeout(5)
            assert stranger.recv(1) == b""
    finally:
        channel.close()
        for stranger in arrived:
            stranger.close()
    assert joined(workers)
