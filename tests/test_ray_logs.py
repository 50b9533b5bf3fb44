"""None of Ray's own log lines in a run that goes well, on the command line (in Jupyter:
tests/test_notebook.py); DISTNUM_RAY_LOGS=1 shows them, and the check sees them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest
from ray_log_lines import ray_log_lines
from run_helpers import TINY

# a user's session: distnum imported, their own ray.init(), a compiled graph, its teardown
USER_SESSION = """
import distnum
import ray
from ray.dag import InputNode

ray.init(num_cpus=1, include_dashboard=False)

@ray.remote
class Echo:
    def echo(self, value):
        return value

with InputNode() as step:
    dag = Echo.remote().echo.bind(step)
graph = dag.experimental_compile()
assert ray.get(graph.execute(7)) == 7
graph.teardown()
ray.shutdown()
"""


def test_distnum_ray_logs_brings_back_what_the_check_sees():
    """With DISTNUM_RAY_LOGS=1 Ray's own lines show: what distnum keeps out otherwise (see
    test_notebook.py for the same session in a kernel), and proof that ray_log_lines sees it."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    run = subprocess.run([sys.executable, "-c", USER_SESSION], capture_output=True, text=True,
                         timeout=180, env={**env, "DISTNUM_RAY_LOGS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    said = "\n".join(ray_log_lines(run.stderr))
    for phrase in ("Token authentication is enabled", "Started a local Ray instance",
                   "Tearing down compiled DAG", "Cancelling compiled worker",
                   "Teardown complete"):  # fmt: skip
        assert phrase in said, run.stderr


def test_a_command_line_run_prints_no_ray_log_line(mnist_dir, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    run = subprocess.run(
        [sys.executable, "-m", "distnum", "train", "--iters", "5", "--workers", "2",
         "--data-dir", str(mnist_dir), "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("done: 5 steps")
    assert ray_log_lines(run.stdout + run.stderr) == []


def test_a_small_dev_shm_prints_no_ray_log_line(tiny_mnist, tmp_path):
    """In a mount namespace whose /dev/shm holds 2 MB, Ray puts its object store in /tmp and
    warns; the run goes well (its own shared memory fits), so the warning is not shown."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare, to mount a small /dev/shm for one process")
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    train = shlex.join([sys.executable, "-m", "distnum", "train", "--iters", "12", "--workers",
                        "2", "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"),
                        *TINY])  # fmt: skip
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=2m tmpfs /dev/shm && exec {train}"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].startswith("done: 12 steps")
    assert ray_log_lines(run.stdout + run.stderr) == []
