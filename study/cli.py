"""Command line of the harness.

    python -m study plan    protocols/d2l-dropout.yaml [--set training.epochs=1 ...]
    python -m study run     protocols/d2l-dropout.yaml [--backend ray [--address HEAD:6379]]
    python -m study analyze protocols/d2l-dropout.yaml     (or --experiment NAME --baseline 0.2,0.5)
    python -m study analyze --experiment byo --factor dropout --metric val_accuracy --baseline 0.5
    python -m study analyze --csv runs.csv --factor optimizer --metric val_loss --lower-is-better \
        --baseline sgd                                     (a table of your own runs)
    python -m study analyze --experiment byo ... --adaptive start=10,round=5,max=100
                                                           (your runs made in rounds of seeds)
    python -m study report  protocols/d2l-dropout.yaml
    python -m study paper   protocols/lesson.yaml          (every protocol of the lesson, one paper)
    python -m study data
    python -m study url     protocols/d2l-dropout.yaml     (the MLflow UI link of its runs)
    python -m study ui      protocols/d2l-dropout.yaml     (print that link, serve the MLflow UI)
    python -m study verify  protocols/d2l-dropout.yaml     (re-train 3 finished cells, compare)
    python -m study verify  protocols/lesson.yaml --golden (re-train the golden cells, compare)

A mistake a user can fix (a bad protocol, missing data, a busy store, a full disk) ends with
`error: ...` lines on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# Heavy modules (torch, torchvision, MLflow, pandas: seconds to import) are imported inside the
# commands that need them, so `--help` and a bad protocol answer at once.
if TYPE_CHECKING:
    from study.pipeline import Target
    from study.store.tracking import MlflowClient
    from study.protocol.schema import Protocol

REPORTS = Path(__file__).resolve().parents[1] / "reports"
UI_PORT = 5000

# Errors a user can act on, by module: only modules a command imported can have raised one, so
# they are looked up in sys.modules rather than imported here.
USER_ERRORS = (("study.protocol.schema", "ProtocolError"), ("study.engine.data", "DataError"),
               ("study.runner", "RunnerError"), ("study.store.tracking", "TrackingError"),
               ("study.analysis.comparisons", "AnalysisError"), ("study.engine.backend_ray", "ClusterError"),
               ("study.analysis.frame", "ColumnError"))


def main(argv: list[str] | None = None) -> int:
    # MLflow starts a telemetry client and its threads when imported; an offline research
    # harness has nothing to send. Set before any command imports MLflow; a user's value wins.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Against a tracking server MLflow prints two links per finished run, 120 lines for the d2l
    # study, between the progress bar's frames; the CLI prints the experiment's link once.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow.store.db.utils").addFilter(_RAISED_ANYWAY)
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; the same command resumes where it stopped",
              file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`study plan ... | head`): nothing more to say. Point stdout at devnull so
        # that the interpreter's final flush does not raise a second time (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise  # a bug: its traceback is what a fix needs
        for line in message.splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


def user_message(err: BaseException) -> str | None:
    """The text to show for an error the user can act on; None for anything else."""
    tracking = sys.modules.get("study.store.tracking")
    store = tracking.tracking_uri() if tracking else "the MLflow store"
    if (full := _disk_full(err)) is not None:
        return (f"the disk is full ({full}); free space on the disk of the store ({store}) and "
                "of reports/, then run the same command again: finished runs are kept")
    if any("database is locked" in str(e) for e in _chain(err)):
        return (f"the store {store} is locked by another process writing to it (SQLite takes "
                "one writer at a time); wait for it to finish, then run the same command again")
    for module, name in USER_ERRORS:
        if module in sys.modules and isinstance(err, getattr(sys.modules[module], name)):
            return str(err)
    return tracking.unreachable(err) if tracking else None


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the errors behind it (MLflow and SQLAlchemy wrap what went wrong)."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _disk_full(err: BaseException) -> str | None:
    """What ran out of space, if `err` or an error behind it is a full disk."""
    for seen in _chain(err):
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"{seen.strerror}: {seen.filename}" if seen.filename else str(seen.strerror)
        # SQLite reports it as text (sqlite3.OperationalError, wrapped by SQLAlchemy and MLflow).
        if "database or disk is full" in str(seen):
            return "SQLite: database or disk is full"
    return None


class _RaisedAnyway(logging.Filter):
    """Drops the traceback MLflow logs for every SQLite OperationalError before raising it.

    The raised error still reaches `main`, which reports it in one line (or, for a bug, with
    its traceback); the logged copy would only bury that line under sixty others.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


_RAISED_ANYWAY = _RaisedAnyway()  # one instance: addFilter ignores a filter already added


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, func, text in [("plan", cmd_plan, "list the cells and mark those done"),
                             ("run", cmd_run, "run the cells that are not done"),
                             ("url", cmd_url, "print the MLflow UI link of the protocol's runs"),
                             ("ui", cmd_ui, "print that link and serve the MLflow UI")]:
        p = sub.add_parser(name, help=text)
        _protocol_args(p)
        p.set_defaults(func=func)
        if name == "ui":
            p.add_argument("--port", type=int, default=UI_PORT, help="on 127.0.0.1")
        if name == "run":
            # Where the cells train, not what they are: cell keys do not depend on it.
            p.add_argument("--backend", choices=["local", "ray"], default="local",
                           help="local: a worker process per group here (default); ray: Ray "
                                "tasks on a cluster")
            p.add_argument("--address", help="with --backend ray: join the cluster at "
                                             "HOST:PORT (default: start one on this machine)")
    for name, func, text in [("analyze", cmd_analyze, "statistics into reports/NAME/"),
                             ("report", cmd_report, "statistics, figures and the PDF report")]:
        p = sub.add_parser(name, help=text)
        _protocol_args(p, optional=True)
        p.add_argument("--experiment", help="analyse any MLflow experiment by name")
        if name == "analyze":
            p.add_argument("--csv", metavar="FILE", help="analyse a table of runs (one row per "
                           "run, or per run and step); writes reports/<--experiment or FILE's "
                           "name>/")
            p.add_argument("--step", help="with --csv: the step column (default: 'step' if "
                                          "there, else one row per run)")
            p.add_argument("--adaptive", metavar="start=N,round=N,max=N[,stop=settled|first]",
                           help="with --experiment or --csv: runs made in rounds; each "
                           "setting's seeds in ascending order are the looks (at start, "
                           "start+round, ... up to max seeds; later seeds are left out), each "
                           "comparison decided by the anytime-valid rule of adaptive protocols "
                           "(docs/own-experiments.md)")
        p.add_argument("--factor", default="dropout1,dropout2", metavar="PARAM[,PARAM...]",
                       help="the params whose values make a setting (default dropout1,dropout2)")
        p.add_argument("--seed", default="seed", metavar="PARAM",
                       help="the param that pairs runs across settings (default seed)")
        p.add_argument("--metric", default="test_acc",
                       help="the outcome, read at its final step or over its last K steps "
                            "(default test_acc)")
        p.add_argument("--lower-is-better", action="store_true",
                       help="for a loss or an error: lower values read as better")
        p.add_argument("--margin", type=float,
                       help="equivalence margin in the metric's units (default 0.005)")
        p.add_argument("--baseline", metavar="VALUE[,VALUE...]",
                       help="one value per factor, e.g. 0.5 or sgd (default 0.2,0.5 for "
                            "dropout1,dropout2)")
        p.add_argument("--endpoint", default="final",
                       help="primary endpoint with --experiment: final or last:K")
        p.set_defaults(func=func)
    p = sub.add_parser("verify", help="re-train a sample of finished cells and compare bits")
    _protocol_args(p, optional=True)
    p.add_argument("--experiment", help="verify any experiment of this harness by name")
    p.add_argument("--sample", type=int,
                   help="cells to re-train (default 3; with --golden: all, else N per file)")
    p.add_argument("--all", action="store_true", help="re-train every finished cell")
    p.add_argument("--golden", action="store_true",
                   help="re-train the cells of tests/golden/ (no store needed): the portable promise")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("paper", help="run every protocol of a lesson file, write one paper")
    p.add_argument("lesson", help="protocols/lesson.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every protocol, e.g. training.epochs=1")
    p.add_argument("--dry-run", action="store_true",
                   help="print what is left to run and the time estimate, run nothing")
    p.set_defaults(func=cmd_paper)
    p = sub.add_parser("data", help="find, verify and unpack Fashion-MNIST")
    p.set_defaults(func=cmd_data)
    return parser


def _protocol_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("protocol", nargs="?" if optional else None, help="protocols/NAME.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol value (dotted path), e.g. training.epochs=1")


def _load(args: argparse.Namespace) -> Protocol:
    from study.protocol import schema as protocol

    path = Path(args.protocol)
    raw = protocol.parse_yaml(protocol.read_text(path), str(path))
    if isinstance(raw, dict) and "protocols" in raw and "dropout" not in raw:
        # Read as a protocol it gives four schema errors that hide what it is.
        raise protocol.ProtocolError(f"{path} is a lesson file (a list of protocols), not a "
                                     f"protocol: run it with `python -m study paper {path}`")
    return protocol.load(path, args.set)


def _mode_lines(proto: Protocol) -> list[str]:
    """Each mode of the protocol and its cost against default, as the bench last measured it."""
    from study.tools import mode_cost

    measured, cpu = mode_cost.read(), mode_cost.this_cpu()
    return [mode_cost.line(mode, proto.execution, proto.kernels, measured, cpu)
            for mode in proto.determinism]


def cmd_plan(args: argparse.Namespace) -> int:
    proto = _load(args)  # before MLflow's import: a bad protocol fails at once
    from study.protocol import plan
    from study.store import tracking

    cells = plan.expand(proto)
    absent = _absent_devices(proto, cells)
    print("\n".join(_mode_lines(proto)))
    mlflow = tracking.client()
    if proto.adaptive is not None:
        return _plan_rounds(proto, mlflow, tracking.find_experiment(mlflow, proto.name),
                            frozenset(absent))
    done = tracking.finished_keys_of(mlflow, proto.name)
    for cell in cells:
        mark = "done" if cell.key in done else ("skip" if cell.device in absent else "todo")
        print(f"{mark:4}  {cell.key}  {cell.name}")
    finished = sum(c.key in done for c in cells)
    print(f"{len(cells)} cells: {finished} done, {len(cells) - finished} to run")
    return 0


def _plan_rounds(proto: Protocol, mlflow: MlflowClient, exp_id: str | None,
                 absent: frozenset[str]) -> int:
    """An adaptive protocol's plan: the rounds its finished runs give, and the next one."""
    from study.analysis import rounds
    from study.store import tracking

    read = (functools.partial(tracking.endpoint_values, mlflow, exp_id) if exp_id
            else lambda keys, k, metric=None: {})
    schedule = rounds.from_store(proto, read, absent)
    for line in rounds.plan_lines(schedule):
        print(line)
    if schedule.stop is None:  # what later rounds may still add
        print(f"ceiling: at most {proto.adaptive.max_runs} runs (adaptive.max_runs), "
              f"{schedule.design.max_seeds} seeds per setting; {len(schedule.cells)} planned so far")
    return 0


def _absent_devices(proto: Protocol, cells: list) -> set[str]:
    """Devices of the plan this machine lacks; a RunnerError if the protocol requires one."""
    if all(c.device == "cpu" for c in cells):
        return set()  # the CPU is always there: no need to import torch to ask
    from study import runner

    return {c.device for c in runner.runnable(proto, cells)[1]}


def cmd_run(args: argparse.Namespace) -> int:
    proto = _load(args)
    from study import runner

    if args.address and args.backend != "ray":
        raise runner.RunnerError("--address joins a Ray cluster: use it with --backend ray")
    if args.backend == "ray":
        from study.engine import backend_ray as worker_ray

        worker_ray.connect(args.address)
    print("\n".join(_mode_lines(proto)), flush=True)
    summary = runner.run(proto, where=args.backend)
    print(f"{proto.name}: {summary.ran} runs logged, {summary.already_done} already done, "
          f"{summary.skipped} skipped, {summary.interrupted} interrupted runs marked KILLED")
    _print_where(summary.experiment_id)
    return 0


def cmd_url(args: argparse.Namespace) -> int:
    proto = _load(args)
    from study.store import tracking

    exp_id = tracking.experiment_id(tracking.client(), proto.name)
    print(tracking.runs_url(exp_id))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Print the link to the protocol's runs, then become the MLflow server (`make ui`)."""
    proto = _load(args)
    from study.store import tracking

    exp_id = tracking.find_experiment(tracking.client(), proto.name)
    if exp_id is None:
        print(f"No runs of {proto.name} yet (python -m study run {args.protocol}); "
              f"all experiments: http://127.0.0.1:{args.port}/", flush=True)
    else:
        print(f"Runs of {proto.name}: {tracking.runs_url(exp_id, port=args.port)}", flush=True)
    # MLflow 3's server also starts seven job-runner processes (GenAI judges, trace roll-ups)
    # that this harness never uses; they slow start-up and outlive a SIGTERM to the server.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # exec, not a child: stopping this process (Ctrl-C, or a test's kill) stops the server.
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                              tracking.tracking_uri(), "--host", "127.0.0.1",
                              "--port", str(args.port), "--workers", "1"])


def _print_where(exp_id: str) -> None:
    from study.store import tracking

    print(f"Store: {tracking.tracking_uri()}")
    print(f"Browse: make ui, then open {tracking.runs_url(exp_id)}")


def _target(args: argparse.Namespace) -> Target:
    from study.pipeline import Target, target_of
    from study.protocol import schema as protocol

    csv = getattr(args, "csv", None)
    if args.experiment or csv:
        factors = tuple(f.strip() for f in args.factor.split(","))
        if not all(factors):
            raise protocol.ProtocolError(f"--factor {args.factor!r}: expected PARAM[,PARAM...]")
        named = (factors, args.seed, args.metric) != (("dropout1", "dropout2"), "seed", "test_acc")
        if args.baseline is None and factors != ("dropout1", "dropout2"):
            raise protocol.ProtocolError(f"--baseline: give one value per factor "
                                         f"({','.join(factors)}), e.g. --baseline "
                                         f"{','.join('VALUE' for _ in factors)}")
        baseline = tuple(v.strip() for v in (args.baseline or "0.2,0.5").split(","))
        if len(baseline) != len(factors):
            raise protocol.ProtocolError(f"--baseline {args.baseline!r}: expected one value per "
                                         f"factor ({','.join(factors)})")
        margin = {} if args.margin is None else {"equivalence_margin": args.margin}
        try:
            options = protocol.Analysis(endpoint=args.endpoint, factor=factors, seed=args.seed,
                                        metric=args.metric, lower_is_better=args.lower_is_better,
                                        **margin)
        except ValueError:
            raise protocol.ProtocolError(
                f"--endpoint {args.endpoint!r} or --margin {args.margin!r}: expected final or "
                "last:K with K >= 1, and a margin > 0") from None
        name = args.experiment or Path(csv).stem
        adaptive = getattr(args, "adaptive", None)
        if adaptive is not None:
            from study.analysis import looks

            adaptive = looks.parse(adaptive, options)
        return Target(name, baseline, options, csv=csv, step=getattr(args, "step", None),
                      named=named or args.baseline is not None, adaptive=adaptive)
    if not args.protocol:
        raise protocol.ProtocolError("give a protocol file, --experiment NAME or --csv FILE")
    if getattr(args, "adaptive", None) is not None:
        raise protocol.ProtocolError("--adaptive is for --experiment or --csv; a protocol's "
                                     "rounds come from its adaptive block (--set "
                                     "\"adaptive={round: 5, max_seeds: 60}\")")
    proto = _load(args)
    return target_of(proto, args.protocol)


def cmd_analyze(args: argparse.Namespace) -> int:
    from study import pipeline

    done = pipeline.analyse(_target(args), REPORTS)
    done.log()
    print(f"Results: {done.out / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    target = _target(args)
    o = target.options
    if (tuple(o.factor), o.metric) != (("dropout1", "dropout2"), "test_acc"):
        from study.protocol import schema as protocol

        raise protocol.ProtocolError(
            "report draws the d2l study's figures and claims, which read dropout1,dropout2 and "
            f"test_acc; for --factor {','.join(o.factor)} --metric {o.metric} run `analyze`, "
            "which writes results.json and summary.md")
    from study import report

    from study import pipeline

    done = pipeline.analyse(target, REPORTS)
    written = report.write_report(done.results, done.table, done.out)
    done.log(written.all())
    print(f"Report: {written.pdf}\nMarkdown: {written.markdown}")
    _print_where(done.table.experiment_id)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from study.protocol import schema as protocol

    if not args.experiment and not args.protocol:
        raise protocol.ProtocolError("give a protocol file or --experiment NAME")
    if args.golden:
        if args.experiment:
            raise protocol.ProtocolError("--golden checks a protocol's golden file: give the "
                                         "protocol file, not --experiment")
        from study.tools import golden
        return golden.check_all([args.protocol], args.sample, args.seed)
    from study.tools import verify  # the store's: MLflow
    from study.engine import workers  # trains: imports torch only for this command

    name = args.experiment or _load(args).name
    try:
        done = verify.verify(name, None if args.all else args.sample or 3, args.seed)
    except (verify.VerifyError, workers.WorkerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(done.lines()))
    return 0 if done.ok else 1


def cmd_paper(args: argparse.Namespace) -> int:
    """Estimate, run what is left of every protocol, analyse each, write and log one paper."""
    from study.protocol import lesson as lesson_file

    lesson = lesson_file.load(args.lesson)
    parts = lesson_file.parts(lesson, args.lesson, args.set)  # every file checked before a run
    from study import pipeline as paper
    from study.store import tracking

    mlflow = tracking.client()
    paper.print_estimate(paper.estimate(parts, mlflow))
    if args.dry_run:
        return 0
    for summary, part in zip(paper.run_all(parts), parts):
        print(f"{part.protocol.name}: {summary.ran} runs logged, {summary.already_done} already "
              f"done, {summary.skipped} skipped")
    command = " ".join(["python -m study paper", args.lesson,
                        *(f"--set {item}" for item in args.set)])
    done = paper.write(lesson, args.lesson, parts, mlflow, REPORTS / lesson.name, command)
    print(f"Paper: {done.files.pdf}\nMarkdown: {done.files.markdown}")
    print("Analysis run: " + ("logged" if done.logged else "unchanged, kept") + f" ({done.run_id})")
    _print_where(done.experiment_id)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from study.engine import data

    ds = data.load()
    print(f"Fashion-MNIST from {ds.source}: {len(ds.train_y)} training and {len(ds.test_y)} "
          f"test images, checksums verified; unpacked in {data.CACHE / 'FashionMNIST' / 'raw'}")
    return 0
