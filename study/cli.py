"""Command line of the harness.

    python -m study plan    protocols/d2l-dropout.yaml [--set training.epochs=1 ...]
    python -m study run     protocols/d2l-dropout.yaml
    python -m study analyze protocols/d2l-dropout.yaml     (or --experiment NAME --baseline 0.2,0.5)
    python -m study report  protocols/d2l-dropout.yaml
    python -m study data
    python -m study url     protocols/d2l-dropout.yaml     (the MLflow UI link of its runs)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from study import data, plan, protocol, runner, tracking
from study.protocol import Analysis, Protocol
from study.results import Results
from study.table import RunTable

REPORTS = Path(__file__).resolve().parents[1] / "reports"


@dataclass(frozen=True)
class Target:
    """What analysis reads: an experiment, its baseline and options."""

    experiment: str
    baseline: tuple[float, float]
    options: Analysis


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (protocol.ProtocolError, data.DataError, runner.RunnerError,
            tracking.TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if (line := tracking.unreachable(err)) is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, func, text in [("plan", cmd_plan, "list the cells and mark those done"),
                             ("run", cmd_run, "run the cells that are not done"),
                             ("url", cmd_url, "print the MLflow UI link of the protocol's runs")]:
        p = sub.add_parser(name, help=text)
        _protocol_args(p)
        p.set_defaults(func=func)
    for name, func, text in [("analyze", cmd_analyze, "statistics into reports/NAME/"),
                             ("report", cmd_report, "statistics, figures and the PDF report")]:
        p = sub.add_parser(name, help=text)
        _protocol_args(p, optional=True)
        p.add_argument("--experiment", help="analyse any MLflow experiment with the run schema")
        p.add_argument("--baseline", default="0.2,0.5", help="D1,D2 (with --experiment)")
        p.add_argument("--endpoint", default="final",
                       help="primary endpoint with --experiment: final or last:K")
        p.set_defaults(func=func)
    p = sub.add_parser("data", help="find, verify and unpack Fashion-MNIST")
    p.set_defaults(func=cmd_data)
    return parser


def _protocol_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("protocol", nargs="?" if optional else None, help="protocols/NAME.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol value (dotted path), e.g. training.epochs=1")


def _load(args: argparse.Namespace) -> Protocol:
    return protocol.load(args.protocol, args.set)


def cmd_plan(args: argparse.Namespace) -> int:
    proto = _load(args)
    mlflow = tracking.client()
    found = mlflow.get_experiment_by_name(proto.name)
    done = tracking.finished_keys(mlflow, found.experiment_id) if found else set()
    cells = plan.expand(proto)
    for cell in cells:
        mark = "done" if cell.key in done else ("skip" if not runner.available(cell.device)
                                                 else "todo")
        print(f"{mark:4}  {cell.key}  {cell.name}")
    finished = sum(c.key in done for c in cells)
    print(f"{len(cells)} cells: {finished} done, {len(cells) - finished} to run")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    proto = _load(args)
    summary = runner.run(proto)
    print(f"{proto.name}: {summary.ran} runs logged, {summary.already_done} already done, "
          f"{summary.skipped} skipped, {summary.interrupted} interrupted runs marked KILLED")
    _print_where(summary.experiment_id)
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    proto = _load(args)
    exp_id = tracking.experiment_id(tracking.client(), proto.name)
    print(tracking.runs_url(exp_id))
    return 0


def _print_where(exp_id: str) -> None:
    print(f"Store: {tracking.tracking_uri()}")
    print(f"Browse: make ui, then open {tracking.runs_url(exp_id)}")


def _target(args: argparse.Namespace) -> Target:
    if args.experiment:
        try:
            d1, d2 = (float(v) for v in args.baseline.split(","))
        except ValueError:
            raise protocol.ProtocolError(f"--baseline {args.baseline!r}: expected D1,D2") from None
        try:
            options = Analysis(endpoint=args.endpoint)
        except ValueError:
            raise protocol.ProtocolError(f"--endpoint {args.endpoint!r}: expected final or "
                                         "last:K with K >= 1") from None
        return Target(args.experiment, (d1, d2), options)
    if not args.protocol:
        raise protocol.ProtocolError("give a protocol file or --experiment NAME")
    proto = _load(args)
    return Target(proto.name, proto.baseline, proto.analysis)


@dataclass(frozen=True)
class Analysed:
    """What `analyze` and `report` share: the runs, their results and the files written."""

    mlflow: tracking.MlflowClient  # tracking stays the only module that imports MLflow
    table: RunTable
    results: Results
    out: Path
    files: list[Path]

    def log(self, extra: list[Path] = ()) -> None:
        tracking.log_analysis(self.mlflow, self.table.experiment_id, [*self.files, *extra],
                              self.out)


def _analyze(target: Target) -> Analysed:
    from study import analysis  # heavy (scipy, statsmodels): only the commands that need it

    mlflow = tracking.client()
    table = tracking.load_runs(mlflow, target.experiment)
    results = analysis.analyze(table, target.baseline, target.options)
    out = REPORTS / target.experiment
    return Analysed(mlflow, table, results, out, analysis.write(results, table, out))


def cmd_analyze(args: argparse.Namespace) -> int:
    done = _analyze(_target(args))
    done.log()
    print(f"Results: {done.out / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from study import report

    done = _analyze(_target(args))
    written = report.write_report(done.results.to_json(), done.table, done.out)
    done.log(written.all())
    print(f"Report: {written.pdf}\nMarkdown: {written.markdown}")
    _print_where(done.table.experiment_id)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    ds = data.load()
    print(f"Fashion-MNIST from {ds.source}: {len(ds.train_y)} training and {len(ds.test_y)} "
          f"test images, checksums verified; unpacked in {data.CACHE / 'FashionMNIST' / 'raw'}")
    return 0
