"""distnum bench: seconds per full gradient for the full engine, the fast engine and backprop,
on one real batch and one set of weights, and the fast engine's peak memory."""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import resource
import time
from collections.abc import Callable

import numba
import numpy as np

from distnum.data import ImageCodes, shipped_images
from distnum.engines import EngineFactory, FastEngine, FullEngine
from distnum.engines.base import one_blas_thread
from distnum.engines.deltas import sigmoid_change
from distnum.engines.last_hidden_layer import loss_difference
from distnum.models import MultiLayerNet, ParamLayout, backprop, blas_forward
from distnum.vecmath import DEGREE, JIT

WARMUP_STEPS = 5  # untimed steps before bench_workers times a run


def median_seconds(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def whole_gradient(layout: ParamLayout, flat: np.ndarray, x: np.ndarray, labels: np.ndarray,
                   h: float) -> Callable[[], np.ndarray]:  # fmt: skip
    """A call that computes the fast engine's whole gradient at flat on x, compiled (or
    loaded from numba's cache) already: what the timings below time."""
    engine = FastEngine(layout, np.arange(layout.size))
    engine(flat, x, labels, h)
    return lambda: engine(flat, x, labels, h)


def fast_gradient_peak_rss_mb(layout: ParamLayout, flat: np.ndarray, x: np.ndarray,
                              labels: np.ndarray, h: float) -> float:  # fmt: skip
    """Peak resident memory (MB) of a fresh process that computes fast gradients of x:
    the interpreter, numpy and numba included, so an upper bound on the engine's own."""
    gradient = whole_gradient(layout, flat, x, labels, h)
    for _ in range(2):
        gradient()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through exec
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@numba.njit(**JIT)
def nudged_loss_pairs(changes, moments, target, out):
    """The delta form's arithmetic alone, for one sample value and unit per element: a
    sigmoid unit's change at +h and -h, S by the moments, the loss by log1p, their
    difference (last_hidden_layer.loss_difference), on contiguous arrays, vectorised."""
    for q in range(out.size):
        d_plus = sigmoid_change(changes[0, q], changes[1, q], changes[2, q])
        d_minus = sigmoid_change(changes[0, q], changes[1, q], changes[3, q])
        out[q] = loss_difference(d_plus, d_minus, moments, target[q], True)


def floor_seconds_per_nudged_loss(seed: int) -> float:
    """The floor of the delta form: its arithmetic per nudged loss in a tight loop, in cache
    (nudged_loss_pairs, half a pair), with the magnitudes of the chapter's net."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.2, 0.8, 4096)
    nudge = 1e-4 * rng.uniform(0.0, 1.0, 4096)
    changes = np.stack([s * (1 - s), 1 - s, np.expm1(-nudge), np.expm1(nudge)])
    moments = tuple(float(0.02 ** (k + 1) / math.factorial(k + 1)) for k in range(DEGREE))
    target, out = rng.uniform(-0.05, 0.05, 4096), np.empty(4096)
    nudged_loss_pairs(changes, moments, target, out)
    return median_seconds(lambda: nudged_loss_pairs(changes, moments, target, out), 200) / 8192


def bench_engines(
    x: np.ndarray, labels: np.ndarray, net: MultiLayerNet, seed: int, h: float,
    full_sample: int, repeat: int,
) -> dict[str, float]:  # fmt: skip
    """One row of the table: full (extrapolated from full_sample timed coordinates), fast
    and backprop seconds per gradient of the batch, at net's weights."""
    layout, size = net.layout, net.layout.size
    fast_s = median_seconds(whole_gradient(layout, net.flat_params, x, labels, h), repeat)
    # the floor: the nudged losses, each at the delta form's arithmetic alone
    nudged_losses = FastEngine(layout, np.arange(size)).work(net.flat_params, x)["nudged_losses"]
    floor_s = nudged_losses * floor_seconds_per_nudged_loss(seed)
    with one_blas_thread():  # one core, as each engine computes on one
        params = layout.views(net.flat_params)  # a plain numpy backprop: BLAS throughout
        backprop_s = median_seconds(lambda: backprop(layout, params, x, labels, blas_forward),
                                    max(repeat, 50))  # fmt: skip
    sample = np.random.default_rng(seed).choice(size, size=min(full_sample, size), replace=False)
    FullEngine(net.layout, sample[:1])(net.flat_params, x, labels, h)  # compiled, not timed
    full = FullEngine(net.layout, sample)
    full_sample_s = median_seconds(lambda: full(net.flat_params, x, labels, h), 1)
    full_s = full_sample_s / sample.size * size
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    ) as child:
        peak = child.submit(fast_gradient_peak_rss_mb, layout, net.flat_params, x, labels, h)
        peak_mb = peak.result()
    return {
        "hidden": layout.hidden,
        "architecture": layout.describe(),
        "params": size,
        "batch_size": x.shape[0],
        "full_s": full_s,
        "full_timed_coordinates": int(sample.size),
        "fast_s": fast_s,
        "backprop_s": backprop_s,
        "full_over_fast": full_s / fast_s,
        "fast_over_backprop": fast_s / backprop_s,
        "fast_peak_rss_mb": peak_mb,
        "nudged_losses": nudged_losses,
        "ns_per_nudged_loss": fast_s / nudged_losses * 1e9,
        "floor_ns_per_nudged_loss": floor_s / nudged_losses * 1e9,
        "floor_s": floor_s,
        "fast_over_floor": fast_s / floor_s,
    }


def hidden_label(row: dict) -> str:
    """A row's hidden sizes as the table shows them: 50, or 100-100."""
    hidden = row["hidden"]
    return "-".join(map(str, hidden)) if isinstance(hidden, list) else str(hidden)


def format_engine_rows(rows: list[dict[str, float]]) -> str:
    lines = [
        f"{'hidden':>9} {'params':>8} {'full s/grad':>12} {'fast s/grad':>12} "
        f"{'backprop s':>11} {'full/fast':>10} {'fast/backprop':>14} {'fast peak MB':>13}"
    ]
    for r in rows:
        lines.append(
            f"{hidden_label(r):>9} {r['params']:>8} {r['full_s']:>11.2f}* {r['fast_s']:>12.4f} "
            f"{r['backprop_s']:>11.5f} {r['full_over_fast']:>10.0f} "
            f"{r['fast_over_backprop']:>14.1f} {r['fast_peak_rss_mb']:>13.0f}"
        )
    lines.append(
        f"* full: extrapolated from {rows[0]['full_timed_coordinates']} timed coordinates; "
        "fast and backprop: median of whole gradients, on one core. Peak MB: a fresh process "
        "computing fast gradients, interpreter included."
    )
    lines.append(
        f"\nthe fast engine against its floor, per gradient:\n{'hidden':>9} "
        f"{'nudged losses':>14} {'ns/nudged':>10} {'floor ns':>9} {'floor s':>8} "
        f"{'fast/floor':>11}"
    )
    for r in rows:
        lines.append(
            f"{hidden_label(r):>9} {r['nudged_losses']:>14,} {r['ns_per_nudged_loss']:>10.2f} "
            f"{r['floor_ns_per_nudged_loss']:>9.2f} {r['floor_s']:>8.4f} "
            f"{r['fast_over_floor']:>11.2f}"
        )
    lines.append(
        "floor: each nudged loss at the delta form's own arithmetic (the unit's change, S by "
        "its moments, log1p, as last_hidden_layer.py computes them) in a tight vectorised "
        "loop; the unnudged pass, the tables, gathering by pixel and memory traffic are what "
        "fast/floor measures above 1."
    )
    return "\n".join(lines)


class IdleEngine:
    """An engine that computes nothing and gives a zero slice: what a step costs beyond the
    workers' compute (the cost model's o)."""

    def __init__(self, layout: object, indices: np.ndarray) -> None:
        self.size = len(indices)

    def __call__(self, flat: np.ndarray, x: np.ndarray, labels: np.ndarray, h: float) -> np.ndarray:
        return np.zeros(self.size)


def bench_workers(
    x_train: np.ndarray | ImageCodes, t_train: np.ndarray, worker_counts: list[int], steps: int,
    net: MultiLayerNet, seed: int, h: float, batch_size: int = 100, lr: float = 0.1,
    engine: str | EngineFactory = "fast", nodes: list[str] | None = None,
) -> list[dict[str, float]]:  # fmt: skip
    """Training steps (gradient over Ray with the previous step's loss, SGD update) with
    each number of worker actors, on the Ray this process is connected to, worker k on
    nodes[k % len(nodes)] (default: the cluster's nodes with CPUs, the driver's first).
    Overhead: a step's time minus the longest time a worker spent computing its slice (Ray
    calls, transfers, gathering, the update); bytes: what the driver sent to and received
    from each other host per step, on average."""
    from distnum.distributed import ShardedGradient, cluster_nodes

    nodes = nodes or cluster_nodes()
    x_shipped = shipped_images(x_train)  # made once for every count's actors
    rows = []
    for count in worker_counts:
        rng = np.random.default_rng(seed)
        flat = net.flat_params.copy()
        gradient = ShardedGradient(net.layout, engine, h, x_shipped, t_train, count, nodes=nodes,
                                   batch_size=batch_size)  # fmt: skip
        transport = gradient.transport
        step_s, compute_s = [], []
        try:
            previous = None
            for step in range(steps + WARMUP_STEPS):
                batch = rng.choice(len(x_train), batch_size)
                started = time.perf_counter()
                # as the training loop does: the previous step's loss comes with this gradient
                grad, computing, _ = gradient.step(flat, batch, previous)
                flat -= lr * grad
                previous = batch
                if step >= WARMUP_STEPS:
                    step_s.append(time.perf_counter() - started)
                    compute_s.append(computing)
            hosts = gradient.channel.hosts if gradient.channel is not None else []
            sent = [host.bytes_sent / (steps + WARMUP_STEPS) for host in hosts]
            received = [host.bytes_received / (steps + WARMUP_STEPS) for host in hosts]
            nodes_used = len(gradient.actors_per_node)
            training_set_bytes = gradient.training_set_bytes
        finally:
            gradient.close()
        step_s, compute_s = np.array(step_s), np.array(compute_s)
        rows.append({
            "workers": count,
            "hidden": net.layout.hidden,
            "architecture": net.layout.describe(),
            "params": net.layout.size,
            "steps": steps,
            "steps_per_s": float(1 / np.median(step_s)),
            "median_step_s": float(np.median(step_s)),
            "median_compute_s": float(np.median(compute_s)),
            "median_overhead_s": float(np.median(step_s - compute_s)),
            "transport": transport,
            "nodes": nodes_used,
            "bytes_to_each_host": float(np.mean(sent)) if sent else 0.0,
            "bytes_from_each_host": float(np.mean(received)) if received else 0.0,
            "training_set_bytes_per_node": training_set_bytes,
        })  # fmt: skip
    for row in rows:
        row["speedup"] = row["steps_per_s"] / rows[0]["steps_per_s"]
    return rows


def format_worker_rows(rows: list[dict[str, float]]) -> str:
    lines = [
        f"{'workers':>7} {'steps/s':>8} {'speedup':>8} {'ceiling':>8} {'of it':>6} "
        f"{'step ms':>8} {'compute ms':>11} {'overhead ms':>12} {'nodes':>5} "
        f"{'KB to/from each other host':>27}  transport"
    ]
    for r in rows:
        traffic = (f"{r['bytes_to_each_host'] / 1e3:.1f} / {r['bytes_from_each_host'] / 1e3:.1f}"
                   if r["nodes"] > 1 else "-")  # fmt: skip
        lines.append(
            f"{r['workers']:>7} {r['steps_per_s']:>8.1f} {r['speedup']:>8.2f} "
            f"{r['ceiling']:>8.2f} {r['of_ceiling']:>6.2f} "
            f"{r['median_step_s'] * 1e3:>8.2f} {r['median_compute_s'] * 1e3:>11.2f} "
            f"{r['median_overhead_s'] * 1e3:>12.2f} {r['nodes']:>5} {traffic:>27}  "
            f"{r['transport']}"
        )
    lines.append(
        "medians over the timed steps; compute: the slowest worker's own time (its rows of the "
        "previous step's loss and of the step's tables, the wait for its node's other actors' "
        "rows, its slice); overhead: "
        "the rest of the step (Ray calls, transfers, gathering, the update); ceiling: N "
        "processes computing the whole gradient at once against one alone, what this machine "
        "allows N workers, and the speedup as a fraction of it. The training set "
        f"went to each node once: {rows[0]['training_set_bytes_per_node'] / 1e6:.0f} MB."
    )
    return "\n".join(lines)
