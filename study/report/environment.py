"""What a report says about the machine and the store: kept out of the PDF, in `environment.md`.

The same runs give the same report.pdf bytes on any machine (issue 22): so the PDF holds
nothing that depends on the machine that ran or analysed them (CPU model, ISA, threads, host
name), on the time (dates) or on the store (paths, MLflow experiment ids). Those go to
`environment.md`, which the PDF names; the determinism flags a mode sets (`study.flag.*`) are
the same on every machine and stay in the PDF.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from study.analysis.table import RunTable

FILE = "environment.md"
# Environment keys whose value a protocol's mode decides, whatever the machine.
PDF_PREFIXES = ("study.flag.",)
PORTABLE_MODE = "portable"
GOLDEN_COMMAND = "python -m study verify {protocol} --golden"


def in_pdf(key: str) -> bool:
    return key.startswith(PDF_PREFIXES)


def flags(table: RunTable) -> dict[str, str]:
    """The environment entries the PDF may show: those a mode sets."""
    return {k: v for k, v in (table.environment or {}).items() if in_pdf(k)}


def pointer() -> str:
    """The PDF's sentence that names the file."""
    return (f"The machine, library versions, commit and MLflow experiment of these runs are in "
            f"{FILE} beside this report (and in each run's study.env.* tags); they are kept out "
            f"of this PDF so that the same runs give the same PDF bytes on every machine.")


def portable_promise(table: RunTable, protocol_file: str) -> str | None:
    """The reproducibility promise, only where it holds: every run on the CPU in `portable`
    mode, recorded on x86-64 with one torch version. None otherwise (the promise is not made)."""
    runs, env = table.runs, table.environment or {}
    torch = env.get("torch_version", "")
    portable = (len(runs) > 0 and set(runs["determinism"]) == {PORTABLE_MODE}
                and set(runs["device"]) == {"cpu"})
    if not portable or not torch or ", " in torch or env.get("machine", "x86_64") != "x86_64":
        return None
    return (f"These runs give the same weights, to the bit, on any x86-64 CPU with AVX2 and "
            f"torch {torch} (portable mode); {GOLDEN_COMMAND.format(protocol=protocol_file)} "
            f"checks it on this machine.")


def markdown(document: str, tables: Mapping[str, RunTable], notes: Sequence[str] = (),
             host: str | None = None) -> str:
    """environment.md: where `document` was written, and what each protocol's runs (`tables`,
    by name) recorded. No clock time: a rerun on the same machine writes the same file, so
    it is not logged again (the analysis run in MLflow has its own start time)."""
    host = host or socket.gethostname()
    lines = [f"# Environment of {document}", "",
             f"Kept out of {document} so that its bytes do not depend on the machine, the time "
             f"or the store.", "",
             f"- written on host {host}",
             *(f"- {n}" for n in notes), ""]
    for name, table in tables.items():
        commits = (table.environment or {}).get("git_commit", "(not recorded)")
        lines += [f"## {name}", "",
                  f"- MLflow experiment: {table.experiment_name} (id {table.experiment_id})",
                  f"- git commit of the runs: {commits}", "",
                  *_table("Environment tags recorded with the runs", table.environment or {})]
        verify = getattr(table, "verification", None)
        if verify:
            lines += ["", *_table("The newest `study verify` run", verify)]
        lines.append("")
    return "\n".join(lines)


def _table(title: str, values: Mapping[str, object]) -> list[str]:
    rows = [f"| {k} | {str(v).replace('|', '/')} |" for k, v in sorted(values.items())]
    return [f"### {title}", "", "| key | value |", "|---|---|",
            *(rows or ["| (none recorded) | |"])]


def write(out_dir: Path, document: str, tables: Mapping[str, RunTable],
          notes: Sequence[str] = ()) -> Path:
    path = Path(out_dir) / FILE
    path.write_text(markdown(document, tables, notes), encoding="utf-8")
    return path
