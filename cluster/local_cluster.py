#!/usr/bin/env python3
"""Start and stop a multi-node Ray cluster on this one machine, for development and tests.

    python cluster/local_cluster.py start --head-cpus 1 --worker-cpus 1 [--worker-cpus 2 ...]
    python cluster/local_cluster.py start --netns [--rate 1gbit] ...    (as root)
    python cluster/local_cluster.py stop

A head node and one worker node per --worker-cpus, each a real raylet with its own CPU count,
token authentication on (the token in ~/.ray/auth_token, or RAY_AUTH_TOKEN), the dashboard
and the job server on 127.0.0.1. `start` prints the addresses as JSON, with the commands that
run a driver and submit a job ("driver", "job_submit"):
    {"address": "127.0.0.1:6390", "dashboard": "http://127.0.0.1:8275", ...}

With --netns each node is a host of its own: a network namespace with its own address in
198.18.0.0/24 (the benchmarking range, never a real network's), its link a veth pair to a
bridge in a "switch" namespace; --rate caps each link in both directions (tc tbf). Nothing is
added to the root namespace, so the cluster is reached from the head's namespace, where the
dashboard's 127.0.0.1 is:
    ip netns exec dn1a2b3c-host0 env RAY_AUTH_MODE=token \\
        ray job submit --address http://127.0.0.1:8275 -- distnum train --address auto ...
A job's driver runs on the head node, in its namespace. A driver started there by hand should
name the cluster (--address 198.18.0.1:6390): `auto` without RAY_ADDRESS takes any Ray it
finds on this machine.

`stop` ends every process of that cluster (and only those: not another Ray on this machine,
so never `ray stop`), found by the cluster's session name, with their children, and with
--netns every process left in its namespaces; then it deletes the namespaces, and with them
the links and the bridge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil

DEFAULT_STATE = Path("/tmp/distnum-cluster")  # short: Ray's socket paths must stay short
SUBNET = "198.18.0"  # a /24 of 198.18.0.0/15, reserved for benchmarks: no real network's


class Node(NamedTuple):
    """Where one Ray node runs: its address, the command prefix that runs a command on it
    (`ip netns exec <namespace>` with --netns), and its temp dir (None: the head's)."""

    ip: str
    via: list[str]
    temp_dir: Path | None


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


def net(args: list[str]) -> str:
    """Run an `ip` or `tc` command; a failure ends start or stop with one line that names
    the command and gives its complaint."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        complaint = " ".join(done.stderr.split())
        raise SystemExit(f"local_cluster: `{shlex.join(args)}` failed: {complaint}")
    return done.stdout


def auth_token() -> str:
    """The cluster's token: RAY_AUTH_TOKEN, else ~/.ray/auth_token, made if there is none."""
    return (
        os.environ.get("RAY_AUTH_TOKEN")
        or run([ray_command(), "get-auth-token", "--generate"]).strip()
    )


def free_port() -> int:
    """A port free now on this machine: each node's agent needs its own (Ray's default,
    52365, is taken by the first node, or by another Ray here, and then the job agent of
    the head never starts: "No available agent to submit job"). A new namespace has no
    sockets at all, so the port is free there too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_name(temp_dir: Path) -> str:
    """The Ray session of the cluster whose temp dir is temp_dir (session_<date>_<pid>)."""
    return os.path.basename(os.path.realpath(temp_dir / "session_latest"))


def in_my_namespace(process: psutil.Process) -> bool:
    """Whether the process shares this one's network namespace: a port names a server only
    there (a --netns cluster may use the same port as one in the root namespace)."""
    try:
        return os.readlink(f"/proc/{process.pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


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
            and in_my_namespace(process)
        ):
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def alive_nodes(address: str, via: list[str]) -> int:
    """How many nodes of the cluster at address are alive, from `ray status` run via the
    command prefix `via` (on the head node)."""
    try:
        status = run([*via, ray_command(), "status", "--address", address])
    except RuntimeError:
        return 0
    active = status.split("Active:")[1].split("Pending:")[0] if "Active:" in status else ""
    return len(re.findall(r"node_", active))


def check_netns_support(rate: str | None) -> None:
    """--netns makes namespaces and links: it needs root, `ip`, and for --rate `tc`."""
    if os.geteuid() != 0:
        raise SystemExit("local_cluster: --netns needs root (it creates network namespaces)")
    for tool in ["ip", "tc"] if rate else ["ip"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"local_cluster: --netns needs the `{tool}` command (iproute2)")


def namespaces() -> set[str]:
    """The named network namespaces of this machine (`ip netns list`)."""
    return {line.split()[0] for line in net(["ip", "netns", "list"]).splitlines() if line}


def plan_network(state: Path, hosts: int, rate: str | None) -> dict:
    """Names and addresses of a --netns cluster's namespaces and links. The names start
    with a prefix made from the state dir, so that clusters with other state dirs never
    clash; a link's name stays within Linux's 15 characters."""
    if hosts > 254:
        raise SystemExit(f"local_cluster: --netns has addresses for 254 nodes, not {hosts}")
    prefix = "dn" + hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:6]
    return {
        "switch": f"{prefix}-switch",
        "bridge": f"{prefix}br",
        "rate": rate,
        "hosts": [
            {
                "namespace": f"{prefix}-host{i}",
                "address": f"{SUBNET}.{i + 1}",
                "link": f"{prefix}h{i}",
                "switch_link": f"{prefix}s{i}",
            }
            for i in range(hosts)
        ],
    }


def network_namespaces(network: dict) -> list[str]:
    """The namespaces of the network plan: the hosts', then the switch."""
    return [host["namespace"] for host in network["hosts"]] + [network["switch"]]


def refuse_taken(network: dict) -> None:
    """Fail before anything is recorded if a namespace of the plan exists: stop() deletes
    every recorded one, and must delete none it did not make."""
    taken = set(network_namespaces(network)) & namespaces()
    if taken:
        raise SystemExit(f"local_cluster: namespaces {sorted(taken)} exist already; "
                         "`ip netns delete` them if no cluster uses them")  # fmt: skip


def make_network(network: dict) -> None:
    """The switch namespace with its bridge, then each host (add_host)."""
    switch, bridge = network["switch"], network["bridge"]
    net(["ip", "netns", "add", switch])
    net(["ip", "-n", switch, "link", "add", bridge, "type", "bridge"])
    net(["ip", "-n", switch, "link", "set", bridge, "up"])
    for host in network["hosts"]:
        add_host(network, host)


def add_host(network: dict, host: dict) -> None:
    """A host's namespace, joined to the bridge by a veth pair made in the switch namespace
    (so never in the root one), with its address, lo up, and a default route to the bridge:
    Ray's processes find their own address by a UDP "connect" to an outside address, which
    fails without a route (Ray then warns, and answers 127.0.0.1). The route leads to the
    bridge, which leads nowhere: no packet leaves the machine."""
    switch, namespace = network["switch"], host["namespace"]
    link, port = host["link"], host["switch_link"]
    net(["ip", "netns", "add", namespace])
    net(["ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", link,
         "netns", namespace])  # fmt: skip
    net(["ip", "-n", switch, "link", "set", port, "master", network["bridge"], "up"])
    net(["ip", "-n", namespace, "addr", "add", f"{host['address']}/24", "dev", link])
    net(["ip", "-n", namespace, "link", "set", link, "up"])
    net(["ip", "-n", namespace, "link", "set", "lo", "up"])
    net(["ip", "-n", namespace, "route", "add", "default", "dev", link])
    if network["rate"]:
        # both ends: each caps what leaves its side, so the host's sending and receiving;
        # a burst much below 256 kb throttles far below the rate
        for where, device in ((namespace, link), (switch, port)):
            net(["tc", "-n", where, "qdisc", "add", "dev", device, "root", "tbf",
                 "rate", network["rate"], "burst", "256kb", "latency", "50ms"])  # fmt: skip


def remove_network(network: dict) -> None:
    """Delete the cluster's namespaces; its links (a veth pair goes with either end) and
    its bridge go with them. Fails if one is left."""
    mine = network_namespaces(network)
    for namespace in [name for name in mine if name in namespaces()]:
        net(["ip", "netns", "delete", namespace])
    left = set(mine) & namespaces()
    if left:
        raise SystemExit(f"local_cluster: could not delete namespaces {sorted(left)}")


def nodes_of(network: dict | None, nodes: int, state: Path) -> list[Node]:
    """Where the cluster's nodes run: with a network each in its namespace with its own
    temp dir, as on separate hosts; otherwise all on 127.0.0.1, sharing the head's."""
    if network is None:
        return [Node("127.0.0.1", [], state / "ray")] + [
            Node("127.0.0.1", [], None) for _ in range(nodes - 1)
        ]
    return [
        Node(host["address"], ["ip", "netns", "exec", host["namespace"]],
             state / ("ray" if i == 0 else f"ray{i}"))
        for i, host in enumerate(network["hosts"])
    ]  # fmt: skip


def how_to_run(info: dict, head: Node, cpus: int) -> dict[str, str]:
    """The commands that run a driver, and submit a job, on the cluster (from the head's
    namespace with --netns: the dashboard listens on its 127.0.0.1)."""
    prefix = shlex.join([*head.via, "env", "RAY_AUTH_MODE=token"])
    commands = {"driver": f"{prefix} distnum train --address {info['address']} --workers {cpus}"}
    if info["dashboard"]:
        commands["job_submit"] = (f"{prefix} ray job submit --address {info['dashboard']} -- "
                                  f"distnum train --address auto --workers {cpus}")  # fmt: skip
    return commands


def record(state: Path, info: dict) -> None:
    (state / "cluster.json").write_text(json.dumps(info, indent=2))


def start(head_cpus: int, worker_cpus: list[int], port: int, dashboard_port: int | None,
          state: Path, netns: bool = False, rate: str | None = None) -> dict:  # fmt: skip
    """Start the cluster, recording in state/cluster.json what it makes before making it,
    so that stop() removes it all, also after a failed start (which calls stop()). With no
    dashboard_port, no dashboard (and no job server): a cluster for drivers alone."""
    if (state / "cluster.json").exists():
        raise SystemExit(f"local_cluster: a cluster is already recorded in {state}; stop it first")
    if netns:
        check_netns_support(rate)
    state.mkdir(parents=True, exist_ok=True)
    ray = ray_command()
    auth_token()  # every node of this machine reads it from ~/.ray/auth_token
    nodes = 1 + len(worker_cpus)
    network = plan_network(state, nodes, rate) if netns else None
    if network:
        refuse_taken(network)
    head, *workers = nodes_of(network, nodes, state)
    info: dict = {
        "address": f"{head.ip}:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}" if dashboard_port else None,
        "temp_dir": str(state / "ray"),
        "nodes": nodes,
    }
    if network:
        info["netns"] = network
    record(state, info)
    try:
        if network:
            make_network(network)
        start_nodes(info, head, workers, head_cpus, worker_cpus, ray, state)
        info.update(how_to_run(info, head, head_cpus + sum(worker_cpus)))
        record(state, info)
    except BaseException:
        stop(state)
        raise
    return info


def start_nodes(info: dict, head: Node, workers: list[Node], head_cpus: int,
                worker_cpus: list[int], ray: str, state: Path) -> None:  # fmt: skip
    """Start the head, then the worker nodes, and wait until all are alive; records the
    session and the pids of the nodes' processes."""
    dashboard = (["--dashboard-host=127.0.0.1",
                  f"--dashboard-port={info['dashboard'].rpartition(':')[2]}"]
                 if info["dashboard"] else ["--include-dashboard=false"])  # fmt: skip
    run([
        *head.via, ray, "start", "--head", f"--node-ip-address={head.ip}",
        f"--port={info['address'].rpartition(':')[2]}", f"--num-cpus={head_cpus}",
        *dashboard, f"--temp-dir={head.temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
    ])  # fmt: skip
    info["session"] = session_name(head.temp_dir)
    record(state, info)
    for cpus, node in zip(worker_cpus, workers, strict=True):
        temp_dir = [f"--temp-dir={node.temp_dir}"] if node.temp_dir else []
        run([*node.via, ray, "start", f"--address={info['address']}",
             f"--node-ip-address={node.ip}", f"--num-cpus={cpus}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
             *temp_dir])  # fmt: skip
    deadline = time.monotonic() + 60
    while alive_nodes(info["address"], head.via) < info["nodes"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"local_cluster: {info['nodes']} nodes did not come up in 60 s")
        time.sleep(0.5)
    info["pids"] = {p.pid: p.create_time() for p in processes_of(info)}


def recorded_processes(pids: dict) -> list[psutil.Process]:
    """The recorded processes still running: same pid and same start time (pids are reused)."""
    running = []
    for pid, started in pids.items():
        try:
            process = psutil.Process(int(pid))
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def namespace_processes(network: dict) -> list[psutil.Process]:
    """The processes in the cluster's namespaces: its nodes', and any other (a driver, a
    shell): a deleted namespace lives on, unseen, while a process is in it."""
    found = []
    existing = namespaces()
    for namespace in [name for name in network_namespaces(network) if name in existing]:
        for pid in net(["ip", "netns", "pids", namespace]).split():
            try:
                process = psutil.Process(int(pid))
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except psutil.NoSuchProcess:
                pass
    return found


def processes_of(info: dict) -> list[psutil.Process]:
    """The cluster's processes now: those of its session (cluster_processes; with --netns
    without the client server's port, which another cluster may use), those in its
    namespaces, and those recorded at its start."""
    found: list[psutil.Process] = []
    if "session" in info:
        port = None if "netns" in info else int(info["address"].rpartition(":")[2])
        found += cluster_processes(info["session"], port)
    if "netns" in info:
        found += namespace_processes(info["netns"])
    found += recorded_processes(info.get("pids", {}))
    return list({p.pid: p for p in found}.values())


def stop(state: Path, timeout_s: float = 60) -> int:
    """End the recorded cluster's processes, and return only when none is left (processes
    that start while others end, such as a client server, are found on the next pass);
    then delete its namespaces. Returns how many processes there were."""
    record_file = state / "cluster.json"
    if not record_file.exists():
        return 0
    info = json.loads(record_file.read_text())
    ended: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while processes := processes_of(info):
        if time.monotonic() > deadline:
            raise SystemExit(f"local_cluster: could not end {[p.pid for p in processes]}")
        ended.update(p.pid for p in processes)
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        # most end at once; the GCS server takes its time (over 10 s), and has nothing to keep
        _, still_alive = psutil.wait_procs(processes, timeout=2)
        for process in still_alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(still_alive, timeout=10)
    if "netns" in info:
        remove_network(info["netns"])
    record_file.unlink()
    return len(ended)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help=f"where the cluster's record and Ray's files go ({DEFAULT_STATE})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    begin = commands.add_parser("start", help="start a head node and worker nodes")
    begin.add_argument("--head-cpus", type=int, default=1,
                       help="CPUs of the head node, where the driver runs (default 1)")  # fmt: skip
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
    begin.add_argument(
        "--netns",
        action="store_true",
        help=f"each node in its own network namespace, at {SUBNET}.N (needs root)",
    )
    begin.add_argument("--rate", help="with --netns: each node's link rate, as tc says it (1gbit)")
    commands.add_parser("stop", help="end every process of the cluster, remove its namespaces")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "start":
        if args.rate and not args.netns:
            parser.error("--rate needs --netns")
        info = start(args.head_cpus, args.worker_cpus or [1], args.port, args.dashboard_port,
                     args.state, args.netns, args.rate)  # fmt: skip
        print(json.dumps(info))
    else:
        print(f"stopped {stop(args.state)} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
