"""A fault campaign: run a study, hit it with one fault at a seeded random moment, rerun it to
completion, and judge the store. One line per try; exit 1 if any try lost, duplicated or stranded
a run, or left a process behind.

    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault driver
    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault worker --backend ray
    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault server
    python -m study.tools.chaos protocols/smoke.yaml --tries 10 --fault node --backend ray

Faults: `driver` (kill -9 of `python -m study run`), `worker` (kill -9 of one worker: the local
backend's worker process, or a Ray process running a `_serve` task), `server` (the MLflow
tracking server stopped and started again; the campaign runs its own PostgreSQL-backed server,
as `make server` does, since it must restart it), `node` (--backend ray only: the campaign starts
a head and two worker nodes on this machine, study/engine/ray_nodes.py, the drivers join it, and
every process of one worker node, raylet and workers, is kill -9ed while a run is RUNNING on it;
the node is started anew before the next try).

A try's moment: once a seeded number of runs have FINISHED (0 to planned - 2), a seeded delay
of 0-2 s. Lost: a planned cell without a FINISHED run at the end, or a run FINISHED before the
fault that no longer is. Duplicated: FINISHED runs beyond one per cell. Left RUNNING: runs the
faulted invocation left open (the rerun marks them KILLED and redoes their cells); stuck: runs
still RUNNING at the end. Orphans: processes of an invocation (found by a marker in their
environment) alive 10 s after it ended, and for `node` any process of the killed node alive
10 s after its kill and any Ray worker of the cluster still running a `_serve` task 10 s after
the last invocation; they are reported, then killed. In flight: runs RUNNING just before the
fault (for `node`: on the killed node) that never FINISHED. Recovery: from the fault to the end
of the last FINISHED run of the cells in flight, i.e. until the work the fault cut was done
again; with nothing in flight (a fault between two cells), to the end of the first invocation
that completed the study (a killed driver's lease runs out first: --lease-ttl).
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
from study.engine import ray_nodes
from study.protocol import plan, schema
from study.store import server, tracking

ROOT = Path(__file__).resolve().parents[2]
MARKER = "STUDY_CHAOS"  # in the environment of every process an invocation starts
GRACE = 10.0  # seconds an ended invocation's processes get to go before they count as orphans
# A frozen node's last messages reach the driver's store in this time; well under the 3 s in
# which the head's health checks give up on it (ray_nodes.FAST_HEALTH_CHECKS).
FREEZE = 0.3
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
class Strike:
    """A fault that hit: when, and what it hit."""

    at: float  # time.monotonic()
    wall: float  # time.time(): the clock of the runs' end times
    running: dict[str, str]  # run id -> cell of the runs RUNNING just before (`node`: on it)
    target: str = ""  # what a fault chose to hit, to print: "node a 3f2c9d1e0a12"
    node_id: str = ""  # the Ray node lost, which its driver must name
    killed: frozenset[int] = frozenset()  # pids it killed: none may outlive it


def struck(running: dict[str, tracking.Seen], **what) -> Strike:
    return Strike(time.monotonic(), time.time(),
                  {run_id: seen.cell for run_id, seen in running.items()}, **what)


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
    in_flight: int = 0  # runs RUNNING when it hit that never FINISHED: the work it cut
    target: str = ""  # Strike.target
    named: bool | None = None  # whether the driver named the lost node (None: nothing to name)
    per_node: tuple[tuple[str, int], ...] = ()  # FINISHED runs per Ray node, by name (`node`)

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated or stranded, the study completed, and a lost node named. A
        missed try (the study ended before its moment: under Ray the last cells run side by
        side) tested nothing but broke nothing: clean, and counted apart in the summary."""
        return not (self.lost or self.duplicated or self.stuck or self.orphans
                    or (self.hit_at is not None and self.recovered_in is None)
                    or self.named is False or self.exits[-1] != 0)

    def line(self) -> str:
        hit = ("missed (the study ended first)" if self.hit_at is None else
               f"hit {self.hit_at:5.1f} s ({self.finished_before}/{self.planned} finished, "
               f"{self.in_flight} in flight)")
        recovered = "never" if self.recovered_in is None else f"{self.recovered_in:.1f} s"
        orphans = ", ".join(self.orphans) or "0"
        named = {None: "", True: "  named by the driver", False: "  NOT named by the driver"}
        spread = ("  cells per node " + ", ".join(f"{node} {n}" for node, n in self.per_node)
                  if self.per_node else "")
        return (f"{' '.join(filter(None, [self.fault, self.target])):6}  {hit}  lost {self.lost}  "
                f"duplicated {self.duplicated}  left RUNNING {self.left_running}  "
                f"stuck {self.stuck}  recovered in {recovered}  orphans {orphans}  "
                f"exits {','.join(map(str, self.exits))}{named[self.named]}{spread}")


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
    nodes: ray_nodes.Nodes | None = None  # the cluster the drivers join (fault `node`)
    started: list[subprocess.Popen] = field(default_factory=list)

    def driver(self, name: str, marker: str) -> subprocess.Popen:
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri, "STUDY_LEASE_TTL": str(self.lease_ttl),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MARKER: marker, **(self.nodes.driver_env if self.nodes else {})}
        sets = [arg for s in [*self.overrides, f"name={name}"] for arg in ("--set", s)]
        join = ["--address", self.nodes.address] if self.nodes else []
        log = open(self.logs / f"{marker}.log", "wb")
        # Its own session: a Ctrl-C of the campaign reaches the campaign, not the drivers.
        process = subprocess.Popen(
            [sys.executable, "-m", "study", "run", str(self.protocol), "--backend", self.backend,
             *join, *sets], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.started.append(process)
        return process

    def runs(self, name: str, status: str) -> dict[str, tracking.Seen]:
        return tracking.runs_in(tracking.client(self.uri), name, status)

    def cells(self, name: str, status: str) -> dict[str, str]:
        """Run id -> cell key of the runs in `status`."""
        return {run_id: seen.cell for run_id, seen in self.runs(name, status).items()}


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

def kill_driver(campaign: Campaign, driver: subprocess.Popen, marker: str,
                name: str) -> Strike | None:
    running = campaign.runs(name, "RUNNING")
    driver.send_signal(signal.SIGKILL)
    return struck(running)


def kill_worker(campaign: Campaign, driver: subprocess.Popen, marker: str,
                name: str) -> Strike | None:
    """SIGKILL one process training a chunk (the lowest pid), waiting for one to exist."""
    kind = WORKERS[campaign.backend]
    while driver.poll() is None:
        if pids := sorted(p for p in marked(marker) if kind in command_of(p)):
            running = campaign.runs(name, "RUNNING")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGKILL)
            return struck(running)
        time.sleep(0.05)
    return None


def restart_server(campaign: Campaign, driver: subprocess.Popen, marker: str,
                   name: str) -> Strike | None:
    strike = struck(campaign.runs(name, "RUNNING"))
    campaign.server.mlflow.stop()
    time.sleep(2)  # down long enough for writes to fail, not just to queue
    campaign.server.mlflow.start()
    return strike


def kill_node(campaign: Campaign, driver: subprocess.Popen, marker: str,
              name: str) -> Strike | None:
    return hit_a_node(campaign.nodes, functools.partial(campaign.runs, name, "RUNNING"),
                      lambda: driver.poll() is None)


def hit_a_node(nodes: ray_nodes.Nodes, running: Callable[[], dict[str, tracking.Seen]],
               going: Callable[[], bool]) -> Strike | None:
    """SIGKILL every process of the first worker node (by name) found with a RUNNING run of the
    study, waiting for one while `going()`: the fault hits work in flight, never an idle node.
    The node is frozen (SIGSTOP) and its runs read again before the kill, so that a run that
    finished in between is not counted in flight; if none is left, it runs on and we wait on."""
    ids = {nodes.node_id(node): node for node in nodes.workers}
    while going():
        if on := sorted((ids[r.node], r.node) for r in _quietly(running).values() if r.node in ids):
            node, node_id = on[0]
            nodes.freeze(node)
            time.sleep(FREEZE)
            if there := {run_id: r for run_id, r in _quietly(running).items() if r.node == node_id}:
                killed = nodes.kill(node)
                return struck(there, target=f"{node} {node_id[:12]}", node_id=node_id,
                              killed=frozenset(killed))
            nodes.thaw(node)
        time.sleep(0.1)
    return None


def _quietly(running: Callable[[], dict[str, tracking.Seen]]) -> dict[str, tracking.Seen]:
    """The runs, or none while the store is not there or not answering."""
    with contextlib.suppress(Exception):
        return running()
    return {}


# Each returns what it struck, or None if the study ended first.
FAULTS: dict[str, Callable[[Campaign, subprocess.Popen, str, str], Strike | None]] = {
    "driver": kill_driver, "worker": kill_worker, "server": restart_server, "node": kill_node}


# --- one try ------------------------------------------------------------------------------------

def one_try(campaign: Campaign, fault: str, moment: Moment, name: str, planned: set[str],
            timeout: float = 1800) -> Outcome:
    first = f"{name}-a"
    nodes = campaign.nodes
    where = {nodes.node_id(node): node for node in nodes.starts} if nodes else {}
    driver = campaign.driver(name, first)
    began = time.monotonic()
    before = _wait_for(campaign, name, moment, driver)
    strike = FAULTS[fault](campaign, driver, first, name) if before is not None else None
    if strike is not None:  # a fault may wait past its moment (`node`: for a run on a node)
        before = {run_id: seen for run_id, seen in _quietly(
            functools.partial(campaign.runs, name, "FINISHED")).items()
            if seen.ended is not None and seen.ended <= strike.wall} or before
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
    per_cell = Counter(r.cell for r in finished.values())
    lost = len(planned - set(per_cell)) + len(set(before or {}) - set(finished))
    named = None
    if nodes:  # Ray workers still training for the study's ended drivers, on any node
        orphans += _reap(lambda: sorted(p for node in nodes.starts for p in nodes.serving(node)))
    if strike and strike.node_id:
        orphans += _survivors(strike.killed)
        named = _named(campaign.logs / f"{first}.log", strike.node_id)
        campaign.nodes.add(strike.target.split()[0])  # the next try finds the cluster whole
    cut = {} if strike is None else {run_id: cell for run_id, cell in strike.running.items()
                                      if run_id not in finished}
    return Outcome(
        fault, None if strike is None else strike.at - began, len(before or {}), len(planned),
        lost, sum(n - 1 for n in per_cell.values()), left_running,
        len(campaign.runs(name, "RUNNING")),
        recovery_time(strike, cut, finished, done_at), orphans, tuple(exits), len(cut),
        "" if strike is None else strike.target, named,
        tuple(sorted(Counter(where.get(r.node, "?") for r in finished.values()).items())
              if where else ()))


def recovery_time(strike: Strike | None, cut: dict[str, str], finished: dict[str, tracking.Seen],
              done_at: float | None) -> float | None:
    """Seconds from the fault until the cells it cut (run id -> cell) had FINISHED again, the
    last of them; with none cut, until an invocation completed the study (`done_at`,
    monotonic). None: never."""
    if strike is None:
        return None
    if not cut:
        return None if done_at is None else done_at - strike.at
    ends = {r.cell: r.ended for r in finished.values() if r.ended is not None}
    if not set(cut.values()) <= set(ends):
        return None
    return max(ends[cell] for cell in cut.values()) - strike.wall


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
    return campaign.cells(name, "FINISHED")


def _named(log: Path, node_id: str) -> bool:
    """Whether the driver said, in one line of its output, that the node was lost."""
    return any(node_id in line and " lost: " in line
               for line in log.read_text(errors="replace").splitlines())


def _survivors(killed: frozenset[int]) -> tuple[str, ...]:
    """Processes of a killed node still alive GRACE s after: named, then killed."""
    return _reap(lambda: sorted(ray_nodes.alive(set(killed))))


def _orphans(marker: str) -> tuple[str, ...]:
    """Processes of an ended invocation still alive GRACE s on: named, then killed by pid."""
    return _reap(lambda: marked(marker))


def _reap(find: Callable[[], list[int]]) -> tuple[str, ...]:
    """The processes `find` still lists GRACE s on: named, then killed by pid."""
    deadline = time.monotonic() + GRACE
    while (left := find()) and time.monotonic() < deadline:
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


@contextlib.contextmanager
def campaign_nodes(fault: str) -> Iterator[ray_nodes.Nodes | None]:
    """For `node`, a head and two worker nodes on this machine, which the drivers join."""
    if fault != "node":
        yield None
        return
    with ray_nodes.cluster({"a": {}, "b": {}}) as nodes:
        yield nodes


def run(protocol: Path, overrides: list[str], fault: str, tries: int, seed: int, backend: str,
        store: str | None, lease_ttl: float,
        say: Callable[[str], None] = functools.partial(print, flush=True)) -> list[Outcome]:
    proto = schema.load(protocol, overrides)
    planned = {c.key for c in runner.runnable(proto, plan.expand(proto))[0]}
    logs = Path(tempfile.mkdtemp(prefix="study-chaos-"))
    say(f"# {fault} faults, {tries} tries, seed {seed}, backend {backend}, {proto.name}: "
        f"{len(planned)} cells; driver logs in {logs}")
    outcomes = []
    with campaign_store(fault, store, logs) as (uri, srv), campaign_nodes(fault) as nodes:
        campaign = Campaign(protocol, overrides, backend, uri, logs, lease_ttl, srv, nodes)
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
    said = [o.named for o in hit if o.named is not None]
    named = f", lost node named {sum(said)}/{len(said)}" if said else ""
    recovery = (f"; recovery median {statistics.median(times):.1f} s, max {max(times):.1f} s"
                if times else "")
    return (f"# {fault}: {len(hit)}/{len(outcomes)} hit; lost {sum(o.lost for o in outcomes)}, "
            f"duplicated {sum(o.duplicated for o in outcomes)}, "
            f"stuck {sum(o.stuck for o in outcomes)}, "
            f"orphans {sum(len(o.orphans) for o in outcomes)}, "
            f"in flight {sum(o.in_flight for o in outcomes)}{named}{recovery}")


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
    if args.fault == "node" and args.backend != "ray":
        print(f"error: --fault node loses a Ray node: use --backend ray, not --backend "
              f"{args.backend}", file=sys.stderr)
        return 2
    if args.tries < 1:
        print(f"error: --tries {args.tries}: expected at least 1", file=sys.stderr)
        return 2
    try:
        outcomes = run(args.protocol, args.set, args.fault, args.tries, args.seed, args.backend,
                       args.store, args.lease_ttl)
    except (schema.ProtocolError, runner.RunnerError, server.ServerError, ray_nodes.NodeError,
            OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    # SIGTERM too (a background job ignores Ctrl-C's SIGINT): through `finally`, so the drivers
    # and the server the campaign started are stopped with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
