"""A run's life loses nothing: checkpoint clean-up, resume to the run's own end, settings
all or nothing, exit statuses, stops at awkward moments, one run per folder, manifests
read back trusting nothing, a full disk.

Real processes and real signals wherever a process ends: `distnum train` runs as a
subprocess, and SIGTERM, SIGINT or SIGKILL is sent to it at the moment named."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from idx_files import write_fake_mnist
from run_helpers import (
    TINY,
    assert_nothing_left,
    checkpoint_steps,
    descendants,
    newest_checkpoint,
    reference_sha,
    rewrite_manifest,
    start_train,
    summary_of,
    wait_until,
)

from distnum import checkpoint as checkpoints
from distnum.run_folder import RunFolderError
from distnum.training import ConfigError, train


def local_run(tiny_mnist: Path, out: Path, iters: int, **options) -> dict:
    options = {"batch_size": 10, "hidden": 8, "local": True, "quiet": True, **options}
    return train(iters=iters, data_dir=str(tiny_mnist), out=str(out), **options)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def finish(run: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    stdout, stderr = run.communicate(timeout=timeout)
    return run.returncode, stdout, stderr


# --- checkpoint clean-up -----------------------------------------------------------------


def test_clean_up_removes_only_this_runs_checkpoints(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    local_run(tiny_mnist, out, 12, checkpoint_every=5)
    folder = checkpoints.directory(out)
    real = (folder / "step-0000012.json").read_text()
    strays = {"step-best.json": real, "step-keep.json": real, "notes.txt": "mine"}
    strays.update({f"step-9000{k:03d}.json": real for k in range(1000)})
    for name, text in strays.items():
        (folder / name).write_text(text)
    capsys.readouterr()

    resumed = local_run(tiny_mnist, out, 30, checkpoint_every=5, resume=True)

    assert all((folder / name).read_text() == text for name, text in strays.items())
    real_steps = [step for step in checkpoint_steps(out) if step < 9_000_000]
    assert real_steps == [25, 30]  # this run's newest two, by their steps
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "ignoring 1003 files" in err_lines[0], err_lines
    assert "resuming from step 12" in err_lines[0]
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 30)


def test_clean_up_orders_by_step_past_seven_digits(tmp_path):
    saved = checkpoints.Checkpoints(tmp_path, run_id="run")
    settings = {"iters": 10**8, "batch_size": 1, "lr": 0.1, "hidden": 1,
                "weight_init_std": 0.01, "engine": "fast", "h": 1e-4, "seed": 0}  # fmt: skip
    state = np.random.default_rng(0).bit_generator.state
    for step in (9_999_999, 10_000_000, 10_000_001):
        losses = np.zeros(step)
        saved.save(checkpoints.Checkpoint("run", step, np.zeros(3), state, settings, "d", None,
                                          losses, losses, np.zeros((0, 4))))  # fmt: skip
    assert checkpoint_steps(tmp_path) == [10_000_000, 10_000_001]
    assert newest_checkpoint(tmp_path)[0].step == 10_000_001


# --- resume: to the run's own end, settings all or nothing ---------------------------------


def test_resume_without_iters_stops_at_the_runs_own(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    run = start_train("--local", "--iters", "1000", "--checkpoint-every", "1", "--quiet",
                      "--data-dir", str(tiny_mnist), "--out", str(out), *TINY)  # fmt: skip
    wait_until(lambda: checkpoint_steps(out) and checkpoint_steps(out)[-1] >= 60, 120, run)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    status, stdout, stderr = finish(start_train("--resume", str(out), "--local", "--quiet"))
    assert status == 0, stderr
    summary = summary_of(out)
    assert summary["iters"] == 1000 and summary["resumed_from_step"] >= 60
    assert summary["steps_run"] == 1000 - summary["resumed_from_step"]
    assert f"resumed from step {summary['resumed_from_step']} of 1000" in stdout
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 1000)


def test_a_checkpoint_from_another_runs_folder_is_named_as_such(tiny_mnist, tmp_path, capsys):
    """A folder holding only a checkpoint copied from another run's folder: --resume goes on
    with that run, and says so in one line naming where it was written."""
    first = tmp_path / "first"
    local_run(tiny_mnist, first, 10, checkpoint_every=5)
    copy = tmp_path / "copy"
    checkpoints.directory(copy).mkdir(parents=True)
    for path in checkpoints.directory(first).glob("step-0000005.*"):
        shutil.copy(path, checkpoints.directory(copy) / path.name)
    capsys.readouterr()
    summary = local_run(tiny_mnist, copy, 10, resume=True)
    assert capsys.readouterr().err.splitlines() == [
        f"distnum: the checkpoint in {copy} was written by the run in {first.resolve()} "
        "(copied or moved here); going on with that run, here, from step 5"
    ]
    assert summary["params_sha256"] == summary_of(first)["params_sha256"]
    capsys.readouterr()
    local_run(tiny_mnist, first, 12, resume=True)  # its own folder: nothing to say
    assert capsys.readouterr().err == ""


def test_resume_settings_are_all_or_nothing(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    local_run(tiny_mnist, out, 6, lr=0.5)
    with pytest.raises(ConfigError, match=r"lr=0.1 does not match the run .* \(0.5\)"):
        local_run(tiny_mnist, out, 12, lr=0.1, resume=True)  # 0.1: the default
    assert checkpoint_steps(out) == [6]
    summary = local_run(tiny_mnist, out, 12, lr=0.5, resume=True)  # the same: fine
    assert summary["lr"] == 0.5 and summary["resumed_from_step"] == 6
    with pytest.raises(ConfigError, match=r"beyond iters=8; give a larger one or leave it out"):
        local_run(tiny_mnist, out, 8, resume=True)


def test_resume_on_other_data_is_refused(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    local_run(tiny_mnist, out, 6)
    other = tmp_path / "other-data"
    write_fake_mnist(other, n_train=70, n_test=20)
    expected = f"learned from other data than {other} holds; give the data it was started"
    with pytest.raises(ConfigError, match=expected):
        local_run(other, out, 12, resume=True)


# --- exit statuses -----------------------------------------------------------------------


def test_a_success_after_a_worker_was_replaced_exits_0(
    mnist_dir, tmp_path, joining, tests_ray_workers
):
    """The issue's probe: real MNIST, a worker actor killed at about step 60."""
    out = tmp_path / "run"
    args = ["--iters", "150", "--workers", "2", "--seed", "4", "--checkpoint-every", "30",
            "--data-dir", str(mnist_dir), "--quiet", *joining]  # fmt: skip
    run = start_train(*args, "--out", str(out))
    wait_until(lambda: checkpoint_steps(out) and checkpoint_steps(out)[-1] >= 60, 300, run)
    tests_ray_workers()[0].send_signal(signal.SIGKILL)
    status, stdout, stderr = finish(run)
    assert status == 0, stderr
    assert stdout.strip().splitlines()[-1].startswith("done: 150 steps")
    reference = train(iters=150, seed=4, local=True, quiet=True, data_dir=str(mnist_dir),
                      out=str(tmp_path / "reference"))  # fmt: skip
    assert summary_of(out)["params_sha256"] == reference["params_sha256"]
    assert summary_of(out)["worker_restarts"] >= 1


API_FAILURE = """
import sys, time
sys.path.insert(0, {tests!r})
import numpy as np
import psutil
import ray
import distnum
from distnum.distributed import WorkerFailed

class ShortEngine:
    def __init__(self, layout, indices):
        self.size = len(indices)
    def __call__(self, flat, x, labels, h):
        return np.zeros(self.size - 1)

for owner in ("distnum", "caller"):
    if owner == "caller":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distnum.train(iters=5, workers=2, batch_size=10, hidden=8, engine=ShortEngine,
                      data_dir={data!r}, out={out!r} + owner, quiet=True)
    except WorkerFailed as error:
        print(owner, "WorkerFailed:", error, flush=True)
    print(owner, "ray initialized:", ray.is_initialized(), flush=True)
    time.sleep(2)
    if owner == "caller":  # Ray's processes are this one's descendants
        commands = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        print("actors alive:", sum("GradientWorker" in c for c in commands), flush=True)
ray.shutdown()
print("alive at the end", flush=True)
"""


def test_a_failed_train_leaves_the_callers_process_as_it_found_it(tiny_mnist, tmp_path):
    script = API_FAILURE.format(tests=str(Path(__file__).parent), data=str(tiny_mnist),
                                out=str(tmp_path / "run-"))  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr  # not a segfault when the failure is freed
    lines = done.stdout.splitlines()
    for owner, ray_kept in (("distnum", False), ("caller", True)):
        assert f"{owner} WorkerFailed: a worker actor raised ValueError: the engine returned " \
               "a float64 array of shape" in done.stdout, done.stdout  # fmt: skip
        assert f"{owner} ray initialized: {ray_kept}" in lines
    assert "actors alive: 0" in lines
    assert lines[-1] == "alive at the end"


# --- stops at awkward moments ------------------------------------------------------------


# 0.2 s lands in ray.shutdown() about half the time, which once killed the run: see
# test_sigterms_through_rays_shutdown_reach_the_handler
@pytest.mark.parametrize("delay_s", [0.0, 0.02, 0.2, 0.4])
def test_a_stop_right_after_the_final_checkpoint_keeps_the_outputs(tiny_mnist, tmp_path,
                                                                   delay_s):  # fmt: skip
    out = tmp_path / "run"
    run = start_train("--iters", "30", "--workers", "2", "--quiet", "--data-dir",
                      str(tiny_mnist), "--out", str(out), *TINY)  # fmt: skip
    final = checkpoints.directory(out) / "step-0000030.json"
    wait_until(final.exists, 300, run, poll_s=0.002)
    time.sleep(delay_s)
    processes = descendants(run)
    run.send_signal(signal.SIGTERM)
    status, _, stderr = finish(run)
    assert status in (0, 130), stderr  # 0 when the signal came after the outputs
    if status == 130:
        assert one_line(stderr).startswith("distnum: stopped by SIGTERM"), stderr
    assert summary_of(out)["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 30)
    assert (out / "params.npz").exists()
    assert_nothing_left(processes)


@pytest.mark.parametrize("delay_s", [0.5, 2.0, 4.0])
def test_sigterm_during_start_up_stops_with_a_checkpoint(tiny_mnist, tmp_path, delay_s):
    out = tmp_path / "run"
    args = ["--workers", "2", "--quiet", "--data-dir", str(tiny_mnist), *TINY]
    run = start_train("--iters", "40", "--out", str(out), *args)
    time.sleep(delay_s)
    processes = descendants(run)
    run.send_signal(signal.SIGTERM)
    processes += descendants(run)
    status, _, stderr = finish(run)
    assert_nothing_left(processes)
    if status == 0:  # the whole run fitted in the delay: nothing to stop
        return
    assert status == 130, stderr
    line = one_line(stderr)
    assert line.startswith("distnum: stopped by SIGTERM at step ") and "--resume" in line
    status, _, stderr = finish(start_train("--resume", str(out), "--quiet", "--local"))
    assert status == 0, stderr
    assert summary_of(out)["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 40)


def test_ctrl_c_before_the_first_checkpoint_can_be_resumed(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    run = start_train("--local", "--iters", "1000", "--checkpoint-every", "500", "--quiet",
                      "--data-dir", str(tiny_mnist), "--out", str(out), *TINY)  # fmt: skip
    wait_until(lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 40, 120, run)
    run.send_signal(signal.SIGINT)
    status, _, stderr = finish(run)
    assert status == 130, stderr
    step = checkpoint_steps(out)[-1]
    assert 40 <= step < 500
    assert f"stopped by SIGINT at step {step} of 1000" in one_line(stderr)
    status, _, stderr = finish(start_train("--resume", str(out), "--local", "--quiet"))
    assert status == 0, stderr
    assert summary_of(out)["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 1000)


def test_resuming_a_finished_run_rewrites_its_missing_outputs(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    first = local_run(tiny_mnist, out, 12)
    (out / "params.npz").unlink()
    (out / "summary.json").unlink()
    status, stdout, stderr = finish(start_train("--resume", str(out), "--quiet"))
    assert status == 0, stderr
    assert "complete at step 12: wrote its missing params.npz, summary.json" in stdout
    assert summary_of(out)["params_sha256"] == first["params_sha256"]
    assert summary_of(out)["steps_run"] == 0


# --- one run per folder ------------------------------------------------------------------


def file_digests(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 but the lock's, which each run that looks here takes."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".distnum.lock"]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_an_out_holding_a_run_is_refused_and_overwrite_replaces_it(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    local_run(tiny_mnist, out, 12, checkpoint_every=5)
    (out / "my-notes.txt").write_text("not distnum's")
    before = file_digests(out)
    status, _, stderr = finish(start_train("--local", "--iters", "6", "--data-dir",
                                           str(tiny_mnist), "--out", str(out), *TINY))  # fmt: skip
    assert status == 2
    line = one_line(stderr)
    assert "holds a run already" in line and "--resume" in line and "--overwrite" in line
    assert file_digests(out) == before
    summary = local_run(tiny_mnist, out, 6, seed=3, overwrite=True)
    assert checkpoint_steps(out) == [6]  # the old run's 10 and 12 are gone
    assert (out / "my-notes.txt").read_text() == "not distnum's"
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 6, seed=3)


def test_two_runs_at_once_in_one_folder(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    first = start_train("--local", "--iters", "3000", "--checkpoint-every", "1", "--quiet",
                        "--data-dir", str(tiny_mnist), "--out", str(out), *TINY)  # fmt: skip
    wait_until(lambda: checkpoint_steps(out) != [], 120, first)
    status, _, stderr = finish(start_train("--local", "--iters", "30", "--seed", "1",
                                           "--data-dir", str(tiny_mnist), "--out", str(out),
                                           *TINY))  # fmt: skip
    assert status == 2
    assert f"in use by another distnum run (pid {first.pid})" in one_line(stderr)
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == 130
    with pytest.raises(RunFolderError, match="holds a run already"):
        local_run(tiny_mnist, out, 30)


@pytest.mark.parametrize("out", ["/proc/distnum-x", "{file}/x", "{long}", "/proc/self"])
def test_an_out_that_cannot_be_written_is_refused_before_anything(tmp_path, tiny_mnist, out):
    (tmp_path / "a-file").write_text("")
    out = out.format(file=tmp_path / "a-file", long=tmp_path / ("x" * 300))
    started = time.monotonic()
    ray_logs = {**os.environ, "DISTNUM_RAY_LOGS": "1"}  # Ray's own lines: its start would show
    status, _, stderr = finish(start_train("--iters", "5", "--data-dir", str(tiny_mnist),
                                           "--out", out, *TINY, env=ray_logs))  # fmt: skip
    assert status == 2, stderr
    assert "cannot write in" in one_line(stderr) or "is a file" in one_line(stderr)
    assert "Token authentication" not in stderr  # Ray never started
    assert time.monotonic() - started < 30


# --- manifests read back trusting nothing --------------------------------------------------


def rewrite_arrays(path: Path, change) -> None:
    """Edit a checkpoint's arrays and record their new checksum in its manifest."""
    data = path.with_suffix(".npz")
    with np.load(data) as loaded:
        arrays = dict(loaded)
    change(arrays)
    np.savez(data, **arrays)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    rewrite_manifest(path, lambda m: m.update(sha256=digest))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def text_replaced(old: str, new: str):
    return lambda path: path.write_text(path.read_text().replace(old, new))


def manifest_changed(change):
    return lambda path: rewrite_manifest(path, change)


def arrays_changed(change):
    return lambda path: rewrite_arrays(path, change)


def set_nan(arrays: dict) -> None:
    arrays["flat_params"][3] = np.nan


DAMAGE = {
    "step Infinity": text_replaced('"step": 12', '"step": Infinity'),
    "step 1e400": manifest_changed(lambda m: m.update(step=1e400)),
    "nested 200000 deep": lambda path: path.write_text(nested(200_000)),
    "data 123": manifest_changed(lambda m: m.update(data=123)),
    "data of another checkpoint": manifest_changed(lambda m: m.update(data="step-0000010.npz")),
    "rng_state wrong types": manifest_changed(lambda m: m["rng_state"].update(state=[1])),
    "rng_state of another generator": manifest_changed(
        lambda m: m["rng_state"].update(bit_generator="MT19937")
    ),
    "settings a list": manifest_changed(lambda m: m.update(settings=[1, 2])),
    "settings without seed": manifest_changed(lambda m: m["settings"].pop("seed")),
    "batch_size 0": manifest_changed(lambda m: m["settings"].update(batch_size=0)),
    "lr changed, checksum stale": text_replaced('"lr": 0.1', '"lr": 0.5'),
    "step_seconds shorter": arrays_changed(lambda a: a.update(step_seconds=a["step_seconds"][:-1])),
    "epochs 1-D": arrays_changed(lambda a: a.update(epochs=a["epochs"].ravel())),
    "parameters with NaN": arrays_changed(set_nan),
    "not a JSON object": lambda path: path.write_text("[1, 2, 3]"),
    # files that are no checkpoint's: read, they would hang the run or fill its memory
    "manifest a FIFO": lambda path: (path.unlink(), os.mkfifo(path)),
    "manifest a link to the older one": lambda path: (
        path.unlink(),
        path.symlink_to("step-0000010.json"),
    ),
    "arrays a link to /dev/zero": lambda path: (
        path.with_suffix(".npz").unlink(),
        path.with_suffix(".npz").symlink_to("/dev/zero"),
    ),
    "arrays larger than the run's can be": lambda path: (
        path.with_suffix(".npz").open("ab").write(b"\0" * (2 << 20))
    ),
}


@pytest.fixture(scope="module")
def two_checkpoints(tiny_mnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    local_run(tiny_mnist, out, 12, checkpoint_every=5)
    assert checkpoint_steps(out) == [10, 12]
    return out


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_manifest_falls_back_to_the_older_one(
    damage, two_checkpoints, tiny_mnist, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    DAMAGE[damage](checkpoints.directory(out) / "step-0000012.json")
    capsys.readouterr()
    resumed = local_run(tiny_mnist, out, 20, resume=True)
    assert resumed["resumed_from_step"] == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "skipped 1 newer" in err[0] and "step-0000012.json" in err[0], err
    # out is a copy of the fixture's run folder, which the second line names
    copied = f"the checkpoint in {out} was written by the run in {two_checkpoints.resolve()}"
    assert err[1].startswith(f"distnum: {copied} (copied or moved here)"), err
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 20)


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """An 800 KB tmpfs: room for about two checkpoints of a 784-50-10 net."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_ends_with_one_line_and_a_whole_checkpoint(small_disk, tiny_mnist):
    out = small_disk / "run"
    status, _, stderr = finish(start_train("--local", "--iters", "100", "--batch-size", "10",
                                           "--hidden", "50", "--checkpoint-every", "2",
                                           "--quiet", "--data-dir", str(tiny_mnist),
                                           "--out", str(out)))  # fmt: skip
    assert status == 1, stderr
    line = one_line(stderr)
    assert f"cannot write in {out} (No space left on device)" in line
    assert f"--resume {out}" in line
    folder = checkpoints.directory(out)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file
    saved, _ = newest_checkpoint(out)
    assert saved.step >= 2


# --- a resumed or local run says what it did ------------------------------------------------


def test_a_local_run_says_it_ran_in_this_process(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    status, stdout, stderr = finish(start_train("--local", "--iters", "7", "--quiet",
                                                "--data-dir", str(tiny_mnist), "--out",
                                                str(out), *TINY))  # fmt: skip
    assert status == 0, stderr
    assert "7 steps" in stdout and "in this process" in stdout and "workers" not in stdout
    summary = summary_of(out)
    assert summary["local"] is True and summary["workers"] is None
    status, stdout, stderr = finish(start_train("--resume", str(out), "--iters", "10", "--local",
                                                "--quiet"))  # fmt: skip
    assert status == 0, stderr
    assert stdout.startswith("resumed from step 7 of 10")
    assert "done: 3 steps" in stdout and "resumed from step 7" in stdout
    assert summary_of(out)["steps_run"] == 3


# --- bad arguments from Python: the same checks, named as Python names them ------------------

API_BAD_INPUTS = {
    "lr a string": ({"lr": "0.1"}, "lr='0.1' is not a number"),
    "seed a string": ({"seed": "0"}, "seed='0' must be a whole number >= 0"),
    "seed negative": ({"seed": -1}, "seed=-1 must be a whole number >= 0"),
    "iters a float": ({"iters": 1.5}, "iters=1.5 must be a whole number >= 1"),
    "batch_size a bool": ({"batch_size": True}, "batch_size=True must be a whole number"),
    "workers 0": ({"workers": 0}, "workers=0 must be a whole number >= 1"),
    "h huge": ({"h": 1e10}, "h=10000000000.0 must be finite, > 0 and <= 1"),
    "weight_init_std nan": ({"weight_init_std": float("nan")}, "weight_init_std=nan must be"),
    "engine unknown": ({"engine": "slow"}, "engine='slow' is unknown; choose one of fast, full"),
    "data_dir a number": ({"data_dir": 5}, "data_dir=5 must be a path or a string"),
    "address garbage": ({"address": "garbage"}, "address='garbage' is not a Ray address"),
    "resume and overwrite": ({"resume": True, "overwrite": True}, "resume= and overwrite="),
}


@pytest.mark.parametrize("case", list(API_BAD_INPUTS))
def test_bad_arguments_from_python_fail_before_anything(case, tmp_path):
    options, expected = API_BAD_INPUTS[case]
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as failure:
        train(**{"iters": 5, "out": str(out), **options})
    assert expected in str(failure.value) and "--" not in str(failure.value)
    assert not out.exists()  # checked before the folder, the data or Ray


def test_too_many_workers_for_the_clusters_memory_is_refused(tiny_mnist, tmp_path, joining):
    status, _, stderr = finish(start_train("--workers", "100000", "--iters", "3", "--data-dir",
                                           str(tiny_mnist), "--out", str(tmp_path / "run"),
                                           *TINY, *joining))  # fmt: skip
    assert status == 2, stderr
    line = one_line(stderr)
    assert "--workers 100000: 100000 worker actors need about" in line and "give at most" in line
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


THROUGH_SHUTDOWN = """
import os, signal, time
from distnum.distributed import connect, disconnect
from distnum.stopping import install
received = []
install(signal.SIGTERM, lambda number, frame: received.append(number))
owns_ray = connect(None)
print("shutting down", flush=True)
disconnect(owns_ray)
time.sleep(0.3)  # and after it
print("SIGTERMs handled:", len(received), flush=True)
os._exit(0)  # as the distnum command ends: the interpreter's own exit resets the handlers
"""


def test_sigterms_through_rays_shutdown_reach_the_handler():
    """ray.shutdown() uninstalls Ray's failure signal handler by resetting SIGTERM's action
    to the default under Python's handler: a SIGTERM during its ~0.5 s killed the process
    (-15). Here SIGTERMs arrive every 10 ms from another process throughout the shutdown."""
    child = subprocess.Popen([sys.executable, "-c", THROUGH_SHUTDOWN], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    processes = []
    try:
        assert child.stdout.readline().strip() == "shutting down", child.communicate()
        processes = descendants(child)
        while child.poll() is None:
            child.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        assert child.returncode == 0, child.communicate()
        last = child.stdout.read().strip()
        assert last.startswith("SIGTERMs handled: ") and int(last.split()[-1]) > 0, last
    finally:
        child.kill()
        child.communicate()
    assert_nothing_left(processes)


@pytest.mark.parametrize("gap_s", [0.0, 0.05, 0.3])
def test_a_second_ctrl_c_still_says_where_the_run_is_and_how_to_go_on(tiny_mnist, tmp_path,
                                                                      gap_s):  # fmt: skip
    """Two Ctrl-C in a row (the second stops at once, wherever the run is): one line with the
    step or the checkpoint and --resume, never a bare "interrupted"; and --resume finishes."""
    out = tmp_path / "run"
    run = start_train("--local", "--iters", "100000", "--checkpoint-every", "50", "--quiet",
                      "--data-dir", str(tiny_mnist), "--out", str(out), *TINY)  # fmt: skip
    wait_until(lambda: len(checkpoint_steps(out)) >= 1, 120, run)
    run.send_signal(signal.SIGINT)
    time.sleep(gap_s)
    run.send_signal(signal.SIGINT)
    status, _, stderr = finish(run)
    assert status == 130, stderr
    line = one_line(stderr)
    assert "--resume" in line and ("step" in line or "checkpoint" in line), line
    status, _, stderr = finish(start_train("--resume", str(out), "--iters",
                                           str(newest_checkpoint(out)[0].step + 6), "--local",
                                           "--quiet"))  # fmt: skip
    assert status == 0, stderr
