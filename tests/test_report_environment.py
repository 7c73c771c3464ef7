"""The same runs give the same report.pdf bytes on any machine: what depends on the machine,
the time or the store goes to environment.md beside the PDF, and the portable promise is made
only where it holds.

    .venv/bin/python -m pytest tests/test_report_environment.py -x -q
"""

from __future__ import annotations

import dataclasses

import pytest

from study import report
from study.report import environment, sections
from study.report.context import Inputs
from study.report.render_markdown import render_markdown
from tests.results_factory import make_results, make_table

MACHINE_A = {"cpu": "AMD EPYC 7B13", "cpu_model": "AMD EPYC 7B13", "cpu_isa": "avx2",
             "device_name": "AMD EPYC 7B13", "threads.intra_op": "2",
             "mkl_cbwr_effective": "AVX2", "git_commit": "296de8c"}
MACHINE_B = {"cpu": "Intel Xeon Platinum 8480C", "cpu_model": "Intel Xeon Platinum 8480C",
             "cpu_isa": "avx512", "device_name": "Intel Xeon Platinum 8480C",
             "threads.intra_op": "16", "mkl_cbwr_effective": "AVX512", "git_commit": "296de8c"}


def on_machine(table, env: dict, experiment_id: str):
    """The same runs as another machine's store holds them: its environment tags, its ids."""
    runs = table.runs.assign(run_id=table.runs["run_id"] + f"-{experiment_id}")
    curves = table.curves.assign(run_id=table.curves["run_id"] + f"-{experiment_id}")
    return dataclasses.replace(table, experiment_id=experiment_id, runs=runs, curves=curves,
                               environment={**table.environment, **env,
                                            "study.flag.deterministic_algorithms": "True"})


def test_two_machines_two_stores_give_the_same_pdf_bytes(tmp_path, monkeypatch):
    table = make_table(("torch",), name="d2l-dropout")
    results = make_results(table)
    monkeypatch.setattr(environment.socket, "gethostname", lambda: "amd-host")
    a = report.write_report(results, on_machine(table, MACHINE_A, "1"), tmp_path / "store-a" / "r")
    monkeypatch.setattr(environment.socket, "gethostname", lambda: "intel-host")
    b = report.write_report(results, on_machine(table, MACHINE_B, "734"),
                            tmp_path / "elsewhere" / "report-b")
    assert a.pdf.read_bytes() == b.pdf.read_bytes()
    assert a.markdown.read_text() == b.markdown.read_text()
    # What differs is in environment.md, which the PDF names and which is logged with it.
    env_a, env_b = a.environment.read_text(), b.environment.read_text()
    assert "amd-host" in env_a and "AMD EPYC 7B13" in env_a and "(id 1)" in env_a
    assert "intel-host" in env_b and "avx512" in env_b and "(id 734)" in env_b
    assert a.environment in a.all()
    md = a.markdown.read_text()
    assert "environment.md beside this report" in md
    for machine in ("AMD EPYC", "amd-host", "avx2", "296de8c", "(id 1)"):
        assert machine not in md, machine
    assert "study.flag.deterministic\\_algorithms" in md  # a mode's flags stay: same everywhere


def test_the_pdf_changes_when_the_runs_do(tmp_path):
    """The byte test above is not vacuous: other numbers give another PDF."""
    table = make_table(("torch",), name="d2l-dropout")
    results = make_results(table)
    moved = dataclasses.replace(results, comparisons=[
        dataclasses.replace(c, mean_diff=(c.mean_diff or 0) + 0.001) for c in results.comparisons])
    a = report.write_report(results, table, tmp_path / "a")
    b = report.write_report(moved, table, tmp_path / "b")
    assert a.pdf.read_bytes() != b.pdf.read_bytes()


def _reproducibility(table) -> str:
    results = make_results(table)
    md = render_markdown(sections.document(Inputs.of(results, table)), "x")
    return md[md.index("Reproducibility"):md.index("Threats to validity")]


def test_the_portable_promise_is_stated_only_for_portable_runs():
    table = make_table(("torch",), name="d2l-dropout")
    assert "to the bit" not in _reproducibility(table)  # default mode: no promise
    portable = dataclasses.replace(table, runs=table.runs.assign(determinism="portable"))
    text = _reproducibility(portable)
    assert ("These runs give the same weights, to the bit, on any x86-64 CPU with AVX2 and "
            "torch 2.14.1 (portable mode); python -m study verify protocols/d2l-dropout.yaml "
            "--golden checks it on this machine.") in text.replace("\\", "")
    mixed = dataclasses.replace(portable, environment={**portable.environment,
                                                       "torch_version": "2.14.1, 2.15.0"})
    assert "to the bit" not in _reproducibility(mixed)  # two torch versions: no one promise
    cuda = dataclasses.replace(portable, runs=portable.runs.assign(device="cuda"))
    assert "to the bit" not in _reproducibility(cuda)


def test_the_paper_states_the_promise_of_each_portable_protocol():
    from study.protocol import lesson
    from study.report.paper import Paper, promises
    from study.report.scorecard import Evidence

    table = make_table(("torch",), name="d2l-dropout")
    portable = dataclasses.replace(table, runs=table.runs.assign(determinism="portable"))
    results = make_results(table)
    evidence = (Evidence("d2l-dropout", "protocols/d2l-dropout.yaml", ("C1",),
                         Inputs.of(results, portable), False),
                Evidence("determinism", "protocols/determinism.yaml", ("C5",),
                         Inputs.of(results, table), False))
    paper = Paper(lesson.load("protocols/lesson.yaml"), "protocols/lesson.yaml", evidence, "x")
    md = render_markdown(promises(paper), "x").replace("\\", "")
    assert "python -m study verify protocols/d2l-dropout.yaml --golden" in md
    assert "determinism" not in md
