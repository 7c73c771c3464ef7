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
import socket
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
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
    local = {} if address else {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    try:
        ray.init(address=address or "local", runtime_env=job, logging_level="WARNING", **local)
    except ConnectionError as err:
        # Ray 2.60's `ray start` turns token authentication on, but a driver given an address
        # sends its token only when told to (Ray's choice): the most likely cause.
        raise ClusterError(f"no Ray cluster at --address {address}: {err}; a cluster started "
                           "with token authentication (the default) needs RAY_AUTH_MODE=token "
                           "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here") from None


def _reachable(address: str, timeout: float = 10) -> None:
    """Fail at once where nothing listens: Ray 2.60 retries an unreachable head forever."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ValueError:
        raise ClusterError(f"--address {address!r}: expected HOST:PORT") from None
    except OSError as err:
        raise ClusterError(f"no Ray cluster at --address {address}: {err}") from None


@ray.remote
def _serve(group: Group) -> Iterator[Message]:
    from study.engine.workers import serve  # here, not above: after start_worker has run

    yield from serve(group)


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
                yield task.stream, workers.Lost(_lost(task, err))
                if again := _again(task, finished.get(task.stream, set())):
                    submit(again)
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


def _lost(task: _Task, err: BaseException) -> str:
    """Why a task's worker is gone; a WorkerError once it has had all its attempts."""
    from study.engine import workers

    reason = (f"the Ray worker for {task.group.name} died ({type(err).__name__}) on attempt "
              f"{task.attempt} of {ATTEMPTS}")
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
