"""The Ray backend against a real local Ray cluster (`ray start --head` on loopback, see the
`ray_cluster` fixture), through `python -m study run --backend ray` driver processes: the same
bits as the local backend, the smoke protocol into the PostgreSQL-backed server with each
mode's environment in the workers, and a worker killed mid-task."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.test_faults import CELLS, _complete_and_unique, _protocol, drivers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("real_data")]


def _runs(uri: str, name: str, status: str | None = None) -> list:
    mlflow = MlflowClient(tracking_uri=uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return []
    query = f"attributes.status = '{status}'" if status else ""
    return mlflow.search_runs([exp.experiment_id], query, max_results=1000)


def test_portable_hashes_are_the_same_under_local_and_ray(ray_cluster, tmp_path, drivers):
    name = f"portable-{time.monotonic_ns()}"
    proto = tmp_path / "portable.yaml"
    proto.write_text(f"""name: {name}
model: {{arch: mlp, hidden: [64, 64], init_std: 0.01}}
training: {{epochs: 1, batch_size: 128, lr: 0.5}}
data: {{dataset: fashion-mnist, train_subset: 1000}}
dropout: [[0.0, 0.0], [0.2, 0.5]]
seeds: {{count: 2, start: 0}}
devices: [cpu]
determinism: [portable]
threads: 2
randomness: portable
baseline: [0.2, 0.5]
""")
    stores = {where: f"sqlite:///{tmp_path / where}.db" for where in ("local", "ray")}
    for where, uri in stores.items():
        args = ray_cluster.args if where == "ray" else ("--backend", "local")
        code, out = drivers(proto, uri, *args, env=ray_cluster.env).finish()
        assert code == 0, out[-3000:]
    tags = {where: {r.data.tags["study.cell"]: r.data.tags for r in _runs(uri, name, "FINISHED")}
            for where, uri in stores.items()}
    assert len(tags["local"]) == 4 and tags["local"].keys() == tags["ray"].keys()
    for cell, local in tags["local"].items():
        on_ray = tags["ray"][cell]
        assert on_ray["study.weights_sha256"] == local["study.weights_sha256"], cell
        # The mode's own arithmetic, not the cluster's stray MKL_CBWR=AVX2.
        assert on_ray["study.env.mkl_cbwr"] == local["study.env.mkl_cbwr"] != "AVX2"
        assert on_ray["study.env.threads.intra_op"] == local["study.env.threads.intra_op"] == "2"


def test_smoke_protocol_through_ray_into_the_tracking_server(ray_cluster, tracking_server,
                                                             drivers):
    name = f"smoke-ray-{time.monotonic_ns()}"
    driver = drivers(ROOT / "protocols/smoke.yaml", tracking_server.url, *ray_cluster.args,
                     "--set", f"name={name}", "--set", "data.train_subset=1000",
                     "--set", "training.epochs=1", env=ray_cluster.env)
    code, out = driver.finish()
    assert code == 0, out[-3000:]
    assert "9 runs logged" in out
    runs = _runs(tracking_server.url, name)
    assert Counter(r.info.status for r in runs) == {"FINISHED": 9}
    assert len({r.data.tags["study.cell"] for r in runs}) == 9
    for run in runs:
        # Read where it trained: the default mode unset the cluster's stray MKL_CBWR, and a
        # one-CPU Ray task runs one OpenMP thread where the protocol leaves threads open.
        assert run.data.tags["study.env.mkl_cbwr"] == "unset"
        assert run.data.tags["study.env.threads.omp_num_threads"] == "1"


def test_a_ray_worker_killed_mid_task_is_retried_without_duplicates(ray_cluster, tmp_path,
                                                                    drivers):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"raykill-{time.monotonic_ns()}"
    driver = drivers(_protocol(tmp_path, name), uri, *ray_cluster.args, env=ray_cluster.env)
    killed = _kill_a_training_worker(uri, name, ray_cluster.marker, driver)
    code, out = driver.finish()
    assert code == 0, out[-3000:]
    _complete_and_unique(uri, name, {})
    failed = _runs(uri, name, "FAILED")
    assert failed, f"killed {killed} while a run was RUNNING, yet no run was lost"
    for run in failed:
        assert "died (WorkerCrashedError) on attempt 1 of 3; retried" in run.data.tags[
            "study.error"]
    assert f"{CELLS} runs logged" in out


def _kill_a_training_worker(uri: str, name: str, marker: str, driver,
                            timeout: float = 300) -> list[int]:
    """SIGKILL the cluster's workers running a task while a run of `name` is RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.process.poll() is None, driver.finish()[1][-3000:]
        if _runs(uri, name, "RUNNING") and (pids := _serving(marker)):
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return pids
        time.sleep(0.2)
    raise AssertionError(f"no run of {name} was RUNNING in a Ray task within {timeout} s")


def _serving(marker: str) -> list[int]:
    """Ray workers of this cluster now executing a `_serve` task (Ray names the process so)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except (OSError, ValueError):
            continue
        if title.startswith(b"ray::_serve") and f"STUDY_TEST_CLUSTER={marker}".encode() in environ:
            pids.append(int(proc.name))
    return pids
