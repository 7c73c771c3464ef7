"""Claim C7 (dropout left on at inference), worded from `Results.inference`."""

from __future__ import annotations

from collections.abc import Sequence

from study.report.figures import setting_label
from study.report.context import Inputs
from study.report.diagnostics import figures_named, varying_keys, where
from study.report.document import Block, Table, para
from study.report.wording import (ANYTIME_BASIS, CORRECTION, NA, anytime_phrase, count,
                                  fmt_ci_num, fmt_ci_pct, fmt_ci_pp, fmt_num, fmt_pct, fmt_pp,
                                  gap_interval, interval_name, p_rel, stop_text, verdict_cell,
                                  verdict_word)
from study.results import Inference, McSetting, McTrend, Paired

DIFFERENCE_WORDS = {"different": "different", "identical": "identical in every run",
                    "not_shown_different": "not shown different"}


def claim_inference(inputs: Inputs) -> list[Block]:
    mc = inputs.results.inference
    if mc is None:
        return [para("The data do not speak to this claim: no run made stochastic passes with "
                     "dropout on (the protocol's inference.mc_passes is 0).")]
    labels = {str(s.stratum): s.label for s in inputs.results.strata}
    blocks: list[Block] = [para(method_text(mc))]
    for key in dict.fromkeys(str(s.stratum) for s in mc.settings):
        settings = [s for s in mc.settings if str(s.stratum) == key]
        trend = next((t for t in mc.trends if str(t.stratum) == key), None)
        blocks += [para(f"{labels.get(key, key)}: ", stratum_text(settings, trend, mc)),
                   _table(settings, labels.get(key, key))]
    return blocks + figures_named(inputs.figs, "mc_flip_rate")


def method_text(mc: Inference) -> str:
    passes = " or ".join(str(p) for p in sorted({s.passes for s in mc.settings}))
    return (f"After training, each run made {passes} forward passes over the test set with "
            f"dropout left on, its masks drawn from the run's own inference stream (the same "
            f"draws for every setting of a seed), and was scored against its eval-mode "
            f"predictions. The flip rate is the share of test images whose predicted class "
            f"differs between two passes, averaged over all pairs of passes; an image is "
            f"unstable when its class changes at least once (a share that grows with the "
            f"number of passes, where the flip rate does not). Both are averaged over seeds "
            f"with a 95% t interval. The MC prediction averages the softmax over the passes; its "
            f"accuracy is compared with eval mode's within each run (paired t test and TOST "
            f"within \u00b1{fmt_pp(mc.equivalence_margin, sign=False)}, {CORRECTION} over the "
            f"settings), and so are its negative log-likelihood (NLL, nats) and expected "
            f"calibration error (ECE, {mc.ece_bins} equal-width confidence bins). NLL and ECE "
            f"have no margin in their own units, so no equivalence is claimed for them: a "
            f"difference is shown or not shown.{_adaptive_text(mc)}")


def accuracy_records(mc: Inference) -> list[tuple[str, Paired]]:
    """Each setting's MC-minus-eval accuracy record, named by its setting (and the stratum
    values that tell it apart, where there are several), as the scorecard and the bottom line
    list their stops."""
    keys = varying_keys(mc.settings)
    return [(setting_label(s.dropout1, s.dropout2)
             + (f" in {where(s.stratum, keys)}" if keys else ""), s.accuracy)
            for s in mc.settings]


def _adaptive_text(mc: Inference) -> str:
    """Where the accuracy comparisons drove the protocol's rounds, what decides them."""
    if not any(s.accuracy.adaptive for s in mc.settings):
        return ""
    return (f" The accuracy comparisons drove the protocol's adaptive rounds: each verdict is "
            f"read off the t-mixture's 95% confidence sequence (CS) at its stop, shown as its "
            f"interval, and the fixed-n p-values and TOST are descriptive; {ANYTIME_BASIS}. "
            f"NLL and ECE stay fixed-n, at the seeds the rounds chose.")


def stratum_text(settings: Sequence[McSetting], trend: McTrend | None, mc: Inference) -> str:
    live = [s for s in settings if (s.flip_rate.mean or 0) > 0]
    if live:
        top = max(live, key=lambda s: s.flip_rate.mean)
        example = (f" (e.g. test image {top.example_image} in seed {top.example_seed})"
                   if top.example_image is not None else "")
        flips = (f"With dropout on, two passes disagree on {fmt_pct(top.flip_rate.mean)} "
                 f"{fmt_ci_pct(top.flip_rate.ci95)} of test images at "
                 f"{setting_label(top.dropout1, top.dropout2)}{example}, and {fmt_pct(top.unstable_share.mean)} change class at least once "
                 f"in {top.passes} passes: the lesson's \u201cfirst pass cat, second dog\u201d "
                 f"holds. ")
    else:
        flips = "No test image changed class between passes in any setting. "
    return flips + _accuracy_text(settings, mc) + " " + trend_text(trend)


def _accuracy_text(settings: Sequence[McSetting], mc: Inference) -> str:
    parts = [f"{setting_label(s.dropout1, s.dropout2)} {accuracy_gap(s.accuracy)}, "
             f"{accuracy_verdict(s.accuracy, mc.equivalence_margin)}" for s in settings]
    return ("MC-averaged minus eval-mode accuracy, paired within runs: " + "; ".join(parts) + ".")


def accuracy_gap(a: Paired) -> str:
    """'+0.30 pp [+0.10, +0.50]', the interval named when it is a confidence sequence."""
    if a.adaptive:
        return f"{fmt_pp(a.mean_diff)} ({interval_name(a)} {fmt_ci_pp(gap_interval(a))})"
    return f"{fmt_pp(a.mean_diff)} {fmt_ci_pp(a.ci95)}"


def accuracy_verdict(a: Paired, margin: float) -> str:
    """The MC-minus-eval accuracy verdict: from the CS and with its stop when adaptive."""
    if a.adaptive:
        return f"{anytime_phrase(a, f'±{fmt_pp(margin, sign=False)}')}, {stop_text(a)}"
    return verdict_word(a.verdict, margin)


def trend_text(trend: McTrend | None) -> str:
    if trend is None:
        return ""
    left = (f" {', '.join(setting_label(*s) for s in trend.left_out)} left out: a rate of 1 "
            f"zeroes its layer, so nothing random is left to flip." if trend.left_out else "")
    if trend.rho is None:
        return f"The flip rate's dependence on the dropout rate was not tested: {trend.reason}.{left}"
    direction = "rises" if trend.rho > 0 else "falls"
    shown = trend.p is not None and trend.p < 0.05
    return (f"Over {count(trend.n_runs, 'run')} of {count(len(trend.settings), 'setting')}, the "
            f"flip rate {direction} with the mean dropout rate (dropout1 + dropout2) / 2: "
            f"Spearman \u03c1 = {fmt_num(trend.rho)}, p {p_rel(trend.p)}"
            f"{'' if shown else ', not shown at the 5% level'}.{left}")


def _difference_cell(d: Paired, as_pp: bool) -> str:
    """An NLL (nats, 3 decimals) or ECE (pp) difference with its CI, verdict and adjusted p."""
    if as_pp:
        value = f"{fmt_pp(d.mean_diff)} {fmt_ci_pp(d.ci95)}"
    else:
        ci = f" {fmt_ci_num(d.ci95, 3)}" if d.ci95 else ""
        value = fmt_num(d.mean_diff, 3) + ci
    p = f", p {p_rel(d.p_adjusted)}" if d.p_adjusted is not None else ""
    return f"{value}: {DIFFERENCE_WORDS.get(d.verdict, d.verdict)}{p}"


def _table(settings: Sequence[McSetting], label: str) -> Table:
    rows = tuple((setting_label(s.dropout1, s.dropout2), str(s.n),
                  f"{fmt_pct(s.flip_rate.mean)} {fmt_ci_pct(s.flip_rate.ci95)}",
                  f"{fmt_pct(s.unstable_share.mean)} {fmt_ci_pct(s.unstable_share.ci95)}",
                  NA if s.example_image is None else f"{s.example_image} (seed {s.example_seed})",
                  _accuracy_cell(s.accuracy),
                  _difference_cell(s.nll, as_pp=False), _difference_cell(s.ece, as_pp=True))
                 for s in settings)
    header = ("setting", "runs", "flip rate (%)", "unstable (%)", "flipped image",
              "MC \u2212 eval accuracy", "MC \u2212 eval NLL", "MC \u2212 eval ECE")
    adaptive = any(s.accuracy.adaptive for s in settings)
    note = (" Accuracy marked CS: decided adaptively, its 95% confidence sequence at the stop "
            "and the verdict read off it (anytime p unadjusted)." if adaptive else "")
    return Table(header, rows, f"Dropout left on at inference, {label}: means over seeds with "
                 f"95% CIs; MC \u2212 eval differences paired within runs, {CORRECTION}-adjusted "
                 f"p over the settings.{note}", "lrrrrrrr")


def _accuracy_cell(a: Paired) -> str:
    verdict = verdict_cell(a.verdict, a.mean_diff)
    if not a.adaptive:
        return f"{fmt_pp(a.mean_diff)} {fmt_ci_pp(a.ci95)}: {verdict}"
    return (f"{fmt_pp(a.mean_diff)} CS {fmt_ci_pp(a.cs95)}: {verdict} (anytime p "
            f"{p_rel(a.p_anytime)}; {stop_text(a)})")


