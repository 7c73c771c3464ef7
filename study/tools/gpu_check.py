"""The one-shot GPU check: determinism modes on cuda, CPU against GPU, batched throughput.

    python -m study.tools.gpu_check                    # make gpu-check; writes reports/gpu-check/
    python -m study.tools.gpu_check --out /tmp/gc --epochs 2 --train-subset 2000 --seeds 2   # smaller
    python -m study.tools.gpu_check --write-snapshot   # after editing a protocol it reads (needs YAML)
    python -m study.tools.gpu_check --pack data/gpu-pack   # make gpu-pack: the data a GPU machine needs

Three parts, one table (printed, and written as gpu-check.json and gpu-check.md under --out):
1. determinism: protocols/determinism.yaml's cuda cells, each mode (default, benchmark, strict,
   and portable, which needs `randomness: portable` and a fixed thread count) in a fresh worker
   process, replicates included: how many replicates have their first run's weight hash. Then
   protocols/determinism-lenet.yaml's (the convolutional model, where cuDNN's algorithm choice
   can matter) under default, benchmark and strict, trained on all images for 10 epochs.
2. throughput: the d2l protocol's cells trained batched (lockstep on cuda; lockstep and side by
   side on the CPU) for a few epochs after a warm-up, as runs of the protocol per minute.
3. cpu-gpu: the same cells (mode default, replicate 0) on the CPU; the paired difference of final
   test accuracy, cuda - cpu, with a t interval per setting and over both.

It runs where only torch, numpy and the standard library exist (a lent GPU machine has no
MLflow, pydantic or network): protocol settings come from protocols/gpu-check.json, a snapshot
the normal loader wrote from the YAML files (a test holds it equal to them), the statistics from
`study.student_t`. Without a CUDA device the cuda parts are skipped, each saying why, and the CPU
parts still run. Parts start only while `--budget-s` lasts, so the check ends in bounded time.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from study.engine import batched, environment, workers
from study.protocol import plan
from study.analysis import student_t
from study.engine import data as datamod
from study.protocol.plan import Cell, RunConfig
from study.engine.train import Result

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "protocols" / "gpu-check.json"
OUT = ROOT / "reports" / "gpu-check"
# name -> (protocol file, --set overrides): what the snapshot holds, resolved by protocol.load.
SOURCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "determinism": ("protocols/determinism.yaml", ()),
    # `portable` needs randomness: portable and a fixed thread count; the file's other modes run
    # with its own native randomness.
    "determinism-portable": ("protocols/determinism.yaml",
                             ("determinism=[portable]", "randomness=portable", "threads=1")),
    "d2l-dropout": ("protocols/d2l-dropout.yaml", ()),
    # The model where cuDNN can matter (convolutions), trained as its header says a GPU should
    # train it: all 60,000 images x 10 epochs, past the sigmoid LeNet's initial plateau.
    "determinism-lenet": ("protocols/determinism-lenet.yaml",
                          ("data.train_subset=null", "training.epochs=10")),
}
# (snapshot entry, mode) of the determinism part, in the order they run.
MODES = (("determinism", "default"), ("determinism", "benchmark"), ("determinism", "strict"),
         ("determinism-portable", "portable"), ("determinism-lenet", "default"),
         ("determinism-lenet", "benchmark"), ("determinism-lenet", "strict"))
# Why a device's parts are skipped where it is absent.
ABSENT = {"cuda": "no CUDA device"}


class CheckError(ValueError):
    """A snapshot or an option the check cannot run from."""


# --- protocol sections without pydantic ----------------------------------------------------------
# The engine reads these fields only; protocol.py's pydantic classes carry the same fields, and
# tests/test_gpu_check.py requires cells built here to have the keys plan.expand gives.

@dataclass(frozen=True)
class ModelSpec:
    arch: str
    hidden: tuple[int, ...]
    init_std: float
    init: str


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    eval_every: int = 1
    # Per-size budgets: the check's protocols train one size, so this stays empty (as a cell's
    # resolved budget always is); Entry.config refuses an entry that has any.
    by_size: tuple = ()

    def evaluated(self, epoch: int) -> bool:
        return plan.is_evaluated(epoch, self.eval_every, self.epochs)


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    train_subset: int | None


@dataclass(frozen=True)
class Entry:
    """One snapshot entry: a resolved protocol (`Protocol.to_dict()`) and where it came from."""

    name: str
    source: str
    overrides: tuple[str, ...]
    protocol: dict[str, Any]
    train_images: int  # of the protocol: its subset, or the whole training set

    def scaled(self, epochs: int | None = None, train_subset: int | None = None,
               seeds: int | None = None) -> Entry:
        """The same protocol with fewer epochs, images or seeds (None keeps the protocol's)."""
        p = json.loads(json.dumps(self.protocol))
        if epochs is not None:
            p["training"]["epochs"] = epochs
        if train_subset is not None:
            p["data"]["train_subset"] = train_subset
        if seeds is not None:
            p["seeds"] = {**p["seeds"], "count": seeds, "list": None}
        images = p["data"]["train_subset"] or self.train_images
        return replace(self, protocol=p, train_images=images)

    def differs_from(self, other: Entry) -> list[str]:
        """`key: ours (protocol: theirs)` for the scale keys changed against `other`."""
        pairs = [("epochs", self.epochs, other.epochs),
                 ("images", self.train_images, other.train_images),
                 ("seeds", len(seed_values(self.protocol["seeds"])),
                  len(seed_values(other.protocol["seeds"])))]
        return [f"{k} {a:,} (protocol: {b:,})" for k, a, b in pairs if a != b]

    @property
    def epochs(self) -> int:
        return self.protocol["training"]["epochs"]

    def config(self) -> RunConfig:
        p = self.protocol
        if p["training"]["by_size"] or isinstance(p["data"]["train_subset"], list):
            raise CheckError(f"{SNAPSHOT}: entries.{self.name}.protocol: the check trains one "
                             f"training-set size (data.train_subset: {p['data']['train_subset']}, "
                             f"training.by_size: {p['training']['by_size']})")
        return RunConfig(model=_section(ModelSpec, p["model"], self.name, "model"),
                         training=_section(TrainingSpec, p["training"], self.name, "training"),
                         data=_section(DataSpec, p["data"], self.name, "data"),
                         execution=p["execution"], randomness=p["randomness"], threads=None,
                         fixed_seed=p["seeds"]["fixed"], batch_members=p["batch_members"],
                         mc_passes=p["inference"]["mc_passes"])

    def cells(self, devices: Sequence[str] | None = None,
              modes: Sequence[str] | None = None) -> list[Cell]:
        """plan.expand's cells in plan.expand's order, restricted to `devices` and `modes`."""
        p = self.protocol
        return plan.grid(self.config(), replicates=p["replicates"],
                         seeds=seed_values(p["seeds"]), vary=p["vary"],
                         devices=devices or p["devices"], modes=modes or p["determinism"],
                         threads=p["threads"] if isinstance(p["threads"], list) else [p["threads"]],
                         implementations=p["implementations"], dropout=p["dropout"])


def seed_values(seeds: dict[str, Any]) -> list[int]:
    if seeds.get("list") is not None:
        return list(seeds["list"])
    return list(range(seeds["start"], seeds["start"] + seeds["count"]))


def _section(kind: type, raw: dict[str, Any], entry: str, key: str) -> Any:
    try:
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except TypeError as err:  # a field added to or dropped from the protocol schema
        raise CheckError(f"{SNAPSHOT}: entries.{entry}.protocol.{key}: {err} (value: {raw}); "
                         "update the plain sections in study/gpu_check.py") from None


def load_snapshot(path: Path = SNAPSHOT) -> dict[str, Entry]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckError(f"{path}: missing; write it with python -m study.tools.gpu_check "
                         "--write-snapshot") from None
    except json.JSONDecodeError as err:
        raise CheckError(f"{path}: not valid JSON ({err})") from None
    entries = raw.get("entries") if isinstance(raw, dict) else None
    if not isinstance(entries, dict) or set(entries) != set(SOURCES):
        found = sorted(entries) if isinstance(entries, dict) else entries
        raise CheckError(f"{path}: entries: expected {sorted(SOURCES)}, got {found}")
    return {name: Entry(name, e["source"], tuple(e["overrides"]), e["protocol"], e["train_images"])
            for name, e in entries.items()}


def snapshot() -> dict[str, Any]:
    """The snapshot's content, from the YAML files through the normal loader (needs pydantic)."""
    from study.protocol import schema as protocol  # not on the check's path: it reads the written snapshot

    entries = {}
    for name, (source, overrides) in SOURCES.items():
        resolved = protocol.load(ROOT / source, list(overrides))
        images = resolved.data.train_subset or plan.TRAIN_IMAGES[resolved.data.dataset]
        entries[name] = {"source": source, "overrides": list(overrides),
                         "protocol": resolved.to_dict(), "train_images": images}
    return {"about": "Written by python -m study.tools.gpu_check --write-snapshot from the files named; "
                     "tests/test_gpu_check.py fails when they no longer agree.",
            "entries": entries}


def write_snapshot(path: Path = SNAPSHOT) -> None:
    path.write_text(json.dumps(snapshot(), indent=1) + "\n")
    print(f"wrote {path}")


def pack(dest: Path) -> list[Path]:
    """The four Fashion-MNIST files as .gz in `dest` (about 30 MB), checked against their
    published MD5s: what a lent GPU machine, which has no network, reads via STUDY_DATA_DIR."""
    source = datamod.locate(download_to=None)
    datamod.stage(source)  # checks every file's MD5 (and unpacks it into data/, as `make data`)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in datamod.FASHION_MNIST_MD5:
        packed, target = source / f"{name}.gz", dest / f"{name}.gz"
        target.write_bytes(packed.read_bytes() if packed.is_file()
                           else gzip.compress((source / name).read_bytes()))
        written.append(target)
    return written


# --- rows of the table --------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of the table; `values` holds the numbers behind `result`."""

    part: str  # determinism | cpu-gpu | throughput
    name: str  # the mode, the setting or the schedule
    device: str
    setup: str  # what ran, and how it is scaled against the protocol
    status: str  # ran | skipped | failed
    result: str = ""
    reason: str | None = None
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Speed:
    """One throughput row: K members of the d2l protocol, trained `epochs` on `device`."""

    device: str
    lockstep: bool
    members: int
    epochs: int


def speeds(gpu_epochs: int, cpu_epochs: int, cpu_members: int,
           batch_members: int) -> tuple[Speed, ...]:
    """cuda: the protocol's batch_members in lockstep (its engine there); CPU: `cpu_members` side
    by side (the CPU engine's schedule; a member-epoch costs the same at any K, so a few members
    tell the cost of all), then in lockstep, the slowest row, last."""
    return (Speed("cuda", True, batch_members, gpu_epochs),
            Speed("cpu", False, cpu_members, cpu_epochs),
            Speed("cpu", True, cpu_members, cpu_epochs))


@dataclass(frozen=True)
class Context:
    """What every part needs: the snapshot, the scale, the data loader and the clock."""

    entries: dict[str, Entry]
    scale: dict[str, int | None]  # epochs, train_subset, seeds for parts 1 and 3
    load: Callable[[], datamod.Dataset]  # pickles: workers call it
    available: tuple[str, ...]  # devices present: "cpu", and "cuda" where torch sees one
    deadline: float  # time.monotonic() after which no part starts
    budget_s: float
    throughput: tuple[Speed, ...]  # the rows of part 2, in order


def attempt(ctx: Context, part: str, name: str, device: str, setup: str,
            run: Callable[[], tuple[str, dict[str, Any]]]) -> Row:
    """Run one part unless its device is absent or the budget is spent; a failure is a row."""
    if device not in ctx.available:
        return Row(part, name, device, setup, "skipped", reason=ABSENT[device])
    if time.monotonic() > ctx.deadline:
        return Row(part, name, device, setup, "skipped",
                   reason=f"time budget of {ctx.budget_s:.0f} s spent before this part")
    started = time.monotonic()
    try:
        result, values = run()
    except Exception as err:  # noqa: BLE001 - one part's failure must not cost the others
        first = (str(err).splitlines() or [""])[0]
        return Row(part, name, device, setup, "failed", reason=f"{type(err).__name__}: {first}")
    values = {**values, "wall_s": time.monotonic() - started}
    return Row(part, name, device, setup, "ran", result, values=values)


def _setup(entry: Entry, scaled: Entry, what: str) -> str:
    changed = scaled.differs_from(entry)
    size = (f"{scaled.train_images:,} images x {scaled.epochs} epochs, "
            f"{len(seed_values(scaled.protocol['seeds']))} seeds")
    return f"{what}; {size}" + (f" (scaled down: {'; '.join(changed)})" if changed else
                                f" ({entry.source})")


# --- 1. determinism on cuda ----------------------------------------------------------------------

def train_group(cells: list[Cell], ctx: Context) -> workers.Trained:
    """One (device, mode, threads) group in a fresh worker process, as the runner trains it."""
    (group,) = workers.groups(cells, ctx.load)
    return workers.trained(group)


def replicate_summary(results: Sequence[Result]) -> dict[str, Any]:
    """Each later replicate against its cell's replicate 0: identical weight hashes, largest
    |difference| of final test accuracy."""
    first = {_cell_id(r.cell): r for r in results if r.cell.replicate == 0}
    pairs = [(r, first[_cell_id(r.cell)]) for r in results
             if r.cell.replicate > 0 and _cell_id(r.cell) in first]
    same = sum(r.weights_sha256 == f.weights_sha256 for r, f in pairs)
    gaps = [abs(r.epochs[-1].test_acc - f.epochs[-1].test_acc) for r, f in pairs]
    return {"runs": len(results), "pairs": len(pairs), "identical": same,
            "max_abs_test_acc_diff": max(gaps) if gaps else None,
            "statuses": dict(Counter(r.status for r in results))}


def _cell_id(cell: Cell) -> tuple:
    return cell.dropout1, cell.dropout2, cell.seed, cell.implementation, cell.vary


# Worker environment keys that decide or explain the bits of a cuda run.
ENV_KEYS = ("device_name", "gpu_capability", "gpu_driver", "torch_version", "cuda_version",
             "cudnn_version", "cublas_workspace_config", "mkl_cbwr", "threads.intra_op")


def determinism_rows(ctx: Context, device: str = "cuda",
                     modes: Sequence[tuple[str, str]] = MODES) -> tuple[list[Row], list[Result]]:
    """A row per mode; also the default mode's replicate-0 results, for the pairing.
    (`device` is a parameter so that the CPU-only tests run this very code on the CPU.)"""
    rows: list[Row] = []
    paired_with: list[Result] = []
    for entry_name, mode in modes:
        entry = ctx.entries[entry_name]
        scaled = entry.scaled(**ctx.scale)
        cells = scaled.cells([device], [mode])
        reps = scaled.protocol["replicates"]
        setup = _setup(entry, scaled, f"{len(cells) // reps} cells x {reps} replicates, "
                                      f"randomness {scaled.protocol['randomness']}")
        trained: list[workers.Trained] = []

        def run() -> tuple[str, dict[str, Any]]:
            trained.append(train_group(cells, ctx))
            summary = replicate_summary(trained[0].results)
            flags = trained[0].results[0].flags if trained[0].results else None
            env = {k: trained[0].environment.get(k, "absent") for k in ENV_KEYS}
            gap = summary["max_abs_test_acc_diff"]
            text = (f"{summary['identical']} of {summary['pairs']} replicates bitwise identical "
                    f"to their first run (max |d test acc| "
                    f"{'n/a' if gap is None else f'{100 * gap:.2f} pp'})")
            return text, {**summary, "flags": asdict(flags) if flags else None,
                          "environment": env}

        rows.append(attempt(ctx, "determinism", row_name(entry, mode), device, setup, run))
        if (entry_name, mode) == ("determinism", "default") and trained:
            paired_with = [r for r in trained[0].results if r.cell.replicate == 0]
    return rows, paired_with


def row_name(entry: Entry, mode: str) -> str:
    """The mode, led by the model where it is not the lesson's MLP: `lenet strict`."""
    arch = entry.protocol["model"]["arch"]
    return mode if arch == "mlp" else f"{arch} {mode}"


# --- 3. the same cells on the CPU, paired with cuda ----------------------------------------------

def paired_rows(ctx: Context, other: list[Result], device: str = "cuda") -> list[Row]:
    """The CPU runs, then `device` - cpu per setting and over all settings (`other`: the
    default mode's replicate-0 results on `device`)."""
    entry = ctx.entries["determinism"]
    scaled = entry.scaled(**ctx.scale)
    cells = [c for c in scaled.cells(["cpu"], ["default"]) if c.replicate == 0]
    setup = _setup(entry, scaled, f"{len(cells)} cells, mode default, replicate 0")
    cpu: list[Result] = []

    def run_cpu() -> tuple[str, dict[str, Any]]:
        cpu.extend(train_group(cells, ctx).results)
        accs = [r.epochs[-1].test_acc for r in cpu]
        return (f"{len(cpu)} runs, final test accuracy {100 * min(accs):.2f}-"
                f"{100 * max(accs):.2f}%"), {
            "runs": len(cpu), "test_acc": {_label(r.cell): r.epochs[-1].test_acc for r in cpu},
            "statuses": dict(Counter(r.status for r in cpu))}

    rows = [attempt(ctx, "cpu-gpu", "cpu runs", "cpu", setup, run_cpu)]
    settings = sorted({(c.dropout1, c.dropout2) for c in cells})
    for setting in [*settings, None]:
        name = "all settings" if setting is None else f"({setting[0]:g}, {setting[1]:g})"
        rows.append(_paired_row(ctx, name, setting, cpu, other, rows[0], device))
    return rows


def _paired_row(ctx: Context, name: str, setting: tuple[float, float] | None,
                cpu: list[Result], other: list[Result], cpu_row: Row, device: str) -> Row:
    setup = (f"{device} - cpu, paired by cell, final test accuracy, {student_t.LEVEL:.0%} t "
             "interval")
    if setting is None:
        setup += "; one shift taken as common to every setting"
    pair = f"{device} vs cpu"
    if device not in ctx.available:
        return Row("cpu-gpu", name, pair, setup, "skipped", reason=ABSENT[device])
    if cpu_row.status != "ran" or not other:
        why = cpu_row.reason if cpu_row.status != "ran" else \
            f"the {device} default-mode runs did not finish"
        return Row("cpu-gpu", name, pair, setup, "skipped", reason=why)

    def pick(results: list[Result]) -> dict[tuple, Result]:
        return {_cell_id(r.cell): r for r in results
                if setting is None or (r.cell.dropout1, r.cell.dropout2) == setting}
    a, b = pick(other), pick(cpu)
    both = sorted(set(a) & set(b))
    # A diverged run has no test accuracy (NaN): its pair is dropped and counted, as in stats.
    keys = [k for k in both if all(math.isfinite(r[k].epochs[-1].test_acc) for r in (a, b))]
    dropped = len(both) - len(keys)
    if len(keys) < 2:
        return Row("cpu-gpu", name, pair, setup, "skipped",
                   reason=f"{len(keys)} finite pair(s) ({dropped} dropped): a t interval needs 2")
    x = [a[k].epochs[-1].test_acc for k in keys]
    y = [b[k].epochs[-1].test_acc for k in keys]
    t = student_t.paired(x, y, student_t.LEVEL)
    same = sum(a[k].weights_sha256 == b[k].weights_sha256 for k in keys)
    p = "t undefined (no spread)" if t.p is None else f"p = {t.p:.3g}"
    result = (f"{100 * t.mean_diff:+.2f} pp [{100 * t.ci[0]:+.2f}, {100 * t.ci[1]:+.2f}], "
              f"{p}, n = {t.n}; {same} of {t.n} bitwise identical"
              + (f"; {dropped} pair(s) without a finite accuracy dropped" if dropped else ""))
    return Row("cpu-gpu", name, pair, setup, "ran", result,
               values={**asdict(t), "identical": same, "dropped": dropped,
                       f"{device}_test_acc": x, "cpu_test_acc": y})


def _label(cell: Cell) -> str:
    return f"p{cell.dropout1:g}-{cell.dropout2:g} seed{cell.seed}"


# --- 2. batched throughput of the d2l protocol ---------------------------------------------------

def throughput(cells: list[Cell], data: datamod.Dataset, lockstep: bool) -> dict[str, Any]:
    """Wall seconds of `cells` trained batched on `data` (on their device), after an untimed
    one-epoch warm-up on a few minibatches (cuBLAS handles, allocator, thread pools)."""
    device = cells[0].device
    spec = cells[0].config.training
    warm = [replace(c, config=replace(c.config, training=replace(spec, epochs=1))) for c in cells]
    list(batched.fit_many(warm, data.subset(min(len(data.train_y), 4 * spec.batch_size)), lockstep))
    _sync(device)
    start = time.perf_counter()
    done = [r for r, _ in batched.fit_many(cells, data, lockstep)]
    _sync(device)  # results are read back each epoch already; this makes the end explicit
    seconds = time.perf_counter() - start
    member_epochs = sum(len(r.epochs) for r in done)  # a diverged member stops early
    return {"seconds": seconds, "member_epochs": member_epochs,
            "member_epoch_s": seconds / member_epochs,
            "statuses": dict(Counter(r.status for r in done))}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput_rows(ctx: Context) -> list[Row]:
    entry = ctx.entries["d2l-dropout"]
    dataset = functools.cache(ctx.load)  # loaded once, by the first part that runs
    return [_throughput_row(ctx, entry, speed, dataset) for speed in ctx.throughput]


def _throughput_row(ctx: Context, entry: Entry, speed: Speed,
                    dataset: Callable[[], datamod.Dataset]) -> Row:
    device, lockstep = speed.device, speed.lockstep
    scaled = entry.scaled(epochs=speed.epochs)
    cells = scaled.cells([device], ["default"])[:speed.members]

    def setup(images: int) -> str:
        return (f"K = {len(cells)} members, {scaled.epochs} of {entry.epochs} epochs timed on "
                f"{images:,} of {entry.train_images:,} images after a warm-up, "
                f"{torch.get_num_threads()} CPU threads")

    def run() -> tuple[str, dict[str, Any]]:
        data = dataset()
        values = throughput(cells, data.to(device), lockstep)
        images = len(data.train_y)
        # Linear in epochs; in images only roughly (each epoch also tests 10k images).
        per_run_s = values["member_epoch_s"] * entry.epochs * entry.train_images / images
        basis = ("extrapolated linearly to the protocol's epochs" if images == entry.train_images
                 else "scaled linearly in epochs and images: rough")
        return f"{60 / per_run_s:,.1f} runs per minute ({basis})", {
            **values, "train_images": images, "runs_per_minute": 60 / per_run_s, "basis": basis,
            "members": len(cells), "epochs_timed": scaled.epochs, "protocol_epochs": entry.epochs,
            "protocol_train_images": entry.train_images, "threads": torch.get_num_threads()}

    schedule = "lockstep" if lockstep else "side by side"
    row = attempt(ctx, "throughput", schedule, device, setup(scaled.train_images), run)
    return replace(row, setup=setup(row.values.get("train_images", scaled.train_images)))


# --- the report ----------------------------------------------------------------------------------

COLUMNS = ("part", "name", "device", "setup", "status", "result")


def markdown(rows: Sequence[Row], about: dict[str, Any]) -> str:
    def cell(r: Row, c: str) -> str:
        text = r.result if c == "result" and r.status == "ran" else (
            r.reason or "" if c == "result" else str(getattr(r, c)))
        return text.replace("|", "/")
    lines = ["# GPU check", "",
             f"`{about['command']}` on {about['machine']['device_name']} "
             f"(torch {about['machine']['torch_version']}, cuda available: {about['cuda']}), "
             f"{about['started']}, {about['wall_s']:.0f} s"
             f"{'.' if about['complete'] else ', and still running: the parts so far.'}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    skipped = sorted({f"{r.part} on {r.device}: {r.reason}" for r in rows if r.status != "ran"})
    if skipped:
        lines += ["", "Not run:", *(f"- {s}" for s in skipped)]
    lines += ["", "Bitwise identity holds for these cells, this machine, driver and library "
              "versions only (see gpu-check.json: environment per mode). A cpu-gpu interval "
              "that covers 0 has not shown a difference; it does not show the devices agree."]
    return "\n".join(lines) + "\n"


def write(rows: Sequence[Row], about: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = {"about": about, "rows": [asdict(r) for r in rows]}
    (out / "gpu-check.json").write_text(json.dumps(table, indent=1, default=str) + "\n")
    (out / "gpu-check.md").write_text(markdown(rows, about))


# --- entry point ---------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study.tools.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for gpu-check.json/.md")
    parser.add_argument("--epochs", type=int, help="epochs of parts 1 and 3 (default: protocol's)")
    parser.add_argument("--train-subset", type=int,
                        help="images of parts 1 and 3 (default: protocol's)")
    parser.add_argument("--seeds", type=int, help="seeds of parts 1 and 3 (default: protocol's)")
    parser.add_argument("--gpu-epochs", type=int, default=2, help="epochs timed on cuda")
    parser.add_argument("--cpu-epochs", type=int, default=1, help="epochs timed on the CPU")
    parser.add_argument("--members", type=int, default=torch.get_num_threads(),
                        help="members of the CPU throughput (cuda: the protocol's batch_members)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no part starts after this many seconds")
    parser.add_argument("--data", type=Path, help="folder of the four IDX files (default: found "
                        "as `python -m study data` finds them)")
    parser.add_argument("--checksums", type=Path, help="JSON of file name -> MD5 of the unpacked "
                        "IDX content, for other data than Fashion-MNIST (needs --data-cache)")
    parser.add_argument("--data-cache", type=Path, help="where files are unpacked (default data/)")
    parser.add_argument("--pack", type=Path, metavar="DIR",
                        help="copy the four Fashion-MNIST .gz files into DIR and stop")
    parser.add_argument("--write-snapshot", action="store_true",
                        help=f"rewrite {SNAPSHOT.relative_to(ROOT)} from the protocol files")
    args = parser.parse_args(argv)
    for key in ("epochs", "train_subset", "seeds", "gpu_epochs", "cpu_epochs", "members"):
        if (value := getattr(args, key)) is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')}: must be >= 1, got {value}")
    if args.checksums and not args.data_cache:
        parser.error(f"--checksums {args.checksums}: needs --data-cache, or other data would "
                     "replace the unpacked Fashion-MNIST in data/")
    return args


def loader(args: argparse.Namespace) -> Callable[[], datamod.Dataset]:
    kwargs: dict[str, Any] = {"cache": args.data_cache}
    if args.checksums:
        try:
            kwargs["checksums"] = json.loads(args.checksums.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckError(f"{args.checksums}: cannot be read as JSON ({err})") from None
    return functools.partial(datamod.load, args.data, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = " ".join(["python -m study.tools.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.write_snapshot:
            write_snapshot()
            return 0
        if args.pack:
            files = pack(args.pack)
            print(f"wrote {len(files)} files to {args.pack} "
                  f"({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)")
            return 0
        rows = check(args, command)
    except (CheckError, datamod.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r.status == "failed" for r in rows) else 0


def check(args: argparse.Namespace, command: str) -> list[Row]:
    """Every part in turn; the table is rewritten after each, so a check stopped from outside
    (a device call's time limit) still leaves what it finished."""
    started, clock = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.monotonic()
    entries, cuda = load_snapshot(), torch.cuda.is_available()
    ctx = Context(entries, {"epochs": args.epochs, "train_subset": args.train_subset,
                            "seeds": args.seeds}, loader(args),
                  ("cpu", "cuda") if cuda else ("cpu",), clock + args.budget_s, args.budget_s,
                  speeds(args.gpu_epochs, args.cpu_epochs, args.members,
                         entries["d2l-dropout"].protocol["batch_members"]))
    about = {"command": command, "started": started, "complete": False, "wall_s": 0.0,
             "cuda": cuda, "budget_s": args.budget_s, "python": platform.python_version(),
             "snapshot": {n: {"source": e.source, "overrides": list(e.overrides)}
                          for n, e in entries.items()},
             "machine": environment.describe("cuda" if cuda else "cpu"),
             "cpu_count": os.cpu_count()}
    rows: list[Row] = []

    def done(new: list[Row], last: bool = False) -> None:
        rows.extend(new)
        about.update(complete=last, wall_s=time.monotonic() - clock)
        write(rows, about, args.out)

    determinism, default_runs = determinism_rows(ctx)
    done(determinism)
    # Throughput before the CPU half of the pairing: its rows are short, and on a CPU-only
    # machine the pairing's full-size CPU runs are the long part.
    done(throughput_rows(ctx))
    done(paired_rows(ctx, default_runs), last=True)
    print(markdown(rows, about))
    print(f"wrote {args.out / 'gpu-check.json'} and {args.out / 'gpu-check.md'}")
    return rows


if __name__ == "__main__":
    # Through the module's own name: cells pickled for the workers must name
    # `study.tools.gpu_check.ModelSpec`, not `__main__.ModelSpec`, for the workers to read them.
    from study.tools.gpu_check import main as _main
    raise SystemExit(_main())
