"""The study loop: plan, skip finished cells, train each group in a worker, log.

    python -m study run protocols/d2l-dropout.yaml

Safe to interrupt: every finished cell is already in the store, runs left RUNNING are marked
KILLED on the next start and their cells redone. Each (device, mode, threads) group trains in a
fresh worker process (see `study.workers`); this process is the only MLflow writer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from study import tracking, workers
from study.data import Dataset
from study.data import load as load_data
from study.plan import Cell, expand
from study.protocol import Protocol
from study.train import Result


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


def run(protocol: Protocol, load: Callable[[], Dataset] = load_data,
        progress: bool = True, where: str = "process") -> Summary:
    """Run the cells not yet FINISHED, each (device, mode, threads) group in a worker of the
    `where` backend. `load` runs in the worker, so it must pickle (module-level or a partial)."""
    with tracking.writer_lock(protocol.name):
        mlflow = tracking.client()
        exp_id = tracking.experiment_id(mlflow, protocol.name)
        interrupted = tracking.mark_interrupted(mlflow, exp_id)
        cells = expand(protocol)
        done = tracking.finished_keys(mlflow, exp_id)
        todo, skipped = runnable(protocol, [c for c in cells if c.key not in done])
        for cell in skipped:
            print(f"skipped (no {cell.device} on this machine): {cell.name}", file=sys.stderr)
        results = _run_cells(mlflow, exp_id, protocol, todo, load, progress, where) if todo else []
    return Summary(exp_id, len(cells), len(cells) - len(todo) - len(skipped), len(results),
                   len(skipped), interrupted, tuple(results))


def _run_cells(mlflow, exp_id: str, protocol: Protocol, todo: list[Cell],
               load: Callable[[], Dataset], progress: bool, where: str) -> list[Result]:
    results: list[Result] = []
    with tqdm(total=len(todo), unit="run", desc=protocol.name, disable=not progress,
              dynamic_ncols=True) as bar:
        for group in workers.groups(todo, load):
            for result in _run_group(mlflow, exp_id, protocol, group, workers.backend(where)):
                results.append(result)
                bar.update()
                bar.set_postfix_str(f"{result.cell.name}: test_acc "
                                    f"{result.epochs[-1].test_acc:.4f}", refresh=False)
    return results


def _run_group(mlflow, exp_id: str, protocol: Protocol, group: workers.Group,
               backend: workers.Backend) -> Iterator[Result]:
    """Log each cell's run as the worker's messages arrive.

    Runs opened when a cell starts are RUNNING while it trains, and failed or KILLED (here or on
    the next start) if training does not end. Runs opened as results arrive (batched) leave
    nothing for members in flight when the group stops; those are simply redone. The
    environment tags come from the worker, the process that trained.
    """
    env: dict[str, str] = {}
    run_ids: dict[str, str] = {}
    messages = backend(group)
    try:
        for message in messages:
            if isinstance(message, workers.Ready):
                env = message.environment
            elif isinstance(message, workers.Started):
                run_ids[message.key] = tracking.start(
                    mlflow, exp_id, _cell(group, message.key), protocol, env, message.time)
            else:
                result = message.result
                run_id = run_ids.pop(result.cell.key, None) or tracking.start(
                    mlflow, exp_id, result.cell, protocol, env, result.started)
                tracking.finish(mlflow, run_id, result)
                yield result
    except BaseException as err:
        for run_id in run_ids.values():  # what finished stays recorded
            tracking.fail(mlflow, run_id, err)
        if isinstance(err, workers.WorkerError):
            raise RunnerError(str(err)) from None
        raise
    finally:
        messages.close()  # stops the worker now, not when the generator is collected


def _cell(group: workers.Group, key: str) -> Cell:
    return next(c for c in group.cells if c.key == key)
