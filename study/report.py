"""The paper-style report of a dropout study: results + run table in, PDF and Markdown twin out.

    python -m study report protocols/d2l-dropout.yaml

`write_report` builds the document once as a small list of blocks (headings, paragraphs, tables,
figures, code) and renders that list twice, to Typst (compiled to PDF by the `typst` package with
its embedded fonts only) and to Markdown, so the two can never say different things. Every number
in the text is read from the results dict; nothing about the findings is hard-coded.
Repeatability (C5), implementation equivalence and keep rates (C4) and the sources of variance
are worded from `results["diagnostics"]` (see study/diagnostics.py), the one place they are
computed; a section the protocol did not measure says so in one sentence.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typst
import yaml

from study import figures
from study.figures import FigureFile, setting_label
from study.table import RunTable

# Families shipped inside the typst package itself; ignore_system_fonts=True makes that binding.
BODY_FONT = "Libertinus Serif"
MONO_FONT = "DejaVu Sans Mono"
MINUS = "\u2212"
NA = "n/a"
TEXT_WIDTH_IN = 6.6  # A4 minus the page margins set in the preamble


@dataclass(frozen=True)
class ReportFiles:
    pdf: Path
    markdown: Path
    typst: Path
    figures: list[FigureFile] = field(default_factory=list)

    def all(self) -> list[Path]:
        """Every file written, for logging to the analysis run."""
        return [self.pdf, self.markdown, self.typst,
                *(path for f in self.figures for path in (f.png, f.svg))]


# --- document model: what both renderers understand -----------------------------------------


@dataclass(frozen=True)
class Strong:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


Inline = str | Strong | Code


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    parts: tuple[Inline, ...]


@dataclass(frozen=True)
class Bullets:
    items: tuple[Para, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str
    # 'l' or 'r' per column: numbers right-aligned so decimal points line up roughly.
    align: str = ""


@dataclass(frozen=True)
class Fig:
    file: FigureFile


@dataclass(frozen=True)
class CodeBlock:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Abstract:
    para: Para


@dataclass(frozen=True)
class Appendix:
    """Marks where appendix numbering (A, B, ...) starts."""


Block = Heading | Para | Bullets | Table | Fig | CodeBlock | Abstract | Appendix


def para(*parts: Inline) -> Para:
    return Para(tuple(parts))


# --- number formatting: the one place that decides how a number reads -----------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _signed(x: float, digits: int) -> str:
    text = f"{x:+.{digits}f}"
    return text.replace("-", MINUS)


def fmt_pct(x: Any, digits: int = 2) -> str:
    """An accuracy fraction as a percentage: 0.8812 -> '88.12%'."""
    return f"{x * 100:.{digits}f}%".replace("-", MINUS) if _finite(x) else NA


def fmt_pp(x: Any, digits: int = 2, sign: bool = True, unit: bool = True) -> str:
    """An accuracy difference as percentage points: 0.005 -> '+0.50 pp'."""
    if not _finite(x):
        return NA
    text = _signed(x * 100, digits) if sign else f"{x * 100:.{digits}f}".replace("-", MINUS)
    return f"{text} pp" if unit else text


def fmt_ci_pp(ci: Any, digits: int = 2, sign: bool = True) -> str:
    if not ci or not all(_finite(v) for v in ci):
        return NA
    return f"[{fmt_pp(ci[0], digits, sign, False)}, {fmt_pp(ci[1], digits, sign, False)}]"


def fmt_ci_pct(ci: Any, digits: int = 2) -> str:
    if not ci or not all(_finite(v) for v in ci):
        return NA
    return f"[{ci[0] * 100:.{digits}f}, {ci[1] * 100:.{digits}f}]"


def fmt_p(p: Any) -> str:
    if not _finite(p):
        return NA
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_rel(p: Any) -> str:
    """The relation and value after 'p': '= 0.004' or '< 0.001'."""
    text = fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def fmt_num(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}".replace("-", MINUS) if _finite(x) else NA


def fmt_mean_sd(group: dict[str, Any]) -> str:
    """'88.12% ± 0.31' (mean ± SD in pp)."""
    return f"{fmt_pct(group.get('mean'))} ± {fmt_pp(group.get('sd'), sign=False, unit=False)}"


def fmt_setting(item: dict[str, Any] | Sequence[float]) -> str:
    if isinstance(item, dict):
        return setting_label(item["dropout1"], item["dropout2"])
    return setting_label(*item)


# --- reading the results dict ----------------------------------------------------------------


def _same_setting(item: dict[str, Any], d1: float, d2: float) -> bool:
    return math.isclose(item["dropout1"], d1) and math.isclose(item["dropout2"], d2)


def find_group(results: dict[str, Any], stratum: dict[str, Any], d1: float,
               d2: float) -> dict[str, Any] | None:
    return next((g for g in results["groups"]
                 if g["stratum"] == stratum and _same_setting(g, d1, d2)), None)


def find_comparison(results: dict[str, Any], stratum: dict[str, Any], d1: float,
                    d2: float) -> dict[str, Any] | None:
    return next((c for c in results["comparisons"]
                 if c["stratum"] == stratum and _same_setting(c, d1, d2)), None)


def in_stratum(items: Iterable[dict[str, Any]], stratum: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in items if i["stratum"] == stratum]


def correction_name(results: dict[str, Any]) -> str:
    # The results schema names no correction; the analysis applies Holm unless it says otherwise.
    return str(results.get("correction", "Holm"))


# --- verdict wording: the rule lives here and only here --------------------------------------


def seeds_needed_text(c: dict[str, Any]) -> str:
    n = c.get("seeds_needed")
    if _finite(n):
        return f"about {int(math.ceil(n))} seeds per setting needed"
    why = c.get("reason") or "not computable"
    return f"seeds needed not computable: {why}"


def verdict_phrase(c: dict[str, Any], results: dict[str, Any]) -> str:
    """How a mean comparison reads. 'No real difference' is reserved for `equivalent`;
    `inconclusive` always says 'not shown different' and how many seeds would settle it."""
    margin = fmt_pp(results["equivalence_margin"], sign=False)
    corr = correction_name(results)
    verdict = c.get("verdict")
    if verdict == "different":
        return f"different after {corr} correction (p {p_rel(c.get('p_adjusted'))})"
    if verdict == "equivalent":
        return (f"no real difference: equivalent within ±{margin} "
                f"(TOST, {corr}-adjusted p {p_rel(c.get('tost_p_adjusted'))})")
    return (f"not shown different ({corr}-adjusted p {p_rel(c.get('p_adjusted'))}) and not "
            f"shown equivalent within ±{margin}; needs more seeds ({seeds_needed_text(c)})")


def variance_phrase(c: dict[str, Any], results: dict[str, Any]) -> str:
    """How a spread comparison reads. Failing to show a difference never becomes 'same spread'."""
    # `variance_ratio` in the results is SD(setting) / SD(baseline), the issue's "SD ratio".
    ratio = f"SD ratio {fmt_num(c.get('variance_ratio'))} {_ci(c.get('variance_ratio_ci95'))}"
    p = f"{correction_name(results)}-adjusted p {p_rel(c.get('variance_p_adjusted'))}"
    if c.get("variance_verdict") == "different":
        return f"its seed-to-seed spread differs from the baseline's ({ratio}, {p})"
    return (f"a difference in seed-to-seed spread was not shown ({ratio}, {p}); with "
            f"{c.get('n', NA)} seeds this is weak evidence either way, not evidence of equal spread")


def _ci(ci: Any) -> str:
    if not ci or not all(_finite(v) for v in ci):
        return "[CI n/a]"
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def comparison_sentence(c: dict[str, Any], results: dict[str, Any]) -> str:
    return (f"{fmt_setting(c)}: {fmt_pp(c.get('mean_diff'))} {fmt_ci_pp(c.get('mean_diff_ci95'))}"
            f" vs baseline, {verdict_phrase(c, results)}")


# --- text sections ---------------------------------------------------------------------------


def _n_runs(table: RunTable) -> int:
    return int(len(table.runs))


def abstract(results: dict[str, Any], table: RunTable, max_strata: int = 3) -> Para:
    baseline = tuple(results["baseline"])
    settings = sorted({(g["dropout1"], g["dropout2"]) for g in results["groups"]})
    seeds = sorted(set(int(s) for s in table.runs["seed"]))
    parts = [f"We trained the d2l.ai dropout MLP on Fashion-MNIST under {len(settings)} dropout "
             f"settings with {len(seeds)} seeds each ({_n_runs(table)} runs in "
             f"{len(results['strata'])} strata, analysed separately) to test claims the lesson "
             f"drew from single runs. Accuracies are mean ± SD over seeds; differences are to the "
             f"baseline {fmt_setting(baseline)} with 95% CIs."]
    for stratum in results["strata"][:max_strata]:
        parts.append(_stratum_abstract(results, stratum, baseline))
    if len(results["strata"]) > max_strata:
        parts.append(f"The other {len(results['strata']) - max_strata} strata are reported in "
                     f"Section 3.")
    parts.append(diagnostics_abstract(results))
    return Para((" ".join(p for p in parts if p),))


def _stratum_abstract(results: dict[str, Any], stratum: dict[str, Any],
                      baseline: tuple[float, float]) -> str:
    key = stratum["stratum"]
    groups = [g for g in in_stratum(results["groups"], key) if _finite(g.get("mean"))]
    base = find_group(results, key, *baseline)
    lead = f"In {stratum['label']}"
    if not groups or base is None:
        return f"{lead} the baseline could not be summarised."
    best = max(groups, key=lambda g: g["mean"])
    text = f"{lead}, "
    if best is not base:
        text += f"{fmt_setting(best)} reached {fmt_mean_sd(best)} vs {fmt_mean_sd(base)} for the "
        text += f"baseline {fmt_setting(baseline)}."
    else:
        text += f"the baseline {fmt_setting(baseline)} was best at {fmt_mean_sd(base)}."
    comps = in_stratum(results["comparisons"], key)
    if comps:
        text += " Against it: " + "; ".join(comparison_sentence(c, results) for c in comps) + "."
    return text


def _claim_heading(text: str) -> Heading:
    return Heading(2, text)


def question_section(results: dict[str, Any]) -> list[Block]:
    return [
        Heading(1, "The question"),
        para("The lesson (a write-up of the d2l.ai Dropout chapter) trains a 784-256-256-10 MLP "
             "with dropout after each hidden layer and, from one run per setting, concludes:"),
        Bullets((
            para(Strong("C1"), " no dropout, (0, 0), beats every dropout setting;"),
            para(Strong("C2"), " (1, 1) \u201cerrors\u201d (cannot be run);"),
            para(Strong("C3"), " (0.9, 0.9) \u201chas problems\u201d;"),
            para(Strong("C4"), " the hand-written dropout and nn.Dropout perform about the same;"),
            para(Strong("C5"), " fixing the random seed makes training repeatable, but cuDNN on "
                 "CUDA may still differ (parallel sums in a different order)."),
        )),
        para("Each claim rests on a single run. Here every setting is repeated across seeds and "
             "each claim gets a measured answer: a difference, an equivalence within a stated "
             "margin, or an honest \u201cnot shown\u201d with the number of seeds it would take."),
    ]


def method_section(results: dict[str, Any], table: RunTable) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Method")]
    blocks += _protocol_blocks(table)
    blocks += _environment_blocks(table)
    blocks += _statistics_blocks(results)
    return blocks


def _protocol_blocks(table: RunTable) -> list[Block]:
    p = table.protocol
    seeds = sorted(set(int(s) for s in table.runs["seed"]))
    seed_text = _compact_ints(seeds)
    if not p:
        return [Heading(2, "Protocol"),
                para(f"No resolved protocol was logged with these runs (they came from outside "
                     f"the harness). The runs used seeds {seed_text}.")]
    model, train, data = p.get("model", {}), p.get("training", {}), p.get("data", {})
    subset = data.get("train_subset")
    rows = [
        ("protocol", str(p.get("name", NA))),
        ("description", str(p.get("description") or NA)),
        ("model", f"{model.get('arch', 'mlp')}, hidden {model.get('hidden')}, weights "
                  f"N(0, {model.get('init_std')}\u00b2), biases at PyTorch default"),
        ("training", f"{train.get('optimizer', 'sgd').upper()}, lr {train.get('lr')}, batch "
                     f"{train.get('batch_size')}, {train.get('epochs')} epochs, cross-entropy"),
        ("data", f"{data.get('dataset')}, "
                 f"{'all 60,000' if subset is None else f'first {subset:,}'} training images, "
                 f"10,000 test images"),
        ("settings (dropout1, dropout2)", ", ".join(setting_label(*s) for s in p.get("dropout", []))),
        ("baseline", setting_label(*p["baseline"]) if p.get("baseline") else NA),
        ("seeds", f"{seed_text} (fixed seed for held streams: {p.get('seeds', {}).get('fixed')})"),
        ("devices", ", ".join(p.get("devices", []))),
        ("determinism modes", ", ".join(p.get("determinism", []))),
        ("implementations", ", ".join(p.get("implementations", []))),
        ("random streams varied", ", ".join(p.get("vary", []))),
        ("execution / randomness", f"{p.get('execution')} / {p.get('randomness')}"),
        ("replicates per cell", str(p.get("replicates"))),
        ("CPU threads", str(p.get("threads") if p.get("threads") is not None else "torch default")),
    ]
    return [Heading(2, "Protocol"),
            para("Each cell (setting \u00d7 seed \u00d7 device \u00d7 determinism mode \u00d7 "
                 "implementation) is one training run logged to MLflow. Test accuracy is measured "
                 "on the 10,000 test images in eval mode after the last epoch; train loss and "
                 "accuracy are minibatch averages in train mode (dropout on)."),
            Table(("item", "value"), tuple(rows), "Resolved protocol (full text in Appendix A).",
                  "ll")]


def _compact_ints(values: list[int]) -> str:
    if not values:
        return NA
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}\u2013{values[-1]} ({len(values)} seeds)"
    return ", ".join(str(v) for v in values)


ENV_SUMMARY = (("torch_version", "PyTorch"), ("cuda_version", "CUDA"), ("cudnn_version", "cuDNN"),
               ("device_name", "device"), ("cpu", "CPU"), ("threads", "threads"),
               ("cpu_model", "CPU model"), ("cpu_isa", "CPU ISA"), ("blas", "BLAS"),
               ("mkl_cbwr", "MKL_CBWR"), ("mkl_cbwr_effective", "MKL branch in effect"),
               ("aten_cpu_capability", "ATen CPU capability"),
               ("onednn_max_cpu_isa", "ONEDNN_MAX_CPU_ISA"), ("threads.intra_op", "torch threads"),
               ("threads.omp_num_threads", "OMP_NUM_THREADS"),
               ("gpu_capability", "GPU capability"),
               ("cublas_workspace_config", "CUBLAS_WORKSPACE_CONFIG"),
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


def _statistics_blocks(results: dict[str, Any]) -> list[Block]:
    paired = any(s.get("paired") for s in results["strata"])
    corr = correction_name(results)
    margin = fmt_pp(results["equivalence_margin"], sign=False)
    return [Heading(2, "Statistics"), para(
        f"Strata (device, determinism mode, implementation, execution, randomness, mask generator, "
        f"varied streams, CPU threads) are analysed separately and never pooled. "
        f"Within a stratum, an omnibus test "
        f"({'Friedman, seeds as blocks' if paired else 'Welch ANOVA'}) asks whether settings differ "
        f"at all; each setting is then compared with the baseline "
        f"{fmt_setting(results['baseline'])} by a {'paired' if paired else 'Welch'} t-test on "
        f"final test accuracy (seeds {'shared across settings, so pairs match by seed' if paired else 'not matched'}), "
        f"with a rank test as a check, Hedges' g and the probability of superiority. "
        f"p-values are {corr}-adjusted within each stratum at \u03b1 = {results['alpha']}. "
        f"A comparison is \u201cdifferent\u201d when the adjusted test rejects, "
        f"\u201cequivalent\u201d when two one-sided tests (TOST) place the difference inside "
        f"±{margin}, and \u201cinconclusive\u201d otherwise; for those we report the minimum "
        f"detectable effect and the seeds needed at {results['power']:.0%} power. Seed-to-seed "
        f"spread is compared by the SD ratio (setting / baseline, bootstrap CI) with "
        f"Brown\u2013Forsythe and Fligner\u2013Killeen tests.", _diagnostics_method(results))]


def _diagnostics_method(results: dict[str, Any]) -> str:
    if not results.get("diagnostics"):
        return ""
    return (" The diagnostics pair runs of the same cell (replicate against first run, "
            "determinism mode against default, CUDA against CPU, each implementation against "
            "torch) and compare them by weight hash and by a paired t-test and TOST, "
            "Holm-adjusted within each family; shares of identical runs carry Clopper\u2013Pearson "
            "CIs and SDs percentile-bootstrap CIs.")


# --- results: tables and figures -------------------------------------------------------------


def results_section(results: dict[str, Any], table: RunTable,
                    figs: list[FigureFile]) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Results")]
    for stratum in results["strata"]:
        blocks += _stratum_results(results, stratum)
    blocks.append(Heading(2, "Figures"))
    blocks.append(para("Each figure has one panel per stratum" if len(results["strata"]) > 1
                       else "All figures show the single stratum", f" ({_strata_list(results)})."))
    # Diagnostic figures sit with the claim they answer, not among the per-stratum ones.
    blocks += [Fig(f) for f in figs if f.name not in figures.DIAGNOSTIC_FIGURES]
    return blocks


def _strata_list(results: dict[str, Any]) -> str:
    return "; ".join(s["label"] for s in results["strata"])


def _stratum_results(results: dict[str, Any], stratum: dict[str, Any]) -> list[Block]:
    key, label = stratum["stratum"], stratum["label"]
    blocks: list[Block] = [Heading(2, f"Stratum {label}"), para(_omnibus_text(stratum))]
    blocks.append(summary_table(results, stratum))
    if in_stratum(results["comparisons"], key):
        blocks.append(comparison_table(results, stratum))
        blocks.append(spread_table(results, stratum))
        blocks.append(Bullets(tuple(
            para(f"{fmt_setting(c)}: ", variance_phrase(c, results))
            for c in in_stratum(results["comparisons"], key))))
    return blocks


def _omnibus_text(stratum: dict[str, Any]) -> str:
    o = stratum.get("omnibus") or {}
    name = {"friedman": "Friedman test", "welch_anova": "Welch ANOVA"}.get(o.get("test"), "omnibus test")
    head = (f"{stratum.get('n_seeds', NA)} seeds per setting, "
            f"{'paired by seed' if stratum.get('paired') else 'unpaired'}. ")
    if not _finite(o.get("p")):
        return head + f"The {name} was not computed: {o.get('reason') or 'no reason given'}."
    return head + f"{name}: statistic {fmt_num(o.get('statistic'))}, p {p_rel(o.get('p'))}."


def summary_table(results: dict[str, Any], stratum: dict[str, Any]) -> Table:
    rows = []
    for g in in_stratum(results["groups"], stratum["stratum"]):
        status = ", ".join(f"{k} {v}" for k, v in sorted((g.get("status_counts") or {}).items()))
        rows.append((fmt_setting(g), str(g.get("n", NA)), fmt_pct(g.get("mean")),
                     fmt_ci_pct(g.get("ci95")), fmt_pp(g.get("sd"), sign=False, unit=False),
                     f"{fmt_pct(g.get('median'))}", fmt_num(g.get("train_loss_mean"), 3),
                     fmt_pp(g.get("gap_mean"), unit=False), status or NA,
                     f"{g.get('textbook_check_passed', NA)}/{g.get('n', NA)}"))
    header = ("setting", "n", "mean acc.", "95% CI (%)", "SD (pp)", "median", "train loss",
              "gap (pp)", "status", "d2l check")
    return Table(header, tuple(rows), f"Final test accuracy per setting, {stratum['label']}. "
                 f"Gap = train \u2212 test accuracy; d2l check = runs that would pass the "
                 f"textbook's end-of-training assertion.", "lrrrrrrrll")


def comparison_table(results: dict[str, Any], stratum: dict[str, Any]) -> Table:
    rows = []
    for c in in_stratum(results["comparisons"], stratum["stratum"]):
        rows.append((fmt_setting(c), fmt_pp(c.get("mean_diff"), unit=False),
                     fmt_ci_pp(c.get("mean_diff_ci95")), _test_name(c.get("test")),
                     fmt_p(c.get("p_adjusted")), fmt_p(c.get("rank_p_adjusted")),
                     fmt_num(c.get("hedges_g")), fmt_p(c.get("tost_p_adjusted")),
                     str(c.get("verdict", NA)), fmt_pp(c.get("mde"), sign=False, unit=False),
                     _int_or_na(c.get("seeds_needed"))))
    header = ("setting", "\u0394 (pp)", "95% CI", "test", "p adj.", "rank p adj.", "g",
              "TOST p adj.", "verdict", "MDE (pp)", "seeds needed")
    return Table(header, tuple(rows), f"Mean final test accuracy vs baseline "
                 f"{fmt_setting(results['baseline'])}, {stratum['label']}; p-values "
                 f"{correction_name(results)}-adjusted.", "lrrlrrrrlrr")


def spread_table(results: dict[str, Any], stratum: dict[str, Any]) -> Table:
    rows = []
    for c in in_stratum(results["comparisons"], stratum["stratum"]):
        verdict = {"different": "different", "not_shown_different": "not shown different"}.get(
            c.get("variance_verdict"), NA)
        rows.append((fmt_setting(c), fmt_num(c.get("variance_ratio")),
                     _ci(c.get("variance_ratio_ci95")).replace("[CI n/a]", NA),
                     fmt_p(c.get("brown_forsythe_p")), fmt_p(c.get("fligner_p")),
                     fmt_p(c.get("variance_p_adjusted")), verdict))
    header = ("setting", "SD ratio", "95% CI", "Brown\u2013Forsythe p", "Fligner p",
              "p adj.", "verdict")
    return Table(header, tuple(rows), f"Seed-to-seed spread vs baseline, {stratum['label']} "
                 f"(ratio of SDs, setting / baseline).", "lrrrrrl")


def _test_name(test: Any) -> str:
    return {"paired_t": "paired t", "welch_t": "Welch t"}.get(test, str(test or NA))


def _int_or_na(x: Any) -> str:
    return str(int(math.ceil(x))) if _finite(x) else NA


# --- verdicts, one per claim ------------------------------------------------------------------


def verdicts_section(results: dict[str, Any], table: RunTable,
                     figs: Sequence[FigureFile] = ()) -> list[Block]:
    return [Heading(1, "Verdicts"),
            para("Each claim of the lesson against the data, stratum by stratum. \u201cNo real "
                 "difference\u201d is said only where equivalence within the margin was shown."),
            _claim_heading("C1: no dropout beats every dropout setting"), *claim_no_dropout(results),
            _claim_heading("C2: (1, 1) errors"), *claim_degenerate(results, (1.0, 1.0)),
            _claim_heading("C3: (0.9, 0.9) has problems"), *claim_degenerate(results, (0.9, 0.9)),
            _claim_heading("C4: hand-written and nn.Dropout perform the same"),
            *claim_implementations(results, figs),
            _claim_heading("C5: a fixed seed makes training repeatable; cuDNN may not"),
            *claim_repeatability(results, table)]


def claim_no_dropout(results: dict[str, Any]) -> list[Block]:
    items = []
    base = tuple(results["baseline"])
    for stratum in results["strata"]:
        key = stratum["stratum"]
        if find_group(results, key, 0.0, 0.0) is None:
            continue
        items.append(para(f"{stratum['label']}: ", _no_dropout_text(results, key, base)))
    if not items:
        return [para("The data do not speak to this claim: (0, 0) was not run.")]
    return [Bullets(tuple(items))]


def _no_dropout_text(results: dict[str, Any], key: dict[str, Any], base: tuple) -> str:
    comps = in_stratum(results["comparisons"], key)
    if base == (0.0, 0.0):
        beaten = [c for c in comps if c.get("verdict") == "different" and (c.get("mean_diff") or 0) < 0]
        text = "; ".join(comparison_sentence(c, results) for c in comps)
        return (f"(0, 0) is the baseline; it is shown better than {len(beaten)} of {len(comps)} "
                f"dropout settings. {text}.")
    c = find_comparison(results, key, 0.0, 0.0)
    if c is None:
        return "no comparison of (0, 0) with the baseline is in the results."
    ranked = sorted((g for g in in_stratum(results["groups"], key) if _finite(g.get("mean"))),
                    key=lambda g: -g["mean"])
    order = ", ".join(f"{fmt_setting(g)} {fmt_pct(g['mean'])}" for g in ranked)
    direction = "above" if (c.get("mean_diff") or 0) > 0 else "below"
    return (f"(0, 0) lies {direction} the baseline {fmt_setting(base)} by "
            f"{fmt_pp(c.get('mean_diff'))} {fmt_ci_pp(c.get('mean_diff_ci95'))}, "
            f"{verdict_phrase(c, results)}. Only comparisons with the baseline were tested, so "
            f"(0, 0) against the other dropout settings rests on the means alone: {order}.")


def claim_degenerate(results: dict[str, Any], setting: tuple[float, float]) -> list[Block]:
    items = []
    for stratum in results["strata"]:
        g = find_group(results, stratum["stratum"], *setting)
        if g is None:
            continue
        c = find_comparison(results, stratum["stratum"], *setting)
        items.append(para(f"{stratum['label']}: ", _degenerate_text(g, c, results)))
    if not items:
        return [para(f"The data do not speak to this claim: {setting_label(*setting)} was not run.")]
    return [Bullets(tuple(items))]


def _degenerate_text(g: dict[str, Any], c: dict[str, Any] | None, results: dict[str, Any]) -> str:
    n = g.get("n") or 0
    passed = g.get("textbook_check_passed")
    status = ", ".join(f"{v} {k}" for k, v in sorted((g.get("status_counts") or {}).items()))
    failed = f"{n - passed} of {n}" if isinstance(passed, int) else NA
    text = (f"every run completed here (status: {status or NA}); the textbook's end-of-training "
            f"assertion (train loss < 0.5, accuracies > 0.7) would have failed in {failed} runs, "
            f"the assertion the lesson saw fail as \u201cerrors\u201d. Final test accuracy "
            f"{fmt_mean_sd(g)} (chance is 10%)")
    if c is not None:
        text += f"; vs baseline {fmt_pp(c.get('mean_diff'))} {fmt_ci_pp(c.get('mean_diff_ci95'))}, "
        text += verdict_phrase(c, results)
    return text + "."


def claim_implementations(results: dict[str, Any],
                          figs: Sequence[FigureFile] = ()) -> list[Block]:
    """The paired equivalence test when the diagnostics have one, else the groups side by side;
    then the keep rates, which show what each implementation actually draws."""
    blocks = equivalence_blocks(results) if applicable(diag_section(results, "implementations")) \
        else _implementations_side_by_side(results)
    keep = diag_section(results, "keep_rates")
    if applicable(keep) and len({r["implementation"] for r in keep["records"]}) > 1:
        blocks += keep_rate_blocks(results, figs)
    return blocks


def _implementations_side_by_side(results: dict[str, Any]) -> list[Block]:
    by_impl: dict[str, list[dict[str, Any]]] = {}
    for s in results["strata"]:
        impl = s["stratum"].get("implementation")
        if impl is not None:
            by_impl.setdefault(str(impl), []).append(s)
    if len(by_impl) < 2:
        return [para("The data do not speak to this claim: only one dropout implementation "
                     "was run.")]
    rows = []
    for g in sorted(results["groups"], key=lambda g: (g["dropout1"], g["dropout2"])):
        if "implementation" in g["stratum"]:
            label = next(s["label"] for s in results["strata"] if s["stratum"] == g["stratum"])
            rows.append((fmt_setting(g), label, str(g.get("n", NA)), fmt_mean_sd(g),
                         fmt_ci_pct(g.get("ci95"))))
    return [para(f"Implementations run: {', '.join(sorted(by_impl))}. The results compare "
                 f"settings within a stratum, so no test between implementations was made; the "
                 f"table below puts them side by side and overlapping CIs are not evidence of "
                 f"equal performance."),
            Table(("setting", "stratum", "n", "mean ± SD", "95% CI (%)"), tuple(rows),
                  "Final test accuracy by implementation (no between-implementation test).",
                  "llrrr")]


# --- diagnostics: C4, C5 and the sources of variance, read from results["diagnostics"] --------
# The analysis computes every number here (study.diagnostics); the report only words them, so
# the CSVs, results.json and this text cannot disagree.

SUMMERS = "Summers & Dinneen (ICML 2021)"
REPLICATE_KEYS = ("device", "determinism", "execution", "threads")
NO_DIAGNOSTICS = "the results carry no diagnostics; rerun python -m study analyze"


def diag_section(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return (results.get("diagnostics") or {}).get(name)


def applicable(section: dict[str, Any] | None) -> bool:
    return bool(section and section.get("applicable") and section.get("records"))


def not_measured(what: str, section: dict[str, Any] | None) -> Para:
    why = (section or {}).get("reason") or NO_DIAGNOSTICS
    return para(f"The protocol did not measure {what} ({why}).")


def fmt_pp_exact(x: Any) -> str:
    # An exact zero is a finding (bitwise-identical runs), not a rounded small number.
    return "0 (exact)" if x == 0.0 and _finite(x) else fmt_pp(x, sign=False, unit=False)


def fmt_ratio_ci(ci: Any) -> str:
    # A ratio CI may be open above (None upper bound): the data cannot bound it.
    if not ci or not _finite(ci[0]):
        return NA
    hi = fmt_num(ci[1]) if _finite(ci[1]) else "\u221e"
    return f"[{fmt_num(ci[0])}, {hi}]"


def where(stratum: dict[str, Any], keys: Sequence[str]) -> str:
    return " / ".join(str(stratum[k]) for k in keys if k in stratum)


def varying_keys(records: Sequence[dict[str, Any]], fallback: Sequence[str] = ()) -> list[str]:
    """The stratum columns that tell the records apart (all the same: `fallback`)."""
    keys = dict.fromkeys(k for r in records for k in r["stratum"])
    found = [k for k in keys if len({str(r["stratum"].get(k)) for r in records}) > 1]
    return found or [k for k in fallback if k in keys]


def identical_text(n_same: Any, n: Any) -> str:
    return f"{n_same}/{n}" + (f" ({fmt_pct(n_same / n, 0)})" if n else "")


def verdict_lists(records: Sequence[dict[str, Any]], results: dict[str, Any]) -> str:
    """Settings grouped by verdict; the wording rule of `verdict_phrase` in short form."""
    margin = fmt_pp(results["equivalence_margin"], sign=False)
    keys = varying_keys(records)  # a setting may recur in several strata: name them

    def name(r: dict[str, Any]) -> str:
        return fmt_setting(r) + (f" in {where(r['stratum'], keys)}" if keys else "")

    by = {v: [name(r) for r in records if r.get("verdict") == v]
          for v in ("different", "equivalent", "inconclusive")}
    need = [r["seeds_needed"] for r in records
            if r.get("verdict") == "inconclusive" and _finite(r.get("seeds_needed"))]
    parts = []
    if by["different"]:
        parts.append(f"different at {', '.join(by['different'])}")
    if by["equivalent"]:
        parts.append(f"no real difference (equivalent within ±{margin}) at "
                     f"{', '.join(by['equivalent'])}")
    if by["inconclusive"]:
        more = f", up to about {int(math.ceil(max(need)))} seeds per setting" if need else ""
        parts.append(f"not shown different nor equivalent at {', '.join(by['inconclusive'])} "
                     f"(needs more seeds{more})")
    return "; ".join(parts) or "no verdict"


# C5 -------------------------------------------------------------------------------------------


def claim_repeatability(results: dict[str, Any], table: RunTable) -> list[Block]:
    blocks = [*replicate_blocks(results), *mode_blocks(results), *thread_blocks(results),
              *verify_blocks(table), *device_blocks(results, table)]
    sources = diag_section(results, "variance_sources")
    if not applicable(sources):
        blocks.append(not_measured("which random stream (initialisation, data order, dropout "
                                   "masks) makes the seed-to-seed spread", sources))
    return blocks


def replicate_blocks(results: dict[str, Any]) -> list[Block]:
    section = diag_section(results, "replicates")
    if not applicable(section):
        return [not_measured("run-to-run repeatability with a fixed seed", section)]
    recs = section["records"]
    same = sum(_all_identical(r) for r in recs)
    rows = tuple((where(r["stratum"], REPLICATE_KEYS), str(r["n_cells"]),
                  identical_text(r["n_identical"], r["n_hash_compared"]),
                  fmt_ci_pct(r.get("share_identical_ci95"), 0),
                  fmt_pp_exact((r.get("max_abs_diff") or {}).get("test_acc")),
                  fmt_pp_exact(r.get("nondeterminism_sd")), fmt_pp_exact(r.get("seed_sd")),
                  fmt_num(r.get("variance_ratio"), 3)) for r in recs)
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


def _all_identical(r: dict[str, Any]) -> bool:
    return bool(r.get("n_hash_compared")) and r["n_identical"] == r["n_hash_compared"]


def _replicate_gap_text(r: dict[str, Any]) -> str:
    diff = r["n_hash_compared"] - r["n_identical"]
    return (f"{where(r['stratum'], REPLICATE_KEYS)}: {diff} of {r['n_hash_compared']} replicates "
            f"differ from their first run; the largest test-accuracy gap is "
            f"{fmt_pp((r.get('max_abs_diff') or {}).get('test_acc'), sign=False)} and the "
            f"nondeterminism variance is {fmt_num(r.get('variance_ratio'), 3)} times the "
            f"seed-to-seed variance.")


def mode_blocks(results: dict[str, Any]) -> list[Block]:
    section = diag_section(results, "modes")
    if not applicable(section):
        return [not_measured("the effect of determinism modes", section)]
    return [para(f"Determinism modes against \u2018{section.get('reference')}\u2019, pairing first "
                 f"runs of the same cell. The cuDNN flags govern convolutions and RNNs and this "
                 f"MLP runs on BLAS, so a null result is expected for them."),
            Bullets(tuple(para(_mode_text(r, results)) for r in section["records"]))]


def _mode_text(r: dict[str, Any], results: dict[str, Any]) -> str:
    head = f"{r['mode']} vs {r['reference']} on {where(r['stratum'], ('device', 'execution'))}"
    if r.get("no_change_observed"):
        return (f"{head}: no change observed, all {r['n_pairs']} paired runs have the same "
                f"weight hash. A null result for the cells, model and machine measured, not "
                f"proof that the mode never matters.")
    return (f"{head}: {r['n_hash_compared'] - r['n_identical']} of {r['n_hash_compared']} runs "
            f"differ bitwise; mean test-accuracy gap {fmt_pp(r.get('mean_diff'))} "
            f"{fmt_ci_pp(r.get('mean_diff_ci95'))}, largest "
            f"{fmt_pp((r.get('max_abs_diff') or {}).get('test_acc'), sign=False)}; "
            f"{verdict_phrase(r, results)}.")


def thread_blocks(results: dict[str, Any]) -> list[Block]:
    """Thread count a against b, paired by cell: does it change the bits, per mode."""
    section = diag_section(results, "threads")
    if not applicable(section):
        return []  # most protocols fix one count; nothing to say
    recs = section["records"]
    rows = tuple((where(r["stratum"], ("device", "determinism", "execution")),
                  f"{r['threads_a']} vs {r['threads_b']}",
                  identical_text(r["n_identical"], r["n_hash_compared"]),
                  fmt_pp_exact((r.get("max_abs_diff") or {}).get("test_acc"))) for r in recs)
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
    return [para(f"Re-trained by python -m study verify on {v.get('cpu_model', NA)} "
                 f"({v.get('cpu_isa', NA)}): {v.get('n_identical', NA)} of "
                 f"{v.get('n_checked', NA)} sampled cells gave the recorded weights; "
                 f"{v.get('n_env_differs', NA)} ran where a key that decides the bits differs; "
                 f"{v.get('n_broken', NA)} broke the promise of a strict or portable mode.")]


def device_blocks(results: dict[str, Any], table: RunTable) -> list[Block]:
    section = diag_section(results, "devices")
    if not applicable(section):
        if "cuda" not in set(table.runs["device"]):
            return [para("No GPU runs were in the data, so the lesson's cuDNN caveat (CPU "
                         "against GPU) was not measured here.")]
        return [not_measured("a paired CPU\u2013GPU gap", section)]
    recs = section["records"]
    keys = varying_keys(recs, ("determinism",))
    n_same = sum(r["n_identical"] for r in recs)
    n_hash = sum(r["n_hash_compared"] for r in recs)
    rows = tuple((fmt_setting(r), where(r["stratum"], keys), str(r["n_pairs"]),
                  identical_text(r["n_identical"], r["n_hash_compared"]),
                  fmt_pp(r.get("mean_diff"), unit=False), fmt_ci_pp(r.get("mean_diff_ci95")),
                  fmt_pp((r.get("max_abs_diff") or {}).get("test_acc"), sign=False, unit=False),
                  fmt_p(r.get("p_adjusted")), fmt_p(r.get("tost_p_adjusted")),
                  str(r.get("verdict", NA))) for r in recs)
    header = ("setting", " / ".join(keys), "pairs", "identical", "\u0394 (pp)", "95% CI",
              "max |\u0394| (pp)", "p adj.", "TOST p adj.", "verdict")
    return [para(f"CUDA against CPU, paired by cell: {n_same} of {n_hash} pairs gave identical "
                 f"weights (the two generators differ, so 0 is expected). The mean gap in final "
                 f"test accuracy (cuda \u2212 cpu) is {verdict_lists(recs, results)}."),
            Table(header, rows, "Final test accuracy, CUDA minus CPU, paired by seed; p-values "
                  "Holm-adjusted over the settings.", "llrrrrrrrl")]


# C4 -------------------------------------------------------------------------------------------


def keep_rate_blocks(results: dict[str, Any], figs: Sequence[FigureFile]) -> list[Block]:
    section = diag_section(results, "keep_rates")
    if not applicable(section):
        return [not_measured("the share of units each implementation keeps", section)]
    # p = 0 and p = 1 draw no mask: every implementation keeps all or nothing by construction.
    recs = sorted((r for r in section["records"] if 0 < r["p"] < 1),
                  key=lambda r: r["implementation"] != "torch")  # the reference first
    rows = tuple((r["implementation"], fmt_setting(r), str(r["layer"]), fmt_num(r["p"], 1),
                  str(r["n"]), fmt_pct(r.get("observed"), 1), fmt_pct(r.get("nominal"), 1),
                  fmt_pct(r.get("expected"), 1), fmt_num(r.get("activation_scale")))
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
    off = [para(r["finding"]) for r in _worst_keep_records(section["records"])]
    blocks += [Bullets(tuple(off))] if off else []
    return blocks + _figures_named(figs, "keep_rates")


def _worst_keep_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per implementation that misses its nominal rate, the record furthest from it."""
    worst: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("matches_nominal") is False and _finite(r.get("deviation")):
            best = worst.get(r["implementation"])
            if best is None or abs(r["deviation"]) > abs(best["deviation"]):
                worst[r["implementation"]] = r
    return [worst[k] for k in sorted(worst)]


def equivalence_blocks(results: dict[str, Any]) -> list[Block]:
    section = diag_section(results, "implementations")
    if not applicable(section):
        return [not_measured("a paired test between implementations", section)]
    recs = section["records"]
    keys = varying_keys(recs, ("device",))
    rows = tuple((r["implementation"], fmt_setting(r), where(r["stratum"], keys),
                  str(r["n_pairs"]), fmt_pp(r.get("mean_diff"), unit=False),
                  fmt_ci_pp(r.get("mean_diff_ci95")), fmt_p(r.get("p_adjusted")),
                  fmt_p(r.get("tost_p_adjusted")), str(r.get("verdict", NA)),
                  # Only an open question needs more seeds; a settled one is shown as a dash.
                  _int_or_na(r.get("seeds_needed")) if r.get("verdict") == "inconclusive"
                  else "\u2013") for r in recs)
    header = ("implementation", "setting", " / ".join(keys), "pairs", "\u0394 (pp)", "95% CI",
              "p adj.", "TOST p adj.", "verdict", "seeds needed")
    impls = sorted({r["implementation"] for r in recs})
    summary = [para(f"{impl} vs torch: ",
                    verdict_lists([r for r in recs if r["implementation"] == impl], results), ".")
               for impl in impls]
    return [para(f"Each implementation against nn.Dropout (torch), paired by seed, with a "
                 f"t-test and TOST at ±{fmt_pp(section.get('margin'), sign=False)}, "
                 f"Holm-adjusted within each stratum."),
            Bullets(tuple(summary)),
            Table(header, rows, "Final test accuracy, implementation minus torch, paired by "
                  "seed.", "lllrrrrrlr")]


# Sources of variance ----------------------------------------------------------------------------


def sources_section(results: dict[str, Any], figs: Sequence[FigureFile]) -> list[Block]:
    section = diag_section(results, "variance_sources")
    if not applicable(section):
        return []  # C5 says in one sentence that the protocol did not measure it
    recs, summaries = section["records"], section.get("summaries") or []
    keys = varying_keys(recs)
    rows = tuple((fmt_setting(r), *([where(r["stratum"], keys)] if keys else []), r["source"],
                  str(r["n"]), fmt_pp_exact(r.get("sd")), fmt_ci_pp(r.get("sd_ci95"), sign=False),
                  fmt_num(r.get("ratio")) if r["source"] != "all" else "1 (ref.)",
                  fmt_ratio_ci(r.get("ratio_ci95")), fmt_p(r.get("brown_forsythe_p_adjusted")),
                  str(r.get("summers", NA)).replace("_", " ")) for r in recs)
    header = ("setting", *([" / ".join(keys)] if keys else []), "source varied", "seeds",
              "SD (pp)", "95% CI", "SD ratio", "95% CI", "BF p adj.", "vs S&D")
    low = section.get("low_ratio", 0.5)
    return [Heading(1, "Sources of variance"),
            para(f"Which random stream makes the seed-to-seed spread? Each source "
                 f"(initialisation, data order, dropout masks) was varied alone with the others "
                 f"held at a fixed seed, and its SD compared with the SD when all vary. "
                 f"{_bitflip_text(recs)}"
                 f"{SUMMERS} report that any single source alone gives about the full spread; "
                 f"a source is consistent with that when its SD-ratio CI contains 1 and excludes "
                 f"{low:g}. SD CIs are percentile bootstrap; Brown\u2013Forsythe p-values are "
                 f"Holm-adjusted over the sources of one setting."),
            Table(header, rows, "Seed-to-seed SD of final test accuracy per varied source, and "
                  "its ratio to the SD when all sources vary.",
                  "l" + "l" * bool(keys) + "lrrrrrrl"),
            Bullets(tuple(para(f"{fmt_setting(s)}"
                               f"{', ' + where(s['stratum'], keys) if keys else ''}: "
                               f"{s['finding'].replace('_', ' ')}{_omnibus_sources(s)}")
                          for s in summaries)),
            *_figures_named(figs, "variance_sources")]


def _bitflip_text(recs: Sequence[dict[str, Any]]) -> str:
    if not any(r["source"] == "bitflip" for r in recs):
        return ""
    return ("The bitflip arm is their one-bit experiment: every stream stays at the fixed seed "
            "and each seed flips the lowest mantissa bit of one initial weight, so its spread is "
            "that of arithmetic alone. ")


def _omnibus_sources(s: dict[str, Any]) -> str:
    o = s.get("omnibus") or {}
    if not _finite(o.get("p")):
        return ""
    return f" Brown\u2013Forsythe across all sources: p {p_rel(o['p'])}."


# Headline findings for the abstract --------------------------------------------------------------


def diagnostics_abstract(results: dict[str, Any]) -> str:
    lines = (_replicates_headline(results), _modes_headline(results),
             _devices_headline(results), _keep_headline(results), _impl_headline(results),
             _sources_headline(results))
    return " ".join(x for x in lines if x)


def _replicates_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "replicates")
    if not applicable(section):
        return ""
    keys = varying_keys(section["records"], ("device",))  # constant columns would only pad
    cells = ", ".join(f"{r['n_identical']}/{r['n_hash_compared']} on {where(r['stratum'], keys)}"
                      for r in section["records"])
    return f"Re-running a cell with the same seed gave bit-identical weights in {cells}."


def _modes_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "modes")
    if not applicable(section):
        return ""
    recs = section["records"]
    quiet = [f"{r['mode']} on {r['stratum']['device']}" for r in recs if r.get("no_change_observed")]
    loud = [f"{r['mode']} on {r['stratum']['device']} changed "
            f"{r['n_hash_compared'] - r['n_identical']}/{r['n_hash_compared']} weight hashes "
            f"(mean accuracy gap {fmt_pp(r.get('mean_diff'))} {fmt_ci_pp(r.get('mean_diff_ci95'))}, "
            f"{verdict_word(r.get('verdict'), results)})"
            for r in recs if not r.get("no_change_observed")]
    text = f"Against the \u2018{section.get('reference')}\u2019 mode, "
    parts = ([f"no change was observed for {', '.join(quiet)} (a null result, not proof)"]
             if quiet else []) + loud
    return text + "; ".join(parts) + "."


def _devices_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "devices")
    if not applicable(section):
        return ""
    return (f"CUDA against CPU, paired by cell, the mean accuracy gap was "
            f"{_verdict_counts(section['records'], results)}.")


def _keep_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "keep_rates")
    if not applicable(section):
        return ""
    return " ".join(f"{r['implementation']} keeps {fmt_pct(r['observed'], 1)} of units at "
                    f"p = {r['p']:g} (nominal {fmt_pct(r['nominal'], 1)}), so live units are "
                    f"scaled by {fmt_num(r.get('activation_scale'))} on average in training."
                    for r in _worst_keep_records(section["records"]))


def _impl_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "implementations")
    if not applicable(section):
        return ""
    recs = section["records"]
    impls = sorted({r["implementation"] for r in recs})
    return "Against nn.Dropout: " + "; ".join(
        f"{i} {_verdict_counts([r for r in recs if r['implementation'] == i], results)}"
        for i in impls) + "."


def verdict_word(verdict: Any, results: dict[str, Any]) -> str:
    """A verdict in a few words, for lists; the same rule as `verdict_phrase`."""
    margin = fmt_pp(results["equivalence_margin"], sign=False)
    return {"different": "different", "equivalent": f"equivalent within ±{margin}"}.get(
        verdict, "not shown different (needs more seeds)")


def _verdict_counts(recs: Sequence[dict[str, Any]], results: dict[str, Any]) -> str:
    counts = [(verdict_word(v, results), sum(r.get("verdict") == v for r in recs))
              for v in ("different", "equivalent", "inconclusive")]
    return ", ".join(f"{w} in {n} of {len(recs)}" for w, n in counts if n) + " settings"


def _sources_headline(results: dict[str, Any]) -> str:
    section = diag_section(results, "variance_sources")
    summaries = (section or {}).get("summaries") or []
    if not applicable(section) or not summaries:
        return ""
    words = {"agree": "agree", "disagree": "disagree", "inconclusive": "are inconclusive",
             "not_computable": "cannot be compared"}
    parts = [f"{w} in {sum(s['agreement'] == a for s in summaries)}" for a, w in words.items()
             if any(s["agreement"] == a for s in summaries)]
    return (f"Varying one random source at a time, set against {SUMMERS} the data "
            f"{', '.join(parts)} of {len(summaries)} settings.")


def _figures_named(figs: Sequence[FigureFile], name: str) -> list[Block]:
    return [Fig(f) for f in figs if f.name == name]


# --- the rest of the paper -------------------------------------------------------------------


def reproducibility_section(table: RunTable) -> list[Block]:
    name = (table.protocol or {}).get("name") or table.experiment_name
    commit = (table.environment or {}).get("git_commit")
    return [Heading(1, "Reproducibility"),
            para("Everything here is regenerated from the MLflow store; finished cells are "
                 "skipped, so rerunning resumes rather than repeats.",
                 f" The runs were made at commit {commit}." if commit else ""),
            CodeBlock(f"make study\npython -m study report protocols/{name}.yaml", "sh"),
            para("MLflow experiment: ", Code(str(table.experiment_name)), f" (id {table.experiment_id}).")]


def threats_section(results: dict[str, Any]) -> list[Block]:
    n = sorted({s.get("n_seeds") for s in results["strata"] if s.get("n_seeds")})
    return [Heading(1, "Threats to validity"), Bullets((
        para(f"Few seeds ({', '.join(map(str, n)) or NA} per setting): small effects and spread "
             f"differences stay undetected; \u201cinconclusive\u201d and \u201cnot shown "
             f"different\u201d are statements about this sample size, not about the method."),
        para("One architecture, learning rate and epoch budget (the textbook's). With more epochs "
             "or a larger network, dropout may rank differently; the lesson itself suspects the "
             "model is not overfitting enough for dropout to pay off."),
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


def title(table: RunTable) -> str:
    return f"Does dropout help? Re-running the d2l dropout lesson across seeds: {table.experiment_name}"


def document(results: dict[str, Any], table: RunTable, figs: list[FigureFile]) -> list[Block]:
    return [Abstract(abstract(results, table)), *question_section(results),
            *method_section(results, table), *results_section(results, table, figs),
            *verdicts_section(results, table, figs), *sources_section(results, figs),
            *reproducibility_section(table),
            *threats_section(results), *appendix(table)]


# --- Typst rendering -------------------------------------------------------------------------

# Characters with a markup meaning in Typst; a backslash makes any of them literal.
_TYPST_SPECIAL = re.compile(r"([\\#*_`$<>@\[\]~=/+\-'\"])")


def escape_typst(text: str) -> str:
    """Literal text for Typst markup: specials escaped, newlines folded into spaces."""
    return _TYPST_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def typst_string(text: str) -> str:
    """A Typst string literal."""
    return json.dumps(str(text), ensure_ascii=False)


def _typst_inline(part: Inline) -> str:
    # The trailing ';' ends the embedded expression, so a following '(' or '.x' stays text.
    if isinstance(part, Strong):
        return f"#strong[{escape_typst(part.text)}];"
    if isinstance(part, Code):
        return f"#raw({typst_string(part.text)});"
    return escape_typst(part)


def _typst_para(p: Para) -> str:
    return "".join(_typst_inline(x) for x in p.parts)


def _typst_table(t: Table) -> str:
    align = ", ".join("right" if a == "r" else "left" for a in (t.align or "l" * len(t.header)))
    cells = [f"[{escape_typst(h)}]" for h in t.header]
    body = [f"[{escape_typst(c)}]" for row in t.rows for c in row]
    return (f"#figure(kind: table, caption: [{escape_typst(t.caption)}],\n"
            f"  table(columns: {len(t.header)}, align: ({align},),\n"
            f"    table.header({', '.join(cells)}),\n    {', '.join(body)}))\n")


def _typst_block(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'=' * b.level} {escape_typst(b.text)}\n"
    if isinstance(b, Para):
        return _typst_para(b) + "\n"
    if isinstance(b, Abstract):
        return f"#abstract[{_typst_para(b.para)}]\n"
    if isinstance(b, Bullets):
        return "".join(f"- {_typst_para(i)}\n" for i in b.items)
    if isinstance(b, Table):
        return _typst_table(b)
    if isinstance(b, Fig):
        width = f"{min(b.file.width_in, TEXT_WIDTH_IN):.2f}in"
        return (f"#figure(image({typst_string('figures/' + b.file.svg.name)}, width: {width}),\n"
                f"  caption: [{escape_typst(b.file.caption)}])\n")
    if isinstance(b, CodeBlock):
        return f"#raw(block: true, lang: {typst_string(b.lang)}, {typst_string(b.text)})\n"
    if isinstance(b, Appendix):
        return ("#pagebreak()\n#counter(heading).update(0)\n"
                "#set heading(numbering: \"A.1\", supplement: [Appendix])\n")
    raise TypeError(f"unknown block {b!r}")


def _typst_preamble(doc_title: str, date: dt.date | None) -> str:
    date_expr = "none" if date is None else \
        f"datetime(year: {date.year}, month: {date.month}, day: {date.day})"
    return f"""#set document(title: {typst_string(doc_title)}, author: "study.report", date: {date_expr})
#set page(paper: "a4", margin: (x: 2.1cm, y: 2.3cm), numbering: "1")
#set text(font: "{BODY_FONT}", size: 10.5pt, lang: "en")
#set par(justify: true)
#set heading(numbering: "1.1")
#show heading.where(level: 1): set block(above: 1.4em, below: 0.8em)
#show raw: set text(font: "{MONO_FONT}", size: 8pt)
#show table: set text(size: 7.5pt)
#show figure.caption: set text(size: 9pt)
#show figure.where(kind: table): set figure.caption(position: top)
#set table(stroke: (x, y) => if y == 0 {{ (bottom: 0.6pt) }} else {{ none }}, inset: (x: 4pt, y: 3pt))
#let abstract(body) = block(inset: (x: 1.2cm), above: 1.2em, below: 1.6em)[
  #set text(size: 9.5pt)
  #set par(justify: true)
  *Abstract.* #body
]
#align(center)[
  #text(size: 16pt, weight: "bold")[{escape_typst(doc_title)}]
  #v(0.3em)
  #text(size: 9pt)[Generated by study.report from the MLflow runs; every number below is computed from them.]
]
"""


def render_typst(blocks: Sequence[Block], doc_title: str, date: dt.date | None = None) -> str:
    return _typst_preamble(doc_title, date) + "\n".join(_typst_block(b) for b in blocks)


# --- Markdown rendering ----------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~$])")


def escape_markdown(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", re.sub(r"\s+", " ", str(text)))


def _md_inline(part: Inline) -> str:
    if isinstance(part, Strong):
        return f"**{escape_markdown(part.text)}**"
    if isinstance(part, Code):
        return f"`{part.text.replace('`', '')}`"
    return escape_markdown(part)


def _md_para(p: Para) -> str:
    return "".join(_md_inline(x) for x in p.parts)


class _MarkdownRenderer:
    """Numbers figures, tables and headings the way Typst does, so both documents agree."""

    def __init__(self) -> None:
        self.figure = self.table = 0
        self.numbers = [0, 0, 0]
        self.appendix = False

    def heading(self, b: Heading) -> str:
        self.numbers[b.level - 1] += 1
        self.numbers[b.level:] = [0] * (3 - b.level)
        used = self.numbers[:b.level]
        first = chr(ord("A") + used[0] - 1) if self.appendix else str(used[0])
        label = ".".join([first, *map(str, used[1:])]) + ("" if b.level > 1 or self.appendix else ".")
        prefix = "Appendix " if self.appendix and b.level == 1 else ""
        return f"{'#' * (b.level + 1)} {prefix}{label} {escape_markdown(b.text)}\n"

    def block(self, b: Block) -> str:
        if isinstance(b, Heading):
            return self.heading(b)
        if isinstance(b, Para):
            return _md_para(b) + "\n"
        if isinstance(b, Abstract):
            return f"**Abstract.** {_md_para(b.para)}\n"
        if isinstance(b, Bullets):
            return "".join(f"- {_md_para(i)}\n" for i in b.items)
        if isinstance(b, Table):
            self.table += 1
            head = "| " + " | ".join(escape_markdown(h) for h in b.header) + " |"
            rule = "|" + "|".join("---:" if a == "r" else "---" for a in
                                  (b.align or "l" * len(b.header))) + "|"
            rows = ["| " + " | ".join(escape_markdown(c) for c in row) + " |" for row in b.rows]
            return f"**Table {self.table}.** {escape_markdown(b.caption)}\n\n" + \
                "\n".join([head, rule, *rows]) + "\n"
        if isinstance(b, Fig):
            self.figure += 1
            return (f"![Figure {self.figure}](figures/{b.file.png.name})\n\n"
                    f"**Figure {self.figure}.** {escape_markdown(b.file.caption)}\n")
        if isinstance(b, CodeBlock):
            return f"```{b.lang}\n{b.text}\n```\n"
        if isinstance(b, Appendix):
            self.appendix = True
            self.numbers = [0, 0, 0]
            return ""
        raise TypeError(f"unknown block {b!r}")


def render_markdown(blocks: Sequence[Block], doc_title: str) -> str:
    r = _MarkdownRenderer()
    body = [r.block(b) for b in blocks]
    return f"# {escape_markdown(doc_title)}\n\n" + "\n".join(x for x in body if x)


# --- entry point -----------------------------------------------------------------------------


def compile_pdf(typ: Path, pdf: Path) -> None:
    """Compile with Typst's embedded fonts only, so no machine's font set changes the PDF."""
    typst.compile(str(typ), output=str(pdf), root=str(typ.parent), ignore_system_fonts=True)


def write_report(results: dict[str, Any], table: RunTable, out_dir: Path,
                 date: dt.date | None = None) -> ReportFiles:
    """Write figures, report.typ, report.pdf and report.md under `out_dir`.

    `date` goes into the PDF metadata when given; by default the PDF carries no date, so the
    same inputs give the same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures.make_figures(results, table, out_dir / "figures")
    blocks = document(results, table, figs)
    doc_title = title(table)
    typ, md, pdf = out_dir / "report.typ", out_dir / "report.md", out_dir / "report.pdf"
    typ.write_text(render_typst(blocks, doc_title, date), encoding="utf-8")
    md.write_text(render_markdown(blocks, doc_title), encoding="utf-8")
    compile_pdf(typ, pdf)
    return ReportFiles(pdf=pdf, markdown=md, typst=typ, figures=figs)
