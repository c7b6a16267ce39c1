"""A real multi-node Ray cluster on this machine: a head and extra nodes, each a `ray start --block`
process of its own, with its own temp dir, ports and a custom resource naming it (`head`, `node2`).

The nodes talk over this host's own address: on Linux Ray replaces 127.0.0.1 given as a node's IP
by the address it reaches the network from (`services.resolve_ip_for_localhost`), so all nodes carry
that one IP; nothing leaves the machine. Two raylets coexist on one host when nothing they bind is
shared. On Ray 2.60 that is: the node manager and object manager ports, the dashboard agent's HTTP
port (52365 by default: it must be set), its gRPC port, the metrics export port, the runtime-env
agent port, and the workers' ports (10002-19999 on every node by default: `--min-worker-port=0
--max-worker-port=0` lets the OS pick each worker's). Each node also gets its own `--temp-dir`,
which Ray 2.60 accepts on a non-head node ("can be specified per node"): its sockets, session logs
and `ray_current_cluster` stay there and nothing lands in the shared /tmp/ray. The object stores are
small (both nodes share this machine's /dev/shm).

Nodes are stopped by pid, the whole process tree of their `ray start` (raylet, agents and the
worker processes the raylet forked), never with `ray stop`, which stops every Ray on the machine.
A node's logs are kept in `logs_dir` when one is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 300 * 1024**2


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its descendants (empty once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, timeout: float = 30) -> None:
    """SIGKILL `pid` and everything under it, as when its machine goes away. Everything is stopped
    (SIGSTOP) first, so no process forks a child or lets one be reparented after it was listed."""
    for _ in range(100):  # until the listed tree is all stopped (a process in D state takes a moment)
        tree = process_tree(pid)
        running = [p for p in tree if _status(p) not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)]
        if not running:
            break
        for proc in running:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()
        time.sleep(0.01)
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=timeout)


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


@dataclass
class Node:
    """One node: a `ray start --block` process and its tree (raylet, agents, workers)."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    logs_dir: Path | None = None

    def processes_titled(self, title: str) -> list[int]:
        """Pids of this node's processes whose command line (Ray sets it to `ray::<actor>...`) holds
        `title`."""
        found = []
        for proc in process_tree(self.process.pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                if title in " ".join(proc.cmdline()):
                    found.append(proc.pid)
        return found

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the node's whole process tree, as when its machine goes away (also how the tests
        stop a node: nothing of it is left to shut down cleanly)."""
        kill_tree(self.process.pid)
        self.process.wait()
        self._discard()

    def _discard(self) -> None:
        """Remove the node's temp dir, keeping its session logs in `logs_dir` if given."""
        if self.logs_dir is not None:
            with contextlib.suppress(OSError):
                shutil.copytree(
                    self.temp_dir / "session_latest" / "logs",
                    self.logs_dir / f"{self.name}-{self.process.pid}",
                    ignore_dangling_symlinks=True,
                )
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Cluster:
    """A head with the job server, and extra nodes that join it."""

    env: dict[str, str]
    gcs_port: int
    dashboard_port: int
    head: Node
    logs_dir: Path | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    names: set[str] = field(default_factory=lambda: {"head"})  # every node name ever started
    last_listing: subprocess.CompletedProcess | None = None

    @property
    def address(self) -> str:
        """The job server's address, for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def add_node(self, name: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        """Start a node that joins the head, with its own temp dir, ports and resource `{name: 1}` (and
        `resources`), and wait until the head lists it alive."""
        before = set(self.alive_nodes())
        manager, objects, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
        temp_dir = Path(tempfile.mkdtemp(prefix=f"kto-ray-{name}-", dir="/tmp"))
        process = _start(
            [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
             f"--resources={json.dumps({name: 1} | (resources or {}))}",
             f"--node-manager-port={manager}", f"--object-manager-port={objects}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--temp-dir={temp_dir}"],
            self.env,
        )  # fmt: skip
        node = self.nodes[name] = Node(name, process, temp_dir, self.logs_dir)
        self.names.add(name)
        self.wait_until(
            lambda: any(n == name and i not in before for i, n in self.alive_nodes().items()),
            f"node {name} to join",
            node,
        )
        return node

    def kill_node(self, name: str) -> None:
        """The node's machine is gone: SIGKILL its raylet, agents and workers, all at once."""
        self.nodes.pop(name).kill()

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> name (its custom resource) of the nodes the head sees alive."""
        return self.node_ids(alive=True)

    def node_ids(self, alive: bool = False) -> dict[str, str]:
        """Node id -> name (its custom resource) of every node the head has seen (or only live ones)."""
        state = ["--filter", "state=ALIVE"] if alive else []
        listed = self.ray("list", "nodes", "--address", self.address, *state, "--format", "json", "--detail")
        self.last_listing = listed  # for the message when a wait runs out
        try:
            nodes = json.loads(listed.stdout) if listed.returncode == 0 else []
        except ValueError:  # an empty list prints "No resource in the cluster", whatever the format
            nodes = []
        return {
            node["node_id"]: name
            for node in nodes
            for name in node.get("resources_total", {})
            if name in self.names
        }

    def actor_nodes(self, class_name: str, job_id: str) -> list[str]:
        """The node ids that the job's actors of `class_name` ran on (dead ones included), by the state
        API; `node_ids()` names them."""
        listed = self.ray(
            "list", "actors", "--address", self.address, "--filter", f"class_name={class_name}",
            "--filter", f"job_id={job_id}", "--format", "json", "--detail", "--limit", "1000",
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        return [actor["node_id"] for actor in json.loads(listed.stdout)]

    def _last_words(self) -> str:
        listed = self.last_listing
        if listed is None:
            return "no node listing yet"
        out, err = listed.stdout[-500:], listed.stderr[-1500:]
        return f"the last `ray list nodes`: rc {listed.returncode}, stdout {out!r}, stderr {err!r}"

    def wait_until(self, condition, what: str, node: Node | None = None, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout  # a loaded 2-core machine can take minutes
        while not condition():
            assert self.head.alive(), "the head's ray start exited"
            assert node is None or node.alive(), f"ray start of {node.name} exited"
            assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}; {self._last_words()}"
            time.sleep(1)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it (the test process's main
    thread) dies, however it dies, so a killed test run leaves no node running; `ray start --block`
    stops its node's processes on SIGTERM."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--min-worker-port=0",
         "--max-worker-port=0", f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
         *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )  # fmt: skip


@contextlib.contextmanager
def ray_cluster(
    head_cpus: int = 2,
    extra_env: dict[str, str] | None = None,
    logs_dir: Path | None = None,
    head_resources: dict[str, float] | None = None,
) -> Iterator[Cluster]:
    """A head (resource `head`, and `head_resources`) with the dashboard and job server; `add_node`
    joins more nodes. Every node is stopped by its pid at the end; with `logs_dir`, each node's Ray
    logs are kept there."""
    gcs, dashboard, client, manager, objects, agent_http, agent_grpc, metrics, runtime_env = free_ports(9)
    # Token auth as on a real cluster: head, nodes, job driver and the `ray` client share one secret.
    env = (
        os.environ
        | (extra_env or {})
        | {
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            # Ray's system config (RAY_<name>): the GCS declares a node dead after 5 failed health checks,
            # one each 3 s by default; here one a second, so a lost node is noticed in ~5 s, not ~15 s.
            # A killed raylet fails each check at once; a busy one still has the 10 s timeout per check.
            "RAY_health_check_period_ms": "1000",
        }
    )
    env.pop("RAY_ADDRESS", None)
    # Every process of the cluster (and the `ray` clients) must find this head's API server. Without
    # this, a Ray process (Ray Train's placement-group cleaner, which asks the state API whether our
    # controller lives) looks for it through /tmp/ray/ray_current_cluster, which names another Ray on a
    # shared machine (it would not know our controller and our placement group would be removed
    # mid-run), or, with no such file, fails with "Found multiple active Ray instances".
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    temp_dir = Path(tempfile.mkdtemp(prefix="kto-ray-head-", dir="/tmp"))  # short: socket paths are capped
    resources = {"head": 1} | (head_resources or {})
    head = _start(
        ["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", f"--resources={json.dumps(resources)}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--node-manager-port={manager}",
         f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp_dir}"],
        env,
    )  # fmt: skip
    cluster = Cluster(env, gcs, dashboard, Node("head", head, temp_dir, logs_dir), logs_dir)
    try:
        cluster.wait_until(
            lambda: cluster.ray("job", "list", "--address", cluster.address).returncode == 0,
            "the job server",
        )
        cluster.wait_until(lambda: "head" in cluster.alive_nodes().values(), "the head in the node list")
        yield cluster
    finally:
        for node in [*cluster.nodes.values(), cluster.head]:
            node.kill()
