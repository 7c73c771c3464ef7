"""Anyone's experiment (issue 21): runs logged under the user's own names, from a real MLflow
SQLite store or from a table, analysed through the one path, and never on a missing column."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from study import analyze_frame, cli
from study.analysis import frame as frames
from study.analysis.comparisons import AnalysisError
from study.store import tracking
from tests.test_cli import store  # noqa: F401  (a fresh SQLite store, reports/ in tmp_path)

RATES = (0.0, 0.3, 0.5)
# Per-seed noise shared by the settings (paired), plus a setting effect.
EFFECT = {0.0: -0.02, 0.3: 0.0, 0.5: 0.0}


def _accuracy(rate: float, seed: int, epoch: int) -> float:
    rng = np.random.default_rng(seed)
    return round(0.85 + EFFECT[rate] + rng.normal(0, 0.004) + 0.002 * epoch
                 + np.random.default_rng([seed, int(rate * 10)]).normal(0, 0.001), 4)


def _log(store, name: str, own_names: bool, metric_in=lambda rate, seed: True,
         epochs: int = 5) -> None:
    """15 runs, logged the ordinary way: params dropout (or dropout1 = dropout2), seed, lr;
    a per-epoch metric val_accuracy and val_loss (or test_acc and train_loss)."""
    exp = store.create_experiment(name)
    for rate in RATES:
        for seed in range(5):
            rid = store.create_run(exp, run_name=f"p{rate} s{seed}").info.run_id
            params = {"dropout": rate} if own_names else {"dropout1": rate, "dropout2": rate}
            for key, value in {**params, "seed": seed, "lr": 0.1}.items():
                store.log_param(rid, key, value)
            acc, loss = ("val_accuracy", "val_loss") if own_names else ("test_acc", "train_loss")
            for epoch in range(1, epochs + 1):
                if metric_in(rate, seed):
                    store.log_metric(rid, acc, _accuracy(rate, seed, epoch), step=epoch)
                store.log_metric(rid, loss, 1 - _accuracy(rate, seed, epoch), step=epoch)
            store.set_terminated(rid, "FINISHED")


def _error(capsys) -> str:
    # MLflow's own progress bars may precede it; the harness says one line.
    lines = [l for l in capsys.readouterr().err.strip().splitlines()
             if not l.startswith("Downloading artifacts")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_own_names_give_the_three_rates_and_the_default_names_verdicts(store, tmp_path):
    _log(store, "byo", own_names=True)
    _log(store, "d2l-names", own_names=False)
    assert cli.main(["analyze", "--experiment", "byo", "--factor", "dropout", "--metric",
                     "val_accuracy", "--baseline", "0.5"]) == 0
    assert cli.main(["analyze", "--experiment", "d2l-names", "--baseline", "0.5,0.5"]) == 0
    own = json.loads((tmp_path / "reports" / "byo" / "results.json").read_text())
    d2l = json.loads((tmp_path / "reports" / "d2l-names" / "results.json").read_text())
    assert [g["setting"] for g in own["groups"]] == [[0.0], [0.3], [0.5]]
    assert own["strata"][0]["settings"] == [[0.0], [0.3], [0.5]]
    assert own["baseline"] == [0.5] and own["factors"] == ["dropout"]
    assert own["metric"] == "val_accuracy" and own["endpoints_left_out"] == []
    assert all(g["n"] == 5 and g["n_diverged"] == 0 for g in own["groups"])
    verdicts = lambda r: [(c["setting"][0], c["verdict"], c["robust"], c["mean_diff"])
                          for c in r["comparisons"]]
    assert verdicts(own) == verdicts(d2l)
    assert verdicts(own)[0][1] == "different" and verdicts(own)[0][3] < 0
    summary = (tmp_path / "reports" / "byo" / "summary.md").read_text()
    assert "dropout=0: val_accuracy" in summary and "worse than the baseline" in summary
    # Not recorded is said, never filled: no training-set size, no train_acc, no d2l check.
    assert ("Not recorded with these runs, so not described: the model and training set-up, "
            "the training-set size, train_acc, the d2l textbook check.") in summary
    assert all(r["train_images"] is None or math.isnan(r["train_images"])
               for r in pd.read_csv(tmp_path / "reports" / "byo" / "runs.csv").to_dict("records"))


def test_a_param_that_varies_becomes_a_named_stratum(store, tmp_path):
    _log(store, "lrs", own_names=True)
    table = tracking.load_runs(store, "lrs", columns=frames.columns_of("dropout", "seed",
                                                                       "val_accuracy"))
    assert table.columns.strata == ()  # lr is constant: it splits nothing
    raw = frames.export(table).assign(lr=lambda f: np.where(f["seed"] < 3, 0.1, 0.01))
    r = analyze_frame(raw, factor="dropout", metric="val_accuracy", baseline=0.5)
    assert "lr" in r.stratified_by and len(r.strata) == 2
    assert {s.stratum["lr"] for s in r.strata} == {0.1, 0.01}


@pytest.mark.parametrize("argv, fragments", [
    (["--factor", "rate", "--metric", "val_accuracy", "--baseline", "0.5"],
     ["param 'rate' is in 0 of 15 runs of experiment 'byo'", "logs params dropout, lr, seed"]),
    (["--factor", "dropout", "--seed", "rng", "--metric", "val_accuracy", "--baseline", "0.5"],
     ["param 'rng' is in 0 of 15 runs", "logs params dropout, lr, seed"]),
    (["--factor", "dropout", "--baseline", "0.5"],
     ["metric 'test_acc' is in 0 of 15 runs", "logs metrics val_accuracy, val_loss"]),
    (["--factor", "dropout", "--metric", "val_accuracy", "--baseline", "0.2"],
     ["baseline dropout=0.2: no run has it; dropout is 0, 0.3, 0.5 in these runs"]),
    (["--factor", "dropout", "--metric", "val_accuracy", "--baseline", "0.5,0.5"],
     ["--baseline '0.5,0.5': expected one value per factor (dropout)"]),
], ids=["factor", "seed", "metric", "baseline-value", "baseline-count"])
def test_every_wrong_name_is_one_line_and_exit_2(store, capsys, argv, fragments):
    _log(store, "byo", own_names=True)
    assert cli.main(["analyze", "--experiment", "byo", *argv]) == 2
    line = _error(capsys)
    assert all(f in line for f in fragments), line


def test_a_metric_in_only_some_runs_is_refused_not_counted_as_diverged(store, capsys):
    _log(store, "part", own_names=True, metric_in=lambda rate, seed: seed != 4)
    assert cli.main(["analyze", "--experiment", "part", "--factor", "dropout", "--metric",
                     "val_accuracy", "--baseline", "0.5"]) == 2
    line = _error(capsys)
    assert "metric 'val_accuracy' is in 12 of 15 runs of experiment 'part'" in line
    assert "(not in run " in line and "s4)" in line


def test_a_non_finite_metric_is_a_divergence_only_when_logged(store, tmp_path):
    _log(store, "nan", own_names=True)
    exp = store.get_experiment_by_name("nan").experiment_id
    (blown,) = [r for r in store.search_runs([exp]) if r.info.run_name == "p0.3 s2"]
    store.log_metric(blown.info.run_id, "val_accuracy", float("nan"), step=6)
    assert cli.main(["analyze", "--experiment", "nan", "--factor", "dropout", "--metric",
                     "val_accuracy", "--baseline", "0.5"]) == 0
    r = json.loads((tmp_path / "reports" / "nan" / "results.json").read_text())
    assert {g["setting"][0]: g["n_diverged"] for g in r["groups"]} == {0.0: 0, 0.3: 1, 0.5: 0}


def test_a_table_and_the_store_give_the_same_results(store, tmp_path):
    """d2l-style runs (test_acc, train_acc, train_loss, the harness's tags) exported to a CSV:
    analyze_frame and --csv give the MLflow path's results.json."""
    _log(store, "d2l", own_names=False)
    exp = store.get_experiment_by_name("d2l").experiment_id
    for run in store.search_runs([exp]):
        store.set_tag(run.info.run_id, "study.status", "ok")
        for epoch in range(1, 6):
            store.log_metric(run.info.run_id, "train_acc", 0.9, step=epoch)
    assert cli.main(["analyze", "--experiment", "d2l", "--baseline", "0.5,0.5"]) == 0
    stored = json.loads((tmp_path / "reports" / "d2l" / "results.json").read_text())
    table = tracking.load_runs(store, "d2l")
    exported = frames.export(table)
    csv = tmp_path / "d2l.csv"
    exported.to_csv(csv, index=False)
    assert cli.main(["analyze", "--csv", str(csv), "--baseline", "0.5,0.5"]) == 0
    from_csv = json.loads((tmp_path / "reports" / "d2l" / "results.json").read_text())
    direct = analyze_frame(pd.read_csv(csv), baseline=(0.5, 0.5), name="d2l").to_json()
    assert stored["n_runs"] == 15 and stored["comparisons"]
    assert from_csv == stored
    assert json.loads(json.dumps(direct)) == stored


def test_lower_is_better_reads_a_lower_loss_as_better(tmp_path):
    rows = [{"optimizer": opt, "seed": seed, "step": step,
             "val_loss": 0.5 - 0.01 * step - (0.05 if opt == "adam" else 0.0)
             + 0.003 * ((seed * 7) % 5)}
            for opt in ("sgd", "adam") for seed in range(6) for step in range(1, 4)]
    r = analyze_frame(pd.DataFrame(rows), factor="optimizer", metric="val_loss",
                      baseline="sgd", lower_is_better=True, margin=0.01, out_dir=tmp_path)
    (c,) = r.comparisons
    assert c.setting == ["adam"] and c.verdict == "different"
    assert c.mean_diff == pytest.approx(-0.05)
    summary = (tmp_path / "summary.md").read_text()
    assert ("optimizer=adam: val_loss 0.05 lower than the baseline (difference -0.05, 95% CI "
            in summary)
    assert "lower is better): better than the baseline." in summary
    higher = analyze_frame(pd.DataFrame(rows), factor="optimizer", metric="val_loss",
                           baseline="sgd", margin=0.01, out_dir=tmp_path / "h")
    assert "worse than the baseline" in (tmp_path / "h" / "summary.md").read_text()
    assert higher.comparisons[0].verdict == "different"


def test_last_k_is_read_from_the_chosen_metrics_steps():
    rows = [{"dropout": p, "seed": s, "step": t,
             "val_accuracy": 0.8 + 0.01 * t + (0.02 if p and t < 5 else 0) + 0.001 * s,
             "val_loss": 1.0}
            for p in (0.0, 0.5) for s in range(5) for t in range(1, 6)]
    final = analyze_frame(pd.DataFrame(rows), factor="dropout", metric="val_accuracy",
                          baseline=0.0)
    last3 = analyze_frame(pd.DataFrame(rows), factor="dropout", metric="val_accuracy",
                          baseline=0.0, endpoint="last:3")
    assert final.comparisons[0].mean_diff == pytest.approx(0.0, abs=1e-12)
    assert last3.comparisons[0].mean_diff == pytest.approx(0.04 / 3)


def test_missing_names_in_a_table_are_one_error():
    frame = pd.DataFrame({"dropout": [0.0, 0.5], "seed": [0, 0], "acc": [0.8, 0.9]})
    with pytest.raises(frames.ColumnError, match=r"metric 'val_accuracy' is in 0 of 2 runs of "
                                                 r"table table .*it has columns dropout, seed, acc"):
        analyze_frame(frame, factor="dropout", metric="val_accuracy", baseline=0.5)
    with pytest.raises(AnalysisError, match="baseline dropout=0.3: no run has it"):
        analyze_frame(frame, factor="dropout", metric="acc", baseline=0.3)
