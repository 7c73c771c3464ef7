"""Golden hashes: the `portable` promise across machines.

    python -m pytest -k golden                            # these tests alone
    python -m tests.test_golden --write tests/golden/portable-openblas.json   # re-record one file

`portable` promises the same weights on any x86-64 CPU with AVX2, with the same torch. Each
golden file holds the weight hashes of a few small cells (on the generated data of conftest, the
same bytes everywhere), recorded with the environment that produced them and the protocol that
plans them. Every machine that runs `make test` re-trains them in a fresh worker: a CI run on a
new CPU is a cross-machine test. Outside the promise (no AVX2, another torch) a test is skipped
and says why.

- portable-openblas.json: today's portable, GEMMs on OpenBLAS's Haswell kernels (sequential);
- portable-openblas-batched.json: the same cells on the batched engine (`make study`'s);
- portable.json: the same cells on torch's kernels (MKL_CBWR=COMPATIBLE), recorded before the
  OpenBLAS path existed (AMD EPYC, 2026-12) and reproduced then on an Intel AVX-512 Xeon: old
  runs keep their keys and bits (`kernels: torch`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from study.engine import environment
from study.tools.golden import outside_promise
from tests.conftest import GOLDEN_DIR

FILES = sorted(GOLDEN_DIR.glob("portable*.json"))


def kernels_of(raw: dict) -> str:
    return raw.get("kernels", "openblas-haswell")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_portable_hashes_are_reproduced(path, trained_protocol, tiny_files):
    golden = json.loads(path.read_text())
    _, checksums = tiny_files
    # Not arithmetic: the generated data changed, and the golden file must be re-recorded.
    assert checksums == golden["data_md5"], "tests/conftest.make_idx_dir changed its bytes"
    if why := outside_promise(golden["environment"]):
        pytest.skip(why)
    present = trained_protocol(golden["protocol"])
    assert {r.kernels for r in present.results} == {kernels_of(golden["protocol"])}
    got = {r.cell.key: r.weights_sha256 for r in present.results}
    want = {key: cell["weights_sha256"] for key, cell in golden["cells"].items()}
    assert got.keys() == want.keys(), "the golden protocol no longer expands to the same cells"
    wrong = [golden["cells"][k]["name"] for k in want if got[k] != want[k]]
    if wrong:
        keys = environment.bits_keys(kernels_of(golden["protocol"]))
        diff = environment.differences(golden["environment"], present.environment, keys)
        pytest.fail(f"{path.name}: portable hashes differ for {wrong}; environment recorded -> "
                    f"present: {'; '.join(diff) or 'no recorded key differs'}", pytrace=False)


def test_the_golden_files_cover_both_engines_and_both_kernel_paths():
    protocols = [json.loads(p.read_text())["protocol"] for p in FILES]
    assert {(p.get("execution", "sequential"), kernels_of(p)) for p in protocols} >= {
        ("sequential", "openblas-haswell"), ("batched", "openblas-haswell"),
        ("sequential", "torch")}


def write(path: Path) -> None:
    """Record `path`'s golden hashes on this machine, from its own protocol (the data is
    conftest's tiny generated set)."""
    import functools
    import tempfile

    from study.engine import data, workers
    from study.protocol import plan, schema as protocol
    from tests.conftest import make_idx_dir

    raw = json.loads(path.read_text())["protocol"]
    proto = protocol.parse(raw)
    folder = Path(tempfile.mkdtemp())
    checksums = make_idx_dir(folder / "idx", n_train=600, n_test=200)
    load = functools.partial(data.load, folder / "idx", cache=folder / "cache", checksums=checksums)
    (group,) = workers.groups(plan.expand(proto), load)
    trained = workers.trained(group)
    env = {k: trained.environment[k] for k in environment.bits_keys(proto.kernels)}
    cells = {r.cell.key: {"name": r.cell.name, "weights_sha256": r.weights_sha256}
             for r in trained.results}
    about = ("Weight hashes of the portable cells below on tests/conftest.make_idx_dir(600, 200, "
             "seed 0), with the environment that produced them. Regenerate: "
             f"python -m tests.test_golden --write tests/golden/{path.name}")
    path.write_text(json.dumps({"about": about, "protocol": raw, "data_md5": checksums,
                                "environment": env, "cells": cells}, indent=1) + "\n")
    print(f"wrote {path}: {len(cells)} cells on {env['cpu_model']} ({env['cpu_isa']})")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--write":
        sys.exit("usage: python -m tests.test_golden --write tests/golden/FILE.json ...")
    for name in sys.argv[2:]:
        write(Path(name))
