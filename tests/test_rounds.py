"""Adaptive rounds (study.analysis.rounds): the next round is a function of the protocol and the
finished runs alone, a stopped comparison never reopens, and the run budget is kept.

    .venv/bin/python -m pytest tests/test_rounds.py -q
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from study.analysis import rounds, sequential as sq
from study.protocol import schema

PROTOCOL = "protocols/d2l-dropout.yaml"
# True gaps to the baseline (0.2, 0.5): clear, equivalent, inside the margin, and two collapses.
GAPS = {(0.0, 0.0): -0.02, (0.6, 0.8): 0.0, (0.8, 0.6): 0.002, (0.9, 0.9): -0.05,
        (1.0, 1.0): -0.75, (0.2, 0.5): 0.0}
# True MC-averaged minus eval-mode accuracy (C7): none without dropout or with every unit
# dropped (the passes are then the eval pass), small elsewhere, one clearly positive.
MC_GAPS = {(0.0, 0.0): 0.0, (0.2, 0.5): 0.001, (0.6, 0.8): 0.004, (0.8, 0.6): 0.002,
           (0.9, 0.9): 0.02, (1.0, 1.0): 0.0}


def protocol(**adaptive) -> schema.Protocol:
    block = ", ".join(f"{k}: {v}" for k, v in {"round": 5, "max_seeds": 40, "max_runs": 400,
                                                **adaptive}.items())
    return schema.load(PROTOCOL, [f"adaptive={{{block}}}"])


def outcome(cell) -> float:
    """A run's test accuracy: the setting's gap, a per-seed effect every setting shares (pairs
    matter), and the run's own noise; a pure function of the cell, like a seeded run."""
    shared = np.random.default_rng([cell.seed, 1]).normal(0, 0.004)
    own = np.random.default_rng([cell.seed, zlib.crc32(cell.key.encode())]).normal(0, 0.004)
    return 0.85 + GAPS[(cell.dropout1, cell.dropout2)] + shared + own


def mc_gap(cell) -> float:
    """A run's MC-minus-eval accuracy, a pure function of the cell (exactly 0 where no unit
    is random: the passes repeat the eval pass)."""
    setting = (cell.dropout1, cell.dropout2)
    if setting in ((0.0, 0.0), (1.0, 1.0)):
        return 0.0
    noise = np.random.default_rng([cell.seed, 7, zlib.crc32(cell.key.encode())]).normal(0, 0.002)
    return MC_GAPS[setting] + noise


def run_to_end(proto, values=None, kill_every=None, outcome=outcome, mc_gap=mc_gap):
    """Drive the study as `study run` does: run the todo cells, re-plan from the finished runs
    (`outcome` of each, and its `mc_gap` unless None); with `kill_every`, each round is
    interrupted after that many runs (a killed driver) and resumed."""
    values = dict(values or {})
    history = []
    for _ in range(100):
        mc = None if mc_gap is None else {c.key: mc_gap(c) for c in rounds.universe(proto)
                                          if c.key in values}
        sched = rounds.schedule(proto, values, mc_gaps=mc)
        history.append(sched)
        if sched.stop is not None:
            return sched, values, history
        todo = sched.todo[:kill_every] if kill_every else sched.todo
        values.update({c.key: outcome(c) for c in todo})
    raise AssertionError("no stop after 100 schedules")


def mc_of(values, proto) -> dict:
    """The MC gaps of the finished runs (`values`' keys): what the store would hold."""
    return {c.key: mc_gap(c) for c in rounds.universe(proto) if c.key in values}


def test_round_zero_is_every_setting_at_seeds_count():
    sched = rounds.schedule(protocol(), {})
    assert len(sched.rounds) == 1 and sched.stop is None and not sched.decisions
    assert len(sched.todo) == 6 * 10
    assert {c.seed for c in sched.todo} == set(range(10))


def test_the_study_settles_and_rounds_add_seeds_to_open_comparisons_and_their_baseline():
    final, values, history = run_to_end(protocol())
    assert final.stop == "settled" and not final.open
    verdicts = {k.setting: d for k, d in final.decisions if k.kind == "baseline"}
    assert verdicts[(0.0, 0.0)].verdict == "different"
    assert verdicts[(1.0, 1.0)].stopped_at == 10 and verdicts[(1.0, 1.0)].stop_reason == "settled"
    assert verdicts[(0.6, 0.8)].verdict in ("equivalent", "negligible")
    assert len(final.rounds) > 1
    for r in final.rounds[1:]:
        settings = {(c.dropout1, c.dropout2) for c in r.cells}
        assert (0.2, 0.5) in settings and (1.0, 1.0) not in settings
        assert r.open
    for k, d in final.decisions:
        assert d.cs95 is not None and 0 <= d.p_anytime <= 1 and d.stopped_at % 5 == 0
    # every planned cell ran, and only those
    assert {c.key for c in final.cells} == set(values)


def test_the_next_round_is_a_function_of_the_store_alone():
    final, values, _ = run_to_end(protocol())
    killed, values_killed, _ = run_to_end(protocol(), kill_every=7)
    assert killed.round_of() == final.round_of() and values_killed == values
    # The same runs in another order (another backend, the batched engine) plan the same.
    shuffled = dict(sorted(values.items(), key=lambda kv: zlib.crc32(kv[0].encode())))
    again = rounds.schedule(protocol(), shuffled, mc_gaps=mc_of(shuffled, protocol()))
    assert again.round_of() == final.round_of() and again.decisions == final.decisions
    # A store holding every run but some of round 2: round 2 is next, with exactly those cells.
    if len(final.rounds) > 2:
        missing = {c.key for c in final.rounds[2].cells[::3]}
        kept = {k: v for k, v in values.items() if k not in missing}
        partial = rounds.schedule(protocol(), kept, mc_gaps=mc_of(kept, protocol()))
        assert len(partial.rounds) == 3 and {c.key for c in partial.todo} == missing


def test_a_stopped_comparison_never_reopens():
    _, _, history = run_to_end(protocol())
    stopped: dict = {}
    for sched in history:
        for k, d in sched.decisions:
            if k in stopped:
                same = stopped[k]
                assert (d.verdict, d.stopped_at, d.stop_reason, d.cs95, d.p_anytime) == \
                    (same.verdict, same.stopped_at, same.stop_reason, same.cs95, same.p_anytime)
            elif not d.open:
                stopped[k] = d
    assert stopped


def test_the_run_budget_stops_open_comparisons_with_max_runs():
    final, values, _ = run_to_end(protocol(max_runs=75))
    assert final.stop == "max_runs" and len(values) <= 75
    reasons = {d.stop_reason for _, d in final.decisions}
    assert "max_runs" in reasons and None not in reasons


def test_the_cap_stops_with_max_seeds():
    final, _, _ = run_to_end(protocol(max_seeds=15))
    assert final.stop == "settled"
    capped = [d for k, d in final.decisions if d.stop_reason == "max_seeds"]
    assert capped and all(d.stopped_at == 15 for d in capped)


def test_fixed_design_seeds_are_given_once_settled():
    final, _, _ = run_to_end(protocol())
    d = {k.setting: d for k, d in final.decisions if k.kind == "baseline"}[(0.0, 0.0)]
    assert d.seeds_fixed_equivalent == sq.fixed_seeds(d.verdict, d.mean_diff, d.sd,
                                                      final.design, 0.8)


@pytest.mark.parametrize("override, message", [
    ("seeds={list: [0, 1, 2]}", "adaptive: needs seeds.count"),
    ("adaptive.max_seeds=5", "adaptive.max_seeds: 5 is below seeds.count 10"),
    ("adaptive.stop=early", "adaptive.stop: Input should be 'settled' or 'first'"),
    ("adaptive.rounds=3", "adaptive.rounds: unknown key; did you mean 'round'?"),
])
def test_bad_adaptive_blocks_are_one_line_errors(override, message):
    with pytest.raises(schema.ProtocolError) as err:
        schema.load(PROTOCOL, ["adaptive={round: 5}", override])
    assert message in str(err.value) and "\n" not in str(err.value)
