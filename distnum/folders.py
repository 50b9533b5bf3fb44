"""Folders made for a file, and taken away again when nothing came into them: a command that
fails at its start leaves no empty folder behind (runs/, ~/.cache/distnum/mnist)."""

from __future__ import annotations

from pathlib import Path


def make_folder(folder: Path) -> list[Path]:
    """Create folder and its missing parents; returns those it created, deepest first."""
    chain = [folder, *folder.parents]
    made = chain[: next(k for k, path in enumerate(chain) if path.exists())]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(made: list[Path]) -> None:
    """Remove the folders make_folder created, deepest first, as long as they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # something was written there: kept, and so are its parents
            return
