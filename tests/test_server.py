"""`make server` stops whatever signal comes and starts again after a crash: real `make`, real
PostgreSQL, a real MLflow server, in a temporary store on free ports. After each stop no
postmaster of the cluster and no MLflow server is left, and the next start answers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from study.store import server
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store() -> Iterator[Path]:
    """One store for the module: the cluster is made once, each test starts it again."""
    try:
        server.pg_bin()
    except server.ServerError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {err}")
        pytest.skip(str(err))
    # Not under pytest's tmp_path: the `postgres` user must be able to reach the directory.
    root = Path(tempfile.mkdtemp(prefix="study-srv-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        _stop_everything(root)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Make:
    """`setsid make server` (its own process group, as a service manager or CI starts it)."""

    process: subprocess.Popen
    port: int
    store: Path

    @property
    def wrapper(self) -> int:
        """The pid of `python -m study.store.server`, make's child."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        (pid,) = children.read_text().split()
        return int(pid)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out


def _start(store: Path, timeout: float = 180) -> Make:
    port = free_port()
    # STAMP: a file newer than requirements.txt, so make does not set up a venv here; BIN: this
    # interpreter's, as `make server` would use .venv/bin.
    stamp = store / "stamp"
    stamp.touch()
    process = subprocess.Popen(
        ["make", "-s", "--no-print-directory", "-C", str(ROOT), "server", f"PORT={port}",
         f"SERVER_STORE={store}", f"BIN={Path(sys.executable).parent}", f"STAMP={stamp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started = Make(process, port, store)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, started.finish()[1][-3000:]
        if _answers(port):
            return started
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"make server not answering after {timeout} s: {started.finish()[1]}")


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _postmasters(store: Path) -> list[int]:
    """Processes of this store's cluster (the postmaster and its children name its data dir or
    inherit its cwd)."""
    data = str(store / "postgres" / "data")
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"postgres" in (proc / "cmdline").read_bytes()
                    and os.readlink(proc / "cwd") == data):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _mlflow_servers(store: Path) -> list[int]:
    record = store / "server-artifacts"
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(record).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _nothing_left(store: Path, make: Make, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (_postmasters(store) or _mlflow_servers(store)):
        time.sleep(0.2)
    assert _postmasters(store) == [], "a postmaster of the cluster was left running"
    assert _mlflow_servers(store) == [], "an MLflow server was left running"
    assert not (store / "postgres" / "data" / "postmaster.pid").exists()
    assert not _answers(make.port)


def _stop_everything(store: Path) -> None:
    """What a failed test may leave: stop it, so that the suite leaves no process behind."""
    for pid in _mlflow_servers(store):
        with_suppressed(os.kill, pid, signal.SIGKILL)
    if _postmasters(store):
        subprocess.run(["runuser", "-u", "postgres", "--", str(server.pg_bin() / "pg_ctl"),
                        "stop", "-D", str(store / "postgres" / "data"), "-m", "immediate"]
                       if os.geteuid() == 0 else
                       [str(server.pg_bin() / "pg_ctl"), "stop", "-D",
                        str(store / "postgres" / "data"), "-m", "immediate"],
                       capture_output=True)


def with_suppressed(call, *args) -> None:
    try:
        call(*args)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("signals", [
    pytest.param([signal.SIGTERM], id="SIGTERM"),
    pytest.param([signal.SIGINT], id="SIGINT"),
    # Twice to the group, the second while the first shutdown runs: make forwards each one too.
    pytest.param([signal.SIGTERM, signal.SIGTERM], id="SIGTERM-twice"),
    pytest.param([signal.SIGINT, signal.SIGTERM], id="SIGINT-then-SIGTERM"),
])
def test_a_signal_to_the_process_group_stops_both_servers(store, signals):
    make = _start(store)
    assert _postmasters(store), "no postmaster while the server answers"
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.3)
        os.killpg(make.process.pid, sig)
    _, out = make.finish()
    assert "error" not in out, out
    # Nothing that would stop the next start (the module's next test starts it again).
    _nothing_left(store, make)


@pytest.mark.parametrize("port", ["same", "other"])
def test_a_start_after_the_wrapper_was_killed_reuses_or_stops_what_it_left(store, port):
    make = _start(store)
    os.kill(make.wrapper, signal.SIGKILL)
    make.finish()
    postmaster = int((store / "postgres/data/postmaster.pid").read_text().split()[0])
    assert postmaster in _postmasters(store) and _mlflow_servers(store), \
        "SIGKILL should leave both servers running"
    if port == "other":  # the cluster's recorded port changed: the old postmaster must go
        (store / "postgres" / "port").write_text(f"{free_port()}\n")
    again = _start(store)
    os.killpg(again.process.pid, signal.SIGTERM)
    _, out = again.finish()  # make itself dies of the SIGTERM, as make does
    assert "error" not in out, out
    verdict = "reused" if port == "same" else "on another port or socket: stopped"
    assert f"PostgreSQL left running by an earlier server (pid {postmaster}" in out
    assert verdict in out
    assert "MLflow server left running by an earlier server" in out and "stopped" in out
    _nothing_left(store, again)
