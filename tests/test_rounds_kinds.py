"""Which comparisons drive adaptive rounds (`adaptive.compare`): C4's hand-written dropouts
against torch and C7's MC-averaged against eval-mode accuracy decide rounds as C1's settings
against the baseline do, through the same `sequential.decide`; each kind's next round is a
function of the store alone and a stopped comparison never reopens.

    .venv/bin/python -m pytest tests/test_rounds_kinds.py -q
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest
import yaml

from study import cli, runner
from study.analysis import rounds
from study.protocol import schema
from tests.test_rounds import run_to_end
from tests.test_runner import loader, store  # noqa: F401 (fixtures: a temporary store, tiny data)

IMPLEMENTATIONS = "protocols/implementations.yaml"
D2L = "protocols/d2l-dropout.yaml"
# True gaps of each implementation to torch at the same setting: scratch draws the masks torch
# draws in law (no gap), scratch-randn keeps ~31% instead of 50% (a clear loss).
IMPL_GAPS = {"torch": 0.0, "scratch": 0.0, "scratch-randn": -0.03}


def impl_outcome(cell) -> float:
    """Final test accuracy: a per-seed effect shared by the implementations (pairs matter), the
    implementation's gap and the run's own noise; a pure function of the cell."""
    shared = np.random.default_rng([cell.seed, 1]).normal(0, 0.004)
    own = np.random.default_rng([cell.seed, zlib.crc32(cell.key.encode())]).normal(0, 0.004)
    return 0.84 + IMPL_GAPS[cell.implementation] + shared + own


def drive(proto, outcome, mc_gap=None, kill_every=None):
    """tests.test_rounds.run_to_end with this file's outcomes: (final, values, schedules)."""
    return run_to_end(proto, kill_every=kill_every, outcome=outcome, mc_gap=mc_gap)


def never_reopens(history) -> None:
    stopped: dict = {}
    for sched in history:
        for k, d in sched.decisions:
            if k in stopped:  # seeds_fixed_equivalent is only computed once the study ends
                assert dataclasses.replace(d, seeds_fixed_equivalent=None) == stopped[k]
            elif not d.open:
                stopped[k] = dataclasses.replace(d, seeds_fixed_equivalent=None)
    assert stopped


# ----------------------------------------------------------------------------- C4


def implementations(**block):
    # max_seeds 60: the equivalence of scratch at paired gaps' SD ~0.57 pp needs about 25 seeds.
    items = {"round": 5, "max_seeds": 60, "max_runs": 400, "compare": "[implementations]",
             **block}
    return schema.load(IMPLEMENTATIONS, ["adaptive={" + ", ".join(f"{k}: {v}" for k, v in
                                                                   items.items()) + "}"])


def test_implementations_drive_rounds_against_torch_at_the_same_setting():
    final, values, history = drive(implementations(), impl_outcome)
    kinds = {k.kind for k, _ in final.decisions}
    assert kinds == {"implementations"}  # the settings' comparison does not drive here
    by = {(dict(k.labels)["implementation"], k.setting): d for k, d in final.decisions}
    assert len(by) == 4  # scratch and scratch-randn at (0.2, 0.5) and (0.5, 0.5)
    for setting in ((0.2, 0.5), (0.5, 0.5)):
        randn = by[("scratch-randn", setting)]
        assert randn.verdict == "different" and randn.stopped_at == 10
        assert by[("scratch", setting)].stopped_at > 10
    # Each later round adds seeds only to the open comparisons: scratch and its torch twin.
    for r in final.rounds[1:]:
        assert {c.implementation for c in r.cells} == {"scratch", "torch"}
        assert all(name.startswith("scratch vs torch at (") for name in r.open)
    assert {c.key for c in final.cells} == set(values)
    never_reopens(history)


def test_the_implementations_rounds_are_a_function_of_the_store():
    final, values, _ = drive(implementations(max_seeds=25), impl_outcome)
    killed, values_killed, _ = drive(implementations(max_seeds=25), impl_outcome, kill_every=9)
    assert killed.round_of() == final.round_of() and values_killed == values
    assert killed.decisions == final.decisions


# ----------------------------------------------------------------------------- C7


def mc_gap(cell) -> float:
    """MC-minus-eval accuracy of a run: exactly 0 at (0, 0) and (1, 1) (no random unit), a
    clear gain at (0.9, 0.9), small and noisy elsewhere; a pure function of the cell."""
    setting = (cell.dropout1, cell.dropout2)
    if setting in ((0.0, 0.0), (1.0, 1.0)):
        return 0.0
    mean = 0.02 if setting == (0.9, 0.9) else 0.001
    return mean + np.random.default_rng([cell.seed, 7, zlib.crc32(cell.key.encode())]).normal(
        0, 0.003)


def d2l_outcome(cell) -> float:
    return 0.85 + np.random.default_rng([cell.seed, zlib.crc32(cell.key.encode())]).normal(
        0, 0.004)


def mc_only(**block):
    items = {"round": 5, "max_seeds": 30, "max_runs": 400, "compare": "[mc]", **block}
    return schema.load(D2L, ["adaptive={" + ", ".join(f"{k}: {v}" for k, v in items.items())
                             + "}"])


def test_mc_comparisons_drive_rounds_for_their_own_setting_only():
    final, _, history = drive(mc_only(), d2l_outcome, mc_gap)
    by = {k.setting: d for k, d in final.decisions}
    # (0, 0) and (1, 1) draw nothing random in their passes: no MC comparison drives seeds.
    assert {k.kind for k, _ in final.decisions} == {"mc"} and len(by) == 4
    assert not {(0.0, 0.0), (1.0, 1.0)} & set(by)
    assert [rounds.passes_differ(s) for s in ((0.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.0, 0.5))] \
        == [False, False, False, True]
    assert by[(0.9, 0.9)].verdict == "different" and by[(0.9, 0.9)].stop_reason == "settled"
    assert len(final.rounds) > 1
    for r in final.rounds[1:]:
        grown = {(c.dropout1, c.dropout2) for c in r.cells}
        opened = {n.removeprefix("MC vs eval at ").split(" (cpu")[0] for n in r.open}
        # MC is paired within runs: no baseline seeds unless its own MC comparison is open.
        assert {f"({a:g}, {b:g})" for a, b in grown} == opened
    never_reopens(history)


def test_missing_mc_values_are_diverged_pairs_not_a_crash():
    final, _, _ = drive(mc_only(max_seeds=15), d2l_outcome, lambda c: float("nan"))
    assert all(d.stop_reason == "max_seeds" and d.verdict == "inconclusive"
               for _, d in final.decisions)


def test_the_lesson_protocols_drive_the_comparisons_their_claims_need():
    assert schema.load(D2L).driving_kinds() == ("baseline", "contrasts", "mc")
    assert schema.load(IMPLEMENTATIONS).driving_kinds() == ("implementations",)


@pytest.mark.parametrize("path, override, message", [
    (D2L, "adaptive.compare=[implementations]", "adaptive.compare: ['implementations'] not in "
     "this protocol, which has ['baseline', 'contrasts', 'mc']"),
    (D2L, "adaptive.compare=[]", "adaptive.compare: must name at least one kind"),
    (D2L, "adaptive.compare=[c7]", "adaptive.compare.0: Input should be 'baseline'"),
])
def test_a_bad_compare_is_a_one_line_error(path, override, message):
    with pytest.raises(schema.ProtocolError) as err:
        schema.load(path, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- end to end

PROTO = dict(name="adaptive-kinds", dropout=[[0.0, 0.0], [0.5, 0.5]], seeds={"count": 3},
             baseline=[0.5, 0.5], training={"epochs": 1, "batch_size": 100},
             implementations=["torch", "scratch"], inference={"mc_passes": 2},
             analysis={"equivalence_margin": 0.02},
             adaptive={"round": 2, "max_seeds": 5, "max_runs": 40})
FIELDS = ("cs95", "p_anytime", "stopped_at", "stop_reason")


def test_results_carry_the_decisions_of_every_kind(store, loader, tmp_path, monkeypatch):
    proto = schema.parse(PROTO)
    runner.run(proto, load=loader, progress=False)
    path = tmp_path / "kinds.yaml"
    path.write_text(yaml.safe_dump(PROTO))
    monkeypatch.setattr(cli, "REPORTS", tmp_path / "reports")
    assert cli.main(["analyze", str(path)]) == 0
    data = json.loads((tmp_path / "reports" / proto.name / "results.json").read_text())
    plan = runner.schedule(store, store.get_experiment_by_name(proto.name).experiment_id, proto)
    assert {k.kind for k, _ in plan.decisions} == {"baseline", "implementations", "mc"}
    records = data["diagnostics"]["implementations"]["records"]
    settings = data["inference"]["settings"]
    assert len(records) == 2 and len(settings) == 4  # 2 settings; x 2 implementations for MC
    # MC rows drive rounds only where passes can differ from eval mode: not at (0, 0).
    mc = [s["accuracy"] for s in settings if (s["dropout1"], s["dropout2"]) == (0.5, 0.5)]
    fixed = [s["accuracy"] for s in settings if (s["dropout1"], s["dropout2"]) == (0.0, 0.0)]
    assert len(mc) == 2 and all(r["stop_reason"] is None and r["cs95"] is None for r in fixed)
    decided = {(k.kind, k.name): d for k, d in plan.decisions}
    assert len(decided) == len(plan.decisions)
    for row in [*records, *mc]:
        assert row["stop_reason"] in ("settled", "max_seeds", "max_runs")
        assert all(row[f] is not None for f in FIELDS if f != "cs95")
        assert row["stopped_at"] in (3, 5)
    stops = sorted((d.stopped_at, d.stop_reason) for (kind, _), d in decided.items()
                   if kind == "mc")
    assert sorted((r["stopped_at"], r["stop_reason"]) for r in mc) == stops
