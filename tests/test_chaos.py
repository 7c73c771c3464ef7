"""The fault campaign (`python -m study.tools.chaos`): its seeded moments and verdicts, then a
short campaign against real parts, one try of each fault at fixed moments, that fails on any
loss, duplicate, stuck run or process left behind."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import pytest

from study.store import server, tracking
from study.tools import chaos


def test_moments_follow_the_seed_and_stay_inside_the_study():
    a = chaos.moments(seed=3, tries=50, planned=6)
    assert a == chaos.moments(seed=3, tries=50, planned=6)
    assert a != chaos.moments(seed=4, tries=50, planned=6)
    # At most planned - 2 runs finished: at least one cell is still to train when it hits.
    assert {m.after_runs for m in a} == {0, 1, 2, 3, 4}
    assert all(0 <= m.delay <= 2 for m in a)
    assert {m.after_runs for m in chaos.moments(0, 5, planned=1)} == {0}


CLEAN = chaos.Outcome("driver", 3.0, 2, 4, lost=0, duplicated=0, left_running=1, stuck=0,
                      recovered_in=9.5, orphans=(), exits=(-9, 0))


@pytest.mark.parametrize("change", [{"lost": 1}, {"duplicated": 1}, {"stuck": 1},
                                    {"orphans": ("raylet[42]",)}, {"recovered_in": None},
                                    {"exits": (-9, 2, 2)}, {"named": False}])
def test_any_loss_duplicate_stuck_run_orphan_or_no_recovery_fails_a_try(change):
    assert CLEAN.clean  # a run left RUNNING by the fault is expected: the rerun redoes it
    assert not dataclasses.replace(CLEAN, **change).clean


def test_a_try_line_names_what_the_campaign_judges():
    line = dataclasses.replace(CLEAN, orphans=("raylet[42]",), in_flight=1).line()
    for part in ("driver", "hit   3.0 s (2/4 finished, 1 in flight)", "lost 0", "duplicated 0",
                 "left RUNNING 1", "stuck 0", "recovered in 9.5 s", "orphans raylet[42]",
                 "exits -9,0"):
        assert part in line, line
    node = dataclasses.replace(CLEAN, fault="node", target="a 3f2c9d1e0a12", named=True,
                               per_node=(("a", 1), ("b", 2), ("head", 3))).line()
    assert node.startswith("node a 3f2c9d1e0a12  hit"), node
    assert node.endswith("named by the driver  cells per node a 1, b 2, head 3"), node
    assert "NOT named" in dataclasses.replace(CLEAN, named=False).line()
    missed = dataclasses.replace(CLEAN, hit_at=None, recovered_in=None, exits=(0, 0))
    assert "missed (the study ended first)" in missed.line()
    assert missed.clean  # tested nothing, broke nothing; the summary counts it apart


def test_recovery_runs_until_the_work_in_flight_is_done_again():
    strike = chaos.Strike(at=50.0, wall=1000.0, running={"r1": "c1", "r2": "c2"})
    seen = {"r3": tracking.Seen("c1", "n", 1004.5), "r4": tracking.Seen("c2", "n", 1002.0),
            "r5": tracking.Seen("c3", "n", 1009.0)}
    # The last of the cells cut, not the first run to finish, nor the study's end.
    assert chaos.recovery_time(strike, {"r1": "c1", "r2": "c2"}, seen, done_at=70.0) == 4.5
    assert chaos.recovery_time(strike, {"r2": "c2"}, seen, done_at=70.0) == 2.0
    # Nothing cut (a fault between two cells): until an invocation completed the study.
    assert chaos.recovery_time(strike, {}, seen, done_at=70.0) == 20.0
    assert chaos.recovery_time(strike, {}, seen, done_at=None) is None
    # A cell cut and never trained again: no recovery.
    assert chaos.recovery_time(strike, {"r9": "c9"}, seen, done_at=70.0) is None
    assert chaos.recovery_time(None, {}, seen, done_at=70.0) is None


def test_bad_arguments_are_one_line_errors(capsys, tmp_path):
    assert chaos.main(["protocols/smoke.yaml", "--fault", "server", "--store",
                       "http://127.0.0.1:5000"]) == 2
    assert capsys.readouterr().err.startswith("error: --fault server restarts")
    assert chaos.main(["protocols/smoke.yaml", "--fault", "node"]) == 2
    assert capsys.readouterr().err == ("error: --fault node loses a Ray node: use --backend ray, "
                                       "not --backend local\n")
    assert chaos.main(["protocols/smoke.yaml", "--fault", "driver", "--tries", "0"]) == 2
    assert capsys.readouterr().err == "error: --tries 0: expected at least 1\n"
    assert chaos.main([str(tmp_path / "none.yaml"), "--fault", "driver"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.yaml" in err and err.count("\n") == 1


TINY = """name: chaos-tiny
model: {arch: mlp, hidden: [64, 64], init_std: 0.01}
training: {epochs: 2, batch_size: 128, lr: 0.5}
data: {dataset: fashion-mnist, train_subset: 2000}
dropout: [[0.0, 0.0], [0.5, 0.5]]
seeds: {count: 3, start: 0}
baseline: [0.5, 0.5]
"""


@pytest.mark.integration
@pytest.mark.usefixtures("real_data")
@pytest.mark.parametrize("fault, backend", [("driver", "local"), ("worker", "local"),
                                            ("worker", "ray"), ("server", "local"),
                                            ("node", "ray")])
def test_a_short_campaign_loses_duplicates_and_strands_nothing(fault, backend, tmp_path):
    if fault == "server":
        try:
            server.pg_bin()
        except server.ServerError as err:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI=true but {err}")
            pytest.skip(str(err))
    if backend == "ray":
        pytest.importorskip("ray")
    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY)
    lines: list[str] = []
    # Seed 4: once 1 run is FINISHED, +0.61 s. A worker or node fault takes seed 2 (0 runs,
    # +0.18 s: the first worker that trains; a node fault then waits for a run on a worker
    # node): on a quiet machine these cells take a fraction of a second, and under Ray they
    # train side by side while the driver logs them behind, so a later moment can find no
    # worker left.
    seed = 2 if fault in ("worker", "node") else 4
    # lease_ttl 20: a holder stops itself after TTL/4 without a heartbeat landing; at 6 (1.5 s)
    # a loaded CI machine's slow beats to the server stopped the first driver before the
    # fault's moment (exit 2, "no heartbeat ... for 2 s"), and the rerun finished the study.
    outcomes = chaos.run(proto, [], fault, tries=1, seed=seed, backend=backend, store=None,
                         lease_ttl=20, say=lines.append)
    report = "\n".join(lines)
    (outcome,) = outcomes
    assert outcome.hit_at is not None, report  # the fixed moment lands inside the study
    assert outcome.clean, report
    assert outcome.exits[-1] == 0 and outcome.planned == 6, report
    if fault == "node":  # the kill cut a run, the driver named the node, cells spread: the
        # struck node trained (its run in flight) and another finished runs
        struck = outcome.target.split()[0]
        assert outcome.in_flight >= 1 and outcome.named, report
        assert {struck, *dict(outcome.per_node)} >= {"a", "b"}, report
        assert set(dict(outcome.per_node)) - {struck}, report
        assert outcome.recovered_in is not None and outcome.recovered_in > 0, report


# A driver whose one worker never answers: its loader sleeps for ten minutes.
_SILENT_DRIVER = """
import functools, sys
from study.engine import backend_process, workers
from study.protocol import plan, schema
from tests import worker_hooks
proto = schema.parse({"name": "silent", "dropout": [[0.0, 0.0]], "seeds": {"count": 1},
                      "baseline": [0.0, 0.0]})
(group,) = workers.groups(plan.expand(proto), functools.partial(worker_hooks.asleep, sys.argv[1], 600))
for message in backend_process.run(group):
    pass
"""


@pytest.mark.integration
def test_a_local_worker_dies_with_its_killed_driver(tmp_path):
    marker, ready = f"silent-{os.getpid()}-{time.monotonic_ns()}", tmp_path / "ready"
    driver = subprocess.Popen([sys.executable, "-c", _SILENT_DRIVER, str(ready)], cwd=chaos.ROOT,
                              env={**os.environ, "PYTHONPATH": str(chaos.ROOT),
                                   chaos.MARKER: marker})
    try:
        # Killed once the worker is past its start-up (imports: seconds on a busy machine), as
        # a worker is for nearly all of its life; one killed before dies once its imports end.
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert time.monotonic() < deadline and driver.poll() is None, "no worker started"
            time.sleep(0.1)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while (left := chaos.marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"worker {left} outlived its driver {driver.pid}"
    finally:
        driver.kill()
        for pid in chaos.marked(marker):
            os.kill(pid, signal.SIGKILL)
