"""What the tests of whole runs share: running `distnum train` as a real process, waiting
for its files, and the digest of the same run done in one go."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from distnum import checkpoint as checkpoints
from distnum.training import check_checkpoint, train

TINY = ["--batch-size", "10", "--hidden", "8"]  # 60 training images: an epoch is 6 steps


def reference_sha(tiny_mnist: Path, tmp_path: Path, iters: int, **options) -> str:
    """params_sha256 of the same run done in one go, in this process, without Ray; its
    outputs in tmp_path/reference-ITERS (and -NAME=VALUE for each option given)."""
    name = f"reference-{iters}" + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    options = {"batch_size": 10, "hidden": 8, **options}
    summary = train(iters=iters, local=True, quiet=True, data_dir=str(tiny_mnist),
                    out=str(tmp_path / name), **options)  # fmt: skip
    return summary["params_sha256"]


def start_train(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distnum", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)  # fmt: skip


def wait_until(condition, timeout_s: float, process: subprocess.Popen | None = None,
               poll_s: float = 0.1) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(poll_s)


def checkpoint_steps(out: Path) -> list[int]:
    folder = checkpoints.directory(out)
    return sorted(int(m.group(1)) for p in folder.glob("*.json")
                  if (m := checkpoints.MANIFEST_NAME.fullmatch(p.name)))  # fmt: skip


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def actor_processes(processes: Iterable[psutil.Process], actor: str) -> list[psutil.Process]:
    """Those of processes that are Ray actors of the class named actor, which Ray titles
    "ray::<actor>..." (not any process whose command line merely names it, such as a
    `python -c` script)."""
    found = []
    for process in processes:
        try:
            command = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        if command and command[0].startswith(f"ray::{actor}"):
            found.append(process)
    return found


def kill_leftovers(processes: list[psutil.Process]) -> None:
    """End what a SIGKILLed driver could not (its local Ray), so no test leaves processes."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those of processes still running (zombies count as gone)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def newest_checkpoint(out: Path) -> tuple[checkpoints.Checkpoint, str | None]:
    """The checkpoint `--resume out` would go on from, and its note on skipped files."""
    return checkpoints.Checkpoints(out, run_id="").newest(check_checkpoint)


def descendants(run: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(run.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_nothing_left(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 20
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = alive(processes)
    kill_leftovers(leftover)
    assert not leftover, [p.name() for p in leftover]


def rewrite_manifest(path: Path, change) -> None:
    """Edit a manifest and make every checksum agree again, so that the check that must
    catch the change is the one that looks at it."""
    manifest = json.loads(path.read_text())
    change(manifest)
    if isinstance(manifest, dict):
        manifest["manifest_sha256"] = checkpoints._digest(manifest)
    path.write_text(json.dumps(manifest))
