"""distnum train: the notebook's MNIST run (4.5.2-4.5.3), its gradient sharded over Ray;
chapter 6's deeper nets and optimizers by option.

Each step the driver draws the minibatch with its own seeded RNG, the workers compute the
central differences of their shards on it, and the driver applies the update (the
chapter's SGD theta -= lr * g, or one of chapter 6's) to the one flat parameter vector.
Every 600 steps (one epoch of 60,000 images in batches of 100, as in the book) and at the
end it measures the accuracy on the whole training and test sets, and writes a checkpoint
from which `--resume` goes on to the same bits as a run never interrupted.

Every way a run ends leaves its folder whole: done (outputs written), stopped by Ctrl-C or
SIGTERM (a checkpoint at the step boundary), a failure (the last checkpoint), killed (the
last checkpoint). `--resume` finishes each of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from distnum import checkpoint as checkpoints
from distnum.data import ImageCodes, has_all_files, load_mnist, locate, shipped_images
from distnum.engines import ENGINES, EngineFactory
from distnum.engines.base import one_blas_thread
from distnum.gradient import DEFAULT_H, check_h, check_h_against
from distnum.models import (
    ACTIVATIONS,
    INIT_NAMES,
    MultiLayerNet,
    ParamLayout,
    check_fits_in_memory,
    default_init_std,
    hidden_setting,
    init_name,
)
from distnum.optimizers import OPTIMIZERS, make_optimizer
from distnum.options import option, resume_hint
from distnum.progress import live_bar
from distnum.run_folder import OutputError, RunFolder, RunFolderError
from distnum.stopping import StopRequests

# the run's own settings: a resumed run keeps them; None in TrainConfig means "not given"
# (lr: the optimizer's default, which for sgd is the notebook's 0.1)
# (weight_init_std: He's "relu" for a ReLU net, models.default_init_std)
DEFAULTS = {"iters": 10000, "batch_size": 100, "lr": 0.1, "hidden": 50,
            "weight_init_std": 0.01, "engine": "fast", "h": DEFAULT_H, "seed": 0,
            "optimizer": "sgd", "activation": "sigmoid", "weight_decay": 0.0}  # fmt: skip
RUN_COPIES = 8  # arrays of the parameters' size a run holds at once, at most
CHECKPOINT_AFTER_S = 60.0  # a checkpoint at least this often, whatever --checkpoint-every
RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9._-]+:\d{1,5}")


@dataclass
class TrainConfig:
    """The notebook's run by default. The run's settings (iters ... seed) left as None take
    their default (DEFAULTS), or on resume the value the run was started with."""

    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    hidden: int | Sequence[int] | None = None  # one number per hidden layer: 50, [100, 100]
    activation: str | None = None  # of the hidden layers: sigmoid or relu
    weight_decay: float | None = None  # the loss adds 0.5 * weight_decay * sum(W ** 2)
    weight_init_std: float | str | None = None  # a number, "relu" (He) or "sigmoid" (Xavier)
    engine: str | EngineFactory | None = None  # "fast", "full", or a factory (layout, indices)
    h: float | None = None
    seed: int | None = None
    optimizer: str | None = None  # sgd, momentum, nesterov, adagrad, rmsprop, adam (chapter 6)
    workers: int | None = None  # None: as many as the CPUs Ray reports
    data_dir: str | None = None
    out: str | None = None  # None: runs/train-<time>
    address: str | None = None  # None: RAY_ADDRESS, else Ray on this machine
    local: bool = False  # compute the gradient in this process, without Ray
    quiet: bool = False
    checkpoint_every: int | None = None  # None: every epoch; always at the end
    resume: bool = False  # go on from the newest valid checkpoint in out
    overwrite: bool = False  # remove the run already in out first
    max_worker_restarts: int = 3


class ConfigError(ValueError):
    """An option that cannot work; the message names it and what to give instead."""


class Diverged(RuntimeError):
    """The loss or a parameter stopped being finite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; the message names the step, the checkpoint and how to go on."""


def check_config(config: TrainConfig) -> None:
    """Every option that can be checked before anything is read or Ray starts."""

    def whole(name: str, low: int) -> None:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):  # fmt: skip
            raise ConfigError(f"{option(name, value)} must be a whole number >= {low}")

    def positive(name: str, example: str, high: float = math.inf) -> None:
        value = getattr(config, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{option(name, value)} is not a number; give one such as "
                              f"{example}")  # fmt: skip
        if not (math.isfinite(value) and 0 < value <= high):
            bound = f" and <= {high:g}" if high < math.inf else ""
            raise ConfigError(f"{option(name, value)} must be finite, > 0{bound}; give one "
                              f"such as {example}")  # fmt: skip

    for name in ("iters", "batch_size", "workers", "checkpoint_every"):
        whole(name, 1)
    whole("seed", 0)
    whole("max_worker_restarts", 0)
    positive("lr", "0.1")
    if not isinstance(config.weight_init_std, str):
        positive("weight_init_std", "0.01")
    elif init_name(config.weight_init_std) not in INIT_NAMES:
        raise ConfigError(f"{option('weight_init_std', config.weight_init_std)} is unknown; "
                          f"give a number such as 0.01, or {', '.join(INIT_NAMES)}")  # fmt: skip
    if config.hidden is not None:
        hidden = config.hidden if isinstance(config.hidden, (list, tuple)) else [config.hidden]
        if not hidden or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                             for n in hidden):  # fmt: skip
            raise ConfigError(f"{option('hidden', config.hidden)} must be whole numbers >= 1, "
                              "one per hidden layer, such as 50 or [100, 100]")  # fmt: skip
    if config.activation is not None and config.activation not in ACTIVATIONS:
        raise ConfigError(f"{option('activation', config.activation)} is unknown; choose one "
                          f"of {', '.join(ACTIVATIONS)}")  # fmt: skip
    decay = config.weight_decay
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, numbers.Real)
                              or not (math.isfinite(decay) and decay >= 0)):  # fmt: skip
        raise ConfigError(f"{option('weight_decay', decay)} must be a finite number >= 0, "
                          "such as 0.1")  # fmt: skip
    if config.h is not None:  # as every function that takes h checks it
        try:
            check_h(config.h)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if config.optimizer is not None and config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"{option('optimizer', config.optimizer)} is unknown; choose one of "
                          f"{', '.join(OPTIMIZERS)}")  # fmt: skip
    engine = config.engine
    if engine is not None and not callable(engine) and engine not in ENGINES:
        raise ConfigError(f"{option('engine', engine)} is unknown; choose one of "
                          f"{', '.join(ENGINES)}")  # fmt: skip
    for name in ("data_dir", "out", "address"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, (str, Path)):
            raise ConfigError(f"{option(name, value)} must be a path or a string")
    if not config.local:
        check_address(config.address)
    if config.resume and config.out is None:
        raise ConfigError(f"{option('resume')} needs the folder of the run to go on with")
    if config.resume and config.overwrite:
        raise ConfigError(f"{option('resume')} and {option('overwrite')} contradict each "
                          "other; give one")  # fmt: skip


def check_address(address: str | None) -> None:
    """The Ray address given, or else RAY_ADDRESS, must look like one."""
    given = address is not None
    if not given:
        address = os.environ.get("RAY_ADDRESS") or None
    if address is not None and not RAY_ADDRESS.fullmatch(address):
        source = option("address", address) if given else f"RAY_ADDRESS={address!r}"
        raise ConfigError(
            f"{source} is not a Ray address; give host:port, "
            "ray://host:port or auto, or leave it out to run Ray on this machine"
        )


def check_checkpoint(checkpoint: checkpoints.Checkpoint) -> None:
    """A checkpoint's settings, and its optimizer's state for them (ValueError if not)."""
    check_settings(checkpoint.settings)
    optimizer = make_optimizer(checkpoint.settings["optimizer"], checkpoint.flat_params.size)
    optimizer.load_state(checkpoint.optimizer_state)


def check_settings(settings: dict) -> None:
    """A run's settings as a checkpoint records them: each present and valid (a custom
    engine is recorded as "custom")."""
    if set(settings) != set(DEFAULTS):
        raise ValueError(f"settings {sorted(settings)} are not {sorted(DEFAULTS)}")
    missing = sorted(name for name, value in settings.items() if value is None)
    if missing:  # None would read as "not given"
        raise ValueError(f"settings {', '.join(missing)} have no value")
    values = {k: v for k, v in settings.items() if k != "engine"}
    check_config(TrainConfig(**values))
    if settings["engine"] not in (*ENGINES, "custom"):
        raise ValueError(f"engine {settings['engine']!r} is unknown")


def resolved(config: TrainConfig, saved: checkpoints.Checkpoint | None,
             out: Path) -> TrainConfig:  # fmt: skip
    """config with every setting given a value: the run's own on resume (an option given
    that contradicts it is an error, except a larger iters, which extends the run), else
    the default."""
    if config.hidden is not None:  # one hidden layer as a number, as the notebook's 50
        config = replace(config, hidden=hidden_setting(config.hidden))
    if isinstance(config.weight_init_std, str):  # "He" as "relu", as the CLI reads it
        config = replace(config, weight_init_std=init_name(config.weight_init_std))
    if saved is None:
        values = {k: v for k, v in DEFAULTS.items() if getattr(config, k) is None}
        if config.lr is None:  # the optimizer's own default rate, as in the book
            values["lr"] = OPTIMIZERS[config.optimizer or DEFAULTS["optimizer"]].default_lr
        if config.weight_init_std is None:
            values["weight_init_std"] = default_init_std(config.activation or "sigmoid")
        return replace(config, **values)
    recorded = saved.settings
    for name in DEFAULTS:
        given = getattr(config, name)
        if given is None or name == "iters" or (name == "engine" and callable(given)):
            continue
        if given != recorded[name] or recorded[name] == "custom":
            raise ConfigError(f"{option(name, given)} does not match the run in {out} "
                              f"({recorded[name]!r}); leave it out to resume that run")  # fmt: skip
    if recorded["engine"] == "custom" and not callable(config.engine):
        raise ConfigError(f"the run in {out} used a custom engine; give it again as "
                          f"{option('engine')}")  # fmt: skip
    values = {name: recorded[name] for name in DEFAULTS if getattr(config, name) is None}
    config = replace(config, **values)
    if config.iters < saved.step:
        raise ConfigError(
            f"the run in {out} is at step {saved.step} already, beyond "
            f"{option('iters', config.iters)}; give a larger one or leave it out"
        )
    return config


class Progress:
    """A live bar over the iterations, with the loss and the steps/s, and a line per epoch
    below it: in Jupyter tqdm's notebook widget, on a terminal its text bar. In logs (stderr
    neither a terminal nor Jupyter's) or when quiet, only the lines per epoch."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        self.bar = live_bar(total, "step", initial=done, quiet=quiet)

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
    """The loss and seconds of every step and the accuracies of every evaluation: kept for
    the checkpoints, and written to metrics.jsonl as they come, from start() on (a run that
    fails before it starts leaves no file)."""

    def __init__(self, path: Path, losses: list, seconds: list, epochs: list) -> None:
        self.path = path
        self.losses, self.seconds, self.epochs = list(losses), list(seconds), list(epochs)
        self.file = None

    def start(self) -> None:
        """Write the file anew from what is kept: a resumed run's has no step after its
        checkpoint."""
        self.file = open(self.path, "w")
        for step, (loss, step_s) in enumerate(zip(self.losses, self.seconds, strict=True), 1):
            self._write({"step": step, "loss": loss, "seconds": step_s})
        for step, epoch, train_acc, test_acc in self.epochs:
            self._write({"step": int(step), "epoch": epoch, "train_acc": train_acc,
                         "test_acc": test_acc})  # fmt: skip
        self.file.flush()

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

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def params_sha256(flat: np.ndarray) -> str:
    """SHA-256 of the flat float64 parameter vector's bytes: one run, one digest."""
    return hashlib.sha256(np.ascontiguousarray(flat, dtype="<f8").tobytes()).hexdigest()


def seeded_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for the initial weights and for the minibatches."""
    weights, batches = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(weights), np.random.default_rng(batches)


def data_sha256(*arrays: np.ndarray) -> str:
    """The identity of a data set: SHA-256 of its arrays' bytes, recorded in checkpoints so
    that a run is never resumed on other data."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def in_background(function: Callable, *args) -> Future:
    """function(*args) computed in a thread, while Ray and the actors start: numpy and
    hashlib let go of the GIL on large arrays. A daemon thread, not a ThreadPoolExecutor's
    (which the interpreter's exit waits for): a run that fails meanwhile exits at once."""
    result: Future = Future()

    def work() -> None:
        try:
            result.set_result(function(*args))
        except BaseException as error:  # raised where the result is asked for
            result.set_exception(error)

    threading.Thread(target=work, name=f"distnum-{function.__name__}", daemon=True).start()
    return result


def shipped_sets(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[ImageCodes | np.ndarray, ImageCodes | np.ndarray]:
    """The training (N, D) and test (M, D) images as they go to the worker actors: their
    uint8 codes, or the rows themselves when they are not pixel values (shipped_images)."""
    return shipped_images(x_train), shipped_images(x_test)


@contextmanager
def writing(out: Path, last_checkpoint: str) -> Iterator[None]:
    """A failed write in OUT (a full disk, a folder gone) as one OutputError that says how
    to go on; the checkpoints are written atomically, so the last one is whole."""
    try:
        yield
    except OSError as error:
        raise OutputError(f"cannot write in {out} ({error.strerror or error}); last checkpoint: "
                          f"{last_checkpoint}; free space or fix the folder, then go on with "
                          f"{resume_hint(out)}") from None  # fmt: skip


def opened(config: TrainConfig, folder: RunFolder,
           saved_ones: checkpoints.Checkpoints) -> checkpoints.Checkpoint | None:  # fmt: skip
    """The checkpoint a run with --resume goes on from; for a new run, None, with OUT made
    ready for it: refused when it holds a run (unless --overwrite), emptied of what a run
    killed before its first checkpoint left."""
    out = folder.out
    if config.resume:
        try:
            saved, note = saved_ones.newest(check_checkpoint)
        except checkpoints.CheckpointError:
            if folder.run_files() and not folder.holds_outputs():
                raise checkpoints.CheckpointError(
                    f"{out} holds no whole checkpoint: its run stopped before its first; "
                    "start it again with the command that started it, without "
                    f"{option('resume')} (that replaces what it left)"
                ) from None
            raise
        if note:
            print(f"distnum: {note}", file=sys.stderr)
        if saved.out is not None and Path(saved.out) != out.resolve():
            print(f"distnum: the checkpoint in {out} was written by the run in "
                  f"{saved.out} (copied or moved here); going on with that run, "
                  f"here, from step {saved.step}", file=sys.stderr)  # fmt: skip
        return saved
    if folder.run_files():
        if not config.overwrite:  # (with it, what is there goes unread)
            if folder.holds_run(check_checkpoint):
                raise RunFolderError(
                    f"{out} holds a run already; go on with it with {resume_hint(out)}"
                    f", or start again there with {option('overwrite')}, or give another "
                    f"{option('out')}"
                )
            print(f"distnum: {out} holds the start of a run that stopped before its "
                  "first checkpoint; starting again there", file=sys.stderr)  # fmt: skip
        folder.remove_run()
    return None


def check_start(config: TrainConfig, net: MultiLayerNet, x_train: np.ndarray,
                t_train: np.ndarray) -> None:  # fmt: skip
    """The weights and the nudge must make sense before anything is computed."""
    flat = net.flat_params
    first_loss = net.loss(x_train[: config.batch_size], t_train[: config.batch_size])
    if not (np.isfinite(flat).all() and math.isfinite(first_loss)):
        raise ConfigError(
            f"{option('weight_init_std', config.weight_init_std)} makes the "
            "initial weights or loss overflow; give one such as 0.01"
        )
    try:
        check_h_against(config.h, flat, "weights")
    except ValueError as error:
        largest = float(np.abs(flat).max())
        if largest > 1e6:  # no net starts with weights this large: their scale is wrong
            raise ConfigError(
                f"{option('weight_init_std', config.weight_init_std)} makes initial "
                f"weights of size {largest:.2g}, next to which {option('h', config.h)} "
                "vanishes; give one such as 0.01"
            ) from None
        raise ConfigError(str(error)) from None


class Run:
    """One training run in its folder: the state a checkpoint holds, and how it is saved."""

    def __init__(self, config: TrainConfig, folder: RunFolder, stop: StopRequests) -> None:
        self.folder, self.out, self.stop = folder, folder.out, stop
        self.started = time.perf_counter()
        self.startup_s: float | None = None  # train() called to the first step: data, Ray, actors
        self.gradient = None  # the loop's: LocalGradient or ShardedGradient
        self.checkpointed = time.monotonic()  # when the last checkpoint was written
        self.checkpoints = checkpoints.Checkpoints(self.out, uuid.uuid4().hex)
        self.saved = opened(config, folder, self.checkpoints)
        self.config = resolved(config, self.saved, self.out)
        self.last_checkpoint = f"step {self.saved.step}" if self.saved else "none yet"

    def load(self) -> None:
        """Read the data, set up the net and the minibatch generator at the checkpoint's
        step (or at step 0), and check what needs the data to check."""
        config, saved = self.config, self.saved
        data_dir = config.data_dir
        if data_dir is None and saved is not None and saved.data_dir is not None:
            data_dir = saved.data_dir if has_all_files(Path(saved.data_dir)) else None
        self.data_dir = str(locate("mnist", data_dir).resolve())
        data = load_mnist(data_dir=self.data_dir)
        (self.x_train, self.t_train), (self.x_test, self.t_test) = data
        # a new run only records the digest (0.9 s for MNIST's float64 arrays): made while
        # Ray and the actors start
        self.data_digest = in_background(data_sha256, self.x_train, self.t_train, self.x_test,
                                         self.t_test)  # fmt: skip
        if saved is not None and saved.data_sha256 != self.data_digest.result():
            raise ConfigError(f"the run in {self.out} learned from other data than "
                              f"{self.data_dir} holds; give the data it was started with as "
                              f"{option('data_dir', saved.data_dir)}")  # fmt: skip
        if config.batch_size > len(self.x_train):
            raise ConfigError(f"{option('batch_size', config.batch_size)} is larger than the "
                              f"training set ({len(self.x_train)} images)")  # fmt: skip
        weight_rng, self.batch_rng = seeded_rngs(config.seed)
        layout = ParamLayout(self.x_train.shape[1], config.hidden, 10)
        try:  # the parameters, a gradient, the optimizer's state, a checkpoint being written
            check_fits_in_memory(layout, RUN_COPIES, option("hidden", config.hidden))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        with np.errstate(over="ignore"):  # check_start says what overflowed, in one line
            self.net = MultiLayerNet(self.x_train.shape[1], config.hidden, 10, config.activation,
                                     config.weight_init_std, config.weight_decay,
                                     weight_rng)  # fmt: skip
        if saved is None:
            with np.errstate(over="ignore", invalid="ignore"):
                check_start(self.config, self.net, self.x_train, self.t_train)
        else:
            if saved.flat_params.shape != self.net.flat_params.shape:
                raise checkpoints.CheckpointError(
                    f"the checkpoint in {self.out} holds {saved.flat_params.size} parameters, "
                    f"not the {self.net.layout.size} of its {self.net.layout.describe()} net"
                )
            self.net.flat_params[:] = saved.flat_params
            self.batch_rng.bit_generator.state = saved.rng_state
        self.optimizer = make_optimizer(config.optimizer, self.net.layout.size, config.lr)
        if saved is not None:  # checked when the checkpoint was read (check_checkpoint)
            self.optimizer.load_state(saved.optimizer_state)
        self.step = saved.step if saved else 0
        self.iter_per_epoch = max(len(self.x_train) // config.batch_size, 1)
        if saved is None:
            self.metrics = Metrics(self.out / "metrics.jsonl", [], [], [])
        else:  # an evaluation at the end of a shorter run is not one of this run's epochs
            epochs = [
                tuple(row)
                for row in saved.epochs.tolist()
                if row[0] % self.iter_per_epoch == 0 or row[0] == self.config.iters
            ]
            self.metrics = Metrics(self.out / "metrics.jsonl", saved.step_losses.tolist(),
                                   saved.step_seconds.tolist(), epochs)  # fmt: skip

    def settings(self) -> dict:
        values = {name: getattr(self.config, name) for name in DEFAULTS}
        values["engine"] = values["engine"] if isinstance(values["engine"], str) else "custom"
        return values

    def save_checkpoint(self) -> None:
        self.checkpointed = time.monotonic()
        with writing(self.out, self.last_checkpoint):
            self.checkpoints.save(checkpoints.Checkpoint(
                self.checkpoints.run_id, self.step, self.net.flat_params,
                self.batch_rng.bit_generator.state, self.settings(), self.data_digest.result(),
                self.data_dir, np.array(self.metrics.losses), np.array(self.metrics.seconds),
                np.array(self.metrics.epochs).reshape(-1, 4), self.optimizer.state(),
                str(self.out.resolve()),
            ))  # fmt: skip
        self.last_checkpoint = f"step {self.step}"

    def stop_if_asked(self) -> None:
        """At a step boundary: on a stop request, checkpoint this step (unless it has one)
        and raise Interrupted."""
        if self.stop.signal_name is None:
            return
        if self.last_checkpoint != f"step {self.step}":
            self.metrics.flush()
            self.save_checkpoint()
        raise Interrupted(
            f"stopped by {self.stop.signal_name} at step {self.step} of {self.config.iters}; "
            f"checkpoint: step {self.step}, in {self.out}; go on with "
            f"{resume_hint(self.out)}"
        )

    def interrupted(self, how: str) -> Interrupted:
        """A stop that could not wait for a checkpoint: how, where, and how to go on."""
        return Interrupted(
            f"{how} at step {self.step} of {self.config.iters}; last checkpoint: "
            f"{self.last_checkpoint}, in {self.out}; go on with {resume_hint(self.out)}"
        )

    def evaluate(self) -> tuple[float, float]:
        """The training and test accuracies at the parameters now: by the worker actors,
        each its share of the samples, or in this process (the same numbers)."""
        net = self.net
        found = None if self.gradient is None else self.gradient.accuracies(net.flat_params)
        if found is not None:
            return found
        return net.accuracy(self.x_train, self.t_train), net.accuracy(self.x_test, self.t_test)

    def loop(self, gradient, progress: Progress) -> float:
        """Steps up to iters; returns the seconds the workers spent computing, at most.

        A step's loss is that of its batch at the parameters it ends with, which the next
        step starts from: so it comes with the next step's gradient, in the same request to
        the actors, except where it is needed at once (an evaluation, a checkpoint, the last
        step, a stop, non-finite parameters)."""
        config, net = self.config, self.net
        checkpoint_every = config.checkpoint_every or self.iter_per_epoch
        compute_s = 0.0
        self.gradient = gradient  # for the evaluations
        owed = None  # the last step's (batch, seconds) while its loss is still to come
        while self.step < config.iters:
            if owed is not None and self.stop.signal_name is not None:
                self.record(gradient.loss(net.flat_params, owed[0]), owed[1], progress)
                owed = None
            self.stop_if_asked()
            step_started = time.perf_counter()
            batch = self.batch_rng.choice(len(self.x_train), config.batch_size)
            grad, seconds, owed_loss = gradient.step(net.flat_params, batch,
                                                     None if owed is None else owed[0])  # fmt: skip
            if owed is not None:
                self.record(owed_loss, owed[1], progress)
            self.optimizer.update(net.flat_params, grad)
            self.step += 1
            compute_s += seconds
            step_s = time.perf_counter() - step_started
            checkpoint = (self.step % checkpoint_every == 0 or self.step == config.iters
                          or time.monotonic() - self.checkpointed > CHECKPOINT_AFTER_S)  # fmt: skip
            evaluation = self.step % self.iter_per_epoch == 0
            if checkpoint or evaluation or not np.isfinite(net.flat_params).all():
                self.record(gradient.loss(net.flat_params, batch), step_s, progress)
                owed = None
            else:
                owed = (batch, step_s)
            if checkpoint:
                self.save_checkpoint()
        return compute_s

    def record(self, loss: float, seconds: float, progress: Progress) -> None:
        """Step self.step's loss, at the parameters it ended with (net.flat_params now): the
        metrics, the bar, and at an epoch's end the accuracies."""
        config, net, metrics = self.config, self.net, self.metrics
        if not (math.isfinite(loss) and np.isfinite(net.flat_params).all()):
            raise Diverged(
                f"diverged at step {self.step}: the loss is {loss} with "
                f"{option('lr', config.lr)}; last good checkpoint: {self.last_checkpoint}, "
                f"in {self.out}; try a smaller {option('lr')}"
            )
        with writing(self.out, self.last_checkpoint):
            metrics.step(self.step, loss, seconds)
            progress.step(loss)
            if self.step % self.iter_per_epoch == 0 or self.step == config.iters:
                epoch = self.step / self.iter_per_epoch
                train_acc, test_acc = self.evaluate()
                metrics.epoch(self.step, epoch, train_acc, test_acc)
                progress.line(
                    f"step {self.step:>6}  epoch {epoch:6.2f}  loss {loss:#.4g}  "
                    f"train_acc {train_acc:.4f}  test_acc {test_acc:.4f}"
                )

    def write_outputs(self, summary: dict, only_missing: bool = False) -> list[str]:
        """params.npz and summary.json, each whole or not at all; returns the names
        written."""
        buffer = io.BytesIO()
        np.savez(buffer, **{name: self.net.params[name] for name in self.net.layout.names})
        outputs = {
            "params.npz": buffer.getvalue(),
            "summary.json": (json.dumps(summary, indent=2) + "\n").encode(),
        }
        if only_missing:
            outputs = {k: v for k, v in outputs.items() if not (self.out / k).exists()}
        with writing(self.out, self.last_checkpoint):
            self.metrics.close()
            for name, data in outputs.items():
                self.folder.write(name, data)
        return list(outputs)

    def summary(self, first_step: int, where: dict, loop_s: float, compute_s: float) -> dict:
        steps_run = self.step - first_step
        final_step, _, train_acc, test_acc = self.metrics.epochs[-1]
        assert final_step == self.step, "a finished run ends with an evaluation"
        return {
            **{
                k: v
                for k, v in asdict(self.config).items()
                if k not in ("quiet", "resume", "overwrite", "engine")
            },  # fmt: skip
            "engine": self.settings()["engine"],
            "architecture": self.net.layout.describe(),
            "params": self.net.layout.size,
            "run_id": self.checkpoints.run_id,
            "data_dir": self.data_dir,
            "data_sha256": self.data_digest.result(),
            **where,
            "resumed_from_step": self.saved.step if self.saved else None,
            "steps_run": steps_run,
            "final_loss": self.metrics.losses[-1],
            "train_acc": train_acc,
            "test_acc": test_acc,
            "wall_s": time.perf_counter() - self.started,
            "startup_s": self.startup_s,
            "loop_s": loop_s,
            "steps_per_s": steps_run / loop_s if steps_run else None,
            "mean_compute_s": compute_s / steps_run if steps_run else None,
            "params_sha256": params_sha256(self.net.flat_params),
            "out": str(self.out),
        }

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()


def make_gradient(run: Run):
    """LocalGradient, or ShardedGradient over Ray (connecting first); and whether this call
    started Ray (so must shut it down)."""
    from distnum.distributed import (
        LocalGradient,
        ShardedGradient,
        connect,
        default_workers,
        disconnect,
        worker_count_note,
    )

    config, net = run.config, run.net
    if config.local:
        return LocalGradient(net.layout, config.engine, config.h, run.x_train, run.t_train), False
    shipped = in_background(shipped_sets, run.x_train, run.x_test)  # 0.9 s, while Ray starts
    owns_ray = connect(config.address)
    try:
        workers = config.workers or default_workers()
        try:
            note = worker_count_note(workers, net.layout)
        except ValueError as error:
            raise ConfigError(f"{option('workers', workers)}: {error}") from None
        if note:
            print(f"distnum: {note}", file=sys.stderr)
        x_train, x_test = shipped.result()
        gradient = ShardedGradient(net.layout, config.engine, config.h, x_train, run.t_train,
                                   workers, config.max_worker_restarts,
                                   batch_size=config.batch_size, x_test=x_test,
                                   t_test=run.t_test)  # fmt: skip
    except BaseException:
        disconnect(owns_ray)
        raise
    return gradient, owns_ray


def train(config: TrainConfig | None = None, **options) -> dict:
    """Run the training, write OUT/metrics.jsonl, OUT/params.npz, OUT/summary.json and the
    checkpoints, and return the summary. Options are TrainConfig's fields.

    Raises ConfigError, RunFolderError, CheckpointError, DataError (bad input, nothing
    started), Diverged, WorkerFailed, OutputError (the last checkpoint kept), Interrupted
    (Ctrl-C or SIGTERM: a checkpoint written). The Ray this call starts it shuts down; a
    Ray the caller started is left running, with no actor of this run."""
    if config is not None and options:
        raise TypeError("give a TrainConfig or options, not both")
    config = config if config is not None else TrainConfig(**options)
    check_config(config)
    out = Path(config.out or time.strftime("runs/train-%Y%m%d-%H%M%S"))
    folder = RunFolder(out)
    with StopRequests() as stop:
        folder.claim()
        try:
            run = Run(config, folder, stop)
            try:
                return finish(run)
            except KeyboardInterrupt as interrupt:  # a second signal, while finish ended
                if isinstance(interrupt, Interrupted):
                    raise
                raise run.interrupted("stopped by a second signal") from None
            finally:
                run.close()
        finally:
            folder.release()


def finish(run: Run) -> dict:
    """Load, connect, loop, write the outputs: the body of train()."""
    config = run.config
    run.load()
    run.folder.mark_running()  # the run is taken: every check of its input has passed
    first_step = run.step
    if first_step == config.iters:  # a finished run resumed: its outputs made again
        summary = run.summary(first_step, {"local": config.local}, 0.0, 0.0)
        if not run.metrics.path.exists():
            with writing(run.out, run.last_checkpoint):
                run.metrics.start()
        written = run.write_outputs(summary, only_missing=True)
        outputs = f"wrote its missing {', '.join(written)}" if written else "its outputs are there"
        print(f"the run in {run.out} is complete at step {run.step}: {outputs}; give a larger "
              f"{option('iters')} to go on", flush=True)  # fmt: skip
        return summary
    if run.saved is not None:
        print(f"resumed from step {first_step} of {config.iters} in {run.out}", flush=True)
    run.stop_if_asked()
    gradient, owns_ray, progress = None, False, None
    try:
        # one BLAS thread: idle OpenBLAS threads spin, on the cores the workers need;
        # overflow shows as a non-finite loss or parameter, which ends the run: no warnings
        with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
            try:
                gradient, owns_ray = make_gradient(run)
            except Exception:
                run.stop_if_asked()  # Ray's start cut short by the stop: report the stop
                raise
            run.stop_if_asked()
            if gradient.actors_per_node:  # where the actors run, for a job's logs
                nodes = ", ".join(f"{node}: {n}" for node, n in gradient.actors_per_node.items())
                print(f"{gradient.num_workers} worker actors; per node: {nodes}", flush=True)
            with writing(run.out, run.last_checkpoint):
                run.metrics.start()
            # the bar from here: its steps/s are the loop's, as the summary's and the last line's
            progress = Progress(config.iters, first_step, config.quiet)
            loop_started = time.perf_counter()
            run.startup_s = loop_started - run.started
            compute_s = run.loop(gradient, progress)
            loop_s = time.perf_counter() - loop_started
    except Exception as error:
        # a worker's failure: one line, and where the run can go on from (a run in this
        # process never imports distnum.distributed, and so Ray, and has no worker to fail)
        distributed = sys.modules.get("distnum.distributed")
        if distributed is not None and isinstance(error, distributed.WorkerFailed):
            raise distributed.WorkerFailed(
                f"{error}; last checkpoint: {run.last_checkpoint}, in {run.out}; go on with "
                f"{resume_hint(run.out)}"
            ) from None
        raise
    except KeyboardInterrupt as interrupt:  # a second signal, or Ctrl-C outside our handler
        if isinstance(interrupt, Interrupted):
            raise
        raise run.interrupted("interrupted") from None
    finally:
        if progress is not None:
            progress.close()
        if gradient is not None:
            gradient.close()
        if owns_ray:
            from distnum.distributed import disconnect

            disconnect(owns_ray)
    where = {"local": config.local, "workers": gradient.num_workers,
             "actors_per_node": gradient.actors_per_node,
             "worker_restarts": gradient.restarts,
             "transport": gradient.transport}  # fmt: skip
    summary = run.summary(first_step, where, loop_s, compute_s)
    run.write_outputs(summary)
    if run.stop.signal_name is not None:
        raise Interrupted(f"stopped by {run.stop.signal_name} after the last step; the run is "
                          f"complete, its outputs in {run.out}")  # fmt: skip
    return summary
