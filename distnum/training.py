"""distnum train: the notebook's MNIST run (4.5.2-4.5.3), its gradient sharded over Ray.

Each step the driver draws the minibatch with its own seeded RNG, the workers compute the
central differences of their shards on it, and the driver applies the SGD update
theta -= lr * g to the one flat parameter vector. Every 600 steps (one epoch of 60,000
images in batches of 100, as in the book) and at the end it measures the accuracy on the
whole training and test sets.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from distnum.data import load_mnist
from distnum.distributed import LocalGradient, ShardedGradient, connect
from distnum.engines import EngineFactory
from distnum.engines.base import one_blas_thread
from distnum.gradient import DEFAULT_H
from distnum.models import PARAM_NAMES, TwoLayerNet


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the step and where the metrics are."""


@dataclass
class TrainConfig:
    """The notebook's run by default."""

    iters: int = 10000
    batch_size: int = 100
    lr: float = 0.1
    hidden: int = 50
    weight_init_std: float = 0.01
    workers: int | None = None  # None: as many as the CPUs Ray reports
    engine: str | EngineFactory = "fast"  # a name, or a factory (layout, indices) -> engine
    h: float = DEFAULT_H
    seed: int = 0
    data_dir: str | None = None
    out: str | None = None  # None: runs/train-<time>
    address: str | None = None  # None: RAY_ADDRESS, else Ray on this machine
    local: bool = False  # compute the gradient in this process, without Ray
    quiet: bool = False


def params_sha256(flat: np.ndarray) -> str:
    """SHA-256 of the flat float64 parameter vector's bytes: one run, one digest."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f8").tobytes()).hexdigest()


def seeded_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the initial weights and for the minibatches."""
    weights, batches = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(weights), np.random.default_rng(batches)


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step in flight, so that
    no Ray call is cut in half; a second one stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.request)
        return self

    def request(self, number: int, frame: object) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Progress:
    """A tqdm bar over iterations on a terminal; otherwise (or quiet) a line per epoch."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True,
                        disable=quiet or not sys.stderr.isatty())  # fmt: skip

    def step(self, loss: float) -> None:
        self.bar.update(1)
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def line(self, text: str) -> None:
        if self.bar.disable:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def train(config: TrainConfig | None = None, **options) -> dict:
    """Run the training, write OUT/metrics.jsonl, OUT/params.npz and OUT/summary.json, and
    return the summary. Options are TrainConfig's fields."""
    config = config or TrainConfig(**options)
    started = time.perf_counter()
    out = Path(config.out or time.strftime("runs/train-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=config.data_dir)

    weight_rng, batch_rng = seeded_rngs(config.seed)
    net = TwoLayerNet(x_train.shape[1], config.hidden, 10, config.weight_init_std, weight_rng)
    owns_ray = False
    if config.local:
        gradient = LocalGradient(net.layout, config.engine, config.h, x_train, t_train)
    else:
        owns_ray = connect(config.address)
        import ray

        workers = config.workers or int(ray.cluster_resources().get("CPU", 1))
        gradient = ShardedGradient(net.layout, config.engine, config.h, x_train, t_train,
                                   workers)  # fmt: skip
    iter_per_epoch = max(len(x_train) // config.batch_size, 1)
    progress = Progress(config.iters, config.quiet)
    step = 0
    compute_s = 0.0
    stop = StopRequests()
    try:
        # one BLAS thread: idle OpenBLAS threads spin, on the cores the workers need
        with stop, one_blas_thread(), open(out / "metrics.jsonl", "w") as metrics:
            loop_started = time.perf_counter()
            for step in range(1, config.iters + 1):
                if stop.signal_name:
                    raise Interrupted(
                        f"stopped by {stop.signal_name} after step {step - 1} of "
                        f"{config.iters}; metrics so far in {out}"
                    )
                step_started = time.perf_counter()
                batch = batch_rng.choice(len(x_train), config.batch_size)
                grad, seconds = gradient(net.flat_params, batch)
                net.flat_params -= config.lr * grad
                loss = net.loss(x_train[batch], t_train[batch])
                compute_s += seconds
                record = {"step": step, "loss": loss,
                          "seconds": time.perf_counter() - step_started}  # fmt: skip
                metrics.write(json.dumps(record) + "\n")
                progress.step(loss)
                if step % iter_per_epoch == 0 or step == config.iters:
                    train_acc = net.accuracy(x_train, t_train)
                    test_acc = net.accuracy(x_test, t_test)
                    metrics.write(
                        json.dumps(
                            {
                                "step": step,
                                "epoch": step / iter_per_epoch,
                                "train_acc": train_acc,
                                "test_acc": test_acc,
                            }
                        )
                        + "\n"
                    )
                    metrics.flush()
                    progress.line(f"step {step:>6}  epoch {step / iter_per_epoch:6.2f}  "
                                  f"loss {loss:.4f}  train_acc {train_acc:.4f}  "
                                  f"test_acc {test_acc:.4f}")  # fmt: skip
            loop_s = time.perf_counter() - loop_started
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Interrupted):
            raise
        raise Interrupted(
            f"interrupted at step {step} of {config.iters}; metrics so far in {out}"
        ) from None
    finally:
        progress.close()
        gradient.close()
        if owns_ray:
            import ray

            ray.shutdown()

    np.savez(out / "params.npz", **{name: net.params[name] for name in PARAM_NAMES})
    summary = {
        **{k: v for k, v in asdict(config).items() if k not in ("quiet",)},
        "workers": gradient.num_workers,
        "actors_per_node": gradient.actors_per_node,
        "final_loss": loss,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "wall_s": time.perf_counter() - started,
        "loop_s": loop_s,
        "steps_per_s": config.iters / loop_s,
        "mean_compute_s": compute_s / config.iters,
        "params_sha256": params_sha256(net.flat_params),
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
