"""Re-train a sample of finished cells from the store and say whether they reproduce.

    python -m study verify protocols/d2l-dropout.yaml                 # 3 cells, sampled with seed 0
    python -m study verify --experiment portability --sample 5 --seed 1
    python -m study verify protocols/portability.yaml --all

Each cell is rebuilt from its run's recorded protocol and trained again in a fresh worker in its
recorded mode and thread count (the runner's workers, logging nothing to the study's runs). One
line per cell: identical, or the largest per-epoch metric drift and the environment keys that
differ from the recorded run. The exit status is 1 when a cell recorded as `strict` or `portable`
does not reproduce although none of the keys that decide the bits differ; everything else is
reported, not failed. The counts and lines go to one run tagged `study.kind=verify`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

from study.engine import environment, workers
from study.protocol import plan, schema as protocol
from study.store import tracking
from study.engine.data import Dataset
from study.engine.data import load as load_data
from study.protocol.plan import Cell
from study.engine.train import Result

# Modes whose promise a non-reproducing cell breaks (on a machine whose recorded keys match).
PROMISED = ("strict", "portable")


class VerifyError(RuntimeError):
    """Nothing in the store to verify."""


@dataclass(frozen=True)
class Check:
    """One re-trained cell against its recorded run."""

    recorded: tracking.Recorded
    result: Result
    present: dict[str, str]
    drift: float  # largest |recorded - present| over every epoch and metric; 0.0 when equal
    differing: tuple[str, ...]  # environment keys that decide the bits and differ

    @property
    def identical(self) -> bool:
        return self.result.weights_sha256 == self.recorded.weights_sha256

    @property
    def broken(self) -> bool:
        """A promise not kept: strict/portable, same keys, other bits."""
        return not self.identical and self.recorded.mode in PROMISED and not self.differing

    def line(self) -> str:
        head = f"{self.recorded.name}: "
        if self.identical:
            return head + "identical (same weight hash)"
        keys = "; ".join(self.differing) or "no recorded key differs"
        verdict = "NOT REPRODUCED, promised by its mode" if self.broken else "differs"
        return head + f"{verdict}: largest metric drift {self.drift:.3g}; environment: {keys}"


@dataclass(frozen=True)
class Verification:
    checks: tuple[Check, ...]
    not_rebuilt: tuple[str, ...]  # runs whose cell the recorded protocol no longer expands to

    @property
    def ok(self) -> bool:
        return not any(c.broken for c in self.checks)

    def lines(self) -> list[str]:
        out = [c.line() for c in self.checks]
        out += [f"{name}: not verified (its recorded protocol no longer gives this cell)"
                for name in self.not_rebuilt]
        n_same = sum(c.identical for c in self.checks)
        out.append(f"{n_same} of {len(self.checks)} cells identical; "
                   f"{sum(c.broken for c in self.checks)} broke their mode's promise")
        return out

    def tags(self) -> dict[str, str]:
        return {"n_checked": str(len(self.checks)),
                "n_identical": str(sum(c.identical for c in self.checks)),
                "n_broken": str(sum(c.broken for c in self.checks)),
                "n_env_differs": str(sum(bool(c.differing) for c in self.checks)),
                "cpu_isa": environment.cpu_isa(), "cpu_model": environment.cpu_model()}


def sample(runs: list[tracking.Recorded], n: int | None, seed: int) -> list[tracking.Recorded]:
    """`n` runs drawn with `seed` from those sorted by cell (None: all of them)."""
    ordered = sorted(runs, key=lambda r: (r.cell_key, r.run_id))
    return ordered if n is None or n >= len(ordered) else random.Random(seed).sample(ordered, n)


def verify(experiment: str, n: int | None = 3, seed: int = 0,
           load: Callable[[], Dataset] = load_data) -> Verification:
    # One protocol.yaml download per sampled run: MLflow's progress bar would bury the lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow = tracking.client()
    exp_id = tracking.experiment_id(mlflow, experiment, create=False)
    runs = tracking.recorded_runs(mlflow, exp_id)
    if not runs:
        raise VerifyError(f"experiment {experiment!r} has no finished runs to verify")
    chosen = sample(runs, n, seed)
    cells, lost = _rebuild(mlflow, chosen)
    checks: list[Check] = []
    by_key = {r.cell_key: r for r in chosen}
    for group in workers.groups(cells, load):  # one group per training subset, among others
        trained = workers.trained(group)
        checks += [_check(mlflow, by_key[r.cell.key], r, trained.environment)
                   for r in trained.results]
    done = Verification(tuple(checks), lost)
    tracking.log_verify(mlflow, exp_id, done.tags(), done.lines())
    return done


def _rebuild(mlflow, runs: list[tracking.Recorded]
             ) -> tuple[list[Cell], tuple[str, ...]]:
    """Each run's cell from its own recorded protocol (its training subset included)."""
    cells, lost = [], []
    for run in runs:
        raw = tracking.recorded_protocol(mlflow, run.run_id)
        proto = protocol.parse(_as_recorded(raw), source=f"run {run.run_id} protocol.yaml") \
            if raw else None
        cell = next((c for c in plan.expand(proto) if c.key == run.cell_key), None) if proto \
            else None
        if cell is None:
            lost.append(run.name)
            continue
        cells.append(cell)
    return cells, tuple(lost)


def _as_recorded(raw: dict) -> dict:
    """A recorded protocol as it was meant: one logged before `kernels` existed ran its portable
    cells on torch's kernels (today's default is OpenBLAS)."""
    return raw if "kernels" in raw else {**raw, "kernels": "torch"}


def _check(mlflow, recorded: tracking.Recorded, result: Result,
           present: dict[str, str]) -> Check:
    logged = tracking.recorded_epochs(mlflow, recorded.run_id)
    now = {e.epoch: e for e in result.epochs}
    drift = max((abs(value - getattr(now[step], metric))
                 for metric, points in logged.items() for step, value in points.items()
                 if step in now), default=0.0)
    differing = environment.differences(recorded.environment, present,
                                        environment.bits_keys(recorded.kernels))
    if result.kernels != recorded.kernels:
        differing.insert(0, f"kernels: {recorded.kernels} -> {result.kernels}")
    return Check(recorded, result, present, drift, tuple(differing))
