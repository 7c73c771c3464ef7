"""A Ray cluster of several nodes on this machine: a head and worker nodes, each a real raylet
started by `ray start --block` with its own resources, so that a study can be spread over nodes
and a whole node lost (tests/test_ray_nodes.py, `python -m study.tools.chaos --fault node`).

    with ray_nodes.cluster({"a": {}, "b": {"--num-gpus": "1"}}) as nodes:
        ...  # drivers join with --backend ray --address nodes.address, env nodes.driver_env
        nodes.kill("a")   # every process of node a, kill -9
        nodes.add("a")    # a new node a (a new node id)

Not on loopback only: Ray refuses `ray start --address` with LOOPBACK_ONLY off
(study/engine/backend_ray.py), so the nodes announce the machine's address. The head's GCS checks
each node every second and gives up after 3 misses, so that a killed node is declared dead in
seconds (Ray's default: ~30 s). Imports no Ray: it runs the `ray` command beside this Python.
"""

from __future__ import annotations

import contextlib
import os
import re
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

HEAD = "head"
MARKER = "STUDY_RAY_NODES"  # in the environment of every process of a cluster: its marker
NODE_CPUS = 1  # per worker node. The head has none: Ray's scheduler packs tasks onto the
# driver's own node first, so with a CPU the head trained nearly every cell (11 of 12 in one
# measured study) and a worker node's loss often found no run to cut. Without one, every task
# runs on a worker node and a node's loss always meets work.
STORE_BYTES = 100 * 1024 * 1024  # each node's object store: the study's messages are small
# A killed node is declared dead after 3 missed checks, one a second.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3",
                      "RAY_health_check_initial_delay_ms": "1000"}


class NodeError(RuntimeError):
    """A node of the cluster did not start."""


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """Parent pid -> its child pids, from /proc/*/stat (field 4 after the command's parentheses)."""
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            stat_line = (proc / "stat").read_text() if proc.name.isdigit() else ""
        except OSError:
            continue
        if stat_line:
            ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(proc.name))
    return tree


def tree(root: int) -> set[int]:
    """`root` and every process below it."""
    children, found, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie is not)."""
    left = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                left.add(pid)
    return left


@dataclass
class Nodes:
    """A head and worker nodes on this machine. A node's processes are its `ray start --block`
    and everything below it (raylet, agents, workers). Workers rename themselves
    (setproctitle), so the process tree, not their environment or command line, says which
    node they belong to."""

    port: int
    token: str
    marker: str
    temp: Path  # Ray's temporary root (short: socket paths < 108 chars), and the start logs
    resources: dict[str, dict[str, str]]  # worker node name -> extra `ray start` flags
    starts: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def driver_env(self) -> dict[str, str]:
        """What a driver joining the cluster needs: token mode and the cluster's token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def workers(self) -> list[str]:
        return list(self.resources)

    def _env(self) -> dict[str, str]:
        from study.engine.backend_ray import LOOPBACK_ONLY  # Ray: only when a node starts

        env = {**os.environ, MARKER: self.marker, "RAY_USAGE_STATS_ENABLED": "0",
               **FAST_HEALTH_CHECKS, **self.driver_env}
        env.pop(LOOPBACK_ONLY, None)
        return env

    def add(self, name: str, timeout: float = 180) -> None:
        """Start node `name` (the head, or a worker node of `resources`) and wait until it has
        joined; a node killed before is started anew, with a new node id."""
        if name == HEAD:
            role = ["--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.temp)]
        else:
            role = ["--address", self.address,
                    *(part for flag, value in self.resources[name].items() for part in (flag, value))]
        # Ports that two nodes of one machine would otherwise both try to take.
        ports = [(flag, str(free_port())) for flag in (
            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--metrics-export-port", "--runtime-env-agent-port")]
        log = self.temp / f"start-{name}.log"
        ray_bin = str(Path(sys.executable).with_name("ray"))
        with log.open("w") as out:
            self.starts[name] = subprocess.Popen(
                [ray_bin, "start", "--block", "--num-cpus", str(0 if name == HEAD else NODE_CPUS),
                 "--object-store-memory", str(STORE_BYTES), "--node-ip-address", "127.0.0.1",
                 "--disable-usage-stats", *(part for pair in ports for part in pair), *role],
                env=self._env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text():
            if self.starts[name].poll() is not None or time.monotonic() > deadline:
                raise NodeError(f"Ray node {name} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)

    def pids(self, name: str) -> set[int]:
        start = self.starts[name]
        return tree(start.pid) if start.poll() is None else set()

    def node_id(self, name: str) -> str:
        """The node's Ray id (hex), read from its raylet's command line."""
        for pid in self.pids(name):
            if b"raylet/raylet\0" in cmdline(pid):
                if found := re.search(rb"--node_id=([0-9a-f]+)", cmdline(pid)):
                    return found.group(1).decode()
        raise NodeError(f"Ray node {name} has no raylet")

    def serving(self, name: str) -> list[int]:
        """The node's Ray workers now running a `_serve` task (Ray titles the process so)."""
        return [pid for pid in self.pids(name) if cmdline(pid).startswith(b"ray::_serve")]

    def freeze(self, name: str) -> set[int]:
        """SIGSTOP every process of the node, the raylet first so that it starts no worker
        between the listing and the stop; the pids stopped."""
        for pid in self.pids(name):
            if b"raylet/raylet\0" in cmdline(pid):
                os.kill(pid, signal.SIGSTOP)
        pids = self.pids(name)
        self._signal(pids, signal.SIGSTOP)
        return pids

    def thaw(self, name: str) -> None:
        self._signal(self.pids(name), signal.SIGCONT)

    def kill(self, name: str) -> set[int]:
        """SIGKILL every process of the node at once, as a machine that loses power (frozen
        first: none moves in between). The pids killed, to check that none outlives it."""
        pids = self.freeze(name)
        self._signal(pids, signal.SIGKILL)
        self.starts[name].wait(timeout=30)
        return pids

    @staticmethod
    def _signal(pids: set[int], signum: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def leftovers(self) -> list[str]:
        """Ray servers (raylet, GCS) of this cluster alive: their command lines name its
        temporary directory."""
        left = []
        for proc in Path("/proc").iterdir():
            line = cmdline(int(proc.name)) if proc.name.isdigit() else b""
            if str(self.temp).encode() in line and re.search(rb"raylet/raylet|gcs_server", line):
                left.append(f"{proc.name} {line[:120]!r}")
        return left

    def stop(self, timeout: float = 30) -> list[str]:
        """Stop every node, worker nodes first, then the head; what is still alive after
        `timeout` s (should be nothing)."""
        every = set().union(*(self.pids(name) for name in self.starts))
        for process in reversed(self.starts.values()):
            process.terminate()  # --block: stopping it stops every process it started
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in alive(every):  # what a stopped `ray start` left (workers it no longer sees)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


@contextlib.contextmanager
def cluster(workers: dict[str, dict[str, str]]) -> Iterator[Nodes]:
    """A head and the worker nodes `workers` (name -> extra `ray start` flags, e.g.
    {"--num-gpus": "1"}: a resource for the scheduler only), each with one CPU and a 100 MB
    object store, started one after another. Every node is stopped on leaving; a NodeError if
    a Ray server of the cluster is still alive 30 s after."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    nodes = Nodes(free_port(), secrets.token_hex(32), f"nodes-{os.getpid()}-{time.monotonic_ns()}",
                  temp, workers)
    try:
        for name in [HEAD, *workers]:
            nodes.add(name)
        yield nodes
    finally:
        left = nodes.stop()
        shutil.rmtree(temp, ignore_errors=True)
    if left:
        raise NodeError(f"Ray processes left after the cluster stopped: {left}")
