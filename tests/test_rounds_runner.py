"""An adaptive protocol end to end on tiny data: `runner.run` loops rounds, tags each run with
its round, and a rerun (or the batched engine) plans the same rounds from the store.

    .venv/bin/python -m pytest tests/test_rounds_runner.py -q
"""

from __future__ import annotations

import functools

import pytest
from mlflow import MlflowClient

from study import runner
from study.analysis import rounds
from study.engine import data
from study.protocol import schema
from study.store import tracking

PROTO = dict(name="adaptive-e2e", dropout=[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]],
             seeds={"count": 3}, baseline=[0.5, 0.5], training={"epochs": 1, "batch_size": 100},
             analysis={"equivalence_margin": 0.02},
             adaptive={"round": 2, "max_seeds": 7, "max_runs": 40})


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path)
    return tracking.client()


@pytest.fixture
def loader(tiny_files, tmp_path):
    folder, checksums = tiny_files
    return functools.partial(data.load, folder, cache=tmp_path / "cache", checksums=checksums)


def _rounds_logged(store: MlflowClient, name: str) -> dict[tuple, str]:
    exp = store.get_experiment_by_name(name)
    return {(r.data.params["dropout1"], r.data.params["dropout2"], r.data.params["seed"]):
            r.data.tags[rounds.ROUND_TAG]
            for r in store.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")}


def test_rounds_run_tagged_and_a_rerun_adds_none(store, loader, capsys):
    proto = schema.parse(PROTO)
    first = runner.run(proto, load=loader, progress=False)
    out = capsys.readouterr().out
    assert "round 0:" in out and "adaptive study done" in out
    logged = _rounds_logged(store, proto.name)
    assert len(logged) == first.ran == first.planned <= 40
    plan = runner.schedule(store, first.experiment_id, proto)
    assert plan.stop is not None and not plan.todo
    assert {k: str(v) for k, v in plan.round_of().items()} == {
        c.key: logged[(str(c.dropout1), str(c.dropout2), str(c.seed))] for c in plan.cells}
    # Seeds beyond round 0 went only to the open comparisons' settings and the baseline.
    later = {(d1, d2) for (d1, d2, _), r in logged.items() if r != "0"}
    assert len(plan.rounds) >= 2 and ("0.5", "0.5") in later
    assert out.count("runs to add") == len(plan.rounds)
    second = runner.run(proto, load=loader, progress=False)
    assert second.ran == 0 and second.already_done == first.planned


@pytest.mark.slow  # two adaptive studies, a worker per round: ~2 minutes on 2 cores
def test_the_batched_engine_plans_the_same_rounds(store, loader):
    sequential = schema.parse(PROTO)
    batched = schema.parse({**PROTO, "name": "adaptive-e2e-batched", "execution": "batched",
                            "randomness": "portable"})
    seq_portable = schema.parse({**PROTO, "name": "adaptive-e2e-seq", "randomness": "portable"})
    runner.run(seq_portable, load=loader, progress=False)
    runner.run(batched, load=loader, progress=False)
    assert _rounds_logged(store, seq_portable.name) == _rounds_logged(store, batched.name)
    assert sequential.adaptive == batched.adaptive
