"""The only module that talks to MLflow: log results, list finished cells, load runs as a table.

Store: `mlruns/mlflow.db` (SQLite) with artifacts in `mlruns/artifacts`, unless
`MLFLOW_TRACKING_URI` names another. The run schema is documented in docs/run-schema.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType

from study.protocol.plan import TRAIN_IMAGES
from study.results import ECE_BINS
from study.analysis.frame import Source, run_table
from study.analysis.table import CURVE_COLUMNS, INFERENCE_COLUMNS, RUN_COLUMNS, Columns, RunTable

if TYPE_CHECKING:  # annotations only: importing plan and train (torch) makes `analyze` slower
    from study.protocol.plan import Cell
    from study.protocol.schema import Protocol
    from study.engine.train import Result

ROOT = Path(__file__).resolve().parents[2]
STORE_DIR = ROOT / "mlruns"
METRICS = ("train_loss", "train_acc", "test_acc")
# Runs of an experiment that are not training runs: skipped by resume and analysis.
NOT_TRAINING = ("analysis", "verify")
# MLflow rejects batches larger than these; stay under them.
MAX_PARAMS, MAX_METRICS = 100, 1000


class TrackingError(RuntimeError):
    """Runs in the store that the analysis cannot read."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STORE_DIR / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    uri = uri or tracking_uri()
    STORE_DIR.mkdir(exist_ok=True)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    # The client opens the database, creating and migrating it on first use; two processes
    # doing that at once break MLflow's alembic bookkeeping (a traceback, before any lease).
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    with open(f"{database}.init-lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri=uri)


# --- one writer per study ----------------------------------------------------------------------

LEASE_PREFIX = ".study-lease/"
# How long a lease may go without a heartbeat before another driver takes it over: the longest
# a killed driver blocks a rerun. Its holder beats every TTL/24 and stops writing once TTL/4
# has passed without a beat landing. Under the HTTP retry caps below one request ends within
# 69 s (5 tries x 10 s, 15 s of backoff, 4 s of jitter), so a write the holder began before
# it stopped (at 30 s) lands by 99 s, before TTL = 120 s runs out and a new holder starts.
DEFAULT_LEASE_TTL = 120.0
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def lease_ttl() -> float:
    raw = os.environ.get("STUDY_LEASE_TTL")
    if raw is None:
        return DEFAULT_LEASE_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = float("nan")
    if not ttl > 0 or math.isinf(ttl):
        raise TrackingError(f"STUDY_LEASE_TTL={raw!r}: expected seconds > 0")
    return ttl


class Lease:
    """The right to write one study's runs, held as an experiment named `.study-lease/NAME`.

    The primitive is the store's unique constraint on experiment names: `create_experiment`
    succeeds for exactly one of two drivers (RESOURCE_ALREADY_EXISTS for the other), through
    SQLite, PostgreSQL or a tracking server alike. A heartbeat counter tag proves the holder
    alive. A driver that finds the lease watches that counter, not clocks (no two machines need
    agree on the time): if it moves, the driver refuses; if it stands still for the TTL, the
    lease is stale and is renamed away (by id, so a fresh lease of the same name is never hit).
    """

    def __init__(self, mlflow: MlflowClient, study: str, ttl: float) -> None:
        self.mlflow, self.study, self.ttl = mlflow, study, ttl
        self.name = LEASE_PREFIX + study
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.exp_id: str | None = None
        self._last_beat = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, daemon=True,
                                        name=f"lease {study}")

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        while True:
            try:
                self.exp_id = self.mlflow.create_experiment(
                    self.name, tags={"study.lease.owner": self.owner, "study.lease.beat": "0",
                                     "study.lease.started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime())})
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self._wait_out()
                continue
            self._last_beat = time.monotonic()
            self._thread.start()
            return

    def _wait_out(self) -> None:
        """Return once the lease found is gone or stale (and retired); refuse if it is alive."""
        held = self.mlflow.get_experiment_by_name(self.name)
        if held is None:
            return
        beat, deadline = held.tags.get("study.lease.beat"), time.monotonic() + self.ttl
        while time.monotonic() < deadline:
            time.sleep(min(self.ttl / 48, deadline - time.monotonic()) or 0)
            now = self.mlflow.get_experiment(held.experiment_id)
            if now.name != self.name or now.lifecycle_stage != "active":
                return  # released meanwhile
            if now.tags.get("study.lease.beat") != beat:
                raise TrackingError(
                    f"study {self.study!r} is being run by {now.tags.get('study.lease.owner')} "
                    f"(since {now.tags.get('study.lease.started')}) against {tracking_uri()}; "
                    "a second driver would duplicate its runs, so this one stops")
        print(f"taking over the stale lease of study {self.study!r} from "
              f"{held.tags.get('study.lease.owner')} (no heartbeat for {self.ttl:.0f} s)",
              file=sys.stderr)
        self._retire(held.experiment_id, "stale")

    def _retire(self, exp_id: str, why: str) -> None:
        from mlflow.exceptions import MlflowException

        # A deleted experiment keeps its name, so free the name first.
        with contextlib.suppress(MlflowException):  # another driver retired it first
            self.mlflow.rename_experiment(exp_id, f"{self.name}/{why}-{uuid.uuid4().hex[:12]}")
            self.mlflow.delete_experiment(exp_id)

    def _beat_loop(self) -> None:
        beats = 0
        while not self._stop.wait(self.ttl / 24):
            try:
                now = self.mlflow.get_experiment(self.exp_id)
                if now.name != self.name or now.tags.get("study.lease.owner") != self.owner:
                    self._lost = f"another driver took over study {self.study!r}"
                    return
                beats += 1
                self.mlflow.set_experiment_tag(self.exp_id, "study.lease.beat", str(beats))
                self._last_beat = time.monotonic()
            except Exception:  # the store is away: check() decides when that is too long
                continue

    def check(self) -> None:
        """Raise unless this driver may still write: a writer that may have been superseded
        stops before its write could land after a new driver has started."""
        silent = time.monotonic() - self._last_beat
        if self._lost is None and silent > self.ttl / 4:
            self._lost = (f"no heartbeat reached {tracking_uri()} for {silent:.0f} s, so another "
                          f"driver may take over study {self.study!r}")
        if self._lost is not None:
            raise TrackingError(f"{self._lost}; stopping. Finished runs are saved; rerun to "
                                "resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.exp_id is not None and self._lost is None:
            self._retire(self.exp_id, "released")


_HELD: Lease | None = None  # this process's lease: start() and finish() check it before writing


@contextlib.contextmanager
def writer_lock(study: str) -> Iterator[Lease]:
    """One driver per study and store, wherever the store is (see Lease)."""
    global _HELD
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)  # the bound in DEFAULT_LEASE_TTL's comment
    lease = Lease(client(), study, lease_ttl())
    lease.acquire()
    _HELD = lease
    try:
        yield lease
    finally:
        _HELD = None
        lease.release()


def _may_write() -> None:
    if _HELD is not None:
        _HELD.check()


def unreachable(err: BaseException) -> str | None:
    """One line for an error that means the tracking server did not answer (after MLflow's
    retries), else None."""
    from mlflow.exceptions import MlflowException

    text = str(err)
    if not (isinstance(err, MlflowException) and text.startswith("API request to")):
        return None
    return (f"tracking server {tracking_uri()} did not answer ({text.splitlines()[0][:160]}); "
            "finished runs are saved, rerun to resume")


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
        runs.extend(r for r in page if r.data.tags.get("study.kind") not in NOT_TRAINING)
        token = page.token
        if not token:
            return runs


def finished_runs(mlflow: MlflowClient, exp_id: str) -> list:
    """Every FINISHED training run of the experiment (analysis runs left out)."""
    return _training_runs(mlflow, exp_id, "FINISHED")


def finished_keys(mlflow: MlflowClient, exp_id: str) -> set[str]:
    return {r.tags.get("study.cell") for r in _finished_records(mlflow, exp_id)}


def find_experiment(mlflow: MlflowClient, name: str) -> str | None:
    """The id of the experiment named `name`, or None where there is none (nothing is created)."""
    found = mlflow.get_experiment_by_name(name)
    return None if found is None else found.experiment_id


def finished_keys_of(mlflow: MlflowClient, name: str) -> set[str]:
    """The cell keys of the FINISHED runs of the experiment named `name` (empty: no experiment)."""
    exp_id = find_experiment(mlflow, name)
    return finished_keys(mlflow, exp_id) if exp_id else set()


def has_finished_runs(mlflow: MlflowClient, name: str) -> bool:
    """Whether the experiment named `name` holds any FINISHED run (training or not)."""
    exp_id = find_experiment(mlflow, name)
    return exp_id is not None and bool(
        mlflow.search_runs([exp_id], "attributes.status = 'FINISHED'", max_results=1))


def endpoint_values(mlflow: MlflowClient, exp_id: str, cells: set[str],
                    last: int = 1, metric: str = "test_acc") -> dict[str, float]:
    """Cell key -> the primary endpoint of its FINISHED run, for the keys in `cells`: the final
    test accuracy (last=1) or the mean of the last `last` evaluated epochs, as analysis
    computes it; NaN for a diverged run. What an adaptive study's rounds are planned from.
    Another `metric` (last=1 only): its final value, NaN where the run did not log it."""
    if metric != "test_acc" and last != 1:
        raise ValueError(f"endpoint_values: last={last} is for test_acc only, not {metric!r}")
    records = [r for r in _finished_records(mlflow, exp_id) if r.tags.get("study.cell") in cells]
    # last:K needs test_acc's history alone, not every logged metric's.
    curves = (_curves(mlflow, exp_id, [r.run_id for r in records], ("test_acc",))
              if last > 1 and records else None)
    if curves is not None:
        acc = curves[curves["metric"] == "test_acc"].sort_values(["run_id", "epoch"])
        means = acc.groupby("run_id").tail(last).groupby("run_id")["value"].mean()
    out: dict[str, float] = {}
    for r in records:  # newest first: a cell run twice counts its latest run
        key = r.tags["study.cell"]
        if key in out:
            continue
        if r.tags.get("study.status") == "diverged":
            out[key] = math.nan
        elif curves is None:
            out[key] = float(r.metrics.get(metric, math.nan))
        else:
            out[key] = float(means.get(r.run_id, math.nan))
    return out


@dataclass(frozen=True)
class Seen:
    """A training run as a fault campaign judges it."""

    cell: str  # study.cell
    node: str  # study.env.ray_node_id: the Ray node that trained it ("" off Ray)
    ended: float | None  # Unix time; None while RUNNING


def runs_in(mlflow: MlflowClient, name: str, status: str) -> dict[str, Seen]:
    """Run id -> what a fault campaign needs of each of the experiment's training runs in
    `status` ({} before it exists): it judges loss, duplicates and recovery by them."""
    exp_id = find_experiment(mlflow, name)
    if exp_id is None:
        return {}
    return {r.info.run_id: Seen(r.data.tags.get("study.cell", ""),
                                r.data.tags.get("study.env.ray_node_id", ""),
                                None if r.info.end_time is None else r.info.end_time / 1000)
            for r in _training_runs(mlflow, exp_id, status)}


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
          environment: dict[str, str], started: float | None = None,
          extra_tags: dict[str, str] | None = None) -> str:
    """Open a RUNNING run for `cell` with everything known before training; `started` (Unix
    time) backdates its start to when training began, for runs opened after the fact;
    `extra_tags` (an adaptive study's `study.round`) join its tags."""
    _may_write()
    tags = {"study.kind": "train", "study.protocol": protocol.name, "study.cell": cell.key,
            **{f"study.env.{k}": v for k, v in environment.items()}, **(extra_tags or {})}
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
    metrics += [Metric(name, value, now, len(result.epochs))
                for name, value in inference_metrics(result).items()]
    for i in range(0, len(metrics), MAX_METRICS):
        mlflow.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS])
    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in result_tags(result).items()])
    _may_write()
    mlflow.set_terminated(run_id, "FINISHED")


def fail(mlflow: MlflowClient, run_id: str, error: BaseException) -> None:
    mlflow.set_tag(run_id, "study.error", f"{type(error).__name__}: {error}"[:5000])
    mlflow.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def inference_metrics(result: Result) -> dict[str, float]:
    """The run's C7 numbers (table.INFERENCE_COLUMNS), logged at its last epoch; {} without passes."""
    r = result.inference
    if r is None:
        return {}
    return {"mc_flip_rate": r.flip_rate, "mc_unstable_share": r.unstable_share,
            "mc_test_acc": r.mc.accuracy, "mc_test_nll": r.mc.nll, "mc_test_ece": r.mc.ece,
            "test_nll": r.eval.nll, "test_ece": r.eval.ece}


def inference_tags(result: Result) -> dict[str, str]:
    r = result.inference
    if r is None:
        return {}
    return {"study.mc_flip_example": "none" if r.flip_example is None else str(r.flip_example),
            "study.mc_seconds": f"{r.seconds:.3f}", "study.mc_ece_bins": str(ECE_BINS)}


def result_tags(result: Result) -> dict[str, str]:
    tags = {"study.status": result.status, "study.textbook_check": str(result.textbook_check),
            "study.weights_sha256": result.weights_sha256, "study.seconds": f"{result.seconds:.3f}",
            "study.epochs_done": str(len(result.epochs)),
            **{f"study.seed.{k}": str(v) for k, v in asdict(result.streams).items()}}
    for i, rate in enumerate(result.keep_rates, start=1):
        tags[f"study.keep_rate{i}"] = "none" if rate is None else f"{rate:.6f}"
    if result.flags is not None:
        tags.update({f"study.flag.{k}": str(v) for k, v in asdict(result.flags).items()})
    if result.arithmetic is not None:  # absent on runs from before workers: MKL_CBWR unknown
        tags.update({f"study.flag.{k}": str(v) for k, v in asdict(result.arithmetic).items()})
    if result.kernels is not None:
        tags["study.flag.kernels"] = result.kernels
    if result.threads is not None:
        tags["study.threads"] = str(result.threads)
    return {**tags, **inference_tags(result)}


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


# --- verification runs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """A FINISHED training run as `study verify` needs it."""

    run_id: str
    name: str
    cell_key: str
    mode: str
    weights_sha256: str
    environment: dict[str, str]  # study.env.* tags, prefix removed
    # The GEMM path it trained on; runs from before the tag trained on torch's.
    kernels: str = "torch"


def recorded_runs(mlflow: MlflowClient, exp_id: str) -> list[Recorded]:
    return [Recorded(r.info.run_id, r.info.run_name or "", r.data.tags.get("study.cell", ""),
                     r.data.params.get("determinism", "default"),
                     r.data.tags.get("study.weights_sha256", ""),
                     {k.removeprefix("study.env."): v for k, v in r.data.tags.items()
                      if k.startswith("study.env.")},
                     r.data.tags.get("study.flag.kernels", "torch"))
            for r in _training_runs(mlflow, exp_id, "FINISHED")]


def recorded_protocol(mlflow: MlflowClient, run_id: str) -> dict[str, Any] | None:
    return _protocol(mlflow, run_id)


def recorded_epochs(mlflow: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    """metric -> {epoch: value}, as logged."""
    return {m: {p.step: p.value for p in mlflow.get_metric_history(run_id, m)} for m in METRICS}


def log_verify(mlflow: MlflowClient, exp_id: str, tags: dict[str, str], lines: list[str]) -> str:
    """One run tagged study.kind=verify holding the counts and the per-cell lines; analysis and
    resume skip it. Earlier verify runs stay: each is a check made on some machine."""
    run = mlflow.create_run(exp_id, run_name="verify",
                            tags={"study.kind": "verify", **{f"study.verify.{k}": v
                                                             for k, v in tags.items()}})
    mlflow.log_text(run.info.run_id, "\n".join(lines) + "\n", "verify.txt")
    mlflow.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def latest_verify(mlflow: MlflowClient, exp_id: str) -> dict[str, str] | None:
    """The study.verify.* tags of the newest verify run, or None."""
    found = mlflow.search_runs([exp_id], "tags.`study.kind` = 'verify'", ViewType.ACTIVE_ONLY, 1,
                               order_by=["attributes.start_time DESC"])
    if not found:
        return None
    return {k.removeprefix("study.verify."): v for k, v in found[0].data.tags.items()
            if k.startswith("study.verify.")}


def log_once(mlflow: MlflowClient, exp_id: str, files: list[Path], root: Path, digest: str,
             tags: dict[str, str]) -> tuple[str, bool]:
    """`log_analysis`, unless the experiment's analysis run already holds files with this
    digest: (run id, whether a new run was logged). A rerun that changed nothing logs nothing."""
    for run in mlflow.search_runs([exp_id], "tags.`study.kind` = 'analysis'"):
        if run.data.tags.get("study.digest") == digest:
            return run.info.run_id, False
    return log_analysis(mlflow, exp_id, files, root, {**tags, "study.digest": digest}), True


# --- loading runs for analysis -----------------------------------------------------------------

# Runs from before the size axis carry no `train_images` param; their protocol's single
# `data.train_subset` says it ("None": the whole set).
SUBSET_PARAMS = ("protocol.data.train_subset", "protocol.data.dataset")


def load_runs(mlflow: MlflowClient, experiment: str, cells: set[str] | None = None,
              columns: Columns = Columns()) -> RunTable:
    """Every FINISHED training run of `experiment` as a RunTable (replicates included), read
    under `columns`' names; with `cells`, only the runs of those cell keys (a protocol's plan:
    runs of an earlier version of it, e.g. before a new key, stay in the store but are left out
    and counted). A name missing from any run is a `frame.ColumnError` listing what is logged.

    Read in bulk: straight from the tables of a SQL store (SQLite, PostgreSQL), else through a
    tracking server's search and bulk metric-history endpoints; one call per run and metric
    only where neither is there (issue 12: that loop took 130 s for 5,000 runs)."""
    exp_id = experiment_id(mlflow, experiment, create=False)
    records = _finished_records(mlflow, exp_id)
    planned = [r for r in records if cells is None or r.tags.get("study.cell") in cells]
    left_out, records = len(records) - len(planned), planned
    if not records:
        raise TrackingError(f"experiment {experiment!r} has no finished runs to analyse"
                            + (f" ({left_out} are of cells the protocol does not plan)"
                               if left_out else ""))
    raw = pd.DataFrame([_raw_row(record) for record in records])
    # Only the per-epoch metrics the analysis reads: through a server each costs a request
    # per 100 runs.
    curves = _curves(mlflow, exp_id, [r.run_id for r in records], columns.curve_metrics)
    source = Source(f"experiment {experiment!r}",
                    tuple(sorted({k for r in records for k in r.params
                                  if not k.startswith("protocol.")})),
                    tuple(sorted({k for r in records for k in r.metrics})))
    return run_table(raw, curves, columns, source, experiment_id=exp_id,
                     experiment_name=experiment, protocol=_protocol(mlflow, records[0].run_id),
                     environment=_environment(records), verification=latest_verify(mlflow, exp_id),
                     unplanned_runs=left_out)


def _raw_row(run: RunRecord) -> dict[str, Any]:
    """What a run recorded, one name each: a param, else a study.* tag, else a metric's last
    value (the order in which the harness's own runs record the table's columns)."""
    known = {*RUN_COLUMNS, *INFERENCE_COLUMNS}
    tags = {k.removeprefix("study."): v for k, v in run.tags.items()
            if k.removeprefix("study.") in known}
    row: dict[str, Any] = {**run.metrics, **tags, **run.params,
                           "run_id": run.run_id, "run_name": run.run_name or ""}
    if "train_images" not in row:
        row["train_images"] = _recorded_subset(run.params)
    return row


def _recorded_subset(params: dict[str, str]) -> str | None:
    """Training images of a run logged before `train_images` was a param, from its protocol;
    None for a user's run without one (not recorded, and said so)."""
    subset = params.get("protocol.data.train_subset")
    if subset == "None":
        return str(TRAIN_IMAGES.get(params.get("protocol.data.dataset", ""), "")) or None
    return subset


def _protocol(mlflow: MlflowClient, run_id: str) -> dict[str, Any] | None:
    try:
        path = mlflow.download_artifacts(run_id, "protocol.yaml")
    except Exception:  # a user's own runs need not carry one
        return None
    return yaml.safe_load(Path(path).read_text())


def _environment(runs: list[RunRecord]) -> dict[str, str]:
    """Every environment tag and flag, with the distinct values seen across runs joined."""
    seen: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.tags.items():
            if key.startswith(("study.env.", "study.flag.", "study.threads")):
                seen.setdefault(key.removeprefix("study.env."), set()).add(value)
    return {key: ", ".join(sorted(values)) for key, values in sorted(seen.items())}


# --- bulk reading -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunRecord:
    """One training run as analysis reads it: params, tags and last value of each metric
    (from a SQL store, only those analysis reads)."""

    run_id: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


def _sql_store(mlflow: MlflowClient) -> Any | None:
    """The SQLAlchemy store behind the client, when the URI names a database, not a server."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = mlflow._tracking_client.store  # no public accessor; isolated here
    return store if isinstance(store, SqlAlchemyStore) else None


def _finished_records(mlflow: MlflowClient, exp_id: str) -> list[RunRecord]:
    """FINISHED, active training runs (no analysis or verify run), newest first."""
    store = _sql_store(mlflow)
    if store is not None:
        return _sql_records(store, exp_id)
    if hasattr(mlflow._tracking_client.store, "get_host_creds"):
        return _rest_records(mlflow, exp_id)
    return [RunRecord(r.info.run_id, r.info.run_name or "", dict(r.data.params),
                      dict(r.data.tags), dict(r.data.metrics))
            for r in _training_runs(mlflow, exp_id, "FINISHED")]


def _analysed_param(key: str) -> bool:
    """The params analysis reads: every one but the protocol.* ones (3/4 of all; two read)."""
    return not key.startswith("protocol.") or key in SUBSET_PARAMS


def _finished_ids(exp_id: str):
    """SELECT run_uuid of the experiment's FINISHED active runs (a subquery for the others)."""
    from mlflow.store.tracking.dbmodels.models import SqlRun
    from sqlalchemy import select

    return select(SqlRun.run_uuid).where(SqlRun.experiment_id == int(exp_id),
                                         SqlRun.status == "FINISHED",
                                         SqlRun.lifecycle_stage == "active")


def _sql_records(store: Any, exp_id: str) -> list[RunRecord]:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
    from sqlalchemy import case, or_, select, true

    ids = _finished_ids(exp_id).subquery()
    with store.engine.connect() as conn:
        runs = conn.execute(select(SqlRun.run_uuid, SqlRun.name)
                            .where(SqlRun.run_uuid.in_(select(ids)))
                            .order_by(SqlRun.start_time.desc(), SqlRun.run_uuid)).all()
        found = {run_id: ({}, {}, {}) for run_id, _ in runs}
        # Every param but the protocol.* ones (3/4 of all rows; the analysis reads two), every
        # metric: a user's names can be any, and a missing one is reported with what exists.
        wanted = (or_(~SqlParam.key.like("protocol.%"), SqlParam.key.in_(SUBSET_PARAMS)),
                  SqlTag.key.like("study.%"), true())
        for slot, model in enumerate((SqlParam, SqlTag, SqlLatestMetric)):
            # MLflow stores a NaN metric as 0 with is_nan set.
            value = (case((model.is_nan, float("nan")), else_=model.value)
                     if model is SqlLatestMetric else model.value)
            query = select(model.run_uuid, model.key, value).where(
                model.run_uuid.in_(select(ids)), wanted[slot])
            for run_id, key, val in _plain_rows(conn, query):
                found[run_id][slot][key] = val
    records = [RunRecord(run_id, name or "", *found[run_id]) for run_id, name in runs]
    return [r for r in records if r.tags.get("study.kind") not in NOT_TRAINING]


# Runs per page of a tracking server's search (its own cap is 50,000): what a page costs the
# server grows with its runs, so one page more is cheap.
SEARCH_PAGE = 1000
SEARCH_ROUTE = "/api/2.0/mlflow/runs/search"


def _rest_records(mlflow: MlflowClient, exp_id: str) -> list[RunRecord]:
    """`_finished_records` through a tracking server's search endpoint, read as plain JSON.

    The server's answer is the same as `search_runs`'; what is skipped is the client's turning
    ~80 params, tags and metrics a run into protobuf and entity objects (a second a 1,000-run
    page), and the records keep only what `_sql_records` keeps (`_analysed_param`, study.* tags).
    """
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    creds = mlflow._tracking_client.store.get_host_creds()
    records, token = [], None
    while True:
        # The default order, as `search_runs`': newest first.
        body = {"experiment_ids": [exp_id], "filter": "attributes.status = 'FINISHED'",
                "run_view_type": "ACTIVE_ONLY", "max_results": SEARCH_PAGE,
                **({"page_token": token} if token else {})}
        response = verify_rest_response(  # an error as MlflowClient's own (see `unreachable`)
            http_request(creds, SEARCH_ROUTE, "POST", json=body), SEARCH_ROUTE)
        page = response.json()
        records.extend(_json_record(run) for run in page.get("runs", []))
        token = page.get("next_page_token")
        if not token:
            return [r for r in records if r.tags.get("study.kind") not in NOT_TRAINING]


def _json_record(run: dict[str, Any]) -> RunRecord:
    """One run of a search answer (protobuf's JSON: NaN is the string "NaN", absent lists are
    left out)."""
    data = run.get("data", {})
    params = {p["key"]: p.get("value", "") for p in data.get("params", [])
              if _analysed_param(p["key"])}
    tags = {t["key"]: t.get("value", "") for t in data.get("tags", [])
            if t["key"].startswith("study.")}
    metrics = {m["key"]: float(m.get("value", 0.0)) for m in data.get("metrics", [])}
    return RunRecord(run["info"]["run_id"], run["info"].get("run_name", ""), params, tags, metrics)


def _curves(mlflow: MlflowClient, exp_id: str, run_ids: list[str],
            metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Per-step `metrics` of `run_ids`: one query on a SQL store, else 100 runs per request."""
    store = _sql_store(mlflow)
    if store is not None:
        frame = _sql_curves(store, exp_id, set(run_ids), metrics)
    else:
        chunks = [run_ids[i:i + BULK_RUNS] for i in range(0, len(run_ids), BULK_RUNS)]
        with ThreadPoolExecutor(HISTORY_REQUESTS) as pool:
            points = pool.map(lambda chunk: list(_rest_histories(mlflow, chunk, metrics)), chunks)
            frame = pd.DataFrame([(m.run_id, m.step, m.key, m.value) for part in points
                                  for m in part], columns=list(CURVE_COLUMNS))
    return frame.sort_values(["run_id", "metric", "epoch"], kind="stable", ignore_index=True)


def _sql_curves(store: Any, exp_id: str, run_ids: set[str],
                metrics: tuple[str, ...]) -> pd.DataFrame:
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import case, select

    # No key filter in SQL: SQLite would then walk the (key, ...) primary key across every
    # experiment's metrics instead of this experiment's runs through the run_uuid index.
    # MLflow stores a NaN metric as 0 with is_nan set.
    value = case((SqlMetric.is_nan, float("nan")), else_=SqlMetric.value)
    query = (select(SqlMetric.run_uuid, SqlMetric.step, SqlMetric.key, value)
             .where(SqlMetric.run_uuid.in_(select(_finished_ids(exp_id).subquery()))))
    with store.engine.connect() as conn:
        rows = _plain_rows(conn, query)
    frame = pd.DataFrame.from_records(rows, columns=list(CURVE_COLUMNS))
    return frame[frame["metric"].isin(metrics) & frame["run_id"].isin(run_ids)]


def _plain_rows(conn: Any, query: Any) -> list[tuple]:
    # Straight from the DB-API cursor: SQLAlchemy's Row objects cost more than the query
    # itself at 300,000 rows (pandas probes each one for attributes it lacks).
    return conn.execute(query).cursor.fetchall()


@dataclass(frozen=True)
class _Point:
    run_id: str
    key: str
    step: int
    value: float


# The server's get-history-bulk route: at most 100 runs and 25,000 points per request.
BULK_RUNS, BULK_POINTS = 100, 25_000
# History requests in flight at once: a server with several workers answers them side by side.
HISTORY_REQUESTS = 4


def _rest_histories(mlflow: MlflowClient, run_ids: list[str],
                    metrics: tuple[str, ...] = METRICS) -> Iterator[_Point]:
    """Metric histories through a tracking server's bulk route (the one its UI charts use);
    one `get_metric_history` per run and metric where the server has no such route."""
    for i in range(0, len(run_ids), BULK_RUNS):
        chunk = run_ids[i:i + BULK_RUNS]
        for metric in metrics:
            try:
                yield from _bulk_history(mlflow, chunk, metric)
            except _NoBulkRoute:
                for run_id in chunk:
                    for m in mlflow.get_metric_history(run_id, metric):
                        yield _Point(run_id, metric, m.step, m.value)


class _NoBulkRoute(Exception):
    """The store answers neither SQL nor the bulk route."""


def _bulk_history(mlflow: MlflowClient, run_ids: list[str], metric: str) -> list[_Point]:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import http_request

    store = mlflow._tracking_client.store
    if not hasattr(store, "get_host_creds"):
        raise _NoBulkRoute
    try:
        response = http_request(store.get_host_creds(),
                                "/ajax-api/2.0/mlflow/metrics/get-history-bulk", "GET",
                                params={"run_id": run_ids, "metric_key": metric,
                                        "max_results": BULK_POINTS})
    except MlflowException:
        raise _NoBulkRoute from None
    if response.status_code == 404:
        raise _NoBulkRoute
    response.raise_for_status()
    points = response.json().get("metrics", [])
    if len(points) >= BULK_POINTS and len(run_ids) > 1:
        # The route truncates silently at its cap: halve the runs until each answer is whole.
        half = len(run_ids) // 2
        return (_bulk_history(mlflow, run_ids[:half], metric)
                + _bulk_history(mlflow, run_ids[half:], metric))
    if len(points) >= BULK_POINTS:
        raise _NoBulkRoute  # one run with more points than the cap: page it per run instead
    return [_Point(p["run_id"], p["key"], int(p.get("step", 0)), float(p["value"]))
            for p in points]


def insert_runs(mlflow: MlflowClient, exp_id: str, records: list[RunRecord],
                curves: pd.DataFrame, started_ms: int) -> None:
    """Write FINISHED runs straight into a SQL store's tables, as `log_batch` would leave them.

    For synthetic benchmarks only: 10,000 runs take seconds here and most of an hour through
    the API. `curves` has CURVE_COLUMNS; each run's last epoch becomes its latest metric.
    """
    from mlflow.store.tracking.dbmodels.models import (SqlLatestMetric, SqlMetric, SqlParam,
                                                       SqlRun, SqlTag)

    store = _sql_store(mlflow)
    if store is None:
        raise TrackingError(f"{mlflow.tracking_uri}: runs can be inserted only into a SQL store")
    where = mlflow.get_experiment(exp_id).artifact_location
    runs = [dict(run_uuid=r.run_id, name=r.run_name, source_type="LOCAL", source_name="",
                 entry_point_name="", user_id="bench", status="FINISHED",
                 start_time=started_ms + i, end_time=started_ms + i + 1, source_version="",
                 lifecycle_stage="active", artifact_uri=f"{where}/{r.run_id}/artifacts",
                 experiment_id=int(exp_id)) for i, r in enumerate(records)]
    points = [dict(run_uuid=run_id, step=int(step), key=key, value=float(value),
                   timestamp=started_ms, is_nan=False)
              for run_id, step, key, value in curves[list(CURVE_COLUMNS)].itertuples(index=False)]
    last = {(p["run_uuid"], p["key"]): p for p in sorted(points, key=lambda p: p["step"])}
    with store.engine.begin() as conn:
        conn.execute(SqlRun.__table__.insert(), runs)
        for model, items in ((SqlParam, "params"), (SqlTag, "tags")):
            conn.execute(model.__table__.insert(),
                         [dict(run_uuid=r.run_id, key=k, value=v)
                          for r in records for k, v in getattr(r, items).items()])
        conn.execute(SqlMetric.__table__.insert(), points)
        conn.execute(SqlLatestMetric.__table__.insert(), list(last.values()))


def runs_url(exp_id: str, host: str = "127.0.0.1", port: int | None = None) -> str:
    """The UI link of an experiment's runs: on the tracking server when the URI names one and
    no port is given, else on 127.0.0.1:`port` (default: PORT, else 5000, as `make ui`)."""
    uri = tracking_uri()
    if port is None and uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    else:
        base = f"http://{host}:{port or os.environ.get('PORT') or 5000}"
    # MLflow 3 opens an experiment on a GenAI overview unless linked straight to its runs.
    return f"{base}/#/experiments/{exp_id}/runs"
