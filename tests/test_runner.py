"""End to end: protocol -> runner -> worker processes -> a temporary MLflow store -> read back."""

import functools
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study.engine import backend_process, data, environment
from study.protocol import plan, schema as protocol
from study import runner
from study.store import tracking
from tests import worker_hooks

PROTO = dict(name="e2e", dropout=[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]], seeds={"count": 2},
             baseline=[0.5, 0.5], training={"epochs": 2, "batch_size": 100})


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path)
    return tracking.client()


@pytest.fixture
def loader(tiny_files, tmp_path):
    folder, checksums = tiny_files
    # A partial, not a lambda: the loader runs in the worker process and must pickle.
    return functools.partial(data.load, folder, cache=tmp_path / "cache", checksums=checksums)


def _children() -> set[int]:
    pid = os.getpid()
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _runs(store: MlflowClient, status: str | None = None):
    exp = store.get_experiment_by_name("e2e")
    query = f"attributes.status = '{status}'" if status else ""
    return store.search_runs([exp.experiment_id], query)


def test_a_run_logs_every_cell_and_a_second_adds_none(store, loader):
    proto = protocol.parse(PROTO)
    first = runner.run(proto, load=loader, progress=False)
    assert first.ran == 6 and first.already_done == 0
    runs = _runs(store, "FINISHED")
    assert len(runs) == 6
    exp = store.get_experiment(first.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    one = next(r for r in runs if r.info.run_name == "p0.5-0.5 seed1 cpu default torch")
    assert one.data.params["dropout1"] == "0.5" and one.data.params["seed"] == "1"
    assert one.data.params["protocol.training.epochs"] == "2"
    assert one.data.tags["study.status"] == "ok"
    assert one.data.tags["study.cell"] == plan.expand(proto)[4].key
    assert len(one.data.tags["study.weights_sha256"]) == 64
    assert one.data.tags["study.env.torch_version"].startswith("2.")
    assert one.data.tags["study.flag.deterministic_algorithms"] == "False"
    history = store.get_metric_history(one.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2]
    assert "protocol.yaml" in {a.path for a in store.list_artifacts(one.info.run_id)}

    dead = next(r for r in runs if r.info.run_name.startswith("p1-1"))
    assert dead.data.tags["study.status"] == "degenerate"
    assert dead.data.tags["study.textbook_check"] == "False"

    second = runner.run(proto, load=loader, progress=False)
    assert second.ran == 0 and second.already_done == 6
    assert len(_runs(store)) == 6


def test_each_group_trains_in_a_worker_started_in_its_mode(store, loader, monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    proto = protocol.parse({**PROTO, "dropout": [[0.5, 0.5]], "seeds": {"count": 1},
                            "determinism": ["default", "strict"], "threads": 1})
    runner.run(proto, load=loader, progress=False)
    tags = {r.data.params["determinism"]: r.data.tags for r in _runs(store, "FINISHED")}
    # Read inside each worker: the driver's own environment has no MKL_CBWR.
    assert tags["strict"]["study.env.mkl_cbwr"] == "AUTO" == tags["strict"]["study.flag.mkl_cbwr"]
    assert tags["default"]["study.env.mkl_cbwr"] == "unset"
    assert tags["default"]["study.flag.mkl_cbwr"] == "None"
    if tags["default"]["study.env.mkl_cbwr_effective"] != "unknown":  # MKL says what it runs
        assert tags["strict"]["study.env.mkl_cbwr_effective"] == "AUTO"
        assert tags["default"]["study.env.mkl_cbwr_effective"] == "BRANCH_OFF"
    for t in tags.values():
        assert t["study.env.threads.intra_op"] == t["study.env.threads.omp_num_threads"] == "1"
        assert t["study.env.cpu_isa"] and "BLAS=" in t["study.env.blas"]
        assert t["study.env.cpu_model"] == environment.cpu_model()  # same machine, same reading


def test_runs_left_running_are_marked_and_redone(store, loader):
    proto = protocol.parse(PROTO)
    runner.run(proto, load=loader, progress=False)
    victim = _runs(store, "FINISHED")[0]
    store.set_terminated(victim.info.run_id, "RUNNING")  # as if killed mid-run
    again = runner.run(proto, load=loader, progress=False)
    assert again.interrupted == 1 and again.ran == 1
    assert store.get_run(victim.info.run_id).info.status == "KILLED"
    finished = _runs(store, "FINISHED")
    assert len(finished) == 6
    assert len({r.data.tags["study.cell"] for r in finished}) == 6  # never two per cell


def test_failure_mid_study_keeps_what_finished(store, tiny_files, tmp_path):
    folder, checksums = tiny_files
    proto = protocol.parse(PROTO)
    flaky = functools.partial(worker_hooks.failing_on, 3, "raise", folder, tmp_path / "c", checksums)
    before = _children()  # a session's servers (PostgreSQL, MLflow) may be children already
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(proto, load=flaky, progress=False)
    assert len(_runs(store, "FINISHED")) == 2
    failed = _runs(store, "FAILED")
    assert len(failed) == 1 and "boom" in failed[0].data.tags["study.error"]
    assert not _children() - before


def test_a_killed_worker_loses_only_its_cell_in_flight(store, tiny_files, tmp_path, loader):
    folder, checksums = tiny_files
    proto = protocol.parse(PROTO)
    killer = functools.partial(worker_hooks.failing_on, 3, "kill", folder, tmp_path / "c", checksums)
    with pytest.raises(runner.RunnerError, match=r"died \(signal SIGKILL\)") as caught:
        runner.run(proto, load=killer, progress=False)
    assert "\n" not in str(caught.value)
    assert len(_runs(store, "FINISHED")) == 2
    failed = _runs(store, "FAILED")
    assert len(failed) == 1 and "SIGKILL" in failed[0].data.tags["study.error"]
    summary = runner.run(proto, load=loader, progress=False)
    assert (summary.already_done, summary.ran) == (2, 4)


def test_load_runs_gives_the_tidy_table(store, loader):
    runner.run(protocol.parse(PROTO), load=loader, progress=False)
    table = tracking.load_runs(store, "e2e")
    assert len(table.runs) == 6
    assert sorted(set(zip(table.runs.dropout1, table.runs.dropout2))) == [(0.0, 0.0), (0.5, 0.5),
                                                                          (1.0, 1.0)]
    assert set(table.runs.seed) == {0, 1}
    # 6 runs x 2 epochs x the metrics the analysis reads (table.CURVE_METRICS: test_acc,
    # train_loss); train_acc is logged but not loaded.
    assert len(table.curves) == 6 * 2 * 2
    assert set(table.curves["metric"]) == {"test_acc", "train_loss"}
    assert table.protocol["name"] == "e2e"
    assert "torch_version" in table.environment
    assert "mc_passes" not in table.runs  # runs without passes: the table of before


def test_cuda_cells_skip_or_fail_without_a_gpu(store, loader, monkeypatch):
    monkeypatch.setattr(backend_process, "has_device", lambda device: device == "cpu")
    proto = protocol.parse({**PROTO, "devices": ["cpu", "cuda"], "seeds": {"count": 1}})
    summary = runner.run(proto, load=loader, progress=False)
    assert summary.ran == 3 and summary.skipped == 3
    required = protocol.parse({**PROTO, "devices": ["cpu", "cuda"], "required_devices": ["cuda"]})
    with pytest.raises(runner.RunnerError, match="requires"):
        runner.run(required, load=loader, progress=False)


def test_diverged_runs_load_as_nan_and_are_excluded_with_a_count(store, loader):
    from study.analysis import comparisons as analysis
    from study.protocol.schema import Analysis

    wild = {**PROTO, "dropout": [[0.0, 0.0], [0.5, 0.5]], "training": {"epochs": 2, "lr": 1e12}}
    runner.run(protocol.parse(wild), load=loader, progress=False)
    table = tracking.load_runs(store, "e2e")
    assert set(table.runs.status) == {"diverged"}
    assert table.runs.test_acc.isna().all()
    results = analysis.analyze(table, (0.5, 0.5), Analysis(bootstrap=200))
    assert all(g.n == 0 and g.n_excluded == g.n_diverged == 2 for g in results.groups)


def test_batched_protocol_runs_through_the_runner(store, loader):
    proto = protocol.parse({**PROTO, "execution": "batched", "batch_members": 4})
    summary = runner.run(proto, load=loader, progress=False)
    assert summary.ran == 6
    runs = _runs(store, "FINISHED")
    assert {r.data.params["execution"] for r in runs} == {"batched"}
    # Each run starts when its member began (members queue for the cores), not with the chunk.
    for r in runs:
        result = next(x for x in summary.results if x.cell.key == r.data.tags["study.cell"])
        assert r.info.start_time == int(result.started * 1000)
    assert len({r.info.start_time for r in runs}) > 1
    assert runner.run(proto, load=loader, progress=False).ran == 0


def test_the_bar_counts_member_epochs_to_its_total(store, loader, capsys):
    proto = protocol.parse({**PROTO, "execution": "batched", "batch_members": 4})
    runner.run(proto, load=loader, progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "12/12" in last and "6/6 runs" in last  # 6 runs x 2 epochs, none counted twice


def test_with_several_sizes_the_bar_counts_images_so_its_eta_follows_the_cost(
        store, loader, capsys):
    proto = protocol.parse({**PROTO, "execution": "batched", "batch_members": 4,
                            "data": {"train_subset": [100, 300]}})
    runner.run(proto, load=loader, progress=True)
    last = capsys.readouterr().err.split("\r")[-1]
    # 6 runs x 2 epochs at each size: 6 x 2 x (100 + 300) = 4,800 image-epochs.
    assert "4.80k/4.80k" in last and "image-epoch" in last and "12/12 runs" in last


def test_an_interrupted_batched_chunk_keeps_what_finished_and_stops_its_members(
        store, loader, monkeypatch):
    proto = protocol.parse({**PROTO, "execution": "batched", "batch_members": 6})
    real_finish, calls = tracking.finish, {"n": 0}

    def ctrl_c_on_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_finish(*args)

    monkeypatch.setattr(tracking, "finish", ctrl_c_on_second)
    before = _children()  # a session's servers (PostgreSQL, MLflow) may be children already
    with pytest.raises(KeyboardInterrupt):
        runner.run(proto, load=loader, progress=False)
    assert not _children() - before  # the worker and its member threads are gone
    assert len(_runs(store, "FINISHED")) == 1
    # The run being logged stays RUNNING until the next start; members in flight left no run.
    assert len(_runs(store, "RUNNING")) == 1 and len(_runs(store)) == 2
    monkeypatch.setattr(tracking, "finish", real_finish)
    summary = runner.run(proto, load=loader, progress=False)
    assert (summary.interrupted, summary.already_done, summary.ran) == (1, 1, 5)


def test_passes_are_logged_and_read_back(store, loader):
    from study.analysis import comparisons as analysis
    from study.protocol.schema import Analysis

    proto = protocol.parse({**PROTO, "execution": "batched", "randomness": "portable",
                            "seeds": {"count": 3}, "inference": {"mc_passes": 4}})
    summary = runner.run(proto, load=loader, progress=False)
    table = tracking.load_runs(store, "e2e")
    assert set(table.runs["mc_passes"]) == {4}
    for result in summary.results:
        row = table.runs[table.runs["run_id"].isin(
            [r.info.run_id for r in _runs(store) if r.data.tags["study.cell"] == result.cell.key])]
        mc = result.inference
        assert row["mc_flip_rate"].item() == pytest.approx(mc.flip_rate)
        assert row["mc_test_nll"].item() == pytest.approx(mc.mc.nll)
        assert row["test_ece"].item() == pytest.approx(mc.eval.ece)
        flipped = row["mc_flip_example"].item()
        assert (None if flipped != flipped else int(flipped)) == mc.flip_example
    results = analysis.analyze(table, (0.5, 0.5), Analysis(bootstrap=200))
    assert {(s.dropout1, s.dropout2) for s in results.inference.settings} == \
        {(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)}
    assert len(table.runs) == 9


def test_analysis_reads_only_the_cells_the_protocol_plans(store, loader):
    proto = protocol.parse(PROTO)
    runner.run(proto, load=loader, progress=False)
    keys = sorted(c.key for c in plan.expand(proto))
    table = tracking.load_runs(store, "e2e", set(keys[:4]))  # as after an edit of the protocol
    assert sorted(table.runs.run_name) == sorted(
        c.name for c in plan.expand(proto) if c.key in keys[:4])
    assert table.unplanned_runs == 2
    assert len(tracking.load_runs(store, "e2e").runs) == 6 and len(_runs(store)) == 6
    with pytest.raises(tracking.TrackingError, match=r"\(6 are of cells the protocol does not plan\)"):
        tracking.load_runs(store, "e2e", set())
