"""The typed diagnostics sections of `Results` (`results.json` -> "diagnostics"): numbers only.
`study.analysis.diagnostics` produces them; `study.report.diagnostics` words them.

    python -c "from study.results.diagnostics import Diagnostics; help(Diagnostics)"

Every field is in results.json under the same name. A section whose `applicable` is False holds
no records and says why in `reason`; a value that cannot be computed is None and its record's
`reason` says why (no NaN anywhere). Intervals are `(lo, hi)` tuples; a ratio's upper bound may
be None (the data cannot bound it). `stratum` is a dict of the `table.STRATUM_COLUMNS` that
stay fixed within a record. `from_json` reads the JSON form back into the same objects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from study.results.anytime import Anytime

Interval = tuple[float, float]
OpenInterval = tuple[float, float | None]
T = TypeVar("T")


@dataclass(frozen=True)
class MaxAbsDiff:
    """Largest |a - b| over pairs where both are finite; None when no pair is."""

    test_acc: float | None
    train_loss: float | None


@dataclass(frozen=True)
class Agreement:
    """Bitwise agreement of paired runs (same weight hash), with a Clopper-Pearson interval."""

    stratum: dict[str, Any]
    n_hash_compared: int  # pairs where both runs recorded a weight hash
    n_identical: int
    share_identical: float | None
    share_identical_ci95: Interval | None
    max_abs_diff: MaxAbsDiff


@dataclass(frozen=True)
class ReplicateRecord(Agreement):
    """Replicates k > 0 of a (device, determinism, execution, threads) stratum against replicate
    0 of their cell; variances pooled within cells (nondeterminism) and within settings (seeds)."""

    n_cells: int
    n_replicates: int
    n_missing_first: int
    nondeterminism_var: float | None  # exactly 0.0 when every replicate repeats its cell
    nondeterminism_sd: float | None
    nondeterminism_df: int
    seed_var: float | None
    seed_sd: float | None
    seed_df: int
    variance_ratio: float | None  # nondeterminism_var / seed_var
    reason: str | None


@dataclass(frozen=True)
class ThreadRecord(Agreement):
    threads_a: str
    threads_b: str
    n_pairs: int
    reason: str | None


@dataclass(frozen=True)
class PairedRecord(Agreement):
    """A paired t test and TOST of a against b (test_acc), Holm-adjusted within its family."""

    n_pairs: int
    mean_diff: float | None
    mean_diff_ci95: Interval | None
    test: str
    p: float | None
    tost_p: float | None
    mde: float | None
    seeds_needed: int | None
    p_adjusted: float | None
    tost_p_adjusted: float | None
    verdict: str  # stats.verdict: different / negligible / equivalent / inconclusive
    reason: str | None


@dataclass(frozen=True)
class ModeRecord(PairedRecord):
    mode: str
    reference: str
    no_change_observed: bool  # every pair bitwise identical: a null result, not a proof


@dataclass(frozen=True)
class DeviceRecord(PairedRecord):  # cuda - cpu
    dropout1: float
    dropout2: float


@dataclass(frozen=True)
class ImplementationRecord(PairedRecord, Anytime):  # implementation - reference (torch)
    dropout1: float
    dropout2: float
    implementation: str
    reference: str


@dataclass(frozen=True)
class SourceRecord:
    """Seed-to-seed spread when only `source` follows the seed, against all sources varying."""

    stratum: dict[str, Any]
    dropout1: float
    dropout2: float
    source: str  # all / init / data / dropout / bitflip
    n: int
    mean: float | None
    sd: float | None
    sd_ci95: Interval | None
    ratio: float | None  # sd / sd of "all"
    ratio_ci95: OpenInterval | None
    paired: bool | None  # the same seeds as "all" (None for "all" itself)
    brown_forsythe_p: float | None
    brown_forsythe_p_adjusted: float | None  # Holm over the single sources of one setting
    summers: str  # consistent / smaller / much_smaller / larger / inconclusive / not_computable / reference
    reason: str | None


@dataclass(frozen=True)
class SourceOmnibus:
    test: str  # brown_forsythe, across every source
    statistic: float | None
    p: float | None
    reason: str | None


@dataclass(frozen=True)
class SourceSummary:
    stratum: dict[str, Any]
    dropout1: float
    dropout2: float
    sources: list[str]
    omnibus: SourceOmnibus
    agreement: str  # agree / disagree / inconclusive / not_computable (with Summers & Dinneen)
    reason: str | None


@dataclass(frozen=True)
class KeepRecord:
    """Measured share of live units one dropout layer kept in training (replicate-0 runs)."""

    implementation: str
    dropout1: float
    dropout2: float
    layer: int
    p: float
    n: int
    observed: float | None
    observed_sd: float | None
    nominal: float  # 1 - p
    expected: float | None  # what the code draws: 1 - p, or P(N(0,1) > p) for scratch-randn
    deviation: float | None  # observed - nominal
    matches_nominal: bool | None
    matches_expected: bool | None
    rescale: float | None  # 1 / (1 - p); None at p = 1
    activation_scale: float | None  # observed * rescale: 1 for correct inverted dropout
    reason: str | None


@dataclass(frozen=True)
class Section:
    applicable: bool  # False when the table holds nothing this section can measure
    reason: str | None


@dataclass(frozen=True)
class ReplicatesSection(Section):
    records: list[ReplicateRecord]


@dataclass(frozen=True)
class ModesSection(Section):
    records: list[ModeRecord]
    reference: str | None  # the mode compared against: "default" when present


@dataclass(frozen=True)
class DevicesSection(Section):
    records: list[DeviceRecord]


@dataclass(frozen=True)
class ThreadsSection(Section):
    records: list[ThreadRecord]


@dataclass(frozen=True)
class SourcesSection(Section):
    records: list[SourceRecord]
    low_ratio: float  # an SD-ratio CI above this excludes "much smaller than the full spread"
    summaries: list[SourceSummary]


@dataclass(frozen=True)
class KeepRatesSection(Section):
    records: list[KeepRecord]


@dataclass(frozen=True)
class ImplementationsSection(Section):
    records: list[ImplementationRecord]
    reference: str
    margin: float
    claim: str


@dataclass(frozen=True)
class Diagnostics:
    """Replicates, determinism modes, CPU against GPU, sources of variance, keep rates,
    implementation equivalence and thread counts (`study.diagnostics` says how each is made)."""

    replicates: ReplicatesSection
    modes: ModesSection
    devices: DevicesSection
    variance_sources: SourcesSection
    keep_rates: KeepRatesSection
    implementations: ImplementationsSection
    threads: ThreadsSection

    def sections(self) -> dict[str, Section]:
        """Section name -> section, in field order (the names are the JSON keys)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Diagnostics:
        """The results.json form back into typed sections."""
        return from_json(cls, data)


def from_json(cls: type[T], data: Any) -> T:
    """A dataclass from its JSON form (`dataclasses.asdict` then `table.jsonable`): nested
    dataclasses and lists of them by their annotations, [lo, hi] lists back to tuples."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _from(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)})


def _from(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _from(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value)
    if origin is list:
        return [_from(args[0], v) for v in value]
    if origin is tuple:
        return tuple(value)
    return value
