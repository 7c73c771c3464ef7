"""The adaptive decision rule keeps its error rates under optional stopping: >= 10,000
simulated sequential studies per case, decided by the same `sequential.run_design` the runner's
rounds and `analyze` call (through `study.tools.calibrate`), under the d2l protocol's design.

    .venv/bin/python -m pytest tests/test_sequential_calibration.py -q
"""

from __future__ import annotations

import pytest

from study.analysis import rounds
from study.protocol import schema
from study.tools import calibrate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def calibration():
    design = rounds.design_for(schema.load(calibrate.PROTOCOL))
    return design, calibrate.table(design, sims=10_000)


def test_every_guaranteed_error_rate_is_at_most_alpha_plus_two_se(calibration):
    design, rows = calibration
    checked = calibrate.errors(rows, design.margin)
    # gap 0 and +-margin, for 3 noises x 2 stop rules
    assert len(checked) == 3 * 2 * 3
    over = [(r.noise, r.stop, r.gap, what, rate) for r, what, rate in checked
            if rate > design.alpha + 2 * r.se(rate)]
    assert not over, over


def test_clear_gaps_stop_early_and_are_called_different(calibration):
    design, rows = calibration
    for r in rows:
        if abs(r.gap) >= 0.02:
            assert r.different > 0.99 and r.seeds_mean < design.start + design.round
