"""One bottom-line sentence per claim, derived from the results: what the data say about the
claim itself, before the numbers. "C1 not supported: (0, 0) was never shown better than
(0.2, 0.5); it was worse by -1.84 pp (95% CS [-3.61, -0.08])."

The status words are: supported, partly supported, not supported, not settled, not tested
(C6 keeps those of its own analysis, `Interaction.holds`; strata that disagree read "mixed
across strata", each with its own). "Not settled" is what a comparison neither shown different nor equivalent gives: it
reads "not shown different", never "no difference". An adaptive comparison shows its 95%
confidence sequence (`wording.gap_interval`), never a fixed-n interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from study.report.context import Inputs, find_comparison, find_group, in_stratum
from study.report.diagnostics import applicable, diag_section
from study.report.inference import accuracy_records
from study.report.wording import (count, fmt_ci_pct, fmt_ci_pp, fmt_pct, fmt_pp, fmt_setting,
                                  gap_interval, interval_name, margin_text, stops_clause,
                                  verdict_counts, verdict_word)
from study.results import Comparison, Group, Inference, McSetting, Results

SUPPORTED, PARTLY, NOT_SUPPORTED, NOT_SETTLED, NOT_TESTED = (
    "supported", "partly supported", "not supported", "not settled", "not tested")


@dataclass(frozen=True)
class BottomLine:
    status: str  # one of the five words above
    because: str  # the reason, from the numbers

    def sentence(self, key: str) -> str:
        return f"{key} {self.status}: {self.because}."


def gap_words(c: Comparison) -> str:
    """'−1.84 pp (95% CS [−3.61, −0.08])': the gap with the interval the verdict rests on."""
    return f"{fmt_pp(c.mean_diff)} ({interval_name(c)} {fmt_ci_pp(gap_interval(c))})"


def _below(c: Comparison) -> bool:
    return (c.mean_diff or 0.0) < 0


def joined(lines: Sequence[tuple[str, BottomLine]]) -> BottomLine | None:
    """One line from one per stratum (labelled when several): a shared status stays the status,
    different ones read "mixed" with each stratum's own."""
    if not lines:
        return None
    if len(lines) == 1:
        return lines[0][1]
    statuses = list(dict.fromkeys(b.status for _, b in lines))
    if len(statuses) == 1:
        return BottomLine(statuses[0], "; ".join(f"in {label}, {b.because}" for label, b in lines))
    return BottomLine("mixed across strata",
                      "; ".join(f"in {label}, {b.status} ({b.because})" for label, b in lines))


# --- C1 ------------------------------------------------------------------------------------


def no_dropout(inputs: Inputs) -> BottomLine:
    r = inputs.results
    lines = []
    for s in r.strata:
        if tuple(r.baseline) == (0.0, 0.0):
            lines.append((s.label, _no_dropout_as_baseline(in_stratum(r.comparisons, s.stratum),
                                                                r)))
        elif (c := find_comparison(r, s.stratum, 0.0, 0.0)) is not None:
            lines.append((s.label, no_dropout_against(c, r)))
    return joined(lines) or BottomLine(NOT_TESTED, "(0, 0) was not run")


def no_dropout_against(c: Comparison, r: Results) -> BottomLine:
    """(0, 0) - baseline: the lesson says (0, 0) is better."""
    b, m = fmt_setting(r.baseline), margin_text(r)
    if c.verdict == "different" and _below(c):
        return BottomLine(NOT_SUPPORTED, f"(0, 0) was never shown better than {b}; it was "
                                         f"worse by {gap_words(c)}")
    if c.verdict == "different":
        return BottomLine(PARTLY, f"(0, 0) was shown better than {b} by {gap_words(c)}; against "
                                  f"the other dropout settings only the means were compared")
    if c.verdict == "negligible":
        return BottomLine(NOT_SUPPORTED, f"(0, 0) and {b} differ by a real gap shown inside "
                                         f"{m}, {gap_words(c)}")
    if c.verdict == "equivalent":
        return BottomLine(NOT_SUPPORTED, f"(0, 0) and {b} are equivalent within {m} "
                                         f"({gap_words(c)})")
    return BottomLine(NOT_SETTLED, f"(0, 0) was not shown different from {b} nor equivalent "
                                   f"within {m}: {gap_words(c)}")


def _no_dropout_as_baseline(comps: list[Comparison], r: Results) -> BottomLine:
    """Each dropout setting - (0, 0): below 0 and different means (0, 0) is better."""
    beaten = [c for c in comps if c.verdict == "different" and _below(c)]
    others = [c for c in comps if c not in beaten]
    text = f"(0, 0) was shown better than {len(beaten)} of {count(len(comps), 'dropout setting')}"
    if not others:
        return BottomLine(SUPPORTED, text)
    rest = "; ".join(f"{fmt_setting(c)} {gap_words(c)}, "
                     + ("shown better than (0, 0)" if c.verdict == "different"
                        else verdict_word(c.verdict, r.equivalence_margin))
                     for c in others)
    settled = any(c.verdict != "inconclusive" for c in others)
    return BottomLine(NOT_SUPPORTED if settled else NOT_SETTLED, f"{text}; against {rest}")


# --- C2, C3: a setting that "errors" or "has problems" --------------------------------------


def degenerate(setting: tuple[float, float]) -> Callable[[Inputs], BottomLine]:
    def line(inputs: Inputs) -> BottomLine:
        r = inputs.results
        lines = [(s.label, degenerate_in(g, find_comparison(r, s.stratum, *setting), r))
                 for s in r.strata if (g := find_group(r, s.stratum, *setting)) is not None]
        return joined(lines) or BottomLine(NOT_TESTED, f"{fmt_setting(setting)} was not run")
    return line


def degenerate_in(g: Group, c: Comparison | None, r: Results) -> BottomLine:
    """The lesson saw the textbook's end-of-training assertion fail: count those runs, and read
    the comparison with the baseline where there is one."""
    n = g.n + g.n_excluded
    failed = n - g.textbook_check_passed
    text = (f"the textbook's end-of-training assertion fails in {failed} of "
            f"{count(n, 'run')} of {fmt_setting(g)}")
    if c is not None:
        text += f"; against {fmt_setting(r.baseline)} the gap is {gap_words(c)}, " + \
            verdict_word(c.verdict, r.equivalence_margin)
    worse = c is not None and c.verdict == "different" and _below(c)
    fine = c is not None and (c.verdict in ("equivalent", "negligible")
                              or (c.verdict == "different" and not _below(c)))
    if failed == n or (failed and worse):
        return BottomLine(SUPPORTED, text)
    if failed or worse:
        return BottomLine(PARTLY, text)
    return BottomLine(NOT_SUPPORTED if fine or c is None else NOT_SETTLED, text)


# --- C3': more dropout in the first layer is what hurts ---------------------------------------


def first_layer(a: tuple[float, float], b: tuple[float, float]) -> Callable[[Inputs], BottomLine]:
    def line(inputs: Inputs) -> BottomLine:
        r = inputs.results
        labels = {str(s.stratum): s.label for s in r.strata}
        lines = [(labels[str(c.stratum)], first_layer_of(c, r)) for c in r.contrasts
                 if (c.dropout1, c.dropout2) == a and tuple(c.baseline) == b]
        return joined(lines) or BottomLine(NOT_TESTED, f"the contrast {fmt_setting(a)} against "
                                                       f"{fmt_setting(b)} was not declared")
    return line


def first_layer_of(c: Comparison, r: Results) -> BottomLine:
    a, b, m = fmt_setting(c), fmt_setting(c.baseline), margin_text(r)
    if c.verdict == "different" and _below(c):
        return BottomLine(SUPPORTED, f"{a} was shown worse than {b} by {gap_words(c)}")
    if c.verdict == "different":
        return BottomLine(NOT_SUPPORTED, f"{a} was shown better than {b}, the opposite, by "
                                         f"{gap_words(c)}")
    if c.verdict in ("equivalent", "negligible"):
        return BottomLine(NOT_SUPPORTED, f"{a} and {b} differ by at most the margin {m}: "
                                         f"{gap_words(c)}, {verdict_word(c.verdict, r.equivalence_margin)}")
    return BottomLine(NOT_SETTLED, f"{a} was not shown different from {b} nor equivalent "
                                   f"within {m}: {gap_words(c)}")


# --- C4: the two implementations perform the same --------------------------------------------


def implementations(inputs: Inputs) -> BottomLine:
    r = inputs.results
    section = diag_section(r, "implementations")
    if not applicable(section) or not section.records:
        impls = {str(s.stratum.get("implementation")) for s in r.strata}
        why = ("no paired test between the implementations was made (the table shows them side "
               "by side)" if len(impls) > 1 else "only one dropout implementation was run")
        return BottomLine(NOT_TESTED, why)
    recs = section.records
    m = r.equivalence_margin
    lines = []
    for impl in sorted({x.implementation for x in recs}):
        mine = [x for x in recs if x.implementation == impl]
        text = f"{impl} against torch, {verdict_counts(mine, m)}" + \
            stops_clause([(fmt_setting(x), x) for x in mine])
        if all(x.verdict in ("equivalent", "negligible") for x in mine):
            lines.append((impl, BottomLine(SUPPORTED, text)))
        elif any(x.verdict == "different" for x in mine):
            lines.append((impl, BottomLine(NOT_SUPPORTED, text)))
        else:
            lines.append((impl, BottomLine(NOT_SETTLED, text)))
    statuses = {b.status for _, b in lines}
    status = statuses.pop() if len(statuses) == 1 else PARTLY
    return BottomLine(status, "; ".join(b.because for _, b in lines))


# --- C5: a fixed seed makes training repeatable ----------------------------------------------


def repeatable(inputs: Inputs) -> BottomLine:
    r = inputs.results
    section = diag_section(r, "replicates")
    if not applicable(section) or not section.records:
        return BottomLine(NOT_TESTED, "no cell was run twice (no replicates)")
    by_device: dict[str, list[int]] = {}
    for x in section.records:
        tally = by_device.setdefault(str(x.stratum.get("device", "cpu")), [0, 0])
        tally[0] += x.n_identical
        tally[1] += x.n_hash_compared
    parts = [f"{same} of {n} replicates on {device} gave bit-identical weights"
             for device, (same, n) in sorted(by_device.items())]
    cpu = by_device.get("cpu")
    if "cuda" not in by_device:
        parts.append("the cuDNN half was not measured (no CUDA runs)")
    if not cpu or not cpu[1]:
        status = NOT_TESTED
    elif cpu[0] == cpu[1]:
        status = SUPPORTED if "cuda" in by_device else PARTLY
    else:
        status = NOT_SUPPORTED
    return BottomLine(status, "; ".join(parts))


# --- C6: dropout pays off only once the model overfits ---------------------------------------


def overfitting(inputs: Inputs) -> BottomLine:
    found = inputs.results.interactions
    if not found:
        return BottomLine(NOT_TESTED, "the runs hold one training-set size")
    return joined([(i.label, BottomLine(i.holds, i.holds_reason)) for i in found])


# --- C7: dropout left on at inference flips predictions --------------------------------------


def inference(inputs: Inputs) -> BottomLine:
    mc = inputs.results.inference
    if mc is None or not mc.settings:
        return BottomLine(NOT_TESTED, "no run made stochastic passes with dropout on")
    rated = [s for s in mc.settings if s.flip_rate.mean is not None]
    if not rated:
        return BottomLine(NOT_TESTED, "no flip rate could be computed")
    line = _flips(rated)
    return BottomLine(line.status, line.because + _mc_accuracy(mc))


def _flips(rated: Sequence[McSetting]) -> BottomLine:
    top = max(rated, key=lambda s: s.flip_rate.mean)
    ci = top.flip_rate.ci95
    where = fmt_setting((top.dropout1, top.dropout2))
    if ci and ci[0] is not None and ci[0] > 0:
        return BottomLine(SUPPORTED, f"two passes with dropout on disagree on "
                                     f"{fmt_pct(top.flip_rate.mean)} "
                                     f"{fmt_ci_pct(top.flip_rate.ci95)} of test images at {where}")
    if all((s.flip_rate.mean or 0) == 0 for s in rated):
        return BottomLine(NOT_SUPPORTED, "no test image changed class between passes in any "
                                         "setting")
    return BottomLine(NOT_SETTLED, f"passes disagree on {fmt_pct(top.flip_rate.mean)} of test "
                                   f"images at {where}, but its 95% CI "
                                   f"{fmt_ci_pct(ci)} does not exclude 0")


def _mc_accuracy(mc: Inference) -> str:
    """Where the MC-minus-eval accuracy comparisons drove adaptive rounds, their verdicts and
    stops (the flip rate decides the claim; these say what averaging the passes buys)."""
    labelled = accuracy_records(mc)
    clause = stops_clause(labelled)
    if not clause:
        return ""
    return (f"; MC-averaged against eval-mode accuracy, "
            f"{verdict_counts([a for _, a in labelled], mc.equivalence_margin)}{clause}")

