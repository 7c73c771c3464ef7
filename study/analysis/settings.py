"""Settings and their runs in a tidy run table: the lookups every analysis module shares.

A setting is the tuple of the factors' values (`table.Columns.factors`; for the d2l study the
pair (dropout1, dropout2)). Numbers are rounded so a value read back from MLflow as
0.20000000001 still names the same setting; other values (an optimizer's name) stay strings.
`with_settings` stores each run's setting in the column "setting", which the lookups read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

METRIC = "test_acc"
SETTING = "setting"  # the column `with_settings` adds

Setting = tuple[Any, ...]


def value_of(value: Any) -> Any:
    """One factor value as a setting holds it: a rounded float, or a string."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return round(float(value), 6)
    return str(value)


def setting_of(*values: Any) -> Setting:
    # Rounded so 0.2 read back from MLflow as 0.20000000001 still names the same setting.
    return tuple(value_of(v) for v in values)


def with_settings(frame: pd.DataFrame, factors: Sequence[str]) -> pd.DataFrame:
    """frame plus the column "setting": each run's factor values as a `Setting`."""
    values = zip(*(frame[f].tolist() for f in factors)) if len(frame) else []
    return frame.assign(**{SETTING: [setting_of(*v) for v in values]})


def settings_in(frame: pd.DataFrame) -> list[Setting]:
    return sorted(set(frame[SETTING]))


def rows_of(frame: pd.DataFrame, setting: Setting) -> pd.DataFrame:
    # Compared as whole tuples: this runs for every group, endpoint and test.
    mask = np.fromiter((s == setting for s in frame[SETTING]), dtype=bool, count=len(frame))
    return frame[mask]


def by_seed(frame: pd.DataFrame, setting: Setting, column: str = METRIC) -> pd.Series:
    found = rows_of(frame, setting)
    return pd.Series(found[column].to_numpy(dtype=float), index=found["seed"].to_numpy()).sort_index()
