"""The study loop: plan, skip finished cells, apply the mode, train, log.

    python -m study run protocols/d2l-dropout.yaml

Safe to interrupt: every finished cell is already in the store, runs left RUNNING are marked
KILLED on the next start and their cells redone.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from study import environment, tracking
from study.data import Dataset
from study.data import load as load_data
from study.plan import Cell, expand
from study.protocol import Protocol
from study.seeding import Flags, determinism, threads
from study.train import Result, train


class RunnerError(RuntimeError):
    """The protocol cannot be run on this machine."""


@dataclass(frozen=True)
class Summary:
    experiment_id: str
    planned: int
    already_done: int
    ran: int
    skipped: int
    interrupted: int
    results: tuple[Result, ...]


def available(device: str) -> bool:
    return device == "cpu" or torch.cuda.is_available()


def runnable(protocol: Protocol, cells: list[Cell]) -> tuple[list[Cell], list[Cell]]:
    """Split cells into those this machine can run and those it must skip."""
    missing = sorted({c.device for c in cells if not available(c.device)})
    if required := [d for d in missing if d in protocol.required_devices]:
        raise RunnerError(f"protocol {protocol.name!r} requires {required}, which this machine "
                          "does not have: run it on a machine that has it, or drop it from "
                          "required_devices to skip those cells")
    return ([c for c in cells if available(c.device)],
            [c for c in cells if not available(c.device)])


def groups(cells: list[Cell]) -> Iterator[list[Cell]]:
    """Cells that can share one process state: same device and determinism mode."""
    def key(c: Cell) -> tuple[str, str]:
        return c.device, c.determinism
    for _, group in itertools.groupby(sorted(cells, key=key), key=key):
        yield list(group)


@dataclass(frozen=True)
class Engine:
    """How a group is cut into chunks trained together, how a chunk is trained, and whether
    each run opens in MLflow before training (one at a time) or as its result arrives (batched:
    backdated to when that member began, so the run's duration is its own, not the chunk's)."""

    chunks: Callable[[list[Cell]], Iterator[list[Cell]]]
    train: Callable[[list[Cell], Dataset], Iterator[Result]]
    open_first: bool


def engine(group: list[Cell]) -> Engine:
    if group[0].config.execution == "batched":
        from study import batched  # imported lazily: only batched protocols need it
        return Engine(batched.members, batched.train_many, open_first=False)
    return Engine(lambda cells: ([c] for c in cells),
                  lambda cells, data: (train(c, data) for c in cells), open_first=True)


def run(protocol: Protocol, load: Callable[[], Dataset] = load_data,
        progress: bool = True) -> Summary:
    with tracking.writer_lock(protocol.name):
        mlflow = tracking.client()
        exp_id = tracking.experiment_id(mlflow, protocol.name)
        interrupted = tracking.mark_interrupted(mlflow, exp_id)
        cells = expand(protocol)
        done = tracking.finished_keys(mlflow, exp_id)
        todo, skipped = runnable(protocol, [c for c in cells if c.key not in done])
        for cell in skipped:
            print(f"skipped (no {cell.device} on this machine): {cell.name}", file=sys.stderr)
        results = _run_cells(mlflow, exp_id, protocol, todo, load, progress) if todo else []
    return Summary(exp_id, len(cells), len(cells) - len(todo) - len(skipped), len(results),
                   len(skipped), interrupted, tuple(results))


def _run_cells(mlflow, exp_id: str, protocol: Protocol, todo: list[Cell],
               load: Callable[[], Dataset], progress: bool) -> list[Result]:
    base = load().subset(protocol.data.train_subset)
    results: list[Result] = []
    with tqdm(total=len(todo), unit="run", desc=protocol.name, disable=not progress,
              dynamic_ncols=True) as bar:
        for group in groups(todo):
            data = base.to(group[0].device)
            env = environment.describe(group[0].device)
            with threads(protocol.threads) as n_threads, \
                    determinism(group[0].determinism) as flags:
                how = engine(group)
                for chunk in how.chunks(group):
                    for result in _run_chunk(mlflow, exp_id, protocol, chunk, how, data,
                                             env, flags, n_threads):
                        results.append(result)
                        bar.update()
                        bar.set_postfix_str(f"{result.cell.name}: test_acc "
                                            f"{result.epochs[-1].test_acc:.4f}", refresh=False)
    return results


def _run_chunk(mlflow, exp_id: str, protocol: Protocol, chunk: list[Cell], how: Engine,
               data: Dataset, env: dict[str, str], flags: Flags,
               n_threads: int) -> Iterator[Result]:
    """Log each cell's run as its result arrives.

    Runs opened before training are RUNNING while they train, and failed or KILLED (here or on
    the next start) if training does not end. Runs opened as results arrive leave nothing for
    members in flight when the chunk stops; those are simply redone.
    """
    run_ids = {c.key: tracking.start(mlflow, exp_id, c, protocol, env)
               for c in chunk} if how.open_first else {}
    try:
        for result in how.train(chunk, data):
            result = replace(result, flags=flags, threads=n_threads)
            run_id = run_ids.pop(result.cell.key, None) or tracking.start(
                mlflow, exp_id, result.cell, protocol, env, result.started)
            tracking.finish(mlflow, run_id, result)
            yield result
    except BaseException as err:
        for run_id in run_ids.values():  # what finished stays recorded
            tracking.fail(mlflow, run_id, err)
        raise
