"""Checkpoints: everything a run needs to go on bit for bit, written so that a crash at any
moment leaves the previous checkpoint whole.

A checkpoint of step S is two files in OUT/checkpoints:
    step-000S.npz   the flat parameters and the metrics so far, plain arrays (no pickle)
    step-000S.json  the manifest: step, the minibatch RNG's state, the run's settings and the
                    SHA-256 of the .npz; written last, so that a checkpoint without one
                    does not exist
Each file is written to a temporary name, flushed to disk (fsync) and renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = 1
KEEP = 2  # the newest checkpoints kept; older ones are removed once a newer one is whole


class CheckpointError(Exception):
    """No usable checkpoint; the message names the file, the fault and what to do."""


@dataclass
class Checkpoint:
    step: int
    flat_params: np.ndarray  # (size,) float64
    rng_state: dict  # numpy's bit_generator.state of the minibatch generator
    settings: dict  # the run's options that must not change on resume
    step_losses: np.ndarray  # (step,) loss after each step
    step_seconds: np.ndarray  # (step,)
    epochs: np.ndarray  # (E, 4): step, epoch, train_acc, test_acc


def directory(out: Path) -> Path:
    return Path(out) / "checkpoints"


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save(out: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint atomically, then drop all but the newest KEEP; returns the
    manifest's path."""
    folder = directory(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step-{checkpoint.step:07d}"
    arrays = _serialise_arrays(checkpoint)
    write_atomically(folder / f"{stem}.npz", arrays)
    manifest = {
        "format": FORMAT,
        "step": checkpoint.step,
        "data": f"{stem}.npz",
        "sha256": hashlib.sha256(arrays).hexdigest(),
        "rng_state": checkpoint.rng_state,
        "settings": checkpoint.settings,
    }
    write_atomically(folder / f"{stem}.json", (json.dumps(manifest, indent=1) + "\n").encode())
    _fsync_directory(folder)
    for old in sorted(folder.glob("step-*.json"))[:-KEEP]:
        old.with_suffix(".npz").unlink(missing_ok=True)
        old.unlink()
    return folder / f"{stem}.json"


def _serialise_arrays(checkpoint: Checkpoint) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        flat_params=np.asarray(checkpoint.flat_params, dtype=np.float64),
        step_losses=np.asarray(checkpoint.step_losses, dtype=np.float64),
        step_seconds=np.asarray(checkpoint.step_seconds, dtype=np.float64),
        epochs=np.asarray(checkpoint.epochs, dtype=np.float64).reshape(-1, 4),
    )
    return buffer.getvalue()


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path) -> Checkpoint:
    """The checkpoint whose manifest is path, checked: manifest, checksum, arrays."""
    fix = "delete it to resume from the one before, or start the run again without --resume"
    try:
        manifest = json.loads(path.read_text())
        step, data_name = int(manifest["step"]), manifest["data"]
        sha256, rng_state, settings = (
            manifest["sha256"],
            manifest["rng_state"],
            manifest["settings"],
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable manifest ({error}); {fix}") from None
    data_path = path.parent / data_name
    try:
        data = data_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{data_path}: cannot read ({error.strerror}); {fix}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{data_path}: checksum does not match its manifest (truncated or "
                              f"changed); {fix}")  # fmt: skip
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            checkpoint = Checkpoint(
                step=step,
                flat_params=arrays["flat_params"],
                rng_state=rng_state,
                settings=settings,
                step_losses=arrays["step_losses"],
                step_seconds=arrays["step_seconds"],
                epochs=arrays["epochs"],
            )
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{data_path}: unreadable arrays ({error}); {fix}") from None
    if checkpoint.step_losses.shape != (step,) or checkpoint.flat_params.ndim != 1:
        raise CheckpointError(f"{data_path}: arrays do not match step {step}; {fix}")
    return checkpoint


def newest(out: Path) -> tuple[Checkpoint, list[str]]:
    """The newest valid checkpoint of the run in out, and a note for each newer one that was
    skipped as damaged. CheckpointError when there is none."""
    folder = directory(out)
    manifests = sorted(folder.glob("step-*.json"), reverse=True)
    if not manifests:
        raise CheckpointError(f"{out} has no checkpoint (no {folder}/step-*.json); give the "
                              f"--out folder of a run that wrote checkpoints")  # fmt: skip
    skipped = []
    for manifest in manifests:
        try:
            return load(manifest), skipped
        except CheckpointError as error:
            skipped.append(str(error))
    raise CheckpointError(skipped[0] if len(skipped) == 1 else
                          f"no valid checkpoint in {folder}: " + " | ".join(skipped))  # fmt: skip
