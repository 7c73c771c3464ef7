"""Settings and their runs in a tidy run table: the lookups every analysis module shares.

A setting is the pair (dropout1, dropout2), rounded so a value read back from MLflow as
0.20000000001 still names the same setting.
"""

from __future__ import annotations

import pandas as pd

METRIC = "test_acc"

Setting = tuple[float, float]


def setting_of(d1: float, d2: float) -> Setting:
    # Rounded so 0.2 read back from MLflow as 0.20000000001 still names the same setting.
    return (round(float(d1), 6), round(float(d2), 6))


def settings_in(frame: pd.DataFrame) -> list[Setting]:
    pairs = {setting_of(a, b) for a, b in zip(frame["dropout1"], frame["dropout2"])}
    return sorted(pairs)


def rows_of(frame: pd.DataFrame, setting: Setting) -> pd.DataFrame:
    # Rounded as `setting_of` rounds, vectorised: this runs for every group, endpoint and test.
    d1, d2 = (frame[c].to_numpy(dtype=float).round(6) for c in ("dropout1", "dropout2"))
    return frame[(d1 == setting[0]) & (d2 == setting[1])]


def by_seed(frame: pd.DataFrame, setting: Setting, column: str = METRIC) -> pd.Series:
    found = rows_of(frame, setting)
    return pd.Series(found[column].to_numpy(dtype=float), index=found["seed"].to_numpy()).sort_index()
