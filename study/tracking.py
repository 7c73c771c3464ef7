"""The only module that talks to MLflow: log results, list finished cells, load runs as a table.

Store: `mlruns/mlflow.db` (SQLite) with artifacts in `mlruns/artifacts`, unless
`MLFLOW_TRACKING_URI` names another. The run schema is documented in README.md ("Run schema").
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType

from study.plan import Cell
from study.protocol import Protocol
from study.table import RUN_COLUMNS, RunTable

if TYPE_CHECKING:  # an annotation only: importing train (torch) would make `plan` seconds slower
    from study.train import Result

ROOT = Path(__file__).resolve().parents[1]
STORE_DIR = ROOT / "mlruns"
METRICS = ("train_loss", "train_acc", "test_acc")
# MLflow rejects batches larger than these; stay under them.
MAX_PARAMS, MAX_METRICS = 100, 1000


class TrackingError(RuntimeError):
    """Runs in the store that the analysis cannot read."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def client() -> MlflowClient:
    STORE_DIR.mkdir(exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri())


@contextlib.contextmanager
def writer_lock() -> Iterator[None]:
    """One runner at a time: SQLite wants a single writer, and resume logic assumes it."""
    STORE_DIR.mkdir(exist_ok=True)
    with open(STORE_DIR / ".runner.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrackingError(f"another `study run` holds {STORE_DIR / '.runner.lock'}; "
                                "wait for it to finish") from None
        yield


# --- experiments and resume --------------------------------------------------------------------

def experiment_id(mlflow: MlflowClient, name: str, create: bool = True) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if not create:
        raise TrackingError(f"no experiment named {name!r} in {tracking_uri()}")
    # A custom kind makes the MLflow 3 UI show the runs table rather than a GenAI overview.
    return mlflow.create_experiment(
        name, artifact_location=artifact_root(),
        tags={"mlflow.experimentKind": "custom_model_development"})


def artifact_root() -> str | None:
    """`artifacts/` beside a SQLite store; a tracking server decides for itself."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()


def _training_runs(mlflow: MlflowClient, exp_id: str, status: str) -> list:
    # Filtered here, not in the query: a tag filter in MLflow drops runs that lack the tag,
    # and a user's own runs need not carry `study.kind`.
    query = f"attributes.status = '{status}'"
    runs, token = [], None
    while True:
        page = mlflow.search_runs([exp_id], query, ViewType.ACTIVE_ONLY, 1000, page_token=token)
        runs.extend(r for r in page if r.data.tags.get("study.kind") != "analysis")
        token = page.token
        if not token:
            return runs


def finished_runs(mlflow: MlflowClient, exp_id: str) -> list:
    """Every FINISHED training run of the experiment (analysis runs left out)."""
    return _training_runs(mlflow, exp_id, "FINISHED")


def finished_keys(mlflow: MlflowClient, exp_id: str) -> set[str]:
    return {r.data.tags.get("study.cell") for r in _training_runs(mlflow, exp_id, "FINISHED")}


def mark_interrupted(mlflow: MlflowClient, exp_id: str) -> int:
    """Runs left RUNNING by a killed invocation become KILLED, so their cells are redone."""
    stale = _training_runs(mlflow, exp_id, "RUNNING")
    for run in stale:
        mlflow.set_tag(run.info.run_id, "study.status", "interrupted")
        mlflow.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


# --- logging a cell ----------------------------------------------------------------------------

def flatten(tree: Any, prefix: str) -> dict[str, str]:
    """Dotted keys for every leaf of a nested dict; lists stay whole (e.g. `dropout`)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}"))
        return out
    return {prefix: str(tree)}


def start(mlflow: MlflowClient, exp_id: str, cell: Cell, protocol: Protocol,
          environment: dict[str, str], started: float | None = None) -> str:
    """Open a RUNNING run for `cell` with everything known before training; `started` (Unix
    time) backdates its start to when training began, for runs opened after the fact."""
    tags = {"study.kind": "train", "study.protocol": protocol.name, "study.cell": cell.key,
            **{f"study.env.{k}": v for k, v in environment.items()}}
    run = mlflow.create_run(exp_id, run_name=cell.name, tags=tags,
                            start_time=None if started is None else int(started * 1000))
    params = {**{k: str(v) for k, v in cell.labels().items()},
              **flatten(protocol.to_dict(), "protocol")}
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS):
        mlflow.log_batch(run.info.run_id, params=items[i:i + MAX_PARAMS])
    mlflow.log_text(run.info.run_id, yaml.safe_dump(protocol.to_dict(), sort_keys=False),
                    "protocol.yaml")
    return run.info.run_id


def finish(mlflow: MlflowClient, run_id: str, result: Result) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(name, getattr(e, name), now, e.epoch)
               for e in result.epochs for name in METRICS if math.isfinite(getattr(e, name))]
    for i in range(0, len(metrics), MAX_METRICS):
        mlflow.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS])
    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in result_tags(result).items()])
    mlflow.set_terminated(run_id, "FINISHED")


def fail(mlflow: MlflowClient, run_id: str, error: BaseException) -> None:
    mlflow.set_tag(run_id, "study.error", f"{type(error).__name__}: {error}"[:5000])
    mlflow.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def result_tags(result: Result) -> dict[str, str]:
    tags = {"study.status": result.status, "study.textbook_check": str(result.textbook_check),
            "study.weights_sha256": result.weights_sha256, "study.seconds": f"{result.seconds:.3f}",
            "study.epochs_done": str(len(result.epochs)),
            **{f"study.seed.{k}": str(v) for k, v in asdict(result.streams).items()}}
    for i, rate in enumerate(result.keep_rates, start=1):
        tags[f"study.keep_rate{i}"] = "none" if rate is None else f"{rate:.6f}"
    if result.flags is not None:
        tags.update({f"study.flag.{k}": str(v) for k, v in asdict(result.flags).items()})
    if result.threads is not None:
        tags["study.threads"] = str(result.threads)
    return tags


# --- analysis runs -----------------------------------------------------------------------------

def log_analysis(mlflow: MlflowClient, exp_id: str, files: list[Path], root: Path,
                 tags: dict[str, str] | None = None) -> str:
    """One `analysis` run holding results, figures and the report, so they open from the UI.

    A new analysis replaces the previous one, so the UI never shows stale verdicts.
    """
    for old in mlflow.search_runs([exp_id], "tags.`study.kind` = 'analysis'"):
        mlflow.delete_run(old.info.run_id)
    run = mlflow.create_run(exp_id, run_name="analysis",
                            tags={"study.kind": "analysis", **(tags or {})})
    for path in files:
        sub = path.parent.relative_to(root).as_posix()
        mlflow.log_artifact(run.info.run_id, str(path), None if sub == "." else sub)
    mlflow.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_once(mlflow: MlflowClient, exp_id: str, files: list[Path], root: Path, digest: str,
             tags: dict[str, str]) -> tuple[str, bool]:
    """`log_analysis`, unless the experiment's analysis run already holds files with this
    digest: (run id, whether a new run was logged). A rerun that changed nothing logs nothing."""
    for run in mlflow.search_runs([exp_id], "tags.`study.kind` = 'analysis'"):
        if run.data.tags.get("study.digest") == digest:
            return run.info.run_id, False
    return log_analysis(mlflow, exp_id, files, root, {**tags, "study.digest": digest}), True


# --- loading runs for analysis -----------------------------------------------------------------

# Columns a user's own runs may omit, with the value that means "the usual".
DEFAULTS: dict[str, Any] = {
    "device": "cpu", "determinism": "default", "implementation": "torch",
    "execution": "sequential", "randomness": "native", "mask_rng": "torch", "vary": "all",
    "replicate": 0,
    "status": "ok", "textbook_check": None, "weights_sha256": "", "epochs_done": None,
}
REQUIRED_PARAMS = ("dropout1", "dropout2", "seed")


def load_runs(mlflow: MlflowClient, experiment: str) -> RunTable:
    """Every FINISHED training run of `experiment` as a RunTable (replicates included)."""
    exp_id = experiment_id(mlflow, experiment, create=False)
    runs = _training_runs(mlflow, exp_id, "FINISHED")
    if not runs:
        raise TrackingError(f"experiment {experiment!r} has no finished runs to analyse")
    rows = [_row(run, experiment) for run in runs]
    curves = [c for run in runs for c in _curves(mlflow, run)]
    table = pd.DataFrame(rows).sort_values(["dropout1", "dropout2", "seed", "replicate"],
                                           kind="stable", ignore_index=True)
    return RunTable(experiment_id=exp_id, experiment_name=experiment, runs=table,
                    curves=pd.DataFrame(curves, columns=["run_id", "epoch", "metric", "value"]),
                    protocol=_protocol(mlflow, runs[0]), environment=_environment(runs))


def _row(run: Any, experiment: str) -> dict[str, Any]:
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    for key in REQUIRED_PARAMS:
        if key not in params:
            raise TrackingError(f"experiment {experiment!r}, run {run.info.run_id} "
                                f"({run.info.run_name}): param {key!r} is missing")
    row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name or ""}
    for column, kind in RUN_COLUMNS.items():
        if column in row:
            continue
        raw = params.get(column, tags.get(f"study.{column}", metrics.get(column)))
        row[column] = _convert(raw, kind, DEFAULTS.get(column), column, run, experiment)
    if row["status"] == "diverged":
        # Its last finite metrics are from before the blow-up, not an outcome of the run:
        # NaN makes the analysis exclude the run and count it, instead of scoring it.
        row.update(test_acc=float("nan"), train_acc=float("nan"), train_loss=float("nan"))
    if row["textbook_check"] is None:
        row["textbook_check"] = bool(row["train_loss"] < 0.5 and row["train_acc"] > 0.7
                                     and row["test_acc"] > 0.7)
    return row


def _convert(raw: Any, kind: type, default: Any, column: str, run: Any, experiment: str) -> Any:
    if raw is None or (kind is float and raw == "none"):
        return default if column in DEFAULTS else float("nan")
    try:
        if kind is bool:
            return str(raw).lower() == "true"
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        raise TrackingError(f"experiment {experiment!r}, run {run.info.run_id}: {column}={raw!r} "
                            f"is not a {kind.__name__}") from None


def _curves(mlflow: MlflowClient, run: Any) -> Iterator[dict[str, Any]]:
    for metric in METRICS:
        for point in mlflow.get_metric_history(run.info.run_id, metric):
            yield {"run_id": run.info.run_id, "epoch": point.step, "metric": metric,
                   "value": point.value}


def _protocol(mlflow: MlflowClient, run: Any) -> dict[str, Any] | None:
    try:
        path = mlflow.download_artifacts(run.info.run_id, "protocol.yaml")
    except Exception:  # a user's own runs need not carry one
        return None
    return yaml.safe_load(Path(path).read_text())


def _environment(runs: list) -> dict[str, str]:
    """Every environment tag and flag, with the distinct values seen across runs joined."""
    seen: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.data.tags.items():
            if key.startswith(("study.env.", "study.flag.", "study.threads")):
                seen.setdefault(key.removeprefix("study.env."), set()).add(value)
    return {key: ", ".join(sorted(values)) for key, values in sorted(seen.items())}


def runs_url(exp_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    # MLflow 3 opens an experiment on a GenAI overview unless linked straight to its runs.
    return f"http://{host}:{port}/#/experiments/{exp_id}/runs"
