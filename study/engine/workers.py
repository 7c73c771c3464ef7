"""Where a group of cells trains: the contract between the runner (driver) and its workers.

    python -m study run protocols/portability.yaml     # one fresh worker process per group

A group is the cells that share one process state: device, determinism mode and thread count,
and one training set (a size of the plan's `data.train_subset` axis).
MKL reads MKL_CBWR at its first call, ATen its CPU dispatch and OpenMP its pool size at start,
cuBLAS its workspace config when a handle is made: none can be switched inside a process that
has trained. So each group trains in a worker started with its mode's environment
(`seeding.process_env`), and a strict CUDA group never inherits a cuBLAS handle from a default
one.

A backend runs `serve(group)` somewhere and hands its messages back as they come; the driver
(the runner) stays the only MLflow writer. Backends are named in `BACKENDS`: a new one is one
module with a `run(group) -> Iterator[Message]` and one line there; a module that trains several
groups at once (Ray) also has a `run_many(groups)` that tags each message with its stream.
Nothing here imports MLflow: workers import this module.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import pickle
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

from study.engine import environment, kernels
from study.engine.data import Dataset
from study.protocol.plan import Cell
from study.engine.seeding import ARITHMETIC, Arithmetic, current_arithmetic, determinism, process_env, threads
from study.engine.train import EpochDone, Result, train


class WorkerError(RuntimeError):
    """A worker stopped without an answer (killed, out of memory) or started in the wrong mode."""


@dataclass(frozen=True)
class Group:
    """What a worker needs: its cells and how to load the data. `load` must pickle (a
    module-level function or a functools.partial of one): it runs in the worker."""

    cells: tuple[Cell, ...]
    load: Callable[[], Dataset]

    @property
    def train_subset(self) -> int | None:
        return self.cells[0].config.data.train_subset

    @property
    def device(self) -> str:
        return self.cells[0].device

    @property
    def mode(self) -> str:
        return self.cells[0].determinism

    @property
    def threads(self) -> int | None:
        return self.cells[0].config.threads

    @property
    def name(self) -> str:
        size = "" if self.train_subset is None else f"/n={self.train_subset}"
        return f"{self.device}/{self.mode}/threads={self.threads or 'default'}{size}"

    def env(self) -> dict[str, str | None]:
        """Variables the worker must start with (None: unset), before torch is imported."""
        return process_env(self.mode, self.threads)


def groups(cells: list[Cell], load: Callable[[], Dataset]) -> list[Group]:
    """Cells that can share one process: same device, determinism mode and thread count, and
    the same training subset (loaded once per worker). Smaller subsets come first."""
    def key(c: Cell) -> tuple[str, str, int, int]:
        return c.device, c.determinism, c.config.threads or 0, c.train_images
    return [Group(tuple(cells), load)
            for _, cells in itertools.groupby(sorted(cells, key=key), key=key)]


# --- messages, worker to driver (all pickle) ---------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """Sent once, before any training: the worker's environment, read inside the worker."""

    environment: dict[str, str]


@dataclass(frozen=True)
class Started:
    """A cell begins training (engines that open runs first): the driver opens its run."""

    key: str
    time: float


@dataclass(frozen=True)
class Finished:
    result: Result


@dataclass(frozen=True)
class Lost:
    """The worker of this stream died and is being replaced (a backend that retries): the
    cells it had started and not finished are lost. The new worker's Ready follows."""

    reason: str


# EpochDone (from study.train): a run ended an epoch; the driver's progress bar counts them.
Message = Ready | Started | EpochDone | Finished | Lost
# A generator, so that the driver can close it (and so stop its worker) early.
Backend = Callable[[Group], Generator[Message, None, None]]
# (stream, message): a stream is one worker's sequence of messages (and its replacements').
Tagged = tuple[int, Message]

# name -> module with `run(group) -> Iterator[Message]`, `has_device(device) -> bool` (and
# optionally `run_many(groups) -> Iterator[Tagged]`); imported when first used. `local`: a fresh process per group here.
BACKENDS = {"local": "study.engine.backend_process", "ray": "study.engine.backend_ray"}


def backend(name: str = "local") -> Backend:
    return importlib.import_module(BACKENDS[name]).run


def has_device(name: str, device: str) -> bool:
    """Whether the `name` backend can train on `device` ("cpu", "cuda"): where the cells train,
    which for a cluster is not the driver's machine."""
    return importlib.import_module(BACKENDS[name]).has_device(device)


def stream(name: str, groups: list[Group]) -> Generator[Tagged, None, None]:
    """Every group's messages, tagged with their stream: all at once where the backend trains
    several groups together, else one group after another (stream = the group's index)."""
    module = importlib.import_module(BACKENDS[name])
    if hasattr(module, "run_many"):
        return module.run_many(groups)
    return _one_by_one(module.run, groups)


def _one_by_one(run: Backend, groups: list[Group]) -> Generator[Tagged, None, None]:
    for i, group in enumerate(groups):
        messages = run(group)
        try:
            yield from ((i, message) for message in messages)
        finally:
            messages.close()  # stops the worker now, not when the generator is collected


@dataclass(frozen=True)
class Trained:
    """A group's results with the environment of the worker that trained them."""

    environment: dict[str, str]
    results: tuple[Result, ...]


def trained(group: Group, where: str = "local") -> Trained:
    """Train a group in a worker and hand back its results, logging nothing (golden, verify)."""
    env: dict[str, str] = {}
    results: list[Result] = []
    for message in backend(where)(group):
        if isinstance(message, Ready):
            env = message.environment
        elif isinstance(message, Finished):
            results.append(message.result)
    return Trained(env, tuple(results))


# --- engines: how a group is cut into chunks and each chunk trained ---------------------------

@dataclass(frozen=True)
class Engine:
    """How a group is cut into chunks trained together, how a chunk is trained, and whether
    each run opens in MLflow before training (one at a time) or as its result arrives (batched:
    backdated to when that member began, so the run's duration is its own, not the chunk's)."""

    chunks: Callable[[list[Cell]], Iterator[list[Cell]]]
    train: Callable[[list[Cell], Dataset], Iterator[Result | EpochDone]]
    open_first: bool


def engine(group: list[Cell]) -> Engine:
    if group[0].config.execution == "batched":
        from study.engine import batched  # imported lazily: only batched protocols need it
        return Engine(batched.members, functools.partial(batched.train_many, progress=True),
                      open_first=False)
    # `train` looked up at call time, so a test can replace it inside a worker.
    return Engine(lambda cells: ([c] for c in cells),
                  lambda cells, data: (train(c, data) for c in cells), open_first=True)


# --- the worker's side --------------------------------------------------------------------------

def serve(group: Group) -> Iterator[Message]:
    """Train a group in this process, which must have started with `group.env()` in place."""
    arithmetic = started_in_mode(group)
    with threads(group.threads) as n_threads, determinism(group.mode) as flags:
        data = loaded(group.load).subset(group.train_subset).to(group.device)
        yield Ready(environment.describe(group.device))
        how = engine(list(group.cells))
        for chunk in how.chunks(list(group.cells)):
            if how.open_first:
                yield from (Started(c.key, time.time()) for c in chunk)
            for event in how.train(chunk, data):
                if isinstance(event, EpochDone):
                    yield event
                else:
                    yield Finished(replace(event, flags=flags, arithmetic=arithmetic,
                                           threads=n_threads))


# The dataset this process last loaded, under its loader's pickled bytes. A Ray worker serves
# every task of its group (one runtime_env) and a group's chunks are many tasks (one per cell
# when sequential): without this each task reloaded and re-checked Fashion-MNIST. One entry,
# so an idle worker holds one dataset, never one per loader it has seen.
_LOADED: dict[bytes, Dataset] = {}


def loaded(load: Callable[[], Dataset]) -> Dataset:
    """`load()`, called once per process for equal loaders (same function, same arguments):
    the bytes of its pickle name it, since each task unpickles a new, unequal partial."""
    key = pickle.dumps(load)
    if key not in _LOADED:
        _LOADED.clear()  # before loading: never two datasets in memory at once
        _LOADED[key] = load()
    return _LOADED[key]


def started_in_mode(group: Group) -> Arithmetic:
    """The arithmetic this process started with, checked against the mode and against MKL."""
    found, wanted = current_arithmetic(), ARITHMETIC[group.mode]
    if found != wanted:
        raise WorkerError(f"worker for {group.name} started with {found}, its mode needs {wanted}")
    # MKL reports its branch itself: catches a value set after MKL started, which it ignores.
    effective = environment.mkl_cbwr_effective()
    if wanted.mkl_cbwr in ("AUTO", "COMPATIBLE") and effective not in ("unknown",
                                                                         wanted.mkl_cbwr):
        raise WorkerError(f"worker for {group.name}: MKL runs branch {effective}, "
                          f"MKL_CBWR={wanted.mkl_cbwr} was asked")
    # OpenBLAS falls back to other kernels, silently, on a CPU that lacks the pinned ones.
    uses_openblas = any(c.kernels == kernels.OPENBLAS for c in group.cells)
    if uses_openblas and kernels.corename().lower() != (wanted.openblas_coretype or "").lower():
        raise WorkerError(f"worker for {group.name}: OpenBLAS runs kernels {kernels.corename()}, "
                          f"OPENBLAS_CORETYPE={wanted.openblas_coretype} was asked")
    return found
