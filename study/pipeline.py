"""The lesson's paper: run every protocol of a lesson file, analyse each, write one report.

    python -m study paper protocols/lesson.yaml            (make paper)
    python -m study paper protocols/lesson.yaml --dry-run  (the estimate only)

Each protocol runs through `runner.run`, so finished cells are never rerun and an interrupted
paper resumes where it stopped. Before anything runs, `estimate` prices the cells still to run.
The paper and everything it read are logged to one `analysis` run of the experiment
`<name>-paper`; a rerun that writes the same bytes keeps that run instead of logging a new one.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from study.analysis import comparisons as analysis
from study.report import figures
from study import runner
from study.store import tracking
from study.engine.data import Dataset
from study.engine.data import load as load_data
from study.protocol.lesson import Lesson, Part
from study.protocol.plan import expand
from study.report import ReportFiles
from study.report.context import Inputs
from study.report.paper import Paper, figure_folder, write_paper
from study.report.scorecard import Evidence
from study.store.tracking import MlflowClient


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

    @property
    def seconds(self) -> float:
        return self.todo * self.seconds_per_run


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
    todo, skipped = runner.runnable(part.protocol, [c for c in cells if c.key not in done])
    planned = {c.key for c in cells}
    measured = _measured(mlflow, exp_id, part, planned) if exp_id else None
    per_run, source = measured or (part.entry.seconds_per_run, "recorded in the lesson file")
    return Cost(part.protocol.name, len(cells), len(cells) - len(todo) - len(skipped),
                len(todo), len(skipped), per_run, source)


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
    total = sum(c.seconds for c in costs)
    say(f"  total: {sum(c.todo for c in costs)} runs, about {total / 60:.0f} min of training "
        f"on this machine, plus the analysis and the paper; single timings on a shared machine "
        f"vary by about \u00b130%")


def run_all(parts: Sequence[Part], load: Callable[[], Dataset] = load_data,
            progress: bool = True) -> list[runner.Summary]:
    return [runner.run(part.protocol, load=load, progress=progress) for part in parts]


def analyse(part: Part, mlflow: MlflowClient, out: Path) -> Evidence:
    """One protocol's runs analysed: results files under out/<name>/, figures under
    out/figures/<name>/. No finished run: evidence without inputs, which reads "not measured"."""
    proto = part.protocol
    cuda = "cuda" in proto.devices
    exp_id = tracking.find_experiment(mlflow, proto.name)
    if exp_id is None or not tracking.finished_runs(mlflow, exp_id):
        return Evidence(proto.name, str(part.path), part.entry.claims, None, cuda)
    # Only the runs of the cells the protocol plans now (an edited protocol's old runs stay).
    table = tracking.load_runs(mlflow, proto.name, {c.key for c in expand(proto)})
    results = analysis.analyze(table, proto.baseline, proto.analysis)
    analysis.write(results, table, out / proto.name)
    figs = figures.make_figures(results, table, out / figure_folder(proto.name))
    return Evidence(proto.name, str(part.path), part.entry.claims,
                    Inputs.of(results, table, figs), cuda)


def write(lesson: Lesson, lesson_file: str, parts: Sequence[Part], mlflow: MlflowClient,
          out: Path, command: str) -> Written:
    evidence = tuple(analyse(part, mlflow, out) for part in parts)
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
