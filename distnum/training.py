"""distnum train: the notebook's MNIST run (4.5.2-4.5.3), its gradient sharded over Ray.

Each step the driver draws the minibatch with its own seeded RNG, the workers compute the
central differences of their shards on it, and the driver applies the SGD update
theta -= lr * g to the one flat parameter vector. Every 600 steps (one epoch of 60,000
images in batches of 100, as in the book) and at the end it measures the accuracy on the
whole training and test sets, and writes a checkpoint from which `--resume` goes on to the
same bits as a run never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import auto as tqdm_auto

from distnum import checkpoint as checkpoints
from distnum.data import load_mnist
from distnum.distributed import LocalGradient, ShardedGradient, connect
from distnum.engines import ENGINES, EngineFactory
from distnum.engines.base import one_blas_thread
from distnum.gradient import DEFAULT_H, check_h
from distnum.models import PARAM_NAMES, TwoLayerNet

# what must stay as it was for a resumed run to be the same run
SETTINGS = ("batch_size", "lr", "hidden", "weight_init_std", "engine", "h", "seed")


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
    checkpoint_every: int | None = None  # None: every epoch; always at the end
    resume: bool = False  # go on from the newest valid checkpoint in out
    max_worker_restarts: int = 3


class ConfigError(ValueError):
    """An option that cannot work; the message names it and what to give instead."""


class Diverged(RuntimeError):
    """The loss or a parameter stopped being finite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; the message names the step and the outputs."""


def check_config(config: TrainConfig) -> None:
    """Every option that can be checked before the data is read and Ray starts."""

    def whole(name: str, low: int = 1) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be a whole number "
                              f">= {low}")  # fmt: skip

    for name in ("iters", "batch_size", "hidden", "max_worker_restarts"):
        whole(name, 0 if name == "max_worker_restarts" else 1)
    for name in ("workers", "checkpoint_every"):
        if getattr(config, name) is not None:
            whole(name)
    try:
        lr = float(config.lr)
    except (TypeError, ValueError):
        raise ConfigError(f"--lr {config.lr!r} is not a number; give one > 0, e.g. 0.1") from None
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {config.lr!r} must be finite and > 0, e.g. 0.1")
    try:
        check_h(config.h)
    except ValueError as error:
        raise ConfigError(f"--h: {error}") from None
    if not callable(config.engine) and config.engine not in ENGINES:
        raise ConfigError(f"--engine {config.engine!r} is unknown; choose one of "
                          f"{', '.join(ENGINES)}")  # fmt: skip
    if config.out is not None and Path(config.out).exists() and not Path(config.out).is_dir():
        raise ConfigError(f"--out {config.out} is a file; give a folder (new or existing)")
    if config.resume and config.out is None:
        raise ConfigError("--resume needs the folder of the run to go on with")


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
    """A live bar over the iterations, with the loss and the steps/s, and a line per epoch
    below it: in Jupyter tqdm's notebook widget, on a terminal its text bar. In logs (stderr
    neither a terminal nor Jupyter's) or when quiet, only the lines per epoch."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        # tqdm.auto takes the widget inside a Jupyter kernel (with ipywidgets), where stderr is
        # no terminal but a bar is still seen live
        in_jupyter = tqdm_auto.notebook_tqdm is not tqdm_auto.std_tqdm
        live = not quiet and (in_jupyter or sys.stderr.isatty())
        self.bar = tqdm_auto.tqdm(total=total, initial=done, unit="step", dynamic_ncols=True,
                                  disable=not live)  # fmt: skip

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


class Metrics:
    """The loss and seconds of every step and the accuracies of every epoch: kept for the
    checkpoints, and written to metrics.jsonl as they come."""

    def __init__(self, path: Path, losses: list, seconds: list, epochs: list) -> None:
        self.losses, self.seconds, self.epochs = list(losses), list(seconds), list(epochs)
        self.file = open(path, "w")  # rewritten from the checkpoint: no steps after it
        for step, (loss, step_s) in enumerate(zip(self.losses, self.seconds, strict=True), 1):
            self._write({"step": step, "loss": loss, "seconds": step_s})
        for step, epoch, train_acc, test_acc in self.epochs:
            self._write({"step": int(step), "epoch": epoch, "train_acc": train_acc,
                         "test_acc": test_acc})  # fmt: skip

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def step(self, step: int, loss: float, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds.append(seconds)
        self._write({"step": step, "loss": loss, "seconds": seconds})

    def epoch(self, step: int, epoch: float, train_acc: float, test_acc: float) -> None:
        self.epochs.append((step, epoch, train_acc, test_acc))
        self._write({"step": step, "epoch": epoch, "train_acc": train_acc,
                     "test_acc": test_acc})  # fmt: skip
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def restore(config: TrainConfig, out: Path) -> tuple[TrainConfig, checkpoints.Checkpoint]:
    """The newest valid checkpoint in out, and config with the run's own settings."""
    saved, skipped = checkpoints.newest(out)
    for note in skipped:
        print(f"distnum: skipping a damaged checkpoint: {note}", file=sys.stderr)
    defaults = TrainConfig()
    resumed = [name for name in SETTINGS if saved.settings[name] != "custom"]  # custom engines
    for name in resumed:
        given, recorded = getattr(config, name), saved.settings[name]
        if given != getattr(defaults, name) and given != recorded:
            raise ConfigError(f"--{name.replace('_', '-')} {given} does not match the run in "
                              f"{out} ({recorded}); leave it out to resume that run")  # fmt: skip
    config = dataclasses.replace(config, **{name: saved.settings[name] for name in resumed})
    if saved.step >= config.iters:
        raise ConfigError(f"the run in {out} is at step {saved.step} already; give --iters "
                          f"above {saved.step} to go on")  # fmt: skip
    return config, saved


def train(config: TrainConfig | None = None, **options) -> dict:
    """Run the training, write OUT/metrics.jsonl, OUT/params.npz, OUT/summary.json and the
    checkpoints, and return the summary. Options are TrainConfig's fields."""
    config = config or TrainConfig(**options)
    check_config(config)
    started = time.perf_counter()
    out = Path(config.out or time.strftime("runs/train-%Y%m%d-%H%M%S"))
    saved = None
    if config.resume:
        config, saved = restore(config, out)
    (x_train, t_train), (x_test, t_test) = load_mnist(data_dir=config.data_dir)
    if config.batch_size > len(x_train):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                          f"({len(x_train)} images)")  # fmt: skip
    weight_rng, batch_rng = seeded_rngs(config.seed)
    net = TwoLayerNet(x_train.shape[1], config.hidden, 10, config.weight_init_std, weight_rng)
    first_step = 1
    if saved is not None:
        if saved.flat_params.shape != net.flat_params.shape:
            raise checkpoints.CheckpointError(
                f"the checkpoint in {out} holds {saved.flat_params.size} parameters, not the "
                f"{net.layout.size} of a 784-{config.hidden}-10 net; check --hidden"
            )
        net.flat_params[:] = saved.flat_params
        batch_rng.bit_generator.state = saved.rng_state
        first_step = saved.step + 1
    out.mkdir(parents=True, exist_ok=True)

    owns_ray = False
    if config.local:
        gradient = LocalGradient(net.layout, config.engine, config.h, x_train, t_train)
    else:
        owns_ray = connect(config.address)
        import ray

        workers = config.workers or int(ray.cluster_resources().get("CPU", 1))
        gradient = ShardedGradient(net.layout, config.engine, config.h, x_train, t_train,
                                   workers, config.max_worker_restarts)  # fmt: skip
    iter_per_epoch = max(len(x_train) // config.batch_size, 1)
    checkpoint_every = config.checkpoint_every or iter_per_epoch
    settings = {name: getattr(config, name) for name in SETTINGS if name != "engine"}
    settings["engine"] = config.engine if isinstance(config.engine, str) else "custom"
    progress = Progress(config.iters, first_step - 1, config.quiet)
    if saved is None:
        metrics = Metrics(out / "metrics.jsonl", [], [], [])
    else:  # an evaluation at the end of the interrupted run is not one of this run's epochs
        epochs = [tuple(row) for row in saved.epochs if row[0] % iter_per_epoch == 0]
        metrics = Metrics(out / "metrics.jsonl", saved.step_losses, saved.step_seconds, epochs)
    last_checkpoint = f"step {saved.step}" if saved else "none yet"
    step = first_step - 1
    compute_s = 0.0
    stop = StopRequests()
    try:
        # one BLAS thread: idle OpenBLAS threads spin, on the cores the workers need
        # overflow shows as a non-finite loss or parameter, which ends the run: no warnings
        with stop, one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
            loop_started = time.perf_counter()
            for step in range(first_step, config.iters + 1):
                if stop.signal_name:
                    raise Interrupted(
                        f"stopped by {stop.signal_name} after step {step - 1} of "
                        f"{config.iters}; last checkpoint: {last_checkpoint}, in {out}; "
                        f"go on with --resume {out}"
                    )
                step_started = time.perf_counter()
                batch = batch_rng.choice(len(x_train), config.batch_size)
                grad, seconds = gradient(net.flat_params, batch)
                net.flat_params -= config.lr * grad
                loss = net.loss(x_train[batch], t_train[batch])
                if not (math.isfinite(loss) and np.isfinite(net.flat_params).all()):
                    raise Diverged(
                        f"diverged at step {step}: the loss is {loss} with --lr {config.lr}; "
                        f"last good checkpoint: {last_checkpoint}, in {out}; try a smaller --lr"
                    )
                compute_s += seconds
                metrics.step(step, loss, time.perf_counter() - step_started)
                progress.step(loss)
                if step % iter_per_epoch == 0 or step == config.iters:
                    train_acc = net.accuracy(x_train, t_train)
                    test_acc = net.accuracy(x_test, t_test)
                    metrics.epoch(step, step / iter_per_epoch, train_acc, test_acc)
                    progress.line(f"step {step:>6}  epoch {step / iter_per_epoch:6.2f}  "
                                  f"loss {loss:.4g}  train_acc {train_acc:.4f}  "
                                  f"test_acc {test_acc:.4f}")  # fmt: skip
                if step % checkpoint_every == 0 or step == config.iters:
                    checkpoints.save(out, checkpoints.Checkpoint(
                        step, net.flat_params, batch_rng.bit_generator.state, settings,
                        np.array(metrics.losses), np.array(metrics.seconds),
                        np.array(metrics.epochs).reshape(-1, 4),
                    ))  # fmt: skip
                    last_checkpoint = f"step {step}"
            loop_s = time.perf_counter() - loop_started
    except KeyboardInterrupt as interrupt:
        if isinstance(interrupt, Interrupted):
            raise
        raise Interrupted(
            f"interrupted at step {step} of {config.iters}; last checkpoint: "
            f"{last_checkpoint}, in {out}; go on with --resume {out}"
        ) from None
    finally:
        metrics.close()
        progress.close()
        gradient.close()
        if owns_ray:
            import ray

            ray.shutdown()

    np.savez(out / "params.npz", **{name: net.params[name] for name in PARAM_NAMES})
    steps_run = config.iters - first_step + 1
    summary = {
        **{k: v for k, v in asdict(config).items() if k not in ("quiet", "resume")},
        "engine": settings["engine"],
        "resumed_from_step": saved.step if saved else None,
        "workers": gradient.num_workers,
        "actors_per_node": gradient.actors_per_node,
        "worker_restarts": getattr(gradient, "restarts", 0),
        "final_loss": loss,
        "train_acc": train_acc,
        "test_acc": test_acc,
        "wall_s": time.perf_counter() - started,
        "loop_s": loop_s,
        "steps_per_s": steps_run / loop_s,
        "mean_compute_s": compute_s / steps_run,
        "params_sha256": params_sha256(net.flat_params),
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
