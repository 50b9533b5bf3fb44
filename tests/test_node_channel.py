"""The node channel on its own: real shared memory and real Unix sockets, the actors' end
run in threads (Ray's actors run it in their processes in the other tests)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from distnum import node_channel
from distnum.node_channel import NodeChannel, WorkerRaised

SIZE, MAX_BATCH = 10, 8
SHARDS = [np.array([0, 2, 4, 6, 8]), np.array([9, 7, 5, 3, 1])]


def gradient_slice(shard: np.ndarray):
    def compute(step):
        flat, batch = step
        if batch[0] < 0:
            raise ArithmeticError("a negative sample\nsecond line")
        return flat[shard] * batch.sum(), 0.001

    return compute


def losses(step):
    flat, rows = step
    return rows * 0.5 + flat[0]


@pytest.fixture
def channel():
    channel = NodeChannel(SIZE, MAX_BATCH, len(SHARDS))
    workers = [
        threading.Thread(
            target=node_channel.serve,
            args=(
                channel.address,
                channel.shared.path,
                SIZE,
                MAX_BATCH,
                k,
                shard,
                gradient_slice(shard),
                losses,
            ),
        )  # fmt: skip
        for k, shard in enumerate(SHARDS)
    ]
    for worker in workers:
        worker.start()
    yield channel, workers
    channel.close()
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()  # serving ends with the connection


def test_steps_and_losses_through_shared_memory(channel, monkeypatch):
    channel, _ = channel
    monkeypatch.setattr(node_channel, "HELLO_TIMEOUT_S", 0.5)
    # strangers first: one says nothing, one claims a worker number that does not exist
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(channel.address)
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.connect(channel.address)
    stranger.sendall(node_channel.HELLO.pack(7))
    channel.accept({0, 1}, timeout_s=30, failed=lambda: False)
    assert not Path(channel.shared.path).exists()  # mapped by all: its name is gone
    flat = np.arange(SIZE, dtype=np.float64)
    previous = None
    for batch in (np.array([1, 2]), np.array([3, 0, 1, 2, 4, 5, 6]), np.array([7])):
        grad, seconds, losses = channel.gradient(flat, batch, previous, 0.0, 10)
        assert np.array_equal(grad, flat * batch.sum()) and 0.001 <= seconds < 1
        assert losses is None if previous is None else np.array_equal(losses, previous * 0.5)
        assert np.array_equal(channel.losses(flat, batch, 10), batch * 0.5)
        previous = batch
    with pytest.raises(ValueError, match="at most 8"):
        channel.gradient(flat, np.zeros(9, dtype=np.int64), None, 0.0, 10)
    silent.close()
    stranger.close()


def test_a_workers_exception_comes_back_as_one_line(channel):
    channel, _ = channel
    channel.accept({0, 1}, timeout_s=30, failed=lambda: False)
    with pytest.raises(WorkerRaised, match=r"^ArithmeticError: a negative sample$"):
        channel.gradient(np.zeros(SIZE), np.array([-1]), None, 0.0, 10)


def test_accept_gives_up_when_an_actor_cannot_serve():
    channel = NodeChannel(SIZE, MAX_BATCH, 1)
    try:
        with pytest.raises(node_channel.ChannelUnavailable):
            channel.accept({0}, timeout_s=30, failed=lambda: True)
    finally:
        channel.close()
    assert not Path(channel.shared.path).exists()
