#!/usr/bin/env python3
"""Start and stop a multi-node Ray cluster on this one machine, for development and tests.

    python cluster/local_cluster.py start --head-cpus 1 --worker-cpus 1 [--worker-cpus 2 ...]
    python cluster/local_cluster.py stop

A head node and one worker node per --worker-cpus, each a real raylet with its own CPU count,
token authentication on (the token in ~/.ray/auth_token, or RAY_AUTH_TOKEN), the dashboard
and the job server on 127.0.0.1. `start` prints the addresses as JSON:
    {"address": "127.0.0.1:6390", "dashboard": "http://127.0.0.1:8275", ...}
`stop` ends every process of that cluster (and only those: not another Ray on this machine,
so never `ray stop`), found by the cluster's session name, with their children.
"""

from __future__ import annotations

import argparse
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

DEFAULT_STATE = Path("/tmp/distnum-cluster")  # short: Ray's socket paths must stay short


def ray_command() -> str:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(ray).exists():
        raise SystemExit(
            "local_cluster: the `ray` command is not installed (pip install 'ray[default]')"
        )
    return ray


def auth_env() -> dict[str, str]:
    """The environment of a process that joins or talks to the cluster."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def run(args: list[str]) -> str:
    done = subprocess.run(args, env=auth_env(), capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def auth_token() -> str:
    """The cluster's token: RAY_AUTH_TOKEN, else ~/.ray/auth_token, made if there is none."""
    return (
        os.environ.get("RAY_AUTH_TOKEN")
        or run([ray_command(), "get-auth-token", "--generate"]).strip()
    )


def session_name(temp_dir: Path) -> str:
    """The Ray session of the cluster whose temp dir is temp_dir (session_<date>_<pid>)."""
    return os.path.basename(os.path.realpath(temp_dir / "session_latest"))


def cluster_processes(session: str, port: int | None = None) -> list[psutil.Process]:
    """Every process of the session: those naming it on their command line (GCS, raylets,
    dashboard, agents, monitors), the head's Ray client server (it names only the GCS
    port), and all their descendants (the worker processes)."""
    client_server = f":{port}" if port is not None else None
    roots = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # ended, waiting for its parent to collect it
        cmdline = process.info["cmdline"] or []
        if any(session in part for part in cmdline) or (
            client_server
            and "ray.util.client.server" in cmdline
            and any(
                part.startswith("--address=") and part.endswith(client_server) for part in cmdline
            )  # fmt: skip
        ):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def alive_nodes(address: str) -> int:
    """How many nodes of the cluster at address are alive, from `ray status`."""
    try:
        status = run([ray_command(), "status", "--address", address])
    except RuntimeError:
        return 0
    active = status.split("Active:")[1].split("Pending:")[0] if "Active:" in status else ""
    return len(re.findall(r"node_", active))


def start(head_cpus: int, worker_cpus: list[int], port: int, dashboard_port: int,
          state: Path) -> dict:  # fmt: skip
    if (state / "cluster.json").exists():
        raise SystemExit(f"local_cluster: a cluster is already recorded in {state}; stop it first")
    state.mkdir(parents=True, exist_ok=True)
    temp_dir = state / "ray"
    ray = ray_command()
    auth_token()  # every node of this machine reads it from ~/.ray/auth_token
    address = f"127.0.0.1:{port}"
    run([
        ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--num-cpus={head_cpus}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ])  # fmt: skip
    info = {
        "address": address,
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "session": session_name(temp_dir),
        "temp_dir": str(temp_dir),
        "nodes": 1 + len(worker_cpus),
    }
    (state / "cluster.json").write_text(json.dumps(info, indent=2))
    for cpus in worker_cpus:
        run([ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={cpus}", "--disable-usage-stats"])  # fmt: skip
    deadline = time.monotonic() + 60
    while alive_nodes(address) < info["nodes"]:
        if time.monotonic() > deadline:
            stop(state)
            raise SystemExit(f"local_cluster: {info['nodes']} nodes did not come up in 60 s")
        time.sleep(0.5)
    return info


def stop(state: Path, timeout_s: float = 60) -> int:
    """End the recorded cluster's processes, and return only when none is left (processes
    that start while others end, such as a client server, are found on the next pass);
    returns how many there were."""
    record = state / "cluster.json"
    if not record.exists():
        return 0
    info = json.loads(record.read_text())
    port = int(info["address"].rpartition(":")[2])
    ended: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while processes := cluster_processes(info["session"], port):
        if time.monotonic() > deadline:
            raise SystemExit(f"local_cluster: could not end {[p.pid for p in processes]}")
        ended.update(p.pid for p in processes)
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, still_alive = psutil.wait_procs(processes, timeout=10)
        for process in still_alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(still_alive, timeout=10)
    record.unlink()
    return len(ended)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help=f"where the cluster's record and Ray's files go ({DEFAULT_STATE})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start a head node and worker nodes")
    begin.add_argument("--head-cpus", type=int, default=1)
    begin.add_argument(
        "--worker-cpus",
        type=int,
        action="append",
        default=None,
        help="CPUs of one worker node; repeat for more nodes (default: one of 1)",
    )
    begin.add_argument("--port", type=int, default=6390, help="the head's GCS port")
    begin.add_argument(
        "--dashboard-port", type=int, default=8275, help="dashboard and job server, on 127.0.0.1"
    )
    commands.add_parser("stop", help="end every process of the cluster")
    args = parser.parse_args(argv)
    if args.command == "start":
        info = start(args.head_cpus, args.worker_cpus or [1], args.port, args.dashboard_port,
                     args.state)  # fmt: skip
        print(json.dumps(info))
    else:
        print(f"stopped {stop(args.state)} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
