"""`study verify`: re-train recorded cells in workers, compare, log one verify run."""

import functools
from dataclasses import replace

import pytest

from study.engine import data
from study.protocol import schema as protocol
from study import runner
from study.store import tracking
from study.tools import verify
from tests.test_runner import PROTO, store  # noqa: F401 - the store fixture


@pytest.fixture
def loader(tiny_files, tmp_path):
    folder, checksums = tiny_files
    return functools.partial(data.load, folder, cache=tmp_path / "cache", checksums=checksums)


def test_verify_reproduces_strict_cells_and_flags_a_broken_promise(store, loader):
    proto = protocol.parse({**PROTO, "dropout": [[0.0, 0.0], [0.5, 0.5]], "seeds": {"count": 1},
                            "determinism": ["strict"], "threads": 1})
    runner.run(proto, load=loader, progress=False)
    done = verify.verify("e2e", n=None, load=loader)
    assert len(done.checks) == 2 and all(c.identical and not c.differing for c in done.checks)
    assert done.ok and done.lines()[-1].startswith("2 of 2 cells identical")

    # The verify run is logged, and neither resume nor analysis takes it for a training run.
    exp = store.get_experiment_by_name("e2e").experiment_id
    assert tracking.latest_verify(store, exp)["n_identical"] == "2"
    assert len(tracking.finished_keys(store, exp)) == 2
    assert len(tracking.load_runs(store, "e2e").runs) == 2

    # A recorded hash this machine cannot reproduce, with every key equal: strict's promise broken.
    victim = next(r for r in tracking.recorded_runs(store, exp) if r.name.startswith("p0.5-0.5"))
    store.set_tag(victim.run_id, "study.weights_sha256", "0" * 64)
    again = verify.verify("e2e", n=None, load=loader)
    (bad,) = [c for c in again.checks if not c.identical]
    assert bad.broken and not again.ok
    assert "NOT REPRODUCED" in bad.line() and "no recorded key differs" in bad.line()
    # Reported, not failed: a mode that promises nothing, or a machine whose keys differ.
    assert not replace(bad, recorded=replace(bad.recorded, mode="default")).broken
    other = replace(bad, differing=("cpu_isa: avx512 -> avx2",))
    assert not other.broken and "cpu_isa: avx512 -> avx2" in other.line()


def test_sample_is_seeded_and_bounded():
    runs = [tracking.Recorded(str(i), f"r{i}", f"k{i:02d}", "default", "", {}) for i in range(10)]
    assert verify.sample(runs, 3, seed=0) == verify.sample(list(reversed(runs)), 3, seed=0)
    assert verify.sample(runs, 3, seed=0) != verify.sample(runs, 3, seed=1)
    assert len(verify.sample(runs, None, seed=0)) == 10 == len(verify.sample(runs, 99, seed=0))
