"""The typed results contract: what `analysis` produces and what JSON, CSV, figures and the report
read. Every field here is in `results.json` under the same name (see docs/results.md).

    python -c "from study.results import Endpoint; print(Endpoint.parse('last:3'))"

Intervals are `(lo, hi)` tuples in accuracy units; "not computable" is `None` plus a `reason`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from study.results.anytime import Anytime, Look
from study.results.diagnostics import Diagnostics
from study.analysis.table import jsonable

if TYPE_CHECKING:  # annotation only: the results contract imports no scipy (stats does)
    from study.analysis.stats import Slope

Interval = tuple[float, float]
# Fashion-MNIST's test set: every final accuracy is a multiple of 1 / TEST_IMAGES.
TEST_IMAGES = 10_000
# The fixed robustness set every comparison is also run under (issue: verdicts that do not move
# with undeclared analysis choices). The declared primary endpoint joins it when it is not listed.
ROBUSTNESS_ENDPOINTS = ("final", "last:3", "last:5")
ROBUSTNESS_TESTS = ("t", "rank", "trimmed")
TEST_NAMES = {"t": "t test", "rank": "rank test (Hodges-Lehmann)", "trimmed": "20%-trimmed (Yuen)"}
VERDICTS = ("different", "negligible", "equivalent", "inconclusive")
_ENDPOINT = re.compile(r"^(final|last:([1-9][0-9]*))$")


@dataclass(frozen=True, order=True)
class Endpoint:
    """Which number of a run is analysed: its final test accuracy, or the mean of its last K
    evaluated epochs (less sensitive to the chaotic last step at lr 0.5)."""

    k: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        match = _ENDPOINT.match(text)
        if not match:
            raise ValueError(f"endpoint {text!r}: expected 'final' or 'last:K' with K >= 1")
        return cls(1 if match.group(1) == "final" else int(match.group(2)))

    @property
    def name(self) -> str:
        return "final" if self.k == 1 else f"last:{self.k}"

    @property
    def grid(self) -> float:
        """The endpoint's resolution: differences closer than this are ties (round before ranking)."""
        return 1.0 / (self.k * TEST_IMAGES)

    def describe(self) -> str:
        return "final-epoch test accuracy" if self.k == 1 else \
            f"test accuracy averaged over the last {self.k} evaluated epochs"


@dataclass(frozen=True)
class Omnibus:
    test: str
    statistic: float | None
    p: float | None
    reason: str | None
    secondary: Omnibus | None = None


@dataclass(frozen=True)
class Stratum:
    stratum: dict[str, Any]
    label: str
    paired: bool  # every setting has the same seeds (the omnibus test is then Friedman)
    n_seeds: int
    settings: list[list[Any]]  # each a setting (Results.factors' values)
    omnibus: Omnibus
    notes: list[str]


@dataclass(frozen=True)
class Group:
    stratum: dict[str, Any]
    dropout1: float | None
    dropout2: float | None
    n: int  # finite runs that enter the statistics
    n_diverged: int
    mean: float | None
    sd: float | None
    sd_ci95: Interval | None  # bootstrap (BCa where defined); the SD error bars of the figures
    ci95: Interval | None
    ci95_boot: Interval | None
    median: float | None
    iqr: Interval | None
    train_loss_mean: float | None
    train_acc_mean: float | None
    gap_mean: float | None
    gap_ci95: Interval | None
    status_counts: dict[str, int]
    textbook_check_passed: int
    n_excluded: int  # every run left out of the statistics, diverged ones included
    reason: str | None
    # The factors' values (`Results.factors`); dropout1/dropout2 repeat them in the d2l study
    # and are None under other factors.
    setting: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Analysed:
    """One cell of the multiverse: one endpoint under one test family, with its own Holm family
    (the stratum's comparisons under the same endpoint and test)."""

    endpoint: str
    test: str  # t | rank | trimmed
    verdict: str
    mean_diff: float | None  # the family's estimate: mean, Hodges-Lehmann or trimmed-mean gap
    p_adjusted: float | None
    tost_p_adjusted: float | None
    paired: bool
    n_pairs: int
    # The test's own interval for `mean_diff`: t interval (t), the distribution-free
    # Hodges-Lehmann interval from the exact signed-rank / Mann-Whitney law (rank), Yuen's
    # interval (trimmed). `tost_ci90` is the 90% one, inside +-margin iff the unadjusted TOST
    # passes (for ranks up to discreteness and ties). None where not computable.
    ci95: Interval | None = None
    tost_ci90: Interval | None = None


@dataclass(frozen=True)
class Comparison(Anytime):
    """One setting against the baseline in one stratum, under the declared primary analysis
    (endpoint, t test); `multiverse` holds every robustness analysis, the primary included."""

    stratum: dict[str, Any]
    dropout1: float | None
    dropout2: float | None
    baseline: list[Any]
    endpoint: str
    n: int
    n_setting: int
    n_baseline: int
    n_dropped: int
    paired: bool
    n_pairs: int  # seeds finite in both groups (0 when unpaired)
    mean_diff: float | None
    mean_diff_ci95: Interval | None
    test: str
    p: float | None
    p_adjusted: float | None
    rank_test: str
    rank_p: float | None
    rank_p_adjusted: float | None
    hedges_g: float | None
    prob_superiority: float | None
    tost_p: float | None
    tost_p_adjusted: float | None
    # The interval whose lying inside +-margin is the same decision as the TOST: the 90% interval
    # for the unadjusted TOST, and the wider `tost_ci_level` one for the Holm-adjusted verdict.
    tost_ci90: Interval | None
    tost_ci: Interval | None
    tost_ci_level: float | None
    verdict: str
    settled_by_construction: bool
    robust: bool | None  # None: too few analyses ran to tell
    disagreeing: list[str]  # "endpoint/test: verdict" of the analyses that differ from the primary
    multiverse: list[Analysed]
    sd_ratio: float | None
    sd_ratio_ci95: Interval | None
    brown_forsythe_p: float | None
    fligner_p: float | None
    variance_p_adjusted: float | None
    variance_verdict: str
    mde: float | None
    seeds_needed: int | None
    seeds_needed_margin: int | None
    seeds_needed_equivalence: int | None
    n_diverged_setting: int
    n_diverged_baseline: int
    divergence_p: float | None
    divergence_p_adjusted: float | None
    divergence_verdict: str
    reason: str | None
    setting: list[Any] = field(default_factory=list)  # as Group.setting; `baseline` likewise


@dataclass(frozen=True)
class AdaptiveDesign:
    """The adaptive design the comparisons were decided under (protocol `adaptive:`): seeds at
    the first look, per round and at most; the run budget; the stop rule; the t-mixture's
    precision; rounds and runs so far, and why the study stopped (settled | max_runs; None
    while rounds remain). Under it the multiverse's p-values and `robust` are descriptive."""

    start: int
    round: int
    max_seeds: int
    max_runs: int | None  # None: an own experiment's looks (`analyze --adaptive`), no budget
    stop: str
    mixture_precision: float
    rounds: int
    runs: int
    study_stop: str | None


# The overfitting regime the C6 protocol must reach at its smallest size (issue 13): (0, 0)'s final
# train accuracy at least this, and its final train - test gap at least this.
OVERFIT_TRAIN_ACC = 0.98
OVERFIT_GAP = 0.10


@dataclass(frozen=True)
class Regime:
    """How the baseline fits at one training-set size: final train accuracy (train mode,
    averaged over the last epoch), final test accuracy and their gap, means over seeds.

    The regime itself is decided on the medians over seeds: one seed whose last epoch spikes
    moves a mean of 8 seeds by several points (seen: 99.46% on one CPU, 96.83% on another for
    the same 1,000-image cell), and must not move the claim from one category to another."""

    n: int
    train_acc: float | None
    test_acc: float | None
    gap: float | None
    gap_ci95: Interval | None  # t interval over seeds
    overfits: bool  # median_train_acc >= OVERFIT_TRAIN_ACC and median_gap >= OVERFIT_GAP
    median_train_acc: float | None = None
    median_gap: float | None = None
    seeds_overfitting: int = 0  # seeds whose own train accuracy and gap pass both thresholds


@dataclass(frozen=True)
class DosePoint:
    """One setting at one size: the dose-response curve's point (the primary endpoint) and its
    comparison with the baseline (None for the baseline itself)."""

    dropout1: float
    dropout2: float
    mean: float | None
    ci95: Interval | None
    train_acc_mean: float | None  # train mode: dropout on, so it shows how much fit is allowed
    mean_diff: float | None
    mean_diff_ci95: Interval | None
    verdict: str | None


@dataclass(frozen=True)
class SizeEffect:
    """One training-set size: the baseline's regime, the best setting's gain and the curve."""

    train_images: int
    stratum: dict[str, Any]  # the full stratum of this size (train_images included)
    regime: Regime
    best: list[float] | None  # the chosen setting (None: no comparison could be made)
    chosen_by: str  # how `best` was chosen
    gain: float | None  # best - baseline, primary endpoint, mean over paired seeds
    gain_ci95: Interval | None
    p_adjusted: float | None  # Holm over the rates of this size (the stratum's family)
    verdict: str | None
    robust: bool | None
    dose: list[DosePoint]
    peak: list[float] | None  # the setting with the highest mean on the curve
    smallest_rate: str  # helps | hurts | nothing | unclear: the smallest non-zero rate vs baseline
    largest_constrains: bool | None  # the largest rate fits less (train) and tests below the peak


@dataclass(frozen=True)
class Interaction:
    """C6 as an interaction: does the best gain over the baseline grow with how much the
    baseline overfits? One per stratum of the other columns, across its training-set sizes."""

    stratum: dict[str, Any]  # the stratum columns other than train_images
    label: str
    baseline: list[float]
    endpoint: str
    sizes: list[SizeEffect]  # smallest first
    trend: Slope  # seed-level regression of the gain on the baseline's gap, across sizes
    trend_per_seed: Slope  # the same slope fitted within each seed, then a t interval
    n_points: int
    holds: str  # supported | partly supported | contradicted | not shown | not tested
    holds_reason: str
    notes: list[str]


@dataclass(frozen=True)
class CurvePoint:
    """One epoch of a learning curve: the mean across seeds and its 95% t interval."""

    epoch: int
    n: int  # runs with a finite value at this epoch
    mean: float
    ci95: Interval | None  # None with one run (the figure draws a zero-width band)


@dataclass(frozen=True)
class Curve:
    """A setting's per-epoch curve of one metric in one stratum: the learning-curve band the
    figures draw. Every first run with a finite value at an epoch enters that epoch, so a run
    that diverged late still shows where it was before."""

    stratum: dict[str, Any]
    dropout1: float
    dropout2: float
    metric: str  # test_acc (eval mode, after each evaluated epoch) | train_loss
    points: list[CurvePoint]
    setting: list[Any] = field(default_factory=list)  # as Group.setting


@dataclass(frozen=True)
class Results:
    experiment: str
    baseline: list[Any]
    alpha: float
    equivalence_margin: float
    power: float
    bootstrap: int
    seed: int
    metric: str
    endpoint: str  # the declared primary endpoint
    robustness_endpoints: list[str]  # those that ran
    robustness_tests: list[str]
    endpoints_left_out: list[str]  # "last:5 (only 3 epochs run)"
    stratified_by: list[str]
    n_runs: int
    n_replicate_runs_ignored: int
    strata: list[Stratum]
    groups: list[Group]
    comparisons: list[Comparison]
    # Declared contrasts between two settings (`analysis.contrasts`); `baseline` holds the
    # reference setting. A Holm family of their own in each stratum.
    contrasts: list[Comparison] = field(default_factory=list)
    diagnostics: Diagnostics | None = None  # None: not analysed (written as {})
    curves: list[Curve] = field(default_factory=list)
    # Claim C7: None when no run made stochastic passes after training.
    inference: Inference | None = None
    # C6: the gain of dropout against the training-set size, where train_images varies.
    interactions: list[Interaction] = field(default_factory=list)
    # The names analysed (`table.Columns`): a setting is the tuple of the `factors`' values
    # (`baseline`, every record's `setting`), seeds are the param `seed_param`, the outcome is
    # `metric`; with `lower_is_better` a negative mean_diff is the better direction.
    factors: list[str] = field(default_factory=lambda: ["dropout1", "dropout2"])
    seed_param: str = "seed"
    lower_is_better: bool = False
    # None: a fixed design (every comparison at seeds.count seeds).
    adaptive: AdaptiveDesign | None = None

    def to_json(self) -> dict[str, Any]:
        """The results.json form: plain JSON types, no NaN. `variance_ratio` (and its interval)
        repeat `sd_ratio` under its old name for one release: it always was an SD ratio."""
        out = jsonable(dataclasses.asdict(self))
        out["diagnostics"] = out["diagnostics"] or {}
        for c in out["comparisons"] + out["contrasts"]:
            c["variance_ratio"], c["variance_ratio_ci95"] = c["sd_ratio"], c["sd_ratio_ci95"]
        return out


# --- C7: dropout left on at inference (`study.inference`, `study.mc_analysis`) ------------------

# Equal-width confidence bins of the expected calibration error each run records.
ECE_BINS = 15


@dataclass(frozen=True)
class Share:
    """A per-run share (of test images) over the seeds of one setting: mean and Student-t 95%
    CI with seeds as units."""

    mean: float | None
    ci95: Interval | None


@dataclass(frozen=True)
class Paired(Anytime):
    """MC-averaged minus eval-mode predictions on one metric, paired within each run (seeds as
    units), paired t test Holm-adjusted over the settings of the stratum, per metric."""

    metric: str  # accuracy | nll | ece
    n_pairs: int
    mean_diff: float | None
    ci95: Interval | None
    p: float | None
    p_adjusted: float | None
    tost_p_adjusted: float | None  # accuracy only: TOST at the protocol's equivalence margin
    # accuracy: one of VERDICTS; nll, ece: different, not_shown_different or identical (no
    # margin in their own units, so never equivalent; identical only where every run agrees)
    verdict: str
    reason: str | None


@dataclass(frozen=True)
class McSetting:
    """One setting's stochastic passes in one stratum."""

    stratum: dict[str, Any]
    dropout1: float
    dropout2: float
    passes: int
    n: int  # runs with passes
    flip_rate: Share
    unstable_share: Share
    eval_acc_mean: float | None
    mc_acc_mean: float | None
    accuracy: Paired
    nll: Paired
    ece: Paired
    # A test image that flipped most often in one run of the setting (the lowest seed with one).
    example_image: int | None
    example_seed: int | None


@dataclass(frozen=True)
class McTrend:
    """How the flip rate follows the dropout rate across the runs of one stratum: Spearman's
    rank correlation (scipy.stats.spearmanr) of each run's flip rate with its setting's mean rate
    (dropout1 + dropout2) / 2. Settings with a rate of 1 are left out: that layer outputs zeros,
    so no randomness is left to flip."""

    stratum: dict[str, Any]
    n_runs: int
    settings: list[list[float]]
    left_out: list[list[float]]
    rho: float | None
    p: float | None
    reason: str | None


@dataclass(frozen=True)
class Inference:
    """Claim C7, from runs that made `passes` stochastic test-set passes after training."""

    ece_bins: int
    equivalence_margin: float
    settings: list[McSetting]
    trends: list[McTrend]
