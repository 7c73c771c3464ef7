"""Calibration of the adaptive decision rule by Monte Carlo: error rates under optional stopping
and expected seeds, side by side with the fixed-n design of the same power.

    python -m study.tools.calibrate                        # the d2l protocol's design, 10,000 studies
    python -m study.tools.calibrate --sims 20000 --sd 0.6 --protocol protocols/d2l-dropout.yaml

Each simulated study is one comparison's paired gaps, seed by seed (true gap + noise of SD
`--sd` pp), decided by `sequential.run_design` with the protocol's design
(`rounds.design_for`): the rule `study run` and `analyze` apply, not a copy. Noise: Gaussian,
Student t with 3 df, and a centred gamma with shape 4 (skewness 1), each scaled to the SD.

Columns: P(different), P(within) (equivalent or negligible: the claim "inside the margin"),
P(excl. 0) (different or negligible), each with its Monte Carlo SE; E[seeds] per setting with
its SE; the sequential design's power (the share reaching the right claim: "different" beyond
the margin, "within" inside it) and the seeds a fixed paired design needs for that power at the
true gap and SD (t test beyond the margin, TOST inside it; Gaussian theory, noncentral t; a
power of 1 counts as 1 - 1/sims, the resolution of the simulation).
Errors (checked by tests/test_sequential_calibration.py, at most alpha + 2 SE): false exclusion
of 0 at gap 0, and false "within" at gap = +-margin.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from study.analysis import rounds, sequential as sq, stats
from study.protocol import schema

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "protocols" / "d2l-dropout.yaml"
GAPS_PP = (0.0, 0.3, 0.64, 1.0, 2.0)  # the true gaps; +-margin is added
NOISES = ("gaussian", "t3", "skewed")
SIMS = 10_000
SD_PP = 0.6


@dataclass(frozen=True)
class Row:
    noise: str
    stop: str
    gap: float  # accuracy units
    sims: int
    different: float
    within: float
    excludes_zero: float
    seeds_mean: float
    seeds_se: float
    power: float | None  # share reaching the right claim; None at +-margin (no right claim)
    fixed_seeds: int | None

    def se(self, p: float) -> float:
        return math.sqrt(p * (1 - p) / self.sims)


def noise(kind: str, shape: tuple[int, ...], sd: float, rng: np.random.Generator) -> np.ndarray:
    """Mean-0 noise of SD `sd`: Gaussian, t with 3 df (variance 3), centred gamma(4) (skew 1)."""
    if kind == "gaussian":
        return sd * rng.standard_normal(shape)
    if kind == "t3":
        return sd * rng.standard_t(3, shape) / math.sqrt(3)
    if kind == "skewed":
        return sd * (rng.gamma(4.0, 1.0, shape) - 4.0) / 2.0
    raise ValueError(f"noise {kind!r}: expected one of {', '.join(NOISES)}")


def simulate(design: sq.Design, gap: float, sd: float, kind: str, sims: int,
             rng: np.random.Generator, power: float | None = None) -> Row:
    """`sims` sequential studies at one true gap -> their error rates and seeds."""
    x = gap + noise(kind, (sims, design.max_seeds), sd, rng)
    out = sq.run_design(x, design)
    v = out.verdict
    different = float(np.mean(v == sq.DIFFERENT))
    within = float(np.mean((v == sq.EQUIVALENT) | (v == sq.NEGLIGIBLE)))
    excludes = float(np.mean((v == sq.DIFFERENT) | (v == sq.NEGLIGIBLE)))
    at_margin = math.isclose(abs(gap), design.margin, rel_tol=1e-9)
    right = None if at_margin else (within if abs(gap) < design.margin else different)
    fixed = None
    if right is not None and right > 0:
        # A power of 1 in `sims` studies is "at least 1 - 1/sims": the resolution of the run.
        target = min(right, 1 - 1 / sims)
        fixed = (sq.fixed_seeds_tost(gap, sd, design.margin, design.alpha, target)
                 if abs(gap) < design.margin else
                 stats.power_analysis(gap, sd, 2, 2, True, design.alpha, target).seeds_needed)
    return Row(kind, design.stop, gap, sims, different, within, excludes,
               float(out.seeds.mean()), float(out.seeds.std(ddof=1) / math.sqrt(sims)), right, fixed)


def table(design: sq.Design, sd: float = SD_PP / 100, sims: int = SIMS, seed: int = 20261204,
          noises: tuple[str, ...] = NOISES, stops: tuple[str, ...] = ("settled", "first")
          ) -> list[Row]:
    """Every (noise, stop rule, gap) of the calibration; gaps GAPS_PP plus +-margin."""
    rng = np.random.default_rng(seed)
    gaps = sorted({*(g / 100 for g in GAPS_PP), design.margin, -design.margin})
    return [simulate(replace(design, stop=stop), gap, sd, kind, sims, rng)
            for kind in noises for stop in stops for gap in gaps]


def errors(rows: list[Row], margin: float) -> list[tuple[Row, str, float]]:
    """The error rates the design guarantees <= alpha: (row, what, rate)."""
    out = []
    for r in rows:
        if r.gap == 0:
            out.append((r, "false exclusion of 0", r.excludes_zero))
        elif math.isclose(abs(r.gap), margin, rel_tol=1e-9):
            out.append((r, "false within-margin", r.within))
    return out


def markdown(rows: list[Row], design: sq.Design, sd: float) -> str:
    head = (f"{rows[0].sims:,} simulated studies per row; paired gaps with SD {sd * 100:g} pp; "
            f"looks at {', '.join(map(str, design.looks()))} seeds; margin "
            f"{design.margin * 100:g} pp; alpha {design.alpha:g}; mixture precision "
            f"{design.mixture_precision:.3f}. ± is one Monte Carlo SE.\n\n")
    lines = ["| noise | stop | gap (pp) | P(different) | P(within) | P(excl. 0) | E[seeds] "
             "| power | fixed-n seeds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = lambda p: f"{p:.3f} ± {r.se(p):.3f}"  # noqa: E731
        lines.append(
            f"| {r.noise} | {r.stop} | {r.gap * 100:+.2f} | {cell(r.different)} | "
            f"{cell(r.within)} | {cell(r.excludes_zero)} | {r.seeds_mean:.1f} ± {r.seeds_se:.1f} "
            f"| {'—' if r.power is None else f'{r.power:.3f}'} | "
            f"{'—' if r.fixed_seeds is None else r.fixed_seeds} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", type=Path, default=PROTOCOL,
                        help="protocol whose alpha, margin, seeds and adaptive block are used")
    parser.add_argument("--sims", type=int, default=SIMS)
    parser.add_argument("--sd", type=float, default=SD_PP, help="SD of the paired gaps, in pp")
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args(argv)
    design = rounds.design_for(schema.load(args.protocol))
    sd = args.sd / 100
    rows = table(design, sd, args.sims, args.seed)
    print(markdown(rows, design, sd))
    worst = max(errors(rows, design.margin), key=lambda e: e[2] - 2 * e[0].se(e[2]))
    print(f"\nLargest error rate: {worst[1]} {worst[2]:.4f} ± {worst[0].se(worst[2]):.4f} "
          f"({worst[0].noise}, stop {worst[0].stop}, gap {worst[0].gap * 100:+.2f} pp); "
          f"alpha {design.alpha:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
