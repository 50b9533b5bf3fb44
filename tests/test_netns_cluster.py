"""A Ray cluster of two hosts, each in its own network namespace (cluster/local_cluster.py
start --netns): a job submitted from the head's namespace runs on both hosts and gives the
bits of one machine, a link down for 2 s mid-run costs it nothing, and the worker host lost
mid-run costs it only its actor, replaced on the head; the hosts have their
own addresses, reach each other over the bridge, and their links carry the rate limit. Needs
root; skipped where network namespaces cannot be made."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import load_local_cluster
from run_helpers import TINY, actor_processes, reference_sha, wait_until

from distnum.training import train

local_cluster = load_local_cluster()

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None: tried with a namespace of our own."""
    if os.geteuid() != 0:
        return "needs root, to make network namespaces"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2's {' and '.join(missing)}"
    probe = f"distnum-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=True)
    return None


def output(command: list[str]) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def assert_nothing_left(info: dict) -> None:
    """No process of the cluster, none of its namespaces, and nothing of it in the root
    namespace (its links were never there)."""
    assert local_cluster.cluster_processes(info["session"]) == []
    assert local_cluster.recorded_processes(info["pids"]) == []
    network = info["netns"]
    assert not set(local_cluster.network_namespaces(network)) & local_cluster.namespaces()
    links = [network["bridge"]]
    for host in network["hosts"]:
        links += [host["link"], host["switch_link"]]
    root_links = output(["ip", "-o", "link", "show"])
    assert not [link for link in links if re.search(rf"\b{link}\b", root_links)]


@pytest.fixture(scope="module")
def cluster():
    """A head and one worker host of 1 CPU each, links at 1 Gbit/s; stopped at the end,
    leaving no process, namespace or link."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    state = Path(f"/tmp/distnum-netns-{os.getpid()}")
    info = local_cluster.start(1, [1], local_cluster.free_port(), local_cluster.free_port(), state,
                               netns=True, rate="1gbit")  # fmt: skip
    try:
        yield info
    finally:
        local_cluster.stop(state)
        assert_nothing_left(info)
        shutil.rmtree(state)


def in_namespace(namespace: str, command: list[str], timeout_s: float = 300):
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True,
                          text=True, timeout=timeout_s,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})  # fmt: skip


def submit_from_head(info: dict, entrypoint: list[str], timeout_s: float = 120):
    """`ray job submit` in the head's namespace (the job server listens on its 127.0.0.1),
    waiting for the job to end; retried while the job agent of a cluster that has just
    started takes no jobs yet ("No available agent")."""
    head = info["netns"]["hosts"][0]["namespace"]
    deadline = time.monotonic() + timeout_s
    while True:
        done = in_namespace(head, ["ray", "job", "submit", "--address", info["dashboard"], "--",
                                   *entrypoint])  # fmt: skip
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def processes_in(namespace: str) -> list[psutil.Process]:
    """The processes of a host: those in its network namespace."""
    found = []
    for pid in output(["ip", "netns", "pids", namespace]).split():
        try:
            found.append(psutil.Process(int(pid)))
        except psutil.NoSuchProcess:
            pass
    return found


def job_under_way(cluster: dict, data: Path, out: Path, iters: int) -> subprocess.Popen:
    """`distnum train` on both hosts (TINY), a job submitted from the head's namespace, once
    it is at its third epoch."""
    head = cluster["netns"]["hosts"][0]
    job = subprocess.Popen(
        ["ip", "netns", "exec", head["namespace"], "ray", "job", "submit", "--address",
         cluster["dashboard"], "--", "distnum", "train", "--address", "auto", "--iters",
         str(iters), "--workers", "2", "--data-dir", str(data), "--out", str(out), "--quiet",
         *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("test_acc") >= 3, 180, job)
    return job


def job_succeeded(job: subprocess.Popen, out: Path) -> tuple[dict, str]:
    """The job's summary.json and its output, once it has ended with success."""
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0 and "succeeded" in stdout, stdout + stderr
    return json.loads((out / "summary.json").read_text()), stdout + stderr


def test_job_from_the_head_namespace_runs_on_both_hosts_with_the_bits_of_one(
    cluster, mnist_dir, tmp_path
):
    out = tmp_path / "job"
    done = submit_from_head(cluster, [
        "distnum", "train", "--address", "auto", "--iters", "60", "--workers", "2",
        "--data-dir", str(mnist_dir), "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["actors_per_node"].values()) == [1, 1]
    alone = train(iters=60, local=True, data_dir=str(mnist_dir), out=str(tmp_path / "alone"),
                  quiet=True)  # fmt: skip
    assert summary["params_sha256"] == alone["params_sha256"]


def test_a_link_down_for_two_seconds_mid_run_costs_the_run_nothing(cluster, tiny_mnist, tmp_path):
    """The worker host's cable pulled at the switch for 2 s (less than a step's 10 s wait)
    while a job runs on both hosts: TCP carries the step across the gap, and the run ends
    with no actor replaced and the bits of one process."""
    network = cluster["netns"]
    worker = network["hosts"][1]
    out = tmp_path / "job"
    job = job_under_way(cluster, tiny_mnist, out, 3000)
    metrics = out / "metrics.jsonl"  # flushed at every epoch (6 steps)
    cable = ["ip", "-n", network["switch"], "link", "set", worker["switch_link"]]
    subprocess.run([*cable, "down"], check=True)
    epochs_before = metrics.read_text().count("test_acc")
    time.sleep(2)
    epochs_after = metrics.read_text().count("test_acc")
    subprocess.run([*cable, "up"], check=True)
    # the gap fell inside the run and held it (a step's request, or the loss the driver
    # asks for at an epoch's end, waited through it): some 30 epochs in 2 s otherwise
    assert job.poll() is None
    assert epochs_after - epochs_before <= 1
    summary, _ = job_succeeded(job, out)
    assert summary["worker_restarts"] == 0
    assert sorted(summary["actors_per_node"].values()) == [1, 1]
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 3000)


def raylet_port(namespace: str) -> int:
    """A TCP port the raylet of the host listens on, in the host's namespace."""
    listening = output(["ip", "netns", "exec", namespace, "ss", "-Hltnp"])
    ports = re.findall(r":(\d+)\s+\S+\s+users:\(\(\"raylet\"", listening)
    assert ports, listening
    return int(ports[0])


def test_hosts_have_benchmark_addresses_and_reach_each_other_over_the_bridge(cluster):
    network = cluster["netns"]
    head, worker = network["hosts"]
    for host in (head, worker):
        assert ipaddress.ip_address(host["address"]) in BENCHMARK_RANGE
        shown = output(["ip", "-n", host["namespace"], "-4", "-o", "addr", "show", host["link"]])
        assert f"inet {host['address']}/24" in shown
    bridged = output(["ip", "-n", network["switch"], "-o", "link", "show", "master",
                      network["bridge"]])  # fmt: skip
    assert head["switch_link"] in bridged and worker["switch_link"] in bridged
    # Ray knows the nodes by these addresses
    nodes = in_namespace(head["namespace"], ["ray", "list", "nodes", "--address",
                                             cluster["dashboard"], "--format", "json"])  # fmt: skip
    assert nodes.returncode == 0, nodes.stderr
    alive = [node["node_ip"] for node in json.loads(nodes.stdout) if node["state"] == "ALIVE"]
    assert sorted(alive) == [head["address"], worker["address"]]
    # the worker's raylet, in its namespace, answers a TCP connect from the head's
    where = (worker["address"], raylet_port(worker["namespace"]))
    connect = f"import socket; socket.create_connection({where!r}, timeout=5).close()"
    reached = in_namespace(head["namespace"], [sys.executable, "-c", connect], timeout_s=30)
    assert reached.returncode == 0, reached.stderr


def test_each_link_is_rate_limited_at_both_ends(cluster):
    network = cluster["netns"]
    for host in network["hosts"]:
        for namespace, link in ((host["namespace"], host["link"]),
                                (network["switch"], host["switch_link"])):  # fmt: skip
            shown = output(["tc", "-n", namespace, "qdisc", "show", "dev", link])
            assert re.search(r"qdisc tbf .* rate 1Gbit burst 262\d*b", shown), shown


# last in the module: the cluster's worker host does not come back
def test_the_worker_host_lost_mid_run_its_actor_replaced_on_the_head(cluster, tiny_mnist,
                                                                     tmp_path):  # fmt: skip
    """Every process of the worker host SIGKILLed at once (its raylet, its actor, its relay)
    while a job runs on both hosts: the run replaces the lost actor on the head, sharing
    the head's CPU, says so, and ends with exit 0 and the bits of one process."""
    worker = cluster["netns"]["hosts"][1]
    out = tmp_path / "job"
    job = job_under_way(cluster, tiny_mnist, out, 1000)
    host_processes = processes_in(worker["namespace"])
    assert actor_processes(host_processes, "GradientWorker")
    for process in host_processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    summary, said = job_succeeded(job, out)
    assert "starts again with 0 of a CPU, all the cluster has free" in said
    assert summary["worker_restarts"] >= 1
    assert list(summary["actors_per_node"].values()) == [2]  # both on the head now
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 1000)
