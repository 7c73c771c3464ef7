"""The lesson's claims, each tested against the data: one `Claim` entry per claim.

`CLAIMS` drives both the question section (what the lesson says) and the verdicts section (what
the data say), so a new claim is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from study.report import bottomline
from study.report.bottomline import BottomLine
from study.report.figures import setting_label
from study.report.context import Inputs, find_comparison, find_group, in_stratum
from study.report.diagnostics import (applicable, claim_repeatability, diag_section,
                                          equivalence_blocks, keep_rate_blocks)
from study.report.document import Block, Bullets, Fig, Heading, Strong, Table, para
from study.report.inference import claim_inference
from study.report.wording import (NA, capitalised, divergence_phrase, endpoint_text,
                                   gap_interval, method_text,
                                  finite, fmt_ci_num, fmt_ci_pct, fmt_ci_pp, fmt_mean_sd,
                                  fmt_pct, fmt_pp, fmt_num, fmt_p, fmt_setting, p_rel,
                                  robustness_phrase, verdict_phrase)
from study.results import OVERFIT_GAP, OVERFIT_TRAIN_ACC, Comparison, Group, Interaction, Results

Setting = tuple[float, float]


@dataclass(frozen=True)
class Claim:
    key: str  # "C1"
    lesson: str  # what the lesson concludes from one run per setting
    heading: str
    build: Callable[[Inputs], list[Block]]
    bottom: Callable[[Inputs], BottomLine]  # the one sentence the claim's section opens with

    def bottom_line(self, inputs: Inputs) -> str:
        return self.bottom(inputs).sentence(self.key)


def verdicts_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [
        Heading(1, "Verdicts"),
        para("Each claim of the lesson against the data, stratum by stratum. \u201cNo real "
             "difference\u201d is said only where equivalence within the margin was shown.")]
    for claim in CLAIMS:
        blocks += [Heading(2, f"{claim.key}: {claim.heading}"),
                   para(Strong(claim.bottom_line(inputs))), *claim.build(inputs)]
    return blocks


# C1 --------------------------------------------------------------------------------------------


def claim_no_dropout(inputs: Inputs) -> list[Block]:
    r = inputs.results
    items = [para(f"{s.label}: ", _no_dropout_text(inputs, s.stratum))
             for s in r.strata if find_group(r, s.stratum, 0.0, 0.0) is not None]
    if not items:
        return [para("The data do not speak to this claim: (0, 0) was not run.")]
    return [Bullets(tuple(items))]


def primary_verdict(c: Comparison, inputs: Inputs) -> str:
    """The primary analysis named, its verdict, whether it is robust, and divergence if any."""
    r = inputs.results
    text = (f"under the primary analysis ({endpoint_text(c.endpoint)}, {method_text(c)}) the gap "
            f"of {fmt_setting(c)} to the baseline is {fmt_pp(c.mean_diff)} "
            f"{fmt_ci_pp(gap_interval(c))}: {verdict_phrase(c, r)}. This verdict is "
            f"{robustness_phrase(c)}.")
    diverged = divergence_phrase(c, r)
    return text + (f" {capitalised(diverged)}." if diverged else "")


def _no_dropout_text(inputs: Inputs, key: dict) -> str:
    r = inputs.results
    base = tuple(r.baseline)
    comps = in_stratum(r.comparisons, key)
    if base == (0.0, 0.0):
        beaten = [c for c in comps if c.verdict == "different" and (c.mean_diff or 0) < 0]
        text = " ".join(capitalised(primary_verdict(c, inputs)) for c in comps)
        return (f"(0, 0) is the baseline; it is shown better than {len(beaten)} of {len(comps)} "
                f"dropout settings. {text}")
    c = find_comparison(r, key, 0.0, 0.0)
    if c is None:
        return "no comparison of (0, 0) with the baseline is in the results."
    ranked = sorted((g for g in in_stratum(r.groups, key) if finite(g.mean)),
                    key=lambda g: -g.mean)
    order = ", ".join(f"{fmt_setting(g)} {fmt_pct(g.mean)}" for g in ranked)
    return (f"{capitalised(primary_verdict(c, inputs))} Only "
            f"comparisons with the baseline were tested, so (0, 0) against the other dropout "
            f"settings rests on the means alone: {order}.")


# C2, C3 ----------------------------------------------------------------------------------------


def claim_degenerate(setting: Setting) -> Callable[[Inputs], list[Block]]:
    def build(inputs: Inputs) -> list[Block]:
        r = inputs.results
        items = []
        for s in r.strata:
            g = find_group(r, s.stratum, *setting)
            if g is not None:
                c = find_comparison(r, s.stratum, *setting)
                items.append(para(f"{s.label}: ", _degenerate_text(g, c, inputs)))
        if not items:
            return [para(f"The data do not speak to this claim: {setting_label(*setting)} was "
                         f"not run.")]
        return [Bullets(tuple(items))]
    return build


def _degenerate_text(g: Group, c: Comparison | None, inputs: Inputs) -> str:
    status = ", ".join(f"{v} {k}" for k, v in sorted(g.status_counts.items()))
    n_runs = g.n + g.n_excluded
    failed = n_runs - g.textbook_check_passed
    text = (f"runs by status: {status or NA}; the textbook's end-of-training assertion (train "
            f"loss < 0.5, accuracies > 0.7) would have failed in {failed} of {n_runs} runs, the "
            f"assertion the lesson saw fail as \u201cerrors\u201d. "
            f"{capitalised(endpoint_text(inputs.results.endpoint))} {fmt_mean_sd(g)} (chance is "
            f"10%)")
    if c is not None:
        text += f"; {primary_verdict(c, inputs)}"
    return text + ("" if text.endswith(".") else ".")


# C3' -------------------------------------------------------------------------------------------

FIRST_LAYER = ((0.8, 0.6), (0.6, 0.8))  # more dropout in the first layer, against less


def claim_first_layer(inputs: Inputs) -> list[Block]:
    """The lesson's guess that (0.9, 0.9) fails from dropping too much in the first layer, read
    off the declared contrast (0.8, 0.6) against (0.6, 0.8) (`analysis.contrasts`)."""
    r = inputs.results
    (a, b) = FIRST_LAYER
    found = [c for c in r.contrasts if (c.dropout1, c.dropout2) == a and tuple(c.baseline) == b]
    if not found:
        return [para(f"The data do not speak to this claim: the contrast {setting_label(*a)} "
                     f"against {setting_label(*b)} was not declared (`analysis.contrasts`).")]
    labels = {str(s.stratum): s.label for s in r.strata}
    return [Bullets(tuple(para(f"{labels[str(c.stratum)]}: ", _first_layer_text(c, inputs))
                          for c in found))]


def _first_layer_text(c: Comparison, inputs: Inputs) -> str:
    r = inputs.results
    # A Holm family only for the fixed-n test; an adaptive verdict is its own CS's.
    family = "" if c.adaptive else ", a Holm family of the declared contrasts"
    text = (f"under the primary analysis ({endpoint_text(c.endpoint)}, {method_text(c)}{family}) "
            f"{fmt_setting(c)} against {fmt_setting(c.baseline)} is "
            f"{fmt_pp(c.mean_diff)} {fmt_ci_pp(gap_interval(c))} over {c.n_pairs or c.n} "
            f"{'paired seeds' if c.paired else 'runs'}: {verdict_phrase(c, r)}. This verdict is "
            f"{robustness_phrase(c)}.")
    if c.verdict == "different" and (c.mean_diff or 0) < 0:
        reading = ("More dropout in the first layer costs accuracy here, as the lesson guessed.")
    elif c.verdict == "different":
        reading = "More dropout in the first layer does better here, against the lesson's guess."
    else:
        reading = ("The data do not show which layer's rate matters more; the lesson's guess is "
                   "neither supported nor refuted.")
    return f"{capitalised(text)} {reading}"


# C4 --------------------------------------------------------------------------------------------


def claim_implementations(inputs: Inputs) -> list[Block]:
    """The paired equivalence test when the diagnostics have one, else the groups side by side;
    then the keep rates, which show what each implementation actually draws."""
    r = inputs.results
    blocks = equivalence_blocks(r) if applicable(diag_section(r, "implementations")) \
        else _implementations_side_by_side(inputs)
    keep = diag_section(r, "keep_rates")
    if applicable(keep) and len({x.implementation for x in keep.records}) > 1:
        blocks += keep_rate_blocks(r, inputs.figs)
    return blocks


def _implementations_side_by_side(inputs: Inputs) -> list[Block]:
    r = inputs.results
    impls = sorted({str(s.stratum["implementation"]) for s in r.strata
                    if "implementation" in s.stratum})
    if len(impls) < 2:
        return [para("The data do not speak to this claim: only one dropout implementation "
                     "was run.")]
    labels = {str(s.stratum): s.label for s in r.strata}
    rows = tuple((fmt_setting(g), labels[str(g.stratum)], str(g.n), fmt_mean_sd(g),
                  fmt_ci_pct(g.ci95))
                 for g in sorted(r.groups, key=lambda g: (g.dropout1, g.dropout2))
                 if "implementation" in g.stratum)
    return [para(f"Implementations run: {', '.join(impls)}. The results compare settings within "
                 f"a stratum, so no test between implementations was made; the table below puts "
                 f"them side by side and overlapping CIs are not evidence of equal performance."),
            Table(("setting", "stratum", "n", "mean ± SD", "95% CI (%)"), rows,
                  "Test accuracy by implementation (no between-implementation test).", "llrrr")]


# C5 --------------------------------------------------------------------------------------------


def claim_repeatable(inputs: Inputs) -> list[Block]:
    return claim_repeatability(inputs.results, inputs.table, inputs.setup)


# C6 --------------------------------------------------------------------------------------------


def claim_overfitting(inputs: Inputs) -> list[Block]:
    """Dropout's gain against the training-set size (`Results.interactions`): the regime, the
    best rate per size, the trend of the gain with the baseline's gap, and the curves."""
    r = inputs.results
    if not r.interactions:
        return [para("The data do not speak to this claim: the runs hold one training-set size "
                     "(protocols/overfitting.yaml crosses the size with the dropout rate).")]
    blocks: list[Block] = []
    for i in r.interactions:
        # The bottom line above states whether C6 holds; several strata are named here.
        blocks += [*([para(Strong(i.label))] if len(r.interactions) > 1 else []),
                   _regime_table(i), _gain_table(i, r), para(_trend_text(i)),
                   para(_dose_text(i))]
    return blocks + [Fig(f) for f in inputs.figs if f.name == "interaction"]


def _size(n: int) -> str:
    return f"{n:,}"


def _regime_table(i: Interaction) -> Table:
    base = fmt_setting(i.baseline)
    rows = tuple((_size(e.train_images), str(e.regime.n), fmt_pct(e.regime.train_acc),
                  fmt_pct(e.regime.test_acc), fmt_pp(e.regime.gap),
                  fmt_ci_pp(e.regime.gap_ci95), fmt_pct(e.regime.median_train_acc),
                  fmt_pp(e.regime.median_gap), f"{e.regime.seeds_overfitting} of {e.regime.n}",
                  "yes" if e.regime.overfits else "no")
                 for e in i.sizes)
    return Table(("training images", "n", f"{base} train", f"{base} test", "gap", "95% CI",
                  "median train", "median gap", "seeds overfitting", "overfits"), rows,
                 f"The regime per training-set size: {base}'s final train accuracy (train mode, "
                 f"last epoch) and test accuracy, and their gap, means over seeds, then the "
                 f"medians. Overfits: median train ≥ {OVERFIT_TRAIN_ACC:.0%} and median gap ≥ "
                 f"{fmt_pp(OVERFIT_GAP, 0, sign=False)}, decided on medians so that one seed's "
                 f"late spike cannot move the category.", "rrrrrrrrrl")


def _gain_table(i: Interaction, r: Results) -> Table:
    rows = tuple((_size(e.train_images), fmt_setting(e.best) if e.best else NA,
                  fmt_pp(e.gain), fmt_ci_pp(e.gain_ci95), fmt_p(e.p_adjusted),
                  e.verdict or NA, NA if e.robust is None else ("yes" if e.robust else "no"))
                 for e in i.sizes)
    return Table(("training images", "best", "gain", "95% CI", "p (Holm)", "verdict", "robust"),
                 rows,
                 f"The best setting per size and its gain over {fmt_setting(i.baseline)} "
                 f"({endpoint_text(i.endpoint)}, paired t test, Holm over the rates of that "
                 f"size). Best: the largest gain among settings shown better, else the largest "
                 f"mean gain.", "rlrrrll")


def _trend_text(i: Interaction) -> str:
    t, s = i.trend, i.trend_per_seed
    base = fmt_setting(i.baseline)
    if t.estimate is None:
        return f"Trend of the gain with {base}'s gap: not computable ({t.reason})."
    per_10 = fmt_pp(t.estimate * 0.10)
    text = (f"Trend: regressing each seed's gain on its {base} train − test gap over "
            f"{i.n_points} (size, seed) points from {len(i.sizes)} sizes, the slope is "
            f"{fmt_num(t.estimate, 3)} {fmt_ci_num(t.ci95, 3)} (p {p_rel(t.p)}; {t.method}), "
            f"i.e. {per_10} of gain per 10 pp of gap.")
    if s.estimate is not None:
        text += (f" Fitted within each seed instead ({s.method}): {fmt_num(s.estimate, 3)} "
                 f"{fmt_ci_num(s.ci95, 3)}.")
    grows = t.ci95 is not None and t.ci95[0] > 0
    shrinks = t.ci95 is not None and t.ci95[1] < 0
    text += (" The gain is shown to grow with the gap." if grows else
             " The gain is shown to shrink as the gap grows." if shrinks else
             " The interval includes 0: a trend is not shown (which is not evidence of none).")
    notes = "; ".join([*i.notes, f"the gap takes only {len(i.sizes)} levels, one per size"])
    return text + f" Caveats: {notes}."


SMALLEST_RATE = {"helps": "already helps", "hurts": "already hurts",
                 "nothing": "does nothing (shown within the margin)",
                 "unclear": "is not shown to do anything either way"}


def _dose_text(i: Interaction) -> str:
    """The lesson's reading of the curve: too small does nothing, too large constrains."""
    parts = []
    for e in i.sizes:
        large = ("the largest rate constrains the fit (lower train accuracy than the baseline, "
                 "test below the peak)" if e.largest_constrains else
                 "the largest rate is not shown to constrain the fit" if e.largest_constrains
                 is False else "the largest rate cannot be read")
        parts.append(f"at {_size(e.train_images)} images the curve peaks at "
                     f"{fmt_setting(e.peak) if e.peak else NA}, the smallest rate "
                     f"{SMALLEST_RATE[e.smallest_rate]}, and {large}")
    return ("Dose–response (“too small does nothing, too large constrains”): "
            + "; ".join(parts) + ".")


CLAIMS: tuple[Claim, ...] = (
    Claim("C1", "no dropout, (0, 0), beats every dropout setting;",
          "no dropout beats every dropout setting", claim_no_dropout, bottomline.no_dropout),
    Claim("C2", "(1, 1) \u201cerrors\u201d (cannot be run);", "(1, 1) errors",
          claim_degenerate((1.0, 1.0)), bottomline.degenerate((1.0, 1.0))),
    Claim("C3", "(0.9, 0.9) \u201chas problems\u201d;", "(0.9, 0.9) has problems",
          claim_degenerate((0.9, 0.9)), bottomline.degenerate((0.9, 0.9))),
    Claim("C3\u2032", "the (0.9, 0.9) trouble comes from dropping too much in the first layer "
                     "((0.8, 0.6) against (0.6, 0.8));",
          "too much dropout in the first layer is what hurts", claim_first_layer,
          bottomline.first_layer(*FIRST_LAYER)),
    Claim("C4", "the hand-written dropout and nn.Dropout perform about the same;",
          "hand-written and nn.Dropout perform the same", claim_implementations,
          bottomline.implementations),
    Claim("C5", "fixing the random seed makes training repeatable, but cuDNN on CUDA may still "
                "differ (parallel sums in a different order);",
          "a fixed seed makes training repeatable; cuDNN may not", claim_repeatable,
          bottomline.repeatable),
    Claim("C6", "however the rates are tuned, no dropout wins; maybe the model is not big "
                "enough, and dropout only pays off once it overfits;",
          "dropout pays off only once the model overfits", claim_overfitting,
          bottomline.overfitting),
    Claim("C7", "at inference dropout is not needed; left on, it adds randomness and must be "
                "computed several times (“the first pass says cat, the second may say "
                "dog”).",
          "dropout left on at inference flips predictions", claim_inference,
          bottomline.inference),
)


def question_bullets(claims: Sequence[Claim] | None = None) -> Bullets:
    """The claims in the lesson's words (by default CLAIMS, read when called)."""
    return Bullets(tuple(para(Strong(c.key), f" {c.lesson}") for c in
                         (CLAIMS if claims is None else claims)))
