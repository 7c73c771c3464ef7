"""Batched execution: K cells train as one stacked MLP, each member exactly as it would alone.

    python -m study run protocols/d2l-dropout.yaml      # the d2l protocol runs batched

Every member keeps its own streams (init, data order, dropout masks), drawn in the order and with
the shortcuts of the sequential path (`study.train`), so a member's randomness never depends on
which cells share its batch. Only the arithmetic differs: batched GEMMs may sum in another order,
so weights can differ from the sequential twin in the last bits.

The forward and backward passes are written out by hand: per member, the loss is its own mean
cross-entropy, so the gradients of the summed loss stay independent per member, and the SGD step
is fused into the weight-gradient GEMM (`baddbmm_` with alpha=-lr). lr=0.5 is a power of two, so
the fused update rounds exactly like `param.add_(grad, alpha=-lr)` given the same product.

Two schedules run that same `step` (the members' weights live in one stack [K, in, out]):
- on the CPU, side by side: each member trains alone, on a one-row slice of the stack, one
  member per core at a time (`fit_side_by_side`);
- on accelerators, in lockstep: all K members take each minibatch step together, one batched
  GEMM per layer (`fit_lockstep`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from study.engine import kernels as gemms
from study.engine import model as models
from study.engine import train as sequential
from study.engine.data import Dataset
from study.protocol.plan import Cell
from study.engine.seeding import StreamSeeds, generator
from study.engine.train import EpochDone, EpochMetrics, Result

if TYPE_CHECKING:  # annotations only: workers and the GPU check run without pydantic and YAML
    from study.protocol.schema import Training

# Members per slice of one step: 8 members' activations (8 x 256 x 256 floats = 2 MiB each) stay
# in the L2/L3 caches between the GEMMs and the elementwise passes; all 60 at once (16 MiB each)
# would stream every elementwise pass through memory.
BLOCK = 8
# Test images per evaluation slice: bounds the [rows, members * hidden] activations to ~20 MiB.
TEST_CHUNK = 2500


class BatchedError(ValueError):
    """Cells that batched execution cannot train exactly as their sequential twins."""


# --- grouping -----------------------------------------------------------------------------------

def members(group: list[Cell]) -> Iterator[list[Cell]]:
    """Chunks of at most `batch_members` cells that share model, training, data and device."""
    buckets: dict[tuple, list[Cell]] = {}
    for cell in group:
        _check_supported(cell)
        buckets.setdefault((cell.config, cell.device, cell.determinism), []).append(cell)
    for cells in buckets.values():
        size = cells[0].config.batch_members
        for start in range(0, len(cells), size):
            yield cells[start:start + size]


def _check_supported(cell: Cell) -> None:
    if cell.config.model.arch != "mlp":
        raise BatchedError(f"{cell.name}: batched execution covers the MLP only; "
                           f"use execution: sequential for arch {cell.config.model.arch!r}")
    if sequential.mask_generator(cell, sequential.seeds_of(cell)) is None and cell.device != "cpu":
        # nn.Dropout on CUDA draws inside a fused kernel from the global Philox stream; no
        # explicit-generator call reproduces it per member.
        raise BatchedError(f"{cell.name}: native nn.Dropout masks on {cell.device} cannot be "
                           "reproduced per member; use randomness: portable or sequential")


# --- per-member randomness ----------------------------------------------------------------------

@dataclass
class MaskStream:
    """One member's dropout stream: the draws its sequential twin makes, in the same order.

    Each draw is `model.scaled_mask`, the very function the sequential `model.Dropout` calls;
    native nn.Dropout on the CPU is its "bernoulli" kind (tests/test_batched.py checks both).
    Layers with p=0 or p=1 draw nothing, as in the sequential path.
    """

    probs: tuple[float, ...]
    kind: str  # a `model.scaled_mask` kind
    gen: models.MaskGenerator

    def draws(self, layer: int) -> bool:
        return 0.0 < self.probs[layer] < 1.0

    def masks(self, rows: int, widths: Sequence[int]) -> dict[int, torch.Tensor]:
        """Scaled masks [rows, width] of the layers that draw for one minibatch, layer 1 first."""
        return {i: self.draw(i, rows, widths[i]) for i in range(len(self.probs)) if self.draws(i)}

    def draw(self, layer: int, rows: int, width: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """One layer's scaled mask [rows, width] (into `out` if given); the layer must draw."""
        return models.scaled_mask(self.probs[layer], self.kind, torch.Size((rows, width)),
                                  self.gen, out)


def mask_stream(cell: Cell, seeds: StreamSeeds) -> MaskStream:
    gen = sequential.mask_generator(cell, seeds)
    if gen is None:
        # Native nn.Dropout on the CPU: bernoulli_ on the global generator seeded with the
        # dropout seed, i.e. the same mt19937 stream as an explicit generator with that seed.
        return MaskStream((cell.dropout1, cell.dropout2), "bernoulli", generator(seeds.dropout))
    return MaskStream((cell.dropout1, cell.dropout2), models.MASK_KINDS[cell.implementation], gen)


# --- stacked parameters -------------------------------------------------------------------------

@dataclass
class Stack:
    """K MLPs laid out for bmm: weights [K, in, out] (nn.Linear's transposed), biases [K, 1, out].

    The last weight is a transposed view of [K, out, in] storage (see `initial_stack`).
    """

    w: list[torch.Tensor]
    b: list[torch.Tensor]

    def rows(self, sel: slice | torch.Tensor) -> Stack:
        """A slice is a view (updates reach the stack); an index tensor makes a compacted copy."""
        return Stack([w[sel] for w in self.w], [b[sel] for b in self.b])


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def initial_stack(cells: Sequence[Cell], device: str) -> Stack:
    """Each member's initial weights from `model.build` with its own init stream, stacked.

    The last layer is stored as nn.Linear stores it, [K, classes, hidden], and seen transposed:
    its thin products then run about 4x faster (see `logits`).
    """
    nets = [sequential.initial_net(c, (nn.Identity(), nn.Identity()), sequential.seeds_of(c))
            for c in cells]
    layers = [_linears(net) for net in nets]
    w = [torch.stack([ls[i].weight.detach().t() for ls in layers]).to(device)
         for i in range(len(layers[0]) - 1)]
    w.append(torch.stack([ls[-1].weight.detach() for ls in layers]).to(device).transpose(1, 2))
    b = [torch.stack([ls[i].bias.detach()[None] for ls in layers]).to(device)
         for i in range(len(layers[0]))]
    return Stack(w, b)


def _template(cell: Cell, init: torch.Generator) -> nn.Sequential:
    # Dropout layers hold no state, so Identity gives the sequential model's state_dict layout.
    return models.build(cell.config.model, (nn.Identity(), nn.Identity()), init, "cpu",
                        gemms.linear_class(cell.kernels))


def member_net(cell: Cell, stack: Stack, row: int) -> nn.Sequential:
    """One member as the sequential model (same state_dict names, shapes, dtypes), on the CPU."""
    net = _template(cell, generator(0))
    with torch.no_grad():
        for layer, w, b in zip(_linears(net), stack.w, stack.b):
            layer.weight.copy_(w[row].t())
            layer.bias.copy_(b[row, 0])
    return net


# --- one minibatch step -------------------------------------------------------------------------

@dataclass
class StepStats:
    """Per-member sums over one epoch, kept on the device (one transfer per epoch)."""

    loss: torch.Tensor  # [K] float: sum of minibatch loss * minibatch size
    correct: torch.Tensor  # [K] long
    alive: torch.Tensor  # [K, 2] long: non-zero inputs to each dropout layer (counted steps)
    kept: torch.Tensor  # [K, 2] long: of those, non-zero after dropout

    @staticmethod
    def zeros(k: int, device: str | torch.device) -> StepStats:
        return StepStats(torch.zeros(k, device=device), torch.zeros(k, dtype=torch.long, device=device),
                         torch.zeros(k, 2, dtype=torch.long, device=device),
                         torch.zeros(k, 2, dtype=torch.long, device=device))

    def count(self, rows: slice, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add each dropout layer's (input, output) non-zeros, as `model.KeepRate` counts them."""
        self.alive[rows] += torch.stack([torch.count_nonzero(h, (1, 2)) for h, _ in layers], 1)
        self.kept[rows] += torch.stack([torch.count_nonzero(d, (1, 2)) for _, d in layers], 1)


def minibatches(n: int, batch: int, epoch: int) -> Iterator[tuple[int, int]]:
    """(step index counted from the run's first minibatch, first row) of each minibatch of
    `epoch` (1-based): `model.KeepRate` counts its calls across epochs, so the index does too."""
    per_epoch = math.ceil(n / batch)
    for i, start in enumerate(range(0, n, batch)):
        yield (epoch - 1) * per_epoch + i, start


def counted(step_index: int) -> bool:
    """Whether the keep rates count this minibatch: the steps `model.KeepRate` counts."""
    return step_index % models.KeepRate.EVERY == 0


def logits(k: gemms.Kernels, b: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The last layer, h @ w + b as [K, rows, classes]; on MKL formed as (w^T h^T + b^T)^T.

    With only 10 outputs, MKL forms this product 3-4x faster as [classes, rows] than as
    [rows, classes] (one thread, 256 rows: 51 against 155 us; its weight gradient, written into
    the [K, classes, hidden] storage, 44 against 212 us). Same FLOPs, other summation order.
    OpenBLAS is faster the plain way round (`Kernels.classes_first`).
    """
    if not k.classes_first:
        return k.baddbmm(b, h, w)
    return k.baddbmm(b.transpose(1, 2), w.transpose(1, 2), h.transpose(1, 2)).transpose(1, 2)


def step(k: gemms.Kernels, p: Stack, x: torch.Tensor, y: torch.Tensor,
         masks: Sequence[torch.Tensor | None], lr: float, stats: StepStats, rows: slice,
         count: bool) -> None:
    """One SGD step of members `rows`: x [c, B, 784], y [c, B], scaled masks [c, B, hidden],
    its GEMMs on kernels `k`.

    A mask of None is a layer without dropout in any member (p=0): no multiply at all.
    """
    n = y.shape[1]
    h1 = k.baddbmm(p.b[0], x, p.w[0]).relu_()
    d1 = h1 if masks[0] is None else h1 * masks[0]
    h2 = k.baddbmm(p.b[1], d1, p.w[1]).relu_()
    d2 = h2 if masks[1] is None else h2 * masks[1]
    out = logits(k, p.b[2], p.w[2], d2)
    logp = out.log_softmax(2)
    target = y.unsqueeze(2)
    stats.loss[rows] -= logp.gather(2, target).sum((1, 2))  # mean loss * n, as train.py sums
    stats.correct[rows] += (out.argmax(2) == y).sum(1)
    if count:
        stats.count(rows, [(h1, d1), (h2, d2)])
    # d(mean CE)/d logits = (softmax - onehot) / n, per member: members stay independent.
    grad = logp.exp_().scatter_add_(2, target, torch.full(target.shape, -1.0, device=x.device))
    grad.div_(n)
    back2 = k.bmm(grad, p.w[2].transpose(1, 2))  # before w3 moves
    _sgd(k, p, 2, d2, grad, lr)
    grad = _through_dropout_relu(back2, masks[1], d2)
    back1 = k.bmm(grad, p.w[1].transpose(1, 2))
    _sgd(k, p, 1, d1, grad, lr)
    _sgd(k, p, 0, x, _through_dropout_relu(back1, masks[0], d1), lr)


def _through_dropout_relu(grad: torch.Tensor, mask: torch.Tensor | None,
                          out: torch.Tensor) -> torch.Tensor:
    """d loss / d pre-activation from d loss / d (relu(h) * mask); `out` is relu(h) * mask.

    Masks are >= 0, so out > 0 exactly where h > 0 and the unit was kept; elsewhere the
    gradient is 0 either way. ReLU's own backward kernel gates on `out` in one pass.
    """
    if mask is not None:
        grad = grad.mul_(mask)
    return torch.ops.aten.threshold_backward(grad, out, 0.0)


def _sgd(k: gemms.Kernels, p: Stack, layer: int, inputs: torch.Tensor, grad: torch.Tensor,
         lr: float) -> None:
    # Fused: w += -lr * inputs^T @ grad inside the GEMM, no gradient tensor written to memory.
    k.baddbmm_(p.w[layer], inputs.transpose(1, 2), grad, -lr)
    p.b[layer].add_(grad.sum(1, keepdim=True), alpha=-lr)


# --- members ------------------------------------------------------------------------------------

@dataclass
class Member:
    cell: Cell
    seeds: StreamSeeds
    order: torch.Generator
    masks: MaskStream
    epochs: list[EpochMetrics] = field(default_factory=list)
    alive: list[int] = field(default_factory=lambda: [0, 0])
    kept: list[int] = field(default_factory=lambda: [0, 0])

    @staticmethod
    def of(cell: Cell) -> Member:
        seeds = sequential.seeds_of(cell)
        return Member(cell, seeds, generator(seeds.data), mask_stream(cell, seeds))

    @property
    def kernels(self) -> gemms.Kernels:
        """Its GEMM path; a chunk's members share it (they share config, device and mode)."""
        return gemms.of(self.cell.kernels)

    def keep_rates(self) -> tuple[float | None, ...]:
        return tuple(k / a if a else None for k, a in zip(self.kept, self.alive))


@torch.no_grad()
def test_accuracy(k: gemms.Kernels, stack: Stack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eval-mode accuracy of every member on the whole test set, [K]."""
    correct = torch.zeros(stack.w[0].shape[0], dtype=torch.long, device=x.device)
    for lo in range(0, len(correct), BLOCK):
        rows = slice(lo, lo + BLOCK)
        p = stack.rows(rows)
        c, _, hidden = p.w[0].shape
        # Layer 1 as one wide mm: the test images are shared, so no per-member copy of them.
        wide = p.w[0].permute(1, 0, 2).reshape(x.shape[1], c * hidden)
        for start in range(0, len(y), TEST_CHUNK):
            xs, ys = x[start:start + TEST_CHUNK], y[start:start + TEST_CHUNK]
            h = k.mm(xs, wide).view(len(ys), c, hidden).transpose(0, 1).add_(p.b[0]).relu_()
            h = k.baddbmm(p.b[1], h, p.w[1]).relu_()
            correct[rows] += (logits(k, p.b[2], p.w[2], h).argmax(2) == ys).sum(1)
    return correct


def _record(group: Sequence[Member], stats: StepStats, test: torch.Tensor | None, epoch: int,
            n_train: int, n_test: int) -> list[bool]:
    """Append this epoch's metrics to each member (test None: not evaluated this epoch, NaN);
    return which members stayed finite."""
    loss, correct = stats.loss.tolist(), stats.correct.tolist()
    alive, kept = stats.alive.tolist(), stats.kept.tolist()
    test_correct = [math.nan] * len(group) if test is None else test.tolist()
    finite = []
    for k, m in enumerate(group):
        m.alive = [a + b for a, b in zip(m.alive, alive[k])]
        m.kept = [a + b for a, b in zip(m.kept, kept[k])]
        ok = math.isfinite(loss[k] / n_train)
        test_acc = test_correct[k] / n_test if ok else float("nan")
        m.epochs.append(EpochMetrics(epoch, loss[k] / n_train, correct[k] / n_train, test_acc))
        finite.append(ok)
    return finite


# A member's result and its final weights as the sequential model.
Fitted = tuple[Result, nn.Sequential]


def _result(m: Member, stack: Stack, row: int, seconds: float, started: float,
            data: Dataset) -> Fitted:
    """A member's result, its stochastic test-set passes made by the sequential code on its
    weights as the sequential model (so a member's passes are its twin's, given the weights)."""
    epochs = tuple(m.epochs)
    net = member_net(m.cell, stack, row)
    result = Result(cell=m.cell, epochs=epochs,
                     status=sequential.status_of(epochs, m.cell.config.training.epochs),
                     textbook_check=sequential.textbook_check(epochs),
                     weights_sha256=sequential.weights_sha256(net), seconds=seconds,
                     keep_rates=m.keep_rates(), streams=m.seeds, started=started,
                     inference=sequential.inference(m.cell, net, data, epochs),
                     kernels=m.cell.kernels)
    return result, net


# --- CPU: each member alone on one core, members side by side -----------------------------------
#
# Each member trains its whole run on one worker thread with single-threaded GEMMs: no hand-offs
# between threads inside a step. On the 2-core machine this costs the same as lockstep within
# noise (K=60, one epoch, alternating: 0.905 and 0.937 vs 0.970 and 0.934 s per member-epoch),
# and each run finishes on its own: the progress bar moves per run, results are logged as they
# come, and an interrupted study loses only the runs in flight, not the whole chunk of K.
# The arithmetic is the same `step`, on a one-member stack.

def member_epoch(p: Stack, m: Member, data: Dataset, batch: int, lr: float,
                 epoch: int) -> StepStats:
    """One epoch of one member (a one-row stack): its own order, masks and minibatches."""
    n = len(data.train_y)
    perm = torch.randperm(n, generator=m.order)  # as train._train_epoch draws it
    masks = MaskBuffers([m], batch, [w.shape[2] for w in p.w[:-1]], "cpu")
    x_buf = torch.empty(batch, data.train_x.shape[1])
    stats = StepStats.zeros(1, "cpu")
    for step_index, start in minibatches(n, batch, epoch):
        idx = perm[start:start + batch]
        x = torch.index_select(data.train_x, 0, idx, out=x_buf[:len(idx)])
        step(m.kernels, p, x[None], data.train_y[idx][None], masks.draw(len(idx)), lr, stats,
             slice(0, 1), counted(step_index))
    return stats


def fit_member(m: Member, p: Stack, data: Dataset, spec: Training, stop: threading.Event,
               on_epoch: Callable[[EpochDone], None]) -> Fitted | None:
    """Train one member to the end (or to divergence); None if `stop` was set meanwhile."""
    torch.set_num_threads(1)  # this thread's GEMMs and elementwise passes stay on its core
    started, start, cpu = time.time(), time.perf_counter(), time.thread_time()
    for epoch in range(1, spec.epochs + 1):
        if stop.is_set():
            return None
        stats = member_epoch(p, m, data, spec.batch_size, spec.lr, epoch)
        test = test_accuracy(m.kernels, p, data.test_x, data.test_y) if spec.evaluated(epoch) \
            else None
        finite = _record([m], stats, test, epoch, len(data.train_y), len(data.test_y))[0]
        on_epoch(EpochDone(m.cell.key, epoch))
        if not finite:
            break
    # The CPU time of this member's own thread: all of its training ran here (one thread each).
    cpu_seconds = time.thread_time() - cpu
    # Its passes run here, on this member's core, beside the members still training.
    result, net = _result(m, p, 0, time.perf_counter() - start, started, data)
    return replace(result, cpu_seconds=cpu_seconds), net


def fit_side_by_side(cells: list[Cell], data: Dataset) -> Iterator[Fitted | EpochDone]:
    """Each member on its own worker thread, as many workers as torch has CPU threads.

    Results come as members finish, each member's epochs as they end (the member threads put
    both on one queue; this generator, in the caller's thread, hands them on). A member's
    `seconds` is its own wall time divided by the number of workers: its share of the machine,
    comparable with a sequential run's seconds.
    """
    workers = torch.get_num_threads()
    stack = initial_stack(cells, "cpu")
    spec = cells[0].config.training
    stop = threading.Event()
    events: queue.SimpleQueue[Future | EpochDone] = queue.SimpleQueue()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="member")
    try:
        for k, c in enumerate(cells):
            job = pool.submit(fit_member, Member.of(c), stack.rows(slice(k, k + 1)), data, spec,
                              stop, events.put)
            job.add_done_callback(events.put)
        running = len(cells)
        while running:
            event = events.get()
            if isinstance(event, EpochDone):
                yield event
                continue
            running -= 1
            if (done := event.result()) is not None:  # None: stopped, only after we stop asking
                result, net = done
                yield replace(result, seconds=result.seconds / workers), net
    finally:
        stop.set()  # an interrupted chunk stops its running members at their next epoch
        pool.shutdown(wait=True, cancel_futures=True)


# --- accelerators: all members in lockstep, one batched GEMM per layer --------------------------

class MaskBuffers:
    """A group's scaled masks per minibatch, [K, rows, width] per layer, in reused CPU buffers.

    Rows of p=0 / p=1 members are filled once (ones / zeros) and never drawn. A layer with p=0
    in every member comes back as None: the step skips its multiply. With a pool, members draw
    in parallel, each from its own stream.
    """

    def __init__(self, group: Sequence[Member], batch: int, widths: Sequence[int], device: str,
                 pool: ThreadPoolExecutor | None = None):
        self.group, self.widths, self.device, self.pool = group, widths, device, pool
        self.bufs = [torch.empty(len(group), batch, w) for w in widths]
        for k, m in enumerate(group):
            for i, p in enumerate(m.masks.probs):
                if p == 0.0 or p == 1.0:
                    self.bufs[i][k].fill_(1.0 if p == 0.0 else 0.0)
        self.unmasked = [all(m.masks.probs[i] == 0.0 for m in group) for i in range(len(widths))]

    def draw(self, rows: int) -> list[torch.Tensor | None]:
        """This minibatch's masks on the device (None: no dropout in that layer)."""
        if self.pool is None:
            self._draw(range(len(self.group)), rows)
        else:
            halves = [range(0, len(self.group), 2), range(1, len(self.group), 2)]
            list(self.pool.map(lambda ks: self._draw(ks, rows), halves))
        return [None if skip else buf[:, :rows].to(self.device)
                for buf, skip in zip(self.bufs, self.unmasked)]

    def _draw(self, ks: range, rows: int) -> None:
        for k in ks:
            masks = self.group[k].masks
            for i, width in enumerate(self.widths):
                if masks.draws(i):
                    masks.draw(i, rows, width, self.bufs[i][k, :rows])


def train_epoch(stack: Stack, group: Sequence[Member], data: Dataset, batch: int, lr: float,
                pool: ThreadPoolExecutor, epoch: int) -> StepStats:
    device = data.train_x.device
    n = len(data.train_y)
    # Each member's own order, drawn on the CPU once per epoch exactly like train._train_epoch.
    perms = torch.stack([torch.randperm(n, generator=m.order) for m in group]).to(device)
    widths = [w.shape[2] for w in stack.w[:-1]]
    masks = MaskBuffers(group, batch, widths, str(device), pool)
    stats = StepStats.zeros(len(group), device)
    for step_index, start in minibatches(n, batch, epoch):
        idx = perms[:, start:start + batch]
        scaled = masks.draw(idx.shape[1])
        for lo in range(0, len(group), BLOCK):
            rows = slice(lo, lo + BLOCK)
            sel = idx[rows]
            x = data.train_x[sel.reshape(-1)].view(*sel.shape, -1)
            step(group[0].kernels, stack.rows(rows), x, data.train_y[sel],
                 [None if s is None else s[rows] for s in scaled], lr, stats, rows,
                 counted(step_index))
    return stats


def fit_lockstep(cells: list[Cell], data: Dataset) -> Iterator[Fitted | EpochDone]:
    """All members step together, BLOCK at a time. A member whose epoch loss is not finite is
    recorded as diverged at the end of that epoch and dropped from the stack; the others go on.
    A member's `seconds` is its share of the batch's wall time."""
    spec = cells[0].config.training
    group = [Member.of(c) for c in cells]
    stack = initial_stack(cells, cells[0].device)
    started, start = time.time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="masks") as pool:
        for epoch in range(1, spec.epochs + 1):
            stats = train_epoch(stack, group, data, spec.batch_size, spec.lr, pool, epoch)
            test = test_accuracy(group[0].kernels, stack, data.test_x, data.test_y) \
                if spec.evaluated(epoch) else None
            finite = _record(group, stats, test, epoch, len(data.train_y), len(data.test_y))
            yield from (EpochDone(m.cell.key, epoch) for m in group)
            seconds = (time.perf_counter() - start) / len(cells)
            yield from (_result(m, stack, k, seconds, started, data)
                        for k, m in enumerate(group) if not finite[k])
            if not all(finite):
                alive = [k for k in range(len(group)) if finite[k]]
                if not alive:
                    return
                group = [group[k] for k in alive]
                stack = stack.rows(torch.tensor(alive, device=stack.w[0].device))
    seconds = (time.perf_counter() - start) / len(cells)
    yield from (_result(m, stack, k, seconds, started, data) for k, m in enumerate(group))


# --- the run ------------------------------------------------------------------------------------

def train_many(cells: list[Cell], data: Dataset,
               progress: bool = False) -> Iterator[Result | EpochDone]:
    """Train `cells` as one batched model on `data` (already on their device); a result per cell
    and, with `progress`, an `EpochDone` per member and epoch as it ends.

    A member whose epoch loss is not finite is recorded as diverged (as the sequential path
    does); the others go on.
    """
    for event in _events(cells, data, None):
        if isinstance(event, EpochDone):
            if progress:
                yield event
        else:
            yield event[0]


def fit_many(cells: list[Cell], data: Dataset,
             lockstep: bool | None = None) -> Iterator[Fitted]:
    """`train_many`, each result with its member's final weights as the sequential model.

    `lockstep` picks the schedule; by default side by side on the CPU, lockstep elsewhere.
    Either way each member computes exactly the same `step`s.
    """
    for event in _events(cells, data, lockstep):
        if not isinstance(event, EpochDone):
            yield event


def _events(cells: list[Cell], data: Dataset, lockstep: bool | None) -> Iterator[Fitted | EpochDone]:
    for cell in cells:
        _check_supported(cell)
    if lockstep is None:
        lockstep = cells[0].device != "cpu"
    yield from (fit_lockstep if lockstep else fit_side_by_side)(cells, data)
