"""The book's two figures of a run, from its metrics.jsonl: the training loss per iteration
(figure 4-11) and the train and test accuracy per epoch (figure 4-12), side by side.

`plot_run(out)` returns them as one matplotlib Figure, which Jupyter shows inline;
`distnum plot OUT -o FILE` writes the same Figure with `save_figure`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotError(ValueError):
    """A figure that cannot be written as asked; the message says what to give instead."""


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, per-epoch records) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; give the --out folder of a distnum train run"
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "test_acc" in r]


def accuracy_range(accuracies: list[float]) -> tuple[float, float]:
    """A y range fitted to the accuracies, within [0, 1]: on a 0-1 axis the end of a run
    (0.94 against 0.95) is a flat line."""
    low, high = min(accuracies), max(accuracies)
    margin = max(0.1 * (high - low), 0.005)
    return max(0.0, low - margin), min(1.0, high + margin)


def plot_run(run_dir: str | os.PathLike) -> Figure:
    """The loss curve and the train/test accuracy per epoch of the run in run_dir (a
    `distnum train` out folder), as one Figure. Jupyter shows it as a cell's value (or with
    `display`); elsewhere write it with save_figure: pyplot does not hold it, so that
    `plt.show()` leaves it out and repeated calls keep no figures alive."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'distnum[plot]'") from None
    steps, epochs = read_metrics(Path(run_dir))
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    # pyplot lets go of it: the caller owns the Figure, and Jupyter draws it once, as the
    # cell's value, rather than a second time when the cell ends
    plt.close(figure)
    loss_axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], linewidth=0.5)
    loss_axes.set(xlabel="iteration", ylabel="loss", title="training loss")
    epoch_numbers = [r["epoch"] for r in epochs]
    train_acc = [r["train_acc"] for r in epochs]
    test_acc = [r["test_acc"] for r in epochs]
    # the test markers are larger and hollow, so that a train marker at the same point
    # still shows inside them
    accuracy_axes.plot(epoch_numbers, train_acc, marker="o", markersize=5, label="train acc")
    accuracy_axes.plot(epoch_numbers, test_acc, marker="s", markersize=9, markerfacecolor="none",
                       markeredgewidth=1.5, linestyle="--", label="test acc")  # fmt: skip
    accuracy_axes.set(xlabel="epochs", ylabel="accuracy", title="accuracy")
    if epochs:
        accuracy_axes.set_ylim(accuracy_range(train_acc + test_acc))
    accuracy_axes.legend(loc="lower right")
    figure.suptitle(f"distnum train: {run_dir}")
    figure.tight_layout()
    return figure


def save_figure(figure: Figure, output: str | os.PathLike) -> Path:
    """Write figure to output, as PNG when its name has no extension, and return the path
    of the file written. An extension matplotlib cannot write raises PlotError."""
    path = Path(output)
    if not path.suffix:
        path = path.with_suffix(".png")
    formats = figure.canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise PlotError(
            f"{output}: matplotlib cannot write {path.suffix} files; end the name in one of "
            f"{', '.join('.' + name for name in sorted(formats))}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
