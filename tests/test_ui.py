"""The MLflow UI, opened in a real browser on a small smoke study, as `make ui` serves it.

    .venv/bin/python -m pytest -m browser -q

Headless Chromium from Debian (`apt-get install chromium`; `make setup` and `.ci/run` install
it), driven by Playwright; Playwright's own browser download is not used. Without the browser
the test skips, except under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import functools

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from study import cli, runner
from study.engine import data
from study.protocol import plan, schema as protocol
from study.store import tracking
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "protocols" / "smoke.yaml"
SCREENSHOTS = ROOT / "reports" / "ui"
# Small enough to train in seconds on the tiny IDX files; three seeds give the analysis a spread.
OVERRIDES = ["data.train_subset=500", "training.epochs=2", "training.batch_size=100", "analysis.bootstrap=200"]
# The MLflow server answers in ~30 s on an idle 2-core machine, longer while other suites share
# it; the wait ends early if the server exits.
SERVER_START_S = 180
PAGE_TIMEOUT_MS = 60_000

pytestmark = pytest.mark.browser


@dataclass(frozen=True)
class Study:
    experiment_id: str
    run_names: list[str]
    store_uri: str


@dataclass(frozen=True)
class Server:
    link: str
    process: subprocess.Popen


def chromium() -> str:
    """Debian's Chromium and Playwright, or a skip (a failure under CI=true)."""
    path = os.environ.get("STUDY_CHROMIUM") or shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = ("the browser test needs Debian's chromium and the playwright package: "
               "`make setup` as root installs both")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_files) -> Iterator[Study]:
    """A smoke study (runs and its `analysis` run with the report) in a temporary store."""
    tmp = tmp_path_factory.mktemp("ui-store")
    folder, checksums = tiny_files
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking, "STORE_DIR", tmp)
        mp.setattr(cli, "REPORTS", tmp / "reports")
        proto = protocol.load(SMOKE, OVERRIDES)
        # Workers load the data themselves, so the loader must pickle: a partial, not a lambda.
        summary = runner.run(proto, progress=False, load=functools.partial(
            data.load, folder, cache=tmp / "cache", checksums=checksums))
        assert cli.main(["report", str(SMOKE), *(f"--set={o}" for o in OVERRIDES)]) == 0
        yield Study(summary.experiment_id, [c.name for c in plan.expand(proto)], uri)


def _session_processes(sid: int) -> list[int]:
    """Every live process of session `sid`: the server and whatever it spawned."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory) -> Iterator[Server]:
    """`python -m study ui` (what `make ui` runs) on a free port, stopped with all it spawned."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": study.store_uri}
    log = tmp_path_factory.mktemp("ui-server") / "server.log"
    # Its own session, so that the server's workers are stopped with it and none outlives us.
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "study", "ui", str(SMOKE), "--port", str(port)], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=sink, text=True, start_new_session=True)
    try:
        first = process.stdout.readline()
        link = first.rsplit(" ", 1)[-1].strip()
        _wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
        yield Server(link, process)
    finally:
        _stop(process)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    # Straight to 127.0.0.1: a machine's http_proxy must not stand between us and the server.
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the MLflow server exited with status {process.returncode}:\n"
                        f"{log.read_text()[-3000:]}")
        try:
            with direct.open(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the MLflow server did not answer {url} within {SERVER_START_S} s:\n"
                f"{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    sid = process.pid
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if not _session_processes(sid):
            break
        for pid in _session_processes(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_processes(sid) and time.monotonic() < deadline:
            process.poll()  # reap the server itself, so it does not linger as a zombie
            time.sleep(0.2)
    process.wait(timeout=10)
    assert not _session_processes(sid), "a process started by the UI test outlived it"


def test_runs_table_lists_the_runs_and_the_report_is_an_artifact(study: Study, server: Server):
    path = chromium()
    from playwright.sync_api import expect, sync_playwright

    assert server.link.endswith(f"#/experiments/{study.experiment_id}/runs"), server.link
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # --no-sandbox: Chromium refuses to run as root with its sandbox (CI runs as root).
        browser = pw.chromium.launch(executable_path=path,
                                     args=["--no-sandbox", "--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            expect.set_options(timeout=PAGE_TIMEOUT_MS)
            page.goto(server.link)
            try:
                for name in [*study.run_names, "analysis"]:
                    expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
                # The assistant panel opens on a first visit and hides half of the table.
                page.get_by_role("button", name="Close").click()
                page.screenshot(path=SCREENSHOTS / "runs.png")

                page.get_by_role("link", name="analysis", exact=True).click()
                page.get_by_role("tab", name="Artifacts").click()
                expect(page.get_by_text("report.pdf", exact=True)).to_be_visible()
                page.screenshot(path=SCREENSHOTS / "analysis-artifacts.png")
            except AssertionError:
                page.screenshot(path=SCREENSHOTS / "failed.png")  # what the browser showed
                raise
        finally:
            browser.close()
