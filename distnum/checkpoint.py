"""Checkpoints: everything a run needs to go on bit for bit, written so that a crash at any
moment leaves the previous checkpoint whole, and read back trusting nothing.

A checkpoint of step S is two files in OUT/checkpoints:
    step-000000S.npz   the flat parameters, the optimizer's state and the metrics so far,
                       plain arrays (no pickle)
    step-000000S.json  the manifest: the run's id, step, the minibatch RNG's state, the run's
                       settings, the data set's digest, the SHA-256 of the .npz and one of the
                       manifest itself; written last, so that a checkpoint without one does
                       not exist
Each file is written to a temporary name, flushed to disk (fsync) and renamed into place.

Reading back, every field is checked (types, ranges, shapes, checksums); a manifest that
fails any check is skipped for the newest older one that passes. Clean-up removes only
checkpoints of this run, chosen by their parsed step, never the newest.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = 2
# the fast engine's arithmetic, whose bits a resumed run must go on with: 2 is the delta form
# (distnum 0.2), 3 the same with the first hidden layer's pre-activations exact at ReLU's
# kinks (distnum 0.3: the bits of 2 for a sigmoid net); a checkpoint without it was computed
# by the earlier fast engine (distnum 0.1)
FAST_ENGINE = 3
OPTIMIZER_PREFIX = "optimizer_"  # the optimizer's arrays in the .npz, by their state names
KEEP = 2  # the newest checkpoints of a run kept; older ones go once a newer one is whole
MANIFEST_NAME = re.compile(r"step-(\d{7,})\.json")
TEMPORARY_NAME = re.compile(
    r"\.step-\d{7,}\.(json|npz)\..+\.tmp"
)  # write_atomically's, left by a kill
MAX_MANIFEST_BYTES = 1 << 20  # a real one is about 2 KB; more is not a manifest of ours
MAX_STEP = 10**15
UMASK = os.umask(0o022)
os.umask(UMASK)


class CheckpointError(Exception):
    """No usable checkpoint; the message names the file, the fault and what to do."""


@dataclass
class Checkpoint:
    run_id: str  # one per run, kept across --resume: which checkpoints are this run's
    step: int
    flat_params: np.ndarray  # (size,) float64, finite
    rng_state: dict  # numpy's bit_generator.state of the minibatch generator (PCG64)
    settings: dict  # the run's options that a resumed run keeps
    data_sha256: str  # the training and test sets the run learns from
    data_dir: str | None  # where they were read from (resolved), for a resume that gives none
    step_losses: np.ndarray  # (step,) loss after each step
    step_seconds: np.ndarray  # (step,)
    epochs: np.ndarray  # (E, 4): step, epoch, train_acc, test_acc
    # the optimizer's state vectors and its "iterations" (see distnum/optimizers.py)
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    out: str | None = None  # the run's folder (resolved) when it was written


def directory(out: Path) -> Path:
    return Path(out) / "checkpoints"


def stem(step: int) -> str:
    return f"step-{step:07d}"


def write_atomically(path: Path, data: bytes) -> None:
    """path holds data whole, or is as it was: a temporary file, fsync, rename. An OSError
    (disk full, say) leaves no temporary file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_fast_engine(path: Path, manifest: dict) -> None:
    """A fast-engine run goes on only with the arithmetic it was computed with."""
    settings, version = manifest["settings"], manifest.get("fast_engine")
    if settings.get("engine") != "fast" or version == FAST_ENGINE:
        return
    if version == 2 and settings.get("activation") != "relu":
        return  # (a sigmoid net's bits are those of version 2)
    before = ("0.2, before it made ReLU's kinks in the first hidden layer exact" if version == 2
              else "0.1, before its delta form")  # fmt: skip
    release = "0.2" if version == 2 else "0.1"
    raise CheckpointError(
        f"{path}: its run's gradients come from the fast engine of distnum {before}; going on "
        f"now would mix two engines' bits: finish the run with distnum {release}, or start it "
        "again with --overwrite"
    )


def _digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its own digest, keys sorted."""
    fields = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _serialise_arrays(checkpoint: Checkpoint) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        step=np.int64(checkpoint.step),
        flat_params=np.asarray(checkpoint.flat_params, dtype=np.float64),
        step_losses=np.asarray(checkpoint.step_losses, dtype=np.float64),
        step_seconds=np.asarray(checkpoint.step_seconds, dtype=np.float64),
        epochs=np.asarray(checkpoint.epochs, dtype=np.float64).reshape(-1, 4),
        **{OPTIMIZER_PREFIX + name: value for name, value in checkpoint.optimizer_state.items()},
    )
    return buffer.getvalue()


class Checkpoints:
    """The checkpoints of one run in OUT/checkpoints.

    `newest` finds the one to resume from; `save` writes a new one and then removes the
    oldest of those this run owns beyond KEEP. A file is this run's when it is the valid
    checkpoint of its step under its canonical name, with this run's id: copies, strays,
    damaged files and other runs' checkpoints are never removed."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.folder = directory(out)
        self.run_id = run_id
        self.owned: dict[int, Path] = {}  # step -> manifest, of this run

    def newest(self, check: Callable[[Checkpoint], None]) -> tuple[Checkpoint, str | None]:
        """The newest valid checkpoint, and a one-line note of the newer files that were
        skipped (None when none was). check(checkpoint) raises ValueError for settings
        that cannot be a run's. Adopts the checkpoint's run id. CheckpointError when there
        is no valid checkpoint."""
        candidates = []
        for path in self.folder.glob("step-*.json") if self.folder.is_dir() else []:
            match = MANIFEST_NAME.fullmatch(path.name)
            if match:
                candidates.append((int(match.group(1)), path))
        if not candidates:
            raise CheckpointError(f"{self.folder.parent} has no checkpoint (no "
                                  f"{self.folder}/step-*.json); give the --out folder of a run "
                                  "that wrote checkpoints")  # fmt: skip
        candidates.sort(reverse=True)
        skipped: list[str] = []
        for step, path in candidates:
            try:
                found = load(path, step, check)
            except CheckpointError as error:
                skipped.append(str(error))
                continue
            self.run_id = found.run_id
            for other_step, other in candidates:
                if other_step < step and self._is_ours(other, other_step, check):
                    self.owned[other_step] = other
            self.owned[step] = path
            return found, self._note(skipped, step)
        raise CheckpointError(
            f"no valid checkpoint in {self.folder}: {skipped[0]}"
            + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else "")
        )

    def _is_ours(self, path: Path, step: int, check: Callable[[Checkpoint], None]) -> bool:
        try:
            return load(path, step, check).run_id == self.run_id
        except CheckpointError:
            return False

    def _note(self, skipped: list[str], step: int) -> str | None:
        """One line for everything in the folder that is not this run's checkpoints."""
        ours = {p for m in self.owned.values() for p in (m, m.with_suffix(".npz"))}
        strays = [p for p in self.folder.iterdir() if p not in ours]
        if not strays:
            return None
        first = f"skipped {len(skipped)} newer: {skipped[0]}; " if skipped else ""
        return (f"{first}ignoring {len(strays)} files in {self.folder} that are not this run's "
                f"checkpoints; resuming from step {step}")  # fmt: skip

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write the checkpoint atomically, then drop this run's older ones beyond KEEP;
        returns the manifest's path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = stem(checkpoint.step)
        arrays = _serialise_arrays(checkpoint)
        write_atomically(self.folder / f"{name}.npz", arrays)
        manifest = {
            "format": FORMAT,
            "run_id": checkpoint.run_id,
            "step": checkpoint.step,
            "data": f"{name}.npz",
            "sha256": hashlib.sha256(arrays).hexdigest(),
            "rng_state": checkpoint.rng_state,
            "settings": checkpoint.settings,
            "data_sha256": checkpoint.data_sha256,
            "data_dir": checkpoint.data_dir,
            "out": checkpoint.out,
            "fast_engine": FAST_ENGINE,
        }
        manifest["manifest_sha256"] = _digest(manifest)
        path = self.folder / f"{name}.json"
        write_atomically(path, (json.dumps(manifest, indent=1) + "\n").encode())
        fsync_directory(self.folder)
        self.owned[checkpoint.step] = path
        for step in sorted(self.owned)[:-KEEP]:
            old = self.owned.pop(step)
            old.unlink(missing_ok=True)  # the manifest first: the checkpoint is gone at once
            old.with_suffix(".npz").unlink(missing_ok=True)
        return path


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of path, if it is a regular file (not a link, a FIFO or a device) of at most
    limit bytes: opened without following a link and without blocking, its size checked on
    the open file, and no more than limit + 1 bytes read. CheckpointError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise CheckpointError("a link, not a file: checkpoints are never links") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError("not a regular file")
        if info.st_size > limit:
            raise CheckpointError(f"{info.st_size} bytes, more than {what} can be ({limit})")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # grown since fstat
            raise CheckpointError(f"more than {what} can be ({limit} bytes)")
        return data
    finally:
        os.close(fd)


def data_bytes_bound(settings: dict, step: int) -> int:
    """The most a checkpoint's .npz of a run with these settings can hold at step: its
    parameters, the optimizer's two state vectors at most, a loss and a time per step, an
    evaluation per step at most, and room for the archive's own bytes. The net's input is
    an MNIST image's 784 pixels (every data set distnum reads); settings that are no net's
    allow a megabyte, and their check says what is wrong with them."""
    from distnum.models import ParamLayout

    try:
        params = ParamLayout(784, settings.get("hidden", 50), 10).size
    except (ValueError, TypeError):
        return 1 << 20
    return 8 * (3 * params + 2 * step + 4 * step) + (1 << 20)


def load(path: Path, step: int, check: Callable[[Checkpoint], None]) -> Checkpoint:
    """The checkpoint of step (from its file name) whose manifest is path, every field
    checked; CheckpointError naming the file and the fault otherwise."""
    fix = "delete it to resume from the one before, or start again with --overwrite"

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; {fix}")

    try:
        manifest = json.loads(read_bounded(path, MAX_MANIFEST_BYTES, "a manifest"))
    except CheckpointError as error:
        raise damaged(str(error)) from None
    except (OSError, ValueError, RecursionError) as error:
        raise damaged(f"unreadable manifest ({type(error).__name__})") from None
    if not isinstance(manifest, dict):
        raise damaged("the manifest is not a JSON object")
    expected = {"format": int, "run_id": str, "step": int, "data": str, "sha256": str,
                "rng_state": dict, "settings": dict, "data_sha256": str,
                "manifest_sha256": str}  # fmt: skip
    for key, kind in expected.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise damaged(f"its {key!r} is missing or not a {kind.__name__}")
    for key in ("data_dir", "out"):
        if not isinstance(manifest.get(key), (str, type(None))):
            raise damaged(f"its {key!r} is not a string")
    if manifest["format"] != FORMAT:
        raise damaged(f"format {manifest['format']}, not {FORMAT}")
    if manifest["manifest_sha256"] != _digest(manifest):
        raise damaged("the manifest's checksum does not match its content (changed)")
    check_fast_engine(path, manifest)
    # a checkpoint written before the optimizers: its run used the chapter's plain SGD, whose
    # only state is the count of its updates, one per step
    before_optimizers = "optimizer" not in manifest["settings"]
    manifest["settings"].setdefault("optimizer", "sgd")
    # and one written before MultiLayerNet: its net was the chapter's, sigmoid, no decay
    manifest["settings"].setdefault("activation", "sigmoid")
    manifest["settings"].setdefault("weight_decay", 0.0)
    if manifest["step"] != step or not 0 <= step <= MAX_STEP:
        raise damaged(f"step {manifest['step']} does not match its name")
    if manifest["data"] != f"{stem(step)}.npz":
        raise damaged(f"its data file {manifest['data']!r} is not {stem(step)}.npz")
    try:
        generator = np.random.PCG64()
        generator.state = manifest["rng_state"]
    except Exception as error:  # numpy raises TypeError, ValueError, KeyError, OverflowError
        raise damaged(f"its rng_state is not a PCG64 state ({type(error).__name__})") from None

    data_path = path.parent / manifest["data"]
    try:
        data = read_bounded(data_path, data_bytes_bound(manifest["settings"], step),
                            "the arrays of its run's settings")  # fmt: skip
    except CheckpointError as error:
        raise damaged(f"{data_path.name}: {error}") from None
    except OSError as error:
        raise damaged(f"cannot read {data_path.name} ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise damaged(f"{data_path.name}'s checksum does not match (truncated or changed)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            saved_step = int(arrays["step"])
            checkpoint = Checkpoint(
                run_id=manifest["run_id"],
                step=step,
                flat_params=arrays["flat_params"],
                rng_state=manifest["rng_state"],
                settings=manifest["settings"],
                data_sha256=manifest["data_sha256"],
                data_dir=manifest.get("data_dir"),
                step_losses=arrays["step_losses"],
                step_seconds=arrays["step_seconds"],
                epochs=arrays["epochs"],
                optimizer_state={name.removeprefix(OPTIMIZER_PREFIX): arrays[name]
                                 for name in arrays.files if name.startswith(OPTIMIZER_PREFIX)},
                out=manifest.get("out"),
            )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
        raise damaged(f"unreadable arrays in {data_path.name} ({error})") from None
    arrays_fit = (
        saved_step == step
        and checkpoint.flat_params.dtype == np.float64
        and checkpoint.flat_params.ndim == 1
        and checkpoint.step_losses.shape == (step,)
        and checkpoint.step_seconds.shape == (step,)
        and checkpoint.epochs.ndim == 2
        and checkpoint.epochs.shape[1] == 4
    )
    if not arrays_fit:
        raise damaged(f"the arrays in {data_path.name} do not fit step {step}")
    if before_optimizers and not checkpoint.optimizer_state:
        checkpoint.optimizer_state = {"iterations": np.array(step, dtype=np.int64)}
    if not (
        np.isfinite(checkpoint.flat_params).all() and np.isfinite(checkpoint.step_losses).all()
    ):
        raise damaged(f"{data_path.name} holds parameters or losses that are not finite")
    try:
        check(checkpoint)
    except ValueError as error:
        raise damaged(f"settings that cannot be a run's ({error})") from None
    return checkpoint
