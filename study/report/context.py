"""What every section reads (`Inputs`), and finding groups and comparisons in it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from study.report.figures import FigureFile
from study.report import describe
from study.results import Comparison, Group, Results
from study.analysis.table import RunTable

Item = TypeVar("Item", Group, Comparison)


@dataclass(frozen=True)
class Inputs:
    results: Results
    table: RunTable
    figs: tuple[FigureFile, ...]
    setup: describe.Setup  # the model, data and training, from the runs' resolved protocol

    @classmethod
    def of(cls, results: Results, table: RunTable, figs: Sequence[FigureFile] = ()) -> Inputs:
        return cls(results, table, tuple(figs), describe.setup(table.protocol))


def same_setting(item: Group | Comparison, d1: float, d2: float) -> bool:
    return math.isclose(item.dropout1, d1) and math.isclose(item.dropout2, d2)


def in_stratum(items: Iterable[Item], stratum: dict[str, Any]) -> list[Item]:
    return [i for i in items if i.stratum == stratum]


def find_group(results: Results, stratum: dict[str, Any], d1: float, d2: float) -> Group | None:
    return next((g for g in in_stratum(results.groups, stratum) if same_setting(g, d1, d2)), None)


def find_comparison(results: Results, stratum: dict[str, Any], d1: float,
                    d2: float) -> Comparison | None:
    return next((c for c in in_stratum(results.comparisons, stratum) if same_setting(c, d1, d2)),
                None)
