"""The GPU check: its protocol snapshot, its t interval (against scipy), its parts run on the CPU,
and a whole run in a process where only torch, numpy and the standard library import."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from study.engine import data, environment
from study.tools import gpu_check
from study.protocol import plan, schema as protocol
from study.analysis import stats, student_t

ROOT = Path(__file__).resolve().parents[1]
# What a lent GPU machine may lack; the check must not need any of it.
BLOCKED = ("mlflow", "pydantic", "yaml", "scipy", "pandas", "tqdm")
# torch probes some of these with importlib.util.find_spec (to skip them when tracing): a spec
# without an origin keeps that probe quiet, and importing the module still fails.
SITECUSTOMIZE = textwrap.dedent(f"""\
    import importlib.abc, importlib.machinery, sys

    class _Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {{spec.name!r}} (blocked by the test)",
                                      name=spec.name)

        def exec_module(self, module):
            raise AssertionError("unreachable")

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {set(BLOCKED)!r}:
                return importlib.machinery.ModuleSpec(name, _Refuse(), origin=None)
            return None

    sys.meta_path.insert(0, _Block())
    """)


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("block")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # No GPU either, wherever the test runs: this is the CPU-only path.
    return {**os.environ, "PYTHONPATH": f"{folder}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}


# --- the snapshot --------------------------------------------------------------------------------

def test_snapshot_equals_the_yaml_files_through_the_loader():
    written = json.loads(gpu_check.SNAPSHOT.read_text())
    assert written == gpu_check.snapshot(), \
        "protocols/gpu-check.json is stale: run python -m study.tools.gpu_check --write-snapshot"


@pytest.mark.parametrize("name", sorted(gpu_check.SOURCES))
def test_snapshot_cells_are_the_plans_cells(name):
    source, overrides = gpu_check.SOURCES[name]
    expected = plan.expand(protocol.load(ROOT / source, list(overrides)))
    cells = gpu_check.load_snapshot()[name].cells()
    assert [c.key for c in cells] == [c.key for c in expected]
    assert [c.name for c in cells] == [c.name for c in expected]


def test_scaled_cells_are_the_plans_cells_with_the_same_overrides():
    entry = gpu_check.load_snapshot()["determinism"].scaled(epochs=1, train_subset=300, seeds=2)
    expected = plan.expand(protocol.load(ROOT / "protocols/determinism.yaml", [
        "training.epochs=1", "data.train_subset=300", "seeds.count=2"]))
    assert [c.key for c in entry.cells()] == [c.key for c in expected]
    assert entry.train_images == 300
    assert entry.differs_from(gpu_check.load_snapshot()["determinism"]) == [
        "epochs 1 (protocol: 10)", "images 300 (protocol: 10,000)", "seeds 2 (protocol: 3)"]


def test_a_schema_change_is_a_one_line_error_naming_file_and_key(tmp_path):
    raw = json.loads(gpu_check.SNAPSHOT.read_text())
    raw["entries"]["determinism"]["protocol"]["model"]["depth"] = 3
    path = tmp_path / "gpu-check.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(gpu_check.CheckError) as err:
        gpu_check.load_snapshot(path)["determinism"].config()
    assert "entries.determinism.protocol.model" in str(err.value) and "depth" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(gpu_check.CheckError, match="missing; write it with"):
        gpu_check.load_snapshot(tmp_path / "absent.json")


# --- the t interval without scipy ----------------------------------------------------------------

@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 10, 29, 30, 99, 100, 1001])
def test_t_quantile_and_p_match_scipy(df):
    for level in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert student_t.quantile(level, df) == pytest.approx(sps.t.ppf(0.5 + level / 2, df),
                                                              rel=1e-10)
    for t in (0.0, 0.3, 1.0, 2.2, 5.0, 40.0):
        assert student_t.two_sided_p(t, df) == pytest.approx(2 * sps.t.sf(t, df), abs=1e-12)
        assert student_t.two_sided_p(-t, df) == student_t.two_sided_p(t, df)


def test_paired_t_matches_scipy_and_the_study_statistics():
    rng = np.random.default_rng(7)
    for n in (2, 3, 6, 20):
        x = 0.85 + 0.01 * rng.standard_normal(n)
        y = x + 0.002 + 0.004 * rng.standard_normal(n)
        ours = student_t.paired(list(x), list(y))
        ref = sps.ttest_rel(x, y)
        ci = ref.confidence_interval(0.95)
        assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
        assert ours.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert ours.ci == pytest.approx((ci.low, ci.high), rel=1e-10)
        assert ours.ci == pytest.approx(stats.paired_t(x, y).ci95, rel=1e-10)
        assert ours.mean_diff == pytest.approx(float(np.mean(x - y)), rel=1e-12)


def test_paired_t_by_hand_and_degenerate_cases():
    # d = (1, 2, 3): mean 2, sd 1, se 1/sqrt(3); t(2) 0.975 quantile 4.302652729749464.
    r = student_t.paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert r.ci == pytest.approx((2 - half, 2 + half), rel=1e-12)
    assert r.t == pytest.approx(2 * math.sqrt(3))
    # Every pair differs by the same amount: no spread, t undefined, the point interval.
    same = student_t.paired([1.5, 2.5], [1.0, 2.0])
    assert (same.t, same.p, same.ci) == (None, None, (0.5, 0.5))
    with pytest.raises(ValueError, match="n >= 2"):
        student_t.paired([1.0], [1.0])
    with pytest.raises(ValueError, match="positive integer"):
        student_t.quantile(0.95, 0)
    with pytest.raises(ValueError, match="level"):
        student_t.quantile(1.0, 3)


def test_an_absent_package_is_recorded_not_fatal():
    # A lent GPU machine has no MLflow: a worker there still describes its environment.
    assert environment.package_version("no-such-package-for-the-study") == "not installed"


# --- the parts on the CPU ------------------------------------------------------------------------

def _context(tiny_files, cache: Path, deadline: float = math.inf) -> gpu_check.Context:
    folder, checksums = tiny_files
    load = functools.partial(data.load, folder, cache=cache, checksums=checksums)
    return gpu_check.Context(gpu_check.load_snapshot(), {"epochs": 1, "train_subset": 300,
                                                          "seeds": 2},
                             load, ("cpu",), deadline, 60.0, gpu_check.speeds(1, 1, 2, 60))


def test_determinism_and_pairing_parts_on_the_cpu(tiny_files, tmp_path):
    """The cuda parts' own code with the CPU in cuda's place: replicates and the two devices'
    twins are trained in fresh workers at the same thread count, so every hash must agree."""
    ctx = _context(tiny_files, tmp_path / "cache")
    modes = [("determinism", "default"), ("determinism-portable", "portable"),
             ("determinism-lenet", "strict")]
    rows, first = gpu_check.determinism_rows(ctx, "cpu", modes)
    assert [r.status for r in rows] == ["ran"] * 3, [r.reason for r in rows]
    assert [r.name for r in rows] == ["default", "portable", "lenet strict"]
    # MLP: 2 settings x 2 seeds; LeNet: 1 setting x 2 seeds, each with 2 replicates.
    assert [r.values["pairs"] for r in rows] == [4, 4, 2]
    for row in rows:
        assert row.values["identical"] == row.values["pairs"]
        assert row.values["max_abs_test_acc_diff"] == 0.0
        assert row.values["environment"]["threads.intra_op"] != "absent"
    assert rows[1].values["flags"]["deterministic_algorithms"] is True
    assert len(first) == 4 and {r.cell.replicate for r in first} == {0}
    paired = gpu_check.paired_rows(ctx, first, "cpu")
    assert [r.name for r in paired] == ["cpu runs", "(0, 0)", "(0.2, 0.5)", "all settings"]
    assert all(r.status == "ran" for r in paired), [r.reason for r in paired]
    pooled = paired[-1].values
    assert (pooled["n"], pooled["identical"], pooled["mean_diff"]) == (4, 4, 0.0)
    assert (pooled["t"], tuple(pooled["ci"])) == (None, (0.0, 0.0))
    # A diverged run (no finite test accuracy) drops its pair, and the row says so.
    last = first[0].epochs[-1]
    diverged = replace(first[0], epochs=(*first[0].epochs[:-1], replace(last, test_acc=math.nan)))
    row = gpu_check._paired_row(ctx, "all settings", None, first, [diverged, *first[1:]],
                                paired[0], "cpu")
    assert (row.values["n"], row.values["dropped"]) == (3, 1)
    assert "1 pair(s) without a finite accuracy dropped" in row.result


def test_a_part_after_the_budget_is_skipped_and_says_so(tiny_files, tmp_path):
    ctx = _context(tiny_files, tmp_path / "cache", deadline=0.0)
    (row,) = [r for r in gpu_check.throughput_rows(ctx) if r.device == "cpu"][:1]
    assert row.status == "skipped" and "time budget of 60 s" in row.reason


def test_blocked_modules_cannot_be_imported(blocked_env):
    """The run below proves something only if the block holds."""
    probe = "; ".join(f"exec('try:\\n import {m}\\n print(\"{m} imported\")\\nexcept "
                      f"ImportError: pass')" for m in BLOCKED)
    done = subprocess.run([sys.executable, "-c", probe], env=blocked_env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "imported" not in done.stdout, done.stdout + done.stderr


def test_cpu_only_run_with_only_torch_numpy_and_the_standard_library(blocked_env, tiny_files,
                                                                      tmp_path):
    folder, checksums = tiny_files
    sums = tmp_path / "sums.json"
    sums.write_text(json.dumps(checksums))
    out = tmp_path / "out"
    argv = ["--out", out, "--data", folder, "--checksums", sums, "--data-cache", tmp_path / "c",
            "--epochs", "1", "--train-subset", "300", "--seeds", "2", "--members", "2",
            "--cpu-epochs", "1"]
    done = subprocess.run([sys.executable, "-m", "study.tools.gpu_check", *map(str, argv)], cwd=ROOT,
                          env=blocked_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    rows = report["rows"]
    assert report["about"]["cuda"] is False
    cuda = [r for r in rows if "cuda" in r["device"]]
    assert {r["part"] for r in cuda} == {"determinism", "cpu-gpu", "throughput"}
    assert {r["name"] for r in cuda if r["part"] == "determinism"} == {
        "default", "benchmark", "strict", "portable", "lenet default", "lenet benchmark",
        "lenet strict"}
    assert all(r["status"] == "skipped" and r["reason"] == "no CUDA device" for r in cuda)
    (cpu_runs,) = [r for r in rows if r["name"] == "cpu runs"]
    assert cpu_runs["status"] == "ran", cpu_runs["reason"]
    accs = cpu_runs["values"]["test_acc"]
    assert len(accs) == 4 and all(0.0 <= a <= 1.0 for a in accs.values())
    assert sum(cpu_runs["values"]["statuses"].values()) == 4
    speed = [r for r in rows if r["part"] == "throughput" and r["device"] == "cpu"]
    assert [r["name"] for r in speed] == ["side by side", "lockstep"]
    for r in speed:
        v = r["values"]
        assert r["status"] == "ran", r["reason"]
        assert (v["members"], v["train_images"], v["member_epochs"]) == (2, 600, 2)
        assert math.isfinite(v["runs_per_minute"]) and v["runs_per_minute"] > 0
        assert "rough" in v["basis"]  # 600 of 60,000 images: said to be a rough scaling
    text = (out / "gpu-check.md").read_text()
    assert "determinism on cuda: no CUDA device" in text and "| throughput | side by side |" in text
    assert text in done.stdout
