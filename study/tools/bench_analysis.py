"""Wall time of `analyze` on synthetic experiments of growing size, start-up included.

    python -m study.tools.bench --analysis                       # 1k and 10k runs, SQLite
    python -m study.tools.bench --analysis --server              # 1k, 5k, 10k through a server

Each experiment follows the run schema (docs/run-schema.md) (params from the protocol's own cells, the
study.* tags, 10 epochs x 3 metrics) and is written straight into the store's tables
(`tracking.insert_runs`): the API would take most of an hour for 10,000 runs. Then
`python -m study analyze --experiment NAME` runs in a subprocess, as a user would, and its wall
time is what is reported. With `--server` the runs go into a PostgreSQL-backed tracking server
started for the purpose (`study.store.server`), written into its database and read back over HTTP.

The machine is shared: only ratios measured in one invocation mean much.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from study.protocol import plan, schema as protocol
from study.store import server, tracking

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "reports" / "bench" / "analysis.json"
EPOCHS = 10
D1 = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
D2 = (0.5, 0.0, 0.2, 0.8, 0.9)
# Runs -> (settings, seeds), the shapes: 1k = 10 x 100, 10k = 50 x 200.
SHAPES = {1000: (10, 100), 2000: (20, 100), 5000: (50, 100), 10000: (50, 200)}
# The targets on the 2-core development machine.
MAX_10K_S, MAX_RATIO = 60.0, 12.0


@dataclass(frozen=True)
class Timed:
    runs: int
    store: str  # sqlite | server
    build_s: float  # writing the synthetic runs (not part of the figure)
    load_s: float  # `tracking.load_runs` alone in a fresh process, start-up included
    analyze_s: float  # `python -m study analyze --experiment NAME`, start-up included


def synthetic(n_runs: int, seed: int = 0) -> tuple[protocol.Protocol, list[tracking.RunRecord],
                                                    pd.DataFrame]:
    """A protocol of SHAPES[n_runs] and one FINISHED run per cell, with per-epoch curves."""
    n_settings, n_seeds = SHAPES[n_runs]
    settings = [[d1, d2] for d2 in D2 for d1 in D1][:n_settings]
    proto = protocol.parse(dict(name=f"bench-analysis-{n_runs}", dropout=settings,
                                seeds={"count": n_seeds}, baseline=[0.2, 0.5],
                                training={"epochs": EPOCHS}))
    rng = np.random.default_rng(seed)
    shared = tracking.flatten(proto.to_dict(), "protocol")
    records, curves = [], []
    for cell in plan.expand(proto):
        run_id = uuid.uuid4().hex  # unique per build, as MLflow's own run ids
        final = 0.86 - 0.15 * (cell.dropout1 - 0.2) ** 2 - 0.1 * (cell.dropout2 - 0.5) ** 2
        epochs = np.arange(1, EPOCHS + 1)
        acc = final - 0.12 * np.exp(-epochs / 2) + rng.normal(0, 0.006, EPOCHS)
        loss = 0.34 + 0.6 * np.exp(-epochs / 3) + rng.normal(0, 0.01, EPOCHS)
        train_acc = 1.02 - loss / 1.5
        for metric, values in (("test_acc", acc), ("train_loss", loss), ("train_acc", train_acc)):
            curves.extend((run_id, int(e), metric, float(v)) for e, v in zip(epochs, values))
        records.append(tracking.RunRecord(run_id, cell.name,
                                          {**{k: str(v) for k, v in cell.labels().items()},
                                           **shared},
                                          _tags(proto, cell, run_id, rng), {}))
    return proto, records, pd.DataFrame(curves, columns=["run_id", "epoch", "metric", "value"])


def _tags(proto: protocol.Protocol, cell: plan.Cell, run_id: str,
          rng: np.random.Generator) -> dict[str, str]:
    return {"mlflow.runName": cell.name, "study.kind": "train", "study.protocol": proto.name,
            "study.cell": cell.key, "study.status": "ok", "study.textbook_check": "True",
            "study.weights_sha256": hashlib.sha256(run_id.encode()).hexdigest(),
            "study.seconds": f"{rng.uniform(9, 11):.3f}", "study.epochs_done": str(EPOCHS),
            "study.seed.init": str(cell.seed), "study.seed.data": str(cell.seed + 1),
            "study.seed.dropout": str(cell.seed + 2),
            "study.keep_rate1": f"{1 - cell.dropout1:.6f}",
            "study.keep_rate2": f"{1 - cell.dropout2:.6f}",
            "study.env.torch_version": "2.14.1", "study.env.python_version": "3.11",
            "study.env.cpu": "bench", "study.flag.deterministic_algorithms": "False",
            "study.flag.cudnn_benchmark": "False", "study.threads": "1"}


def build(n_runs: int, uri: str, writer_uri: str) -> tuple[str, float]:
    """Create the experiment through `uri` and write its runs through `writer_uri` (the same
    store, or the database behind a tracking server). Returns its name and the seconds taken."""
    began = time.perf_counter()
    proto, records, curves = synthetic(n_runs)
    with _uri(uri):
        exp_id = tracking.experiment_id(tracking.client(), proto.name)
    tracking.insert_runs(tracking.client(writer_uri), exp_id, records, curves,
                         started_ms=int(time.time() * 1000))
    return proto.name, time.perf_counter() - began


@contextmanager
def _uri(uri: str) -> Iterator[None]:
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


LOAD = "import sys; from study.store import tracking; tracking.load_runs(tracking.client(), sys.argv[1])"


def seconds(args: list[str], uri: str) -> float:
    """Wall time of `python ARGS` in a fresh process pointed at `uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    took = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"python {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return took


def measure(sizes: list[int], store: str, uri: str, writer_uri: str) -> list[Timed]:
    out = []
    for n in sizes:
        name, build_s = build(n, uri, writer_uri)
        if not out:
            seconds(["-c", LOAD, name], uri)  # untimed: a fresh server's first requests
        load_s = seconds(["-c", LOAD, name], uri)
        analyze_s = seconds(["-m", "study", "analyze", "--experiment", name], uri)
        out.append(Timed(n, store, build_s, load_s, analyze_s))
        print(f"{store:6} {n:>6} runs: analyze {analyze_s:6.1f} s; load_runs alone "
              f"{load_s:.1f} s (built in {build_s:.1f} s)", flush=True)
    return out


def verdict(timed: list[Timed]) -> dict[str, object]:
    """The ratio of each size's time to the smallest's, and the issue's targets where known."""
    base = min(timed, key=lambda t: t.runs)
    ratios = {f"{t.runs}_over_{base.runs}": t.analyze_s / base.analyze_s
              for t in timed if t is not base}
    out: dict[str, object] = {"ratios": ratios,
                              "load_ratios": {f"{t.runs}_over_{base.runs}": t.load_s / base.load_s
                                              for t in timed if t is not base}}
    ten = next((t for t in timed if t.runs == 10000), None)
    if ten is not None and base.runs == 1000:
        out["targets_met"] = {"10k_within_60_s": ten.analyze_s <= MAX_10K_S,
                              "10k_within_12x_1k": ratios["10000_over_1000"] <= MAX_RATIO}
    return out


def table(timed: list[Timed]) -> str:
    """The timings as the Markdown table of docs/measurements.md."""
    lines = ["| store | runs | `analyze` | `load_runs` alone | ratio to the smallest |",
             "|---|---|---|---|---|"]
    for store in dict.fromkeys(t.store for t in timed):
        rows = sorted((t for t in timed if t.store == store), key=lambda t: t.runs)
        lines += [f"| {store} | {t.runs:,} | {t.analyze_s:.1f} s | {t.load_s:.1f} s | "
                  f"{t.analyze_s / rows[0].analyze_s:.1f}x |" for t in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.tools.bench --analysis",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="*", default=None, choices=sorted(SHAPES),
                        help="SQLite sizes (default 1000 10000, none with --server)")
    parser.add_argument("--server", action="store_true",
                        help="time against a PostgreSQL-backed tracking server")
    parser.add_argument("--server-runs", type=int, nargs="+", default=[1000, 5000, 10000],
                        choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = [] if args.server else [1000, 10000]
    results: dict[str, object] = {"load_average": os.getloadavg(), "cores": os.cpu_count()}
    timed: list[Timed] = []
    if args.runs:
        with tempfile.TemporaryDirectory(prefix="study-bench-") as tmp:
            uri = f"sqlite:///{tmp}/bench.db"
            sqlite = measure(sorted(args.runs), "sqlite", uri, uri)
        timed += sqlite
        results["sqlite"] = {"timings": [asdict(t) for t in sqlite], **verdict(sqlite)}
    if args.server:
        with server.temporary() as srv:
            served = measure(sorted(args.server_runs), "server", srv.url, srv.database_uri)
        timed += served
        results["server"] = {"timings": [asdict(t) for t in served], **verdict(served)}
    print(json.dumps({k: v for k, v in results.items() if k != "load_average"}, indent=1))
    print(table(timed))
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
