"""The anytime-valid decision an adaptive protocol's rounds give a comparison: one set of fields,
shared by every record a round can decide (results.Comparison, results.Paired for C7,
diagnostics.ImplementationRecord for C4), so the three cannot drift apart."""

from __future__ import annotations

import math
from dataclasses import dataclass

Interval = tuple[float, float]


@dataclass(frozen=True)
class Look:
    """An adaptive comparison's 95% confidence sequence at one look: seeds per setting, and its
    bounds (None while unbounded, before the SD is known)."""

    seeds: int
    lo: float | None
    hi: float | None

    @classmethod
    def of(cls, seeds: int, lo: float, hi: float) -> Look:
        """From the analysis's floats, an infinite bound read as None (JSON has no inf)."""
        return cls(int(seeds), lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None)


# kw_only: these defaulted fields come after each record's own positional ones.
@dataclass(frozen=True, kw_only=True)
class Anytime:
    """Filled only where the comparison drives an adaptive protocol's rounds (None otherwise),
    and then `verdict` is this decision (study/analysis/sequential.py). cs95: the confidence
    sequence at the stop, the interval to report (never a fixed-n interval, biased by early
    stopping); p_anytime: valid at any stopping time, so Holm over comparisons that stop at
    different times stays valid; stopped_at: seeds per setting at the stop (or at the latest
    look while open); stop_reason: settled | max_seeds | max_runs, None while open;
    seeds_fixed_equivalent: seeds a fixed paired design needs for the protocol's power;
    cs_looks: the CS at every look up to the stop (the figure of its narrowing)."""

    cs95: Interval | None = None
    p_anytime: float | None = None
    stopped_at: int | None = None
    stop_reason: str | None = None
    seeds_fixed_equivalent: int | None = None
    cs_looks: list[Look] | None = None

    @property
    def adaptive(self) -> bool:
        """Whether an adaptive protocol's rounds decided this record."""
        return self.stopped_at is not None
