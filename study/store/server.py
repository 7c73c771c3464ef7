"""A tracking server on a real database: PostgreSQL (Debian's package) and `mlflow server`.

    python -m study.store.server [--port 5000]          # make server [PORT=5000]

The PostgreSQL cluster lives under `mlruns/postgres/` (not committed), owned by the `postgres`
user when started as root (initdb and postgres refuse to run as root), and listens on 127.0.0.1
only. No password exists: the MLflow server connects over the cluster's Unix socket, where
`peer` authentication maps the OS user who started it (and `postgres`) to the `mlflow` role;
TCP logins need a password, and no role has one. So nothing secret is written anywhere, and
run params never see a credential. Artifacts are served by the MLflow server from
`mlruns/server-artifacts/`. Ctrl-C, SIGTERM or SIGHUP stops both; once stopping has begun,
further signals are ignored (make forwards the SIGTERM a process group gets, so the wrapper
receives two), and PostgreSQL is always stopped last.

A server killed outright (SIGKILL, power loss) leaves its postmaster and its MLflow server
behind. The next start finds them, by `postmaster.pid` and by the MLflow server's process group
recorded in `mlflow-server.pid`: a postmaster of this cluster on the expected port and socket is
reused, any other is stopped, a left-over MLflow server is stopped; one line says which.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE_DIR = ROOT / "mlruns"
PG_ROOT = Path("/usr/lib/postgresql")
ROLE, DATABASE = "mlflow", "mlflow"
# A Unix socket path longer than this (sun_path) cannot be bound.
MAX_SOCKET_PATH = 100


class ServerError(RuntimeError):
    """PostgreSQL or the MLflow server could not be set up or started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path:
    """The newest Debian PostgreSQL's binaries (/usr/lib/postgresql/<version>/bin)."""
    found = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: float(p.parent.name) if p.parent.name.replace(".", "").isdigit()
                   else 0.0)
    if not found:
        raise ServerError(f"no PostgreSQL under {PG_ROOT}: install Debian's `postgresql` "
                          "(apt-get install -y postgresql)")
    return found[-1]


def _as_owner(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse root; as any other user they run as that user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class Postgres:
    """One PostgreSQL cluster in `root` (data/, socket/, log), on 127.0.0.1:`port`."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sockets(self) -> Path:
        return self.root / "socket"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI over the Unix socket: peer authentication, no password."""
        return f"postgresql://{ROLE}@/{DATABASE}?host={self.sockets}&port={self.port}"

    def init(self) -> None:
        """Create the cluster once; later starts reuse it (and the runs in it)."""
        if (self.data / "PG_VERSION").exists():
            return
        if len(str(self.sockets)) + 20 > MAX_SOCKET_PATH:
            raise ServerError(f"{self.sockets}: path too long for a Unix socket; "
                              "use a checkout with a shorter path")
        self.sockets.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        _check(_as_owner([str(pg_bin() / "initdb"), "-D", str(self.data), "-U", ROLE,
                          "-E", "UTF8", "--auth-local=peer", "--auth-host=scram-sha-256"]),
               "initdb")
        self._write_auth()

    def _write_auth(self) -> None:
        # peer: the kernel vouches for the connecting OS user; the map names who may act as
        # the `mlflow` role. Loopback TCP asks for a password that no role has.
        users = sorted({getpass.getuser(), "postgres"})
        (self.data / "pg_ident.conf").write_text(
            "".join(f"study {user} {ROLE}\n" for user in users))
        (self.data / "pg_hba.conf").write_text(
            "local all all peer map=study\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")

    def left_running(self) -> int | None:
        """The pid of a live postmaster of this cluster (from postmaster.pid), else None.
        A stale file whose process is gone is PostgreSQL's own to clear at start."""
        lines = _read_lines(self.data / "postmaster.pid")
        if not lines or not lines[0].isdigit():
            return None
        pid = int(lines[0])
        return pid if _alive(pid, b"postgres") else None

    def reusable(self) -> bool:
        """A postmaster left running here listens where this start would put it, and is up."""
        lines = _read_lines(self.data / "postmaster.pid")
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, shm, status
        return (len(lines) >= 8 and lines[3] == str(self.port)
                and lines[4] == str(self.sockets) and lines[7].strip() == "ready")

    def start(self) -> None:
        if (pid := self.left_running()) is not None:
            if self.reusable():
                print(f"PostgreSQL left running by an earlier server (pid {pid}, {self.data}): "
                      "reused", flush=True)
                self._ensure_database()
                return
            print(f"PostgreSQL left running by an earlier server (pid {pid}, {self.data}) on "
                  "another port or socket: stopped", flush=True)
            self.stop()
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.sockets}")
        _check(_as_owner([str(pg_bin() / "pg_ctl"), "start", "-w", "-t", "60", "-D",
                          str(self.data), "-l", str(self.root / "postgres.log"), "-o", options]),
               f"pg_ctl start (see {self.root / 'postgres.log'})")
        self._ensure_database()

    def _ensure_database(self) -> None:
        psql = [str(pg_bin() / "psql"), "-h", str(self.sockets), "-p", str(self.port), "-U", ROLE,
                "-d", "postgres", "-tAc"]
        found = _check(psql + [f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"], "psql")
        if found.strip() != "1":
            _check(psql + [f"CREATE DATABASE {DATABASE}"], "createdb")

    def stop(self) -> None:
        subprocess.run(_as_owner([str(pg_bin() / "pg_ctl"), "stop", "-D", str(self.data),
                                  "-m", "fast", "-w"]), capture_output=True)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _alive(pid: int, name: bytes) -> bool:
    """`pid` runs and its command line names `name` (a recycled pid does not count)."""
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _check(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServerError(f"{what} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port`, backed by `database_uri`, serving artifacts."""

    database_uri: str
    artifacts: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def record(self) -> Path:
        """The process group of the MLflow server running here, for a start after a crash."""
        return self.artifacts.parent / "mlflow-server.pid"

    def stop_left_over(self) -> None:
        """Stop an MLflow server left by a server killed outright (it holds the port)."""
        lines = _read_lines(self.record)
        if lines and lines[0].isdigit() and _alive(pgid := int(lines[0]), b"mlflow"):
            print(f"MLflow server left running by an earlier server (process group {pgid}): "
                  "stopped", flush=True)
            _stop_group(pgid)
        self.record.unlink(missing_ok=True)

    def start(self, timeout: float = 180.0) -> None:
        self.stop_left_over()
        mlflow = Path(sys.executable).with_name("mlflow")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        log = open(self.artifacts.parent / f"mlflow-server-{self.port}.log", "ab")
        # Its own process group: the server forks workers, and stop() must reach them all.
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", self.database_uri,
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_server_env())
        self.record.write_text(f"{self.process.pid}\n")
        self._wait(timeout, log.name)

    def _wait(self, timeout: float, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:]
                raise ServerError(f"mlflow server exited with {self.process.returncode} "
                                  f"({' '.join(tail)[:300]}); see {log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"mlflow server not answering on {self.url} after {timeout:.0f} s; "
                          f"see {log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop_group(self.process.pid)
            self.process.wait()
        self.record.unlink(missing_ok=True)


SERVER_SITE = Path(__file__).resolve().parent / "server_site"


def _server_env() -> dict[str, str]:
    """The MLflow server's environment: ours, with server_site/sitecustomize.py (its garbage
    collector's thresholds) imported first by each of its Python processes."""
    path = os.pathsep.join(p for p in (str(SERVER_SITE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _stop_group(pgid: int, timeout: float = 20) -> None:
    """SIGTERM a process group, SIGKILL it if anything is left after `timeout` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class Server:
    """PostgreSQL plus the MLflow server in front of it."""

    postgres: Postgres
    mlflow: MlflowServer

    @property
    def url(self) -> str:
        return self.mlflow.url

    @property
    def database_uri(self) -> str:
        return self.postgres.uri


@contextlib.contextmanager
def running(root: Path, port: int, pg_port: int | None = None) -> Iterator[Server]:
    """Start (creating on first use) the cluster in `root/postgres` and the server; stop both."""
    pg = Postgres(root / "postgres", pg_port or free_port())
    srv = Server(pg, MlflowServer(pg.uri, root / "server-artifacts", port))
    try:
        pg.init()
        pg.start()
        srv.mlflow.start()
        yield srv
    finally:
        # Also after a failed or interrupted start: pg_ctl stop answers quickly where nothing runs.
        srv.mlflow.stop()
        pg.stop()


@contextlib.contextmanager
def temporary() -> Iterator[Server]:
    """A throw-away server on free ports, for tests and benchmarks."""
    # Not under pytest's tmp_path: the `postgres` user must be able to reach the directory.
    root = Path(tempfile.mkdtemp(prefix="study-pg-"))
    root.chmod(0o755)
    try:
        with running(root, free_port()) as srv:
            yield srv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.store.server",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    parser.add_argument("--store", type=Path, default=STORE_DIR,
                        help="folder of the cluster and the artifacts (default: mlruns/)")
    args = parser.parse_args(argv)
    args.store.mkdir(exist_ok=True)
    _stop_on_signal()
    try:
        with running(args.store, args.port, pg_port=_pg_port(args.store)) as srv:
            print(f"PostgreSQL: {srv.postgres.data} on 127.0.0.1:{srv.postgres.port}\n"
                  f"MLflow server: {srv.url} (artifacts in {srv.mlflow.artifacts})\n\n"
                  f"  export MLFLOW_TRACKING_URI={srv.url}\n\nCtrl-C stops both.", flush=True)
            srv.mlflow.process.wait()
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopping:
        pass
    return 0


def _pg_port(store: Path) -> int:
    """The project's cluster keeps one port (recorded beside it), so its URI stays stable."""
    record = store / "postgres" / "port"
    if record.exists():
        return int(record.read_text())
    port = free_port()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{port}\n")
    return port


class Stopping(BaseException):
    """A stop signal arrived: unwinds through running(), whose `finally` stops both servers."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_on_signal() -> None:
    # Set by hand: a shell starting this in the background leaves SIGINT ignored. The first
    # signal starts the shutdown and every later one is ignored, or a second SIGTERM (make
    # forwards the one its process group got) would cut the `finally` short before PostgreSQL
    # is stopped. Set before anything starts, so that a signal during start-up stops it too.
    def first(signum, _frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopping(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, first)


if __name__ == "__main__":
    raise SystemExit(main())
