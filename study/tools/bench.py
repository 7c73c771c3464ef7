"""Seconds per run-epoch: the textbook loop, the sequential and batched runners, the GEMM floor.

    python -m study.tools.bench                      # make bench; writes reports/bench/bench.json
    python -m study.tools.bench --repeats 11 --members 8
    python -m study.tools.bench --modes-only --mode-rounds 5 --out /tmp/modes.json   # modes' costs only
    python -m study.tools.bench --analysis           # analyze at 1k and 10k runs (bench_analysis.py)
    python -m study.tools.bench --mc-only --mc-passes 16 --out /tmp/mc.json   # C7 passes' added cost

All four are measured in one invocation on one cell of the d2l protocol, setting (0.2, 0.5),
seed 0 (the batched runner trains the protocol's first K cells, that cell among them). The floor
is the time the arithmetic alone needs: one epoch's GEMMs (train forward + backward, test
forward), at the run's own shapes and counts, replayed back to back on warm operands, each
product in its fastest form.

The machine is shared, and its speed drifts by tens of percent within seconds. So the runners
and the floor are timed in short rounds (a few seconds: the floor, one sequential run-epoch,
the batched runner), interleaved, and every ratio is given two ways: best of each (other load
only ever adds time) and the median of the ratios within each round (slower drift cancels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from study.engine import batched, environment, inference, workers
from study.tools import mode_cost
from study.protocol import plan, schema as protocol
from study.engine import data as datamod
from study.engine.data import Dataset
from study.protocol.plan import Cell
from study.engine.seeding import threads as seeding_threads
from study.engine import train as sequential
from study.engine.train import EpochMetrics, train

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "protocols" / "d2l-dropout.yaml"
OUT = ROOT / "reports" / "bench" / "bench.json"
SETTING = (0.2, 0.5)
# The targets on the 2-core development machine, as ratios.
TARGETS = {"batched_over_floor_max": 1.3, "sequential_over_floor_max": 2.0,
           "speedup_over_textbook_min": 8.0}


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one thing, in seconds per (run- or member-) epoch."""

    samples: tuple[float, ...]

    @property
    def best(self) -> float:
        # The headline, as for the floor: on a shared machine other load only ever adds time.
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


RATIOS = {"textbook_over_sequential": ("textbook", "sequential"),
          "textbook_over_batched": ("textbook", "batched"),
          "sequential_over_floor": ("sequential", "floor"),
          "batched_over_floor": ("batched", "floor"),
          "sequential_over_batched": ("sequential", "batched"),
          "sequential_over_peak": ("sequential", "peak"),
          "batched_over_peak": ("batched", "peak")}


@dataclass(frozen=True)
class Bench:
    textbook: Timing  # per run-epoch
    sequential: Timing  # per run-epoch
    batched: Timing  # per member-epoch
    floor: Timing  # per run-epoch: one epoch's GEMMs replayed back to back
    peak: Timing  # per run-epoch: the same GEMMs, each shape at its best single call
    flops_per_epoch: float
    batched_masks_s: float  # share of a batched member-epoch spent drawing dropout masks
    members: int
    epochs: int

    @property
    def gemm_gflops(self) -> float:
        return self.flops_per_epoch / self.floor.best / 1e9

    def ratios(self) -> dict[str, float]:
        """Each ratio of the best timings."""
        return {name: getattr(self, a).best / getattr(self, b).best
                for name, (a, b) in RATIOS.items()}

    def paired(self) -> dict[str, Timing]:
        """Each ratio within every round, for the timings measured in rounds (not the textbook
        loop, which runs last and alone)."""
        return {name: Timing(tuple(x / y for x, y in zip(getattr(self, a).samples,
                                                          getattr(self, b).samples)))
                for name, (a, b) in RATIOS.items() if a != "textbook"}

    def seconds(self) -> dict[str, object]:
        timed = {name: getattr(self, name)
                 for name in ("textbook", "sequential", "batched", "floor", "peak")}
        return {**{f"{k}_s": t.best for k, t in timed.items()},
                **{f"{k}_median_s": t.median for k, t in timed.items()},
                **{f"{k}_samples_s": list(t.samples) for k, t in timed.items()},
                "gemm_gflops": self.gemm_gflops,
                "flops_per_epoch": self.flops_per_epoch, "batched_masks_s": self.batched_masks_s,
                "members": self.members, "epochs": self.epochs}


# --- (a) the textbook loop ----------------------------------------------------------------------

def textbook_net(drops: tuple[float, float], hidden: tuple[int, int] = (256, 256)) -> nn.Sequential:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden[0]), nn.ReLU(), nn.Dropout(drops[0]),
                        nn.Linear(*hidden), nn.ReLU(), nn.Dropout(drops[1]), nn.Linear(hidden[1], 10))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
    return net


def textbook_loaders(root: Path, batch: int, workers: int,
                     subset: int | None = None) -> tuple[DataLoader, DataLoader]:
    """d2l's `load_data_fashion_mnist`: torchvision datasets through ToTensor and DataLoaders."""
    from torchvision import datasets, transforms
    tf = transforms.ToTensor()
    train_ds = datasets.FashionMNIST(str(root), train=True, transform=tf, download=False)
    test_ds = datasets.FashionMNIST(str(root), train=False, transform=tf, download=False)
    if subset is not None:
        train_ds = torch.utils.data.Subset(train_ds, range(subset))
    return (DataLoader(train_ds, batch, shuffle=True, num_workers=workers),
            DataLoader(test_ds, batch, shuffle=False, num_workers=workers))


def textbook_epoch(net: nn.Module, train_iter: Iterable, test_iter: Iterable,
                   updater: torch.optim.Optimizer) -> tuple[float, float, float]:
    """d2l's `train_epoch_ch3` then `evaluate_accuracy`, as `train_ch3` runs them each epoch."""
    loss = nn.CrossEntropyLoss(reduction="none")
    net.train()
    total, hits, seen = 0.0, 0.0, 0
    for x, y in train_iter:
        y_hat = net(x)
        l = loss(y_hat, y)
        updater.zero_grad()
        l.mean().backward()
        updater.step()
        total += float(l.detach().sum())
        hits += float((y_hat.argmax(1) == y).sum())
        seen += y.numel()
    net.eval()
    right, count = 0.0, 0
    with torch.no_grad():
        for x, y in test_iter:
            right += float((net(x).argmax(1) == y).sum())
            count += y.numel()
    return total / seen, hits / seen, right / count


def time_textbook(root: Path, cell: Cell, epochs: int, workers: int = 4,
                  subset: int | None = None) -> list[float]:
    """Seconds of each of `epochs` textbook epochs (each one respawns its DataLoader workers,
    as d2l's loop does)."""
    spec = cell.config.training
    train_iter, test_iter = textbook_loaders(root, spec.batch_size, workers, subset)
    net = textbook_net((cell.dropout1, cell.dropout2), cell.config.model.hidden)
    updater = torch.optim.SGD(net.parameters(), lr=spec.lr)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        textbook_epoch(net, train_iter, test_iter, updater)
        seconds.append(time.perf_counter() - start)
    return seconds


# --- (b), (c) the project's runners ------------------------------------------------------------

def time_sequential(cell: Cell, data: Dataset) -> float:
    start = time.perf_counter()
    train(cell, data)
    return (time.perf_counter() - start) / cell.config.training.epochs


def time_batched(cells: list[Cell], data: Dataset) -> float:
    """Seconds per member-epoch."""
    start = time.perf_counter()
    for _ in batched.train_many(cells, data):
        pass
    return (time.perf_counter() - start) / (len(cells) * cells[0].config.training.epochs)


def time_masks(cells: list[Cell], data: Dataset) -> float:
    """Wall seconds per member-epoch spent drawing masks (fresh streams, one epoch's draws)."""
    spec = cells[0].config.training
    hidden = cells[0].config.model.hidden
    streams = [batched.Member.of(c).masks for c in cells]
    n = len(data.train_y)
    start = time.perf_counter()
    for lo in range(0, n, spec.batch_size):
        for s in streams:
            s.masks(min(spec.batch_size, n - lo), hidden)
    # Drawn on one thread here; side by side, each worker thread draws its own member's masks.
    return (time.perf_counter() - start) / len(cells) / torch.get_num_threads()


# --- (d) the arithmetic floor --------------------------------------------------------------------

def gemm_shapes(n_train: int, n_test: int, batch: int,
                dims: list[int]) -> list[tuple[int, int, int, int, bool]]:
    """(m, k, n, count, transposed_a) of every GEMM of one epoch: forward, dW, dX (layers 2+)."""
    layers = list(zip(dims[:-1], dims[1:]))
    sizes = [batch] * (n_train // batch) + ([n_train % batch] if n_train % batch else [])
    shapes: dict[tuple[int, int, int, bool], int] = {}

    def add(key: tuple[int, int, int, bool]) -> None:
        shapes[key] = shapes.get(key, 0) + 1
    for b in sizes:
        for i, (fan_in, fan_out) in enumerate(layers):
            add((b, fan_in, fan_out, False))  # x @ W
            add((fan_in, b, fan_out, True))  # dW = x^T @ g
            if i > 0:
                add((b, fan_out, fan_in, False))  # dx = g @ W^T
    for fan_in, fan_out in layers:
        add((n_test, fan_in, fan_out, False))
    return [(m, k, n, count, t) for (m, k, n, t), count in shapes.items()]


@dataclass(frozen=True)
class EpochGemms:
    """One epoch's GEMMs on fixed fp32 operands: (a, b, out, count) per shape, and their FLOPs."""

    ops: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int], ...]
    flops: float

    @staticmethod
    def of(n_train: int, n_test: int, batch: int, dims: list[int]) -> EpochGemms:
        """Each product in the fastest of its forms here: C = A B or C^T = B^T A^T, with the
        first operand stored either way. Thin products (10 classes) run several times faster in
        some forms than others, and a floor must not charge for a slow one."""
        ops, flops = [], 0.0
        for m, k, n, count, _ in gemm_shapes(n_train, n_test, batch, dims):
            forms = [_operands(rows, k, cols, transposed)
                     for rows, cols in ((m, n), (n, m)) for transposed in (False, True)]
            ops.append((*min(forms, key=lambda f: _best_call(*f, calls=3)), count))
            flops += count * 2.0 * m * k * n
        return EpochGemms(tuple(ops), flops)

    def replay(self) -> float:
        """Seconds to run every GEMM of the epoch once, back to back: the floor. Timed whole, it
        spans about as long as a measured run-epoch, so both see the same kind of moment."""
        start = time.perf_counter()
        for a, b, out, count in self.ops:
            for _ in range(count):
                torch.mm(a, b, out=out)
        return time.perf_counter() - start

    def peak(self, calls: int = 10) -> float:
        """Seconds if every GEMM ran as fast as the best of `calls` single calls of its shape:
        a stricter bound than the replay, from millisecond windows, shown beside it."""
        return sum(count * _best_call(a, b, out, calls) for a, b, out, count in self.ops)


def _operands(m: int, k: int, n: int,
              transposed_a: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(k, m).t() if transposed_a else torch.randn(m, k)
    return a, torch.randn(k, n), torch.empty(m, n)


def _best_call(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return best


# --- batched members against their sequential twins ---------------------------------------------

def sequential_twin(cell: Cell, data: Dataset) -> tuple[nn.Module, tuple[EpochMetrics, ...]]:
    """What `train.train` does, keeping the model."""
    net, result = sequential.fit(cell, data)
    return net, result.epochs


@dataclass(frozen=True)
class Gap:
    cell: str
    max_abs_weight: float  # max |batched - sequential| over all parameters
    test_acc: float  # batched - sequential final test accuracy
    train_loss: float


def twin_gaps(cells: list[Cell], data: Dataset, lockstep: bool | None = None) -> list[Gap]:
    """Train `cells` batched and each alone; how far the final weights and accuracies drift.

    Gaps come in the order of `cells` (batched members may finish in any order)."""
    gaps = []
    done = sorted(batched.fit_many(cells, data, lockstep), key=lambda r: cells.index(r[0].cell))
    for result, net in done:
        cell = replace(result.cell, config=replace(result.cell.config, execution="sequential"))
        twin, epochs = sequential_twin(cell, data)
        ours, theirs = net.state_dict(), twin.state_dict()
        drift = max(float((ours[k] - theirs[k].cpu()).abs().max()) for k in ours)
        gaps.append(Gap(cell.name, drift, result.epochs[-1].test_acc - epochs[-1].test_acc,
                        result.epochs[-1].train_loss - epochs[-1].train_loss))
    return gaps


# --- the whole bench -----------------------------------------------------------------------------

def cells_of(path: Path, epochs: int, subset: int | None = None) -> list[Cell]:
    # Training only: the C7 passes after it are timed on their own (`time_passes`).
    overrides = [f"training.epochs={epochs}", "execution=batched", "inference.mc_passes=0"]
    if subset is not None:
        overrides.append(f"data.train_subset={subset}")
    return plan.expand(protocol.load(path, overrides))


def measure(epochs: int, members: int, root: Path, data: Dataset, protocol_path: Path = PROTOCOL,
            workers: int = 4, subset: int | None = None, repeats: int = 7) -> Bench:
    """`repeats` rounds, each timing the floor and both runners once, after an untimed warm-up.

    On the CPU the batched runner trains `members` cells side by side, one per core at a time, so
    its cost per member-epoch does not depend on K; a few members keep a round about as long as
    the others' (`make study` runs all 60 at once).
    """
    cells = cells_of(protocol_path, epochs, subset)
    cell = next(c for c in cells if (c.dropout1, c.dropout2) == SETTING and c.seed == 0)
    group = [cell] + [c for c in cells if c != cell][:members - 1]
    data = data.subset(subset)
    gemms = EpochGemms.of(len(data.train_y), len(data.test_y), cell.config.training.batch_size,
                          [784, *cell.config.model.hidden, 10])
    sequential_cell = replace(cell, config=replace(cell.config, execution="sequential"))
    # Warm-up: thread pools, allocator growth and first-touch page faults land here, not in the
    # first timed round.
    warm = data.subset(min(len(data.train_y), 4 * cell.config.training.batch_size))
    time_sequential(sequential_cell, warm)
    time_batched(group[:2], warm)
    gemms.replay()
    runs: dict[str, list[float]] = {"floor": [], "peak": [], "sequential": [], "batched": []}
    for _ in range(repeats):
        runs["floor"].append(gemms.replay())
        runs["peak"].append(gemms.peak())
        runs["sequential"].append(time_sequential(sequential_cell, data))
        runs["batched"].append(time_batched(group, data))
    masks_s = time_masks(group, data)
    # The textbook loop goes last: its DataLoader worker processes would otherwise still be
    # exiting, competing for the 2 cores, while the runners are timed.
    textbook = time_textbook(root, cell, epochs * repeats, workers, subset)
    timed = {name: Timing(tuple(samples)) for name, samples in runs.items()}
    return Bench(textbook=Timing(tuple(textbook)), **timed, flops_per_epoch=gemms.flops,
                 batched_masks_s=masks_s, members=len(group), epochs=epochs)


# --- what each determinism mode costs ------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One timed configuration: a determinism mode, and for `portable` its GEMM path."""

    mode: str
    kernels: str = "openblas-haswell"

    @property
    def label(self) -> str:
        return f"{self.mode}[{self.kernels}]" if self.kernels != "openblas-haswell" else self.mode


# portable[torch] is the portable of before issue 22 (MKL_CBWR=COMPATIBLE), for comparison.
COST_VARIANTS = (Variant("default"), Variant("strict"), Variant("portable"),
                 Variant("portable", "torch"))
ENGINES = ("sequential", "batched")


@dataclass(frozen=True)
class ModeCost:
    """A variant's CPU time per run-epoch against default's, on one engine."""

    engine: str
    variant: str
    samples: Timing
    default: Timing

    @property
    def best(self) -> float:
        return self.samples.best / self.default.best

    @property
    def paired_median(self) -> float:
        """Median of the per-round ratios: the headline (rounds interleave the variants)."""
        return statistics.median(x / y for x, y in zip(self.samples.samples, self.default.samples))

    def to_json(self) -> dict[str, object]:
        return {"engine": self.engine, "variant": self.variant, "best": self.best,
                "paired_median": self.paired_median,
                "seconds_per_epoch": list(self.samples.samples),
                "default_seconds_per_epoch": list(self.default.samples)}


def _timed_cpu(cell: Cell, per_worker: int, load) -> float:
    """Fastest CPU seconds per epoch of `cell` over `per_worker` trainings in one fresh worker,
    after a first one that warms pools and pages."""
    (group,) = workers.groups([cell] * (1 + per_worker), load)
    timed = workers.trained(group).results[1:]
    return min(r.cpu_seconds / len(r.epochs) for r in timed)


def time_modes(cell: Cell, subset: int | None, rounds: int, per_worker: int = 3,
               load=datamod.load, engines: tuple[str, ...] = ENGINES,
               variants: tuple[Variant, ...] = COST_VARIANTS) -> dict[tuple[str, str], Timing]:
    """CPU seconds per run-epoch of `cell` under each variant and engine, at one thread, keyed
    (engine, variant label). A mode's arithmetic (MKL_CBWR, ATen, oneDNN and OpenBLAS pins) is
    fixed when a process starts, so each measurement is a fresh worker. CPU time of one thread,
    not wall time: on the shared 2-core machine wall times of one mode spread 10x with the
    neighbours' load, CPU times by a few percent (a sequential run: its process's; a batched
    member: its own thread's). Engines and variants alternate within each round, so drift hits
    them alike."""
    base = replace(cell, config=replace(cell.config, randomness="portable", threads=1))
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for engine in engines:
            for v in variants:
                config = replace(base.config, execution=engine, kernels=v.kernels)
                timed = _timed_cpu(replace(base, config=config, determinism=v.mode), per_worker,
                                   load)
                samples.setdefault((engine, v.label), []).append(timed)
    return {k: Timing(tuple(v)) for k, v in samples.items()}


def mode_costs(timings: dict[tuple[str, str], Timing]) -> list[ModeCost]:
    """Each variant against default on the same engine."""
    return [ModeCost(engine, label, t, timings[engine, "default"])
            for (engine, label), t in timings.items() if label != "default"]


# --- what the stochastic test-set passes (C7) add ------------------------------------------------


def time_passes(cell: Cell, data: Dataset, passes: int, rounds: int) -> dict[str, Timing]:
    """CPU seconds at one thread of one batched member-epoch of `cell` (side by side: each member
    alone on one core, as `make study` trains) and of its `passes` stochastic test-set passes
    after that epoch, in the same round. One thread, CPU time: on the shared machine wall times
    spread with the neighbours' load. The member-epoch includes its test-set evaluation, as
    every epoch of `make study` does."""
    cell = replace(cell, config=replace(cell.config, training=replace(cell.config.training,
                                                                      epochs=1), mc_passes=0))
    with_passes = replace(cell, config=replace(cell.config, mc_passes=passes))
    out: dict[str, list[float]] = {"member_epoch": [], "passes": []}
    with seeding_threads(1):
        # Warm-up: pools, allocator growth and first-touch page faults land here.
        next(batched.fit_many([cell], data.subset(min(len(data.train_y), 4 * 256))))
        for _ in range(rounds):
            start = time.process_time()
            (_, net), = list(batched.fit_many([cell], data))
            out["member_epoch"].append(time.process_time() - start)
            start = time.process_time()
            inference.mc_passes(with_passes, net, data, sequential.seeds_of(cell))
            out["passes"].append(time.process_time() - start)
    return {k: Timing(tuple(v)) for k, v in out.items()}


def pass_cost(timings: dict[str, Timing], passes: int, epochs: int) -> dict[str, object]:
    """The passes against a run's `epochs` member-epochs: the share they add to its training."""
    epoch, extra = timings["member_epoch"], timings["passes"]
    return {"passes": passes, "epochs": epochs, "clock": "process CPU time, 1 thread",
            "added_share_best": extra.best / (epochs * epoch.best),
            "added_share_paired_median": statistics.median(
                p / (epochs * e) for p, e in zip(extra.samples, epoch.samples)),
            "member_epoch_seconds": list(epoch.samples), "passes_seconds": list(extra.samples)}


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if "model name" in line),
               platform.processor())
    return {"cpu": cpu, "cpu_model": environment.cpu_model(), "cpu_isa": environment.cpu_isa(),
            "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(),
            # The machine may be shared: the load says how much the numbers can be trusted.
            "load_average": list(os.getloadavg())}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def targets_met(ratios: dict[str, float]) -> dict[str, bool]:
    met = {"batched_over_floor": ratios["batched_over_floor"] <= TARGETS["batched_over_floor_max"],
           "sequential_over_floor":
               ratios["sequential_over_floor"] <= TARGETS["sequential_over_floor_max"]}
    if "textbook_over_batched" in ratios:
        met["speedup_over_textbook"] = min(ratios["textbook_over_sequential"],
                                           ratios["textbook_over_batched"]) \
            >= TARGETS["speedup_over_textbook_min"]
    return met


def report(bench: Bench) -> dict[str, object]:
    ratios, paired = bench.ratios(), bench.paired()
    medians = {name: t.median for name, t in paired.items()}
    return {"seconds_per_epoch": bench.seconds(), "ratios": ratios,
            "paired_ratios": {name: {"median": t.median, "rounds": list(t.samples)}
                              for name, t in paired.items()},
            "targets": TARGETS,
            "targets_met": {"best": targets_met(ratios), "paired_median": targets_met(medians)},
            "cell": {"setting": list(SETTING), "seed": 0}, "machine": machine()}


def show(bench: Bench) -> str:
    r, paired = bench.ratios(), bench.paired()

    def line(label: str, t: Timing, unit: str) -> str:
        return f"{label:16s}{t.best:8.3f} s per {unit} (median {t.median:.3f} of {len(t.samples)})"

    def ratio(name: str) -> str:
        within = paired[name]
        return (f"{name.replace('_over_', '/'):22s}{r[name]:6.2f}x best of each, "
                f"{within.median:.2f}x median within a round "
                f"({min(within.samples):.2f}-{max(within.samples):.2f})")
    return "\n".join([
        line("textbook loop", bench.textbook, "run-epoch"),
        line("sequential", bench.sequential, "run-epoch"),
        line(f"batched (K={bench.members})", bench.batched, "member-epoch")
        + f", masks ~{bench.batched_masks_s:.3f}",
        line("GEMM floor", bench.floor, "run-epoch")
        + f", {bench.flops_per_epoch / 1e9:.1f} GFLOP at {bench.gemm_gflops:.0f} GFLOP/s",
        line("GEMM peak", bench.peak, "run-epoch") + ", each shape at its best single call",
        f"textbook/sequential {r['textbook_over_sequential']:.1f}x, "
        f"textbook/batched {r['textbook_over_batched']:.1f}x (best of each)",
        *(ratio(name) for name in ("sequential_over_floor", "batched_over_floor",
                                   "sequential_over_peak", "batched_over_peak"))])


def show_gaps(gaps: list[Gap]) -> str:
    lines = ["batched member vs its sequential twin (2000 images, 2 epochs): "
             "max |dweight|, d test acc, d train loss"]
    lines += [f"  {g.cell:40s} {g.max_abs_weight:9.2e} {g.test_acc:+.4f} {g.train_loss:+.2e}"
              for g in gaps]
    return "\n".join(lines)


def runners(args: argparse.Namespace) -> dict[str, object]:
    """The runners against the GEMM floor and the textbook loop, and the batched twins' gaps."""
    source = datamod.locate()
    datamod.stage(source)
    data = datamod.load(source)
    bench = measure(args.epochs, args.members, datamod.CACHE, data, workers=args.workers,
                    repeats=args.repeats)
    print(show(bench))
    gaps = twin_gaps(cells_of(PROTOCOL, 2, 2000)[:len(protocol.load(PROTOCOL).dropout)],
                     data.subset(2000))
    print(show_gaps(gaps))
    return {**report(bench), "twin_gaps": {"train_subset": 2000, "epochs": 2,
                                           "members": [asdict(g) for g in gaps]}}


def show_costs(costs: list[ModeCost], subset: int, rounds: int) -> str:
    lines = [f"determinism modes against default, CPU time at 1 thread ({subset} images, "
             f"1 epoch, fresh workers, {rounds} rounds alternating):"]
    lines += [f"  {c.engine:10s} {c.variant + '/default':28s}{c.paired_median:6.2f}x median "
              f"within a round, {c.best:.2f}x best of each" for c in costs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--analysis" in argv:
        from study.tools import bench_analysis
        return bench_analysis.main([a for a in argv if a != "--analysis"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2].strip())
    parser.add_argument("--epochs", type=int, default=1, help="epochs timed per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="rounds, each timing every runner")
    parser.add_argument("--members", type=int, default=2 * torch.get_num_threads(),
                        help="K cells in the batched model (default: two per CPU thread)")
    parser.add_argument("--workers", type=int, default=4, help="textbook DataLoader workers")
    parser.add_argument("--mode-rounds", type=int, default=3,
                        help="rounds timing default / strict / portable (CPU time, 1 thread)")
    parser.add_argument("--mode-subset", type=int, default=10_000,
                        help="training images of the mode timing (one epoch)")
    parser.add_argument("--modes-only", action="store_true",
                        help="time only the determinism modes (writes only those to --out)")
    parser.add_argument("--mc-passes", type=int, default=16,
                        help="stochastic test-set passes timed against a member-epoch (C7)")
    parser.add_argument("--mc-rounds", type=int, default=5)
    parser.add_argument("--mc-only", action="store_true",
                        help="time only the C7 passes (writes only those to --out)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--costs-out", type=Path, default=mode_cost.PATH,
                        help="where the modes' measured costs go, with date, machine and "
                             "command: what `study run` and `study plan` quote (default "
                             "docs/measured/mode-costs.json, committed from the last run)")
    args = parser.parse_args(argv)
    if args.mc_only:
        return _mc_main(args)
    cell = next(c for c in cells_of(PROTOCOL, 1) if (c.dropout1, c.dropout2) == SETTING)
    costs = mode_costs(time_modes(cell, args.mode_subset, args.mode_rounds))
    print(show_costs(costs, args.mode_subset, args.mode_rounds))
    out: dict[str, object] = {"mode_costs": {"train_subset": args.mode_subset, "epochs": 1,
                                             "threads": 1, "rounds": args.mode_rounds,
                                             "clock": "CPU time (sequential: process; batched: "
                                                      "member thread)",
                                             "costs": [c.to_json() for c in costs]},
                              "machine": machine()}
    write_costs(args.costs_out, costs, argv)
    if not args.modes_only:
        out = {**runners(args), **out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def write_costs(path: Path, costs: list[ModeCost], argv: list[str]) -> None:
    """The modes' costs where `study run` and `study plan` read them (study.tools.mode_cost)."""
    command = " ".join(["python -m study.tools.bench", *argv])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mode_cost.record([c.to_json() for c in costs], machine(), command,
                                                datetime.date.today().isoformat()),
                               indent=2) + "\n")
    print(f"wrote {path}")


def _mc_main(args: argparse.Namespace) -> int:
    """The C7 passes' cost against the d2l protocol's training (its epochs), on its data."""
    spec = protocol.load(PROTOCOL)
    cell = next(c for c in plan.expand(spec) if (c.dropout1, c.dropout2) == SETTING)
    data = datamod.load().subset(spec.data.train_subset)
    cost = pass_cost(time_passes(cell, data, args.mc_passes, args.mc_rounds), args.mc_passes,
                     spec.training.epochs)
    print(f"{args.mc_passes} passes add {cost['added_share_paired_median']:.1%} (median of "
          f"rounds; {cost['added_share_best']:.1%} best of each) to {spec.training.epochs} "
          "member-epochs of training, CPU time at 1 thread")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mc_cost": cost, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
