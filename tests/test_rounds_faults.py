"""An adaptive study against real parts (issue 19's "done when"): driver processes on a SQLite
store and tiny generated data through the real loader, killed with SIGKILL (the driver's whole
process group) at a random moment and rerun, and run under `--backend local` and under a real
local Ray cluster. Each must give the rounds, the cells and, in `portable` mode, the weights of
one uninterrupted local run.

    .venv/bin/python -m pytest tests/test_rounds_faults.py -q
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from study.analysis import rounds
from study.store import tracking
from study.tools import chaos
from tests.test_rounds_runner import PROTO

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# PROTO's adaptive study (3 settings, 3 seeds, rounds of 2 up to 7 seeds) in portable mode, so
# its bits do not depend on where a cell trains; one thread, so a Ray task's CPU is enough.
PORTABLE = {**PROTO, "name": "adaptive-faults", "determinism": ["portable"], "threads": 1,
            "randomness": "portable", "execution": "sequential"}
TTL = "20"  # a killed driver's lease blocks the rerun this long (shorter: a loaded machine misses heartbeats)

# `python -m study run` with the tiny data's loader: argv protocol, data folder, cache,
# checksums (JSON), backend[, Ray address].
_DRIVER = """
import functools, json, sys
from pathlib import Path
from study import runner
from study.engine import data
from study.protocol import schema
path, folder, cache, checksums, backend = sys.argv[1:6]
if backend == "ray":
    from study.engine import backend_ray
    backend_ray.connect(sys.argv[6])
load = functools.partial(data.load, Path(folder), cache=Path(cache), checksums=json.loads(checksums))
summary = runner.run(schema.load(path), load=load, progress=False, where=backend)
print(f"{summary.ran} runs logged, {summary.already_done} already done")
"""


@dataclass(frozen=True)
class Logged:
    """What a store holds of the study: FINISHED runs per cell key, each cell's round tag and
    weights hash (of its first FINISHED run)."""

    finished: dict[str, str]  # run id -> cell key
    round_of: dict[str, str]
    sha: dict[str, str]

    @property
    def duplicated(self) -> list[tuple[str, int]]:
        return [(k, n) for k, n in Counter(self.finished.values()).items() if n > 1]

    def per_round(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for key, r in self.round_of.items():
            out.setdefault(r, set()).add(key)
        return out


def logged(uri: str) -> Logged:
    mlflow = tracking.client(uri)
    exp = mlflow.get_experiment_by_name(PORTABLE["name"])
    runs = [] if exp is None else mlflow.search_runs(
        [exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    runs = [r for r in runs if "study.cell" in r.data.tags]
    return Logged({r.info.run_id: r.data.tags["study.cell"] for r in runs},
                  {r.data.tags["study.cell"]: r.data.tags[rounds.ROUND_TAG] for r in runs},
                  {r.data.tags["study.cell"]: r.data.tags["study.weights_sha256"] for r in runs})


class Drivers:
    """Driver processes of the study, each in its own session (process group), with a marker
    in its environment (`chaos.marked` finds its workers); every one left is killed at the end."""

    def __init__(self, protocol: Path, tiny_files, cache: Path) -> None:
        folder, checksums = tiny_files
        self.args = [str(protocol), str(folder), str(cache), json.dumps(checksums)]
        self.started: list[subprocess.Popen] = []

    def start(self, uri: str, marker: str, *backend: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """backend: ("local",) by default, or ("ray", ADDRESS) with the cluster's `env`."""
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "STUDY_LEASE_TTL": TTL,
               "PYTHONPATH": str(ROOT), chaos.MARKER: marker, **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, *self.args, *(backend or ("local",))], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.started.append(process)
        return process

    def finish(self, uri: str, marker: str, *backend: str,
               env: dict[str, str] | None = None) -> str:
        process = self.start(uri, marker, *backend, env=env)
        out, _ = process.communicate(timeout=900)
        assert process.returncode == 0, out[-3000:]
        return out

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:  # left by a failed assertion: its output was not read
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()


@pytest.fixture(scope="module")
def study_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adaptive") / "adaptive.yaml"
    path.write_text(yaml.safe_dump(PORTABLE))
    return path


@pytest.fixture(scope="module")
def drivers(study_file, tiny_files, tmp_path_factory):
    started = Drivers(study_file, tiny_files, tmp_path_factory.mktemp("cache"))
    yield started
    started.stop_all()


@pytest.fixture(scope="module")
def reference(drivers, tmp_path_factory) -> Logged:
    """One uninterrupted local run: the rounds, cells and weights every other run must give."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'mlflow.db'}"
    drivers.finish(uri, f"reference-{os.getpid()}")
    done = logged(uri)
    assert not done.duplicated
    assert len(done.per_round()) >= 2, done.per_round()  # the study needs later rounds
    return done


def _kill_group_at(process: subprocess.Popen, uri: str, after_runs: int, delay: float,
                   marker: str) -> dict[str, str]:
    """SIGKILL the driver's process group once `after_runs` runs are FINISHED and `delay` s more;
    the runs FINISHED at that moment. Fails if the study ended first (the kill tested nothing)
    or if a process of the group outlives it."""
    while len(tracking.runs_in(tracking.client(uri), PORTABLE["name"], "FINISHED")) < after_runs:
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.1)
    time.sleep(delay)
    assert process.poll() is None, f"the study ended before the kill: {process.communicate()[0]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    before = tracking.runs_in(tracking.client(uri), PORTABLE["name"], "FINISHED")
    deadline = time.monotonic() + chaos.GRACE
    while (left := chaos.marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{[chaos.program(p) for p in left]} outlived the killed driver"
    return before


@pytest.mark.usefixtures("tiny_files")
def test_killed_at_random_moments_it_resumes_the_same_rounds_without_duplicates(
        drivers, reference, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    first_round = len(reference.per_round()["0"])
    total = len(reference.finished)
    # One kill inside round 0 and one inside a later round, each at a drawn number of finished
    # runs and 0-0.5 s after (at least 3 runs still to go: a cell takes a fraction of a second
    # here): the reruns must replay the rounds from the store alone.
    moments = [(rng.randrange(first_round), rng.uniform(0, 0.5)),
               (rng.randrange(first_round, total - 2), rng.uniform(0, 0.5))]
    said = f"seed {seed}, moments {moments}"
    kept: dict[str, str] = {}
    for i, (after_runs, delay) in enumerate(moments):
        marker = f"killed-{i}-{os.getpid()}"
        before = _kill_group_at(drivers.start(uri, marker), uri, max(after_runs, len(kept)),
                                delay, marker)
        assert set(kept) <= set(before), f"{said}: a run FINISHED before kill {i} is lost"
        kept = before
    out = drivers.finish(uri, f"rerun-{os.getpid()}")
    done = logged(uri)
    assert set(kept) <= set(done.finished), f"{said}: a run FINISHED before the last kill is lost"
    assert not done.duplicated, f"{said}: {done.duplicated}"
    assert done.round_of == reference.round_of, said  # the same cells, each in the same round
    assert done.sha == reference.sha, said
    assert f"{len(kept)} already done" in out, out[-2000:]


@pytest.mark.usefixtures("tiny_files")
def test_local_and_ray_give_the_same_cells_per_round_and_the_same_weights(
        drivers, reference, ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    drivers.finish(uri, f"ray-{os.getpid()}", "ray", ray_cluster.address, env=ray_cluster.env)
    on_ray = logged(uri)
    assert not on_ray.duplicated
    assert on_ray.per_round() == reference.per_round()
    assert on_ray.sha == reference.sha
