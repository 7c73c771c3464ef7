"""Load runs, analyse, write: the one path `analyze`, `report`, `--experiment`, `--csv` and the
paper all take (`analyse`); and the lesson's paper: run every protocol of a lesson file, analyse
each, write one report.

    python -m study analyze protocols/d2l-dropout.yaml     (analyse)
    python -m study paper protocols/lesson.yaml            (make paper)
    python -m study paper protocols/lesson.yaml --dry-run  (the estimate only)

Each protocol runs through `runner.run`, so finished cells are never rerun and an interrupted
paper resumes where it stopped. Before anything runs, `estimate` prices the cells still to run.
The paper and everything it read are logged to one `analysis` run of the experiment
`<name>-paper`; a rerun that writes the same bytes keeps that run instead of logging a new one.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sys
from typing import TYPE_CHECKING, Any

from study.analysis import comparisons as analysis
from study.analysis import frame, looks, rounds, sequential
from study.analysis.table import RunTable
from study.protocol.lesson import Lesson, Part
from study.protocol.plan import expand
from study.protocol.schema import Analysis, Protocol
from study.report import ReportFiles, figures, summary
from study.report.context import Inputs
from study.report.paper import Paper, figure_folder, write_paper
from study.report.scorecard import Evidence
from study.results import Results
from study.store import tracking
from study.store.tracking import MlflowClient

if TYPE_CHECKING:  # training imports torch: `analyze` should not pay for it
    from study import runner
    from study.engine.data import Dataset


@dataclass(frozen=True)
class Target:
    """What analysis reads: an experiment, its baseline and options, and the protocol file."""

    experiment: str
    baseline: tuple[Any, ...]  # one value per factor (options.factor)
    options: Analysis
    source: str | None = None
    # The protocol's planned cell keys: analysis reads only their runs (None: every run).
    cells: frozenset[str] | None = None
    csv: str | None = None  # a table of runs instead of an MLflow experiment
    step: str | None = None  # its step column
    # The user named the runs' columns: a baseline no run has is then an error, not a note.
    named: bool = False
    protocol: Protocol | None = None  # the protocol itself (an adaptive one adds its decisions)
    # An own experiment's looks (`--adaptive`): its seeds in ascending order, decided as a
    # protocol's adaptive rounds are (study.analysis.looks).
    adaptive: sequential.Design | None = None


@dataclass(frozen=True)
class RunsAnalysed:
    """What one analysis made: the runs, their results and the files written."""

    mlflow: MlflowClient | None  # tracking stays the only module that imports MLflow; None: --csv
    table: RunTable
    results: Results
    out: Path
    files: list[Path]

    def log(self, extra: list[Path] = ()) -> None:
        if self.mlflow is None:
            return  # a table's analysis has no store to log to
        tracking.log_analysis(self.mlflow, self.table.experiment_id, [*self.files, *extra],
                              self.out)


def target_of(proto: Protocol, source: str) -> Target:
    """A protocol's analysis: its experiment, baseline and options, only the cells it plans."""
    return Target(proto.name, proto.baseline, proto.analysis, source=source,
                  cells=frozenset(c.key for c in rounds.planned_cells(proto)), protocol=proto)


def absent_devices(proto: Protocol) -> frozenset[str]:
    """Devices of the protocol this machine lacks (the CPU is always there: no torch import)."""
    if set(proto.devices) <= {"cpu"}:
        return frozenset()
    from study.engine import workers

    return frozenset(d for d in proto.devices if not workers.has_device("local", d))


def analyse(target: Target, reports: Path, mlflow: MlflowClient | None = None) -> RunsAnalysed:
    """Runs (from the store, or `target.csv`) -> results files in reports/<experiment>/."""
    o = target.options
    columns = frame.columns_of(o.factor, o.seed, o.metric, o.lower_is_better)
    if target.csv:
        mlflow, table = None, frame.from_frame(frame.read_csv(target.csv), columns,
                                               target.experiment, target.step)
    else:
        mlflow = mlflow or tracking.client()
        require_runs(mlflow, target)
        table = tracking.load_runs(mlflow, target.experiment,
                                   set(target.cells) if target.cells is not None else None,
                                   columns)
    if table.unplanned_runs:
        print(f"left out {table.unplanned_runs} finished runs of cells that "
              f"{target.source} does not plan (an earlier version of it); they stay in the store",
              file=sys.stderr)
    if target.named:
        analysis.check_baseline(table, target.baseline)
    if target.adaptive is not None:
        looked = looks.analyze(table, target.baseline, target.options, target.adaptive)
        table, results = looked.table, looked.results
        if looked.left_out:
            print(looked.left_out, file=sys.stderr)
    else:
        results = analysis.analyze(table, target.baseline, target.options)
    if target.protocol is not None and mlflow is not None:
        # An adaptive protocol's comparisons are decided by its rounds (a fixed one: unchanged).
        read = functools.partial(tracking.endpoint_values, mlflow, table.experiment_id)
        results = rounds.with_decisions(results, target.protocol, read,
                                        absent_devices(target.protocol))
    out = reports / target.experiment
    return RunsAnalysed(mlflow, table, results, out, write_results(results, table, out))


def write_results(results: Results, table: RunTable, out: Path) -> list[Path]:
    """results.json, the CSV tables and summary.md in `out`."""
    return [*analysis.write(results, table, out), summary.write_summary(results, table, out)]


def require_runs(mlflow: MlflowClient, target: Target) -> None:
    """Before any run exists, say which command makes some, not just that none are there."""
    if tracking.has_finished_runs(mlflow, target.experiment):
        return
    then = (f"run `python -m study run {target.source}` first" if target.source else
            "check the experiment's name in the MLflow UI (make ui)")
    raise tracking.TrackingError(f"no finished runs of {target.experiment!r} in "
                                 f"{tracking.tracking_uri()} yet; {then}")


@dataclass(frozen=True)
class Cost:
    """What one protocol still has to run, and what a run is taken to cost."""

    name: str
    cells: int
    done: int
    todo: int
    skipped: int  # cells for a device this machine lacks
    seconds_per_run: float
    source: str  # how seconds_per_run was found
    # Adaptive protocols: runs the later rounds may still add on top of `todo`, up to the
    # protocol's adaptive.max_runs (None: a fixed protocol, nothing beyond `todo`).
    more: int | None = None

    @property
    def seconds(self) -> float:
        return self.todo * self.seconds_per_run

    @property
    def ceiling_seconds(self) -> float:
        return (self.todo + (self.more or 0)) * self.seconds_per_run


@dataclass(frozen=True)
class Written:
    files: ReportFiles
    run_id: str
    logged: bool  # False: the last analysis run already holds these exact bytes
    experiment_id: str


def estimate(parts: Sequence[Part], mlflow: MlflowClient) -> list[Cost]:
    return [_cost(part, mlflow) for part in parts]


def _cost(part: Part, mlflow: MlflowClient) -> Cost:
    cells = expand(part.protocol)
    exp_id = tracking.find_experiment(mlflow, part.protocol.name)
    done = tracking.finished_keys(mlflow, exp_id) if exp_id else set()
    from study import runner

    todo, skipped = runner.runnable(part.protocol, [c for c in cells if c.key not in done])
    planned = {c.key for c in cells}
    measured = _measured(mlflow, exp_id, part, planned) if exp_id else None
    per_run, source = measured or (part.entry.seconds_per_run, "recorded in the lesson file")
    return Cost(part.protocol.name, len(cells), len(cells) - len(todo) - len(skipped),
                len(todo), len(skipped), per_run, source, more_runs(part.protocol, done, len(todo)))


def more_runs(protocol: Protocol, done: set[str], todo: int) -> int | None:
    """Runs an adaptive protocol's later rounds may add beyond round 0's `todo`: up to
    adaptive.max_runs in all (every possible cell this machine can run, if fewer), less those
    already FINISHED. An upper bound; which run depends on the verdicts (study.analysis.rounds)."""
    if protocol.adaptive is None:
        return None
    from study import runner

    possible = [c.key for c in runner.runnable(protocol, rounds.universe(protocol))[0]]
    ceiling = min(protocol.adaptive.max_runs, len(possible))
    finished = sum(key in done for key in possible)
    return max(0, ceiling - finished - todo)


def _measured(mlflow: MlflowClient, exp_id: str, part: Part,
              planned: set[str]) -> tuple[float, str] | None:
    """The median cost of the finished runs of this plan's cells (`planned` keys), if any: runs
    of the same experiment made with other overrides or another engine cost something else.

    A sequential run is open from before training until its metrics are logged: its wall time
    is its cost. Batched members train side by side, so their wall times overlap; their
    `study.seconds` tag holds each member's share of the batch (training only, no logging)."""
    runs = [r for r in tracking.finished_runs(mlflow, exp_id)
            if r.data.tags.get("study.cell") in planned]
    if not runs:
        return None
    if part.protocol.execution == "batched":
        shares = [float(r.data.tags["study.seconds"]) for r in runs
                  if "study.seconds" in r.data.tags]
        if not shares:
            return None
        return statistics.median(shares), f"median training share of {len(shares)} finished runs"
    walls = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time]
    return statistics.median(walls), f"median wall time of {len(walls)} finished runs"


def print_estimate(costs: Sequence[Cost], say: Callable[[str], None] = print) -> None:
    say("Estimate (cells still to run \u00d7 seconds per run):")
    width = max(len(c.name) for c in costs)
    for c in costs:
        skipped = f", {c.skipped} skipped (no device)" if c.skipped else ""
        say(f"  {c.name:<{width}}  {c.cells:4} cells: {c.done} done, {c.todo} to run{skipped}"
            f" \u00d7 {c.seconds_per_run:.1f} s ({c.source}) = {c.seconds / 60:.1f} min")
        if c.more is not None:
            say(f"  {'':<{width}}  adaptive: {c.todo} to run now, up to {c.todo + c.more} "
                f"with its later rounds (max_runs) = up to {c.ceiling_seconds / 60:.1f} min")
    total = sum(c.seconds for c in costs)
    ceiling = ""
    if any(c.more for c in costs):
        runs = sum(c.todo + (c.more or 0) for c in costs)
        most = sum(c.ceiling_seconds for c in costs)
        ceiling = f" (up to {runs} runs, about {most / 60:.0f} min, with adaptive rounds)"
    say(f"  total: {sum(c.todo for c in costs)} runs, about {total / 60:.0f} min of training"
        f"{ceiling} on this machine, plus the analysis and the paper; single timings on a "
        f"shared machine vary by about \u00b130%")


def run_all(parts: Sequence[Part], load: Callable[[], Dataset] | None = None,
            progress: bool = True) -> list[runner.Summary]:
    from study import runner
    from study.engine.data import load as load_data

    return [runner.run(part.protocol, load=load or load_data, progress=progress)
            for part in parts]


def evidence_of(part: Part, mlflow: MlflowClient, out: Path) -> Evidence:
    """One protocol's runs analysed: results files under out/<name>/, figures under
    out/figures/<name>/. No finished run: evidence without inputs, which reads "not measured"."""
    proto = part.protocol
    cuda = "cuda" in proto.devices
    exp_id = tracking.find_experiment(mlflow, proto.name)
    if exp_id is None or not tracking.finished_runs(mlflow, exp_id):
        return Evidence(proto.name, str(part.path), part.entry.claims, None, cuda)
    # Only the runs of the cells the protocol plans now (an edited protocol's old runs stay).
    done = analyse(target_of(proto, str(part.path)), out, mlflow)
    figs = figures.make_figures(done.results, done.table, out / figure_folder(proto.name))
    return Evidence(proto.name, str(part.path), part.entry.claims,
                    Inputs.of(done.results, done.table, figs), cuda)


def write(lesson: Lesson, lesson_file: str, parts: Sequence[Part], mlflow: MlflowClient,
          out: Path, command: str) -> Written:
    evidence = tuple(evidence_of(part, mlflow, out) for part in parts)
    files = write_paper(Paper(lesson, lesson_file, evidence, command), out)
    logged = _logged_files(out, files, evidence)
    exp_id = tracking.experiment_id(mlflow, lesson.experiment)
    run_id, new = tracking.log_once(mlflow, exp_id, logged, out, digest(logged, out),
                                    {"study.lesson": lesson.name,
                                     "study.protocols": ", ".join(e.name for e in evidence)})
    return Written(files, run_id, new, exp_id)


def _logged_files(out: Path, files: ReportFiles, evidence: Sequence[Evidence]) -> list[Path]:
    """The paper, its figures and every protocol's results files."""
    results = sorted(p for e in evidence if e.inputs is not None
                     for p in (out / e.name).rglob("*") if p.is_file())
    return [*files.all(), *results]


def digest(paths: Sequence[Path], root: Path) -> str:
    """One hash of the files' names and bytes: the same paper twice gives the same digest."""
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
