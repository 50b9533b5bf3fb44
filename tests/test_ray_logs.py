"""None of Ray's own log lines in a run that goes well, on the command line (in Jupyter:
tests/test_notebook.py); and that the check would see them."""

from __future__ import annotations

import os
import subprocess
import sys

from ray_log_lines import ray_log_lines

# a session of Ray alone, without distnum: its own ray.init(), a compiled graph, the teardown
PLAIN_RAY = """
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


def test_the_check_sees_the_lines_ray_writes_without_distnum():
    """What distnum keeps out (see test_notebook.py for a kernel where the user calls
    ray.init() after importing distnum), and proof that ray_log_lines sees it."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    run = subprocess.run([sys.executable, "-c", PLAIN_RAY], capture_output=True, text=True,
                         timeout=180, env=env)  # fmt: skip
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
