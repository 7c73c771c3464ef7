"""Calibration of the whole pipeline: thousands of generated studies through `analysis.analyze`
(the same path `make study` takes), counting how often each verdict comes out where the truth
is known. Fixed seeds, so a failure is reproducible.

    .venv/bin/python -m pytest tests/test_calibration.py -q

Each rate is checked against alpha + 2 SE with SE = sqrt(alpha (1 - alpha) / studies).
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest

from study.analysis import comparisons as analysis
from study.protocol.schema import Analysis
from study.analysis.table import CURVE_COLUMNS, RUN_COLUMNS, RunTable

pytestmark = pytest.mark.slow

ALPHA, MARGIN = 0.05, 0.005
OPTIONS = Analysis(alpha=ALPHA, equivalence_margin=MARGIN, bootstrap=100, power=0.8)
BASE, OTHER = (0.2, 0.5), (0.0, 0.0)
STUDIES = 1000
N_SEEDS = 10
BOUND = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)
REJECTS = {"different", "negligible"}  # the test rejected "no gap"
INSIDE = {"equivalent", "negligible"}  # the gap was shown inside the margin


def _row(setting, seed: int, acc: float) -> dict:
    return {"run_id": f"{setting}-{seed}", "run_name": "", "dropout1": setting[0],
            "dropout2": setting[1], "seed": seed, "device": "cpu", "determinism": "default",
            "implementation": "torch", "execution": "sequential", "randomness": "native",
            "mask_rng": "torch", "kernels": "torch", "vary": "all", "threads": "2", "replicate": 0, "status": "ok",
            "textbook_check": True, "weights_sha256": "", "epochs_done": 10, "test_acc": acc,
            "train_acc": acc, "train_loss": 0.3, "keep_rate1": math.nan, "keep_rate2": math.nan}


def _table(groups: dict[tuple, dict[int, float]]) -> RunTable:
    rows = [_row(s, seed, acc) for s, accs in groups.items() for seed, acc in accs.items()]
    return RunTable("1", "calibration", pd.DataFrame(rows, columns=list(RUN_COLUMNS)),
                    pd.DataFrame({c: pd.Series(dtype=t) for c, t in CURVE_COLUMNS.items()}))


def _accuracies(rng: np.random.Generator, gap: float, paired: bool, heavy: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and setting accuracies on the 10k-image grid. Paired studies share a per-seed
    effect (init and data order); heavy-tailed ones lose 5-20 pp in 5% of runs (lr 0.5 swings)."""
    shared = rng.normal(0, 0.006, N_SEEDS)
    own = shared if paired else rng.normal(0, 0.006, N_SEEDS)
    base = 0.85 + shared + rng.normal(0, 0.003, N_SEEDS)
    other = 0.85 + gap + own + rng.normal(0, 0.003, N_SEEDS)
    if heavy:
        for x in (base, other):
            hit = rng.random(N_SEEDS) < 0.05
            x[hit] -= rng.uniform(0.05, 0.20, hit.sum())
    return np.round(base, 4), np.round(other, 4)


def _verdict(study: tuple[np.ndarray, np.ndarray, bool]) -> str:
    base, other, paired = study
    other_seeds = range(N_SEEDS) if paired else range(100, 100 + N_SEEDS)
    table = _table({BASE: dict(enumerate(base)), OTHER: dict(zip(other_seeds, other))})
    (c,) = analysis.analyze(table, BASE, OPTIONS).comparisons
    assert c.paired == paired
    return c.verdict


def _verdicts(gap: float, paired: bool = True, heavy: bool = False, seed: int = 0,
              studies: int = STUDIES) -> list[str]:
    """The verdict of each of `studies` generated studies. The data are drawn here, in order,
    so the result does not depend on how the analyses are spread over the two worker processes."""
    rng = np.random.default_rng(seed)
    drawn = [(*_accuracies(rng, gap, paired, heavy), paired) for _ in range(studies)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_verdict, drawn, chunksize=50))


def _rate(verdicts: list[str], kinds: set[str]) -> float:
    return sum(v in kinds for v in verdicts) / len(verdicts)


@pytest.mark.parametrize("paired, heavy", [(True, False), (False, False), (True, True)],
                         ids=["paired", "unpaired", "heavy-tailed"])
def test_no_true_gap_is_called_different_at_most_alpha_of_the_time(paired, heavy):
    rate = _rate(_verdicts(0.0, paired, heavy, seed=1), REJECTS)
    assert rate <= BOUND, f"false 'different' rate {rate:.3f} > {BOUND:.3f}"


@pytest.mark.parametrize("gap", [MARGIN, -MARGIN], ids=["+margin", "-margin"])
def test_a_gap_on_the_margin_is_called_inside_it_at_most_alpha_of_the_time(gap):
    rate = _rate(_verdicts(gap, seed=2), INSIDE)
    assert rate <= BOUND, f"false 'equivalent' rate {rate:.3f} > {BOUND:.3f}"


def test_a_real_gap_well_inside_the_margin_comes_out_negligible():
    # Tight pairs: SD of the differences ~0.4 pp, gap 0.25 pp, margin 0.5 pp.
    rng = np.random.default_rng(3)
    verdicts = []
    for _ in range(200):
        base = np.round(0.85 + rng.normal(0, 0.006, 20), 4)
        other = np.round(base + 0.0025 + rng.normal(0, 0.0008, 20), 4)
        table = _table({BASE: dict(enumerate(base)), OTHER: dict(enumerate(other))})
        verdicts.append(analysis.analyze(table, BASE, OPTIONS).comparisons[0].verdict)
    assert _rate(verdicts, {"negligible"}) >= 0.9


def test_pairing_survives_one_missing_run():
    rng = np.random.default_rng(4)
    for _ in range(50):
        base, other = _accuracies(rng, 0.005, True, False)
        third = np.round(other - 0.002, 4)
        missing = int(rng.integers(N_SEEDS))
        groups = {BASE: dict(enumerate(base)), OTHER: dict(enumerate(other)),
                  (0.5, 0.5): {s: v for s, v in enumerate(third) if s != missing}}
        comps = analysis.analyze(_table(groups), BASE, OPTIONS).comparisons
        assert all(c.paired for c in comps)
        assert sorted(c.n_pairs for c in comps) == [N_SEEDS - 1, N_SEEDS]
