"""The command line over a temporary store, including a user's own experiment."""

import json
from pathlib import Path

import pytest

from study import cli, tracking

SMOKE = str(Path(__file__).resolve().parents[1] / "protocols" / "smoke.yaml")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path)
    monkeypatch.setattr(cli, "REPORTS", tmp_path / "reports")
    return tracking.client()


def _log_own_runs(store, name: str) -> None:
    """Runs logged by hand with only the schema's required keys, as a user would."""
    exp = store.create_experiment(name)
    accs = {(0.0, 0.0): [0.880, 0.884, 0.879, 0.886, 0.882],
            (0.2, 0.5): [0.871, 0.874, 0.869, 0.877, 0.872]}
    for (d1, d2), values in accs.items():
        for seed, acc in enumerate(values):
            run = store.create_run(exp, run_name=f"mine {d1} {d2} {seed}")
            rid = run.info.run_id
            for key, value in (("dropout1", d1), ("dropout2", d2), ("seed", seed)):
                store.log_param(rid, key, value)
            for epoch in (1, 2):
                store.log_metric(rid, "test_acc", acc - 0.01 * (2 - epoch), step=epoch)
                store.log_metric(rid, "train_acc", acc + 0.01, step=epoch)
                store.log_metric(rid, "train_loss", 0.35, step=epoch)
            store.set_terminated(rid, "FINISHED")


def test_analyze_any_experiment_that_follows_the_schema(store, tmp_path):
    _log_own_runs(store, "mine")
    assert cli.main(["analyze", "--experiment", "mine", "--baseline", "0.2,0.5"]) == 0
    results = json.loads((tmp_path / "reports" / "mine" / "results.json").read_text())
    assert {(g["dropout1"], g["dropout2"]): g["n"] for g in results["groups"]} == {
        (0.0, 0.0): 5, (0.2, 0.5): 5}
    (comparison,) = results["comparisons"]
    assert comparison["mean_diff"] == pytest.approx(0.0096, abs=1e-9)  # 0.8822 - 0.8726
    assert comparison["paired"] is True
    # The analysis run holds the results, so they open from the MLflow UI.
    exp = store.get_experiment_by_name("mine")
    (analysis,) = store.search_runs([exp.experiment_id], "tags.`study.kind` = 'analysis'")
    assert "results.json" in {a.path for a in store.list_artifacts(analysis.info.run_id)}


def test_missing_schema_key_names_run_and_key(store, capsys):
    exp = store.create_experiment("broken")
    run = store.create_run(exp, run_name="no seed")
    store.log_param(run.info.run_id, "dropout1", 0.1)
    store.log_param(run.info.run_id, "dropout2", 0.1)
    store.set_terminated(run.info.run_id, "FINISHED")
    assert cli.main(["analyze", "--experiment", "broken"]) == 2
    err = capsys.readouterr().err
    assert "'broken'" in err and run.info.run_id in err and "'seed'" in err


def test_bad_protocol_exits_2_with_the_key(tmp_path, capsys, store):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\ndropout: [[0.5, 2.0]]\nseeds: {count: 2}\nbaseline: [0.5, 2.0]\n")
    assert cli.main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "dropout.0.1" in err and "2.0" in err


def test_plan_lists_every_cell(store, capsys):
    assert cli.main(["plan", SMOKE, "--set", "seeds.count=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("todo") for line in out) == 3 * 2
    assert out[-1] == "6 cells: 0 done, 6 to run"
