"""Loaders that run inside a worker process and make its Nth training fail there: the
cross-process stand-in for monkeypatching `train`, which a fresh worker would not see."""

from __future__ import annotations

import itertools
import os
import signal

from study.engine import data, workers


def failing_on(n: int, how: str, folder, cache, checksums) -> data.Dataset:
    """Load the tiny data; make the worker's `n`th training raise ("raise") or SIGKILL ("kill")."""
    real, calls = workers.train, itertools.count(1)

    def flaky(cell, ds):
        if next(calls) == n:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("boom")
        return real(cell, ds)

    workers.train = flaky
    return data.load(folder, cache=cache, checksums=checksums)
