"""Loaders that run inside a worker process and make its Nth training fail there: the
cross-process stand-in for monkeypatching `train`, which a fresh worker would not see."""

from __future__ import annotations

import itertools
import os
import signal
import time

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


def counting(log, folder, cache, checksums) -> data.Dataset:
    """Load the tiny data and append this process's pid to `log`: one line per load, a count
    the test reads across processes."""
    with open(log, "a") as out:
        out.write(f"{os.getpid()}\n")
    return data.load(folder, cache=cache, checksums=checksums)


def asleep(ready, seconds: float) -> data.Dataset:
    """Never load: write `ready` (the worker is past its start-up), then sleep."""
    with open(ready, "w") as out:
        out.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    raise RuntimeError(f"slept {seconds} s")
