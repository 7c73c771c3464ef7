"""The `ray` backend: cells, or batched chunks, train as Ray tasks on a local or a joined cluster.

    python -m study run protocols/smoke.yaml --backend ray      # starts a cluster on this machine
    python -m study run protocols/d2l-dropout.yaml --backend ray --address HEAD:6379

Each task runs `serve` on one chunk of a group (a cell, or a batched chunk) and streams its
messages back as a Ray generator task; the driver stays the only MLflow writer, and the
environment it records comes from the Ready of the worker that trained. A task's environment is
its group's (`Group.env()`), given as `runtime_env={"env_vars": ...}`: Ray starts a worker
process with it and hands that worker only tasks of the same runtime_env (STUDY_GROUP makes it
one per group), so a worker's process state is always its group's, as with the local backend.
Ray cannot unset a variable a worker inherits from its raylet: the variables a mode leaves unset
are named in STUDY_UNSET and removed by `start_worker`, Ray's worker setup hook, which runs
before anything in the worker imports torch. CUDA groups request a GPU; a task requests as many
CPUs as its group's threads, and Ray sets OMP_NUM_THREADS to that where the protocol leaves
threads to the library (one thread, recorded with each run).

A task whose worker dies (SIGKILL, out of memory, its node lost) is resubmitted with only the
cells it had not finished, ATTEMPTS times in all. The driver retries, not Ray: Ray re-runs a
generator task from its start and drops the values already returned, which would retrain
finished cells and hide the new worker's environment.

The top level imports no torch (nor `study.workers`, which does): Ray imports this module in
every new worker to run the setup hook.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

if TYPE_CHECKING:
    from study.engine.workers import Group, Message, Tagged

ATTEMPTS = 3  # a task's first run and two retries after its worker died
UNSET = "STUDY_UNSET"
GROUP = "STUDY_GROUP"
# What Ray raises for a task whose worker process or node went away. Anything else the task
# raised (a bug, a WorkerError) reaches the driver as it is, never retried.
DIED = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.LocalRayletDiedError, ray.exceptions.OutOfMemoryError)


class ClusterError(RuntimeError):
    """No Ray cluster answers at the address given."""


def start_worker() -> None:
    """Ray's worker setup hook: unset what the worker's group leaves unset, before any task."""
    for name in filter(None, os.environ.get(UNSET, "").split(",")):
        os.environ.pop(name, None)


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (ray start --head prints it), or start one on this
    machine without a dashboard; once per process, later calls keep the first connection."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an offline harness reports nothing
    # Workers import `study` from their own node's checkout, not a copy shipped by Ray
    # (py_modules): each run then records the commit of the code that trained it.
    job = {"worker_process_setup_hook": f"{__name__}.start_worker"}
    if address:
        _reachable(address)
    else:
        _loopback_only()
        _private_token()
    local = {} if address else {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    try:
        ray.init(address=address or "local", runtime_env=job, logging_level="WARNING", **local)
    except ConnectionError as err:
        # Ray 2.60's `ray start` turns token authentication on, but a driver given an address
        # sends its token only when told to (Ray's choice): the most likely cause.
        raise ClusterError(f"no Ray cluster at --address {address}: {err}; a cluster started "
                           "with token authentication (the default) needs RAY_AUTH_MODE=token "
                           "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here") from None


# Ray replaces a loopback node IP by the machine's address unless this is off, and its servers
# (GCS, raylet, agents, workers) bind the node IP: with it off they bind 127.0.0.1. Off, it also
# refuses `ray start --address` (worker nodes), so only a one-node cluster may use it.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> None:
    """Keep a cluster this process starts on 127.0.0.1 (docs/cluster.md#network-exposure)."""
    os.environ[LOOPBACK_ONLY] = "0"
    # Ray read the variable when it was imported; its services look the constant up at call time.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _private_token() -> None:
    """Make the token a new local cluster uses readable by its owner only (Ray writes it 0644).

    Ray 2.60 turns token authentication on for a local cluster and writes ~/.ray/auth_token if
    none exists; written here first, with mode 600, Ray reads it instead of making its own."""
    if os.environ.get("RAY_AUTH_MODE", "token") != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    path.chmod(0o600)


def _reachable(address: str, timeout: float = 10) -> None:
    """Fail at once where nothing listens: Ray 2.60 retries an unreachable head forever."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ValueError:
        raise ClusterError(f"--address {address!r}: expected HOST:PORT") from None
    except OSError as err:
        raise ClusterError(f"no Ray cluster at --address {address}: {err}") from None


def has_device(device: str) -> bool:
    """Whether the cluster has the device: a GPU in `ray.cluster_resources()` for cuda, whatever
    the driver's own machine has. Joins (or starts) the cluster if not yet connected."""
    connect()
    return device == "cpu" or ray.cluster_resources().get("GPU", 0) >= 1


NODE_ID, NODE_IP = "ray_node_id", "ray_node_ip"  # recorded with each run's environment


@dataclass(frozen=True)
class _Node:
    """A task's first message, before it loads data: where it runs, so that the driver can name
    the node if the task is lost before its Ready. Kept by run_many, never passed on."""

    where: dict[str, str]


@ray.remote
def _serve(group: Group) -> Iterator[Message | _Node]:
    from study.engine.workers import Ready, serve  # here, not above: after start_worker has run

    where = {NODE_ID: ray.get_runtime_context().get_node_id(),
             NODE_IP: ray.util.get_node_ip_address()}
    yield _Node(where)
    for message in serve(group):
        # The node that trains: it becomes the run's study.env.ray_node_id tag.
        yield Ready({**message.environment, **where}) if isinstance(message, Ready) else message


def options(group: Group) -> dict[str, Any]:
    """The Ray task options of a group's chunk: resources and environment."""
    env = group.env()
    env_vars = {name: value for name, value in env.items() if value is not None}
    env_vars[UNSET] = ",".join(sorted(name for name, value in env.items() if value is None))
    env_vars[GROUP] = group.name
    return {"num_cpus": group.threads or 1, "num_gpus": int(group.device.startswith("cuda")),
            "max_retries": 0, "runtime_env": {"env_vars": env_vars}}


@dataclass(frozen=True)
class _Task:
    stream: int
    group: Group
    attempt: int


def run(group: Group) -> Generator[Message, None, None]:
    """One group's messages, untagged (golden, verify)."""
    messages = run_many([group])
    try:
        yield from (message for _, message in messages)
    finally:
        messages.close()


def run_many(groups: list[Group]) -> Generator[Tagged, None, None]:
    """Train every chunk of `groups` as its own task, all submitted at once; yield each message
    as it arrives, tagged with its task's stream. Closing this cancels the tasks left."""
    from study.engine import workers  # torch: see the module docstring

    connect()
    running: dict[ray.ObjectRefGenerator, _Task] = {}

    def submit(task: _Task) -> None:
        running[_serve.options(**options(task.group)).remote(task.group)] = task

    for stream, part in enumerate(p for g in groups for p in _parts(g)):
        submit(_Task(stream, part, 1))
    finished: dict[int, set[str]] = {}
    nodes: dict[int, dict[str, str]] = {}  # stream -> where its latest worker runs
    try:
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            task = running[ready]
            try:
                message = ray.get(next(ready))
            except StopIteration:
                del running[ready]
                continue
            except DIED as err:
                del running[ready]
                yield task.stream, workers.Lost(_lost(task, err, nodes.get(task.stream, {})))
                if again := _again(task, finished.get(task.stream, set())):
                    submit(again)
                continue
            if isinstance(message, _Node):
                nodes[task.stream] = message.where
                continue
            if isinstance(message, workers.Finished):
                finished.setdefault(task.stream, set()).add(message.result.cell.key)
            yield task.stream, message
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


def _parts(group: Group) -> list[Group]:
    """One task per chunk the engine trains together: a cell, or a batched chunk. A batched CPU
    chunk is cut further, into one piece per CPU its tasks can have in the cluster: side by side,
    each member trains alone on one core with one-thread GEMMs, so how members are shared out
    between tasks changes no bit (the local-vs-ray hash test covers it), while one task of 60
    members would hold a single CPU."""
    from study.engine import workers

    cells = list(group.cells)
    how = workers.engine(cells)
    chunks = list(how.chunks(cells))
    if group.device == "cpu" and not how.open_first:
        share = max(1, int(ray.cluster_resources().get("CPU", 1)) // (group.threads or 1))
        chunks = [piece for chunk in chunks for piece in _split(chunk, share)]
    return [replace(group, cells=tuple(chunk)) for chunk in chunks]


def _split(cells: list, pieces: int) -> list[list]:
    """`cells` in at most `pieces` runs of near-equal length, in order."""
    size = -(-len(cells) // min(pieces, len(cells)))
    return [cells[i:i + size] for i in range(0, len(cells), size)]


def _lost(task: _Task, err: BaseException, where: dict[str, str] | None = None) -> str:
    """Why a task's worker is gone, naming its node, and saying so when the whole node is lost
    (Ray raises NodeDiedError once its health checks give up on the node); a WorkerError once
    it has had all its attempts. `where`: the task's node (its _Node message)."""
    from study.engine import workers

    where = where or {}
    node = where.get(NODE_ID)
    at = f" on node {node} ({where.get(NODE_IP)})" if node else ""
    gone = node and isinstance(err, ray.exceptions.NodeDiedError)
    lost = f"Ray node {node} ({where.get(NODE_IP)}) lost: " if gone else ""
    reason = (f"{lost}the Ray worker for {task.group.name}{at} died ({type(err).__name__}) on "
              f"attempt {task.attempt} of {ATTEMPTS}")
    if task.attempt >= ATTEMPTS:
        raise workers.WorkerError(f"{reason}; cells it was training are lost and will be redone "
                                  "on the next run")
    return f"{reason}; retried"


def _again(task: _Task, finished: set[str]) -> _Task | None:
    """The task for the cells a dead worker had not finished; None if it had finished all."""
    left = tuple(c for c in task.group.cells if c.key not in finished)
    if not left:
        return None
    return replace(task, group=replace(task.group, cells=left), attempt=task.attempt + 1)
