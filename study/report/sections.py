"""The paper around the claims: abstract, question, method, results tables, reproducibility,
threats and appendix. Every number is read from `Results`; what ran is read from the protocol.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from study import figures, stats
from study.figures import setting_label
from study.report.claims import question_bullets, verdicts_section
from study.report.context import Inputs, find_group, in_stratum
from study.report.diagnostic_text import diagnostics_abstract, sources_section
from study.report.document import (Abstract, Appendix, Block, Bullets, Code, CodeBlock, Fig,
                                   Heading, Para, Table, para)
from study.report.wording import (CORRECTION, NA, endpoint_text, finite,
                                  fmt_ci_num, fmt_ci_pct, fmt_ci_pp, fmt_int, fmt_mean_sd,
                                  fmt_num, fmt_p, fmt_pct, fmt_pp, fmt_setting, margin_text,
                                  p_rel, tost_interval_cell, variance_phrase, verdict_cell,
                                  verdict_word)
from study.results import TEST_NAMES, Comparison, Results, Stratum
from study.table import RunTable

# Interval names in `stats.COVERAGE` and what the report calls them.
INTERVALS = {"mean": "group mean", "sd": "group SD", "sd_ratio": "SD ratio"}
COVERAGE_FLOOR = 0.90  # below this at n = 10 an interval is labelled "approximate"


def title(table: RunTable) -> str:
    return f"Does dropout help? Re-running the d2l dropout lesson across seeds: {table.experiment_name}"


def document(inputs: Inputs) -> list[Block]:
    return [Abstract(abstract(inputs)), *question_section(inputs), *method_section(inputs),
            *results_section(inputs), *verdicts_section(inputs),
            *sources_section(inputs.results, inputs.figs), *reproducibility_section(inputs.table),
            *threats_section(inputs), *appendix(inputs.table)]


# --- abstract ----------------------------------------------------------------------------------


def abstract(inputs: Inputs, max_strata: int = 3) -> Para:
    r, table = inputs.results, inputs.table
    settings = sorted({(g.dropout1, g.dropout2) for g in r.groups})
    seeds = sorted(set(int(s) for s in table.runs["seed"]))
    what = (f"We trained {inputs.setup.model_short} on Fashion-MNIST" if inputs.setup.recorded
            else "We analysed runs of a model whose set-up was not recorded")
    parts = [f"{what} under {len(settings)} dropout settings with {len(seeds)} seeds each "
             f"({len(table.runs)} runs in {len(r.strata)} strata, analysed separately) to test "
             f"claims the lesson drew from single runs. Accuracies are mean ± SD over seeds; "
             f"differences are to the baseline {fmt_setting(r.baseline)} with 95% CIs, on the "
             f"primary endpoint ({endpoint_text(r.endpoint)}), each verdict checked under "
             f"{len(r.robustness_endpoints) * len(r.robustness_tests)} analyses."]
    parts += [_stratum_abstract(inputs, s) for s in r.strata[:max_strata]]
    if len(r.strata) > max_strata:
        parts.append(f"The other {len(r.strata) - max_strata} strata are reported in Section 3.")
    parts.append(diagnostics_abstract(r))
    return Para((" ".join(p for p in parts if p),))


def short_verdict(c: Comparison, r: Results) -> str:
    if c.verdict == "different":
        text = f"different after {CORRECTION} correction (p {p_rel(c.p_adjusted)})"
    elif c.verdict == "equivalent":
        text = f"no real difference: equivalent within {margin_text(r)}"
    else:
        text = verdict_word(c.verdict, r.equivalence_margin)
    robust = {True: "robust", False: "not robust"}.get(c.robust, "robustness not assessed")
    return f"{text}, {robust}"


def _stratum_abstract(inputs: Inputs, stratum: Stratum) -> str:
    r = inputs.results
    key = stratum.stratum
    groups = [g for g in in_stratum(r.groups, key) if finite(g.mean)]
    base = find_group(r, key, *r.baseline)
    lead = f"In {stratum.label}"
    if not groups or base is None:
        return f"{lead} the baseline could not be summarised."
    best = max(groups, key=lambda g: g.mean)
    if best is not base:
        text = (f"{lead}, {fmt_setting(best)} reached {fmt_mean_sd(best)} vs {fmt_mean_sd(base)} "
                f"for the baseline {fmt_setting(r.baseline)}.")
    else:
        text = f"{lead}, the baseline {fmt_setting(r.baseline)} was best at {fmt_mean_sd(base)}."
    comps = in_stratum(r.comparisons, key)
    if comps:
        text += " Against it: " + "; ".join(
            f"{fmt_setting(c)} {fmt_pp(c.mean_diff)} {fmt_ci_pp(c.mean_diff_ci95)}, "
            f"{short_verdict(c, r)}" for c in comps) + "."
    return text


# --- question ----------------------------------------------------------------------------------


def question_section(inputs: Inputs) -> list[Block]:
    ran = (f"These runs trained {inputs.setup.model}." if inputs.setup.recorded
           else f"The model these runs trained is {inputs.setup.model}.")
    return [
        Heading(1, "The question"),
        para("The lesson (a write-up of the d2l.ai Dropout chapter) trains an MLP with dropout "
             "after each hidden layer and, from one run per setting, concludes:"),
        question_bullets(),
        para(f"Each claim rests on a single run. {ran} Every setting is repeated across seeds and "
             "each claim gets a measured answer: a difference, an equivalence within a stated "
             "margin, or an honest \u201cnot shown\u201d with the number of seeds it would take."),
    ]


# --- method ------------------------------------------------------------------------------------


def method_section(inputs: Inputs) -> list[Block]:
    return [Heading(1, "Method"), *_protocol_blocks(inputs), *_environment_blocks(inputs.table),
            *_statistics_blocks(inputs.results)]


def compact_ints(values: list[int]) -> str:
    if not values:
        return NA
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}\u2013{values[-1]} ({len(values)} seeds)"
    return ", ".join(str(v) for v in values)


def _protocol_blocks(inputs: Inputs) -> list[Block]:
    p, setup = inputs.table.protocol, inputs.setup
    seeds = compact_ints(sorted(set(int(s) for s in inputs.table.runs["seed"])))
    if not p:
        return [Heading(2, "Protocol"),
                para(f"No resolved protocol was logged with these runs (they came from outside "
                     f"the harness), so the model, data and training are not recorded. The runs "
                     f"used seeds {seeds}.")]
    rows = (
        ("protocol", str(p.get("name", NA))),
        ("description", str(p.get("description") or NA)),
        ("model", setup.model),
        ("training", setup.training),
        ("data", setup.data),
        ("settings (dropout1, dropout2)", ", ".join(setting_label(*s) for s in p.get("dropout", []))),
        ("baseline", setting_label(*p["baseline"]) if p.get("baseline") else NA),
        ("seeds", f"{seeds} (fixed seed for held streams: {p.get('seeds', {}).get('fixed')})"),
        ("devices", ", ".join(p.get("devices", []))),
        ("determinism modes", ", ".join(p.get("determinism", []))),
        ("implementations", ", ".join(p.get("implementations", []))),
        ("random streams varied", ", ".join(p.get("vary", []))),
        ("execution / randomness", f"{p.get('execution')} / {p.get('randomness')}"),
        ("replicates per cell", str(p.get("replicates"))),
        ("CPU threads", str(p.get("threads") if p.get("threads") is not None else "torch default")),
    )
    return [Heading(2, "Protocol"),
            para("Each cell (setting \u00d7 seed \u00d7 device \u00d7 determinism mode \u00d7 "
                 "implementation) is one training run logged to MLflow. Test accuracy is measured "
                 "on the 10,000 test images in eval mode after every epoch; train loss and "
                 "accuracy are minibatch averages in train mode (dropout on)."),
            Table(("item", "value"), rows, "Resolved protocol (full text in Appendix A).", "ll")]


ENV_SUMMARY = (("torch_version", "PyTorch"), ("cuda_version", "CUDA"), ("cudnn_version", "cuDNN"),
               ("device_name", "device"), ("cpu", "CPU"), ("threads", "threads"),
               ("python_version", "Python"), ("mlflow_version", "MLflow"),
               ("git_commit", "git commit"))


def _environment_blocks(table: RunTable) -> list[Block]:
    env = table.environment or {}
    known = [f"{label} {env[key]}" for key, label in ENV_SUMMARY if env.get(key) not in (None, "")]
    flags = {k: v for k, v in env.items() if _is_flag(k)}
    text = ("Runs recorded: " + "; ".join(known) + ".") if known else \
        "No environment tags were recorded with these runs."
    blocks: list[Block] = [Heading(2, "Hardware and software"), para(text)]
    if flags:
        blocks.append(para("Determinism flags as applied: ",
                           "; ".join(f"{k} = {v}" for k, v in sorted(flags.items())),
                           ". The full environment is in Appendix B."))
    return blocks


def _is_flag(key: str) -> bool:
    return bool(re.search(r"determin|cudnn_(benchmark|deterministic|enabled)|tf32|cublas", key))


def _statistics_blocks(r: Results) -> list[Block]:
    margin = margin_text(r)
    return [Heading(2, "Statistics"),
            para(f"Strata (device, determinism mode, implementation, execution, randomness, mask "
                 f"generator, varied streams) are analysed separately and never pooled. Within a "
                 f"stratum an omnibus test (Friedman with seeds as blocks when every setting has "
                 f"the same seeds, else Welch ANOVA) asks whether settings differ at all; each "
                 f"setting is then compared with the baseline {fmt_setting(r.baseline)}, paired on "
                 f"the seeds the two share (Welch when fewer than 3 are shared). Diverged runs "
                 f"are left out of the accuracy tests and counted: each setting's divergence rate "
                 f"is tested against the baseline's by Fisher's exact test."),
            para(_endpoint_text(r)),
            para(f"p-values are {CORRECTION}-adjusted within each stratum and analysis at "
                 f"\u03b1 = {r.alpha}. A comparison is \u201cdifferent\u201d when the adjusted "
                 f"test rejects and the gap is not shown inside {margin}; \u201cnegligible\u201d "
                 f"when it rejects and two one-sided tests (TOST) show the gap inside {margin} (a "
                 f"real gap, shown small); \u201cequivalent\u201d when TOST passes and the test "
                 f"does not reject; \u201cinconclusive\u201d otherwise. Beside each TOST verdict "
                 f"stands the interval whose lying inside {margin} is the same decision: the "
                 f"{fmt_num((1 - 2 * r.alpha) * 100, 0)}% CI for an unadjusted TOST, wider under "
                 f"{CORRECTION} (level named). A gap that is the same in every seed is settled by "
                 f"construction. For each comparison we report the seeds per setting needed at "
                 f"{r.power:.0%} power to detect the observed gap, a gap the size of the margin, "
                 f"and to show equivalence if the true gap were 0. Seed-to-seed spread is compared "
                 f"by the SD ratio (setting / baseline) with Brown\u2013Forsythe and "
                 f"Fligner\u2013Killeen tests."),
            para(bootstrap_text(r)),
            *_diagnostics_method(r)]


def _endpoint_text(r: Results) -> str:
    tests = ", ".join(TEST_NAMES.get(t, t) for t in r.robustness_tests)
    left = (f" Left out of the robustness set: {'; '.join(r.endpoints_left_out)}."
            if r.endpoints_left_out else "")
    return (f"The primary endpoint, declared before the runs, is {r.endpoint} "
            f"({endpoint_text(r.endpoint)}), analysed by the t test. Every comparison is also run "
            f"under the robustness set: endpoints {', '.join(r.robustness_endpoints)} crossed with "
            f"the {tests}, each its own {CORRECTION} family; the rank analyses decide equivalence "
            f"by the 90% Hodges\u2013Lehmann interval and the trimmed ones by Yuen's TOST. A "
            f"verdict is robust when every analysis gives it (and, for \u201cdifferent\u201d, the "
            f"same sign).{left}")


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


def bootstrap_text(r: Results) -> str:
    text = (f"Bootstrap intervals (of a group's mean and SD and of the SD ratio) are "
            f"scipy.stats.bootstrap BCa intervals with {r.bootstrap:,} resamples, seeded from "
            f"the analysis seed {r.seed}; paired comparisons resample seeds as pairs. Where BCa "
            f"is undefined (a constant group, such as a setting at chance) the analysis falls "
            f"back and says so in its notes.")
    measured = coverage()
    if not measured:
        return text + " The coverage of these intervals is not stated by this version of " \
                      "study.stats."
    parts = [f"{INTERVALS.get(name, name)} " + ", ".join(
        f"{fmt_pct(v, 1)} at n = {n}" for n, v in sorted(by_n.items()))
        for name, by_n in measured.items()]
    approx = sorted(INTERVALS.get(a, a) for a in approximate())
    text += f" Measured coverage of the nominal 95% intervals: {'; '.join(parts)}."
    if approx:
        text += (f" Below {fmt_pct(COVERAGE_FLOOR, 0)} at n = 10, these are labelled "
                 f"approximate: {', '.join(approx)}.")
    return text


def _diagnostics_method(r: Results) -> list[Para]:
    if not r.diagnostics:
        return []
    return [para("The diagnostics pair runs of the same cell (replicate against first run, "
                 "determinism mode against default, CUDA against CPU, each implementation "
                 "against torch) and compare them by weight hash and by a paired t-test and "
                 "TOST, Holm-adjusted within each family; shares of identical runs carry "
                 "Clopper\u2013Pearson CIs and SDs bootstrap CIs.")]


# --- results -----------------------------------------------------------------------------------


def results_section(inputs: Inputs) -> list[Block]:
    r = inputs.results
    blocks: list[Block] = [Heading(1, "Results")]
    if r.endpoints_left_out:
        blocks.append(para("Endpoints left out (the runs are too short for them): ",
                           "; ".join(r.endpoints_left_out), "."))
    for stratum in r.strata:
        blocks += _stratum_results(r, stratum)
    blocks.append(Heading(2, "Figures"))
    blocks.append(para("Each figure has one panel per stratum" if len(r.strata) > 1
                       else "All figures show the single stratum",
                       f" ({'; '.join(s.label for s in r.strata)})."))
    # Diagnostic figures sit with the claim they answer, not among the per-stratum ones.
    blocks += [Fig(f) for f in inputs.figs if f.name not in figures.DIAGNOSTIC_FIGURES]
    return blocks


def _stratum_results(r: Results, stratum: Stratum) -> list[Block]:
    blocks: list[Block] = [Heading(2, f"Stratum {stratum.label}"), para(_omnibus_text(stratum))]
    if stratum.notes:
        blocks.append(Bullets(tuple(para(n) for n in stratum.notes)))
    blocks.append(summary_table(r, stratum))
    comps = in_stratum(r.comparisons, stratum.stratum)
    if not comps:
        return blocks
    blocks += [comparison_table(r, stratum, comps), multiverse_table(r, stratum, comps),
               power_table(r, stratum, comps), spread_table(r, stratum, comps),
               Bullets(tuple(para(f"{fmt_setting(c)}: ", variance_phrase(c, r)) for c in comps))]
    return blocks


def _omnibus_text(stratum: Stratum) -> str:
    o = stratum.omnibus
    name = {"friedman": "Friedman test", "welch_anova": "Welch ANOVA"}.get(o.test, "omnibus test")
    head = (f"{stratum.n_seeds} seeds per setting, "
            f"{'the same seeds in every setting' if stratum.paired else 'not all seeds in every setting'}. ")
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
    rows = tuple((fmt_setting(c), fmt_pp(c.mean_diff, unit=False), fmt_ci_pp(c.mean_diff_ci95),
                  _pairs(c), fmt_p(c.p_adjusted), fmt_p(c.rank_p_adjusted), fmt_num(c.hedges_g),
                  fmt_p(c.tost_p_adjusted), tost_interval_cell(c, r.alpha),
                  c.verdict + (" (by construction)" if c.settled_by_construction else ""),
                  {True: "yes", False: "no"}.get(c.robust, NA)) for c in comps)
    header = ("setting", "\u0394 (pp)", "95% CI", "pairs", "p adj.", "rank p adj.", "g",
              "TOST p adj.", "TOST interval", "verdict", "robust")
    return Table(header, rows,
                 f"Primary analysis ({endpoint_text(r.endpoint)}, t test) vs baseline "
                 f"{fmt_setting(r.baseline)}, {stratum.label}; p-values {CORRECTION}-adjusted. "
                 f"TOST interval: the CI whose lying inside {margin_text(r)} is the TOST decision, "
                 f"at the level shown (* = {CORRECTION}-adjusted level; "
                 f"{fmt_num((1 - 2 * r.alpha) * 100, 0)}% unadjusted).", "lrrrrrrrrll")


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
                 f"of SDs, setting / baseline; CI: bootstrap{approx_label('sd_ratio')}).",
                 "lrrrrrl")


# --- the rest of the paper ---------------------------------------------------------------------


def reproducibility_section(table: RunTable) -> list[Block]:
    name = (table.protocol or {}).get("name") or table.experiment_name
    commit = (table.environment or {}).get("git_commit")
    return [Heading(1, "Reproducibility"),
            para("Everything here is regenerated from the MLflow store; finished cells are "
                 "skipped, so rerunning resumes rather than repeats.",
                 f" The runs were made at commit {commit}." if commit else ""),
            CodeBlock(f"make study\npython -m study report protocols/{name}.yaml", "sh"),
            para("MLflow experiment: ", Code(str(table.experiment_name)),
                 f" (id {table.experiment_id}).")]


def _budget_threat(inputs: Inputs) -> Para:
    p = inputs.table.protocol
    if not p:
        return para("The model, learning rate and epoch budget were not recorded with these "
                    "runs, so the verdicts cannot be tied to them.")
    train = p.get("training") or {}
    return para(f"One model ({inputs.setup.model_short}), learning rate ({train.get('lr')}) and "
                f"epoch budget ({train.get('epochs')} epochs). With more epochs or a larger "
                f"network, dropout may rank differently; the lesson itself suspects its model is "
                f"not overfitting enough for dropout to pay off.")


def threats_section(inputs: Inputs) -> list[Block]:
    n = sorted({s.n_seeds for s in inputs.results.strata if s.n_seeds})
    return [Heading(1, "Threats to validity"), Bullets((
        para(f"Few seeds ({', '.join(map(str, n)) or NA} per setting): small effects and spread "
             f"differences stay undetected; \u201cinconclusive\u201d and \u201cnot shown "
             f"different\u201d are statements about this sample size, not about the method."),
        _budget_threat(inputs),
        para("Train accuracy is measured with dropout on and averaged over the epoch, so the "
             "train\u2013test gap mixes regularisation noise with overfitting."),
        para("Only comparisons with the baseline are tested; statements about other pairs rest "
             "on means."),
        para("Strata are never pooled; a result in one stratum (device, determinism mode, "
             "implementation) need not carry over to another."),
        para("Bit-exact repeatability holds for the recorded library versions and hardware; other "
             "versions or GPUs may change the arithmetic."),
    ))]


def appendix(table: RunTable) -> list[Block]:
    proto = yaml.safe_dump(table.protocol, sort_keys=False, allow_unicode=True,
                           default_flow_style=None) \
        if table.protocol else "# no protocol was logged with these runs\n"
    env_rows = tuple((str(k), str(v)) for k, v in sorted((table.environment or {}).items()))
    return [Appendix(), Heading(1, "Resolved protocol"), CodeBlock(proto.rstrip("\n"), "yaml"),
            Heading(1, "Environment"),
            Table(("key", "value"), env_rows or (("(none recorded)", ""),),
                  "Environment tags recorded with the runs.", "ll")]
