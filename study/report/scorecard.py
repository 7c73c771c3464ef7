"""The claims scorecard: one row per claim of the lesson, from every protocol that answers it.

A row says what the lesson said, which protocol(s) and how many runs stand behind the verdict,
the verdict, whether it survives the multiverse of analyses, and what would settle it. A claim
no protocol measured reads "not measured" with the command that would measure it; so does the
GPU half of C5 when no CUDA run exists.

Each claim's verdict is read by one scorer (`SCORERS`) from the same `Results` the claim's
section builder (`study.report.claims`) words at length; a claim with a builder but no scorer
points to its section.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from study.protocol.lesson import CLAIM_KEYS, Lesson
from study.report.claims import CLAIMS, FIRST_LAYER, Claim
from study.report.context import Inputs, find_comparison, find_group, in_stratum
from study.report.diagnostics import applicable, diag_section
from study.report.inference import accuracy_records
from study.report.wording import (other_verdicts, NA, VERDICT_ORDER, fmt_ci_num, fmt_int, fmt_mean_sd, fmt_num,
                                  fmt_pct, fmt_pp, fmt_setting, finite, stop_text, stops_text,
                                  verdict_cell)
from study.results import Comparison, Paired, Results
from study.results.diagnostics import PairedRecord

DASH = "\u2013"
GPU_CLAIMS = ("C5",)  # claims with a GPU half: "not measured" there without CUDA runs


def lesson_claims() -> list[Claim]:
    """Every claim of the lesson, in CLAIM_KEYS order."""
    built = {c.key: c for c in CLAIMS}
    return [built[k] for k in CLAIM_KEYS if k in built]


@dataclass(frozen=True)
class Score:
    """What one protocol's results say about one claim."""

    verdict: str
    robust: str
    settle: str  # what it would take; a dash when nothing is open


@dataclass(frozen=True)
class Evidence:
    """One protocol's analysed runs, as the scorecard and the paper's body read them."""

    name: str
    file: str  # the protocol file, as a command names it
    claims: tuple[str, ...]  # the claims the lesson file says it answers
    inputs: Inputs | None  # None: no finished run to analyse
    cuda_cells: bool  # the protocol lists cuda cells (skipped on a machine without a GPU)

    @property
    def runs(self) -> int:
        return 0 if self.inputs is None else len(self.inputs.table.runs)


@dataclass(frozen=True)
class Row:
    claim: str
    lesson: str
    protocols: str
    runs: int
    verdict: str
    robust: str
    settle: str

    def cells(self) -> tuple[str, ...]:
        return (self.claim, self.lesson.rstrip(";."), self.protocols, str(self.runs),
                self.verdict, self.robust, self.settle)


HEADER = ("claim", "the lesson's words", "protocol", "runs", "verdict", "robust",
          "what would settle it")


# --- reading one comparison ------------------------------------------------------------------


def robust_text(c: Comparison) -> str:
    if c.robust is None:
        return "not assessed"
    descriptive = ", descriptive" if c.adaptive else ""
    if c.robust:
        return f"robust ({len(c.multiverse)} analyses{descriptive})"
    return (f"not robust ({len(c.disagreeing)} of {len(c.multiverse) - 1} others: "
            f"{other_verdicts(c)}{descriptive})")


def settle_text(c: Comparison) -> str:
    """An adaptive comparison: where it stopped ("settled at N seeds", "cap reached at N
    seeds; CS [a, b]"); a fixed one: the seeds an inconclusive verdict would need."""
    if c.adaptive:
        return stop_text(c)
    if c.verdict != "inconclusive":
        return DASH
    n = next((x for x in (c.seeds_needed, c.seeds_needed_margin) if finite(x)), None)
    return f"about {fmt_int(n)} seeds per setting" if n else "more seeds (count not computable)"


def comparison_score(c: Comparison, what: str) -> Score:
    return Score(f"{what} {fmt_pp(c.mean_diff)}: {verdict_cell(c.verdict, c.mean_diff)}",
                 robust_text(c), settle_text(c))


def _per_stratum(r: Results, scores: list[tuple[str, Score]]) -> Score | None:
    """One score from a score per stratum (labelled when there are several)."""
    if not scores:
        return None
    if len(scores) == 1:
        return scores[0][1]
    return Score("; ".join(f"{label}: {s.verdict}" for label, s in scores),
                 _joined(s.robust for _, s in scores), _joined(s.settle for _, s in scores))


def _joined(texts) -> str:
    seen = [t for t in dict.fromkeys(texts) if t != DASH]
    return "; ".join(seen) or DASH


# --- one scorer per claim --------------------------------------------------------------------


def score_no_dropout(inputs: Inputs) -> Score | None:
    r = inputs.results
    scores = []
    for s in r.strata:
        if tuple(r.baseline) == (0.0, 0.0):
            scores.append((s.label, _no_dropout_as_baseline(in_stratum(r.comparisons,
                                                                       s.stratum))))
        elif (c := find_comparison(r, s.stratum, 0.0, 0.0)) is not None:
            what = f"(0, 0) \u2212 {fmt_setting(r.baseline)}"
            scores.append((s.label, comparison_score(c, what)))
    return _per_stratum(r, scores)


def _no_dropout_as_baseline(comps: list[Comparison]) -> Score:
    beaten = sum(c.verdict == "different" and (c.mean_diff or 0) < 0 for c in comps)
    robust = all(c.robust for c in comps)
    return Score(f"(0, 0) shown better than {beaten} of {len(comps)} dropout settings",
                 "robust" if robust else "not robust for every setting",
                 _joined(settle_text(c) for c in comps))


def score_degenerate(setting: tuple[float, float]) -> Callable[[Inputs], Score | None]:
    def score(inputs: Inputs) -> Score | None:
        r = inputs.results
        scores = []
        for s in r.strata:
            g = find_group(r, s.stratum, *setting)
            if g is None:
                continue
            n_runs = g.n + g.n_excluded
            text = (f"textbook assertion fails in {n_runs - g.textbook_check_passed}/{n_runs} "
                    f"runs; {fmt_mean_sd(g)}")
            c = find_comparison(r, s.stratum, *setting)
            if c is None:
                scores.append((s.label, Score(text, NA, DASH)))
            else:
                vs = comparison_score(c, f"vs {fmt_setting(r.baseline)}")
                scores.append((s.label, Score(f"{text}; {vs.verdict}", vs.robust, vs.settle)))
        return _per_stratum(r, scores)
    return score


def score_first_layer(inputs: Inputs) -> Score | None:
    r = inputs.results
    (a, b) = FIRST_LAYER
    labels = {str(s.stratum): s.label for s in r.strata}
    found = [(labels[str(c.stratum)], comparison_score(c, f"{fmt_setting(a)} \u2212 "
                                                          f"{fmt_setting(b)}"))
             for c in r.contrasts if (c.dropout1, c.dropout2) == a and tuple(c.baseline) == b]
    return _per_stratum(r, found)


def _records(r: Results, name: str) -> list[Any]:
    """The records of a diagnostics section; none when the protocol did not measure it."""
    section = diag_section(r, name)
    return section.records if applicable(section) else []


def _verdict_counts(recs: Sequence[PairedRecord | Paired], form: str) -> str:
    """'equivalent in 2/3, inconclusive in 1/3' (form '{v} in {n}/{total}')."""
    return ", ".join(form.format(v=v, n=n, total=len(recs)) for v in VERDICT_ORDER
                     if (n := sum(x.verdict == v for x in recs)))


def score_implementations(inputs: Inputs) -> Score | None:
    recs = _records(inputs.results, "implementations")
    if not recs:
        return None
    by_impl = {i: [x for x in recs if x.implementation == i]
               for i in sorted({x.implementation for x in recs})}
    parts = [f"{impl} vs torch: {_verdict_counts(mine, '{v} in {n}/{total}')} settings"
             for impl, mine in by_impl.items()]
    need = [x.seeds_needed for x in recs
            if x.verdict == "inconclusive" and finite(x.seeds_needed) and not x.adaptive]
    fixed = f"about {fmt_int(max(need))} seeds per setting" if need else DASH
    stops = stops_text([(f"{x.implementation} {fmt_setting(x)}", x) for x in recs])
    return Score("; ".join(parts), "not assessed (one paired analysis per setting)",
                 _joined([stops or DASH, fixed]))


def score_repeatable(inputs: Inputs) -> Score | None:
    r = inputs.results
    parts = [_replicates(r), _modes(r), _devices(r), _sources(r)]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return Score("; ".join(parts), "n/a (bitwise counts)", DASH)


def _replicates(r: Results) -> str:
    by_device: dict[str, list[int]] = {}
    for x in _records(r, "replicates"):
        tally = by_device.setdefault(str(x.stratum.get("device", "cpu")), [0, 0])
        tally[0] += x.n_identical
        tally[1] += x.n_hash_compared
    return "identical in " + ", ".join(f"{same}/{n} replicates on {device}"
                                       for device, (same, n) in sorted(by_device.items())) \
        if by_device else ""


def _modes(r: Results) -> str:
    recs = _records(r, "modes")
    if not recs:
        return ""
    quiet = sum(x.no_change_observed for x in recs)
    return f"modes changed no weight hash in {quiet}/{len(recs)} mode comparisons"


def _devices(r: Results) -> str:
    recs = _records(r, "devices")
    if not recs:
        return ""
    same = sum(x.n_identical for x in recs)
    verdicts = _verdict_counts(recs, "{v} {n}")
    return (f"CUDA vs CPU: {same}/{sum(x.n_hash_compared for x in recs)} pairs identical, "
            f"accuracy gap {verdicts} of {len(recs)} settings")


def _sources(r: Results) -> str:
    section = diag_section(r, "variance_sources")
    if not applicable(section) or not section.summaries:
        return ""
    summaries = section.summaries
    agree = sum(s.agreement == "agree" for s in summaries)
    return (f"one random source alone gives the full spread (Summers & Dinneen) in "
            f"{agree}/{len(summaries)} settings")


def score_overfitting(inputs: Inputs) -> Score | None:
    """C6 from the interaction of dropout with the training-set size."""
    found = inputs.results.interactions
    if not found:
        return None
    parts = [f"{i.holds}: trend slope {fmt_num(i.trend.estimate, 3)} "
             f"{fmt_ci_num(i.trend.ci95)}; best gain "
             + ", ".join(f"{e.train_images:,}: {fmt_pp(e.gain)} ({e.verdict or NA})"
                         for e in i.sizes) for i in found]
    robust = ", ".join(f"{i.sizes[0].train_images:,} images: "
                       f"{'robust' if i.sizes[0].robust else 'not robust'}" for i in found)
    need = [e.train_images for i in found for e in i.sizes if e.verdict == "inconclusive"]
    settle = f"more seeds at {', '.join(f'{n:,}' for n in need)} images" if need else DASH
    return Score("; ".join(parts), robust, settle)


def score_inference(inputs: Inputs) -> Score | None:
    """C7 from the stochastic test passes: the largest flip rate, and how MC-averaged accuracy
    compares with eval mode across the settings (paired, Holm over the settings)."""
    found = inputs.results.inference
    if found is None or not found.settings:
        return None
    rated = [s for s in found.settings if s.flip_rate.mean is not None]
    parts = []
    if rated:
        top = max(rated, key=lambda s: s.flip_rate.mean)
        parts.append(f"two passes disagree on up to {fmt_pct(top.flip_rate.mean)} of test images at "
                     f"{fmt_setting([top.dropout1, top.dropout2])}")
    accuracy = [s.accuracy for s in found.settings]
    parts.append(f"MC-averaged vs eval-mode accuracy: "
                 f"{_verdict_counts(accuracy, '{v} in {n}/{total}')} settings")
    need = [fmt_setting([s.dropout1, s.dropout2]) for s in found.settings
            if s.accuracy.verdict == "inconclusive" and not s.accuracy.adaptive]
    fixed = f"more seeds at {', '.join(need)}" if need else DASH
    stops = stops_text(accuracy_records(found))
    return Score("; ".join(parts), "not assessed (one paired analysis per setting)",
                 _joined([stops or DASH, fixed]))


SCORERS: dict[str, Callable[[Inputs], Score | None]] = {
    "C1": score_no_dropout,
    "C2": score_degenerate((1.0, 1.0)),
    "C3": score_degenerate((0.9, 0.9)),
    "C3\u2032": score_first_layer,
    "C4": score_implementations,
    "C5": score_repeatable,
    "C6": score_overfitting,
    "C7": score_inference,
}


# --- rows ------------------------------------------------------------------------------------


def rows(lesson: Lesson, evidence: Sequence[Evidence], lesson_file: str,
         run_command: str) -> list[Row]:
    """One row per claim of the lesson, in order. `run_command` makes the missing runs."""
    return [_row(claim, [e for e in evidence if claim.key in e.claims], lesson, lesson_file,
                 run_command) for claim in lesson_claims()]


def _row(claim: Claim, mine: list[Evidence], lesson: Lesson, lesson_file: str,
         run_command: str) -> Row:
    names = ", ".join(e.name for e in mine) or DASH
    runs = sum(e.runs for e in mine)
    if not mine:
        verdict, settle = _unanswered(claim.key, lesson, lesson_file)
        return Row(claim.key, claim.lesson, names, 0, verdict, DASH, settle)
    scored = [(e, _score(claim.key, e)) for e in mine]
    labelled = len(scored) > 1
    verdict = "; ".join(f"{e.name}: {s.verdict}" if labelled else s.verdict for e, s in scored)
    robust = _joined(s.robust for _, s in scored if s.robust != DASH)
    settle = _joined(s.settle for _, s in scored)
    if claim.key in GPU_CLAIMS and not _has_cuda(mine):
        verdict += "; GPU half not measured (no CUDA runs)"
        settle = _joined([settle, "needs a GPU: " + _gpu_command(mine, run_command)])
    return Row(claim.key, claim.lesson, names, runs, verdict, robust, settle)


def _score(key: str, e: Evidence) -> Score:
    if e.inputs is None:
        return Score("not measured (no finished runs)", DASH,
                     f"python -m study run {e.file}" + (" on a machine with a GPU"
                                                        if e.cuda_cells else ""))
    scorer = SCORERS.get(key)
    if scorer is None:
        return Score("measured; its section gives the verdict (no scorecard summary yet)",
                     DASH, DASH)
    return scorer(e.inputs) or Score("not measured: these runs do not speak to it (see its "
                                     "section)", DASH, f"add the settings it needs to {e.file}")


def _unanswered(key: str, lesson: Lesson, lesson_file: str) -> tuple[str, str]:
    found = lesson.open_entry(key)
    if found is not None:
        return f"not measured: {found.why}", found.command
    return (f"not measured: no protocol in {lesson_file} answers it",
            f"list a protocol answering {key} in {lesson_file}, then make paper")


def _has_cuda(mine: list[Evidence]) -> bool:
    return any(e.inputs is not None and "cuda" in set(e.inputs.table.runs["device"])
               for e in mine)


def _gpu_command(mine: list[Evidence], run_command: str) -> str:
    files = [e.file for e in mine if e.cuda_cells]
    if not files:
        return "list a protocol with cuda cells, then " + run_command
    return f"on a CUDA machine against this store, {run_command} (runs the cuda cells of " \
           f"{', '.join(files)})"
