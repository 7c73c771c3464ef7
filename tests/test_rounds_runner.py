"""An adaptive protocol end to end on tiny data: `runner.run` loops rounds, tags each run with
its round, and a rerun (or the batched engine) plans the same rounds from the store.

    .venv/bin/python -m pytest tests/test_rounds_runner.py -q
"""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient

from study import cli, runner
from study.analysis import rounds
from study.results import Comparison
from study.results.diagnostics import from_json
from study.protocol import schema
from tests.test_runner import loader, store  # noqa: F401 (fixtures: a temporary store, tiny data)

PROTO = dict(name="adaptive-e2e", dropout=[[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]],
             seeds={"count": 3}, baseline=[0.5, 0.5], training={"epochs": 1, "batch_size": 100},
             analysis={"equivalence_margin": 0.02},
             adaptive={"round": 2, "max_seeds": 7, "max_runs": 40})


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


ADAPTIVE_FIELDS = ("cs95", "p_anytime", "stopped_at", "stop_reason", "seeds_fixed_equivalent")


def test_plan_and_analyze_read_the_rounds_from_the_store(store, loader, tmp_path, monkeypatch,
                                                         capsys):
    proto = schema.parse(PROTO)
    runner.run(proto, load=loader, progress=False)
    path = tmp_path / "adaptive.yaml"
    path.write_text(yaml.safe_dump(PROTO))
    capsys.readouterr()
    assert cli.main(["plan", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "round 0:" in shown and "(done)" in shown and "adaptive study done" in shown
    monkeypatch.setattr(cli, "REPORTS", tmp_path / "reports")
    assert cli.main(["analyze", str(path)]) == 0
    data = json.loads((tmp_path / "reports" / proto.name / "results.json").read_text())
    plan = runner.schedule(store, store.get_experiment_by_name(proto.name).experiment_id, proto)
    decided = {(k.setting, k.reference): d for k, d in plan.decisions}
    assert data["adaptive"]["study_stop"] == plan.stop and data["adaptive"]["round"] == 2
    assert len(data["comparisons"]) == 2
    for c in data["comparisons"]:
        assert all(c[f] is not None for f in ADAPTIVE_FIELDS if f != "seeds_fixed_equivalent")
        d = decided[((c["dropout1"], c["dropout2"]), tuple(c["baseline"]))]
        assert (c["verdict"], c["stopped_at"], c["stop_reason"]) == (d.verdict, d.stopped_at,
                                                                       d.stop_reason)
        assert c["cs95"] == list(d.cs95) and c["p_anytime"] == d.p_anytime
        back = from_json(Comparison, c)
        assert back.adaptive and back.cs95 == d.cs95


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
