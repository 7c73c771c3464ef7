"""An own experiment made in rounds (issue 19 item 4): `analyze --experiment/--csv --adaptive`
takes each setting's seeds in ascending order as the looks and decides each comparison as an
adaptive protocol's analysis does, through the real SQLite store.

    .venv/bin/python -m pytest tests/test_own_adaptive.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from study import analyze_frame, cli
from study.analysis import rounds
from study.protocol import schema
from study.store import tracking
from tests.test_cli import store  # noqa: F401  (a fresh SQLite store, reports/ in tmp_path)

PROTO = dict(name="rounds-proto", dropout=[[0.0, 0.0], [0.5, 0.5], [0.8, 0.8], [1.0, 1.0]],
             seeds={"count": 3}, baseline=[0.5, 0.5], training={"epochs": 2, "batch_size": 100},
             analysis={"equivalence_margin": 0.02},
             adaptive={"round": 2, "max_seeds": 9, "max_runs": 400})
ADAPTIVE = "start=3,round=2,max=9"  # the protocol's block, as the option spells it
OWN = ["--factor", "p_in,p_out", "--seed", "trial", "--metric", "val_accuracy",
       "--baseline", "0.5,0.5", "--margin", "0.02", "--adaptive", ADAPTIVE]
# True gaps to the baseline: settles "different" at 5 seeds, "equivalent" at 7, cap at 9.
GAPS = {(0.0, 0.0): -0.08, (0.5, 0.5): 0.0, (0.8, 0.8): 0.0, (1.0, 1.0): -0.02}
FIELDS = ("verdict", "stopped_at", "stop_reason", "cs95", "p_anytime", "seeds_fixed_equivalent")


def accuracy(setting: tuple[float, float], seed: int) -> float:
    """A seeded run's final accuracy: the gap, a per-seed effect all settings share, noise."""
    shared = np.random.default_rng([seed, 1]).normal(0, 0.004)
    own = np.random.default_rng([seed, int(setting[0] * 10), 7]).normal(0, 0.004)
    return 0.85 + GAPS[setting] + shared + own


def protocol_study() -> tuple[schema.Protocol, rounds.Schedule]:
    """The adaptive protocol driven to its end as `study run` drives it (values, no training)."""
    proto = schema.parse(PROTO)
    values: dict[str, float] = {}
    while (plan := rounds.schedule(proto, values)).stop is None:
        values.update({c.key: accuracy((c.dropout1, c.dropout2), c.seed) for c in plan.todo})
    return proto, plan


def log_protocol_runs(store, proto, plan) -> None:
    """The protocol's runs as `study run` logs them (tracking.start), finished by hand."""
    exp = tracking.experiment_id(store, proto.name)
    for cell in plan.cells:
        rid = tracking.start(store, exp, cell, proto, {},
                             extra_tags={rounds.ROUND_TAG: str(plan.round_of()[cell.key])})
        value = accuracy((cell.dropout1, cell.dropout2), cell.seed)
        for epoch, metric in ((1, value - 0.01), (2, value)):
            store.log_metric(rid, "test_acc", metric, step=epoch)
        store.set_tag(rid, "study.status", "ok")
        store.set_terminated(rid, "FINISHED")


def log_own_runs(store, name: str, seeds: dict[tuple[float, float], list[int]]) -> None:
    """The same outcomes logged the ordinary way under the user's names."""
    exp = store.create_experiment(name)
    for setting, trials in seeds.items():
        for trial in trials:
            rid = store.create_run(exp, run_name=f"{setting} t{trial}").info.run_id
            for key, value in (("p_in", setting[0]), ("p_out", setting[1]), ("trial", trial)):
                store.log_param(rid, key, value)
            value = accuracy(setting, trial)
            for epoch, metric in ((1, value - 0.01), (2, value)):
                store.log_metric(rid, "val_accuracy", metric, step=epoch)
            store.set_terminated(rid, "FINISHED")


def seeds_of(plan: rounds.Schedule) -> dict[tuple[float, float], list[int]]:
    out: dict[tuple[float, float], list[int]] = {}
    for c in plan.cells:
        out.setdefault((c.dropout1, c.dropout2), []).append(c.seed)
    return out


def decided(results: dict) -> dict[tuple, tuple]:
    return {tuple(c["setting"]): tuple(c[f] for f in FIELDS) for c in results["comparisons"]}


def read(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / "reports" / name / "results.json").read_text())


def test_own_runs_in_rounds_are_decided_as_the_adaptive_protocol(store, tmp_path, capsys):
    proto, plan = protocol_study()
    log_protocol_runs(store, proto, plan)
    path = tmp_path / "proto.yaml"
    path.write_text(yaml.safe_dump(PROTO))
    assert cli.main(["analyze", str(path)]) == 0
    by_protocol = decided(read(tmp_path, proto.name))
    # The data hit every stop: settled early, settled later, the cap.
    assert sorted(v[1:3] for v in by_protocol.values()) == [
        (5, "settled"), (7, "settled"), (9, "max_seeds")]
    assert all(v[3] is not None and v[4] is not None for v in by_protocol.values())

    log_own_runs(store, "own-rounds", seeds_of(plan))
    assert cli.main(["analyze", "--experiment", "own-rounds", *OWN]) == 0
    own = read(tmp_path, "own-rounds")
    assert decided(own) == by_protocol
    design = own["adaptive"]
    assert (design["start"], design["round"], design["max_seeds"], design["stop"]) == (
        3, 2, 9, "settled")
    assert design["max_runs"] is None and design["study_stop"] == "settled"
    assert design["runs"] == len(plan.cells) and design["rounds"] == len(plan.rounds)
    summary = (tmp_path / "reports" / "own-rounds" / "summary.md").read_text()
    assert "anytime-valid t-mixture, settled at 5 seeds" in summary
    assert "cap reached at 9 seeds" in summary and "95% CS at the stop" in summary

    # Every setting run to 12 seeds: seeds past max are left out and said to be; the seeds
    # past a comparison's stop are never read, so nothing changes.
    log_own_runs(store, "own-all", {s: list(range(12)) for s in GAPS})
    capsys.readouterr()
    assert cli.main(["analyze", "--experiment", "own-all", *OWN]) == 0
    err = capsys.readouterr().err
    assert "--adaptive max=9: left out 12 run(s) past the 9th seed of their setting " \
           "(seeds 9, 10, 11)" in err
    everything = read(tmp_path, "own-all")
    assert decided(everything) == by_protocol
    assert all(g["n"] == 9 for g in everything["groups"])
    assert any("12 run(s) past the 9th seed" in n for n in everything["strata"][0]["notes"])


def test_summary_names_a_seed_without_a_pair(tmp_path):
    frame = table({s: list(range(9)) for s in GAPS})
    frame = frame[~((frame["p_in"] == 0.8) & (frame["trial"] == 1))]
    analyze_frame(frame, factor="p_in,p_out", seed="trial", metric="val_accuracy",
                  baseline=(0.5, 0.5), margin=0.02, adaptive=ADAPTIVE, out_dir=tmp_path)
    line = next(l for l in (tmp_path / "summary.md").read_text().splitlines()
                if l.startswith("- p_in=0.8, p_out=0.8: val_accuracy"))
    assert "95% CS at the stop" in line and "Note: " in line
    assert "seed(s) 1 have a run in only one of the two settings" in line


def table(seeds: dict[tuple[float, float], list[int]]) -> pd.DataFrame:
    return pd.DataFrame([{"p_in": s[0], "p_out": s[1], "trial": t, "val_accuracy": accuracy(s, t)}
                         for s, trials in seeds.items() for t in trials])


def test_a_csv_and_analyze_frame_give_the_protocols_decisions(store, tmp_path):
    proto, plan = protocol_study()
    expected = {(k.setting[0], k.setting[1]): (d.verdict, d.stopped_at, d.stop_reason,
                                                list(d.cs95), d.p_anytime,
                                                d.seeds_fixed_equivalent)
                for k, d in plan.decisions}
    path = tmp_path / "rounds.csv"
    table(seeds_of(plan)).to_csv(path, index=False)
    assert cli.main(["analyze", "--csv", str(path), *OWN]) == 0
    assert decided(read(tmp_path, "rounds")) == expected
    r = analyze_frame(table(seeds_of(plan)), factor="p_in,p_out", seed="trial",
                      metric="val_accuracy", baseline=(0.5, 0.5), margin=0.02, adaptive=ADAPTIVE)
    assert {tuple(c.setting): (c.verdict, c.stopped_at, c.stop_reason, list(c.cs95),
                               c.p_anytime, c.seeds_fixed_equivalent)
            for c in r.comparisons} == expected


def test_a_seed_missing_in_one_setting_counts_as_a_seed_without_a_pair():
    """A run missing at seed 1 of (0.8, 0.8) is read as a protocol reads a diverged run there:
    the looks count the seed, the test skips the pair, and the comparison says so."""
    proto = schema.parse(PROTO)
    gone = next(c for c in rounds.universe(proto) if (c.dropout1, c.seed) == (0.8, 1))
    values = {c.key: accuracy((c.dropout1, c.dropout2), c.seed) for c in rounds.universe(proto)}
    values[gone.key] = float("nan")
    plan = rounds.schedule(proto, values)
    expected = {k.setting: (d.verdict, d.stopped_at, d.stop_reason, d.cs95, d.p_anytime)
                for k, d in plan.decisions}
    frame = table({s: list(range(9)) for s in GAPS})
    frame = frame[~((frame["p_in"] == 0.8) & (frame["trial"] == 1))]
    r = analyze_frame(frame, factor="p_in,p_out", seed="trial", metric="val_accuracy",
                      baseline=(0.5, 0.5), margin=0.02, adaptive=ADAPTIVE)
    got = {tuple(c.setting): (c.verdict, c.stopped_at, c.stop_reason, c.cs95, c.p_anytime)
           for c in r.comparisons}
    assert got == expected
    (missing,) = [c for c in r.comparisons if c.setting == [0.8, 0.8]]
    assert "seed(s) 1 have a run in only one of the two settings" in missing.reason
    assert all("only one of the two settings" not in (c.reason or "") for c in r.comparisons
               if c.setting != [0.8, 0.8])


def test_a_comparison_still_open_when_the_runs_end_says_so():
    """No run budget here: a comparison the runs end before settling is open, not max_runs."""
    r = analyze_frame(table({s: list(range(5)) for s in GAPS}), factor="p_in,p_out",
                      seed="trial", metric="val_accuracy", baseline=(0.5, 0.5), margin=0.02,
                      adaptive=ADAPTIVE)
    (capped,) = [c for c in r.comparisons if c.setting == [1.0, 1.0]]
    assert (capped.stopped_at, capped.stop_reason) == (5, None)
    assert r.adaptive.study_stop is None and r.adaptive.max_runs is None


@pytest.mark.parametrize("value, fragments", [
    ("start=3,round=0,max=9", ["round=0", "expected an integer >= 1"]),
    ("start=abc,round=2,max=9", ["start='abc' is not an integer"]),
    ("start=3,round=2,max=9,rounds=4", ["unknown key 'rounds'", "start, round, max, stop"]),
    ("start=3,round=2", ["give max"]),
    ("start=10,round=2,max=9", ["max=9", "at least start (10)"]),
    ("start=3,round=2,max=9,stop=never", ["stop='never'", "settled or first"]),
    ("start=3,start=4,round=2,max=9", ["start is given twice"]),
    ("start=3,round", ["'round' is not KEY=VALUE"]),
])
def test_a_bad_adaptive_value_is_one_line_and_exit_2(capsys, value, fragments):
    # Refused before any store is opened or file read.
    for source in (["--experiment", "anything"], ["--csv", "runs.csv"]):
        assert cli.main(["analyze", *source, "--adaptive", value]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: --adaptive {value!r}: ")
        assert all(f in line for f in fragments), line


def test_adaptive_with_a_protocol_file_points_to_its_block(capsys):
    assert cli.main(["analyze", "protocols/smoke.yaml", "--adaptive", ADAPTIVE]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --adaptive is for --experiment or --csv")


def test_each_stratum_is_decided_on_its_own_runs():
    """A param the user also varied (lr) splits the runs: each stratum has its own looks."""
    proto, plan = protocol_study()
    expected = {k.setting: (d.verdict, d.stopped_at, d.stop_reason, d.cs95)
                for k, d in plan.decisions}
    one = table(seeds_of(plan))
    shifted = one.assign(lr=0.2, val_accuracy=one["val_accuracy"] + 0.01)  # same gaps
    r = analyze_frame(pd.concat([one.assign(lr=0.1), shifted]), factor="p_in,p_out",
                      seed="trial", metric="val_accuracy", baseline=(0.5, 0.5), margin=0.02,
                      adaptive=ADAPTIVE)
    assert r.stratified_by == ["lr"] and len(r.comparisons) == 6
    for lr in (0.1, 0.2):
        got = {tuple(c.setting): (c.verdict, c.stopped_at, c.stop_reason, c.cs95)
               for c in r.comparisons if c.stratum["lr"] == lr}
        assert got.keys() == expected.keys()
        for setting, (verdict, at, reason, cs) in got.items():
            assert (verdict, at, reason) == expected[setting][:3]
            assert cs == pytest.approx(expected[setting][3], abs=1e-12)
