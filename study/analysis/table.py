"""The tidy table that analysis reads: what `tracking.load_runs` returns from an MLflow experiment.

Analysis, figures and the report take a `RunTable` and nothing else from the store, so a user's
own runs (logged with the schema in docs/run-schema.md) are analysed the same way as ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math

import numpy as np
import pandas as pd

# Columns of RunTable.runs, one row per FINISHED training run.
RUN_COLUMNS = {
    "run_id": str,
    "run_name": str,
    "dropout1": float,
    "dropout2": float,
    "seed": int,
    "device": str,  # cpu | cuda
    "determinism": str,  # default | benchmark | strict
    "implementation": str,  # torch | scratch | scratch-randn
    "execution": str,  # sequential | batched
    "randomness": str,  # native | portable
    "mask_rng": str,  # torch | sfc64: the generator of the dropout masks
    # The GEMM path: openblas-haswell (portable since the change) or torch (everything else, and
    # portable runs from before it). A stratum column: the two portable arithmetics never pool.
    "kernels": str,
    "vary": str,  # all | init | data | dropout: which random streams follow the seed
    "replicate": int,  # 0 for the first run of a cell; >0 repeats it exactly
    # CPU threads the run trained with (tag study.threads): unless the mode makes MKL
    # thread-count invariant, it decides the bits. "unrecorded" for runs without the tag.
    "threads": str,
    # Training images the run trained on (data.train_subset, or the whole training set).
    "train_images": int,
    "status": str,  # ok | degenerate | diverged
    "textbook_check": bool,  # d2l's end-of-training assertion would have passed
    "weights_sha256": str,
    "epochs_done": int,
    "test_acc": float,  # final epoch; NaN when the run diverged (status "diverged")
    "train_acc": float,
    "train_loss": float,
    # Observed share of live units each dropout layer kept in training (NaN when unrecorded).
    "keep_rate1": float,
    "keep_rate2": float,
}

# Columns of runs that made stochastic test-set passes after training (`study.inference`, claim
# C7): present in RunTable.runs only when some run has them, NaN in runs without.
INFERENCE_COLUMNS = {
    "mc_passes": int,  # T, the passes with dropout on
    "mc_flip_rate": float,  # share of test images whose class differs between two passes
    "mc_unstable_share": float,  # share whose class changes at least once in T passes
    "mc_test_acc": float,  # accuracy of the softmax averaged over the passes
    "mc_test_nll": float,  # its mean negative log-likelihood (natural log)
    "mc_test_ece": float,  # its expected calibration error (inference.ECE_BINS bins)
    "test_nll": float,  # the same two of the eval-mode predictions (test_acc's)
    "test_ece": float,
    "mc_flip_example": float,  # a test image index that flipped most often (NaN: none flipped)
}

# Columns that split runs into strata analysed separately (never pooled).
STRATUM_COLUMNS = ("device", "determinism", "implementation", "execution", "randomness", "mask_rng",
                   "kernels", "vary", "threads", "train_images")

# How a stratum value reads to a person: a table heading says "CPU, nn.Dropout, batched", not
# "cpu / default / torch / batched / ...". Values not listed read as "column value".
_WORDS: dict[str, dict[Any, str]] = {
    "device": {"cpu": "CPU", "cuda": "GPU (CUDA)"},
    "implementation": {"torch": "nn.Dropout", "scratch": "hand-written dropout (rand)",
                       "scratch-randn": "hand-written dropout (randn, as printed in the lesson)"},
    "execution": {"sequential": "sequential engine", "batched": "batched engine"},
    "mask_rng": {"torch": "masks from torch's generator", "sfc64": "masks from numpy's SFC64"},
    "kernels": {"torch": "torch's GEMM kernels", "openblas-haswell": "OpenBLAS Haswell GEMMs"},
    "vary": {"all": "every random source varied", "init": "only the initialisation varied",
             "data": "only the data order varied", "dropout": "only the dropout masks varied",
             "bitflip": "one bit of the initial weights flipped"},
}
_FORMS = {"determinism": "{} mode", "randomness": "{} randomness",
          "train_images": "{:,} training images"}


def stratum_words(column: str, value: Any) -> str:
    """One stratum value in words, e.g. ("train_images", 1000) -> "1,000 training images"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{column} not recorded"
    if value in _WORDS.get(column, {}):
        return _WORDS[column][value]
    if column == "threads":
        return f"{value} thread" + ("" if int(value) == 1 else "s")
    if column in _FORMS:
        try:
            return _FORMS[column].format(int(value) if column == "train_images" else value)
        except (TypeError, ValueError):
            pass
    return f"{column} {value}"


def stratum_label(stratum: dict[str, Any], varying: list[str]) -> str:
    """A stratum named by the columns that vary in the study; "all runs" when none does."""
    named = [stratum_words(c, stratum[c]) for c in varying if c in stratum]
    return ", ".join(named) if named else "all runs"

# Columns of RunTable.curves, one row per run, epoch and metric.
CURVE_COLUMNS = {"run_id": str, "epoch": int, "metric": str, "value": float}

# The d2l study's names: the setting is the pair of rates, the outcome final test accuracy.
D2L_FACTORS = ("dropout1", "dropout2")
D2L_METRIC = "test_acc"
# The d2l study's per-epoch metrics the learning curves (results.json, figures) draw.
CURVE_METRICS = ("test_acc", "train_loss")


@dataclass(frozen=True)
class Columns:
    """Which recorded names the analysis reads (`study analyze --factor/--seed/--metric`).

    A setting is the tuple of the `factors`' values; seeds pair runs across settings; `metric`
    is the outcome, read at its final step or averaged over its last K steps. `strata` are the
    other params that vary across runs (besides STRATUM_COLUMNS): runs are split by them too.
    In RunTable.runs the seed param is always the column "seed"; `seed` keeps the user's name."""

    factors: tuple[str, ...] = D2L_FACTORS
    seed: str = "seed"
    metric: str = D2L_METRIC
    lower_is_better: bool = False
    strata: tuple[str, ...] = ()

    @property
    def d2l(self) -> bool:
        """The d2l study's own names: the lesson's diagnostics and claims apply."""
        return self.factors == D2L_FACTORS and self.metric == D2L_METRIC

    @property
    def curve_metrics(self) -> tuple[str, ...]:
        """The metrics whose per-epoch values the analysis reads: the learning curves' and the
        outcome's (its `last:K` endpoints and evaluated epochs)."""
        return CURVE_METRICS if self.d2l else (self.metric,)

    def required(self) -> set[str]:
        """Columns RunTable.runs must hold under these names."""
        return (set(RUN_COLUMNS) - set(D2L_FACTORS) - {D2L_METRIC}) | set(self.factors) | {
            self.metric, *self.strata}


@dataclass
class RunTable:
    experiment_id: str
    experiment_name: str
    runs: pd.DataFrame
    curves: pd.DataFrame
    # The resolved protocol logged with the runs, when they came from this harness.
    protocol: dict[str, Any] | None = None
    # Environment tags of the runs (torch/CUDA/cuDNN versions, device names, git commit, ...).
    environment: dict[str, Any] = field(default_factory=dict)
    # Counts of the newest `study verify` run of the experiment (study.verify.* tags), if any.
    verification: dict[str, str] | None = None
    # Finished runs left out because the protocol no longer plans their cells.
    unplanned_runs: int = 0
    columns: Columns = field(default_factory=Columns)

    def __post_init__(self) -> None:
        missing = self.columns.required() - set(self.runs.columns)
        if missing:
            raise ValueError(f"run table lacks columns {sorted(missing)}")
        missing = set(CURVE_COLUMNS) - set(self.curves.columns)
        if missing:
            raise ValueError(f"curve table lacks columns {sorted(missing)}")


def scalar(value: Any) -> Any:
    """A NumPy/pandas scalar from a table as plain Python; missing (NaN, NA) as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def jsonable(obj: Any) -> Any:
    """Recursively to JSON types: tuples to lists, NumPy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    obj = scalar(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
