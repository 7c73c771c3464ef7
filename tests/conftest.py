"""Shared fixtures: tiny Fashion-MNIST-shaped IDX files that go through the real loader."""

from __future__ import annotations

import functools
import gzip
import json
import os
import hashlib
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from study import data


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


def free_port() -> int:
    """A 127.0.0.1 port nobody listens on now: for a server to take, or to be refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GOLDEN = Path(__file__).resolve().parent / "golden" / "portable.json"


@pytest.fixture(scope="session")
def golden_protocol() -> dict:
    """The small protocol whose portable hashes are golden; the thread tests train it too."""
    return json.loads(GOLDEN.read_text())["protocol"]


@pytest.fixture(scope="session")
def trained_in_worker(tiny_files, tmp_path_factory, golden_protocol):
    """(mode, threads) -> `workers.Trained` of the golden protocol's cells on the tiny data,
    each group in a fresh worker process as the runner trains it; each group trained once."""
    from study import plan, protocol, workers

    folder, checksums = tiny_files
    load = functools.partial(data.load, folder, cache=tmp_path_factory.mktemp("wcache"),
                             checksums=checksums)
    done: dict[tuple[str, int], workers.Trained] = {}

    def trained(mode: str, threads: int) -> workers.Trained:
        if (mode, threads) not in done:
            proto = protocol.parse({**golden_protocol, "determinism": [mode], "threads": threads})
            (group,) = workers.groups(plan.expand(proto), load)
            done[mode, threads] = workers.trained(group)
        return done[mode, threads]

    return trained


@pytest.fixture(scope="session")
def tracking_server():
    """A real PostgreSQL-backed MLflow server on free ports, stopped after the session.

    Skipped where PostgreSQL is not installed; under CI=true that is a failure instead, since
    CI installs it (.ci/run)."""
    from study import server

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
