"""The paper-style report of a dropout study: results + run table in, PDF and Markdown twin out.

    python -m study report protocols/d2l-dropout.yaml

`write_report` builds the document once as a small list of blocks (headings, paragraphs, tables,
figures, code) and renders that list twice, to Typst (compiled to PDF by the `typst` package with
its embedded fonts only) and to Markdown, so the two can never say different things. Every number
in the text is read from the results dict; nothing about the findings is hard-coded.
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

import numpy as np
import pandas as pd
import typst
import yaml

from study import figures
from study.figures import FigureFile, setting_label
from study.table import STRATUM_COLUMNS, RunTable

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
    ratio = f"variance ratio {fmt_num(c.get('variance_ratio'))} {_ci(c.get('variance_ratio_ci95'))}"
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
    return Para((" ".join(parts),))


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
        f"Strata (device, determinism mode, implementation, execution, randomness, varied streams) "
        f"are analysed separately and never pooled. Within a stratum, an omnibus test "
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
        f"spread is compared by the variance ratio with Brown\u2013Forsythe and Fligner\u2013Killeen "
        f"tests.")]


# --- results: tables and figures -------------------------------------------------------------


def results_section(results: dict[str, Any], table: RunTable,
                    figs: list[FigureFile]) -> list[Block]:
    blocks: list[Block] = [Heading(1, "Results")]
    for stratum in results["strata"]:
        blocks += _stratum_results(results, stratum)
    blocks.append(Heading(2, "Figures"))
    blocks.append(para("Each figure has one panel per stratum" if len(results["strata"]) > 1
                       else "All figures show the single stratum", f" ({_strata_list(results)})."))
    blocks += [Fig(f) for f in figs]
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
    header = ("setting", "variance ratio", "95% CI", "Brown\u2013Forsythe p", "Fligner p",
              "p adj.", "verdict")
    return Table(header, tuple(rows), f"Seed-to-seed spread vs baseline, {stratum['label']} "
                 f"(ratio of variances, setting / baseline).", "lrrrrrl")


def _test_name(test: Any) -> str:
    return {"paired_t": "paired t", "welch_t": "Welch t"}.get(test, str(test or NA))


def _int_or_na(x: Any) -> str:
    return str(int(math.ceil(x))) if _finite(x) else NA


# --- verdicts, one per claim ------------------------------------------------------------------


def verdicts_section(results: dict[str, Any], table: RunTable) -> list[Block]:
    return [Heading(1, "Verdicts"),
            para("Each claim of the lesson against the data, stratum by stratum. \u201cNo real "
                 "difference\u201d is said only where equivalence within the margin was shown."),
            _claim_heading("C1: no dropout beats every dropout setting"), *claim_no_dropout(results),
            _claim_heading("C2: (1, 1) errors"), *claim_degenerate(results, (1.0, 1.0)),
            _claim_heading("C3: (0.9, 0.9) has problems"), *claim_degenerate(results, (0.9, 0.9)),
            _claim_heading("C4: hand-written and nn.Dropout perform the same"),
            *claim_implementations(results),
            _claim_heading("C5: a fixed seed makes training repeatable; cuDNN may not"),
            *claim_repeatability(table)]


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
            f"which is what \u201cerrors\u201d means in the lesson. Final test accuracy "
            f"{fmt_mean_sd(g)} (chance is 10%)")
    if c is not None:
        text += f"; vs baseline {fmt_pp(c.get('mean_diff'))} {fmt_ci_pp(c.get('mean_diff_ci95'))}, "
        text += verdict_phrase(c, results)
    return text + "."


def claim_implementations(results: dict[str, Any]) -> list[Block]:
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


# Cells identical in everything that defines a run; replicates of one cell should match bit for bit.
_CELL_COLUMNS = ("dropout1", "dropout2", "seed", *STRATUM_COLUMNS)


def repeatability(runs: pd.DataFrame) -> pd.DataFrame:
    """Per stratum: how many cells ran more than once and how many of those gave identical weights.

    Columns: stratum (label), cells, repeated, identical."""
    strata = [c for c in STRATUM_COLUMNS if c in runs.columns]
    rows = []
    for key, frame in runs.groupby(list(strata), sort=True, dropna=False):
        cells = frame.groupby(list(_CELL_COLUMNS), dropna=False)["weights_sha256"]
        sizes, distinct = cells.size(), cells.nunique()
        repeated = sizes[sizes > 1].index
        rows.append({"stratum": " / ".join(str(k) for k in np.atleast_1d(key)),
                     "cells": int(len(sizes)), "repeated": int(len(repeated)),
                     "identical": int((distinct.loc[repeated] == 1).sum())})
    return pd.DataFrame(rows, columns=["stratum", "cells", "repeated", "identical"])


def determinism_modes_agree(runs: pd.DataFrame) -> pd.DataFrame:
    """Per device: runs of the same cell under different determinism modes, and how many of
    those cells gave one weights hash across all modes."""
    rest = [c for c in _CELL_COLUMNS if c != "determinism"] + ["replicate"]
    rows = []
    for device, frame in runs.groupby("device", sort=True):
        if frame["determinism"].nunique() < 2:
            continue
        cells = frame.groupby(rest, dropna=False).agg(modes=("determinism", "nunique"),
                                                      hashes=("weights_sha256", "nunique"))
        multi = cells[cells["modes"] > 1]
        rows.append({"device": device, "cells": int(len(multi)),
                     "identical": int((multi["hashes"] == 1).sum())})
    return pd.DataFrame(rows, columns=["device", "cells", "identical"])


def claim_repeatability(table: RunTable) -> list[Block]:
    reps = repeatability(table.runs)
    modes = determinism_modes_agree(table.runs)
    blocks: list[Block] = []
    repeated = reps[reps["repeated"] > 0]
    if repeated.empty:
        blocks.append(para("The protocol ran every cell once (no replicates), so the data do not "
                           "speak to run-to-run repeatability with a fixed seed."))
    else:
        blocks.append(Bullets(tuple(
            para(f"{r.stratum}: the same seed gave bit-identical final weights in {r.identical} "
                 f"of {r.repeated} repeated cells.") for r in repeated.itertuples())))
    if not modes.empty:
        blocks.append(Bullets(tuple(
            para(f"{r.device}: across determinism modes, {r.identical} of {r.cells} cells gave "
                 f"one weights hash in every mode (cuDNN flags govern convolutions and RNNs; "
                 f"this MLP runs on BLAS).") for r in modes.itertuples())))
    return blocks


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
            *verdicts_section(results, table), *reproducibility_section(table),
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
