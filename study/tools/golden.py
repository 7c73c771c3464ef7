"""Golden hashes of the study's portable cells: re-train them on this machine, or record them.

    python -m study verify protocols/d2l-dropout.yaml --golden              # every golden cell
    python -m study verify protocols/lesson.yaml --golden --sample 2        # 2 per golden file
    python -m study.tools.golden tests/golden/overfitting.json --sample 2   # torch + numpy only
    python -m study.tools.golden --write protocols/d2l-dropout.yaml --from-store   # record

`portable` promises the same weights, to the bit, on any x86-64 CPU with AVX2 and the same torch
(docs/arithmetic.md). tests/golden/NAME.json holds the weight hashes of every portable cell of
protocols/NAME.yaml, keyed by cell key, with each cell's setting and seed, the environment that
produced them and the MD5s of the data. Checking a file re-trains its cells (all, or a sample
drawn with a seed) in a fresh worker, as the runner trains them, and compares the hashes: one
line per cell; a mismatch names the environment keys that differ (recorded -> present).

The check reads only JSON and imports only the engine: a bare machine with torch and numpy
checks the paper (no MLflow, pandas, scipy, pydantic or YAML). Recording needs the protocol
loader, and `--from-store` the store (MLFLOW_TRACKING_URI).

Exit status: 0 when every checked cell matches, or when this machine is outside the promise
(another torch, no AVX2: "not checked" and why); 1 when a cell differs although nothing but the
CPU differs from the recorded environment (the promise is broken); 2 on a missing or stale file.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from study.engine import data, environment, workers
from study.protocol.plan import Cell, RunConfig
from study.tools.gpu_check import DataSpec, ModelSpec, TrainingSpec

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = ROOT / "tests" / "golden"
PROMISED_ISAS = ("avx2", "avx512")
# What the promise lets differ between machines: a mismatch where only these differ breaks it.
CPU_KEYS = ("cpu_model", "cpu_isa")
# Besides the keys that decide the bits (environment.bits_keys): numpy bundles the OpenBLAS
# whose kernels the `openblas-haswell` path runs.
ALSO_RECORDED = ("numpy_version",)
# The fields of a cell besides its config, in the order Cell takes them.
CELL_FIELDS = ("dropout1", "dropout2", "seed", "device", "determinism", "implementation", "vary",
               "replicate")


class GoldenError(ValueError):
    """A golden file that is missing, unreadable or no longer rebuilds its cells."""


@dataclass(frozen=True)
class GoldenCell:
    cell: Cell
    weights_sha256: str


@dataclass(frozen=True)
class Golden:
    path: Path
    environment: dict[str, str]  # of the machine that recorded it
    data_md5: dict[str, str]
    cells: tuple[GoldenCell, ...]

    def keys(self) -> tuple[str, ...]:
        """The environment keys compared on a mismatch."""
        return environment.bits_keys(self.cells[0].cell.kernels) + ALSO_RECORDED

    def sample(self, n: int | None, seed: int) -> list[GoldenCell]:
        """`n` cells drawn with `seed` from those sorted by key (None: all of them)."""
        ordered = sorted(self.cells, key=lambda c: c.cell.key)
        return ordered if n is None or n >= len(ordered) else random.Random(seed).sample(ordered, n)


# --- reading and writing the file -----------------------------------------------------------------

def read(path: Path) -> Golden:
    try:
        raw = json.loads(Path(path).read_text())
        configs = [_config(c) for c in raw["configs"]]
        cells = tuple(_golden_cell(path, key, entry, configs) for key, entry in raw["cells"].items())
        found = Golden(Path(path), raw["environment"], raw["data_md5"], cells)
    except FileNotFoundError:
        raise GoldenError(f"{path}: no such golden file") from None
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as err:
        raise GoldenError(f"{path}: not a golden file ({type(err).__name__}: {err})") from None
    if not cells:
        raise GoldenError(f"{path}: holds no cells")
    return found


def _config(raw: dict[str, Any]) -> RunConfig:
    def plain(kind: type, section: dict[str, Any]) -> Any:
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()})
    return RunConfig(**{**raw, "model": plain(ModelSpec, raw["model"]),
                        "training": plain(TrainingSpec, raw["training"]),
                        "data": plain(DataSpec, raw["data"])})


def _golden_cell(path: Path, key: str, entry: dict[str, Any], configs: list[RunConfig]
                 ) -> GoldenCell:
    cell = Cell(configs[entry["config"]], *(entry[f] for f in CELL_FIELDS))
    if cell.key != key:  # the plan's definition of a cell moved: the hashes are of other cells
        raise GoldenError(f"{path}: cells.{key} ({entry['name']}) rebuilds as cell {cell.key}; "
                          "the cell definition changed since it was recorded: re-record it "
                          f"(python -m study.tools.golden --write PROTOCOL)")
    return GoldenCell(cell, entry["weights_sha256"])


def document(cells: Sequence[Cell], hashes: dict[str, str], env: dict[str, str],
             data_md5: dict[str, str], protocol_file: str, recorded_from: str) -> dict[str, Any]:
    """The golden file's content: the cells' configs once, each cell with its hash."""
    configs: list[dict[str, Any]] = []
    entries = {}
    for cell in cells:
        config = json.loads(json.dumps(asdict(cell.config)))
        if config not in configs:
            configs.append(config)
        entries[cell.key] = {"name": cell.name, "setting": [cell.dropout1, cell.dropout2],
                             **{f: getattr(cell, f) for f in CELL_FIELDS},
                             "config": configs.index(config), "weights_sha256": hashes[cell.key]}
    about = (f"Weight hashes of every portable cell of {protocol_file} (plan.expand: round 0 of "
             "an adaptive protocol), recorded from " + recorded_from + ", with the environment "
             "that produced them. Check: python -m study verify " + protocol_file + " --golden")
    return {"about": about, "protocol_file": protocol_file, "data_md5": data_md5,
            "environment": env, "configs": configs, "cells": entries}


def portable_cells(cells: Sequence[Cell]) -> list[Cell]:
    """The cells whose bits are promised across CPUs."""
    return [c for c in cells if c.determinism == "portable" and c.device == "cpu"]


def golden_file(protocol_path: str | Path) -> Path:
    return GOLDEN_DIR / f"{Path(protocol_path).stem}.json"


def recorded_env(env: dict[str, str], kernel_path: str) -> dict[str, str]:
    return {k: env.get(k, "absent") for k in environment.bits_keys(kernel_path) + ALSO_RECORDED}


# --- checking -------------------------------------------------------------------------------------

def outside_promise(recorded: dict[str, str]) -> str | None:
    """Why this machine is outside the portable promise, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"portable promises x86-64 with AVX2; this machine is {platform.machine()}"
    if environment.cpu_isa() not in PROMISED_ISAS:
        return f"portable promises CPUs with AVX2; this CPU's widest ISA is {environment.cpu_isa()}"
    torch_now = environment.package_version("torch")
    if torch_now != recorded["torch_version"]:
        return (f"portable promises the same torch; golden hashes are of torch "
                f"{recorded['torch_version']}, this is {torch_now}")
    return None


@dataclass(frozen=True)
class Check:
    """One golden cell re-trained here."""

    golden: GoldenCell
    weights_sha256: str
    differing: tuple[str, ...]  # `key: recorded -> present` for each compared key that differs

    @property
    def identical(self) -> bool:
        return self.weights_sha256 == self.golden.weights_sha256

    @property
    def broken(self) -> bool:
        """Other bits although nothing but the CPU differs: what the promise rules out."""
        keys = [d.partition(": ")[0] for d in self.differing]  # environment.differences' form
        return not self.identical and all(k in CPU_KEYS for k in keys)

    def line(self) -> str:
        cell = self.golden.cell
        head = f"{cell.name} [{cell.key}]: "
        if self.identical:
            return head + "identical"
        keys = "; ".join(self.differing) or "no recorded key differs"
        verdict = "DIFFERS, promised by portable" if self.broken else \
            "differs, outside the recorded conditions"
        return head + f"{verdict}: {self.weights_sha256[:12]} vs recorded " \
                      f"{self.golden.weights_sha256[:12]}; environment recorded -> present: {keys}"


@dataclass(frozen=True)
class Outcome:
    golden: Golden
    checks: tuple[Check, ...]
    not_checked: str | None = None  # why nothing was trained (outside the promise)
    outside: str | None = None  # trained anyway (--outside-promise), although this is why

    @property
    def ok(self) -> bool:
        return not any(c.broken for c in self.checks)

    def lines(self) -> list[str]:
        name = self.golden.path.name
        if self.not_checked:
            return [f"{name}: not checked: {self.not_checked}"]
        same = sum(c.identical for c in self.checks)
        caveat = [f"{name}: outside the promise ({self.outside}): these lines are evidence about "
                  "another environment, not a check of the promise"] if self.outside else []
        return caveat + [c.line() for c in self.checks] + [
            f"{name}: {same} of {len(self.checks)} cells identical (of {len(self.golden.cells)} "
            f"golden) on {environment.cpu_model()} ({environment.cpu_isa()}); "
            f"{sum(c.broken for c in self.checks)} broke the promise"]


def check(golden: Golden, n: int | None = None, seed: int = 0,
          source: Path | None = None, anyway: bool = False) -> Outcome:
    """Re-train `n` of the golden cells (None: all) in fresh workers and compare their hashes.
    `source`: a folder of IDX files instead of the located Fashion-MNIST (staged in a temporary
    cache, so data/ keeps the real files). `anyway`: train outside the promise too (another
    torch): a differing key then explains a mismatch, which is reported, never failed."""
    why = outside_promise(golden.environment)
    if why and not anyway:
        return Outcome(golden, (), why)
    chosen = {g.cell.key: g for g in golden.sample(n, seed)}
    cache = Path(tempfile.mkdtemp(prefix="golden-data-")) if source else None
    load = functools.partial(data.load, source, cache=cache, checksums=golden.data_md5)
    checks: list[Check] = []
    for group in workers.groups([g.cell for g in chosen.values()], load):
        trained = workers.trained(group)
        differing = tuple(environment.differences(golden.environment, trained.environment,
                                                  golden.keys()))
        checks += [Check(chosen[r.cell.key], r.weights_sha256, differing)
                   for r in trained.results]
    return Outcome(golden, tuple(checks), outside=why)


@dataclass(frozen=True)
class Targets:
    files: list[Path]
    unrecorded: list[Path]  # golden files a lesson's portable protocols lack (not yet recorded)


def targets(path: str | Path) -> Targets:
    """The golden files that `path` names: itself (.json), its protocol's, or, for a lesson
    file, those of its protocols that have portable cells (needs the protocol loader)."""
    path = Path(path)
    if path.suffix == ".json":
        return Targets([path], [])
    if golden_file(path).exists():
        return Targets([golden_file(path)], [])
    try:
        from study.protocol import lesson, plan, schema  # YAML and pydantic: for a lesson only
    except ImportError as err:
        raise GoldenError(f"{path}: reading a lesson file needs the protocol loader ({err}); "
                          f"name its golden files instead ({GOLDEN_DIR}/NAME.json)") from None
    try:
        parts = lesson.parts(lesson.load(path), path)
    except schema.ProtocolError:
        raise GoldenError(f"{path}: no golden file {golden_file(path)} (a protocol without "
                          "portable cells has none)") from None
    files = [golden_file(p.path) for p in parts if portable_cells(plan.expand(p.protocol))]
    return Targets([f for f in files if f.exists()], [f for f in files if not f.exists()])


def check_all(paths: Sequence[str | Path], n: int | None = None, seed: int = 0,
              source: Path | None = None, anyway: bool = False) -> int:
    """Check every golden file `paths` name, print the lines; the exit status."""
    if n is not None and n < 1:
        print(f"error: --sample: at least 1 cell per golden file (value: {n})", file=sys.stderr)
        return 2
    try:
        found = [targets(p) for p in paths]
        goldens = [read(f) for t in found for f in t.files]  # all read before anything trains
    except GoldenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for missing in (f for t in found for f in t.unrecorded):
        print(f"{missing.name}: not checked: not recorded yet, though its protocol has "
              "portable cells (python -m study.tools.golden --write PROTOCOL [--from-store])")
    ok = True
    for golden in goldens:
        count = len(golden.cells) if n is None else min(n, len(golden.cells))
        print(f"{golden.path.name}: {count} of {len(golden.cells)} golden cells to re-train",
              flush=True)
        try:
            outcome = check(golden, n, seed, source, anyway)
        except (data.DataError, workers.WorkerError) as err:
            print(f"error: {golden.path}: {err}", file=sys.stderr)
            return 2
        print("\n".join(outcome.lines()), flush=True)
        ok = ok and outcome.ok
    return 0 if ok else 1


# --- recording ------------------------------------------------------------------------------------

def from_store(protocol_path: str | Path) -> dict[str, Any]:
    """The golden document of a protocol's portable cells from the finished runs of its
    experiment in the store (MLFLOW_TRACKING_URI): their recorded hashes and environment."""
    from study.protocol import plan, schema
    from study.store import tracking  # MLflow: recording only, never the check

    proto = schema.load(protocol_path)
    cells = portable_cells(plan.expand(proto))
    mlflow = tracking.client()
    try:
        exp_id = tracking.experiment_id(mlflow, proto.name, create=False)
    except tracking.TrackingError as err:
        raise GoldenError(str(err)) from None
    runs = {r.cell_key: r for r in tracking.recorded_runs(mlflow, exp_id)}
    if missing := [c.name for c in cells if c.key not in runs]:
        raise GoldenError(f"{tracking.tracking_uri()}: experiment {proto.name!r} has no finished "
                          f"run of {len(missing)} of its {len(cells)} portable cells, e.g. "
                          f"{missing[0]}")
    envs = {json.dumps(recorded_env(runs[c.key].environment, c.kernels), sort_keys=True)
            for c in cells}
    if len(envs) != 1:  # one environment per file: a mismatch then names its keys
        raise GoldenError(f"{tracking.tracking_uri()}: the runs of {proto.name!r} come from "
                          f"{len(envs)} environments; record from one machine's runs")
    commits = sorted({runs[c.key].environment.get("git_commit", "unknown")[:12] for c in cells})
    return document(cells, {c.key: runs[c.key].weights_sha256 for c in cells}, json.loads(
        envs.pop()), data.FASHION_MNIST_MD5, str(protocol_path),
        f"{len(cells)} finished runs in a store (git commit {', '.join(commits)})")


def by_training(protocol_path: str | Path, source: Path | None = None,
                checksums: dict[str, str] = data.FASHION_MNIST_MD5) -> dict[str, Any]:
    """The golden document of a protocol's portable cells, trained here in fresh workers."""
    from study.protocol import plan, schema

    cells = portable_cells(plan.expand(schema.load(protocol_path)))
    if not cells:
        raise GoldenError(f"{protocol_path}: no portable cells to record")
    cache = Path(tempfile.mkdtemp(prefix="golden-data-")) if source else None
    load = functools.partial(data.load, source, cache=cache, checksums=checksums)
    hashes, envs = {}, set()
    for group in workers.groups(cells, load):
        trained = workers.trained(group)
        hashes |= {r.cell.key: r.weights_sha256 for r in trained.results}
        envs.add(json.dumps(recorded_env(trained.environment, cells[0].kernels), sort_keys=True))
    if len(envs) != 1:
        raise GoldenError(f"{protocol_path}: its groups trained in {len(envs)} environments")
    return document(cells, hashes, json.loads(envs.pop()), checksums, str(protocol_path),
                    f"a training on {environment.cpu_model()} (git commit "
                    f"{environment.git_commit()[:12]})")


def write(protocol_path: str | Path, out: Path, from_store_runs: bool) -> None:
    doc = from_store(protocol_path) if from_store_runs else by_training(protocol_path)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}: {len(doc['cells'])} cells on {doc['environment']['cpu_model']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.tools.golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+",
                        help="golden files, protocols or a lesson file (with --write: protocols)")
    parser.add_argument("--sample", type=int, help="cells per golden file (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument("--data", type=Path, help="a folder of IDX files to train on instead "
                        "of Fashion-MNIST (its MD5s must be the golden file's)")
    parser.add_argument("--write", action="store_true",
                        help="record tests/golden/NAME.json for each protocol NAME.yaml")
    parser.add_argument("--from-store", action="store_true",
                        help="with --write: from the store's finished runs, not by training")
    parser.add_argument("--outside-promise", action="store_true",
                        help="re-train even where the promise does not hold (another torch) and "
                        "report what matches: evidence, never a failure")
    args = parser.parse_args(argv)
    if not args.write:
        return check_all(args.targets, args.sample, args.seed, args.data, args.outside_promise)
    try:
        for target in args.targets:
            write(target, golden_file(target), args.from_store)
    except GoldenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
