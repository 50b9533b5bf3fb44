"""None of Ray's own log lines in a run that goes well: with the user's ray.init() and on the
command line. (The notebook's cells: tests/test_notebook.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ray_log_lines import ray_log_lines

# a user's session: their own ray.init() with Ray's defaults, a compiled graph, its teardown
USER_SESSION = """
import sys
import ray
from ray.dag import InputNode

if sys.argv[1] == "with-distnum":
    import distnum  # noqa: F401

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
print("done")
"""


def run_user_session(mode: str) -> str:
    env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_MODE"}
    run = subprocess.run([sys.executable, "-c", USER_SESSION, mode], capture_output=True,
                         text=True, timeout=180, env=env)  # fmt: skip
    assert run.returncode == 0 and run.stdout == "done\n", run.stderr
    return run.stderr


@pytest.mark.parametrize("mode", ["plain-ray", "with-distnum"])
def test_importing_distnum_keeps_ray_quiet_for_the_users_own_ray_init(mode):
    lines = ray_log_lines(run_user_session(mode))
    if mode == "plain-ray":  # what distnum keeps out, and proof that the check sees it
        said = "\n".join(lines)
        for phrase in ("Token authentication is enabled", "Started a local Ray instance",
                       "Tearing down compiled DAG", "Cancelling compiled worker",
                       "Teardown complete"):  # fmt: skip
            assert phrase in said, said
    else:
        assert lines == []


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
