"""None of Ray's own log lines in a run that goes well, on the command line (in Jupyter:
tests/test_notebook.py); DISTNUM_RAY_LOGS=1 shows them, and the check sees them."""

from __future__ import annotations

import os
import subprocess
import sys

from ray_log_lines import ray_log_lines

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
