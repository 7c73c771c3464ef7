"""The per-stratum results tables: groups, the primary comparisons, the multiverse of verdicts,
what it would take, and spread. Every cell is read from `Results`."""

from __future__ import annotations

from study.report.context import in_stratum
from study.report.document import Block, Bullets, Heading, Table, para
from study.report.wording import (CORRECTION, NA, approx_label, endpoint_text, finite,
                                  gap_interval,
                                  fmt_ci_num, fmt_ci_pct, fmt_ci_pp, fmt_int, fmt_num, fmt_p,
                                  fmt_pct, fmt_pp, fmt_setting, margin_text, p_rel,
                                  tost_interval_cell, variance_phrase, verdict_cell)
from study.results import TEST_NAMES, Comparison, Results, Stratum


def stratum_results(r: Results, stratum: Stratum) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Stratum {stratum.label}"), para(_omnibus_text(stratum))]
    if stratum.notes:
        blocks.append(Bullets(tuple(para(n) for n in stratum.notes)))
    blocks.append(summary_table(r, stratum))
    comps = in_stratum(r.comparisons, stratum.stratum)
    if not comps:
        return blocks
    blocks += [comparison_table(r, stratum, comps), multiverse_table(r, stratum, comps),
               multiverse_estimates_table(r, stratum, comps), power_table(r, stratum, comps), spread_table(r, stratum, comps),
               Bullets(tuple(para(f"{fmt_setting(c)}: ", variance_phrase(c, r)) for c in comps))]
    notes = [para(f"{fmt_setting(c)}: {c.reason}.") for c in comps if c.reason]
    return blocks + ([para("Notes from the analysis:"), Bullets(tuple(notes))] if notes else [])


def _omnibus_text(stratum: Stratum) -> str:
    o = stratum.omnibus
    name = {"friedman": "Friedman test", "welch_anova": "Welch ANOVA"}.get(o.test, "omnibus test")
    seeds = "the same seeds in every setting" if stratum.paired else \
        "not all seeds in every setting"
    head = f"{stratum.n_seeds} seeds per setting, {seeds}. "
    if not finite(o.p):
        return head + f"The {name} was not computed: {o.reason or 'no reason given'}."
    return head + f"{name}: statistic {fmt_num(o.statistic)}, p {p_rel(o.p)}."


def summary_table(r: Results, stratum: Stratum) -> Table:
    rows = []
    for g in in_stratum(r.groups, stratum.stratum):
        status = ", ".join(f"{k} {v}" for k, v in sorted(g.status_counts.items()))
        sd = f"{fmt_pp(g.sd, sign=False, unit=False)} {fmt_ci_pp(g.sd_ci95, sign=False)}"
        rows.append((fmt_setting(g), str(g.n), str(g.n_diverged), fmt_pct(g.mean),
                     fmt_ci_pct(g.ci95), sd, fmt_pct(g.median), fmt_num(g.train_loss_mean, 3),
                     fmt_pp(g.gap_mean, unit=False), status or NA,
                     f"{g.textbook_check_passed}/{g.n + g.n_excluded}"))
    header = ("setting", "n", "diverged", "mean acc.", "95% CI (%)", "SD (pp) [95% CI]",
              "median", "train loss", "gap (pp)", "status", "d2l check")
    return Table(header, tuple(rows),
                 f"{endpoint_text(r.endpoint).capitalize()} per setting, {stratum.label}. n = "
                 f"finite runs in the statistics; SD CI: bootstrap{approx_label('sd')}. Gap = "
                 f"train \u2212 test accuracy; d2l check = runs that would pass the textbook's "
                 f"end-of-training assertion.", "lrrrrrrrrll")


def _pairs(c: Comparison) -> str:
    return str(c.n_pairs) if c.paired else f"unpaired {c.n_setting}/{c.n_baseline}"


def comparison_table(r: Results, stratum: Stratum, comps: list[Comparison]) -> Table:
    rows = tuple((fmt_setting(c), fmt_pp(c.mean_diff, unit=False), fmt_ci_pp(gap_interval(c)),
                  _pairs(c), fmt_p(c.p_adjusted), fmt_p(c.rank_p_adjusted), fmt_num(c.hedges_g),
                  fmt_p(c.tost_p_adjusted), tost_interval_cell(c, r.alpha),
                  c.verdict + (" (by construction)" if c.settled_by_construction else ""),
                  {True: "yes", False: "no"}.get(c.robust, NA)) for c in comps)
    header = ("setting", "\u0394 (pp)", "95% CS" if r.adaptive else "95% CI", "pairs", "p adj.",
              "rank p adj.", "g",
              "TOST p adj.", "TOST interval", "verdict", "robust")
    return Table(header, rows,
                 f"Primary analysis ({endpoint_text(r.endpoint)}, t test) vs baseline "
                 f"{fmt_setting(r.baseline)}, {stratum.label}; p-values {CORRECTION}-adjusted. "
                 f"TOST interval: the CI whose lying inside {margin_text(r)} is the TOST decision, "
                 f"at the level shown (* = {CORRECTION}-adjusted level; "
                 f"{fmt_num((1 - 2 * r.alpha) * 100, 0)}% unadjusted)." + _adaptive_note(r),
                 "lrrrrrrrrll")


def _adaptive_note(r: Results) -> str:
    if r.adaptive is None:
        return ""
    return (" Adaptive design: the verdict and the 95% CS come from the anytime-valid rule at "
            "each comparison's stop, each from its own 95% CS (not adjusted across "
            "comparisons); the p-values and TOST columns are descriptive.")


def multiverse_columns(r: Results) -> list[tuple[str, str]]:
    return [(e, t) for e in r.robustness_endpoints for t in r.robustness_tests]


def multiverse_table(r: Results, stratum: Stratum, comps: list[Comparison]) -> Table:
    columns = multiverse_columns(r)
    rows = []
    for c in comps:
        cells = {(a.endpoint, a.test): verdict_cell(a.verdict, a.mean_diff) for a in c.multiverse}
        rows.append((fmt_setting(c), *(cells.get(k, NA) for k in columns)))
    header = ("setting", *(f"{e} {t}" + ("*" if (e, t) == (r.endpoint, "t") else "")
                           for e, t in columns))
    return Table(header, tuple(rows),
                 f"Verdict of every analysis in the robustness set, {stratum.label}: endpoint "
                 f"\u00d7 test (t: t test; rank: {TEST_NAMES['rank']}; trimmed: "
                 f"{TEST_NAMES['trimmed']}), each its own {CORRECTION} family; * = primary. "
                 f"(+)/(\u2212): the sign of a difference.", "l" * (len(columns) + 1))


# What each test estimates: the mean gap, the Hodges-Lehmann shift, the trimmed-mean gap.
ESTIMATES = {"t": "mean gap", "rank": "HL shift", "trimmed": "trimmed-mean gap"}


def multiverse_estimates_table(r: Results, stratum: Stratum, comps: list[Comparison]) -> Table:
    """Each robustness analysis's own estimate and 95% interval, one row per setting and
    endpoint: the numbers behind the verdicts of the multiverse table."""
    rows = []
    for c in comps:
        cells = {(a.endpoint, a.test): f"{fmt_pp(a.mean_diff, unit=False)} {fmt_ci_pp(a.ci95)}"
                 if finite(a.mean_diff) else NA for a in c.multiverse}
        rows += [(fmt_setting(c), e, *(cells.get((e, t), NA) for t in r.robustness_tests))
                 for e in r.robustness_endpoints]
    header = ("setting", "endpoint", *(f"{t}: {ESTIMATES.get(t, t)} (pp) [95% CI]"
                                       for t in r.robustness_tests))
    short = any(a.test == "rank" and a.ci95 is None and finite(a.mean_diff)
                for c in comps for a in c.multiverse)
    return Table(header, tuple(rows),
                 f"Estimate and 95% interval of every analysis in the robustness set, "
                 f"{stratum.label}, each test's own: t interval of the mean gap; Hodges\u2013"
                 f"Lehmann shift with its distribution-free interval (exact signed-rank or "
                 f"Mann\u2013Whitney law); 20%-trimmed-mean gap with Yuen's interval. "
                 f"Unadjusted intervals; the verdicts above are {CORRECTION}-adjusted."
                 + (" n/a after an HL shift: too few runs for a 95% rank interval (paired, it "
                    "takes 6 seeds: with 5, even the widest interval covers only 93.75%)."
                    if short else ""),
                 "ll" + "r" * len(r.robustness_tests))


def power_table(r: Results, stratum: Stratum, comps: list[Comparison]) -> Table:
    rows = tuple((fmt_setting(c), c.verdict, fmt_pp(c.mde, sign=False, unit=False),
                  fmt_int(c.seeds_needed), fmt_int(c.seeds_needed_margin),
                  fmt_int(c.seeds_needed_equivalence)) for c in comps)
    header = ("setting", "verdict", "MDE (pp)", "seeds: observed gap",
              f"seeds: gap of {margin_text(r)}", "seeds: equivalence if gap 0")
    return Table(header, rows,
                 f"What it would take, {stratum.label}: seeds per setting for {r.power:.0%} power "
                 f"(observed SD), to detect the observed gap, a gap the size of the margin, and "
                 f"for TOST to show equivalence if the true gap were 0. MDE = the smallest gap "
                 f"these seeds detect at that power.", "llrrrr")


def spread_table(r: Results, stratum: Stratum, comps: list[Comparison]) -> Table:
    rows = []
    for c in comps:
        verdict = {"different": "different", "not_shown_different": "not shown different"}.get(
            c.variance_verdict, NA)
        rows.append((fmt_setting(c), fmt_num(c.sd_ratio), fmt_ci_num(c.sd_ratio_ci95),
                     fmt_p(c.brown_forsythe_p), fmt_p(c.fligner_p),
                     fmt_p(c.variance_p_adjusted), verdict))
    header = ("setting", "SD ratio", "95% CI", "Brown\u2013Forsythe p", "Fligner p",
              "p adj.", "verdict")
    return Table(header, tuple(rows), f"Seed-to-seed spread vs baseline, {stratum.label} (ratio "
                 f"of SDs, setting / baseline; CI: bootstrap{approx_label('sd_ratio')}). The "
                 f"verdict is the Brown\u2013Forsythe test (Holm-adjusted), not the interval: "
                 f"the test compares absolute deviations from each group's median, which one far "
                 f"seed sways less than it sways the SD the interval resamples, so an interval "
                 f"that excludes 1 can sit beside \u201cnot shown different\u201d.", "lrrrrrl")
