"""What a training step costs on N worker actors, measured and predicted (`distnum bench
--model`):

    T(N) = ((C - f) / N + f) * max(1, N / cores) * s  +  o(N, P, bandwidth)  +  q(N)

- C: one worker's compute for the whole gradient of a batch (its slice and its rows of the
  previous step's loss), measured with the fast engine and 1 actor;
- f: what every actor computes whatever its shard's size: the batch's forward pass and its
  distinct pixel values, measured as the fast engine's time for a shard of one W1 entry;
- s: how much slower each of `cores` processes computes when all compute at once (shared
  caches, memory bandwidth, hyperthreads), measured with the engine in plain processes;
  1 for one actor. More actors than cores share them: the max(1, N / cores);
- o: the rest of the step, measured with an engine that computes nothing (BusyEngine, 0 s), for
  N actors on the driver's node, and on 2 hosts when the cluster has a second node;
- q: what more actors than cores lose to sharing them, beyond their compute: each wakes at
  once and waits for a core, and a short burst of compute (a few ms at hidden 50) is no
  longer than the scheduler's time slices. Measured with an engine that keeps its core
  busy for each actor's time, (C - f) / N + f, and computes nothing (BusyEngine): its step
  time minus that compute shared among the cores and minus o(N). 0 for N <= cores.

Across H hosts of c cores each (hosts like this machine), the driver sends each other host
one copy of the parameters (8P bytes) and receives its slice (8P / H), one host after the
other through its own link of bandwidth B:

    T_H = ((C - f) / (H * c) + f) * s + o(c) + (H - 1) * (d0 + (8P + 8P / H) / B)

where d0 is what one more host adds to a step beyond its bytes. Measured: d, o on 2 hosts
minus o on one node (one actor each), for each hidden size; d = d0 + bytes / B_here fitted
over the hidden sizes gives d0 and the bandwidth between the hosts measured (B_here).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from distnum.bench import BusyEngine, bench_workers, median_seconds, whole_gradient
from distnum.distributed import cluster_nodes
from distnum.engines import FastEngine
from distnum.models import ParamLayout, TwoLayerNet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMULA = "((C - f)/N + f) * max(1, N/cores) * s + o(N) + q(N)"
OVERHEAD_WORKERS = [1, 2, 4, 8, 16]  # o and q measured
CHECKED_UP_TO = 8  # up to so many actors, steps measured with the fast engine too
SLOWDOWN_SECONDS = 2.0  # each engine process's run, alone and all together
HOST_COUNTS = [1, 2, 4, 8, 16, 32, 64]
BANDWIDTHS = {"10 Gbit/s": 10e9 / 8, "25 Gbit/s": 25e9 / 8}  # bytes per second


def fixed_seconds(x: np.ndarray, labels: np.ndarray, net: TwoLayerNet, h: float) -> float:
    """f: the fast engine's median time for a shard of one W1 entry."""
    engine = FastEngine(net.layout, np.array([0]))
    engine(net.flat_params, x, labels, h)  # compiled, or loaded from numba's cache
    return median_seconds(lambda: engine(net.flat_params, x, labels, h), 20)


def gradient_seconds(layout: ParamLayout, flat: np.ndarray, x: np.ndarray, labels: np.ndarray,
                     h: float, duration_s: float) -> list[float]:  # fmt: skip
    """Seconds of each whole fast gradient computed in duration_s (in a process of its own)."""
    gradient = whole_gradient(layout, flat, x, labels, h)
    times: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end or len(times) < 3:
        started = time.perf_counter()
        gradient()
        times.append(time.perf_counter() - started)
    return times


def parallel_slowdown(x: np.ndarray, labels: np.ndarray, net: TwoLayerNet, h: float,
                      processes: int, duration_s: float) -> float:  # fmt: skip
    """s: a fast gradient's median time with `processes` processes computing at once, over
    its time alone."""
    context = multiprocessing.get_context("spawn")
    medians = []
    for count in (1, processes):
        with concurrent.futures.ProcessPoolExecutor(count, mp_context=context) as pool:
            runs = [pool.submit(gradient_seconds, net.layout, net.flat_params, x, labels, h,
                                duration_s) for _ in range(count)]  # fmt: skip
            # the middle of each run, when all were computing: not their starts and ends
            times = np.concatenate([np.array(run.result())[1:-1] for run in runs])
        medians.append(float(np.median(times)))
    return medians[1] / medians[0]


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
    checked = bench_workers(x_train, t_train, checked_workers, nodes=[here], **common)
    idle = bench_workers(x_train, t_train, workers, engine=BusyEngine, nodes=[here], **common)
    batch = np.random.default_rng(seed).choice(len(x_train), batch_size)
    report = {
        "hidden": hidden,
        "params": checked[0]["params"],
        "cores": cores,
        "compute_s": checked[0]["median_compute_s"],
        "fixed_s": fixed_seconds(x_train[batch], t_train[batch], net, h),
        "slowdown": parallel_slowdown(
            x_train[batch], t_train[batch], net, h, cores, SLOWDOWN_SECONDS
        ),  # fmt: skip
        "overhead_s": {r["workers"]: r["median_overhead_s"] for r in idle},
        "measured_steps_per_s": {r["workers"]: r["steps_per_s"] for r in checked},
    }
    report["sharing_s"] = {n: 0.0 for n in workers}
    for n in (n for n in workers if n > cores):
        burst = actor_seconds(report, n)
        (busy,) = bench_workers(x_train, t_train, [n], engine=partial(BusyEngine, seconds=burst),
                                nodes=[here], **common)  # fmt: skip
        shared = burst * n / cores + report["overhead_s"][n]
        report["sharing_s"][n] = max(busy["median_step_s"] - shared, 0.0)
    if others:
        workers = sorted(set(workers) | {2})
        two = bench_workers(x_train, t_train, [n for n in workers if n > 1], engine=BusyEngine,
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


def step_seconds(model: dict, workers: int) -> float:
    """T(N) on one node."""
    contention = model["slowdown"] if workers > 1 else 1.0
    shared = max(1.0, workers / model["cores"]) * contention
    return (actor_seconds(model, workers) * shared + model["overhead_s"][workers]
            + model["sharing_s"][workers])  # fmt: skip


def host_step_seconds(model: dict, hosts: int, bandwidth: float) -> float:
    """T_H: hosts of `cores` cores each, one actor per core, the driver's link at bandwidth
    bytes per second."""
    cores, params_bytes, fixed = model["cores"], 8 * model["params"], model["fixed_s"]
    contention = model["slowdown"] if hosts * cores > 1 else 1.0
    compute = ((model["compute_s"] - fixed) / (hosts * cores) + fixed) * contention
    per_host = model["host_fixed_s"] + (params_bytes + params_bytes / hosts) / bandwidth
    return compute + model["overhead_s"][cores] + (hosts - 1) * per_host


def speedup(model: dict, hosts: int, bandwidth: float) -> float:
    return host_step_seconds(model, 1, bandwidth) / host_step_seconds(model, hosts, bandwidth)


def format_model(models: list[dict]) -> str:
    workers, checked = list(models[0]["overhead_s"]), list(models[0]["measured_steps_per_s"])
    sharing = [n for n in workers if n > models[0]["cores"]]
    lines = [f"the cost model, T(N) = {FORMULA}:",
             f"{'hidden':>6} {'params':>8} {'C ms':>7} {'f ms':>6} {'s':>5}  "
             + "  ".join(f"{f'o({n}) ms':>8}" for n in workers) + "  "
             + "  ".join(f"{f'q({n}) ms':>8}" for n in sharing)]  # fmt: skip
    for m in models:
        lines.append(f"{m['hidden']:>6} {m['params']:>8} {m['compute_s'] * 1e3:>7.2f} "
                     f"{m['fixed_s'] * 1e3:>6.2f} {m['slowdown']:>5.2f}  "
                     + "  ".join(f"{m['overhead_s'][n] * 1e3:>8.2f}" for n in workers) + "  "
                     + "  ".join(f"{m['sharing_s'][n] * 1e3:>8.2f}" for n in sharing))  # fmt: skip
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
