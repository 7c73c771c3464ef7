"""Bulk loading and the writer lease, against SQLite and a real PostgreSQL-backed server."""

from __future__ import annotations

import math
import threading
import time

import pandas as pd
import pytest

from study.analysis.comparisons import analyze
from study.protocol.schema import Analysis
from study.tools import bench_analysis
from study.store import tracking


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.integration)])
def store(request, tmp_path, monkeypatch) -> tuple[str, str]:
    """(URI the study uses, URI of the database behind it): SQLite, or the server and its
    PostgreSQL database."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        return uri, uri
    srv = request.getfixturevalue("tracking_server")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    return srv.url, srv.database_uri


def _experiment(store: tuple[str, str], name: str) -> tuple[str, list[tracking.RunRecord]]:
    """The 1,000-run synthetic shape cut to 40 runs, plus runs that analysis must not read: a
    RUNNING one, a deleted one and an `analysis` run."""
    _, db = store
    _, records, curves = bench_analysis.synthetic(1000)
    keep = [r for r in records if r.params["dropout2"] == "0.5" and int(r.params["seed"]) < 20
            and r.params["dropout1"] in ("0.0", "0.2")]  # two settings, baseline included
    curves = curves[curves["run_id"].isin({r.run_id for r in keep})]
    mlflow = tracking.client()
    exp_id = mlflow.create_experiment(name)
    tracking.insert_runs(tracking.client(db), exp_id, keep, curves, started_ms=1_000)
    running = mlflow.create_run(exp_id, tags={"study.kind": "train"})
    mlflow.log_param(running.info.run_id, "dropout1", "0.5")
    gone = mlflow.create_run(exp_id)
    mlflow.set_terminated(gone.info.run_id, "FINISHED")
    mlflow.delete_run(gone.info.run_id)
    analysis = mlflow.create_run(exp_id, tags={"study.kind": "analysis"})
    mlflow.log_metric(analysis.info.run_id, "test_acc", 0.5, step=1)
    mlflow.set_terminated(analysis.info.run_id, "FINISHED")
    return exp_id, keep


def test_bulk_load_equals_the_per_run_api(store, monkeypatch):
    name = f"bulk-{time.monotonic_ns()}"
    _, records = _experiment(store, name)
    bulk = tracking.load_runs(tracking.client(), name)

    calls = []
    real = tracking.MlflowClient.get_metric_history

    def per_run(self, run_id, key):
        calls.append(run_id)
        return real(self, run_id, key)

    # The fallback: search_runs and one get_metric_history per run and metric.
    monkeypatch.setattr(tracking, "_sql_store", lambda mlflow: None)
    monkeypatch.setattr(tracking, "_bulk_history", _no_route)
    monkeypatch.setattr(tracking.MlflowClient, "get_metric_history", per_run)
    slow = tracking.load_runs(tracking.client(), name)

    assert len(calls) == 2 * len(records)  # test_acc, train_loss: what the analysis reads
    assert len(bulk.runs) == len(records) == 40
    assert set(bulk.runs["run_id"]) == {r.run_id for r in records}
    pd.testing.assert_frame_equal(bulk.runs, slow.runs)
    pd.testing.assert_frame_equal(bulk.curves, slow.curves)
    assert len(bulk.curves) == 40 * 2 * bench_analysis.EPOCHS
    assert bulk.environment == slow.environment
    assert bulk.environment["torch_version"] == "2.14.1"
    baseline = bulk.runs[(bulk.runs["dropout1"] == 0.2) & (bulk.runs["dropout2"] == 0.5)]
    assert len(baseline) == 20 and baseline["seed"].tolist() == list(range(20))


def _no_route(*_):
    raise tracking._NoBulkRoute


def _every_history(mlflow, exp_id, run_ids, metrics=tracking.METRICS):
    """The reference path: every logged metric's history, one get_metric_history a run."""
    points = [(run_id, m.step, metric, m.value) for run_id in run_ids
              for metric in tracking.METRICS for m in mlflow.get_metric_history(run_id, metric)]
    frame = pd.DataFrame(points, columns=["run_id", "epoch", "metric", "value"])
    return frame.sort_values(["run_id", "metric", "epoch"], kind="stable", ignore_index=True)


def _differences(fast, slow, path="results"):
    """Every field where two results.json trees differ (NaN equal to NaN), by its path."""
    if isinstance(fast, dict) and isinstance(slow, dict):
        keys = sorted(set(fast) | set(slow))
        return [d for k in keys for d in _differences(fast.get(k), slow.get(k), f"{path}.{k}")]
    if isinstance(fast, list) and isinstance(slow, list):
        if len(fast) != len(slow):
            return [f"{path}: {len(fast)} items against {len(slow)}"]
        return [d for i, (a, b) in enumerate(zip(fast, slow))
                for d in _differences(a, b, f"{path}[{i}]")]
    same = fast == slow or (isinstance(fast, float) and isinstance(slow, float)
                            and math.isnan(fast) and math.isnan(slow))
    return [] if same else [f"{path}: {fast!r} against {slow!r}"]


def test_the_differences_name_each_field_that_differs():
    assert _differences({"a": [1.0, float("nan")], "b": "x"},
                        {"a": [1.0, float("nan")], "b": "x"}) == []
    assert _differences({"a": [1.0, 2.0], "b": {"c": 1}}, {"a": [1.0, 2.5], "b": {}}) == [
        "results.a[1]: 2.0 against 2.5", "results.b.c: 1 against None"]


def test_a_search_answer_reads_as_the_records_analysis_keeps():
    """Protobuf's JSON as a server sends it: NaN as a string, an empty run name left out."""
    run = {"info": {"run_id": "r1"},
           "data": {"params": [{"key": "seed", "value": "3"},
                               {"key": "protocol.training.lr", "value": "0.5"},
                               {"key": "protocol.data.train_subset", "value": "None"}],
                    "tags": [{"key": "study.cell", "value": "c"},
                             {"key": "mlflow.user", "value": "me"}],
                    "metrics": [{"key": "test_acc", "value": "NaN", "step": "10"},
                                {"key": "train_loss", "value": 0.25}]}}
    record = tracking._json_record(run)
    assert (record.run_id, record.run_name) == ("r1", "")
    assert record.params == {"seed": "3", "protocol.data.train_subset": "None"}
    assert record.tags == {"study.cell": "c"}
    assert math.isnan(record.metrics["test_acc"]) and record.metrics["train_loss"] == 0.25


@pytest.mark.integration
def test_the_server_fast_path_gives_the_results_of_every_history(tracking_server, monkeypatch):
    """The server path (search answers read as JSON, only the curves' histories in bulk)
    against search_runs' entities and every metric's history run by run: the same results.json,
    field by field, for the primary endpoint final and last:5."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    name = f"fast-{time.monotonic_ns()}"
    _experiment((tracking_server.url, tracking_server.database_uri), name)
    fast = tracking.load_runs(tracking.client(), name)
    assert set(fast.curves["metric"]) == {"test_acc", "train_loss"}  # train_acc: never read
    monkeypatch.setattr(tracking, "_rest_records", lambda mlflow, exp_id: [
        tracking.RunRecord(r.info.run_id, r.info.run_name or "", dict(r.data.params),
                           dict(r.data.tags), dict(r.data.metrics))
        for r in tracking._training_runs(mlflow, exp_id, "FINISHED")])
    monkeypatch.setattr(tracking, "_curves", _every_history)
    slow = tracking.load_runs(tracking.client(), name)
    assert len(slow.curves) == 40 * 3 * bench_analysis.EPOCHS
    for endpoint in ("final", "last:5"):
        options = Analysis(bootstrap=200, endpoint=endpoint)
        results = [analyze(t, (0.2, 0.5), options).to_json() for t in (fast, slow)]
        assert results[0]["comparisons"] and results[0]["curves"]
        assert _differences(*results) == []


@pytest.mark.integration
def test_the_server_answers_histories_through_its_bulk_route(tracking_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    name = f"route-{time.monotonic_ns()}"
    _experiment((tracking_server.url, tracking_server.database_uri), name)
    mlflow = tracking.client()
    assert tracking._sql_store(mlflow) is None  # a server: the REST path, not SQL
    monkeypatch.setattr(tracking.MlflowClient, "get_metric_history",
                        lambda *_: pytest.fail("fell back to one call per run"))
    table = tracking.load_runs(mlflow, name)
    assert len(table.curves) == 40 * 2 * bench_analysis.EPOCHS  # test_acc, train_loss


def test_the_route_cap_halves_the_request(monkeypatch, sqlite_uri):
    asked = []

    def fake(mlflow, run_ids, metric):
        asked.append(len(run_ids))
        return [tracking._Point(r, metric, 1, 0.5) for r in run_ids]

    monkeypatch.setattr(tracking, "BULK_RUNS", 4)
    monkeypatch.setattr(tracking, "_bulk_history", fake)
    points = list(tracking._rest_histories(tracking.client(), [f"r{i}" for i in range(10)]))
    assert asked == [4, 4, 4, 4, 4, 4, 2, 2, 2]
    assert len(points) == 30


# --- the writer lease ------------------------------------------------------------------------

TTL = 4.0  # beats every 1/6 s, stale after 4 s


def _lease(study: str) -> tracking.Lease:
    return tracking.Lease(tracking.client(), study, TTL)


def test_a_second_driver_refuses_while_the_first_beats(store):
    study = f"lease-{time.monotonic_ns()}"
    first = _lease(study)
    first.acquire()
    try:
        began = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="is being run by .* this one stops"):
            _lease(study).acquire()
        # It refuses on the first heartbeat it sees, long before the lease could go stale.
        assert time.monotonic() - began < TTL / 2
        first.check()
    finally:
        first.release()
    second = _lease(study)
    second.acquire()  # released: at once
    second.release()


def test_a_killed_drivers_lease_blocks_at_most_its_ttl(store):
    study = f"stale-{time.monotonic_ns()}"
    killed = _lease(study)
    killed.acquire()
    killed._stop.set()  # its heartbeat stops, as when the process is SIGKILLed
    killed._thread.join()
    began = time.monotonic()
    rerun = _lease(study)
    rerun.acquire()
    waited = time.monotonic() - began
    try:
        assert TTL * 0.9 <= waited <= TTL * 3
        with pytest.raises(tracking.TrackingError, match="stopping"):
            killed.check()  # the old holder would stop before its next write
        rerun.check()
    finally:
        rerun.release()
    names = [e.name for e in tracking.client().search_experiments(view_type=3)
             if e.name.startswith(tracking.LEASE_PREFIX + study)]
    assert tracking.LEASE_PREFIX + study not in names  # released: the name is free again


def test_two_contenders_for_a_stale_lease_get_one_holder(store):
    study = f"race-{time.monotonic_ns()}"
    killed = _lease(study)
    killed.acquire()
    killed._stop.set()
    killed._thread.join()
    outcomes: list[str] = []

    def contend():
        lease = _lease(study)
        try:
            lease.acquire()
        except tracking.TrackingError:
            outcomes.append("refused")
            return
        outcomes.append("held")
        time.sleep(TTL)  # hold while the other decides
        lease.release()

    threads = [threading.Thread(target=contend) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused"]


def test_a_holder_silent_for_a_quarter_ttl_stops_writing(sqlite_uri):
    lease = _lease("quiet")
    lease.acquire()
    try:
        lease._last_beat -= TTL / 4 + 0.1
        lease._stop.set()
        lease._thread.join()
        with pytest.raises(tracking.TrackingError, match="no heartbeat reached"):
            lease.check()
    finally:
        lease.release()


def test_lease_ttl_from_the_environment(monkeypatch):
    monkeypatch.setenv("STUDY_LEASE_TTL", "7.5")
    assert tracking.lease_ttl() == 7.5
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv("STUDY_LEASE_TTL", bad)
        with pytest.raises(tracking.TrackingError, match=f"STUDY_LEASE_TTL='{bad}'"):
            tracking.lease_ttl()
