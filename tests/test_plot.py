"""distnum plot and plot_run: the file really written, formats, and both accuracy series
readable at the end of a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from distnum.plot import PlotError, plot_run, save_figure  # noqa: E402

# the end of a real run: train and test within a point of each other, equal at epoch 2
EPOCHS = [(1, 0.9012, 0.9055), (2, 0.9301, 0.9301), (3, 0.9402, 0.9433), (4, 0.9468, 0.9451)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run's folder with a metrics.jsonl as distnum train writes it (600 steps an epoch)."""
    records = [{"step": step, "loss": 2.3 / step**0.3, "seconds": 0.02} for step in range(1, 2401)]
    records += [{"step": 600 * epoch, "epoch": float(epoch), "train_acc": train, "test_acc": test}
                for epoch, train, test in EPOCHS]  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def distnum_plot(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distnum", "plot", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_name_without_extension_is_written_as_png_and_reported(run_dir, tmp_path):
    run = distnum_plot(str(run_dir), "-o", "runs/noext", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "wrote runs/noext.png\n"
    written = tmp_path / "runs" / "noext.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "runs" / "noext").exists()


def test_an_unknown_format_is_one_line_naming_the_formats(run_dir, tmp_path):
    run = distnum_plot(str(run_dir), "-o", "x.jpeg2", cwd=tmp_path)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("distnum: error: x.jpeg2: matplotlib cannot write .jpeg2")
    for extension in (".png", ".pdf", ".svg", ".jpg"):
        assert extension in run.stderr
    assert list(tmp_path.iterdir()) == [run_dir]


def test_save_figure_keeps_a_given_extension_and_refuses_an_unknown_one(run_dir, tmp_path):
    figure = plot_run(run_dir)
    assert save_figure(figure, tmp_path / "curves.svg") == tmp_path / "curves.svg"
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(PlotError, match=r"cannot write \.jpeg2 files; .*\.png"):
        save_figure(figure, tmp_path / "curves.jpeg2")


def test_the_accuracy_axis_fits_the_data(run_dir):
    accuracy_axes = plot_run(run_dir).axes[1]
    low, high = accuracy_axes.get_ylim()
    accuracies = [acc for _, train, test in EPOCHS for acc in (train, test)]
    assert low < min(accuracies) and max(accuracies) < high
    # 0.94 against 0.95 must be told apart: the axis spans a few points, not 0-1
    assert high - low < 0.1


def test_a_train_marker_shows_where_the_test_marker_is_on_it(run_dir):
    """Rendered, the centre of the point where train and test are equal is the train
    series' colour: the test marker around it does not hide it."""
    figure = plot_run(run_dir)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    accuracy_axes = figure.axes[1]
    train_line, test_line = accuracy_axes.get_lines()
    x, y = accuracy_axes.transData.transform((2.0, 0.9301))
    centre = pixels[pixels.shape[0] - int(round(y)), int(round(x))]

    def rgb(line) -> np.ndarray:
        return np.array(matplotlib.colors.to_rgb(line.get_color())) * 255

    assert np.abs(centre - rgb(train_line)).max() < 40, centre
    assert np.abs(centre - rgb(test_line)).max() > 100, centre
    # and the test series is there too, its marker edge around the centre
    radius = int(test_line.get_markersize() * figure.dpi / 72 / 2)
    ring = pixels[pixels.shape[0] - int(round(y)), int(round(x)) + radius]
    assert np.abs(ring - rgb(test_line)).max() < 60, ring
