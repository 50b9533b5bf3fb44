"""distnum plot: the book's two figures from a run's metrics.jsonl, in one PNG: the training
loss per iteration (figure 4-11) and train/test accuracy per epoch (figure 4-12)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, per-epoch records) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; give the --out folder of a distnum train run"
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "test_acc" in r]


def plot_run(run_dir: Path, output: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("distnum plot needs matplotlib: pip install 'distnum[plot]'") from None
    steps, epochs = read_metrics(run_dir)
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], linewidth=0.5)
    loss_axes.set(xlabel="iteration", ylabel="loss", title="training loss")
    epoch_numbers = [r["epoch"] for r in epochs]
    accuracy_axes.plot(
        epoch_numbers, [r["train_acc"] for r in epochs], marker="o", label="train acc"
    )
    accuracy_axes.plot(epoch_numbers, [r["test_acc"] for r in epochs], marker="s",
                       linestyle="--", label="test acc")  # fmt: skip
    accuracy_axes.set(xlabel="epochs", ylabel="accuracy", ylim=(0, 1.0), title="accuracy")
    accuracy_axes.legend(loc="lower right")
    figure.suptitle(f"distnum train: {run_dir}")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
