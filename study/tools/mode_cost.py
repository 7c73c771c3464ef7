"""What a determinism mode costs against `default`, as the bench last measured it.

    python -m study.tools.bench --modes-only      # measures, and writes docs/measured/mode-costs.json

The bench (`make bench`, or `--modes-only`) writes its measured ratios here with the date, the
machine and the command; the file is committed from the last measurement. `study run` and
`study plan` quote it in one line per mode, so the cost a user is told is a measured one, never
a number written into the code. Standard library only: `study plan` answers without torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATH = ROOT / "docs" / "measured" / "mode-costs.json"
DEFAULT_KERNELS = "openblas-haswell"  # the protocol's default GEMM path of `portable`


@dataclass(frozen=True)
class Measured:
    """One bench measurement: (engine, variant label) -> CPU time against default's (median of
    the per-round ratios), with when, where and how it was measured."""

    date: str
    command: str
    cpu: str
    ratios: dict[tuple[str, str], float]


def record(costs: list[dict[str, object]], machine: dict[str, object], command: str,
           date: str) -> dict[str, object]:
    """The file's content: the bench's `ModeCost.to_json()` list and its `machine()`."""
    return {"date": date, "command": command, "machine": machine, "costs": costs}


def read(path: Path | None = None) -> Measured | None:
    """The measurement in `path` (default PATH); None where there is none (never run, or
    unreadable)."""
    try:
        raw = json.loads((path or PATH).read_text(encoding="utf-8"))
        ratios = {(str(c["engine"]), str(c["variant"])): float(c["paired_median"])
                  for c in raw["costs"]}
        return Measured(str(raw["date"]), str(raw["command"]),
                        str(raw["machine"]["cpu_model"]), ratios)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def variant(mode: str, kernels: str) -> str:
    """The bench's label of a mode: its GEMM path only where it is not the default one, and
    only for `portable` (the other modes take torch's kernels whatever the protocol says)."""
    return f"{mode}[{kernels}]" if mode == "portable" and kernels != DEFAULT_KERNELS else mode


def this_cpu() -> str:
    """This machine's CPU as the bench records it (`environment.cpu_model()`: vendors reuse
    names like "AMD EPYC", so with family, model and stepping), read without importing torch."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return ""
    info: dict[str, str] = {}
    for row in first.splitlines():
        key, sep, value = row.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    ids = [f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info]
    name = info.get("model name", "unknown")
    return f"{name} ({', '.join(ids)})" if ids else name


def line(mode: str, engine: str, kernels: str, measured: Measured | None, cpu: str) -> str:
    """One line: the mode and its measured CPU time against default's on `engine`."""
    name = variant(mode, kernels)
    head = f"mode {name} ({engine})"
    if mode == "default":
        return f"{head}: the reference (native kernels: its bits follow the CPU)"
    if measured is None:
        return f"{head}: cost not measured on this machine (make bench measures it)"
    if (ratio := measured.ratios.get((engine, name))) is None:
        return f"{head}: cost not measured (the bench of {measured.date} timed no {name} here)"
    where = measured.cpu if measured.cpu == cpu else f"{measured.cpu}, not this machine's CPU"
    return f"{head}: {ratio:.2f}x default's CPU time (make bench, {measured.date}, {where})"
