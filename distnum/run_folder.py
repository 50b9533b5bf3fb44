"""OUT, the folder of one run: claimed with an exclusive lock while the run writes there,
never holding two runs, and written so that a crash or a full disk leaves whole files.

    OUT/metrics.jsonl   a line per step and per evaluation, as they come
    OUT/params.npz      the final parameters W1, b1, W2, b2 (W3, b3, ... for deeper nets)
    OUT/summary.json    the run's settings and figures
    OUT/checkpoints/    see distnum.checkpoint
    OUT/.distnum.lock   held (flock) by the run writing here; holds its pid
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from distnum import checkpoint as checkpoints
from distnum.folders import make_folder, remove_empty

FINAL_OUTPUTS = ("params.npz", "summary.json")  # written when the run ends
OUTPUTS = ("metrics.jsonl", *FINAL_OUTPUTS)
LOCK_NAME = ".distnum.lock"


class RunFolderError(ValueError):
    """OUT cannot take this run: in use, holding another run, or not writable."""


class OutputError(RuntimeError):
    """Writing the run's files failed on the way (a full disk, say); the checkpoints kept
    are whole."""


class RunFolder:
    """OUT, locked by this process from claim() until release()."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.lock_fd: int | None = None
        self.made: list[Path] = []  # the folders claim() created: OUT, and its missing parents
        self.made_lock = False  # whether claim() created the lock file
        self.running = False  # whether the run was taken (mark_running): its pid is in the lock

    def claim(self) -> None:
        """Create OUT if needed and take its lock; RunFolderError when OUT cannot be written
        or another run holds it. Creating the lock file is also the check that OUT can be
        written, before any data is read or Ray starts."""
        try:
            if self.out.exists() and not self.out.is_dir():
                raise RunFolderError(f"{self.out} is a file; give a folder")
            self.made = make_folder(self.out)
            self.made_lock = not (self.out / LOCK_NAME).exists()
            fd = os.open(self.out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderError(f"cannot write in {self.out} ({error.strerror}); give a "
                                 "folder you can write to") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"cannot lock {self.out / LOCK_NAME} ({error.strerror})"
                                     ) from None  # fmt: skip
            raise RunFolderError(f"{self.out} is in use by another distnum run (pid {holder}); "
                                 "wait for it to end or give another folder") from None  # fmt: skip
        self.lock_fd = fd

    def mark_running(self) -> None:
        """The run is taken: its pid goes into the lock file, for a second run's message.
        Until then a refused run changes nothing in OUT (the lock file, if it made one, goes
        at release)."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        self.running = True

    def release(self) -> None:
        """Give up the lock; the folders this claim made (OUT, and its parents, such as
        runs/) go too if nothing was written into them, so that a run refused or failing at
        the start leaves nothing behind."""
        if self.lock_fd is None:
            return
        if self.made and [p.name for p in self.out.iterdir()] == [LOCK_NAME]:
            (self.out / LOCK_NAME).unlink()
            remove_empty(self.made)
        elif self.made_lock and not self.running:  # refused: OUT as it was found
            (self.out / LOCK_NAME).unlink(missing_ok=True)
        os.close(self.lock_fd)  # closing the file releases the lock
        self.lock_fd = None

    def run_files(self) -> list[Path]:
        """The files of a run in OUT, as distnum names them."""
        found = [self.out / name for name in OUTPUTS if (self.out / name).exists()]
        folder = checkpoints.directory(self.out)
        if folder.is_dir():
            found += sorted(
                p
                for p in folder.iterdir()
                if checkpoints.MANIFEST_NAME.fullmatch(p.with_suffix(".json").name)
                or checkpoints.TEMPORARY_NAME.fullmatch(p.name)
            )
        return found

    def holds_outputs(self) -> bool:
        """Whether OUT holds a finished run's outputs (params.npz, summary.json)."""
        return any((self.out / name).exists() for name in FINAL_OUTPUTS)

    def holds_run(self, check: Callable[[checkpoints.Checkpoint], None]) -> bool:
        """Whether OUT holds a run that can go on or is done: its outputs, or a checkpoint
        that check passes. Without either it holds at most the start of a run killed before
        its first checkpoint (its metrics.jsonl, the pieces of a checkpoint being written),
        which a plain run started there takes over."""
        if self.holds_outputs():
            return True
        try:
            checkpoints.Checkpoints(self.out, run_id="").newest(check)
        except checkpoints.CheckpointError:
            return False
        return True

    def remove_run(self) -> int:
        """Remove the files of the run in OUT that distnum wrote (nothing else), for
        --overwrite; returns how many."""
        files = self.run_files()
        for path in files:
            path.unlink()
        folder = checkpoints.directory(self.out)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return len(files)

    def write(self, name: str, data: bytes) -> None:
        checkpoints.write_atomically(self.out / name, data)
