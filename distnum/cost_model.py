"""What a training step costs on N worker actors, measured and predicted (`distnum bench
--model`):

    T(N) = K(N)  +  o(N, P, bandwidth)

the step's compute plus the rest of it, each measured without the other: the model's claim
is that they add, neither slowing the other.

- K(N): the compute of a step with N actors, measured without Ray: N processes of their own
  (spawned, so each has its own memory, as an actor has), each with its shard's fast
  engine, released together each step to compute its rows of the previous step's loss,
  its share of the rows of the step's tables (into shared memory, as the actors of a node
  share them), then, once all are there, its slice, as the actors do; the step's compute
  lasts until the last is done. It is what C / N becomes on this machine: C = K(1), one
  worker's compute for the whole gradient; f, what every actor computes whatever its
  shard's size (gathering the tables' sample values by pixel, its units' setup); the cores
  shared once the actors outnumber them; and what sharing costs (caches refilled, the
  scheduler's slices, the slowest actor waited for, twice a step);
- f is fitted to a process's own CPU time per step, cpu(N) = (cpu(1) - f) / N + f over
  every N; and s = K(cores) / ((C - f) / cores + f), how much slower a step's compute is
  with every core computing than the work's share of one core predicts;
- o: the rest of the step (Ray, the transfers, gathering, the update), measured with an
  engine that computes nothing (IdleEngine), for N actors on the driver's node, and on 2
  hosts when the cluster has a second node.

Across H hosts of c cores each (hosts like this machine), the driver sends each other host
one copy of the parameters (8P bytes) and receives its slice (8P / H), one host after the
other through its own link of bandwidth B:

    T_H = ((C - f) / (H * c) + f) * s + o(c) + (H - 1) * (d0 + (8P + 8P / H) / B)

where d0 is what one more host adds to a step beyond its bytes. Measured: d, o on 2 hosts
minus o on one node (one actor each), for each hidden size; d = d0 + bytes / B_here fitted
over the hidden sizes gives d0 and the bandwidth between the hosts measured (B_here).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from distnum.bench import WARMUP_STEPS, IdleEngine, bench_workers
from distnum.data import ImageCodes, input_density, shipped_images
from distnum.distributed import cluster_nodes, sample_losses, shard_slice
from distnum.engines import FastEngine
from distnum.engines.base import one_blas_thread
from distnum.engines.unnudged import StepTables
from distnum.functions import label_indices
from distnum.models import ParamLayout, TwoLayerNet
from distnum.node_channel import row_span
from distnum.sharding import make_shards

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMULA = "K(N) + o(N)"
OVERHEAD_WORKERS = [1, 2, 4, 8, 16]  # K and o measured
CHECKED_UP_TO = 8  # up to so many actors, steps measured with the fast engine too
BARRIER_TIMEOUT_S = 300.0  # for every shard's process to start, or to compute a step
HOST_COUNTS = [1, 2, 4, 8, 16, 32, 64]
BANDWIDTHS = {"10 Gbit/s": 10e9 / 8, "25 Gbit/s": 25e9 / 8}  # bytes per second


def shard_steps(number: int, layout: ParamLayout, flat: np.ndarray, x: np.ndarray | ImageCodes,
                t: np.ndarray, batches: np.ndarray, shares: list[tuple | None], h: float,
                barriers: list[multiprocessing.synchronize.Barrier], tables: list,
                everyone: multiprocessing.synchronize.Barrier,
                results: multiprocessing.queues.Queue) -> None:  # fmt: skip
    """In process number `number`, what an actor computes each step (batches (S, B)), for
    each set of shards in turn: its share of the set (its shard's indices and the rows of the
    loss it computes each step), or None when the set has fewer shards than the process's
    number. As the actors of a node share the step's tables, the processes of a set share
    tables[set] (shared memory): each fills its share of the rows, then, when all have,
    computes its slice from them. A set's steps start when every process is done with the
    set before; each step once every shard of the set is ready. Puts on results its number
    and, by set,
    [(started, ended, CPU seconds) per step] or None where it had no share; or the error
    that stopped it; or None when another's error or a timeout broke a barrier."""
    try:
        measured = []
        params = layout.views(flat)
        for share, barrier, buffer in zip(shares, barriers, tables, strict=True):
            # no process still computing the set before, however long its steps take: a set
            # that fails or times out aborts this barrier too
            everyone.wait()
            if share is None:
                measured.append(None)
                continue
            indices, loss_rows = share
            engine = FastEngine(layout, indices)
            shared = StepTables(layout, batches.shape[1], memoryview(buffer))
            first, stop = row_span(number, barrier.parties, batches.shape[1])
            with one_blas_thread():  # as an actor has: one CPU, and its own thread's time counted
                shard_slice(engine, len(indices), flat, x[:2], t[:2], h)  # compiled, or loaded
                times = []
                for batch, rows in zip(batches, loss_rows, strict=True):
                    barrier.wait(BARRIER_TIMEOUT_S)
                    started, cpu = time.perf_counter(), time.thread_time()
                    sample_losses(layout, flat, x, t, rows)
                    if stop > first:
                        shared.fill(params, x[batch[first:stop]], first, h)
                    barrier.wait(BARRIER_TIMEOUT_S)  # every process's rows filled
                    labels = label_indices(t[batch], layout.output_size)
                    engine.from_tables(flat, shared, labels, h)
                    times.append((started, time.perf_counter(), time.thread_time() - cpu))
            del shared  # its arrays view the set's shared memory
            measured.append(times)
        results.put((number, measured))
    except BaseException as error:  # the parent reports it; the others' barriers break
        for barrier in (everyone, *barriers):
            barrier.abort()
        broken = isinstance(error, threading.BrokenBarrierError)
        results.put(None if broken else f"{type(error).__name__}: {error}")


def compute_seconds(layout: ParamLayout, flat: np.ndarray, x: np.ndarray | ImageCodes,
                    t: np.ndarray, batches: np.ndarray, shard_sets: list[list[np.ndarray]],
                    h: float) -> list[tuple[float, float]]:  # fmt: skip
    """K, for each set of shards: the median seconds from the first shard's start to the
    last one's end of a step, each shard computing in a process of its own (spawned: its
    own memory, as an actor has), released together each step; and the median CPU seconds
    a shard's thread spends in a step. The sets are measured one after the other by as
    many processes as the largest has shards. Raises RuntimeError, with the reason, when a
    shard's process fails."""
    context = multiprocessing.get_context("spawn")
    barriers = [context.Barrier(len(shards)) for shards in shard_sets]
    table_bytes = StepTables.nbytes(layout, batches.shape[1])
    tables = [context.RawArray("b", table_bytes) for _ in shard_sets]  # one per set, shared
    processes_needed = max(map(len, shard_sets))
    everyone, results = context.Barrier(processes_needed), context.Queue()
    previous = np.roll(batches, 1, axis=0)  # each step's loss: the step before's batch
    shares: list[list[tuple | None]] = [[] for _ in range(processes_needed)]
    for shards in shard_sets:
        split = [np.array_split(rows, len(shards)) for rows in previous]
        for k, process_shares in enumerate(shares):
            in_set = k < len(shards)
            process_shares.append((shards[k], [rows[k] for rows in split]) if in_set else None)
    processes = [
        context.Process(target=shard_steps, daemon=True,
                        args=(k, layout, flat, x, t, batches, process_shares, h, barriers,
                              tables, everyone, results))
        for k, process_shares in enumerate(shares)
    ]  # fmt: skip
    answers: list = []
    try:
        for process in processes:
            process.start()
        while len(answers) < len(processes):  # each answers after its last step
            try:
                answers.append(results.get(timeout=1.0))
            except queue.Empty:
                lost = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if lost:  # killed, or out of memory: it cannot say why
                    answers.append(f"a shard's process ended with exit code {lost[0]}")
                    break
    finally:
        for process in processes:
            if process.pid is not None:  # started
                process.join(timeout=1)
                if process.is_alive():
                    process.kill()
                    process.join()
    failed = [answer for answer in answers if isinstance(answer, str)]
    if failed or None in answers:
        reason = failed[0] if failed else f"no step in {BARRIER_TIMEOUT_S:.0f} s"
        counts = "/".join(str(len(shards)) for shards in shard_sets)
        raise RuntimeError(f"measuring the compute of {counts} shards: {reason}")
    by_process, measured = dict(answers), []
    for n, shards in enumerate(shard_sets):
        times = np.array([by_process[k][n] for k in range(len(shards))])[:, WARMUP_STEPS:]
        step = times[:, :, 1].max(axis=0) - times[:, :, 0].min(axis=0)  # times (shards, steps, 3)
        measured.append((float(np.median(step)), float(np.median(times[:, :, 2]))))
    return measured


def fitted_fixed_seconds(cpu_s: dict[int, float]) -> float:
    """f, from a shard's CPU seconds with each number of shards N: the least-squares fit of
    cpu(N) = (cpu(1) - f) / N + f, that is cpu(N) - cpu(1) / N = f (1 - 1 / N); 0 when no N
    but 1 was measured, and never below 0 nor above cpu(1) (where the fixed work is all
    there is, as in a small net, the fit's noise can take it there)."""
    counts = np.array([n for n in cpu_s if n > 1], dtype=float)
    if not counts.size:
        return 0.0
    share = 1 - 1 / counts
    excess = np.array([cpu_s[int(n)] for n in counts]) - cpu_s[1] / counts
    return min(max(float(share @ excess / (share @ share)), 0.0), cpu_s[1])


def drawn_steps(
    x_train: np.ndarray | ImageCodes, t_train: np.ndarray, seed: int, steps: int, batch_size: int
) -> tuple[np.ndarray | ImageCodes, np.ndarray, np.ndarray]:
    """The rows that steps (and the warm-up's) draw, numbered anew, as the actors have them
    (uint8 codes when they are pixels), their labels, and the batches (S, B) in the new
    numbers: each process gets a copy, 16 MB for 200 steps of 100 MNIST images."""
    rng = np.random.default_rng(seed)
    drawn = [rng.choice(len(x_train), batch_size) for _ in range(steps + WARMUP_STEPS)]
    used, batches = np.unique(drawn, return_inverse=True)
    batches = batches.reshape(len(drawn), batch_size)  # flat before numpy 2
    # codes made already are taken as they are, rather than read back and made again
    x_used = x_train.subset(used) if isinstance(x_train, ImageCodes) else x_train[used]
    return shipped_images(x_used), t_train[used], batches


def ceiling(layout: ParamLayout, flat: np.ndarray, x: np.ndarray | ImageCodes, t: np.ndarray,
            batches: np.ndarray, counts: list[int], h: float) -> dict[int, float]:  # fmt: skip
    """What this machine allows N workers: N processes each computing the whole gradient at
    once (spawned, released together each step, as compute_seconds), against one alone,
    N K_whole(1) / K_whole(N); the speedup N shards could reach if they repeated no work."""
    whole = np.arange(layout.size)
    every = sorted(set(counts) | {1})
    measured = compute_seconds(layout, flat, x, t, batches, [[whole] * n for n in every], h)
    seconds = {n: step_s for n, (step_s, _) in zip(every, measured, strict=True)}
    return {n: n * seconds[1] / seconds[n] for n in counts}


def measure(x_train: np.ndarray, t_train: np.ndarray, hidden: int, seed: int, h: float,
            steps: int, batch_size: int = 100,
            workers: list[int] = OVERHEAD_WORKERS) -> dict:  # fmt: skip
    """The model's inputs for one hidden size, and the steps it predicts for each number of
    workers (1 and the machine's cores among them), measured on the Ray this process is
    connected to: on the driver's node, and on it and one other node when the cluster has
    one (then 2 among the workers too)."""
    here, *others = cluster_nodes()
    cores = os.cpu_count() or 1
    workers = sorted(set(workers) | {1, cores})
    net = TwoLayerNet(x_train.shape[1], hidden, 10, seed=seed)
    common = {"steps": steps, "net": net, "seed": seed, "h": h, "batch_size": batch_size}
    checked_workers = [n for n in workers if n <= CHECKED_UP_TO]
    x_shipped = shipped_images(x_train)  # made once for every ShardedGradient below
    checked = bench_workers(x_shipped, t_train, checked_workers, nodes=[here], **common)
    idle = bench_workers(x_shipped, t_train, workers, engine=IdleEngine, nodes=[here], **common)
    x_used, t_used, batches = drawn_steps(x_shipped, t_train, seed, steps, batch_size)
    density = input_density(x_shipped)
    shard_sets = [make_shards(net.layout, density, n) for n in workers]
    measured = compute_seconds(net.layout, net.flat_params, x_used, t_used, batches, shard_sets,
                               h)  # fmt: skip
    compute = {n: step_s for n, (step_s, _) in zip(workers, measured, strict=True)}
    cpu = {n: cpu_s for n, (_, cpu_s) in zip(workers, measured, strict=True)}
    report = {
        "hidden": hidden,
        "params": checked[0]["params"],
        "cores": cores,
        "step_compute_s": compute,
        "shard_cpu_s": cpu,
        "compute_s": compute[1],
        "fixed_s": fitted_fixed_seconds(cpu),
        "overhead_s": {r["workers"]: r["median_overhead_s"] for r in idle},
        "measured_steps_per_s": {r["workers"]: r["steps_per_s"] for r in checked},
    }
    report["slowdown"] = compute[cores] / actor_seconds(report, cores)
    report["closed_form_error"] = {n: closed_form_seconds(report, n, cores) / compute[n] - 1
                                   for n in workers}  # fmt: skip
    if others:
        workers = sorted(set(workers) | {2})
        two = bench_workers(x_shipped, t_train, [n for n in workers if n > 1], engine=IdleEngine,
                            nodes=[here, others[0]], **common)  # fmt: skip
        report["two_host_overhead_s"] = {r["workers"]: r["median_overhead_s"] for r in two}
        report["bytes_to_each_host"] = {r["workers"]: r["bytes_to_each_host"] for r in two}
        report["bytes_from_each_host"] = {r["workers"]: r["bytes_from_each_host"] for r in two}
        report["host_delay_s"] = report["two_host_overhead_s"][2] - report["overhead_s"][2]
    report["predicted_steps_per_s"] = {n: 1 / step_seconds(report, n) for n in report["overhead_s"]}
    report["prediction_error"] = {
        n: report["predicted_steps_per_s"][n] / measured - 1
        for n, measured in report["measured_steps_per_s"].items()
    }
    return report


def project_hosts(models: list[dict]) -> None:
    """Adds d0, B_here and the predicted speedup on 1..64 hosts to each model measured on 2
    hosts, when at least two hidden sizes were (one gives no fit: d0 = d, bytes counted
    twice, a bound from below on the speedup)."""
    measured = [m for m in models if "host_delay_s" in m and m["cores"] in m["overhead_s"]]
    if not measured:
        return
    traffic = [m["bytes_to_each_host"][2] + m["bytes_from_each_host"][2] for m in measured]
    delays = [m["host_delay_s"] for m in measured]
    seconds_per_byte, fixed = 0.0, None
    if len(set(traffic)) > 1:
        seconds_per_byte, fixed = np.polyfit(traffic, delays, 1)
    for m in measured:
        m["host_fixed_s"] = max(float(fixed), 0.0) if fixed is not None else m["host_delay_s"]
        m["bytes_per_s_here"] = 1 / seconds_per_byte if seconds_per_byte > 0 else None
        m["predicted_speedup"] = {
            name: {hosts: speedup(m, hosts, bandwidth) for hosts in HOST_COUNTS}
            for name, bandwidth in BANDWIDTHS.items()
        }


def actor_seconds(model: dict, workers: int) -> float:
    """(C - f) / N + f: what each of N actors computes, alone on a core."""
    return (model["compute_s"] - model["fixed_s"]) / workers + model["fixed_s"]


def closed_form_seconds(model: dict, actors: int, cores: int) -> float:
    """((C - f) / N + f) * max(1, N / cores) * s: K(N) in closed form, for N actors on
    `cores` cores (s for more than one actor), as the projection across hosts uses it."""
    contention = model["slowdown"] if actors > 1 else 1.0
    return actor_seconds(model, actors) * max(1.0, actors / cores) * contention


def step_seconds(model: dict, workers: int) -> float:
    """T(N) on one node."""
    return model["step_compute_s"][workers] + model["overhead_s"][workers]


def host_step_seconds(model: dict, hosts: int, bandwidth: float) -> float:
    """T_H: hosts of `cores` cores each, one actor per core, the driver's link at bandwidth
    bytes per second."""
    cores, params_bytes = model["cores"], 8 * model["params"]
    compute = closed_form_seconds(model, hosts * cores, hosts * cores)
    per_host = model["host_fixed_s"] + (params_bytes + params_bytes / hosts) / bandwidth
    return compute + model["overhead_s"][cores] + (hosts - 1) * per_host


def speedup(model: dict, hosts: int, bandwidth: float) -> float:
    """T_1 / T_H: how many times faster a step is on `hosts` hosts than on one."""
    return host_step_seconds(model, 1, bandwidth) / host_step_seconds(model, hosts, bandwidth)


def format_model(models: list[dict]) -> str:
    workers, checked = list(models[0]["overhead_s"]), list(models[0]["measured_steps_per_s"])
    lines = [f"the cost model, T(N) = {FORMULA}:",
             f"{'hidden':>6} {'params':>8} {'C ms':>7} {'f ms':>6} {'s':>5}  "
             + "  ".join(f"{f'K({n}) ms':>8}" for n in workers) + "  "
             + "  ".join(f"{f'o({n}) ms':>8}" for n in workers)]  # fmt: skip
    for m in models:
        lines.append(f"{m['hidden']:>6} {m['params']:>8} {m['compute_s'] * 1e3:>7.2f} "
                     f"{m['fixed_s'] * 1e3:>6.2f} {m['slowdown']:>5.2f}  "
                     + "  ".join(f"{m['step_compute_s'][n] * 1e3:>8.2f}" for n in workers) + "  "
                     + "  ".join(f"{m['overhead_s'][n] * 1e3:>8.2f}" for n in workers))  # fmt: skip
    lines.append("\nK(N) in closed form, ((C - f)/N + f) * max(1, N/cores) * s, against K(N):")
    lines.append(f"{'hidden':>6}  " + "  ".join(f"{f'N={n}':>6}" for n in workers))
    for m in models:
        errors = m["closed_form_error"]
        lines.append(f"{m['hidden']:>6}  " + "  ".join(f"{errors[n]:>+6.0%}" for n in workers))
    lines.append(f"\nsteps/s on one node ({models[0]['cores']} cores), predicted / measured:")
    lines.append(f"{'hidden':>6}  " + "  ".join(f"{f'N={n}':>20}" for n in checked))
    for m in models:
        cells = [f"{m['predicted_steps_per_s'][n]:.1f} / {m['measured_steps_per_s'][n]:.1f} "
                 f"({m['prediction_error'][n]:+.0%})" for n in checked]  # fmt: skip
        lines.append(f"{m['hidden']:>6}  " + "  ".join(f"{cell:>20}" for cell in cells))
    if "host_delay_s" not in models[0]:
        lines.append("\n(no second node in this cluster: no figures across hosts; see "
                     "cluster/local_cluster.py start --netns)")  # fmt: skip
        return "\n".join(lines)
    spread = list(models[0]["two_host_overhead_s"])
    lines.append("\n2 hosts, an idle engine: o(N) ms; d ms; KB per step to / from the other host")
    lines.append(f"{'hidden':>6}  " + "  ".join(f"{f'o({n})':>7}" for n in spread)
                 + f"  {'d':>6}  " + "  ".join(f"{f'N={n}':>15}" for n in spread))  # fmt: skip
    for m in models:
        to, back = m["bytes_to_each_host"], m["bytes_from_each_host"]
        traffic = [f"{to[n] / 1e3:.1f} / {back[n] / 1e3:.1f}" for n in spread]
        lines.append(f"{m['hidden']:>6}  "
                     + "  ".join(f"{m['two_host_overhead_s'][n] * 1e3:>7.2f}" for n in spread)
                     + f"  {m['host_delay_s'] * 1e3:>6.2f}  "
                     + "  ".join(f"{cell:>15}" for cell in traffic))  # fmt: skip
    if "predicted_speedup" in models[0]:
        here = models[0]["bytes_per_s_here"]
        link = f"B_here {here / 1e9:.2f} GB/s" if here else "B_here not fitted"
        lines.append(f"\nd = d0 + bytes / B_here: d0 {models[0]['host_fixed_s'] * 1e3:.2f} ms, "
                     f"{link}")  # fmt: skip
        lines.append(f"predicted speedup on H hosts of {models[0]['cores']} cores each:")
        lines.append(f"{'hidden':>6} {'link':>10}  "
                     + " ".join(f"{f'H={n}':>6}" for n in HOST_COUNTS))  # fmt: skip
        for m in models:
            for name, by_hosts in m["predicted_speedup"].items():
                lines.append(f"{m['hidden']:>6} {name:>10}  "
                             + " ".join(f"{by_hosts[n]:>6.1f}" for n in HOST_COUNTS))  # fmt: skip
    return "\n".join(lines)


def plot_model(models: list[dict]) -> Figure:
    """Predicted (lines) and measured (points) steps/s against actors on one node; and the
    predicted speedup against hosts, when measured across hosts."""
    import matplotlib.pyplot as plt

    figure, (steps_axes, hosts_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    plt.close(figure)  # the caller owns it (see plot.plot_run)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, color in zip(models, colors, strict=False):
        predicted, measured = m["predicted_steps_per_s"], m["measured_steps_per_s"]
        steps_axes.plot(list(predicted), list(predicted.values()), color=color,
                        label=f"hidden {m['hidden']}: predicted")  # fmt: skip
        steps_axes.plot(list(measured), list(measured.values()), "o", color=color,
                        label=f"hidden {m['hidden']}: measured")  # fmt: skip
        for (name, by_hosts), style in zip(m.get("predicted_speedup", {}).items(), ("--", "-"),
                                           strict=False):  # fmt: skip
            hosts_axes.plot(HOST_COUNTS, [by_hosts[n] for n in HOST_COUNTS], style, color=color,
                            label=f"hidden {m['hidden']}, {name}")  # fmt: skip
    workers = list(models[0]["overhead_s"])
    steps_axes.set(xscale="log", yscale="log", xlabel="worker actors on one node",
                   ylabel="steps/s", title=f"one node of {models[0]['cores']} cores")  # fmt: skip
    steps_axes.set_xticks(workers, [str(n) for n in workers])
    steps_axes.legend(fontsize=7)
    if "predicted_speedup" in models[0]:
        hosts_axes.set(xscale="log", xlabel="hosts", ylabel="speedup over one host",
                       title=f"predicted, hosts of {models[0]['cores']} cores")  # fmt: skip
        hosts_axes.set_xticks(HOST_COUNTS, [str(n) for n in HOST_COUNTS])
        hosts_axes.legend(fontsize=7)
    else:
        hosts_axes.set_axis_off()
        hosts_axes.text(0.5, 0.5, "no second node measured", ha="center")
    figure.suptitle(f"distnum bench --model: T(N) = {FORMULA}")
    figure.tight_layout()
    return figure
