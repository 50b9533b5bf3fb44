"""distnum gradcheck and distnum bench, run as a user runs them."""

import json
import math
import subprocess
import sys


def distnum(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "distnum", *args], capture_output=True, text=True, timeout=timeout
    )


def test_gradcheck_passes_and_prints_each_array(mnist_dir):
    run = distnum("gradcheck", "--data-dir", str(mnist_dir), "--full-sample", "100",
                  "--truth-sample", "3")  # fmt: skip
    assert run.returncode == 0, run.stderr
    header, *rows = [line.split() for line in run.stdout.splitlines()[1:6]]
    assert header[-2:] == ["|fast-truth|", "|full-truth|"]
    assert [row[0] for row in rows] == ["W1", "b1", "W2", "b2"]
    for row in rows:  # the fast engine nearer the 50-digit truth than the literal algorithm
        assert int(row[-3]) == 3 and float(row[-2]) <= 1e-15 < float(row[-1])
    assert run.stdout.rstrip().endswith("ok")


def test_gradcheck_fails_over_tolerance(mnist_dir):
    """A tolerance below the O(h^2) truncation error must be reported and fail."""
    run = distnum(
        "gradcheck",
        "--data-dir",
        str(mnist_dir),
        "--full-sample",
        "100",
        "--rel-tol",
        "1e-13",
        "--truth-sample",
        "0",
    )
    assert run.returncode == 1
    assert "OVER TOLERANCE" in run.stdout and "FAILED" in run.stdout


def test_bench_json_reports_all_three_in_one_run(mnist_dir):
    run = distnum(
        "bench",
        "--data-dir",
        str(mnist_dir),
        "--full-sample",
        "50",
        "--repeat",
        "3",
        "--hidden-sizes",
        "20",
        "50",
        "--json",
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["engines"]
    assert [r["hidden"] for r in rows] == [20, 50]
    for r in rows:
        assert r["full_s"] > r["fast_s"] > 0 and r["backprop_s"] > 0
        assert r["full_over_fast"] == r["full_s"] / r["fast_s"]
        assert r["full_timed_coordinates"] == 50 and 0 < r["fast_peak_rss_mb"] < 10_000


def test_bench_table_labels_the_extrapolation(mnist_dir):
    run = distnum("bench", "--data-dir", str(mnist_dir), "--full-sample", "30", "--repeat", "2")
    assert run.returncode == 0, run.stderr
    assert "extrapolated from 30 timed coordinates" in run.stdout
    assert "full/fast" in run.stdout and "fast/backprop" in run.stdout


def test_bad_h_and_missing_data_are_one_line_errors(tmp_path):
    run = distnum("gradcheck", "--h", "0")
    assert run.returncode == 2 and "must be finite, > 0 and <= 1" in run.stderr
    run = distnum("bench", "--data-dir", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "has no train-images" in run.stderr


def test_bench_workers_reports_steps_per_second_and_overhead(bench_mnist, joining):
    run = distnum(
        "bench", "--data-dir", str(bench_mnist), "--full-sample", "20", "--repeat", "2",
        "--workers", "1", "2", "--steps", "20", "--json", *joining,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["workers"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert rows[0]["speedup"] == 1.0
    assert rows[0]["ceiling"] == 1.0  # one alone against one alone
    for r in rows:
        assert r["steps"] == 20 and r["steps_per_s"] > 0
        # a ratio of times measured while the suite's other process computes too: what it
        # comes to is bench's figure to report, not a test's to bound
        assert 0 < r["ceiling"] < math.inf
        assert r["of_ceiling"] == r["speedup"] / r["ceiling"]
        assert 0 < r["median_compute_s"] < r["median_step_s"]
        assert r["median_overhead_s"] > 0
        assert r["transport"] == "shared memory"  # the actors run on the driver's node
    (engines,) = json.loads(run.stdout)["engines"]  # the floor beside the fast engine
    assert engines["nudged_losses"] > 0
    assert engines["ns_per_nudged_loss"] > engines["floor_ns_per_nudged_loss"] > 0
    assert engines["fast_over_floor"] == engines["fast_s"] / engines["floor_s"] > 1


def test_plot_writes_the_two_figures(tiny_mnist, tmp_path):
    from distnum.training import train

    train(iters=12, batch_size=10, local=True, data_dir=str(tiny_mnist), out=str(tmp_path / "r"),
          quiet=True)  # fmt: skip
    png = tmp_path / "curves.png"
    run = distnum("plot", str(tmp_path / "r"), "-o", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    missing = distnum("plot", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr
