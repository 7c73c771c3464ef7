"""Ray past one process: what a local cluster exposes (every listening port on loopback, the
token readable by its owner only), then a cluster of three nodes on this machine: cuda cells
planned from its resources, a study spread over its nodes, and the loss of a whole node."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_faults import small_protocol
from mlflow import MlflowClient

from tests.conftest import RayCluster
from tests.test_faults import CELLS, _finished, _wait_for, drivers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _with_marker(marker: str) -> set[int]:
    """Pids whose environment holds STUDY_TEST_CLUSTER=`marker` (a cluster's processes)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (f"STUDY_TEST_CLUSTER={marker}".encode()
                                        in (proc / "environ").read_bytes()):
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def _listening(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every TCP socket listening in `pids` (from `ss -ltnpH`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.append((line.split()[3], line.split("users:")[-1]))
    return found


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
    return host not in ("*", "0.0.0.0", "::") and ipaddress.ip_address(host).is_loopback


@pytest.mark.integration
def test_the_session_cluster_listens_on_loopback_only(ray_cluster):
    listening = _listening(_with_marker(ray_cluster.marker))
    assert listening, "found no listening socket of the cluster"
    assert [s for s in listening if not _loopback(s[0])] == []


@pytest.mark.integration
def test_a_cluster_the_driver_starts_listens_on_loopback_and_keeps_its_token_private(tmp_path):
    pytest.importorskip("ray")
    marker = f"connect-{os.getpid()}"
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "STUDY_TEST_CLUSTER": marker, "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    # Starts the cluster as `--backend ray` without --address does, runs a task (a worker
    # process listens too), then reports what listens before shutting down.
    script = f"""
import ray, subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.test_ray_nodes import _listening, _with_marker
from study.engine import backend_ray
backend_ray.connect()
ray.get(ray.remote(lambda: 1).remote())
for address, owner in _listening(_with_marker({marker!r})):
    print("LISTEN", address, owner)
ray.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    listening = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("LISTEN")]
    assert len(listening) >= 3, done.stdout  # GCS, raylet and more
    assert [a for a in listening if not _loopback(a)] == [], done.stdout
    token = tmp_path / ".ray" / "auth_token"
    assert token.exists() and stat.S_IMODE(token.stat().st_mode) == 0o600


# --- several nodes on this machine ---------------------------------------------------------

@pytest.fixture(scope="module")
def ray_nodes():
    """A head and two worker nodes on this machine (study/engine/ray_nodes.py), each a real
    raylet with one CPU; node `b` also declares a GPU it does not have (a resource for the
    scheduler: nothing trains on it). Every Ray server of the cluster is gone after the module,
    or the teardown fails."""
    pytest.importorskip("ray")
    from study.engine import ray_nodes as nodes_of_ray

    with nodes_of_ray.cluster({"a": {}, "b": {"--num-gpus": "1"}}) as nodes:
        yield nodes


def _joining(nodes) -> RayCluster:
    """The cluster as the drivers of these tests join it."""
    return RayCluster(nodes.address, nodes.marker, nodes.token)


def _plan(cluster: RayCluster | None, nodes: int = 1) -> dict:
    """Which devices' cells a fresh driver process (this one must not join a cluster) would
    train and skip for a cpu+cuda protocol: on this machine, or on `cluster` once `nodes` nodes
    are alive there. It plans only; nothing trains."""
    script = f"""
import json, time
import torch
from study import runner
from study.protocol import plan, schema
proto = schema.parse({{"name": "devices", "dropout": [[0.0, 0.0], [0.5, 0.5]],
                      "seeds": {{"count": 1}}, "baseline": [0.5, 0.5], "devices": ["cpu", "cuda"]}})
where = "local"
if {cluster is not None}:
    import ray
    from study.engine import backend_ray
    backend_ray.connect({cluster.address if cluster else None!r})
    deadline = time.monotonic() + 120
    while sum(n["Alive"] for n in ray.nodes()) < {nodes} and time.monotonic() < deadline:
        time.sleep(0.5)
    where = "ray"
todo, skipped = runner.runnable(proto, plan.expand(proto), where)
print(json.dumps({{"todo": sorted({{c.device for c in todo}}),
                  "skipped": sorted({{c.device for c in skipped}}),
                  "driver_cuda": torch.cuda.is_available()}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(cluster.env if cluster else {})}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_cuda_cells_are_planned_where_the_cluster_has_a_gpu(ray_nodes, ray_cluster):
    here = _plan(None)
    if here["driver_cuda"]:
        pytest.skip("this driver has a GPU: the case is a CPU-only driver")
    assert here == {"todo": ["cpu"], "skipped": ["cuda"], "driver_cuda": False}
    # Node b declares a GPU: the cluster can run cuda cells though the driver cannot.
    assert _plan(_joining(ray_nodes), nodes=3) == {"todo": ["cpu", "cuda"], "skipped": [],
                                                 "driver_cuda": False}
    # The session cluster has CPUs only: its cuda cells are skipped.
    assert _plan(ray_cluster) == {"todo": ["cpu"], "skipped": ["cuda"], "driver_cuda": False}


def _portable(tmp_path: Path, name: str) -> Path:
    """The fault tests' 12 cells, one Ray task each, portable on one thread (a node has one CPU)."""
    return small_protocol(tmp_path, name, "determinism: [portable]\nthreads: 1\nrandomness: portable")

def _runs(uri: str, name: str) -> list:
    mlflow = MlflowClient(tracking_uri=uri)
    exp = mlflow.get_experiment_by_name(name)
    return mlflow.search_runs([exp.experiment_id], "", max_results=1000) if exp else []


def _kill_a_node_while_it_trains(nodes, uri: str, name: str, driver):
    """Once two runs have finished, kill -9 the first worker node found with a RUNNING run of
    the study (the campaign's node fault, study/tools/chaos.py): what it struck, and the runs
    FINISHED just before."""
    from study.store import tracking
    from study.tools import chaos

    _wait_for(uri, name, 2, driver)
    before = _finished(uri, name)
    strike = chaos.hit_a_node(
        nodes, lambda: tracking.runs_in(tracking.client(uri), name, "RUNNING"),
        lambda: driver.process.poll() is None)
    assert strike is not None, driver.finish()[1][-3000:]
    return strike, before


@pytest.mark.integration
@pytest.mark.usefixtures("real_data")
def test_a_study_across_nodes_loses_a_node_and_nothing_else(ray_nodes, tmp_path, drivers):
    name = f"nodes-{time.monotonic_ns()}"
    proto = _portable(tmp_path, name)
    local = f"sqlite:///{tmp_path / 'local.db'}"
    code, out = drivers(proto, local, "--backend", "local").finish()
    assert code == 0, out[-3000:]
    uri = f"sqlite:///{tmp_path / 'ray.db'}"
    ids = {node: ray_nodes.node_id(node) for node in ray_nodes.starts}
    began = time.time()
    cluster = _joining(ray_nodes)
    driver = drivers(proto, uri, *cluster.args, env=cluster.env)
    strike, before = _kill_a_node_while_it_trains(ray_nodes, uri, name, driver)
    killed, at = strike.target.split()[0], strike.wall
    code, out = driver.finish()
    assert code == 0, out[-3000:]

    runs = _runs(uri, name)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    per_cell = Counter(r.data.tags["study.cell"] for r in finished)
    assert len(per_cell) == CELLS and max(per_cell.values()) == 1, per_cell  # 0 duplicates
    assert set(before) <= {r.info.run_id for r in finished}  # 0 lost
    node_of = {r.data.tags["study.cell"]: r.data.tags["study.env.ray_node_id"] for r in finished}
    assert set(node_of.values()) <= set(ids.values())
    assert len(set(node_of.values())) > 1, node_of  # spread over nodes
    # The kill hit a run in flight on the node; it failed and its cell was trained again on a
    # node still alive, as was anything else the node had.
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert set(strike.running) <= {r.info.run_id for r in failed}, (strike, failed)
    assert strike.running and strike.node_id == ids[killed]
    for run in failed:
        assert run.data.tags["study.env.ray_node_id"] == ids[killed]
        assert node_of[run.data.tags["study.cell"]] != ids[killed]
    said = [line for line in out.splitlines() if f"Ray node {ids[killed]}" in line]
    assert len(said) == len(failed) and all(" lost: " in line for line in said), out[-3000:]
    # The same bits as on this machine alone.
    hashes = {r.data.tags["study.cell"]: r.data.tags["study.weights_sha256"]
              for r in _runs(local, name) if r.info.status == "FINISHED"}
    assert {cell: r.data.tags["study.weights_sha256"] for r in finished
            for cell in [r.data.tags["study.cell"]]} == hashes

    retrained = [r.info.end_time / 1000 for r in finished
                 if r.data.tags["study.cell"] in set(strike.running.values())]
    names = {v: k for k, v in ids.items()}
    print(f"\nstudy across {len(ids)} nodes, node {killed} ({ids[killed][:12]}) killed "
          f"{at - began:.1f} s in: cells per node "
          f"{dict(Counter(names[n] for n in node_of.values()))}, runs lost "
          f"{len(set(before) - {r.info.run_id for r in finished})}, duplicates "
          f"{sum(per_cell.values()) - len(per_cell)}, in flight {len(failed)}, recovered "
          f"{max(retrained) - at:.1f} s after the kill (its runs in flight FINISHED again), "
          f"study "
          f"{time.time() - began:.1f} s")
