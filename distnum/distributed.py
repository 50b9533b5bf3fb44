"""Ray: worker actors that each hold one shard's engine, and each step sent to them all.

The training set goes into the object store once, as uint8 codes when it is made of pixel
values (8x fewer bytes to each node), and every actor reads it from there (zero-copy). Each
step the driver hands over the current parameters and the minibatch's indices, and each
actor computes the central differences of its shard (node_channel.py): through shared
memory on the driver's node, each actor copying its slice to its place among the slices
(the driver puts them in index order); on every other node through a HostRelay actor,
which takes one copy of the step over TCP for all the node's actors, and answers with their
slices. A driver that is no node of the cluster (Ray Client) steps through a Ray Compiled
Graph instead.

WorkerActors places, starts and replaces the actors; StepLinks carries each step to them;
ShardedGradient is the driver's gradient over both, a step redone after an actor is lost.
"""

from __future__ import annotations

import collections
import itertools
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.util.client import ray as client_ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distnum import node_channel
from distnum.data import ImageCodes, input_density, shipped_images
from distnum.engines import EngineFactory, make_engine, shares_tables
from distnum.engines.base import checked_params
from distnum.engines.unnudged import StepTables
from distnum.functions import label_indices
from distnum.models import (
    ParamLayout,
    checked_batch,
    checked_inputs,
    classified_right,
    per_sample_losses,
    total_loss,
)
from distnum.node_channel import (
    ChannelUnavailable,
    HostLink,
    NodeChannel,
    WorkerLost,
    WorkerRaised,
)
from distnum.sharding import make_shards
from distnum.stopping import install

T = TypeVar("T")
MIN_WAIT_S = 10.0  # the least a step is waited for before the actors are checked
CONNECT_TIMEOUT_S = 120.0  # for every actor to connect, numba's compilations done
OOM_WAIT_S = 10.0  # after Ray's memory monitor killed an actor, before starting another
START_TIMEOUT_S = 300.0  # for every actor to start (placed, kernels compiled), then none can
EVALUATION_ROWS = 2000  # samples an actor classifies at once, for the accuracies
FREED_WAIT_S = 10.0  # for Ray to free a dead actor's CPUs, else its node is taken as lost
# a GradientWorker actor's resident memory beyond its parameters, measured with a 784-50-10
# net on MNIST: the interpreter, numpy, numba and its compiled kernels, Ray's worker
ACTOR_BASE_BYTES = 135 * 2**20


class WorkerFailed(RuntimeError):
    """A worker actor raised an exception or died; the message says which and why."""


class DiedStarting(WorkerFailed):
    """A worker actor died before it was ready: at the run's start the run fails; replacing
    one that died, it is one more restart (placed, say, on a node that was going down)."""


def shard_slice(engine, size: int, flat: np.ndarray, x: np.ndarray, labels: np.ndarray,
                h: float) -> np.ndarray:  # fmt: skip
    """The engine's central differences for a shard of size indices, checked: an engine of
    the user's that returns something else is a clear error, not a corrupted gradient."""
    grad = engine(flat, x, labels, h)
    if not isinstance(grad, np.ndarray) or grad.shape != (size,) or grad.dtype != np.float64:
        described = (f"a {grad.dtype} array of shape {grad.shape}"
                     if isinstance(grad, np.ndarray) else type(grad).__name__)  # fmt: skip
        raise ValueError(f"the engine returned {described} for a shard of {size} indices; "
                         f"it must return a float64 array of shape ({size},)")  # fmt: skip
    return grad


def sample_losses(layout: ParamLayout, flat: np.ndarray, x_train: np.ndarray,
                  t_train: np.ndarray, rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """The losses (R,) at flat of the R training samples numbered in rows."""
    x, labels = checked_batch(layout, x_train[rows], t_train[rows])
    return per_sample_losses(layout, layout.views(flat), x, labels)


def samples_right(layout: ParamLayout, flat: np.ndarray, x: np.ndarray, t: np.ndarray,
                  rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """(R,) 1.0 where the network at flat classifies the sample numbered in rows right, else
    0.0; EVALUATION_ROWS rows at a time (a set's rows as float64 would take 8x its codes)."""
    right = np.empty(rows.size)
    for first in range(0, rows.size, EVALUATION_ROWS):
        part = rows[first : first + EVALUATION_ROWS]
        x_part, labels = checked_batch(layout, x[part], t[part])
        right[first : first + part.size] = classified_right(layout, layout.views(flat), x_part,
                                                            labels)  # fmt: skip
    return right


def loss_in_process(layout: ParamLayout, flat: np.ndarray, x_train: np.ndarray,
                    t_train: np.ndarray, batch: np.ndarray) -> float:  # fmt: skip
    """The loss at flat (weight decay included) of the training samples numbered in batch."""
    losses = sample_losses(layout, flat, x_train, t_train, batch)
    return total_loss(layout, layout.views(flat), losses)


class RayUnavailable(RuntimeError):
    """Ray could not be started on this machine."""


class LocalGradient:
    """The same computation in this process, over all indices at once: no Ray."""

    num_workers = None  # no worker actors: computed in this process
    actors_per_node = None
    transport = None
    restarts = 0

    def __init__(self, layout: ParamLayout, engine: str | EngineFactory, h: float,
                 x_train: np.ndarray, t_train: np.ndarray) -> None:  # fmt: skip
        self.engine = make_engine(engine, layout, np.arange(layout.size))
        self.size, self.h, self.x_train, self.t_train = layout.size, h, x_train, t_train
        self.layout = layout

    def __call__(self, flat: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """The gradient (layout.size,) on the minibatch, and the seconds spent computing it."""
        started = time.perf_counter()
        grad = shard_slice(self.engine, self.size, flat, self.x_train[batch],
                           self.t_train[batch], self.h)  # fmt: skip
        return grad, time.perf_counter() - started

    def loss(self, flat: np.ndarray, batch: np.ndarray) -> float:
        """The batch's mean loss at the parameters flat (layout.size,)."""
        return loss_in_process(self.layout, flat, self.x_train, self.t_train, batch)

    def step(self, flat: np.ndarray, batch: np.ndarray,
             loss_batch: np.ndarray | None) -> tuple[np.ndarray, float, float | None]:  # fmt: skip
        """The gradient and its seconds as __call__, and loss(flat, loss_batch) if given."""
        grad, seconds = self(flat, batch)
        return grad, seconds, None if loss_batch is None else self.loss(flat, loss_batch)

    def accuracies(self, flat: np.ndarray) -> None:
        """None: the caller computes the accuracies in this process, as this does all."""
        return None

    def close(self) -> None:
        pass


@ray.remote
class GradientWorker:
    """One shard: its engine, and the training set (and the test set, if given) read from the
    object store."""

    def __init__(
        self, engine: str | EngineFactory, layout: ParamLayout, indices: np.ndarray, h: float,
        x_train: np.ndarray, t_train: np.ndarray, x_test: np.ndarray | None = None,
        t_test: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.engine = make_engine(engine, layout, indices)
        self.size, self.h, self.x_train, self.t_train = len(indices), h, x_train, t_train
        self.x_test, self.t_test = x_test, t_test
        self.layout, self.indices = layout, np.asarray(indices, dtype=np.int64)
        self.tables: StepTables | None = None  # shared with the node's actors, while serving

    def ready(self) -> str:
        """Compiles the kernels (or loads them from numba's cache) with one small call, on
        arrays like the steps' (the parameters arrive read-only); returns the node id."""
        flat = np.zeros(self.layout.size)
        flat.flags.writeable = False
        shard_slice(self.engine, self.size, flat, self.x_train[:2], self.t_train[:2], self.h)
        return ray.get_runtime_context().get_node_id()

    def gradient_slice(self, step: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float]:
        """The shard's slice for (parameters, batch indices), and the seconds computing it."""
        flat, batch = step
        started = time.perf_counter()
        grad = shard_slice(self.engine, self.size, flat, self.x_train[batch],
                           self.t_train[batch], self.h)  # fmt: skip
        return grad, time.perf_counter() - started

    def row_values(self, step: tuple[np.ndarray, np.ndarray], kind: int) -> np.ndarray:
        """(R,) for (parameters, R sample indices): the training samples' losses (LOSSES), or
        whether each training or test sample is classified right (TRAIN_CORRECT,
        TEST_CORRECT)."""
        flat, rows = step
        if kind == node_channel.LOSSES:
            return sample_losses(self.layout, flat, self.x_train, self.t_train, rows)
        if kind == node_channel.TEST_CORRECT:
            return samples_right(self.layout, flat, self.x_test, self.t_test, rows)
        return samples_right(self.layout, flat, self.x_train, self.t_train, rows)

    def share_tables(self, buffer: memoryview | None, rows: int = 0) -> None:
        """The tables of up to rows samples the node's actors share, in buffer (None: no
        more)."""
        self.tables = None if buffer is None else StepTables(self.layout, rows, buffer)

    def fill_tables(self, flat: np.ndarray, batch: np.ndarray, first: int, stop: int) -> None:
        """Rows first:stop of the shared tables for (parameters, batch indices)."""
        x = checked_inputs(self.layout, self.x_train[batch[first:stop]])
        self.tables.fill(self.layout.views(checked_params(flat)), x, first, self.h)

    def slice_from_tables(self, flat: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """The shard's slice from the shared tables, every row filled."""
        labels = label_indices(self.t_train[batch], self.layout.output_size)
        return self.engine.from_tables(flat, self.tables, labels, self.h)

    def serve(self, address: str, path: str, max_batch: int, actors: int, table_rows: int,
              table_bytes: int, worker: int, place: slice) -> None:  # fmt: skip
        """Steps from its node's NodeChannel (the driver's, or a relay's), until it closes
        the connection; its slice goes to place among the slices of all shards. The node's
        actors (actors of them) share the tables of batches of up to table_rows samples
        (table_bytes, StepTables.nbytes), if table_rows."""
        node_channel.serve(address, path, self.layout.size, max_batch, actors, table_rows,
                           table_bytes, worker, place, self)  # fmt: skip


@ray.remote(max_concurrency=2)  # discard() while serve() waits
class HostRelay:
    """The driver's part on a node it does not run on: a NodeChannel for the node's worker
    actors, and a TCP port for the driver, which sends each step here once."""

    def __init__(self, size: int, max_batch: int, workers: list[int], places: list[slice],
                 secret: bytes, table_rows: int, table_bytes: int) -> None:  # fmt: skip
        """workers: the numbers of the node's actors, places: where their slices go;
        table_rows, table_bytes: the tables they share, as NodeChannel takes them."""
        self.channel = NodeChannel(size, max_batch, workers, None, table_rows, table_bytes)
        try:
            self.listener = socket.create_server((ray.util.get_node_ip_address(), 0))
        except OSError:
            self.channel.close()
            raise
        self.places, self.secret = places, secret

    def endpoints(self) -> tuple[str, str, tuple[str, int]]:
        """The shared file and the Unix address, for the node's actors; the TCP address."""
        return self.channel.shared.path, self.channel.address, self.listener.getsockname()[:2]

    def discard(self) -> None:
        """Removes the shared file's name, left while actors may still connect: the relay is
        about to be killed, which runs no cleanup."""
        self.channel.shared.unlink()

    def serve(self) -> None:
        """Relays the steps, until the driver closes its connection or an actor is lost."""
        try:
            self.channel.accept(CONNECT_TIMEOUT_S, failed=lambda: False)
            node_channel.relay(self.listener, self.secret, self.channel, self.places,
                               CONNECT_TIMEOUT_S)  # fmt: skip
        finally:
            self.listener.close()
            self.channel.close()


class WorkerActors:
    """The GradientWorker actors of a ShardedGradient, one per shard: where each goes,
    starting them, and replacing the ones that died."""

    def __init__(self, actor_args: tuple, shards: list[np.ndarray],
                 nodes: list[str] | None) -> None:  # fmt: skip
        """actor_args: (engine, layout, h, x_ref, t_ref[, x_test_ref, t_test_ref]) as every
        GradientWorker takes them;
        nodes: the Ray node ids to place the actors on, actor k on nodes[k % len(nodes)];
        default: spread by Ray."""
        self.actor_args, self.shards = actor_args, shards
        count = len(shards)
        # more actors than CPUs share them, rather than wait for CPUs that never come
        node_cpus = {node["NodeID"]: node["Resources"].get("CPU", 0.0) for node in ray.nodes()}
        if nodes:
            chosen = [nodes[k % len(nodes)] for k in range(count)]
            counts = collections.Counter(chosen)
            self.placements = [
                {"num_cpus": min(1.0, node_cpus.get(node, 1.0) / counts[node]),
                 "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
                for node in chosen
            ]  # fmt: skip
        else:
            cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / count)
            self.placements = [{"num_cpus": cpus, "scheduling_strategy": "SPREAD"}] * count
        self.handles: list[ray.actor.ActorHandle] = []
        self.nodes: list[str] = []  # each actor's, once ready
        self.actors_per_node: dict[str, int] = {}

    def start(self) -> None:
        for k in range(len(self.shards)):  # one by one: close() kills those made if one fails
            self.handles.append(self.new_actor(k))

    def new_actor(self, k: int) -> ray.actor.ActorHandle:
        engine, layout, h, *data_refs = self.actor_args
        return GradientWorker.options(**self.placements[k]).remote(
            engine, layout, self.shards[k], h, *data_refs
        )

    def wait_ready(self) -> None:
        """Wait until every actor has its kernels loaded, START_TIMEOUT_S at most (an actor
        the cluster has no room for never starts); count the actors on each node."""
        try:
            nodes = ray.get([actor.ready.remote() for actor in self.handles],
                            timeout=START_TIMEOUT_S)  # fmt: skip
        except ray.exceptions.GetTimeoutError:
            raise WorkerFailed(f"a worker actor did not start in {START_TIMEOUT_S:.0f} s: the "
                               "cluster has no node that can take it") from None  # fmt: skip
        except ray.exceptions.RayTaskError as error:
            raise worker_failed(error) from None
        except ray.exceptions.RayActorError as error:
            raise DiedStarting(f"a worker actor died while starting: {first_line(error)}"
                               ) from None  # fmt: skip
        except ray.exceptions.RayError as error:  # such as Ray's memory monitor's kill
            raise WorkerFailed(f"a worker actor could not start: {type(error).__name__}: "
                               f"{first_line(error)}") from None  # fmt: skip
        self.nodes = nodes
        self.actors_per_node = dict(collections.Counter(nodes))

    def dead(self) -> list[int]:
        """The actors that do not answer within 60 s."""
        return [k for k, actor in enumerate(self.handles) if not answers(actor)]

    def replace(self, dead: list[int]) -> None:
        """New actors for the dead ones (not waited for: wait_ready)."""
        alive_nodes = [node for k, node in enumerate(self.nodes) if k not in dead]
        for k in dead:
            ray.kill(self.handles[k])
            self.fit_placement(k, alive_nodes)
            self.handles[k] = self.new_actor(k)

    def fit_placement(self, k: int, alive_nodes: list[str]) -> None:
        """Actor k's placement, for its replacement, when the cluster has fewer CPUs free
        than it held, FREED_WAIT_S after it died (its node lost, most likely): what is free,
        on the node of the fewest actors that still answer (not on a node going down that
        Ray has not yet marked dead), so that a lost node's actors share the cores of the
        nodes that remain (any sharding and placement gives the same bits), rather than
        wait for CPUs that are gone."""
        placement = self.placements[k]
        deadline = time.monotonic() + FREED_WAIT_S
        while True:
            free = max(ray.available_resources().get("CPU", 0.0), 0.0)
            if placement["num_cpus"] <= free:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        placement = {**placement, "num_cpus": free}
        if alive_nodes:
            counts = collections.Counter(alive_nodes)
            node = min(counts, key=lambda n: (counts[n], n))
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        self.placements[k] = placement
        print(f"distnum: worker actor {k} starts again with {free:g} of a CPU, all the "
              "cluster has free (a node lost?)", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        for actor in self.handles:
            try:
                ray.kill(actor)
            except ray.exceptions.RayError:
                pass  # gone already
        self.handles = []


def answers(actor: ray.actor.ActorHandle) -> bool:
    try:
        ray.get(actor.ready.remote(), timeout=60)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


class StepLinks:
    """How each step reaches the actors: shared memory on the driver's node (NodeChannel)
    and a HostRelay on each other node with actors, or, for a driver that is no node of the
    cluster (Ray Client) or actors that cannot use them, a Ray Compiled Graph."""

    def __init__(self, layout: ParamLayout, max_batch: int, shard_indices: np.ndarray,
                 places: list[slice], table_rows: int) -> None:  # fmt: skip
        """table_rows: the most samples of a batch whose tables the actors of a node share
        (each computes its share of the rows, unnudged.StepTables), 0 for none."""
        self.layout, self.max_batch, self.table_rows = layout, max_batch, table_rows
        self.shard_indices, self.places = shard_indices, places
        self.graph = None
        self.channel: NodeChannel | None = None
        self.transport: str | None = None  # how steps reach the actors, once connected
        self.serving: list[ray.ObjectRef] = []
        self.relays: list[ray.actor.ActorHandle] = []

    def connect(self, actors: WorkerActors) -> None:
        """Shared memory and relays when the driver runs on a node of the cluster (no Ray
        Client, far from it); else, or when an actor cannot use them, a compiled graph."""
        if node_channel.available() and not client_ray.is_connected():
            try:
                self.open_channel(actors)
                return
            except ChannelUnavailable:
                self.disconnect()
        self.compile(actors)

    def open_channel(self, actors: WorkerActors) -> None:
        """The driver's NodeChannel for the actors on its node, and a HostRelay on each other
        node with actors, connected to it; ChannelUnavailable when an actor or a relay
        cannot serve."""
        size, max_batch, table_rows = self.layout.size, self.max_batch, self.table_rows
        table_bytes = StepTables.nbytes(self.layout, table_rows) if table_rows else 0
        on_node = collections.defaultdict(list)
        for k, node in enumerate(actors.nodes):
            on_node[node].append(k)
        here = ray.get_runtime_context().get_node_id()
        self.channel = NodeChannel(size, max_batch, on_node.pop(here, []), self.shard_indices,
                                   table_rows, table_bytes)  # fmt: skip
        secret = secrets.token_bytes(node_channel.SECRET_BYTES)
        hosts = []  # (its workers, where their slices go), one per relay
        for node, workers in on_node.items():
            places = [self.places[k] for k in workers]
            placed = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            self.relays.append(HostRelay.options(num_cpus=0, scheduling_strategy=placed)
                               .remote(size, max_batch, workers, places, secret, table_rows,
                                       table_bytes))  # fmt: skip
            hosts.append((workers, places))
        try:
            endpoints = ray.get([relay.endpoints.remote() for relay in self.relays])
        except ray.exceptions.RayError as error:  # a relay could not make its channel
            raise ChannelUnavailable(first_line(error)) from None
        # each actor meets its node's channel: the driver's, or the relay's
        channel = self.channel
        meetings = [(channel.shared.path, channel.address, list(channel.connections))]
        for (path, address, _), (workers, _) in zip(endpoints, hosts, strict=True):
            meetings.append((path, address, workers))
        for path, address, workers in meetings:
            for k in workers:
                self.serving.append(actors.handles[k].serve.remote(
                    address, path, max_batch, len(workers), table_rows, table_bytes, k,
                    self.places[k]
                ))  # fmt: skip
        self.serving += [relay.serve.remote() for relay in self.relays]
        # an actor's (or a relay's) serve() ends early only when it cannot serve, or died
        channel.accept(CONNECT_TIMEOUT_S, failed=self.serving_ended)
        for (_, _, endpoint), (_, places) in zip(endpoints, hosts, strict=True):
            channel.add_host(HostLink(endpoint, secret, places, CONNECT_TIMEOUT_S,
                                      failed=self.serving_ended))  # fmt: skip
        self.transport = "shared memory and tcp" if self.relays else "shared memory"

    def serving_ended(self) -> bool:
        """Whether an actor's or a relay's serve() has ended while the channel waits for it:
        True when it could not serve; WorkerLost when its actor died."""
        ended, _ = ray.wait(self.serving, timeout=0)
        for serving in ended:
            try:
                ray.get(serving)
            except ray.exceptions.RayActorError:
                raise WorkerLost("an actor serving the steps") from None
            except ray.exceptions.RayError:
                pass
        return bool(ended)

    def compile(self, actors: WorkerActors) -> None:
        with InputNode() as step:
            dag = MultiOutputNode([actor.gradient_slice.bind(step) for actor in actors.handles])
        buffer_bytes = self.layout.size * 8 + (1 << 16)  # parameters in, a slice out
        self.graph = dag.experimental_compile(_buffer_size_bytes=buffer_bytes)
        self.transport = "compiled graph"

    def gradient(self, flat: np.ndarray, batch: np.ndarray, loss_batch: np.ndarray | None,
                 sleep_s: float, limit_s: float
                 ) -> tuple[np.ndarray, float, np.ndarray | None]:  # fmt: skip
        """The gradient in index order, the longest time an actor spent computing its
        slice, and the per-sample losses of loss_batch (None through a compiled graph)."""
        if self.channel is not None:
            return self.channel.gradient(flat, batch, loss_batch, sleep_s, limit_s)
        result = self.graph.execute((flat, batch))
        time.sleep(sleep_s)
        slices = ray.get(result, timeout=limit_s)
        grad = np.empty_like(flat)
        # the arrays read are views of the graph's channel buffers: copy them out at once, as
        # a view that outlives the graph (in a traceback, say) crashes the process when freed
        grad[self.shard_indices] = np.concatenate([g for g, _ in slices])
        return grad, max(s for _, s in slices), None

    def row_values(self, flat: np.ndarray, rows: np.ndarray, kind: int,
                   limit_s: float) -> np.ndarray | None:  # fmt: skip
        """The values at flat of the samples numbered in rows that kind asks for
        (node_channel.LOSSES, ...), each actor computing its share; None through a compiled
        graph."""
        if self.channel is None:
            return None
        return self.channel.row_values(flat, rows, kind, limit_s)

    def disconnect(self, wait_s: float = 0.0) -> None:
        """Tear the graph down, or close the channel: each actor's serving then ends (after
        the step it computes, if any), and it takes calls again; wait up to wait_s for
        that, all actors together."""
        if self.graph is not None:
            try:
                self.graph.teardown()
            except ray.exceptions.RayError:
                pass  # a graph that lost an actor may have torn itself down already
            self.graph = None
        if self.channel is not None:
            self.channel.close()  # the relays' serving ends too, and so their actors'
            self.channel = None
        if self.serving and wait_s > 0:
            ended, _ = ray.wait(self.serving, num_returns=len(self.serving), timeout=wait_s)
            for serving in ended:  # collected, so that Ray reports no unhandled error
                try:
                    ray.get(serving)
                except ray.exceptions.RayError:
                    pass  # its actor died: answers() will say
        self.serving = []
        try:  # a relay still waiting for its actors would leave its file in /dev/shm
            ray.get([relay.discard.remote() for relay in self.relays], timeout=10)
        except ray.exceptions.RayError:
            pass  # a relay that died: its node's /dev/shm keeps the file (its name has its pid)
        for relay in self.relays:  # made anew at each connection, on the nodes of that time
            ray.kill(relay)
        self.relays = []


class ShardedGradient:
    """The driver's side: a gradient computed by num_workers GradientWorker actors spread
    over the cluster's nodes (WorkerActors), one shard of equal estimated cost each, every
    step sent to them all at once (StepLinks).

    A worker actor that dies is replaced, the actors connected again and the step redone
    (the same inputs give the same bits), up to max_restarts times in all."""

    def __init__(
        self, layout: ParamLayout, engine: str | EngineFactory, h: float,
        x_train: np.ndarray | ImageCodes, t_train: np.ndarray, num_workers: int,
        max_restarts: int = 3, nodes: list[str] | None = None, batch_size: int = 0,
        x_test: np.ndarray | ImageCodes | None = None, t_test: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """x_train (N, D): float64 rows, or their codes (shipped_images), which the caller
        may have made already (meanwhile, or once for several); nodes: the Ray node ids to
        place the actors on, worker k on nodes[k % len(nodes)] (`distnum bench --model`
        measures one node and several);
        default: spread by Ray. batch_size: the steps' batches' size, if known: the actors
        of a node then share the fast engine's tables of a batch (each computes its share of
        the rows once, and not every actor all of them); larger batches work too, each
        actor computing all of its own. x_test, t_test: the test set, for the actors to
        compute the accuracies (accuracies())."""
        shards = make_shards(layout, input_density(x_train), num_workers)
        shard_indices = np.concatenate(shards)  # where each gathered value belongs
        bounds = np.cumsum([0, *map(len, shards)])
        places = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]  # in the slices
        shipped = shipped_images(x_train)
        self.training_set_bytes = shipped.nbytes
        actor_args = (engine, layout, h, ray.put(shipped), ray.put(t_train))
        if x_test is not None:
            actor_args += (ray.put(shipped_images(x_test)), ray.put(t_test))
        self.actors = WorkerActors(actor_args, shards, nodes)
        # room for a request's rows: a batch (train() refuses any larger than the training
        # set), or every sample of the training or the test set for the accuracies
        max_rows = max(len(x_train), 0 if x_test is None else len(x_test))
        table_rows = min(batch_size, len(x_train)) if shares_tables(engine) else 0
        self.links = StepLinks(layout, max_rows, shard_indices, places, table_rows)
        self.num_workers, self.max_restarts, self.restarts = num_workers, max_restarts, 0
        self.layout, self.x_train, self.t_train = layout, x_train, t_train
        self.x_test = x_test
        self.expected_compute_s = self.slowest_compute_s = 0.0
        self.patience = 1  # grows when a step outlasts the wait limit with every actor alive
        try:
            self.actors.start()
            self.actors.wait_ready()
            self.links.connect(self.actors)
        except BaseException:  # leave no actor behind in a Ray the caller keeps
            self.close()
            raise

    @property
    def actors_per_node(self) -> dict[str, int]:
        return self.actors.actors_per_node

    @property
    def transport(self) -> str | None:
        return self.links.transport

    @property
    def channel(self) -> NodeChannel | None:
        return self.links.channel

    def __call__(self, flat: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """The gradient (layout.size,) in index order, and the longest time one worker spent
        computing its slice."""
        grad, compute_s, _ = self.step(flat, batch, None)
        return grad, compute_s

    def step(self, flat: np.ndarray, batch: np.ndarray,
             loss_batch: np.ndarray | None) -> tuple[np.ndarray, float, float | None]:  # fmt: skip
        """The gradient and its seconds as __call__, and the mean loss at flat of loss_batch,
        if given: in the same request, through shared memory and the relays (the previous
        step's loss, at the parameters this step starts from, costs the actors a few rows
        each and no round trip of its own)."""
        # the workers compute meanwhile: sleep through most of the expected wait, as the
        # driver's waiting would take a CPU they need when they are as many as the cores
        sleep_s = 0.95 * self.expected_compute_s
        grad, compute_s, losses = self.recovering(
            lambda limit_s: self.links.gradient(flat, batch, loss_batch, sleep_s, limit_s)
        )
        self.expected_compute_s = min(compute_s, 1.05 * self.expected_compute_s or compute_s)
        self.slowest_compute_s = max(self.slowest_compute_s, compute_s)
        if loss_batch is None:
            return grad, compute_s, None
        if losses is None:  # a compiled graph's step
            return grad, compute_s, self.loss(flat, loss_batch)
        return grad, compute_s, total_loss(self.layout, self.layout.views(flat), losses)

    def loss(self, flat: np.ndarray, batch: np.ndarray) -> float:
        """The batch's mean loss at flat: each actor computes its share of the per-sample
        losses (the same bits as one process); with a compiled graph, this process computes
        it."""
        losses = self.recovering(
            lambda limit_s: self.links.row_values(flat, batch, node_channel.LOSSES, limit_s)
        )
        if losses is None:
            return loss_in_process(self.layout, flat, self.x_train, self.t_train, batch)
        return total_loss(self.layout, self.layout.views(flat), losses)

    def accuracies(self, flat: np.ndarray) -> tuple[float, float] | None:
        """The training and test sets' accuracies at flat, each actor classifying its share
        of their samples (the same numbers as one process); None without the test set,
        through a compiled graph, or with one actor: the driver classifies its float64 rows
        faster than one actor its uint8 codes (0.23-0.30 s against 0.46-0.50 s for MNIST on a
        2-core AMD EPYC; two actors, 0.25-0.27 s)."""
        if self.x_test is None or self.num_workers < 2:
            return None

        def fraction_right(kind: int, size: int) -> float | None:
            rows = np.arange(size)
            right = self.recovering(
                lambda limit_s: self.links.row_values(flat, rows, kind, limit_s)
            )
            return None if right is None else float(np.mean(right == 1.0))

        train = fraction_right(node_channel.TRAIN_CORRECT, len(self.x_train))
        test = fraction_right(node_channel.TEST_CORRECT, len(self.x_test))
        return None if train is None or test is None else (train, test)

    def recovering(self, request: Callable[[float], T]) -> T:
        """request(limit_s), again after an actor died or did not answer in limit_s (with the
        actors replaced and connected again); an actor's own exception as WorkerFailed."""
        while True:
            # never wait without a limit: a graph that lost an actor may not wake its reader
            limit_s = max(MIN_WAIT_S, 10 * self.slowest_compute_s) * self.patience
            try:
                return request(limit_s)
            except (ray.exceptions.RayTaskError, WorkerRaised) as error:  # its own code raised
                self.close()  # the other actors' answers are left unread: no request after
                raise worker_failed(error) from None
            except (ray.exceptions.RayError, WorkerLost, TimeoutError) as error:
                failure = error  # an actor died, or no answer in time
            try:
                self.recover(failure)
            except ray.exceptions.RayError as error:  # Ray could not replace what died
                self.close()
                raise WorkerFailed(f"replacing a worker actor after {first_line(failure)} "
                                   f"failed: {type(error).__name__}: {first_line(error)}"
                                   ) from None  # fmt: skip

    def recover(self, error: Exception) -> None:
        """After a failed or unanswered step: replace the actors that died, or, when all are
        alive (the step was only slower than the limit), wait longer next time; then
        connect them again, so that the step can be redone. Starting and connecting again
        can fail too (an actor dies meanwhile, or a replacement placed on a node going
        down): that counts as a restart, and all is done once more."""
        reconnecting = False
        if isinstance(error, ray.exceptions.OutOfMemoryError):  # the node is short of memory
            print(f"distnum: Ray's memory monitor killed a worker actor ({first_line(error)}); "
                  f"waiting {OOM_WAIT_S:.0f} s for memory before replacing it",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(OOM_WAIT_S)
        while True:
            self.links.disconnect(wait_s=60)
            dead = self.actors.dead()
            # a connection that ended is a process lost (an actor, or a relay: made anew)
            if dead or reconnecting or isinstance(error, WorkerLost):
                self.count_restart(error)
            else:
                self.patience *= 4
            self.actors.replace(dead)
            try:
                self.actors.wait_ready()
                self.links.connect(self.actors)
                return
            except (ray.exceptions.RayError, WorkerLost, TimeoutError, DiedStarting) as again:
                error, reconnecting = again, True

    def count_restart(self, error: Exception) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise WorkerFailed(
                f"worker actors died {self.restarts} times, more than "
                f"--max-worker-restarts {self.max_restarts}; last: {first_line(error)}"
            ) from None

    def close(self) -> None:
        self.links.disconnect()
        self.actors.close()


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def worker_failed(error: ray.exceptions.RayTaskError | WorkerRaised) -> WorkerFailed:
    """A worker's own exception as one line: its type and message."""
    if isinstance(error, WorkerRaised):  # the node channel's: "Type: first line" already
        return WorkerFailed(f"a worker actor raised {error}")
    cause = error.cause if isinstance(error.cause, BaseException) else error
    return WorkerFailed(f"a worker actor raised {type(cause).__name__}: {first_line(cause)}")


def cluster_nodes() -> list[str]:
    """The ids of the cluster's live nodes with CPUs, the driver's first."""
    here = ray.get_runtime_context().get_node_id()
    others = [node["NodeID"] for node in ray.nodes() if node["Alive"]
              and node["NodeID"] != here and node["Resources"].get("CPU")]  # fmt: skip
    return [here, *others]


def default_workers() -> int:
    """As many worker actors as the cluster has CPUs."""
    return max(int(ray.cluster_resources().get("CPU", 1)), 1)


def worker_count_note(workers: int, layout: ParamLayout | None = None,
                      actor_bytes: int | None = None) -> str | None:  # fmt: skip
    """None when the cluster runs workers actors well; a note when they share its CPUs; a
    ValueError when their estimated memory (actor_bytes each, or a GradientWorker's for
    layout) exceeds what the cluster has for them."""
    resources = ray.cluster_resources()
    # a gradient worker's: its own copy of the parameters
    each = actor_bytes if actor_bytes is not None else ACTOR_BASE_BYTES + 8 * layout.size
    available = resources.get("memory", 0)
    cpus = int(resources.get("CPU", 1))
    if workers * each > available:
        raise ValueError(f"{workers} worker actors need about {workers * each / 2**30:.1f} GiB "
                         f"(about {each / 2**20:.0f} MB each) but the cluster has "
                         f"{available / 2**30:.1f} GiB for them; give at most "
                         f"{int(available // each)}, and {cpus} (its CPUs) run best")  # fmt: skip
    if workers > cpus:
        return (f"{workers} worker actors share the cluster's {cpus} CPUs (about "
                f"{each / 2**20:.0f} MB each); more workers than CPUs run no faster")  # fmt: skip
    return None


def connect(address: str | None) -> bool:
    """Join the Ray cluster at address (or RAY_ADDRESS), or start Ray on this machine.
    Returns whether this call started the connection, so whether to shut it down."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        try:
            init_keeping_signal_handlers(include_dashboard=False, log_to_driver=False,
                                         logging_level="WARNING")  # fmt: skip
        except Exception as error:  # Ray raises plain Exceptions when its processes fail
            raise RayUnavailable(f"Ray did not start on this machine: {first_line(error)}"
                                 ) from None  # fmt: skip
        return True
    if address != "auto":
        check_reachable(address.removeprefix("ray://"))
    if address != "auto" and not address.startswith("ray://"):
        check_token_needed(address)
    try:
        init_keeping_signal_handlers(address=address, log_to_driver=False,
                                     logging_level="WARNING")  # fmt: skip
    except ConnectionError as error:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: "
                              f"{first_line(error)}") from None  # fmt: skip
    return True


TOKEN_HINT = (
    "it authenticates with a token (as `ray start` sets up by default): set "
    "RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
)


def check_token_needed(address: str, timeout_s: float = 5.0) -> None:
    """A ConnectionError with the token hint when the cluster at host:port wants a token that
    this process will not send (RAY_AUTH_MODE is not "token"): asked directly of its GCS,
    whose unauthenticated answer is immediate, where ray.init would retry for 20 s, print a
    warning a second and then name neither the token nor the address given."""
    if os.environ.get("RAY_AUTH_MODE") == "token":
        return
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray: ray.init will say what it says
        return
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ConnectionError(f"cannot join the Ray cluster at {address}: "
                                      f"{TOKEN_HINT}") from None  # fmt: skip


def disconnect(owns_ray: bool) -> None:
    """ray.shutdown() when this process started the connection (connect() said so)."""
    if owns_ray:
        ray.shutdown()


def init_keeping_signal_handlers(**options) -> None:
    """ray.init, keeping this process's SIGTERM handler, during the run and after it.

    ray.init installs its own handler (sys.exit at whatever line runs), which would end a
    run without its checkpoint, and leave Ray's agents behind when it struck during the
    start: ours is put back. And Ray's failure signal handler (abseil's, which prints C++
    stacks on a crash) stays out of the driver: ray.shutdown() uninstalls it by resetting
    SIGTERM's action to the default under Python's handler, and a SIGTERM during the
    shutdown's ~0.5 s then killed the process before the run's outputs were written."""
    utils, constants = ray._private.utils, ray._private.ray_constants
    if threading.current_thread() is not threading.main_thread() or not (
        hasattr(utils, "set_sigterm_handler")
        and hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER")
    ):
        ray.init(**options)
        return
    ours = signal.getsignal(signal.SIGTERM)
    set_handler, disabled = utils.set_sigterm_handler, constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    utils.set_sigterm_handler = lambda handler: None
    constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read when the driver's core starts
    try:
        ray.init(**options)
    finally:
        utils.set_sigterm_handler = set_handler
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = disabled
        install(signal.SIGTERM, ours)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A quick TCP check, so that a wrong --address fails in seconds with a clear message."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise ConnectionError(
            f"cannot reach a Ray cluster at {address} ({error}); start one with "
            "`ray start --head`, fix --address, or leave it out to run Ray on this machine"
        ) from None
