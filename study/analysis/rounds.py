"""Adaptive studies in rounds: which comparisons are still open, and which seeds come next.

    python -m study plan protocols/d2l-dropout.yaml --set "adaptive={round: 5, max_seeds: 60}"

Nothing here is state: `schedule(protocol, values)` replays the rounds from the protocol and the
primary-endpoint values of the FINISHED runs alone. Round 0 is every setting at `seeds.count`
seeds. Once every cell planned so far has finished, each comparison (every setting against the
baseline, and each declared contrast, per stratum) is decided at its latest look by
`sequential.decide`; the next round gives `round` more seeds to both settings of every open
comparison (so the baseline gets them wherever an open comparison needs its pairs). A killed
driver, a rerun, another backend or the batched engine therefore plan the same rounds and the
same cells. A comparison's decision reads only the seeds up to its stopping look, so seeds added
later for another comparison never reopen it.

The study stops when no comparison is open, or before a round that would take it past
`adaptive.max_runs` runs (replicates and every stratum counted; round 0 always runs): the
comparisons still open then stop with reason `max_runs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from study.analysis import sequential as sq
from study.analysis.settings import Setting, setting_of
from study.protocol.plan import Cell, expand
from study.protocol.schema import Adaptive, Protocol
from study.results import AdaptiveDesign, Inference, Look, Results
from study.results.diagnostics import Diagnostics

T = TypeVar("T")

ROUND_TAG = "study.round"
# read(cell keys, K) -> primary endpoint per FINISHED cell (mean of the last K evaluations);
# read(cell keys, 1, metric) -> that metric's final value (`tracking.endpoint_values`).
Read = Callable[..., Mapping[str, float]]


def design_for(protocol: Protocol) -> sq.Design:
    """The sequential design of a protocol: its alpha and margin, seeds.count as the first look,
    and its adaptive block (the defaults of `Adaptive` for a protocol without one)."""
    block = protocol.adaptive or Adaptive()
    count = protocol.seeds.count if protocol.seeds.count is not None else len(protocol.seeds.values())
    return sq.Design(alpha=protocol.analysis.alpha, margin=protocol.analysis.equivalence_margin,
                     start=count, round=block.round, max_seeds=max(block.max_seeds, count),
                     stop=block.stop)


def endpoint_k(protocol: Protocol) -> int:
    """K of the primary endpoint (1 for `final`, K for `last:K`): what the store reads."""
    text = protocol.analysis.endpoint
    return 1 if text == "final" else int(text.removeprefix("last:"))


def universe(protocol: Protocol) -> list[Cell]:
    """Every cell an adaptive protocol may plan: each setting at max_seeds seeds."""
    design = design_for(protocol)
    seeds = dataclasses.replace(protocol.seeds, count=design.max_seeds)
    return expand(dataclasses.replace(protocol, seeds=seeds))


# ----------------------------------------------------------------------------- comparisons


KINDS = ("baseline", "contrasts", "implementations", "mc")


@dataclass(frozen=True)
class Comparison:
    """One adaptive comparison in one stratum (cells that differ only in setting, seed and
    replicate). `labels`: the stratum as the cells name it. The gap per seed is, by `kind`:

    - baseline, contrasts: `setting` - `reference`, both in `stratum`;
    - implementations: `setting` in `stratum` (a hand-written dropout) - the same setting in
      `reference_stratum` (the same cells with torch's nn.Dropout);
    - mc: MC-averaged - eval-mode test accuracy of each run of `setting` (reference = setting)."""

    stratum: str
    labels: tuple[tuple[str, Any], ...]
    setting: Setting
    reference: Setting
    kind: str = "baseline"
    reference_stratum: str | None = None  # implementations only: torch's stratum
    stratum_sizes: int = 1  # training-set sizes in the protocol: named only when several

    @property
    def contrast(self) -> bool:
        return self.kind == "contrasts"

    def arms(self) -> tuple[tuple[str, Setting], ...]:
        """(stratum, setting) of each side whose seeds the comparison pairs (one for mc)."""
        if self.kind == "mc":
            return ((self.stratum, self.setting),)
        return ((self.stratum, self.setting),
                (self.reference_stratum or self.stratum, self.reference))

    @property
    def name(self) -> str:
        labels = dict(self.labels)
        size = labels.get("train_images")
        where = " ".join(str(labels[k]) for k in ("device", "determinism", "implementation")
                         if k in labels and not (k == "implementation" and self.kind ==
                                                 "implementations"))
        where += f", n={size}" if size is not None and self.stratum_sizes > 1 else ""
        if self.kind == "implementations":
            return f"{labels['implementation']} vs torch at {_text(self.setting)} ({where})"
        if self.kind == "mc":
            return f"MC vs eval at {_text(self.setting)} ({where})"
        return f"{_text(self.setting)} vs {_text(self.reference)} ({where})"

    def matches(self, stratum: Mapping[str, Any], setting: Setting, reference: Setting) -> bool:
        """Whether a results comparison (its stratum dict and settings) is this one: a results
        `Comparison` or contrast (setting, baseline), an `ImplementationRecord` (its stratum
        with its implementation, setting twice) or a `McSetting` (setting twice)."""
        if (setting_of(*setting), setting_of(*reference)) != (self.setting, self.reference):
            return False
        return all(str(stratum.get(k)) == str(v) for k, v in self.labels)


def _text(s: Setting) -> str:
    return f"({s[0]:g}, {s[1]:g})"


def stratum_of(cell: Cell) -> str:
    """The cell's stratum: its key with setting, seed and replicate taken out."""
    return dataclasses.replace(cell, dropout1=0.0, dropout2=0.0, seed=0, replicate=0).key


def _labels(cell: Cell) -> tuple[tuple[str, Any], ...]:
    keep = ("device", "determinism", "implementation", "execution", "randomness", "mask_rng",
            "vary", "train_images")
    labels = {k: v for k, v in cell.labels().items() if k in keep}
    if cell.config.threads is not None:
        labels["threads"] = cell.config.threads
    return tuple(labels.items())


def comparisons_of(protocol: Protocol, cells: list[Cell],
                   kinds: tuple[str, ...] | None = None) -> list[Comparison]:
    """The comparisons of `kinds` (default: those that drive the protocol's rounds,
    `Protocol.driving_kinds`) in every stratum of `cells`."""
    kinds = protocol.driving_kinds() if kinds is None else kinds
    firsts: dict[str, Cell] = {}
    for cell in cells:
        firsts.setdefault(stratum_of(cell), cell)
    base = setting_of(*protocol.baseline)
    settings = [setting_of(*s) for s in protocol.dropout]
    pairs = []
    if "baseline" in kinds:
        pairs += [(s, base, "baseline") for s in settings if s != base]
    if "contrasts" in kinds:
        pairs += [(setting_of(*a), setting_of(*b), "contrasts")
                  for a, b in protocol.analysis.contrasts]
    sizes = len(protocol.data.sizes())
    out = [Comparison(sid, _labels(cell), s, ref, kind, None, sizes)
           for sid, cell in firsts.items() for s, ref, kind in pairs]
    if "implementations" in kinds:
        out += [Comparison(sid, _labels(cell), s, s, "implementations",
                           stratum_of(dataclasses.replace(cell, implementation="torch")), sizes)
                for sid, cell in firsts.items() if cell.implementation != "torch"
                for s in settings]
    if "mc" in kinds:
        out += [Comparison(sid, _labels(cell), s, s, "mc", None, sizes)
                for sid, cell in firsts.items() for s in settings if passes_differ(s)]
    return out


def passes_differ(setting: Setting) -> bool:
    """Whether MC passes can differ from eval mode at `setting`, so that seeds can settle the
    gap: not at (0, 0), whose passes are eval mode itself, nor where a rate of 1 zeroes a layer
    in every pass (as the flip-rate trend leaves it out, study.analysis.inference.trend). Those
    settings' MC rows stay fixed-n and descriptive; they add no seeds."""
    return 0.0 < max(setting) < 1.0


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Round:
    index: int
    cells: tuple[Cell, ...]  # the cells this round adds
    open: tuple[str, ...]  # the comparisons still open that asked for it (none for round 0)


@dataclass(frozen=True)
class Schedule:
    """The rounds planned so far and where the study stands.

    rounds: every round planned, the last one possibly unfinished; todo: its cells not yet
    FINISHED (empty once the study is over); decisions: each comparison at the latest complete
    look (empty before round 0 finishes); stop: None while rounds remain, "settled" when no
    comparison is open, "max_runs" when the budget stopped the study."""

    design: sq.Design
    rounds: tuple[Round, ...]
    todo: tuple[Cell, ...]
    decisions: tuple[tuple[Comparison, sq.Decision], ...]
    stop: str | None

    @property
    def cells(self) -> list[Cell]:
        return [c for r in self.rounds for c in r.cells]

    def round_of(self) -> dict[str, int]:
        """Cell key -> the round that added it (the value of its `study.round` tag)."""
        return {c.key: r.index for r in self.rounds for c in r.cells}

    @property
    def open(self) -> list[Comparison]:
        return [c for c, d in self.decisions if d.open]


@dataclass(frozen=True)
class Slot:
    """A cell with what scheduling looks up, computed once (a cell key hashes its config)."""

    cell: Cell
    key: str
    stratum: str
    setting: Setting
    index: int  # seed - seeds.start


def schedule(protocol: Protocol, values: Mapping[str, float],
             absent_devices: frozenset[str] = frozenset(),
             mc_gaps: Mapping[str, float] | None = None) -> Schedule:
    """protocol: adaptive; values: cell key -> primary endpoint of its FINISHED run (NaN for a
    diverged run); cells on `absent_devices` are neither planned nor waited for; mc_gaps: cell
    key -> MC-averaged minus eval-mode test accuracy of its run (`mc` comparisons; a FINISHED
    run missing here counts as a diverged pair)."""
    design = design_for(protocol)
    budget = (protocol.adaptive or Adaptive()).max_runs
    cells = [c for c in universe(protocol) if c.device not in absent_devices]
    slots = [Slot(c, c.key, stratum_of(c), setting_of(c.dropout1, c.dropout2),
                  c.seed - protocol.seeds.start) for c in cells]
    comparisons = comparisons_of(protocol, cells)
    firsts = {(s.stratum, s.setting, s.index): s.key for s in slots if s.cell.replicate == 0}
    seeds = {(s.stratum, s.setting): design.start for s in slots}
    planned = [s for s in slots if s.index < design.start]
    rounds = [Round(0, tuple(s.cell for s in planned), ())]
    decisions: list[tuple[Comparison, sq.Decision]] = []
    while True:
        todo = tuple(s.cell for s in planned if s.key not in values)
        if todo:
            return Schedule(design, tuple(rounds), todo, tuple(decisions), None)
        decisions = [(k, sq.decide(_gaps(k, seeds, firsts, values, mc_gaps or {}), design))
                     for k in comparisons]
        still = [(k, d) for k, d in decisions if d.open]
        if not still:
            return _final(protocol, design, rounds, decisions, "settled")
        grown = _grow(seeds, still, design)
        added = [s for s in slots
                 if seeds[(s.stratum, s.setting)] <= s.index < grown[(s.stratum, s.setting)]]
        if len(planned) + len(added) > budget:
            decisions = [(k, sq.stop_for_budget(d)) for k, d in decisions]
            return _final(protocol, design, rounds, decisions, "max_runs")
        seeds, planned = grown, planned + added
        rounds.append(Round(len(rounds), tuple(s.cell for s in added),
                            tuple(k.name for k, _ in still)))


def _gaps(k: Comparison, seeds: dict, firsts: dict, values: Mapping[str, float],
          mc_gaps: Mapping[str, float]) -> np.ndarray:
    """The comparison's gaps by seed, over the seeds its arms all have (replicate 0): the MC
    gap of each run for `mc`, else the paired difference of the two arms' endpoints."""
    n = min(seeds[arm] for arm in k.arms())
    keys = [[firsts[(*arm, i)] for i in range(n)] for arm in k.arms()]
    if k.kind == "mc":
        return np.array([mc_gaps.get(key, math.nan) for key in keys[0]], dtype=float)
    return np.array([values[a] - values[b] for a, b in zip(*keys)], dtype=float)


def _grow(seeds: dict, still: list[tuple[Comparison, sq.Decision]], design: sq.Design) -> dict:
    """Seeds per (stratum, setting) after one more round for every open comparison."""
    out = dict(seeds)
    for k, d in still:
        target = min(d.stopped_at + design.round, design.max_seeds)
        for arm in k.arms():
            out[arm] = max(out[arm], target)
    return out


def _final(protocol: Protocol, design: sq.Design, rounds: list[Round],
           decisions: list[tuple[Comparison, sq.Decision]], stop: str) -> Schedule:
    """The finished schedule, each decision with its fixed-design seed count (computed once
    here: it integrates the noncentral t, and the replay above needs no power)."""
    power = protocol.analysis.power
    done = [(k, dataclasses.replace(d, seeds_fixed_equivalent=_fixed(d, design, power)))
            for k, d in decisions]
    return Schedule(design, tuple(rounds), (), tuple(done), stop)


def _fixed(d: sq.Decision, design: sq.Design, power: float) -> int | None:
    if d.mean_diff is None or d.sd is None or not math.isfinite(d.sd):
        return None
    return sq.fixed_seeds(d.verdict, d.mean_diff, d.sd, design, power)


# ----------------------------------------------------------------------------- results


def from_store(protocol: Protocol, read: Read,
               absent_devices: frozenset[str] = frozenset()) -> Schedule:
    """The schedule of `protocol` from a store: read(cell keys, K[, metric]) -> values (bind
    `tracking.endpoint_values` to a client and experiment); the one place callers plan from.
    `mc` comparisons read each run's final `test_acc` and `mc_test_acc` besides the endpoint."""
    keys = {c.key for c in universe(protocol)}
    values = read(keys, endpoint_k(protocol))
    mc = None
    if "mc" in protocol.driving_kinds():
        final = values if endpoint_k(protocol) == 1 else read(keys, 1)
        averaged = read(keys, 1, "mc_test_acc")
        mc = {key: v - final[key] for key, v in averaged.items() if key in final}
    return schedule(protocol, values, absent_devices, mc)


def planned_cells(protocol: Protocol) -> list[Cell]:
    """The cells whose runs analysis reads: an adaptive protocol's every possible round, a
    fixed protocol's plan."""
    return universe(protocol) if protocol.adaptive is not None else expand(protocol)


def with_decisions(results: Results, protocol: Protocol, read: Read,
                   absent_devices: frozenset[str] = frozenset()) -> Results:
    """`results` of an adaptive protocol annotated from the schedule the store gives (see
    `from_store`, `annotate`); a fixed protocol's results unchanged."""
    if protocol.adaptive is None:
        return results
    return annotate(results, from_store(protocol, read, absent_devices), protocol)


def annotate(results: Results, plan: Schedule, protocol: Protocol) -> Results:
    """Results with each adaptive comparison's decision: `verdict` becomes the anytime-valid
    one and the cs95 / p_anytime / stopped_at / stop_reason / seeds_fixed_equivalent fields are
    filled; `adaptive` records the design. Comparisons the schedule does not decide (another
    endpoint's strata, runs of no planned stratum) are left as they are."""
    block = protocol.adaptive or Adaptive()
    design = AdaptiveDesign(start=plan.design.start, round=plan.design.round,
                            max_seeds=plan.design.max_seeds, max_runs=block.max_runs,
                            stop=plan.design.stop,
                            mixture_precision=plan.design.mixture_precision,
                            rounds=len(plan.rounds), runs=len(plan.cells), study_stop=plan.stop)

    def base(c, kind: str):  # a results Comparison: its setting against its baseline
        return _decided(c, plan, kind, c.stratum, (c.dropout1, c.dropout2), tuple(c.baseline))

    return dataclasses.replace(results, adaptive=design,
                               comparisons=[base(c, "baseline") for c in results.comparisons],
                               contrasts=[base(c, "contrasts") for c in results.contrasts],
                               diagnostics=_implementations(results.diagnostics, plan),
                               inference=_mc(results.inference, plan))


def _implementations(diagnostics: Diagnostics | None, plan: Schedule) -> Diagnostics | None:
    """The C4 section with each hand-written dropout's decision against torch."""
    if diagnostics is None or not diagnostics.implementations.records:
        return diagnostics
    section = diagnostics.implementations
    records = [_decided(r, plan, "implementations", {**r.stratum, "implementation":
                                                     r.implementation},
                        (r.dropout1, r.dropout2), (r.dropout1, r.dropout2))
               for r in section.records]
    return dataclasses.replace(diagnostics,
                               implementations=dataclasses.replace(section, records=records))


def _mc(inference: Inference | None, plan: Schedule) -> Inference | None:
    """C7 with each setting's MC-minus-eval accuracy decision (NLL and ECE stay fixed-n)."""
    if inference is None:
        return None
    settings = [dataclasses.replace(m, accuracy=_decided(m.accuracy, plan, "mc", m.stratum,
                                                        (m.dropout1, m.dropout2),
                                                        (m.dropout1, m.dropout2)))
                for m in inference.settings]
    return dataclasses.replace(inference, settings=settings)


def _decided(record: T, plan: Schedule, kind: str, stratum: Mapping[str, Any],
             setting: Setting, reference: Setting) -> T:
    """`record` (a results Comparison, ImplementationRecord or Paired) with the decision of the
    one scheduled comparison of `kind` it is; unchanged when the schedule decides none."""
    found = [d for k, d in plan.decisions
             if k.kind == kind and k.matches(stratum, setting, reference)]
    return with_decision(record, found[0]) if len(found) == 1 else record


def with_decision(record: T, d: sq.Decision) -> T:
    """A results record (Comparison, ImplementationRecord or Paired) decided by `d`: the
    anytime-valid verdict and its fields (a protocol's rounds and an own experiment's looks,
    study.analysis.looks, both write them here)."""
    return dataclasses.replace(record, verdict=d.verdict, cs95=d.cs95, p_anytime=d.p_anytime,
                               stopped_at=d.stopped_at, stop_reason=d.stop_reason,
                               seeds_fixed_equivalent=d.seeds_fixed_equivalent,
                               cs_looks=[Look.of(*x) for x in d.looks])


# ----------------------------------------------------------------------------- what is printed


def round_line(r: Round, todo: int) -> str:
    """The line `study run` prints as a round starts."""
    if r.index == 0:
        return f"round 0: every setting at its first seeds, {todo} runs to add"
    names = ", ".join(r.open)
    return f"round {r.index}: {len(r.open)} comparison(s) open ({names}), {todo} runs to add"


def stop_line(s: Schedule) -> str:
    """Where an adaptive study stands, in one line (`study run`'s last, `study plan`'s)."""
    if s.stop is None:
        return (f"{len(s.rounds) - 1} round(s) after round 0 planned; round {s.rounds[-1].index} "
                f"has {len(s.todo)} runs to run")
    by_reason: dict[str, int] = {}
    for _, d in s.decisions:
        by_reason[d.stop_reason or "open"] = by_reason.get(d.stop_reason or "open", 0) + 1
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items()))
    why = "every comparison stopped" if s.stop == "settled" else "run budget (max_runs) reached"
    return (f"adaptive study done after {len(s.rounds)} round(s), {len(s.cells)} runs: {why} "
            f"({reasons})")


def plan_lines(s: Schedule) -> list[str]:
    """`study plan`'s view: the rounds done, the one to run next, and each comparison."""
    lines = []
    for r in s.rounds:
        state = "to run" if r is s.rounds[-1] and s.todo else "done"
        left = f", {len(s.todo)} not finished" if state == "to run" else ""
        opened = f"; open: {', '.join(r.open)}" if r.open else ""
        lines.append(f"round {r.index}: {len(r.cells)} runs ({state}{left}){opened}")
    for k, d in s.decisions:
        cs = "unbounded" if d.cs95 is None else f"[{d.cs95[0] * 100:+.2f}, {d.cs95[1] * 100:+.2f}] pp"
        status = f"stopped ({d.stop_reason})" if d.stop_reason else "open"
        lines.append(f"  {k.name}: {d.verdict} at {d.stopped_at} seeds, CS {cs}, "
                     f"p_anytime {d.p_anytime:.3g}, {status}")
    lines.append(stop_line(s))
    return lines
