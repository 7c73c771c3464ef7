"""Golden hashes: the `portable` promise across machines.

    python -m pytest -k golden                 # this test alone
    python -m tests.test_golden --write        # record tests/golden/portable.json on this machine

`portable` promises the same weights on any x86-64 CPU with AVX2, with the same torch. The
golden file holds the weight hashes of a few small cells (on the generated data of conftest,
the same bytes everywhere), recorded with the environment that produced them. Every machine
that runs `make test` re-trains them in a fresh worker: a CI run on a new CPU is a cross-machine
test. Outside the promise (no AVX2, another torch) the test is skipped and says why.
"""

from __future__ import annotations

import json
import platform
import sys

import pytest

from study.engine import environment
from tests.conftest import GOLDEN

PROMISED_ISAS = ("avx2", "avx512")


def outside_promise(recorded: dict[str, str]) -> str | None:
    """Why this machine is outside the portable promise, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"portable promises x86-64 with AVX2; this machine is {platform.machine()}"
    if environment.cpu_isa() not in PROMISED_ISAS:
        return f"portable promises CPUs with AVX2; this CPU's widest ISA is {environment.cpu_isa()}"
    torch_now = environment.describe("cpu")["torch_version"]
    if torch_now != recorded["torch_version"]:
        return (f"portable promises the same torch; golden hashes are of torch "
                f"{recorded['torch_version']}, this is {torch_now}")
    return None


def test_golden_portable_hashes_are_reproduced(trained_in_worker, tiny_files):
    golden = json.loads(GOLDEN.read_text())
    _, checksums = tiny_files
    # Not arithmetic: the generated data changed, and the golden file must be re-recorded.
    assert checksums == golden["data_md5"], "tests/conftest.make_idx_dir changed its bytes"
    if why := outside_promise(golden["environment"]):
        pytest.skip(why)
    present = trained_in_worker("portable", golden["protocol"]["threads"])
    got = {r.cell.key: r.weights_sha256 for r in present.results}
    want = {key: cell["weights_sha256"] for key, cell in golden["cells"].items()}
    assert got.keys() == want.keys(), "the golden protocol no longer expands to the same cells"
    wrong = [golden["cells"][k]["name"] for k in want if got[k] != want[k]]
    if wrong:
        diff = environment.differences(golden["environment"], present.environment)
        pytest.fail(f"portable hashes differ for {wrong}; environment recorded -> present: "
                    f"{'; '.join(diff) or 'no recorded key differs'}", pytrace=False)


def write(path=GOLDEN) -> None:
    """Record the golden hashes on this machine (the data is conftest's tiny generated set)."""
    import functools
    import tempfile
    from pathlib import Path

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
    env = {k: trained.environment[k] for k in environment.BITS_KEYS}
    cells = {r.cell.key: {"name": r.cell.name, "weights_sha256": r.weights_sha256}
             for r in trained.results}
    about = ("Weight hashes of the portable cells below on tests/conftest.make_idx_dir(600, 200, "
             "seed 0), with the environment that produced them. Regenerate: "
             "python -m tests.test_golden --write")
    path.write_text(json.dumps({"about": about, "protocol": raw, "data_md5": checksums,
                                "environment": env, "cells": cells}, indent=1) + "\n")
    print(f"wrote {path}: {len(cells)} cells on {env['cpu_model']} ({env['cpu_isa']})")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden --write")
    write()
