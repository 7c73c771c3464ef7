"""Shared fixtures: tiny Fashion-MNIST-shaped IDX files that go through the real loader."""

from __future__ import annotations

import functools
import gzip
import json
import os
import hashlib
import secrets
import importlib.util
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from study.engine import data

ROOT = Path(__file__).resolve().parents[1]

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_idx_dir(folder: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """Write the four IDX .gz files; return the MD5s of their unpacked content.

    Images are class-dependent blobs plus noise, so a model can learn them in a few steps.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    checksums = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.integers(-40, 40, size=(n, 28, 28))
        images = np.clip(prototypes[labels] + noise, 0, 255)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            write_idx(folder / f"{name}.gz", array)
            content = gzip.decompress((folder / f"{name}.gz").read_bytes())
            checksums[name] = hashlib.md5(content).hexdigest()
    return checksums


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("idx")
    return folder, make_idx_dir(folder, n_train=600, n_test=200)


@pytest.fixture(scope="session")
def tiny_data(tiny_files, tmp_path_factory) -> data.Dataset:
    folder, checksums = tiny_files
    return data.load(folder, cache=tmp_path_factory.mktemp("cache"), checksums=checksums)


def real_data_present() -> bool:
    try:
        data.locate(download_to=None)
    except data.DataError:
        return False
    return True


@pytest.fixture
def real_data():
    """For driver processes, which load the real Fashion-MNIST: skipped without it, failed
    under CI=true (make data installs it)."""
    if not real_data_present():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but Fashion-MNIST is missing (make data installs it)")
        pytest.skip("driver processes need the real Fashion-MNIST")


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on now: for a server to take, or to be refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
# The golden file of today's `portable` (OpenBLAS kernels); portable.json holds the same cells
# on torch's kernels, as recorded before the OpenBLAS path (kernels: torch in its protocol).
GOLDEN = GOLDEN_DIR / "portable-openblas.json"


@pytest.fixture(scope="session")
def golden_protocol() -> dict:
    """The small protocol whose portable hashes are golden; the thread tests train it too."""
    return json.loads(GOLDEN.read_text())["protocol"]


@pytest.fixture(scope="session")
def trained_protocol(tiny_files, tmp_path_factory):
    """raw protocol (one worker group) -> `workers.Trained` of its cells on the tiny data, in a
    fresh worker process as the runner trains them; each protocol trained once."""
    from study.protocol import plan, schema as protocol
    from study.engine import workers

    folder, checksums = tiny_files
    load = functools.partial(data.load, folder, cache=tmp_path_factory.mktemp("wcache"),
                             checksums=checksums)
    done: dict[str, workers.Trained] = {}

    def trained(raw: dict) -> workers.Trained:
        key = json.dumps(raw, sort_keys=True)
        if key not in done:
            (group,) = workers.groups(plan.expand(protocol.parse(raw)), load)
            done[key] = workers.trained(group)
        return done[key]

    return trained


@pytest.fixture(scope="session")
def trained_in_worker(trained_protocol, golden_protocol):
    """(mode, threads, kernels) -> `workers.Trained` of the golden protocol's cells."""
    def trained(mode: str, threads: int, kernels: str = "openblas-haswell"):
        return trained_protocol({**golden_protocol, "determinism": [mode], "threads": threads,
                                 "kernels": kernels})

    return trained


@pytest.fixture(scope="session")
def tracking_server():
    """A real PostgreSQL-backed MLflow server on free ports, stopped after the session.

    Skipped where PostgreSQL is not installed; under CI=true that is a failure instead, since
    CI installs it (.ci/run)."""
    from study.store import server

    try:
        context = server.temporary()
        srv = context.__enter__()
    except server.ServerError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no tracking server: {err}")
        pytest.skip(f"no PostgreSQL-backed tracking server here: {err}")
    try:
        yield srv
    finally:
        context.__exit__(None, None, None)


@dataclass(frozen=True)
class RayCluster:
    address: str  # HOST:PORT, as `--address` takes it
    marker: str  # in the environment of every process of this cluster, to find its workers
    token: str  # the cluster's authentication token, made for this session
    loopback: bool = False  # its nodes kept on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)

    @property
    def args(self) -> tuple[str, ...]:
        return "--backend", "ray", "--address", self.address

    @property
    def env(self) -> dict[str, str]:
        """What a driver joining it needs: token mode and the cluster's token; for a loopback
        cluster, the variable too: without it a driver takes the machine's address for its own,
        finds no node there and waits in ray.init (seen: 10 minutes, no error)."""
        loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if self.loopback else {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **loopback}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head --block` on loopback), stopped after the
    session. A stray MKL_CBWR=AVX2 sits in its environment, as a user's shell might leave one:
    each mode must set or unset it in the workers (`started_in_mode` checks).

    Skipped where Ray is not installed; under CI=true that is a failure instead (requirements.txt
    pins it)."""
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but Ray is missing (requirements.txt pins it)")
        pytest.skip("no Ray here (pip install -r requirements.txt)")
    port, marker = free_port(), f"study-test-{os.getpid()}"
    # Its own token, as Ray makes them (256 random bits): `ray start` in token mode refuses to
    # start without one, and a new machine has no ~/.ray/auth_token (a local ray.init makes it).
    # Loopback only: Ray's servers bind the node IP, which stays 127.0.0.1 with
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (study/engine/backend_ray.py, LOOPBACK_ONLY;
    # tests/test_ray_nodes.py checks every port); cluster.env carries it to the drivers.
    cluster = RayCluster(f"127.0.0.1:{port}", marker, secrets.token_hex(32), loopback=True)
    # A short temporary root: Ray's socket paths must fit in 107 characters.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STUDY_TEST_CLUSTER": marker,
           "MKL_CBWR": "AVX2", "RAY_USAGE_STATS_ENABLED": "0", **cluster.env}
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--include-dashboard", "false", "--num-cpus", "2",
         "--temp-dir", temp, "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, head)
        yield cluster
    finally:
        head.terminate()  # --block: stopping it stops every process it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}: {process.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"no Ray head on port {port} after {timeout} s")
