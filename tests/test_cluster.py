"""A real multi-node Ray cluster on this machine: cluster/local_cluster.py, job submission
through the Ray Jobs API, a driver from outside; and the cloud configs in cluster/."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CLUSTER, load_local_cluster
from run_helpers import (
    TINY,
    actor_processes,
    reference_sha,
    start_train,
    summary_of,
    wait_until,
)

from distnum.cli import build_parser
from distnum.training import train

local_cluster = load_local_cluster()


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker node of 1 CPU each, stopped at the end, leaving no process."""
    state = Path(f"/tmp/distnum-test-{os.getpid()}")
    info = local_cluster.start(1, [1], local_cluster.free_port(), local_cluster.free_port(), state)
    try:
        yield info
    finally:
        local_cluster.stop(state)
        port = int(info["address"].rpartition(":")[2])
        assert local_cluster.cluster_processes(info["session"], port) == []
        shutil.rmtree(state)


@pytest.fixture
def jobs(cluster):
    """The Ray Jobs API of the cluster, authenticating with the cluster's token."""
    from ray.job_submission import JobSubmissionClient

    token = local_cluster.auth_token()
    return JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {token}"})


def wait_for_job(client, job_id: str, timeout_s: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status, client.get_job_logs(job_id)
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def submit(client, entrypoint: str, timeout_s: float = 120) -> str:
    """Submit the job, waiting for the job agent of a cluster that has just started (under
    load it can take tens of seconds to take jobs: "No available agent")."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_job_runs_on_both_nodes(jobs, mnist_dir, tmp_path):
    out = tmp_path / "job"
    job_id = submit(jobs, (
        f"distnum train --address auto --iters 60 --workers 2 --data-dir {mnist_dir} "
        f"--out {out} --quiet"
    ))  # fmt: skip
    status, logs = wait_for_job(jobs, job_id)
    assert status == "SUCCEEDED", logs
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["actors_per_node"]) == 2 and sum(summary["actors_per_node"].values()) == 2
    assert math.isfinite(summary["final_loss"])
    for node in summary["actors_per_node"]:
        assert node in logs  # the job's output shows where the actors ran
    assert f"loss {summary['final_loss']:#.4g}" in logs


def test_job_with_a_bad_argument_fails_with_the_error_in_its_logs(jobs, tmp_path):
    job_id = submit(jobs, f"distnum train --engine slow --out {tmp_path}")
    status, logs = wait_for_job(jobs, job_id, timeout_s=120)
    assert status == "FAILED"
    assert "argument --engine: invalid choice: 'slow'" in logs


def test_driver_outside_the_cluster(cluster, mnist_dir, tmp_path):
    out = tmp_path / "outside"
    run = subprocess.run(
        [sys.executable, "-m", "distnum", "train", "--address", cluster["address"],
         "--iters", "60", "--workers", "2", "--data-dir", str(mnist_dir), "--out", str(out),
         "--quiet"],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["actors_per_node"]) == 2 and math.isfinite(summary["final_loss"])
    # actors on two nodes: the other's steps through its relay, and the bits of one process
    assert summary["transport"] == "shared memory and tcp"
    alone = train(iters=60, local=True, data_dir=str(mnist_dir), out=str(tmp_path / "alone"),
                  quiet=True)  # fmt: skip
    assert summary["params_sha256"] == alone["params_sha256"]


def test_joining_without_the_token_says_how_to_give_it(cluster, tiny_mnist, tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "RAY_AUTH_MODE"}
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "distnum", "train", "--address", cluster["address"],
         "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"), "--quiet", *TINY],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.splitlines()  # not Ray's warning a second for 20 s
    assert line.startswith(f"distnum: error: cannot join the Ray cluster at {cluster['address']}:")
    assert "RAY_AUTH_MODE=token" in line and "~/.ray/auth_token" in line
    assert time.monotonic() - started < 15
    assert list(tmp_path.iterdir()) == []  # the refused run left no folder


def test_each_other_host_gets_one_copy_of_the_parameters_per_step(cluster, bench_mnist, tmp_path):
    """`distnum bench --model` across the two nodes: the bytes sent to the other node per
    step are one copy of the parameters, with 1 actor there or 2."""
    run = subprocess.run(
        [sys.executable, "-m", "distnum", "bench", "--model", "--address", cluster["address"],
         "--data-dir", str(bench_mnist), "--hidden-sizes", "10", "--workers", "4", "--steps", "3",
         "--plot", str(tmp_path / "model.png"), "--json"],
        env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (model,) = json.loads(run.stdout)["model"]
    params_bytes = 8 * model["params"]
    to_host = model["bytes_to_each_host"]
    assert set(to_host) == {"2", "4"}  # 1 and 2 actors on the other node
    assert to_host["2"] == to_host["4"]  # (the same batch and loss rows each step)
    assert params_bytes < to_host["2"] < params_bytes + 8 * 2 * 100 + 64
    # back: the other node's slice, about half the gradient, and its losses
    for n in ("2", "4"):
        assert 0.3 * params_bytes < model["bytes_from_each_host"][n] < 0.7 * params_bytes
    assert model["host_delay_s"] == model["two_host_overhead_s"]["2"] - model["overhead_s"]["2"]
    # one hidden size: no fit, d0 = d
    assert model["host_fixed_s"] == model["host_delay_s"] and model["bytes_per_s_here"] is None
    assert set(model["predicted_speedup"]) == {"10 Gbit/s", "25 Gbit/s"}


@pytest.mark.parametrize("victim", ["GradientWorker", "HostRelay"])
def test_an_actor_or_the_relay_killed_on_the_other_node(cluster, victim, tiny_mnist, tmp_path):
    """SIGKILL to the other node's worker actor, or to its relay: the run replaces what died
    and ends with the bits of a run without faults."""
    out = tmp_path / "run"
    run = start_train("--address", cluster["address"], "--iters", "300", "--workers", "2",
                      "--quiet", "--data-dir", str(tiny_mnist), "--out", str(out), *TINY,
                      env={**os.environ, "RAY_AUTH_MODE": "token"})  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("test_acc") >= 3, 180, run)
    port = int(cluster["address"].rpartition(":")[2])
    processes = local_cluster.cluster_processes(cluster["session"], port)
    (relay,) = actor_processes(processes, "HostRelay")
    if victim == "GradientWorker":  # the relay's neighbour: on the same node, under its raylet
        (relay,) = actor_processes(relay.parent().children(), "GradientWorker")
    relay.send_signal(signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    summary = summary_of(out)
    assert summary["worker_restarts"] >= 1 and summary["transport"] == "shared memory and tcp"
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 300)


def train_command(command_line: str):
    """The parsed `distnum train` arguments of a command line that runs it."""
    words = shlex.split(command_line)
    start = words.index("distnum")
    assert words[start + 1] == "train", command_line
    return build_parser().parse_args(words[start + 1 :])


def test_kuberay_rayjob_runs_a_valid_train_command():
    manifest = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    args = train_command(manifest["spec"]["entrypoint"])
    assert args.address == "auto" and args.workers >= 1
    cluster_spec = manifest["spec"]["rayClusterSpec"]
    containers = [cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        group["template"]["spec"]["containers"][0] for group in cluster_spec["workerGroupSpecs"]
    ]
    for container in containers:
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    assert "CHANGE" in (CLUSTER / "rayjob.yaml").read_text()


def test_cluster_launcher_config_is_valid_and_runs_a_valid_train_command():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema for `ray up`
    assert config["provider"]["type"] == "aws"
    submit = [c for c in config["head_start_ray_commands"] if "distnum train" in c]
    assert len(submit) == 1 and "ray job submit" in submit[0]
    args = train_command(submit[0])
    assert args.address == "auto"
    assert "CHANGE" in (CLUSTER / "aws.yaml").read_text()
