"""C4, C5 and the sources of variance, worded from `Results.diagnostics`.

`study.diagnostics` computes every number here and hands it over as typed records
(`study.results_diagnostics`); this module only words them, so the CSVs, results.json and this text cannot disagree. A section the
protocol did not measure says so in one sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from study.report.figures import FigureFile
from study.report.describe import Setup
from study.report.document import Block, Bullets, Fig, Heading, Para, Table, para
from study.report.wording import (ANYTIME_BASIS, NA, VERDICT_ORDER, decided_adaptively,
                                  finite, fmt_ci_pct, fmt_ci_pp, fmt_int,
                                  fmt_num, fmt_p, fmt_pct, fmt_pp, fmt_ratio_ci, fmt_setting,
                                  gap_interval, p_rel, record_verdict_phrase, stop_text,
                                  stops_clause, verdict_counts, verdict_lists, verdict_word)
from study.results import Results
from study.results.diagnostics import (ImplementationRecord, KeepRecord, ModeRecord,
                                       PairedRecord, ReplicateRecord, Section, SourceRecord,
                                       SourceSummary)
from study.analysis.table import RunTable


SUMMERS = "Summers & Dinneen (ICML 2021)"
REPLICATE_KEYS = ("device", "determinism", "execution", "threads")
NO_DIAGNOSTICS = "the results carry no diagnostics; rerun python -m study analyze"


def diag_section(results: Results, name: str) -> Section | None:
    return None if results.diagnostics is None else getattr(results.diagnostics, name)


def applicable(section: Section | None) -> bool:
    return bool(section and section.applicable and section.records)


def not_measured(what: str, section: Section | None) -> Para:
    why = (section.reason if section else None) or NO_DIAGNOSTICS
    return para(f"The protocol did not measure {what} ({why}).")


def fmt_pp_exact(x: Any) -> str:
    # An exact zero is a finding (bitwise-identical runs), not a rounded small number.
    return "0 (exact)" if x == 0.0 and finite(x) else fmt_pp(x, sign=False, unit=False)


def where(stratum: dict[str, Any], keys: Sequence[str]) -> str:
    return " / ".join(str(stratum[k]) for k in keys if k in stratum)


def varying_keys(records: Sequence[Any], fallback: Sequence[str] = ()) -> list[str]:
    """The stratum columns that tell the records apart (all the same: `fallback`)."""
    keys = dict.fromkeys(k for r in records for k in r.stratum)
    found = [k for k in keys if len({str(r.stratum.get(k)) for r in records}) > 1]
    return found or [k for k in fallback if k in keys]


def identical_text(n_same: Any, n: Any) -> str:
    return f"{n_same}/{n}" + (f" ({fmt_pct(n_same / n, 0)})" if n else "")


def records_by_verdict(records: Sequence[PairedRecord], results: Results) -> str:
    """Settings grouped by verdict, naming the stratum where a setting recurs in several."""
    keys = varying_keys(records)

    def name(r: PairedRecord) -> str:
        return fmt_setting(r) + (f" in {where(r.stratum, keys)}" if keys else "")

    names = {v: [name(r) for r in records if r.verdict == v] for v in VERDICT_ORDER}
    # An adaptive record's own stop says what is left; a fixed-n count would not apply to it.
    need = [r.seeds_needed for r in records if r.verdict == "inconclusive"
            and finite(r.seeds_needed) and not decided_adaptively(r)]
    return verdict_lists(names, results.equivalence_margin, need) + \
        stops_clause([(name(r), r) for r in records])


# C5 -------------------------------------------------------------------------------------------


def claim_repeatability(results: Results, table: RunTable, setup: Setup) -> list[Block]:
    blocks = [*replicate_blocks(results), *mode_blocks(results, setup), *thread_blocks(results),
              *verify_blocks(table), *device_blocks(results, table)]
    sources = diag_section(results, "variance_sources")
    if not applicable(sources):
        blocks.append(not_measured("which random stream (initialisation, data order, dropout "
                                   "masks) makes the seed-to-seed spread", sources))
    return blocks


def replicate_blocks(results: Results) -> list[Block]:
    section = diag_section(results, "replicates")
    if not applicable(section):
        return [not_measured("run-to-run repeatability with a fixed seed", section)]
    recs = section.records
    same = sum(_all_identical(r) for r in recs)
    rows = tuple((where(r.stratum, REPLICATE_KEYS), str(r.n_cells),
                  identical_text(r.n_identical, r.n_hash_compared),
                  fmt_ci_pct(r.share_identical_ci95, 0),
                  fmt_pp_exact(r.max_abs_diff.test_acc),
                  fmt_pp_exact(r.nondeterminism_sd), fmt_pp_exact(r.seed_sd),
                  fmt_num(r.variance_ratio, 3)) for r in recs)
    lead = para(
        f"A replicate re-runs a cell (same setting, seed, device and mode) and is compared with "
        f"that cell's first run. In {same} of {len(recs)} device / mode strata every replicate "
        f"gave bit-identical final weights. The nondeterminism SD (pooled over replicates of a "
        f"cell) is set against the seed-to-seed SD (pooled over seeds of a setting): their "
        f"variance ratio is the share of seed-to-seed variance that run-to-run noise alone "
        f"could produce.")
    header = ("device / mode / execution / threads", "cells", "identical", "95% CI (%)", "max |\u0394| (pp)",
              "nondet. SD (pp)", "seed SD (pp)", "var. ratio")
    blocks: list[Block] = [lead, Table(header, rows, "Replicates against the first run of their "
                                       "cell (final test accuracy; identical = same weight hash, "
                                       "Clopper\u2013Pearson CI).", "lrrrrrrr")]
    differing = [para(_replicate_gap_text(r)) for r in recs if not _all_identical(r)]
    return blocks + ([Bullets(tuple(differing))] if differing else [])


def _all_identical(r: ReplicateRecord) -> bool:
    return bool(r.n_hash_compared) and r.n_identical == r.n_hash_compared


def _replicate_gap_text(r: ReplicateRecord) -> str:
    diff = r.n_hash_compared - r.n_identical
    return (f"{where(r.stratum, REPLICATE_KEYS)}: {diff} of {r.n_hash_compared} replicates "
            f"differ from their first run; the largest test-accuracy gap is "
            f"{fmt_pp(r.max_abs_diff.test_acc, sign=False)} and the "
            f"nondeterminism variance is {fmt_num(r.variance_ratio, 3)} times the "
            f"seed-to-seed variance.")


def mode_blocks(results: Results, setup: Setup) -> list[Block]:
    section = diag_section(results, "modes")
    if not applicable(section):
        return [not_measured("the effect of determinism modes", section)]
    return [para(f"Determinism modes against \u2018{section.reference}\u2019, pairing first "
                 f"runs of the same cell. {cudnn_expectation(setup)}"),
            Bullets(tuple(para(_mode_text(r, results)) for r in section.records))]


def cudnn_expectation(setup: Setup) -> str:
    """What the cuDNN flags can change, for the model that ran."""
    if setup.convolutions is None:
        return ("The cuDNN flags govern convolutions and RNNs; the model these runs trained "
                "was not recorded, so whether they apply is not known.")
    if setup.convolutions:
        return ("The cuDNN flags govern convolutions, which this model has: on a GPU they can "
                "change the arithmetic; on the CPU they do not apply.")
    return ("The cuDNN flags govern convolutions and RNNs; this model has neither and runs on "
            "BLAS, so a null result is expected for them.")


def _mode_text(r: ModeRecord, results: Results) -> str:
    head = f"{r.mode} vs {r.reference} on {where(r.stratum, ('device', 'execution'))}"
    if r.no_change_observed:
        return (f"{head}: no change observed, all {r.n_pairs} paired runs have the same "
                f"weight hash. A null result for the cells, model and machine measured, not "
                f"proof that the mode never matters.")
    return (f"{head}: {r.n_hash_compared - r.n_identical} of {r.n_hash_compared} runs "
            f"differ bitwise; mean test-accuracy gap {fmt_pp(r.mean_diff)} "
            f"{fmt_ci_pp(r.mean_diff_ci95)}, largest "
            f"{fmt_pp(r.max_abs_diff.test_acc, sign=False)}; "
            f"{record_verdict_phrase(r, results.equivalence_margin)}.")


def thread_blocks(results: Results) -> list[Block]:
    """Thread count a against b, paired by cell: does it change the bits, per mode."""
    section = diag_section(results, "threads")
    if not applicable(section):
        return []  # most protocols fix one count; nothing to say
    recs = section.records
    rows = tuple((where(r.stratum, ("device", "determinism", "execution")),
                  f"{r.threads_a} vs {r.threads_b}",
                  identical_text(r.n_identical, r.n_hash_compared),
                  fmt_pp_exact(r.max_abs_diff.test_acc)) for r in recs)
    return [para("The same cells at two CPU thread counts, first runs paired by cell. Unless "
                 "the mode makes MKL's arithmetic thread-count invariant, the count changes "
                 "the order of floating-point sums, and so the bits."),
            Table(("device / mode / execution", "threads", "identical", "max |\u0394| (pp)"),
                  rows, "Final weights at two thread counts (identical = same weight hash).",
                  "llrr")]


def verify_blocks(table: RunTable) -> list[Block]:
    """The newest `study verify` run: recorded cells re-trained, perhaps on another machine."""
    v = getattr(table, "verification", None)
    if not v:
        return [para("No verify run (python -m study verify) is recorded for these runs, so "
                     "reproduction in a later process or on another machine was not checked "
                     "here; the golden test (pytest -k golden) checks portable mode.")]
    # The verifying machine is named in environment.md, not here (the PDF's bytes stay the same).
    return [para(f"Re-trained by python -m study verify (its machine: environment.md): "
                 f"{v.get('n_identical', NA)} of "
                 f"{v.get('n_checked', NA)} sampled cells gave the recorded weights; "
                 f"{v.get('n_env_differs', NA)} ran where a key that decides the bits differs; "
                 f"{v.get('n_broken', NA)} broke the promise of a strict or portable mode.")]


def device_blocks(results: Results, table: RunTable) -> list[Block]:
    section = diag_section(results, "devices")
    if not applicable(section):
        if "cuda" not in set(table.runs["device"]):
            return [para("No GPU runs were in the data, so the lesson's cuDNN caveat (CPU "
                         "against GPU) was not measured here.")]
        return [not_measured("a paired CPU\u2013GPU gap", section)]
    recs = section.records
    keys = varying_keys(recs, ("determinism",))
    n_same = sum(r.n_identical for r in recs)
    n_hash = sum(r.n_hash_compared for r in recs)
    rows = tuple((fmt_setting(r), where(r.stratum, keys), str(r.n_pairs),
                  identical_text(r.n_identical, r.n_hash_compared),
                  fmt_pp(r.mean_diff, unit=False), fmt_ci_pp(r.mean_diff_ci95),
                  fmt_pp(r.max_abs_diff.test_acc, sign=False, unit=False),
                  fmt_p(r.p_adjusted), fmt_p(r.tost_p_adjusted),
                  r.verdict) for r in recs)
    header = ("setting", " / ".join(keys), "pairs", "identical", "\u0394 (pp)", "95% CI",
              "max |\u0394| (pp)", "p adj.", "TOST p adj.", "verdict")
    return [para(f"CUDA against CPU, paired by cell: {n_same} of {n_hash} pairs gave identical "
                 f"weights (the two generators differ, so 0 is expected). The mean gap in final "
                 f"test accuracy (cuda \u2212 cpu) is {records_by_verdict(recs, results)}."),
            Table(header, rows, "Final test accuracy, CUDA minus CPU, paired by seed; p-values "
                  "Holm-adjusted over the settings.", "llrrrrrrrl")]


# C4 -------------------------------------------------------------------------------------------


def keep_rate_blocks(results: Results, figs: Sequence[FigureFile]) -> list[Block]:
    section = diag_section(results, "keep_rates")
    if not applicable(section):
        return [not_measured("the share of units each implementation keeps", section)]
    # p = 0 and p = 1 draw no mask: every implementation keeps all or nothing by construction.
    recs = sorted((r for r in section.records if 0 < r.p < 1),
                  key=lambda r: r.implementation != "torch")  # the reference first
    rows = tuple((r.implementation, fmt_setting(r), str(r.layer), fmt_num(r.p, 1),
                  str(r.n), fmt_pct(r.observed, 1), fmt_pct(r.nominal, 1),
                  fmt_pct(r.expected, 1), fmt_num(r.activation_scale))
                 for r in recs)
    header = ("implementation", "setting", "layer", "p", "runs", "kept", "nominal 1\u2212p",
              "expected", "activation scale")
    blocks: list[Block] = [
        para("Share of live units each dropout layer kept in training, averaged over first runs. "
             "Expected is what the code draws: 1 \u2212 p for torch and scratch, "
             "P(N(0,1) > p) for scratch-randn (the lesson's torch.randn(X.shape) > p). The "
             "activation scale is kept share \u00d7 1/(1 \u2212 p), the mean factor a unit is "
             "multiplied by in training; correct inverted dropout gives 1."),
        Table(header, rows, "Measured keep rates per implementation, setting and layer (p = 0 "
              "and p = 1 draw no mask and are left out).", "llrrrrrrr")]
    off = [para(keep_finding(r)) for r in _worst_keep_records(section.records)]
    blocks += [Bullets(tuple(off))] if off else []
    return blocks + figures_named(figs, "keep_rates")


def _worst_keep_records(records: Sequence[KeepRecord]) -> list[KeepRecord]:
    """Per implementation that misses its nominal rate, the record furthest from it."""
    worst: dict[str, KeepRecord] = {}
    for r in records:
        if r.matches_nominal is False and finite(r.deviation):
            best = worst.get(r.implementation)
            if best is None or abs(r.deviation) > abs(best.deviation):
                worst[r.implementation] = r
    return [worst[k] for k in sorted(worst)]


def keep_finding(r: KeepRecord) -> str:
    """One layer's measured keep rate against the nominal one, and what the rescaling then
    does to a live unit on average."""
    at = f"{r.implementation} at p = {r.p:g} (layer {r.layer})"
    if r.observed is None:
        return f"{at}: no keep rate recorded."
    text = f"{at} keeps {fmt_pct(r.observed, 1)} of live units against a nominal {fmt_pct(r.nominal, 1)}"
    if r.matches_nominal:
        return text + "."
    if r.implementation == "scratch-randn" and r.matches_expected:
        text += f" (P(N(0,1) > {r.p:g}) = {fmt_pct(r.expected, 1)})"
    if r.rescale is not None:
        text += (f", yet rescales by 1/(1\u2212p) = {fmt_num(r.rescale)}, so a live unit is "
                 f"multiplied by {fmt_num(r.activation_scale)} on average in training instead "
                 f"of 1")
    return text + "."


def equivalence_blocks(results: Results) -> list[Block]:
    section = diag_section(results, "implementations")
    if not applicable(section):
        return [not_measured("a paired test between implementations", section)]
    recs = section.records
    keys = varying_keys(recs, ("device",))
    adaptive = [r for r in recs if r.adaptive]
    rows = tuple((r.implementation, fmt_setting(r), where(r.stratum, keys),
                  str(r.n_pairs), fmt_pp(r.mean_diff, unit=False),
                  fmt_ci_pp(gap_interval(r)), fmt_p(r.p_adjusted),
                  fmt_p(r.tost_p_adjusted), *([fmt_p(r.p_anytime)] if adaptive else []),
                  r.verdict, _settle_cell(r)) for r in recs)
    header = ("implementation", "setting", " / ".join(keys), "pairs", "\u0394 (pp)",
              _interval_header(recs), "p adj.", "TOST p adj.",
              *(["anytime p"] if adaptive else []), "verdict",
              "stop" if len(adaptive) == len(recs) else "seeds needed" if not adaptive
              else "seeds needed / stop")
    impls = sorted({r.implementation for r in recs})
    summary = [para(f"{impl} vs torch: ",
                    records_by_verdict([r for r in recs if r.implementation == impl], results), ".")
               for impl in impls]
    return [para(f"Each implementation against nn.Dropout (torch), paired by seed, with a "
                 f"t-test and TOST at ±{fmt_pp(section.margin, sign=False)}, "
                 f"Holm-adjusted within each stratum.", _adaptive_c4_text(adaptive, recs)),
            Bullets(tuple(summary)),
            Table(header, rows, "Final test accuracy, implementation minus torch, paired by "
                  "seed." + _adaptive_c4_note(adaptive), "lllrrrrr" + "r" * bool(adaptive)
                  + "lr")]


def _settle_cell(r: ImplementationRecord) -> str:
    """An adaptive record's stop; a fixed one's seeds needed when open (a dash when settled)."""
    if r.adaptive:
        return stop_text(r)
    return fmt_int(r.seeds_needed) if r.verdict == "inconclusive" else "\u2013"


def _interval_header(recs: Sequence[ImplementationRecord]) -> str:
    adaptive = sum(r.adaptive for r in recs)
    return "95% CS" if adaptive == len(recs) else "95% CI" if not adaptive else \
        "95% CS (adaptive) / CI"


def _adaptive_c4_text(adaptive: Sequence[ImplementationRecord],
                      recs: Sequence[ImplementationRecord]) -> str:
    """What decides the adaptive records: their CS, not the Holm-adjusted tests."""
    if not adaptive:
        return ""
    which = "Every comparison" if len(adaptive) == len(recs) else \
        f"{len(adaptive)} of {len(recs)} comparisons"
    return (f" {which} drove the protocol's adaptive rounds: its verdict is read off the "
            f"t-mixture's 95% confidence sequence (CS) at its stop, and the fixed-n p-values "
            f"and TOST beside it are descriptive; {ANYTIME_BASIS}.")


def _adaptive_c4_note(adaptive: Sequence[ImplementationRecord]) -> str:
    if not adaptive:
        return ""
    return (" Adaptive rows: the interval is the 95% CS at the stop, the verdict is read off "
            "it, anytime p is unadjusted, and the p adj. and TOST columns are descriptive.")


# Sources of variance ----------------------------------------------------------------------------


def sources_section(results: Results, figs: Sequence[FigureFile]) -> list[Block]:
    section = diag_section(results, "variance_sources")
    if not applicable(section):
        return []  # C5 says in one sentence that the protocol did not measure it
    recs, summaries = section.records, section.summaries
    keys = varying_keys(recs)
    rows = tuple((fmt_setting(r), *([where(r.stratum, keys)] if keys else []), r.source,
                  str(r.n), fmt_pp_exact(r.sd), fmt_ci_pp(r.sd_ci95, sign=False),
                  fmt_num(r.ratio) if r.source != "all" else "1 (ref.)",
                  fmt_ratio_ci(r.ratio_ci95), fmt_p(r.brown_forsythe_p_adjusted),
                  r.summers.replace("_", " ")) for r in recs)
    header = ("setting", *([" / ".join(keys)] if keys else []), "source varied", "seeds",
              "SD (pp)", "95% CI", "SD ratio", "95% CI", "BF p adj.", "vs S&D")
    low = section.low_ratio
    return [Heading(1, "Sources of variance"),
            para(f"Which random stream makes the seed-to-seed spread? Each source "
                 f"(initialisation, data order, dropout masks) was varied alone with the others "
                 f"held at a fixed seed, and its SD compared with the SD when all vary. "
                 f"{_bitflip_text(recs)}"
                 f"{SUMMERS} report that any single source alone gives about the full spread; "
                 f"a source is consistent with that when its SD-ratio CI contains 1 and excludes "
                 f"{low:g}. SD CIs are the bootstrap intervals of the analysis; Brown\u2013Forsythe p-values are "
                 f"Holm-adjusted over the sources of one setting."),
            Table(header, rows, "Seed-to-seed SD of final test accuracy per varied source, and "
                  "its ratio to the SD when all sources vary.",
                  "l" + "l" * bool(keys) + "lrrrrrrl"),
            Bullets(tuple(para(f"{fmt_setting(s)}"
                               f"{', ' + where(s.stratum, keys) if keys else ''}: "
                               f"{summers_finding(s, recs, low)}{_omnibus_sources(s)}")
                          for s in summaries)),
            *figures_named(figs, "variance_sources")]


def summers_finding(s: SourceSummary, records: Sequence[SourceRecord], low: float) -> str:
    """How the single sources of one setting bear on Summers & Dinneen's claim, each named."""
    singles = [r for r in records if r.source != "all" and r.stratum == s.stratum
               and (r.dropout1, r.dropout2) == (s.dropout1, s.dropout2)]
    detail = ", ".join(f"{r.source}: {r.summers.replace('_', ' ')}" for r in singles)
    return {
        "agree": f"The data agree with {SUMMERS}: each single source alone gives a spread "
                 f"whose SD-ratio CI contains 1 and excludes {low:g} ({detail}).",
        "disagree": f"The data disagree with {SUMMERS} for at least one source ({detail}).",
        "inconclusive": f"Inconclusive against {SUMMERS}: no source is shown smaller or larger "
                        f"than the full spread, but not every CI excludes {low:g} ({detail}).",
        "not_computable": f"No comparison with {SUMMERS} possible for every source ({detail}).",
    }[s.agreement]


def _bitflip_text(recs: Sequence[SourceRecord]) -> str:
    if not any(r.source == "bitflip" for r in recs):
        return ""
    return ("The bitflip arm is their one-bit experiment: every stream stays at the fixed seed "
            "and each seed flips the lowest mantissa bit of one initial weight, so its spread is "
            "that of arithmetic alone. ")


def _omnibus_sources(s: SourceSummary) -> str:
    if not finite(s.omnibus.p):
        return ""
    return f" Brown\u2013Forsythe across all sources: p {p_rel(s.omnibus.p)}."


# Headline findings for the abstract --------------------------------------------------------------


def diagnostics_abstract(results: Results) -> str:
    lines = (_replicates_headline(results), _modes_headline(results),
             _devices_headline(results), _keep_headline(results), _impl_headline(results),
             _sources_headline(results))
    return " ".join(x for x in lines if x)


def _replicates_headline(results: Results) -> str:
    section = diag_section(results, "replicates")
    if not applicable(section):
        return ""
    keys = varying_keys(section.records, ("device",))  # constant columns would only pad
    cells = ", ".join(f"{r.n_identical}/{r.n_hash_compared} on {where(r.stratum, keys)}"
                      for r in section.records)
    return f"Re-running a cell with the same seed gave bit-identical weights in {cells}."


def _modes_headline(results: Results) -> str:
    section = diag_section(results, "modes")
    if not applicable(section):
        return ""
    recs = section.records
    quiet = [f"{r.mode} on {r.stratum['device']}" for r in recs if r.no_change_observed]
    loud = [f"{r.mode} on {r.stratum['device']} changed "
            f"{r.n_hash_compared - r.n_identical}/{r.n_hash_compared} weight hashes "
            f"(mean accuracy gap {fmt_pp(r.mean_diff)} {fmt_ci_pp(r.mean_diff_ci95)}, "
            f"{verdict_word(r.verdict, results.equivalence_margin)})"
            for r in recs if not r.no_change_observed]
    text = f"Against the \u2018{section.reference}\u2019 mode, "
    parts = ([f"no change was observed for {', '.join(quiet)} (a null result, not proof)"]
             if quiet else []) + loud
    return text + "; ".join(parts) + "."


def _devices_headline(results: Results) -> str:
    section = diag_section(results, "devices")
    if not applicable(section):
        return ""
    return (f"CUDA against CPU, paired by cell, the mean accuracy gap was "
            f"{verdict_counts(section.records, results.equivalence_margin)}.")


def _keep_headline(results: Results) -> str:
    section = diag_section(results, "keep_rates")
    if not applicable(section):
        return ""
    return " ".join(f"{r.implementation} keeps {fmt_pct(r.observed, 1)} of units at "
                    f"p = {r.p:g} (nominal {fmt_pct(r.nominal, 1)}), so live units are "
                    f"scaled by {fmt_num(r.activation_scale)} on average in training."
                    for r in _worst_keep_records(section.records))


def _impl_headline(results: Results) -> str:
    section = diag_section(results, "implementations")
    if not applicable(section):
        return ""
    recs = section.records
    impls = sorted({r.implementation for r in recs})
    return "Against nn.Dropout: " + "; ".join(
        f"{i} {verdict_counts([r for r in recs if r.implementation == i], results.equivalence_margin)}"
        for i in impls) + "."








def _sources_headline(results: Results) -> str:
    section = diag_section(results, "variance_sources")
    if not applicable(section) or not section.summaries:
        return ""
    summaries = section.summaries
    words = {"agree": "agree", "disagree": "disagree", "inconclusive": "are inconclusive",
             "not_computable": "cannot be compared"}
    parts = [f"{w} in {sum(s.agreement == a for s in summaries)}" for a, w in words.items()
             if any(s.agreement == a for s in summaries)]
    return (f"Varying one random source at a time, set against {SUMMERS} the data "
            f"{', '.join(parts)} of {len(summaries)} settings.")


def figures_named(figs: Sequence[FigureFile], name: str) -> list[Block]:
    return [Fig(f) for f in figs if f.name == name]


