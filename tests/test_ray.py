"""The Ray backend: how a group becomes task options and retries (no cluster), then against a
real local Ray cluster (`ray start --head` on loopback, see the `ray_cluster` fixture) through
`python -m study run --backend ray` driver processes: the same bits as the local backend, the
smoke protocol into the PostgreSQL-backed server with each mode's environment in the workers,
and a worker killed mid-task."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study.protocol import plan, schema as protocol
from study.engine import workers
from tests import worker_hooks
from tests.conftest import free_port
from tests.test_faults import CELLS, _complete_and_unique, drivers, small_protocol  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def worker_ray():
    if os.environ.get("CI") == "true":
        from study.engine import backend_ray as worker_ray  # CI installs Ray: its absence is a failure there
        return worker_ray
    return pytest.importorskip("study.engine.backend_ray", reason="no Ray here")


def _group(mode: str, threads: int | None, device: str = "cpu") -> workers.Group:
    proto = protocol.parse({"name": "opts", "dropout": [[0.0, 0.0], [0.5, 0.5]],
                            "seeds": {"count": 2}, "baseline": [0.5, 0.5], "devices": [device],
                            "determinism": [mode], "threads": threads})
    (group,) = workers.groups(plan.expand(proto), lambda: None)
    return group


def test_task_options_carry_the_groups_environment_and_resources(worker_ray):
    strict = worker_ray.options(_group("strict", 2))
    env = strict["runtime_env"]["env_vars"]
    assert env["MKL_CBWR"] == "AUTO" and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env["STUDY_UNSET"] == "ATEN_CPU_CAPABILITY,ONEDNN_MAX_CPU_ISA,OPENBLAS_CORETYPE,OPENBLAS_NUM_THREADS"
    assert env["STUDY_GROUP"] == "cpu/strict/threads=2"  # one worker pool per group
    assert (strict["num_cpus"], strict["num_gpus"], strict["max_retries"]) == (2, 0, 0)
    default = worker_ray.options(_group("default", None, "cuda"))
    assert "MKL_CBWR" in default["runtime_env"]["env_vars"]["STUDY_UNSET"].split(",")
    assert "MKL_CBWR" not in default["runtime_env"]["env_vars"]
    assert (default["num_cpus"], default["num_gpus"]) == (1, 1)


def test_the_setup_hook_unsets_what_the_group_leaves_unset(worker_ray, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("STUDY_UNSET", "MKL_CBWR,ONEDNN_MAX_CPU_ISA")
    worker_ray.start_worker()
    assert "MKL_CBWR" not in os.environ and "ONEDNN_MAX_CPU_ISA" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "2"


def test_a_retry_redoes_only_unfinished_cells_and_attempts_are_bounded(worker_ray):
    group = _group("default", None)
    task = worker_ray._Task(stream=0, group=group, attempt=1)
    again = worker_ray._again(task, {group.cells[0].key, group.cells[2].key})
    assert again.group.cells == (group.cells[1], group.cells[3]) and again.attempt == 2
    assert worker_ray._again(task, {c.key for c in group.cells}) is None
    crash = RuntimeError("gone")
    assert worker_ray._lost(task, crash).endswith("on attempt 1 of 3; retried")
    last = worker_ray._Task(stream=0, group=group, attempt=worker_ray.ATTEMPTS)
    with pytest.raises(workers.WorkerError, match="attempt 3 of 3; cells it was training"):
        worker_ray._lost(last, crash)


def test_a_process_loads_the_data_once_per_loader(tiny_files, tmp_path):
    folder, checksums = tiny_files
    log = tmp_path / "loads.txt"

    def loader(cache: str) -> functools.partial:  # a new partial per call, as each task gets
        return functools.partial(worker_hooks.counting, log, folder, tmp_path / cache, checksums)

    first = workers.loaded(loader("a"))
    assert workers.loaded(loader("a")) is first and log.read_text().count("\n") == 1
    workers.loaded(loader("b"))  # another loader: loaded, and the first one's data let go
    assert log.read_text().count("\n") == 2 and len(workers._LOADED) == 1


# Run in a fresh driver process: Ray reads its token mode when imported, not when connecting.
_SERVE_ONCE = """
import functools, sys
from pathlib import Path
from study.engine import backend_ray, workers
from study.protocol import plan, schema
from tests import worker_hooks
log, folder, cache, checksums = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), eval(sys.argv[4])
proto = schema.parse({"name": "once", "dropout": [[0.0, 0.0], [0.5, 0.5]], "seeds": {"count": 4},
                      "baseline": [0.5, 0.5], "model": {"arch": "mlp", "hidden": [16, 16]},
                      "training": {"epochs": 1, "batch_size": 128}, "execution": "sequential"})
load = functools.partial(worker_hooks.counting, log, folder, cache, checksums)
(group,) = workers.groups(plan.expand(proto), load)
backend_ray.connect(sys.argv[5])
messages = list(backend_ray.run_many([group]))
print(sum(isinstance(m, workers.Finished) for _, m in messages))
"""


@pytest.mark.integration
def test_each_ray_worker_process_loads_the_data_once_across_its_tasks(
        worker_ray, ray_cluster, tiny_files, tmp_path):
    folder, checksums = tiny_files
    log = tmp_path / "loads.txt"
    done = subprocess.run(
        [sys.executable, "-c", _SERVE_ONCE, str(log), str(folder), str(tmp_path / "cache"),
         repr(checksums), ray_cluster.address],
        env={**os.environ, "PYTHONPATH": str(ROOT), **ray_cluster.env}, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "8"  # one Ray task per sequential cell
    loads = Counter(log.read_text().split())
    # Every process that served tasks loaded once, and fewer processes than tasks served them.
    assert set(loads.values()) == {1} and len(loads) < 8, loads


def _runs(uri: str, name: str, status: str | None = None) -> list:
    mlflow = MlflowClient(tracking_uri=uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return []
    query = f"attributes.status = '{status}'" if status else ""
    return mlflow.search_runs([exp.experiment_id], query, max_results=1000)


def test_a_batched_chunk_is_cut_into_near_equal_pieces_in_order(worker_ray):
    assert worker_ray._split(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert worker_ray._split(list(range(2)), 8) == [[0], [1]]
    assert worker_ray._split(list(range(60)), 1) == [list(range(60))]


def test_an_address_where_nothing_listens_fails_at_once(worker_ray):
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(worker_ray.ClusterError, match=f"no Ray cluster at --address {address}"):
        worker_ray.connect(address)
    with pytest.raises(worker_ray.ClusterError, match="expected HOST:PORT"):
        worker_ray.connect("head-without-port")


@pytest.mark.integration
@pytest.mark.usefixtures("real_data")
# threads null: Ray cuts each batched chunk into one-member pieces, one per cluster CPU. Portable
# needs a fixed thread count, so that case runs in the default mode: side by side, each member
# trains on one thread whatever the task has, so its bits must still match.
@pytest.mark.parametrize("execution, threads", [("sequential", 2), ("batched", 2),
                                               ("batched", "null")])
def test_portable_hashes_are_the_same_under_local_and_ray(execution, threads, ray_cluster,
                                                          tmp_path, drivers):
    name = f"portable-{execution}-{time.monotonic_ns()}"
    proto = tmp_path / "portable.yaml"
    proto.write_text(f"""name: {name}
model: {{arch: mlp, hidden: [64, 64], init_std: 0.01}}
training: {{epochs: 1, batch_size: 128, lr: 0.5}}
data: {{dataset: fashion-mnist, train_subset: 1000}}
dropout: [[0.0, 0.0], [0.2, 0.5]]
seeds: {{count: 2, start: 0}}
devices: [cpu]
determinism: [{"portable" if threads == 2 else "default"}]
threads: {threads}
randomness: portable
baseline: [0.2, 0.5]
execution: {execution}
batch_members: 2
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
        if threads == 2:
            assert on_ray["study.env.threads.intra_op"] == local["study.env.threads.intra_op"] == "2"


@pytest.mark.integration
@pytest.mark.usefixtures("real_data")
def test_smoke_protocol_through_ray_into_the_tracking_server(ray_cluster, tracking_server,
                                                             drivers):
    name = f"smoke-ray-{time.monotonic_ns()}"
    driver = drivers(ROOT / "protocols/smoke.yaml", tracking_server.url, *ray_cluster.args,
                     "--set", f"name={name}", "--set", "data.train_subset=1000",
                     "--set", "training.epochs=1", env=ray_cluster.env)
    code, out = driver.finish()
    assert code == 0, out[-3000:]
    assert "9 runs logged" in out
    assert "View run" not in out  # MLflow's two links per run against a server, turned off
    runs = _runs(tracking_server.url, name)
    assert Counter(r.info.status for r in runs) == {"FINISHED": 9}
    assert len({r.data.tags["study.cell"] for r in runs}) == 9
    for run in runs:
        # Read where it trained: the default mode unset the cluster's stray MKL_CBWR, and a
        # one-CPU Ray task runs one OpenMP thread where the protocol leaves threads open.
        assert run.data.tags["study.env.mkl_cbwr"] == "unset"
        assert run.data.tags["study.env.threads.omp_num_threads"] == "1"


@pytest.mark.integration
@pytest.mark.usefixtures("real_data")
def test_a_ray_worker_killed_mid_task_is_retried_without_duplicates(ray_cluster, tmp_path,
                                                                    drivers):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"raykill-{time.monotonic_ns()}"
    driver = drivers(small_protocol(tmp_path, name), uri, *ray_cluster.args, env=ray_cluster.env)
    killed = _kill_a_training_worker(uri, name, ray_cluster.marker, driver)
    code, out = driver.finish()
    assert code == 0, out[-3000:]
    _complete_and_unique(uri, name, {})
    retried = "died (WorkerCrashedError) on attempt 1 of 3; retried"
    assert retried in out, f"killed {killed}, yet the driver reported no retry"
    # A run the killed task had open is FAILED with the reason; a task killed between two of
    # its cells (the run seen RUNNING finished meanwhile) leaves none, only the line above.
    for run in _runs(uri, name, "FAILED"):
        assert retried in run.data.tags["study.error"]
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
