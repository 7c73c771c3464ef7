"""The study loop: plan, skip finished cells, train each group in a worker, log.

    python -m study run protocols/d2l-dropout.yaml [--backend ray [--address HEAD:6379]]

Safe to interrupt: every finished cell is already in the store, runs left RUNNING are marked
KILLED on the next start and their cells redone. Each (device, mode, threads) group trains in a
fresh worker process (`local`) or in Ray tasks (`ray`, see `study.engine.backend_ray`); either way this
process is the only MLflow writer.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from study.analysis import rounds
from study.store import tracking
from study.engine import workers
from study.engine.data import Dataset
from study.engine.data import load as load_data
from study.protocol.plan import Cell, expand
from study.protocol.schema import Protocol
from study.engine.train import EpochDone, Result


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


def runnable(protocol: Protocol, cells: list[Cell],
             where: str = "local") -> tuple[list[Cell], list[Cell]]:
    """Split cells into those the `where` backend can run and those it must skip: for `ray`,
    the cluster's resources decide, not the driver's machine."""
    present = {d: workers.has_device(where, d) for d in sorted({c.device for c in cells})}
    missing = [d for d, there in present.items() if not there]
    if required := [d for d in missing if d in protocol.required_devices]:
        raise RunnerError(f"protocol {protocol.name!r} requires {required}, which "
                          f"{_machine(where)} does not have: run it where it is, or drop it "
                          "from required_devices to skip those cells")
    return ([c for c in cells if present[c.device]], [c for c in cells if not present[c.device]])


def _machine(where: str) -> str:
    return "the Ray cluster" if where == "ray" else "this machine"


def run(protocol: Protocol, load: Callable[[], Dataset] = load_data,
        progress: bool = True, where: str = "local") -> Summary:
    """Run the cells not yet FINISHED, each (device, mode, threads) group in a worker of the
    `where` backend. `load` runs in the worker, so it must pickle (module-level or a partial).
    An adaptive protocol runs in rounds (`run_rounds`)."""
    with tracking.writer_lock(protocol.name):
        mlflow = tracking.client()
        exp_id = tracking.experiment_id(mlflow, protocol.name)
        interrupted = tracking.mark_interrupted(mlflow, exp_id)
        if protocol.adaptive is not None:
            return run_rounds(mlflow, exp_id, protocol, load, progress, where, interrupted)
        cells = expand(protocol)
        done = tracking.finished_keys(mlflow, exp_id)
        todo, skipped = runnable(protocol, [c for c in cells if c.key not in done], where)
        for cell in skipped:
            print(f"skipped (no {cell.device} in {_machine(where)}): {cell.name}",
                  file=sys.stderr)
        results = _run_cells(mlflow, exp_id, protocol, todo, load, progress, where) if todo else []
    return Summary(exp_id, len(cells), len(cells) - len(todo) - len(skipped), len(results),
                   len(skipped), interrupted, tuple(results))


def schedule(mlflow, exp_id: str, protocol: Protocol, where: str = "local") -> rounds.Schedule:
    """An adaptive protocol's rounds, replayed from its FINISHED runs in the store (cells on a
    device the `where` backend lacks are left out; a required one is a RunnerError)."""
    # One device query (a cluster's resources under Ray): a RunnerError if a required device
    # is absent, else the devices whose cells are skipped.
    absent = frozenset(c.device for c in runnable(protocol, expand(protocol), where)[1])
    return rounds.from_store(protocol, functools.partial(tracking.endpoint_values, mlflow, exp_id),
                             absent)


def run_rounds(mlflow, exp_id: str, protocol: Protocol, load: Callable[[], Dataset],
               progress: bool, where: str, interrupted: int) -> Summary:
    """Round after round: replay the schedule from the store, run what it still lacks, each run
    tagged with its round; one line per round. Killed and rerun, it resumes the same round."""
    results: list[Result] = []
    while (plan := schedule(mlflow, exp_id, protocol, where)).stop is None:
        now = plan.rounds[-1]
        print(rounds.round_line(now, len(plan.todo)), flush=True)
        tags = {c.key: {rounds.ROUND_TAG: str(now.index)} for c in plan.todo}
        results += _run_cells(mlflow, exp_id, protocol, list(plan.todo), load, progress, where,
                              tags)
    print(rounds.stop_line(plan), flush=True)
    planned = len(plan.cells)
    skipped = len(runnable(protocol, expand(protocol), where)[1])  # round 0's, as `run` counts
    return Summary(exp_id, planned, planned - len(results), len(results), skipped, interrupted,
                   tuple(results))


def _run_cells(mlflow, exp_id: str, protocol: Protocol, todo: list[Cell],
               load: Callable[[], Dataset], progress: bool, where: str,
               tags: dict[str, dict[str, str]] | None = None) -> list[Result]:
    """Train and log `todo`. The bar counts run-epochs (`_weight`), so a batched chunk moves it
    per member and epoch and its ETA follows; runs that report no epochs (sequential) count
    theirs when they finish."""
    results: list[Result] = []
    counted: dict[str, int] = {}  # cell key -> epochs on the bar
    cells = {c.key: c for c in todo}
    weight, unit = _weight(todo)
    log = _Log(mlflow, exp_id, protocol, cells, tags or {})
    messages = workers.stream(where, workers.groups(todo, load))
    with tqdm(total=sum(c.config.training.epochs * weight(c) for c in todo), unit=unit,
              unit_scale=unit != "epoch", desc=protocol.name, disable=not progress,
              dynamic_ncols=True) as bar:
        try:
            for stream, message in messages:
                if isinstance(message, EpochDone):
                    # By epoch number, not by count: a retried cell starts again at epoch 1
                    # and moves the bar only past what its lost attempt had reached.
                    done = counted.get(message.key, 0)
                    bar.update(max(0, message.epoch - done) * weight(cells[message.key]))
                    counted[message.key] = max(message.epoch, done)
                    continue
                if (result := log.take(stream, message)) is None:
                    continue
                results.append(result)
                bar.update(max(0, result.cell.config.training.epochs
                               - counted.pop(result.cell.key, 0)) * weight(result.cell))
                bar.set_postfix_str(f"{len(results)}/{len(todo)} runs, last {result.cell.name}: "
                                    f"test_acc {result.epochs[-1].test_acc:.4f}", refresh=False)
        except BaseException as err:
            log.fail_open(err)  # what finished stays recorded
            if isinstance(err, workers.WorkerError):
                raise RunnerError(str(err)) from None
            raise
        finally:
            messages.close()  # stops the workers now, not when the generator is collected
    return results


def _weight(todo: list[Cell]) -> tuple[Callable[[Cell], int], str]:
    """What one epoch of a cell counts on the bar, and the bar's unit. Where training-set sizes
    differ (C6: 1,000 to 60,000 images), an epoch counts its images, so the ETA follows the cost
    and not the epoch count (at 1,000 images 400 epochs cost about as much as 7 at 60,000)."""
    if len({c.train_images for c in todo}) > 1:
        return (lambda c: c.train_images), "image-epoch"
    return (lambda c: 1), "epoch"


class _Log:
    """Logs each cell's run as the workers' messages arrive, per stream (one worker at a time).

    Runs opened when a cell starts are RUNNING while it trains, and failed or KILLED (here or on
    the next start) if training does not end. Runs opened as results arrive (batched) leave
    nothing for members in flight when the group stops; those are simply redone. The
    environment tags come from the stream's latest Ready: the worker that trained.
    """

    def __init__(self, mlflow, exp_id: str, protocol: Protocol, cells: dict[str, Cell],
                 tags: dict[str, dict[str, str]]) -> None:
        self.mlflow, self.exp_id, self.protocol, self.cells = mlflow, exp_id, protocol, cells
        self.tags = tags  # cell key -> extra tags of its run (an adaptive study's round)
        self.env: dict[int, dict[str, str]] = {}
        self.open: dict[int, dict[str, str]] = {}  # stream -> cell key -> run id

    def take(self, stream: int, message: workers.Message) -> Result | None:
        """Log one message; the result when it finished a cell."""
        if isinstance(message, workers.Ready):
            self.env[stream] = message.environment
        elif isinstance(message, workers.Started):
            self.open.setdefault(stream, {})[message.key] = self._start(
                stream, self.cells[message.key], message.time)
        elif isinstance(message, workers.Lost):
            # Said whether or not a run was open: a worker lost between two cells leaves no
            # failed run behind, and the user should still learn that a retry happened.
            tqdm.write(f"{message.reason}", file=sys.stderr)
            for run_id in self.open.pop(stream, {}).values():
                tracking.fail(self.mlflow, run_id, workers.WorkerError(message.reason))
        else:
            result = message.result
            run_id = (self.open.get(stream, {}).pop(result.cell.key, None)
                      or self._start(stream, result.cell, result.started))
            tracking.finish(self.mlflow, run_id, result)
            return result
        return None

    def fail_open(self, err: BaseException) -> None:
        for runs in self.open.values():
            for run_id in runs.values():
                tracking.fail(self.mlflow, run_id, err)
        self.open.clear()

    def _start(self, stream: int, cell: Cell, began: float | None) -> str:
        return tracking.start(self.mlflow, self.exp_id, cell, self.protocol,
                              self.env.get(stream, {}), began, self.tags.get(cell.key))
