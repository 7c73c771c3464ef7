"""A fault campaign: run a study, hit it with one fault at a seeded random moment, rerun it to
completion, and judge the store. One line per try; exit 1 if any try lost, duplicated or stranded
a run, or left a process behind.

    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault driver
    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault worker --backend ray
    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault server

Faults: `driver` (kill -9 of `python -m study run`), `worker` (kill -9 of one worker: the local
backend's worker process, or a Ray process running a `_serve` task), `server` (the MLflow
tracking server stopped and started again; the campaign runs its own PostgreSQL-backed server,
as `make server` does, since it must restart it). The loss of a Ray node needs a cluster of
several nodes: add it to FAULTS with the multi-node work.

A try's moment: once a seeded number of runs have FINISHED (0 to planned - 2), a seeded delay
of 0-2 s. Lost: a planned cell without a FINISHED run at the end, or a run FINISHED before the
fault that no longer is. Duplicated: FINISHED runs beyond one per cell. Left RUNNING: runs the
faulted invocation left open (the rerun marks them KILLED and redoes their cells); stuck: runs
still RUNNING at the end. Orphans: processes of an invocation (found by a marker in their
environment) alive 10 s after it ended; they are reported, then killed. Recovery: from the fault
to the end of the first invocation that completed the study (a killed driver's lease runs out
first: --lease-ttl).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from study import runner
from study.protocol import plan, schema
from study.store import server, tracking

ROOT = Path(__file__).resolve().parents[2]
MARKER = "STUDY_CHAOS"  # in the environment of every process an invocation starts
GRACE = 10.0  # seconds an ended invocation's processes get to go before they count as orphans
WORKERS = {"local": b"study.engine.backend_process", "ray": b"ray::_serve"}


@dataclass(frozen=True)
class Moment:
    """When a try's fault hits: once `after_runs` runs are FINISHED, `delay` seconds later."""

    after_runs: int
    delay: float


def moments(seed: int, tries: int, planned: int) -> list[Moment]:
    """The campaign's fault moments, the same for the same seed."""
    rng = random.Random(seed)
    return [Moment(rng.randrange(max(1, planned - 1)), round(rng.uniform(0, 2), 2))
            for _ in range(tries)]


@dataclass(frozen=True)
class Outcome:
    fault: str
    hit_at: float | None  # seconds after the faulted driver started; None: the study ended first
    finished_before: int
    planned: int
    lost: int
    duplicated: int
    left_running: int
    stuck: int
    recovered_in: float | None
    orphans: tuple[str, ...]
    exits: tuple[int, ...]

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated or stranded, and the study completed. A missed try (the study
        ended before its moment: under Ray the last cells run side by side) tested nothing but
        broke nothing: clean, and counted apart in the summary."""
        return not (self.lost or self.duplicated or self.stuck or self.orphans
                    or (self.hit_at is not None and self.recovered_in is None)
                    or self.exits[-1] != 0)

    def line(self) -> str:
        hit = ("missed (the study ended first)" if self.hit_at is None else
               f"hit {self.hit_at:5.1f} s ({self.finished_before}/{self.planned} finished)")
        recovered = "never" if self.recovered_in is None else f"{self.recovered_in:.1f} s"
        orphans = ", ".join(self.orphans) or "0"
        return (f"{self.fault:6}  {hit}  lost {self.lost}  duplicated {self.duplicated}  "
                f"left RUNNING {self.left_running}  stuck {self.stuck}  recovered in {recovered}"
                f"  orphans {orphans}  exits {','.join(map(str, self.exits))}")


@dataclass
class Campaign:
    """Where a campaign's drivers run and write: protocol, overrides, backend, store URI."""

    protocol: Path
    overrides: list[str]
    backend: str
    uri: str
    logs: Path
    lease_ttl: float
    server: server.Server | None = None
    started: list[subprocess.Popen] = field(default_factory=list)

    def driver(self, name: str, marker: str) -> subprocess.Popen:
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "STUDY_LEASE_TTL": str(self.lease_ttl),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MARKER: marker}
        sets = [arg for s in [*self.overrides, f"name={name}"] for arg in ("--set", s)]
        log = open(self.logs / f"{marker}.log", "wb")
        # Its own session: a Ctrl-C of the campaign reaches the campaign, not the drivers.
        process = subprocess.Popen(
            [sys.executable, "-m", "study", "run", str(self.protocol), "--backend", self.backend,
             *sets], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.started.append(process)
        return process

    def runs(self, name: str, status: str) -> dict[str, str]:
        return tracking.runs_in(tracking.client(self.uri), name, status)


def marked(marker: str) -> list[int]:
    """Pids of live processes whose environment carries `MARKER=marker`."""
    needle = f"{MARKER}={marker}\0".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "environ").read_bytes() + b"\0":
                pids.append(int(proc.name))
    return pids


def command_of(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def program(pid: int) -> str:
    return command_of(pid).split(b"\0")[0].decode(errors="replace")


# --- faults: each hits the running driver's study once; a new kind is one function here ------

def kill_driver(campaign: Campaign, driver: subprocess.Popen, marker: str) -> float | None:
    driver.send_signal(signal.SIGKILL)
    return time.monotonic()


def kill_worker(campaign: Campaign, driver: subprocess.Popen, marker: str) -> float | None:
    """SIGKILL one process training a chunk (the lowest pid), waiting for one to exist."""
    kind = WORKERS[campaign.backend]
    while driver.poll() is None:
        if pids := sorted(p for p in marked(marker) if kind in command_of(p)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.05)
    return None


def restart_server(campaign: Campaign, driver: subprocess.Popen, marker: str) -> float | None:
    struck = time.monotonic()
    campaign.server.mlflow.stop()
    time.sleep(2)  # down long enough for writes to fail, not just to queue
    campaign.server.mlflow.start()
    return struck


# Each returns when it struck (time.monotonic()), or None if the study ended first.
FAULTS: dict[str, Callable[[Campaign, subprocess.Popen, str], float | None]] = {
    "driver": kill_driver, "worker": kill_worker, "server": restart_server}


# --- one try ------------------------------------------------------------------------------------

def one_try(campaign: Campaign, fault: str, moment: Moment, name: str, planned: set[str],
            timeout: float = 1800) -> Outcome:
    first = f"{name}-a"
    driver = campaign.driver(name, first)
    began = time.monotonic()
    before = _wait_for(campaign, name, moment, driver)
    struck = FAULTS[fault](campaign, driver, first) if before is not None else None
    hit_at = None if struck is None else struck - began
    exits = [driver.wait(timeout)]
    done_at = time.monotonic() if exits[0] == 0 else None
    orphans = _orphans(first)
    left_running = len(campaign.runs(name, "RUNNING"))
    for attempt in "bc":  # the rerun; a second one only if the first also failed
        exits.append(campaign.driver(name, f"{name}-{attempt}").wait(timeout))
        if done_at is None and exits[-1] == 0:
            done_at = time.monotonic()
        orphans += _orphans(f"{name}-{attempt}")
        if exits[-1] == 0:
            break
    finished = campaign.runs(name, "FINISHED")
    per_cell = Counter(finished.values())
    lost = len(planned - set(per_cell)) + len(set(before or {}) - set(finished))
    return Outcome(
        fault, hit_at, len(before or {}), len(planned), lost,
        sum(n - 1 for n in per_cell.values()), left_running,
        len(campaign.runs(name, "RUNNING")),
        None if done_at is None or hit_at is None else done_at - began - hit_at,
        orphans, tuple(exits))


def _wait_for(campaign: Campaign, name: str, moment: Moment,
              driver: subprocess.Popen) -> dict[str, str] | None:
    """The FINISHED runs at the fault's moment; None if the driver ended before it."""
    while driver.poll() is None:
        with contextlib.suppress(Exception):  # a store not yet created or not answering
            if len(campaign.runs(name, "FINISHED")) >= moment.after_runs:
                break
        time.sleep(0.2)
    time.sleep(moment.delay)
    if driver.poll() is not None:
        return None
    return campaign.runs(name, "FINISHED")


def _orphans(marker: str) -> tuple[str, ...]:
    """Processes of an ended invocation still alive GRACE s on: named, then killed by pid."""
    deadline = time.monotonic() + GRACE
    while (left := marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = tuple(f"{program(p)}[{p}]" for p in left)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return names


# --- the campaign -------------------------------------------------------------------------------

@contextlib.contextmanager
def campaign_store(fault: str, store: str | None, folder: Path) -> Iterator[tuple[str, server.Server | None]]:
    """The store the drivers write to: the user's, a server the campaign owns (it restarts it),
    or a SQLite file of its own."""
    if fault == "server":
        with server.temporary() as srv:
            yield srv.url, srv
    elif store:
        yield store, None
    else:
        yield f"sqlite:///{folder / 'mlflow.db'}", None


def run(protocol: Path, overrides: list[str], fault: str, tries: int, seed: int, backend: str,
        store: str | None, lease_ttl: float,
        say: Callable[[str], None] = functools.partial(print, flush=True)) -> list[Outcome]:
    proto = schema.load(protocol, overrides)
    planned = {c.key for c in runner.runnable(proto, plan.expand(proto))[0]}
    logs = Path(tempfile.mkdtemp(prefix="study-chaos-"))
    say(f"# {fault} faults, {tries} tries, seed {seed}, backend {backend}, {proto.name}: "
        f"{len(planned)} cells; driver logs in {logs}")
    outcomes = []
    with campaign_store(fault, store, logs) as (uri, srv):
        campaign = Campaign(protocol, overrides, backend, uri, logs, lease_ttl, srv)
        try:
            for i, moment in enumerate(moments(seed, tries, len(planned)), 1):
                name = f"{proto.name}-chaos-{seed}-{fault}-{i}-{os.getpid()}"
                outcomes.append(one_try(campaign, fault, moment, name, planned))
                say(f"try {i:2}/{tries}  {outcomes[-1].line()}")
        finally:
            for process in campaign.started:
                if process.poll() is None:
                    process.kill()
                process.wait()
    say(summary(fault, outcomes))
    return outcomes


def summary(fault: str, outcomes: list[Outcome]) -> str:
    hit = [o for o in outcomes if o.hit_at is not None]
    times = [o.recovered_in for o in hit if o.recovered_in is not None]
    recovery = (f"; recovery median {statistics.median(times):.1f} s, max {max(times):.1f} s"
                if times else "")
    return (f"# {fault}: {len(hit)}/{len(outcomes)} hit; lost {sum(o.lost for o in outcomes)}, "
            f"duplicated {sum(o.duplicated for o in outcomes)}, "
            f"stuck {sum(o.stuck for o in outcomes)}, "
            f"orphans {sum(len(o.orphans) for o in outcomes)}{recovery}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.tools.chaos",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", type=Path)
    parser.add_argument("--fault", choices=sorted(FAULTS), required=True)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    parser.add_argument("--store", help="tracking URI (default: a SQLite store of the campaign's "
                        "own; --fault server always runs its own server)")
    parser.add_argument("--lease-ttl", type=float, default=8.0,
                        help="STUDY_LEASE_TTL of the drivers: how long a killed one blocks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a protocol value, as `study run --set`")
    args = parser.parse_args(argv)
    if args.fault == "server" and args.store:
        print("error: --fault server restarts a server the campaign starts itself: drop "
              f"--store {args.store}", file=sys.stderr)
        return 2
    if args.tries < 1:
        print(f"error: --tries {args.tries}: expected at least 1", file=sys.stderr)
        return 2
    try:
        outcomes = run(args.protocol, args.set, args.fault, args.tries, args.seed, args.backend,
                       args.store, args.lease_ttl)
    except (schema.ProtocolError, runner.RunnerError, server.ServerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    # SIGTERM too (a background job ignores Ctrl-C's SIGINT): through `finally`, so the drivers
    # and the server the campaign started are stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
