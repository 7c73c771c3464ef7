"""The paper around the claims: abstract, question, method, results (tables in `tables`),
reproducibility, threats and appendix. Every number is read from `Results`; what ran is read
from the protocol.
"""

from __future__ import annotations

import yaml

from study.report import figures
from study.report.figures import setting_label
from study.report import describe, environment
from study.report.claims import question_bullets, verdicts_section
from study.report.context import Inputs, find_group, in_stratum
from study.report.diagnostics import diagnostics_abstract, sources_section
from study.report.document import (Abstract, Appendix, Block, Bullets, Code, CodeBlock, Fig,
                                   Heading, Para, Table, para)
from study.report.tables import stratum_results
from study.report.wording import (ANYTIME_BASIS, COVERAGE_FLOOR, CORRECTION, INTERVALS, NA, approximate,
                                   gap_interval,
                                  count, coverage, endpoint_text, finite, fmt_ci_pp, fmt_mean_sd,
                                  fmt_num, fmt_pct, fmt_pp, fmt_setting, margin_text,
                                  short_verdict)
from study.results import TEST_NAMES, Results, Stratum
from study.analysis.table import STRATUM_COLUMNS, RunTable, stratum_words



def title(table: RunTable) -> str:
    return ("Does dropout help? Re-running the d2l dropout lesson across seeds: "
            f"{table.experiment_name}")


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
    strata = f"{len(r.strata)} strat{'um' if len(r.strata) == 1 else 'a'}"
    parts = [f"{what} under {count(len(settings), 'dropout setting')} with "
             f"{count(len(seeds), 'seed')} each ({count(len(table.runs), 'run')} in {strata}, "
             f"analysed separately) to test claims the lesson drew from single runs. Accuracies "
             f"are mean ± SD over seeds; differences are to the baseline "
             f"{fmt_setting(r.baseline)} with 95% CIs, on the primary endpoint "
             f"({endpoint_text(r.endpoint)}), each verdict checked under "
             f"{len(r.robustness_endpoints) * len(r.robustness_tests)} analyses."]
    parts += [_stratum_abstract(inputs, s) for s in r.strata[:max_strata]]
    if len(r.strata) > max_strata:
        parts.append(f"The other {len(r.strata) - max_strata} strata are reported in Section 3.")
    parts.append(diagnostics_abstract(r))
    return Para((" ".join(p for p in parts if p),))


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
            f"{fmt_setting(c)} {fmt_pp(c.mean_diff)} {fmt_ci_pp(gap_interval(c))}, "
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
            *statistics_blocks(inputs.results)]


def compact_ints(values: list[int]) -> str:
    if not values:
        return NA
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}\u2013{values[-1]} ({len(values)} seeds)"
    return ", ".join(str(v) for v in values)


def _protocol_blocks(inputs: Inputs) -> list[Block]:
    return [Heading(2, "Protocol"), *protocol_table(inputs), *strata_blocks(inputs.results)]


def strata_blocks(r: Results) -> list[Block]:
    """Say once what every run shares, and which columns split the runs into strata."""
    if not r.strata:
        return []
    shared = [stratum_words(c, r.strata[0].stratum.get(c)) for c in STRATUM_COLUMNS
              if c not in r.stratified_by]
    split = (f"The runs are analysed separately (never pooled) by {', '.join(r.stratified_by)}; "
             f"each table names its stratum by those columns. ") if r.stratified_by else \
        "All runs form one stratum. "
    return [para(split + "Every run shares: " + "; ".join(shared) + ".")]


def protocol_table(inputs: Inputs) -> list[Block]:
    """What ran, as a table read from the resolved protocol (a sentence when none was logged)."""
    p, setup = inputs.table.protocol, inputs.setup
    seeds = compact_ints(sorted(set(int(s) for s in inputs.table.runs["seed"])))
    if not p:
        return [para(f"No resolved protocol was logged with these runs (they came from outside "
                     f"the harness), so the model, data and training are not recorded. The runs "
                     f"used seeds {seeds}.")]
    rows = (
        ("protocol", str(p.get("name", NA))),
        ("description", str(p.get("description") or NA)),
        ("model", setup.model),
        ("training", setup.training),
        ("data", setup.data),
        ("settings (dropout1, dropout2)",
         ", ".join(setting_label(*s) for s in p.get("dropout", []))),
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
    return [para("Each cell (setting \u00d7 seed \u00d7 device \u00d7 determinism mode \u00d7 "
                 "implementation) is one training run logged to MLflow. Test accuracy is measured "
                 "on the 10,000 test images in eval mode after every epoch; train loss and "
                 "accuracy are minibatch averages in train mode (dropout on)."),
            Table(("item", "value"), rows, "Resolved protocol (full text in Appendix A).", "ll")]


def _environment_blocks(table: RunTable) -> list[Block]:
    """The machine stays out of the PDF (`environment`); the flags a mode sets stay in."""
    flags = environment.flags(table)
    blocks: list[Block] = [Heading(2, "Hardware and software"), para(environment.pointer())]
    if flags:
        blocks.append(para("Determinism flags as applied (set by the mode, the same on every "
                           "machine): ", "; ".join(f"{k} = {v}" for k, v in sorted(flags.items())),
                           "."))
    return blocks


def statistics_blocks(r: Results) -> list[Block]:
    margin = margin_text(r)
    return [Heading(2, "Statistics"),
            para(f"Strata (device, determinism mode, implementation, execution, randomness, mask "
                 f"generator, varied streams, CPU threads) are analysed separately and never pooled. Within a "
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
            *([para(adaptive_text(r))] if r.adaptive is not None else []),
            *_diagnostics_method(r)]


def adaptive_text(r: Results) -> str:
    """The adaptive design in words: what decided the verdicts and what is only descriptive."""
    a = r.adaptive
    stop = ("stops once no later seed can change what the report says (the CS wholly inside "
            "the margin, or wholly beyond it)" if a.stop == "settled" else
            "stops at its first verdict other than inconclusive")
    done = {"settled": "every comparison has stopped", "max_runs": "the run budget stopped it",
            None: "rounds remain"}[a.study_stop]
    return (f"The study was adaptive: every setting started with {a.start} seeds, and after "
            f"each round the settings of every comparison still open (and the baseline where "
            f"it pairs) got {a.round} more, up to {a.max_seeds} seeds per setting and "
            f"{a.max_runs} runs in all ({a.rounds} rounds, {a.runs} runs; {done}). Each "
            f"comparison is decided by an anytime-valid test, the t-mixture (precision "
            f"{a.mixture_precision:.2f}), whose 95% confidence sequence (CS) keeps its "
            f"coverage under this optional stopping; a comparison {stop}, or at the cap. Its "
            f"interval is the CS at the stop, never a t interval, which early stopping would "
            f"bias; its p-value is anytime-valid. Here {ANYTIME_BASIS}; the {CORRECTION} "
            f"adjustment above applies to the fixed-n analyses only. The other analyses "
            f"(endpoints \u00d7 tests) "
            f"ran at the sample size the rule chose: their p-values and the robustness they "
            f"give are descriptive.")


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
        blocks += stratum_results(r, stratum)
    blocks.append(Heading(2, "Figures"))
    blocks.append(para("Each figure has one panel per stratum" if len(r.strata) > 1
                       else "All figures show the single stratum",
                       f" ({'; '.join(s.label for s in r.strata)})."))
    # Diagnostic figures sit with the claim they answer, not among the per-stratum ones.
    blocks += [Fig(f) for f in inputs.figs
               if f.name not in figures.DIAGNOSTIC_FIGURES + figures.CLAIM_FIGURES]
    return blocks


# --- the rest of the paper ---------------------------------------------------------------------


def reproducibility_section(table: RunTable) -> list[Block]:
    name = (table.protocol or {}).get("name") or table.experiment_name
    protocol_file = f"protocols/{name}.yaml"
    promise = environment.portable_promise(table, protocol_file)
    return [Heading(1, "Reproducibility"),
            para("Everything here is regenerated from the MLflow store (experiment ",
                 Code(str(table.experiment_name)), "); finished cells are skipped, so rerunning "
                 "resumes rather than repeats.", f" {promise}" if promise else ""),
            CodeBlock(f"make study\npython -m study report {protocol_file}", "sh"),
            para(environment.pointer())]


def _budget_threat(inputs: Inputs) -> Para:
    p = inputs.table.protocol
    if not p:
        return para("The model, learning rate and epoch budget were not recorded with these "
                    "runs, so the verdicts cannot be tied to them.")
    train = p.get("training") or {}
    lr = "" if train.get("by_size") else f" ({train.get('lr')})"
    return para(f"One model ({inputs.setup.model_short}), learning rate{lr} and "
                f"epoch budget ({describe.budget_text(train)}). With more epochs or a larger "
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


def resolved_yaml(table: RunTable) -> str:
    """The resolved protocol logged with the runs, as YAML (a comment when none was logged)."""
    proto = yaml.safe_dump(table.protocol, sort_keys=False, allow_unicode=True,
                           default_flow_style=None) \
        if table.protocol else "# no protocol was logged with these runs\n"
    return proto.rstrip("\n")


def appendix(table: RunTable) -> list[Block]:
    rows = tuple((str(k), str(v)) for k, v in sorted(environment.flags(table).items()))
    return [Appendix(), Heading(1, "Resolved protocol"), CodeBlock(resolved_yaml(table), "yaml"),
            Heading(1, "Environment"), para(environment.pointer()),
            Table(("key", "value"), rows or (("(none recorded)", ""),),
                  "Determinism flags recorded with the runs (set by their mode).", "ll")]
