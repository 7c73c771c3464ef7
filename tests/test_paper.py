"""The lesson's paper: the lesson file, the scorecard, and one paper from real runs.

    .venv/bin/python -m pytest tests/test_paper.py -q

The scorecard is checked against hand-built results with planted verdicts
(tests/results_factory.py); the resume and byte-identity guarantees through the real runner,
a temporary store and tiny synthetic data.
"""

from __future__ import annotations

import functools

import dataclasses
from pathlib import Path

import pytest
import yaml

from study import cli, pipeline as paper
from study.protocol import lesson
from study.store import tracking
from study.protocol.schema import ProtocolError
from study.report.claims import CLAIMS, claim_implementations
from study.report.context import Inputs
from study.report.document import Heading, Strong, Table, para, text_of
from study.report.paper import Paper, document, write_paper
from study.report import wording
from study.report.render_markdown import render_markdown
from study.report.scorecard import Evidence, lesson_claims, rows
from study.results.diagnostics import DevicesSection
from tests.results_factory import comparison_at, make_results, make_table, with_passes
from tests.test_report import make_diagnostics

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "protocols" / "lesson.yaml"
COMMAND = "python -m study paper protocols/lesson.yaml"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "STORE_DIR", tmp_path)
    return tracking.client()


# --- the lesson file -------------------------------------------------------------------------


def test_shipped_lesson_lists_protocols_and_every_claim_is_answered_or_open() -> None:
    shipped = lesson.load(LESSON)
    parts = lesson.parts(shipped, LESSON)
    assert [p.protocol.name for p in parts] == ["d2l-dropout", "implementations", "determinism",
                                               "determinism-lenet", "variance-sources",
                                               "overfitting"]
    assert shipped.answering("C3\u2032")[0].file == "d2l-dropout.yaml"  # C3' spelt without a prime
    covered = {k for e in shipped.protocols for k in e.claims} | {o.claim for o in shipped.open}
    assert covered == set(lesson.CLAIM_KEYS)
    assert shipped.experiment == "lesson-paper"


def test_claim_keys_are_the_claims_the_report_knows() -> None:
    assert [c.key for c in lesson_claims()] == list(lesson.CLAIM_KEYS)
    assert {c.key for c in CLAIMS} == set(lesson.CLAIM_KEYS)  # every claim has a section


def _lesson_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "lesson.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


@pytest.mark.parametrize("body, fragments", [
    ({"name": "x", "protocols": [{"file": "a.yaml", "claims": ["C9"], "seconds_per_run": 1}]},
     ["protocols.0.claims", "unknown claim 'C9'", "C3\u2032"]),
    ({"name": "x", "protocols": [{"file": "a.yaml", "claim": ["C1"], "seconds_per_run": 1}]},
     ["protocols.0.claim: unknown key; did you mean 'claims'?"]),
    ({"name": "x", "protocols": [{"file": "a.yaml", "claims": ["C1"], "seconds_per_run": 0}]},
     ["protocols.0.seconds_per_run", "greater than 0", "(value: 0)"]),
    ({"name": "x", "protocols": [{"file": "a.yaml", "claims": ["C6"], "seconds_per_run": 1}],
      "open": [{"claim": "C6", "why": "w", "command": "c"}]},
     ["open: ['C6'] answered by a listed protocol too"]),
])
def test_a_bad_lesson_file_says_file_key_and_value_in_one_line_each(tmp_path, body, fragments):
    path = _lesson_file(tmp_path, body)
    with pytest.raises(ProtocolError) as err:
        lesson.load(path)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    for fragment in fragments:  # each problem on one line of its own
        assert any(fragment in line for line in lines), (fragment, lines)


def test_a_missing_protocol_file_is_named_before_anything_runs(tmp_path, capsys) -> None:
    path = _lesson_file(tmp_path, {"name": "x", "protocols": [
        {"file": "nowhere.yaml", "claims": ["C1"], "seconds_per_run": 1}]})
    assert cli.main(["paper", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: protocols.0.file: no such protocol file (value: 'nowhere.yaml'" in err


def test_dry_run_prints_the_estimate_and_runs_nothing(store, capsys, monkeypatch) -> None:
    from study.engine import backend_process

    monkeypatch.setattr(backend_process, "has_device", lambda device: device == "cpu")
    assert cli.main(["paper", str(LESSON), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("implementations      60 cells: 0 done, 60 to run \u00d7 1.6 s (recorded in the "
            "lesson file) = 1.6 min") in out
    assert "determinism          72 cells: 0 done, 36 to run, 36 skipped (no device)" in out
    assert "total: 410 runs, about 30 min of training (up to 580 runs, about 39 min, with " \
        "adaptive rounds)" in out
    # Adaptive protocols: round 0 now, and what their later rounds may add (max_runs).
    assert "adaptive: 60 to run now, up to 110 with its later rounds (max_runs) = up to " \
        "13.4 min" in out
    assert "adaptive: 60 to run now, up to 180 with its later rounds (max_runs)" in out
    assert out.count("adaptive:") == 2  # the fixed protocols have no such line
    assert [e.name for e in store.search_experiments()] == ["Default"]


# --- the scorecard, from planted verdicts ------------------------------------------------------


def _evidence(name: str, claims: tuple[str, ...], results, table,
              cuda_cells: bool = False) -> Evidence:
    return Evidence(name, f"protocols/{name}.yaml", claims, Inputs.of(results, table),
                    cuda_cells)


@pytest.fixture(scope="module")
def planted() -> tuple[Evidence, ...]:
    from study.analysis import comparisons as analysis
    from study.protocol.schema import Analysis

    table = make_table(replicate=True)
    results = make_results(table)
    diag = dataclasses.replace(results, diagnostics=make_diagnostics())
    # C7's passes, analysed as the d2l protocol's are (the factory plants none by itself).
    passes = analysis.analyze(with_passes(table), (0.2, 0.5), Analysis(bootstrap=200)).inference
    d2l = dataclasses.replace(results, inference=passes)
    determinism_table = dataclasses.replace(
        table, experiment_name="determinism",
        environment={**table.environment, "threads": "1", "git_commit": "abc1234"})
    cpu_only = dataclasses.replace(
        diag, diagnostics=dataclasses.replace(diag.diagnostics, devices=DevicesSection(
            applicable=False, reason="needs runs of the same cells on cpu and cuda; found "
            "['cpu']", records=[])))
    return (_evidence("d2l-dropout", ("C1", "C2", "C3", "C3\u2032", "C7"), d2l, table),
            _evidence("implementations", ("C4",), diag, table),
            _evidence("determinism", ("C5",), cpu_only, determinism_table, cuda_cells=True))


@pytest.fixture(scope="module")
def card(planted) -> dict:
    found = rows(lesson.load(LESSON), planted, "protocols/lesson.yaml", COMMAND)
    return {r.claim: r for r in found}


def test_the_scorecard_has_a_row_for_every_claim_in_order(card) -> None:
    assert list(card) == ["C1", "C2", "C3", "C3\u2032", "C4", "C5", "C6", "C7"]
    assert card["C1"].protocols == "d2l-dropout" and card["C4"].protocols == "implementations"
    assert card["C1"].runs == 30  # 25 first runs + 5 replicates of seed 0 in the factory's table


def test_c1_row_reads_the_primary_comparison_and_its_robustness(card) -> None:
    results = make_results(make_table(replicate=True))
    gap = comparison_at(results, (0.0, 0.0)).mean_diff
    row = card["C1"]
    assert row.verdict.startswith("(0, 0) \u2212 (0.2, 0.5) +")
    assert row.verdict.endswith("different (+)") and f"{gap * 100:.2f}" in row.verdict
    # The factory plants 2 disagreeing analyses of 6 for (0, 0).
    assert row.robust == "not robust (2 of 5 others: 2 inconclusive)"
    assert row.settle == "\u2013"


def test_an_inconclusive_claim_says_how_many_seeds_would_settle_it(card) -> None:
    row = card["C3"]  # (0.9, 0.9) is planted inconclusive with 23 seeds needed
    assert "textbook assertion fails in" in row.verdict and "inconclusive" in row.verdict
    assert row.settle == "about 23 seeds per setting"
    assert "textbook assertion fails in 5/5 runs" in card["C2"].verdict


def test_c4_row_counts_each_implementations_verdicts(card) -> None:
    row = card["C4"]
    assert row.verdict == ("scratch vs torch: equivalent in 2/3, inconclusive in 1/3 settings; "
                           "scratch-randn vs torch: different in 3/3 settings")
    assert row.settle.startswith("about ") and row.settle.endswith(" seeds per setting")


def test_c5_without_cuda_runs_says_the_gpu_half_is_not_measured_and_names_the_command(card):
    row = card["C5"]
    assert "identical in " in row.verdict and " replicates on cpu" in row.verdict
    assert row.verdict.endswith("GPU half not measured (no CUDA runs)")
    assert "needs a GPU: on a CUDA machine against this store, " + COMMAND in row.settle
    assert "protocols/determinism.yaml" in row.settle


def test_c5_with_cuda_runs_is_not_marked_unmeasured(planted) -> None:
    det = planted[2]
    table = det.inputs.table
    runs = table.runs.copy()
    runs.loc[runs.index[:3], "device"] = "cuda"
    with_gpu = dataclasses.replace(det, inputs=Inputs.of(det.inputs.results,
                                                         dataclasses.replace(table, runs=runs)))
    (row,) = [r for r in rows(lesson.load(LESSON), (with_gpu,), "l.yaml", COMMAND)
              if r.claim == "C5"]
    assert "GPU half" not in row.verdict and "needs a GPU" not in row.settle


def _without_overfitting(open_entries: tuple = ()) -> lesson.Lesson:
    """The shipped lesson as if overfitting.yaml were not listed (C6 answered by nothing)."""
    shipped = lesson.load(LESSON)
    return dataclasses.replace(
        shipped, protocols=tuple(e for e in shipped.protocols if e.file != "overfitting.yaml"),
        open=open_entries)


def test_claims_no_protocol_answers_read_not_measured_with_the_command(planted) -> None:
    entry = lesson.Open(claim="C6", why="the overfitting regime needs its own protocol",
                        command="list overfitting.yaml in protocols/lesson.yaml, then make paper")
    by_key = {r.claim: r for r in rows(_without_overfitting((entry,)), planted,
                                       "protocols/lesson.yaml", COMMAND)}
    row = by_key["C6"]
    assert row.verdict == "not measured: the overfitting regime needs its own protocol"
    assert row.runs == 0 and row.settle == entry.command


def test_c7_row_reads_the_largest_flip_rate_and_the_mc_verdicts(card, planted) -> None:
    inference = planted[0].inputs.results.inference
    top = max(inference.settings, key=lambda s: s.flip_rate.mean)
    row = card["C7"]
    assert row.protocols == "d2l-dropout"
    assert row.verdict.startswith(f"two passes disagree on up to "
                                  f"{wording.fmt_pct(top.flip_rate.mean)} of test images at (0.9, 0.9)")
    verdicts = [s.accuracy.verdict for s in inference.settings]
    for v in set(verdicts):
        assert f"{v} in {verdicts.count(v)}/{len(verdicts)}" in row.verdict


def test_a_protocol_without_runs_reads_not_measured_with_its_run_command(planted) -> None:
    empty = dataclasses.replace(planted[1], inputs=None)
    (row,) = [r for r in rows(lesson.load(LESSON), (empty,), "l.yaml", COMMAND)
              if r.claim == "C4"]
    assert row.verdict == "not measured (no finished runs)"
    assert row.settle == "python -m study run protocols/implementations.yaml"


def test_without_an_open_entry_the_row_says_to_list_a_protocol(planted) -> None:
    by_key = {r.claim: r for r in rows(_without_overfitting(), planted, "l.yaml", COMMAND)}
    assert by_key["C6"].verdict == "not measured: no protocol in l.yaml answers it"
    assert by_key["C6"].settle == "list a protocol answering C6 in l.yaml, then make paper"


def test_a_claim_with_a_builder_but_no_scorer_points_to_its_section(planted, monkeypatch):
    from study.report import scorecard

    monkeypatch.delitem(scorecard.SCORERS, "C4")
    by_key = {r.claim: r for r in rows(lesson.load(LESSON), planted, "l.yaml", COMMAND)}
    assert by_key["C4"].verdict.startswith("measured; its section gives the verdict")


# --- the paper's document -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_md(planted) -> str:
    doc = document(Paper(lesson.load(LESSON), "protocols/lesson.yaml", planted, COMMAND))
    return render_markdown(doc, "t")


def test_the_scorecard_comes_right_after_the_abstract(planted) -> None:
    doc = document(Paper(lesson.load(LESSON), "protocols/lesson.yaml", planted, COMMAND))
    assert doc[1] == Heading(1, "Claims scorecard")
    table = next(b for b in doc if isinstance(b, Table))
    assert [r[0] for r in table.rows] == list(lesson.CLAIM_KEYS)
    # C3' too: the factory plants no contrast.
    assert "C3\u2032, C6 are not measured" in text_of(doc[0])


def test_claim_sections_come_from_the_report_builders(planted, paper_md) -> None:
    impl = planted[1]
    built = claim_implementations(impl.inputs)  # the per-protocol report's C4 section
    doc = document(Paper(lesson.load(LESSON), "protocols/lesson.yaml", planted, COMMAND))
    start = doc.index(Heading(2, "C4: hand-written and nn.Dropout perform the same"))
    # The bottom line first, then the "From protocol" line, then the report's own section.
    c4 = next(c for c in CLAIMS if c.key == "C4")
    assert doc[start + 1] == para(Strong(c4.bottom_line(impl.inputs)))
    assert doc[start + 3:start + 3 + len(built)] == built
    section = paper_md[paper_md.index("C4: hand-written"):paper_md.index("C5: a fixed seed")]
    assert "From protocol `implementations` (30 runs, protocols/implementations.yaml)" in section


def test_environments_that_differ_between_protocols_are_named(planted, paper_md,
                                                              tmp_path) -> None:
    made = Paper(lesson.load(LESSON), "protocols/lesson.yaml", planted, COMMAND)
    env = write_paper(made, tmp_path).environment.read_text()
    assert "the protocols' environments differ in git_commit, threads" in env
    assert "## determinism" in env and "| threads | 1 |" in env and "| threads | 2 |" in env
    # Kept out of the PDF: its bytes must not depend on the machine.
    assert "abc1234" not in paper_md and "environment.md" in paper_md


def test_written_paper_is_byte_identical(planted, tmp_path) -> None:
    made = Paper(lesson.load(LESSON), "protocols/lesson.yaml", planted, COMMAND)
    first = write_paper(made, tmp_path / "a")
    second = write_paper(made, tmp_path / "b")
    assert first.pdf.read_bytes().startswith(b"%PDF")
    assert first.pdf.read_bytes() == second.pdf.read_bytes()
    assert first.markdown.read_text() == second.markdown.read_text()


# --- end to end: the real runner, a temporary store, tiny data ---------------------------------

TINY = {"model": {"arch": "mlp", "hidden": [16, 16]}, "training": {"epochs": 2, "batch_size": 100},
        "data": {"train_subset": 300}, "seeds": {"count": 3}, "baseline": [0.2, 0.5],
        "analysis": {"bootstrap": 200}}


@pytest.fixture
def tiny_lesson(tmp_path) -> Path:
    """Two tiny protocols: the lesson's settings (C1-C3) and replicates (C5)."""
    folder = tmp_path / "protocols"
    folder.mkdir()
    settings = {**TINY, "name": "tiny-d2l", "dropout": [[0, 0], [0.2, 0.5], [0.9, 0.9], [1, 1]]}
    repeats = {**TINY, "name": "tiny-determinism", "dropout": [[0.2, 0.5]], "replicates": 2,
               "devices": ["cpu", "cuda"], "seeds": {"count": 2}}
    for name, body in (("tiny-d2l", settings), ("tiny-determinism", repeats)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(body))
    return _lesson_file(folder, {"name": "tiny", "protocols": [
        {"file": "tiny-d2l.yaml", "claims": ["C1", "C2", "C3"], "seconds_per_run": 2},
        {"file": "tiny-determinism.yaml", "claims": ["C5"], "seconds_per_run": 3}]})


def _make_paper(path: Path, store, out: Path, loader):
    found = lesson.load(path)
    parts = lesson.parts(found, path)
    costs = paper.estimate(parts, store)
    summaries = paper.run_all(parts, load=loader, progress=False)
    return costs, summaries, paper.write(found, str(path), parts, store, out, COMMAND)


def _all_runs(store) -> list:
    return [r for e in store.search_experiments() for r in store.search_runs([e.experiment_id])]


def test_a_second_paper_runs_nothing_logs_nothing_and_writes_the_same_bytes(
        store, tiny_lesson, tiny_files, tmp_path, monkeypatch) -> None:
    from study.engine import data
    from study.engine import backend_process

    monkeypatch.setattr(backend_process, "has_device", lambda device: device == "cpu")
    folder, checksums = tiny_files
    # Workers load the data themselves, so the loader must pickle: a partial, not a lambda.
    loader = functools.partial(data.load, folder, cache=tmp_path / "cache", checksums=checksums)
    out = tmp_path / "reports" / "tiny"
    costs, ran, first = _make_paper(tiny_lesson, store, out, loader)
    assert [(c.todo, c.skipped, c.source) for c in costs] == [
        (12, 0, "recorded in the lesson file"), (4, 4, "recorded in the lesson file")]
    assert [s.ran for s in ran] == [12, 4] and first.logged
    pdf, md, n_runs = first.files.pdf.read_bytes(), first.files.markdown.read_text(), \
        len(_all_runs(store))

    costs, again, second = _make_paper(tiny_lesson, store, out, loader)
    assert [s.ran for s in again] == [0, 0] and [c.todo for c in costs] == [0, 0]
    assert costs[0].source.startswith("median wall time of 12 finished runs")
    assert not second.logged and second.run_id == first.run_id
    assert len(_all_runs(store)) == n_runs
    assert second.files.pdf.read_bytes() == pdf and second.files.markdown.read_text() == md

    # What the paper says of the real runs: every claim a row, C5 honest about the GPU.
    card = md[md.index("Claims scorecard"):md.index("The question")]
    for key in lesson.CLAIM_KEYS:
        assert f"| {key} |" in card
    # 2 seeds, each replicated once on the CPU; the cuda cells were skipped.
    assert "| identical in 2/2 replicates on cpu; GPU half not measured (no CUDA runs) |" in card
    assert "needs a GPU" in card and "C4 | the hand\\-written" not in card
    (analysis,) = store.search_runs([second.experiment_id], "tags.`study.kind` = 'analysis'")
    logged = {a.path for a in store.list_artifacts(analysis.info.run_id)}
    assert {"paper.pdf", "paper.md", "tiny-d2l", "figures"} <= logged


def test_the_adaptive_ceiling_counts_finished_runs_once() -> None:
    from study.analysis import rounds
    from study.protocol import schema

    proto = schema.load("protocols/d2l-dropout.yaml")
    assert paper.more_runs(proto, set(), 60) == 50
    # 30 of round 0 and 20 of a later round finished: 30 to run now, 110 - 80 more at most.
    later = [c.key for c in rounds.universe(proto) if c.seed >= 10][:20]
    done = {c.key for c in rounds.universe(proto) if c.seed < 5} | set(later)
    assert paper.more_runs(proto, done, 30) == 110 - 50 - 30
    assert paper.more_runs(schema.load("protocols/overfitting.yaml"), set(), 192) is None
