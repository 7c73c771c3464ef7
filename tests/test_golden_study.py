"""Golden hashes of the whole study (tests/golden/NAME.json for protocols/NAME.yaml):

- every portable cell of protocols/lesson.yaml has its hash, and each file rebuilds its cells;
- a sample of them re-trains to the same bits on the real Fashion-MNIST (slow; skipped, saying
  why, outside the portable promise);
- the check (`python -m study.tools.golden`) runs where MLflow, pandas, scipy, pydantic and YAML
  cannot be imported, and its lines and exit status say which cells differ and which keys.

    python -m pytest -q tests/test_golden_study.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from study.engine import data
from study.protocol import lesson, plan, schema as protocol
from study.tools import golden
from tests.conftest import real_data_present
from tests.test_gpu_check import SITECUSTOMIZE

ROOT = Path(__file__).resolve().parents[1]
LESSON = ROOT / "protocols" / "lesson.yaml"
# Cells re-trained per golden file on every `make test`, drawn with SAMPLE_SEED: the d2l cells
# cost about 8 s each (10 epochs on 60k images, 25 MC passes), overfitting's about 4 s.
SAMPLE, SAMPLE_SEED = 2, 0


def lesson_parts() -> list[lesson.Part]:
    return lesson.parts(lesson.load(LESSON), LESSON)


def golden_parts() -> list[lesson.Part]:
    return [p for p in lesson_parts() if golden.portable_cells(plan.expand(p.protocol))]


def recorded_parts() -> list[lesson.Part]:
    """The lesson's portable protocols whose golden file is recorded."""
    return [p for p in golden_parts() if golden.golden_file(p.path).exists()]


@pytest.mark.parametrize("part", recorded_parts(), ids=lambda p: p.path.stem)
def test_a_golden_file_holds_every_portable_cell_of_its_protocol(part):
    recorded = golden.read(golden.golden_file(part.path))  # also rebuilds each cell's key
    want = {c.key: c.name for c in golden.portable_cells(plan.expand(part.protocol))}
    got = {g.cell.key: g.cell.name for g in recorded.cells}
    assert got == want, f"{recorded.path.name} is not the portable cells of {part.path.name}"
    assert recorded.data_md5 == data.FASHION_MNIST_MD5
    assert all(len(g.weights_sha256) == 64 for g in recorded.cells)


def test_the_main_study_has_its_golden_file():
    assert "d2l-dropout" in {p.path.stem for p in recorded_parts()}


def test_every_portable_protocol_of_the_lesson_has_a_golden_file():
    assert [p.path.stem for p in recorded_parts()] == [p.path.stem for p in golden_parts()]
    assert {p.path.stem for p in golden_parts()} >= {"d2l-dropout", "overfitting"}


def test_a_lesson_file_names_the_golden_files_of_its_portable_protocols():
    found = golden.targets(LESSON)
    assert found.files == [golden.golden_file(p.path) for p in recorded_parts()]
    assert found.files + found.unrecorded == [golden.golden_file(p.path) for p in golden_parts()]
    assert golden.targets(ROOT / "protocols/d2l-dropout.yaml").files == [
        golden.GOLDEN_DIR / "d2l-dropout.json"]


def test_a_protocol_without_portable_cells_has_no_golden_file():
    with pytest.raises(golden.GoldenError, match="determinism.json"):
        golden.targets(ROOT / "protocols/determinism.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("stem", [p.path.stem for p in recorded_parts()])
def test_a_sample_of_the_study_reproduces_its_golden_hashes(stem):
    recorded = golden.read(golden.GOLDEN_DIR / f"{stem}.json")
    if why := golden.outside_promise(recorded.environment):
        pytest.skip(why)
    if not real_data_present():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but Fashion-MNIST is missing (make data installs it)")
        pytest.skip("the golden cells train on the real Fashion-MNIST")
    outcome = golden.check(recorded, SAMPLE, SAMPLE_SEED)
    assert len(outcome.checks) == SAMPLE
    assert all(c.identical for c in outcome.checks), "\n".join(outcome.lines())


# --- the check on a bare machine, on the tiny generated data --------------------------------------

@pytest.fixture(scope="module")
def tiny_golden(trained_protocol, golden_protocol, tiny_files, tmp_path_factory) -> Path:
    """A golden file of conftest's small portable protocol, from its cells trained here."""
    _, checksums = tiny_files
    cells = golden.portable_cells(plan.expand(protocol.parse(golden_protocol)))
    trained = trained_protocol(golden_protocol)
    doc = golden.document(cells, {r.cell.key: r.weights_sha256 for r in trained.results},
                          golden.recorded_env(trained.environment, cells[0].kernels), checksums,
                          "tiny.yaml", "the test's training")
    path = tmp_path_factory.mktemp("golden") / "tiny.json"
    path.write_text(json.dumps(doc))
    return path


def altered(source: Path, name: str, change) -> Path:
    doc = json.loads(source.read_text())
    change(doc)
    path = source.with_name(name)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("block")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}


def first_hash_changed(doc: dict) -> None:
    first = next(iter(doc["cells"].values()))
    first["weights_sha256"] = "0" * 64


def test_the_check_runs_without_mlflow_and_names_what_differs(tiny_golden, tiny_files,
                                                              blocked_env):
    if why := golden.outside_promise(json.loads(tiny_golden.read_text())["environment"]):
        pytest.skip(why)
    folder, _ = tiny_files
    wrong_hash = altered(tiny_golden, "wrong-hash.json", first_hash_changed)
    other_cpu = altered(tiny_golden, "other-cpu.json", lambda d: (
        first_hash_changed(d), d["environment"].update(cpu_model="Intel Xeon (family 6)")))
    done = subprocess.run(
        [sys.executable, "-m", "study.tools.golden", str(tiny_golden), str(wrong_hash),
         str(other_cpu), "--data", str(folder)],
        env=blocked_env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    n = len(json.loads(tiny_golden.read_text())["cells"])
    assert f"tiny.json: {n} of {n} cells identical" in done.stdout
    assert sum("DIFFERS, promised by portable" in line for line in lines) == 2
    assert any("no recorded key differs" in line for line in lines)
    assert any("cpu_model: Intel Xeon (family 6) -> " in line for line in lines)
    assert f"wrong-hash.json: {n - 1} of {n} cells identical" in done.stdout


def test_a_differing_key_outside_the_cpu_is_reported_not_failed(tiny_golden, tiny_files):
    recorded = golden.read(altered(tiny_golden, "other-blas.json", lambda d: (
        first_hash_changed(d), d["environment"].update(blas="BLAS=open"))))
    if why := golden.outside_promise(recorded.environment):
        pytest.skip(why)
    outcome = golden.check(recorded, source=tiny_files[0])
    (differs,) = [c for c in outcome.checks if not c.identical]
    assert outcome.ok and not differs.broken
    assert "differs, outside the recorded conditions" in differs.line()
    assert "blas: BLAS=open -> BLAS=" in differs.line()


def test_another_torch_is_not_checked(tiny_golden, capsys):
    from study import cli

    path = altered(tiny_golden, "other-torch.json",
                   lambda d: d["environment"].update(torch_version="1.0.0"))
    assert cli.main(["verify", str(path), "--golden"]) == 0
    assert "other-torch.json: not checked: portable promises the same torch; golden hashes " \
           "are of torch 1.0.0" in capsys.readouterr().out


def test_another_torch_is_trained_with_outside_promise_and_never_fails(tiny_golden, tiny_files,
                                                                       capsys):
    """--outside-promise: the lines of another environment, as evidence; a mismatch there is
    explained by the torch key, so it is reported, not failed."""
    path = altered(tiny_golden, "other-torch-anyway.json", lambda d: (
        first_hash_changed(d), d["environment"].update(torch_version="1.0.0")))
    assert golden.main([str(path), "--outside-promise", "--data", str(tiny_files[0])]) == 0
    out = capsys.readouterr().out
    assert "other-torch-anyway.json: outside the promise (portable promises the same torch" in out
    assert "differs, outside the recorded conditions" in out and "torch_version: 1.0.0 -> " in out
    n = len(json.loads(path.read_text())["cells"])
    assert f"other-torch-anyway.json: {n - 1} of {n} cells identical" in out


def test_a_stale_golden_file_is_an_error(tiny_golden, capsys):
    def moved(doc: dict) -> None:
        doc["configs"][0]["training"]["lr"] = 0.25
    assert golden.check_all([altered(tiny_golden, "stale.json", moved)]) == 2
    assert "the cell definition changed since it was recorded" in capsys.readouterr().err


def test_a_sample_of_no_cells_is_an_error(tiny_golden, capsys):
    assert golden.check_all([tiny_golden], n=0) == 2
    assert "error: --sample: at least 1 cell per golden file (value: 0)" in capsys.readouterr().err
