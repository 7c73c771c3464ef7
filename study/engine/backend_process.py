"""The `process` backend: each group trains in a fresh Python process started with its mode's
environment, and streams its messages back over a socket pair.

    python -m study run protocols/smoke.yaml     # the runner's default backend

A subprocess rather than multiprocessing's spawn: the environment is given to the new process
explicitly, at exec, so it is in place before anything in the worker imports torch, and the
worker never re-imports the driver's `__main__` (the CLI, MLflow).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection

from study.engine.workers import Group, Message, WorkerError, serve


@dataclass(frozen=True)
class Failed:
    """The worker raised: the exception itself when it pickles, and its traceback as text."""

    error: BaseException
    traceback: str


@dataclass(frozen=True)
class Done:
    """Every cell of the group was sent."""


def has_device(device: str) -> bool:
    """The workers run on this machine: what its torch sees."""
    import torch  # here: a CPU-only plan never needs it

    return device == "cpu" or torch.cuda.is_available()


def run(group: Group) -> Iterator[Message]:
    """Start a worker for `group`, yield its messages as they come, re-raise what it raised.

    Closing the iterator early (an error or Ctrl-C in the driver) kills the worker: it holds
    no state worth keeping, and its cells in flight are redone on the next run.
    """
    ours, theirs = Pipe(duplex=True)
    proc = subprocess.Popen([sys.executable, "-m", "study.engine.backend_process",
                             str(theirs.fileno()), str(os.getpid())],
                            env=_environ(group), pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        # sys.path first, so the worker can unpickle a loader defined where the driver can see.
        ours.send(sys.path)
        ours.send(group)
        while True:
            message = _receive(ours, proc, group)
            if isinstance(message, Done):
                return
            if isinstance(message, Failed):
                message.error.add_note(f"in the worker for {group.name}:\n{message.traceback}")
                raise message.error
            yield message
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _environ(group: Group) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in group.env().items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _receive(conn: Connection, proc: subprocess.Popen, group: Group) -> Message | Failed | Done:
    try:
        return conn.recv()
    except (EOFError, ConnectionResetError):
        code = proc.wait()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise WorkerError(f"the worker for {group.name} died ({how}); cells it was training "
                          "are lost and will be redone on the next run") from None


# --- the worker process ---------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with(driver: int) -> None:
    """SIGKILL this worker when its driver dies (Linux). A driver killed with -9 cannot stop
    its worker, which would train on, unheard, until its next message fails (at the end of a
    cell or of a batched epoch), holding the cores its rerun needs."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver:  # it died before the line above: no signal will come
        os._exit(1)


def main(fd: int, driver: int) -> int:
    # Ctrl-C reaches the whole process group; the driver decides, and kills this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(driver)
    conn = Connection(fd)
    sys.path[:] = conn.recv()
    group = conn.recv()
    try:
        for message in serve(group):
            conn.send(message)
    except Exception as err:  # noqa: BLE001 - every failure goes back to the driver
        conn.send(Failed(_picklable(err), traceback.format_exc()))
        return 1
    conn.send(Done())
    return 0


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - whatever stops it from pickling
        return RuntimeError(f"{type(err).__name__}: {err}")


if __name__ == "__main__":
    # Through the module's own name: messages pickled here must name `study.engine.backend_process`,
    # not `__main__`, for the driver to read them.
    from study.engine.backend_process import main as _main
    sys.exit(_main(int(sys.argv[1]), int(sys.argv[2])))
