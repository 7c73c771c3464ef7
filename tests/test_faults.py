"""Faults against real parts: `python -m study run` driver processes, SQLite, and a
PostgreSQL-backed MLflow server. Each ends with every cell FINISHED exactly once (0 duplicates)
and every run that had finished before the fault still FINISHED (0 lost)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CELLS = 12
TTL = "20"  # a killed driver's lease blocks the rerun this long; a silent holder stops at TTL/4

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("real_data")]


DEFAULT_MODE = "determinism: [default]\nimplementations: [torch]"


def small_protocol(tmp_path: Path, name: str, mode: str = DEFAULT_MODE) -> Path:
    """12 sequential cells on 1,000 images x 2 epochs; `mode`: the protocol's arithmetic lines."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
model: {{arch: mlp, hidden: [64, 64], init_std: 0.01}}
training: {{epochs: 2, batch_size: 128, lr: 0.5}}
data: {{dataset: fashion-mnist, train_subset: 1000}}
dropout: [[0.0, 0.0], [0.2, 0.5], [0.5, 0.5], [0.8, 0.8]]
seeds: {{count: 3, start: 0}}
devices: [cpu]
{mode}
baseline: [0.2, 0.5]
execution: sequential
""")
    return path


@pytest.fixture(params=["sqlite", "server"])
def uri(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}"
    return request.getfixturevalue("tracking_server").url


class Driver:
    """One `python -m study run` process (extra arguments after the protocol); stopped by the
    test if it is still alive."""

    def __init__(self, protocol: Path, uri: str, *args: str, env: dict | None = None) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "STUDY_LEASE_TTL": TTL,
               "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "study", "run", str(protocol), *args], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out + err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.communicate()


@pytest.fixture
def drivers():
    started: list[Driver] = []

    def start(protocol: Path, uri: str, *args: str, env: dict | None = None) -> Driver:
        started.append(Driver(protocol, uri, *args, env=env))
        return started[-1]

    yield start
    for driver in started:
        driver.kill()


def _finished(uri: str, name: str) -> dict[str, str]:
    """FINISHED run id -> cell key."""
    mlflow = MlflowClient(tracking_uri=uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return {}
    runs = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                              max_results=1000)
    return {r.info.run_id: r.data.tags["study.cell"] for r in runs}


def _wait_for(uri: str, name: str, n: int, driver: Driver, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _finished(uri, name)
        if len(done) >= n:
            return done
        assert driver.process.poll() is None, driver.finish()[1][-2000:]
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} runs finished in {timeout} s")


def _complete_and_unique(uri: str, name: str, before: dict[str, str]) -> None:
    after = _finished(uri, name)
    per_cell = Counter(after.values())
    assert len(per_cell) == CELLS, f"{len(per_cell)} of {CELLS} cells finished"
    assert max(per_cell.values()) == 1, f"duplicates: {per_cell.most_common(3)}"
    assert set(before) <= set(after), "a run that had finished is no longer FINISHED"


def test_driver_killed_mid_study_then_rerun(uri, tmp_path, drivers):
    name = f"kill-{time.monotonic_ns()}"
    proto = small_protocol(tmp_path, name)
    first = drivers(proto, uri)
    before = _wait_for(uri, name, 3, first)
    first.kill()
    before = _finished(uri, name)
    assert len(before) < CELLS
    began = time.monotonic()
    code, out = drivers(proto, uri).finish()
    assert code == 0, out[-2000:]
    # The rerun waited out the killed driver's lease (TTL), no longer.
    assert time.monotonic() - began >= float(TTL) * 0.9
    assert f"{len(before)} already done" in out
    _complete_and_unique(uri, name, before)


def test_two_drivers_at_once_one_refuses(uri, tmp_path, drivers):
    name = f"two-{time.monotonic_ns()}"
    proto = small_protocol(tmp_path, name)
    a, b = drivers(proto, uri), drivers(proto, uri)
    (code_a, out_a), (code_b, out_b) = a.finish(), b.finish()
    assert sorted([code_a, code_b]) == [0, 2], out_a[-2000:] + out_b[-2000:]
    refused = out_a if code_a == 2 else out_b
    error = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "is being run by" in error[0], refused[-2000:]
    _complete_and_unique(uri, name, {})


def test_tracking_server_restarted_mid_study(tracking_server, tmp_path, drivers):
    uri = tracking_server.url
    name = f"restart-{time.monotonic_ns()}"
    proto = small_protocol(tmp_path, name)
    driver = drivers(proto, uri)
    _wait_for(uri, name, 3, driver)
    tracking_server.mlflow.stop()
    time.sleep(2)
    tracking_server.mlflow.start()
    before = _finished(uri, name)
    code, out = driver.finish()
    if code != 0:
        # Stopped rather than retried: one clear line, and a rerun completes the study.
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, out[-3000:]
        print(f"driver stopped: {errors[0]}")
        code, out = drivers(proto, uri).finish()
        assert code == 0, out[-2000:]
    else:
        print("driver retried through the restart")
    _complete_and_unique(uri, name, before)
