"""Ray past one process: what a local cluster exposes (every listening port on loopback, the
token readable by its owner only)."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

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

