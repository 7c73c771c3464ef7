"""How numbers and verdicts read: the one place that decides the words of the report.

Rules kept here and only here:
- "No real difference" is said only of `equivalent`; `negligible` is a real gap shown to lie
  within the margin; `inconclusive` always says "not shown different" and what would settle it.
- Beside every TOST verdict stands the interval whose lying inside +-margin IS that decision,
  with its level named (90% unadjusted; wider under Holm).
- Failing to show a spread difference never reads as "same spread".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from study.analysis import stats
from study.report.figures import setting_label
from study.results import TEST_NAMES, Comparison, Endpoint, Paired, Results
from study.results.anytime import Anytime
from study.results.diagnostics import PairedRecord

MINUS = "\u2212"
NA = "n/a"
CORRECTION = "Holm"  # the analysis adjusts every family by Holm's step-down method
VERDICT_ORDER = ("different", "negligible", "equivalent", "inconclusive")
# Interval names in `stats.COVERAGE` and what the report calls them.
INTERVALS = {"mean": "group mean", "sd": "group SD", "sd_ratio": "SD ratio"}
COVERAGE_FLOOR = 0.90  # below this at n = 10 an interval is labelled "approximate"


# --- numbers ---------------------------------------------------------------------------------


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _signed(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}".replace("-", MINUS)


def fmt_pct(x: Any, digits: int = 2) -> str:
    """An accuracy fraction as a percentage: 0.8812 -> '88.12%'."""
    return f"{x * 100:.{digits}f}%".replace("-", MINUS) if finite(x) else NA


def fmt_pp(x: Any, digits: int = 2, sign: bool = True, unit: bool = True) -> str:
    """An accuracy difference as percentage points: 0.005 -> '+0.50 pp'."""
    if not finite(x):
        return NA
    text = _signed(x * 100, digits) if sign else f"{x * 100:.{digits}f}".replace("-", MINUS)
    return f"{text} pp" if unit else text


def _interval(ci: Any) -> bool:
    return bool(ci) and all(finite(v) for v in ci)


def fmt_ci_pp(ci: Any, digits: int = 2, sign: bool = True) -> str:
    if not _interval(ci):
        return NA
    return f"[{fmt_pp(ci[0], digits, sign, False)}, {fmt_pp(ci[1], digits, sign, False)}]"


def fmt_ci_pct(ci: Any, digits: int = 2) -> str:
    if not _interval(ci):
        return NA
    return f"[{ci[0] * 100:.{digits}f}, {ci[1] * 100:.{digits}f}]"


def fmt_num(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}".replace("-", MINUS) if finite(x) else NA


def fmt_ci_num(ci: Any, digits: int = 2) -> str:
    return f"[{fmt_num(ci[0], digits)}, {fmt_num(ci[1], digits)}]" if _interval(ci) else NA


def fmt_ratio_ci(ci: Any) -> str:
    # A ratio CI may be open above (None upper bound): the data cannot bound it.
    if not ci or not finite(ci[0]):
        return NA
    hi = fmt_num(ci[1]) if finite(ci[1]) else "\u221e"
    return f"[{fmt_num(ci[0])}, {hi}]"


def fmt_p(p: Any) -> str:
    if not finite(p):
        return NA
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_rel(p: Any) -> str:
    """The relation and value after 'p': '= 0.004' or '< 0.001'."""
    text = fmt_p(p)
    return text if text.startswith("<") or text == NA else f"= {text}"


def fmt_int(x: Any) -> str:
    return str(int(math.ceil(x))) if finite(x) else NA


def fmt_level(level: Any) -> str:
    """0.975 -> '97.5%', 0.9 -> '90%'."""
    return f"{level * 100:.4g}%" if finite(level) else NA


def fmt_setting(item: Any) -> str:
    if hasattr(item, "dropout1"):
        return setting_label(item.dropout1, item.dropout2)
    return setting_label(*item)


def fmt_mean_sd(group: Any) -> str:
    """'88.12% ± 0.31' (mean ± SD in pp), from a Group or a diagnostics record."""
    return f"{fmt_pct(group.mean)} ± {fmt_pp(group.sd, sign=False, unit=False)}"


def margin_text(results: Results) -> str:
    return f"±{fmt_pp(results.equivalence_margin, sign=False)}"


def endpoint_text(name: str) -> str:
    """'final' -> 'final-epoch test accuracy'; an unknown name is shown as given."""
    try:
        return Endpoint.parse(name).describe()
    except ValueError:
        return name


def analysis_name(label: str) -> str:
    """'last:3/rank' -> 'last:3 / rank test (Hodges-Lehmann)'."""
    endpoint, _, test = label.partition("/")
    return f"{endpoint} / {TEST_NAMES.get(test, test)}" if test else label


# --- the TOST interval: the one whose lying inside +-margin is the verdict --------------------


def tost_interval(c: Comparison, alpha: float) -> tuple[Any, str]:
    """(interval, its name). The verdict uses the Holm-adjusted TOST p, whose dual interval is
    `tost_ci` at `tost_ci_level`; with a Holm multiplier of 1 that is the plain 1 - 2 alpha one."""
    unadjusted = 1 - 2 * alpha
    if _interval(c.tost_ci) and finite(c.tost_ci_level):
        if math.isclose(c.tost_ci_level, unadjusted):
            return c.tost_ci, f"{fmt_level(unadjusted)} CI"
        return c.tost_ci, f"{CORRECTION}-adjusted {fmt_level(c.tost_ci_level)} CI"
    return c.tost_ci90, f"{fmt_level(unadjusted)} CI, unadjusted"


def tost_interval_text(c: Comparison, results: Results) -> str:
    """'Holm-adjusted 97.5% CI [-0.35, +0.41] pp, inside ±0.50 pp'."""
    ci, name = tost_interval(c, results.alpha)
    if not _interval(ci):
        return f"{name} n/a"
    m = results.equivalence_margin
    where = "inside" if -m < ci[0] and ci[1] < m else "not inside"
    return f"{name} {fmt_ci_pp(ci)} pp, {where} {margin_text(results)}"


def tost_interval_cell(c: Comparison, alpha: float) -> str:
    """For tables: '[-0.35, +0.41] 97.5%*' (* = Holm-adjusted level)."""
    ci, name = tost_interval(c, alpha)
    if not _interval(ci):
        return NA
    level = c.tost_ci_level if _interval(c.tost_ci) and finite(c.tost_ci_level) else 1 - 2 * alpha
    star = "*" if name.startswith(CORRECTION) else ""
    return f"{fmt_ci_pp(ci)} {fmt_level(level)}{star}"


# --- what it would take ------------------------------------------------------------------------


def seeds_needed_text(c: Comparison, results: Results) -> str:
    """The three power answers, in the order a reader asks them; the first count found reads
    "about N seeds per setting", so the sentence stands when the observed gap has no count."""
    asks = ((c.seeds_needed, f"to detect the observed gap at {results.power:.0%} power"),
            (c.seeds_needed_margin, f"to detect a gap the size of the margin "
                                    f"({margin_text(results)})"),
            (c.seeds_needed_equivalence, "for TOST to show equivalence if the true gap were 0"))
    found = [(n, what) for n, what in asks if finite(n)]
    if not found:
        return f"seeds needed not computable: {c.reason or 'not computable'}"
    parts = [f"{fmt_int(n)} {what}" for n, what in found]
    parts[0] = f"about {fmt_int(found[0][0])} seeds per setting {found[0][1]}"
    if not finite(c.seeds_needed):
        parts.append("no count for the observed gap (see the notes)")
    return ", ".join(parts)


# --- verdicts ----------------------------------------------------------------------------------


def _adjusted(p: Any) -> str:
    return f"{CORRECTION}-adjusted p {p_rel(p)}"


def verdict_phrase(c: Comparison, results: Results) -> str:
    """How a mean comparison under the primary analysis reads."""
    margin = margin_text(results)
    interval = tost_interval_text(c, results)
    if c.adaptive:
        return anytime_phrase(c, margin)
    if c.settled_by_construction:
        return settled_phrase(c, margin)
    if c.verdict == "different":
        text = f"different after {CORRECTION} correction (p {p_rel(c.p_adjusted)})"
    elif c.verdict == "negligible":
        text = (f"negligible: a real gap ({_adjusted(c.p_adjusted)}), shown to lie within "
                f"{margin} (TOST, {_adjusted(c.tost_p_adjusted)}; {interval})")
    elif c.verdict == "equivalent":
        text = (f"no real difference: equivalent within {margin} "
                f"(TOST, {_adjusted(c.tost_p_adjusted)}; {interval})")
    else:
        text = (f"not shown different ({_adjusted(c.p_adjusted)}) and not shown equivalent "
                f"within {margin} ({interval}); needs more seeds: {seeds_needed_text(c, results)}")
    return text


# Where verdicts come from under an adaptive design (item 4 of issue 19): each comparison its
# own 95% CS, so no family-wise control is claimed for them; their p_anytime is shown as is.
ANYTIME_BASIS = ("each adaptive verdict comes from its own 95% confidence sequence (per "
                 "comparison, not adjusted across comparisons), with its anytime-valid p "
                 "unadjusted beside it")


def anytime_phrase(c: Any, margin: str) -> str:
    """An adaptive comparison's verdict, read off its 95% confidence sequence (a results
    Comparison, a C4 ImplementationRecord or a C7 Paired: any `Anytime` with a verdict)."""
    p = f"anytime-valid p {p_rel(c.p_anytime)}"
    head = {"different": f"different: the 95% CS excludes 0 and is not inside {margin} ({p})",
            "negligible": f"negligible: a real gap ({p}), its 95% CS inside {margin}",
            "equivalent": f"no real difference: equivalent within {margin} (the 95% CS lies "
                          f"inside it)",
            }.get(c.verdict, f"inconclusive: the 95% CS neither excludes 0 nor lies inside "
                             f"{margin} ({p})")
    return head


def settled_phrase(c: Comparison, margin: str) -> str:
    """A gap that is the same in every seed: no test can add to it, its size decides."""
    head = {"different": "different", "negligible": f"negligible: a real gap within {margin}",
            "equivalent": f"no real difference: equivalent within {margin}"}.get(c.verdict,
                                                                                 c.verdict)
    where = "inside" if c.verdict in ("negligible", "equivalent") else "outside"
    return (f"{head}, settled by construction: the gap is the same in every seed and lies "
            f"{where} {margin}, so no test could add to it")


def short_verdict(c: Comparison, results: Results) -> str:
    """The verdict in a clause, for the abstract: a TOST verdict keeps its interval."""
    ci, name = tost_interval(c, results.alpha)
    interval = f" ({name} {fmt_ci_pp(ci)} pp)" if _interval(ci) else ""
    if c.verdict == "different":
        text = f"different after {CORRECTION} correction (p {p_rel(c.p_adjusted)})"
    elif c.verdict == "equivalent":
        text = f"no real difference: equivalent within {margin_text(results)}{interval}"
    elif c.verdict == "negligible":
        text = f"negligible: a real gap shown within {margin_text(results)}{interval}"
    else:
        text = verdict_word(c.verdict, results.equivalence_margin)
    robust = {True: "robust", False: "not robust"}.get(c.robust, "robustness not assessed")
    return f"{text}, {robust}"


def other_verdicts(c: Comparison) -> str:
    """How the disagreeing analyses disagree, by the verdict they give instead: "6 inconclusive,
    1 negligible" (never just "disagree", which reads as "opposite")."""
    counts: dict[str, int] = {}
    for d in c.disagreeing:
        verdict_ = d.partition(": ")[2] or "no verdict"
        counts[verdict_] = counts.get(verdict_, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def robustness_phrase(c: Comparison) -> str:
    """'robust: ...' or 'not robust: it changes under ...'; labelled descriptive for an
    adaptive comparison, whose multiverse ran at the sample size the stopping rule chose."""
    n = len(c.multiverse)
    descriptive = (" (descriptive: the fixed-n analyses ran at the seeds the adaptive rule "
                   "chose, so their p-values carry no error guarantee)" if c.adaptive else "")
    if c.robust is None:
        return "robustness not assessed (too few analyses ran)"
    if c.robust:
        return f"robust: all {n} analyses (endpoints \u00d7 tests) give this verdict{descriptive}"
    changes = "; ".join(analysis_name(d.partition(": ")[0]) + f" gives {d.partition(': ')[2]}"
                        for d in c.disagreeing)
    return (f"not robust: {len(c.disagreeing)} of {n - 1} other analyses give another verdict "
            f"({other_verdicts(c)}: {changes}){descriptive}")


def gap_interval(c: Comparison | PairedRecord | Paired) -> Any:
    """The interval to show beside a comparison's gap: its 95% confidence sequence when it was
    decided adaptively (a fixed-n t interval after early stopping is biased and too narrow),
    else its 95% t interval (a C7 Paired names it `ci95`)."""
    if c.adaptive:
        return c.cs95
    return c.ci95 if isinstance(c, Paired) else c.mean_diff_ci95


def decided_adaptively(r: Any) -> bool:
    """Whether a record of any kind (a fixed-n diagnostics record has no anytime fields) was
    decided by an adaptive protocol's rounds."""
    return isinstance(r, Anytime) and r.adaptive


def interval_name(c: Anytime) -> str:
    return "95% CS" if c.adaptive else "95% CI"


def stop_text(c: Anytime) -> str:
    """'settled at N seeds', 'cap reached at N seeds; CS [a, b]', ... for an adaptive comparison."""
    n = c.stopped_at
    if c.stop_reason == "settled":
        return f"settled at {n} seeds"
    where = {"max_seeds": "cap reached", "max_runs": "run budget reached"}.get(
        c.stop_reason or "", "still open")
    return f"{where} at {n} seeds; CS {fmt_ci_pp(c.cs95)}"


def stops_text(labelled: Sequence[tuple[str, Any]]) -> str:
    """Where adaptive records stopped, records that stopped alike named together: 'settled at
    15 seeds (scratch (0.2, 0.5), scratch (0.5, 0.5)); cap reached at 60 seeds; CS [a, b]
    (scratch (0.9, 0.9))'; '' when none was decided adaptively (or the records, such as C5's
    device records, are never adaptive)."""
    by_stop: dict[str, list[str]] = {}
    for label, r in labelled:
        if decided_adaptively(r):
            by_stop.setdefault(stop_text(r), []).append(label)
    return "; ".join(f"{stop} ({', '.join(labels)})" for stop, labels in by_stop.items())


def stops_clause(labelled: Sequence[tuple[str, Any]]) -> str:
    """' (verdicts read off each 95% CS at its stop: settled at ...)', or '' when no record of
    `labelled` was decided adaptively."""
    stops = stops_text(labelled)
    return f" (verdicts read off each 95% CS at its stop: {stops})" if stops else ""


def method_text(c: Comparison) -> str:
    """How the primary verdict was decided: the t test, or the anytime-valid rule and its stop."""
    return f"anytime-valid t-mixture, {stop_text(c)}" if c.adaptive else "t test"


def divergence_phrase(c: Comparison, results: Results) -> str:
    """Counts and the Fisher test of divergence; '' when no run of the pair diverged."""
    a, b = c.n_diverged_setting, c.n_diverged_baseline
    if not (a or b):
        return ""
    verdict = "differs from" if c.divergence_verdict == "different" else \
        "was not shown to differ from"
    return (f"{a} of {c.n_setting + a} runs of {fmt_setting(c)} and {b} of {c.n_baseline + b} "
            f"of the baseline diverged and are left out of the accuracy test; the divergence "
            f"rate {verdict} the baseline's (Fisher's exact test, "
            f"{_adjusted(c.divergence_p_adjusted)})")


def variance_phrase(c: Comparison, results: Results) -> str:
    """How a spread comparison reads. Failing to show a difference never becomes 'same spread'."""
    ratio = f"SD ratio {fmt_num(c.sd_ratio)} {fmt_ci_num(c.sd_ratio_ci95)}"
    p = _adjusted(c.variance_p_adjusted)
    if c.variance_verdict == "different":
        return f"its seed-to-seed spread differs from the baseline's ({ratio}, {p})"
    return (f"a difference in seed-to-seed spread was not shown ({ratio}, {p}); with "
            f"{c.n} seeds this is weak evidence either way, not evidence of equal spread")


def comparison_sentence(c: Comparison, results: Results) -> str:
    return (f"{fmt_setting(c)}: {fmt_pp(c.mean_diff)} {fmt_ci_pp(c.mean_diff_ci95)}"
            f" vs baseline, {verdict_phrase(c, results)}")


def verdict_cell(verdict: str, diff: Any) -> str:
    """A verdict in a table cell; `different` carries the sign of the gap."""
    if verdict == "different" and finite(diff):
        return f"different ({'+' if diff > 0 else MINUS})"
    return verdict


# --- verdicts of diagnostics records, in short form -------------------------------


def verdict_word(verdict: Any, margin: float) -> str:
    """A verdict in a few words, for lists; the same rule as `verdict_phrase`."""
    m = f"±{fmt_pp(margin, sign=False)}"
    return {"different": "different", "equivalent": f"equivalent within {m}",
            "negligible": f"negligible (a real gap within {m})"}.get(
        verdict, "not shown different (needs more seeds)")


def verdict_counts(records: Sequence[PairedRecord | Paired], margin: float) -> str:
    counts = [(verdict_word(v, margin), sum(r.verdict == v for r in records))
              for v in VERDICT_ORDER]
    return ", ".join(f"{w} in {n} of {len(records)}" for w, n in counts if n) + " settings"


def verdict_lists(names: dict[str, list[str]], margin: float, need: Sequence[float]) -> str:
    """Settings grouped by verdict (`names[verdict]`), in short form."""
    m = f"±{fmt_pp(margin, sign=False)}"
    parts = []
    if names.get("different"):
        parts.append(f"different at {', '.join(names['different'])}")
    if names.get("negligible"):
        parts.append(f"a real gap shown within {m} (negligible) at "
                     f"{', '.join(names['negligible'])}")
    if names.get("equivalent"):
        parts.append(f"no real difference (equivalent within {m}) at "
                     f"{', '.join(names['equivalent'])}")
    if names.get("inconclusive"):
        more = f", up to about {fmt_int(max(need))} seeds per setting" if need else ""
        parts.append(f"not shown different nor equivalent at {', '.join(names['inconclusive'])} "
                     f"(needs more seeds{more})")
    return "; ".join(parts) or "no verdict"


def record_verdict_phrase(r: PairedRecord, margin: float) -> str:
    """The verdict of a paired diagnostics record. Its records carry no TOST-dual interval
    yet, so the TOST is named by its adjusted p alone."""
    m = f"±{fmt_pp(margin, sign=False)}"
    if r.verdict == "different":
        return f"different after {CORRECTION} correction (p {p_rel(r.p_adjusted)})"
    if r.verdict == "negligible":
        return (f"negligible: a real gap ({_adjusted(r.p_adjusted)}), shown to lie within "
                f"{m} (TOST, {_adjusted(r.tost_p_adjusted)})")
    if r.verdict == "equivalent":
        return (f"no real difference: equivalent within {m} "
                f"(TOST, {_adjusted(r.tost_p_adjusted)})")
    n = r.seeds_needed
    need = f"about {fmt_int(n)} seeds per setting needed" if finite(n) else \
        f"seeds needed not computable: {r.reason or 'not computable'}"
    return (f"not shown different ({_adjusted(r.p_adjusted)}) and not shown equivalent "
            f"within {m}; needs more seeds ({need})")


def count(n: int, noun: str) -> str:
    """'1 dropout setting', '2 dropout settings'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def capitalised(text: str) -> str:
    """A clause as the start of a sentence."""
    return text[:1].upper() + text[1:]


# --- measured coverage: which intervals read "approximate" -------------------------------


def coverage(module: Any = stats) -> dict[str, dict[int, float]]:
    """`stats.COVERAGE` ({(interval, n): coverage}, or {interval: {n: coverage}}) as
    {interval: {n: measured coverage}}; {} when the module states none."""
    raw = getattr(module, "COVERAGE", None)
    out: dict[str, dict[int, float]] = {}
    for key, value in (raw.items() if isinstance(raw, Mapping) else ()):
        pairs = value.items() if isinstance(value, Mapping) else [(key[1], value)] \
            if isinstance(key, tuple) and len(key) == 2 else []
        name = key[0] if isinstance(key, tuple) else key
        for n, v in pairs:
            if finite(v):
                out.setdefault(str(name), {})[int(n)] = float(v)
    return out


def approximate(module: Any = stats) -> set[str]:
    """Intervals to label "approximate": the module's own list, else those whose measured
    coverage at n = 10 is below 90%."""
    named = getattr(module, "APPROXIMATE", None)
    if named is not None:
        return {str(x) for x in named}
    return {name for name, by_n in coverage(module).items()
            if by_n.get(10, 1.0) < COVERAGE_FLOOR}


def approx_label(name: str) -> str:
    return " (approximate)" if name in approximate() else ""
