"""Batched execution: K cells train as one stacked MLP, each member exactly as it would alone.

    python -m study run protocols/d2l-dropout.yaml --set execution=batched

Every member keeps its own streams (init, data order, dropout masks), drawn in the order and with
the shortcuts of the sequential path (`study.train`), so a member's randomness never depends on
which cells share its batch. Only the arithmetic differs: batched GEMMs may sum in another order,
so weights can differ from the sequential twin in the last bits.

The forward and backward passes are written out by hand: per member, the loss is its own mean
cross-entropy, so the gradients of the summed loss stay independent per member, and the SGD step
is fused into the weight-gradient GEMM (`baddbmm_` with alpha=-lr). lr=0.5 is a power of two, so
the fused update rounds exactly like `param.add_(grad, alpha=-lr)` given the same product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from study import model as models
from study import train as sequential
from study.data import Dataset
from study.plan import Cell
from study.seeding import StreamSeeds, generator
from study.train import EpochMetrics, Result

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
    Layers with p=0 or p=1 draw nothing, as in the sequential path; their rows stay constant.
    """

    probs: tuple[float, ...]
    kind: str  # a `model.scaled_mask` kind
    gen: torch.Generator

    def draws(self, layer: int) -> bool:
        return 0.0 < self.probs[layer] < 1.0

    def masks(self, rows: int, widths: Sequence[int]) -> dict[int, torch.Tensor]:
        """Scaled masks [rows, width] of the layers that draw for one minibatch, layer 1 first."""
        return {i: models.scaled_mask(self.probs[i], self.kind, torch.Size((rows, widths[i])),
                                      self.gen)
                for i in range(len(self.probs)) if self.draws(i)}


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
    """K MLPs laid out for bmm: weights [K, in, out] (nn.Linear's transposed), biases [K, 1, out]."""

    w: list[torch.Tensor]
    b: list[torch.Tensor]

    def rows(self, sel: slice | torch.Tensor) -> Stack:
        """A slice is a view (updates reach the stack); an index tensor makes a compacted copy."""
        return Stack([w[sel] for w in self.w], [b[sel] for b in self.b])


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def initial_stack(cells: Sequence[Cell], device: str) -> Stack:
    """Each member's initial weights from `model.build` with its own init stream, stacked."""
    nets = [_template(c, generator(sequential.seeds_of(c).init)) for c in cells]
    layers = [_linears(net) for net in nets]
    w = [torch.stack([ls[i].weight.detach().t() for ls in layers]).to(device)
         for i in range(len(layers[0]))]
    b = [torch.stack([ls[i].bias.detach()[None] for ls in layers]).to(device)
         for i in range(len(layers[0]))]
    return Stack(w, b)


def _template(cell: Cell, init: torch.Generator) -> nn.Sequential:
    # Dropout layers hold no state, so Identity gives the sequential model's state_dict layout.
    return models.build(cell.config.model, (nn.Identity(), nn.Identity()), init, "cpu")


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
    alive: torch.Tensor  # [K, 2] long: non-zero inputs to each dropout layer
    kept: torch.Tensor  # [K, 2] long: of those, non-zero after dropout

    @staticmethod
    def zeros(k: int, device: str | torch.device) -> StepStats:
        return StepStats(torch.zeros(k, device=device), torch.zeros(k, dtype=torch.long, device=device),
                         torch.zeros(k, 2, dtype=torch.long, device=device),
                         torch.zeros(k, 2, dtype=torch.long, device=device))


def step(p: Stack, x: torch.Tensor, y: torch.Tensor, masks: Sequence[torch.Tensor], lr: float,
         stats: StepStats, rows: slice) -> None:
    """One SGD step of members `rows`: x [c, B, 784], y [c, B], scaled masks [c, B, hidden]."""
    n = y.shape[1]
    h1 = torch.baddbmm(p.b[0], x, p.w[0]).relu_()
    d1 = h1 * masks[0]
    h2 = torch.baddbmm(p.b[1], d1, p.w[1]).relu_()
    d2 = h2 * masks[1]
    logits = torch.baddbmm(p.b[2], d2, p.w[2])
    logp = logits.log_softmax(2)
    target = y.unsqueeze(2)
    stats.loss[rows] -= logp.gather(2, target).sum((1, 2))  # mean loss * n, as train.py sums
    stats.correct[rows] += (logits.argmax(2) == y).sum(1)
    live1, live2 = h1 > 0, h2 > 0
    stats.alive[rows] += torch.stack([live1.sum((1, 2)), live2.sum((1, 2))], 1)
    stats.kept[rows] += torch.stack([torch.count_nonzero(d1, (1, 2)),
                                     torch.count_nonzero(d2, (1, 2))], 1)
    # d(mean CE)/d logits = (softmax - onehot) / n, per member: members stay independent.
    grad = logp.exp_().scatter_add_(2, target, torch.full(target.shape, -1.0, device=x.device))
    grad.div_(n)
    back2 = torch.bmm(grad, p.w[2].transpose(1, 2))  # before w3 moves
    _sgd(p, 2, d2, grad, lr)
    grad = back2.mul_(masks[1]).mul_(live2)
    back1 = torch.bmm(grad, p.w[1].transpose(1, 2))
    _sgd(p, 1, d1, grad, lr)
    grad = back1.mul_(masks[0]).mul_(live1)
    _sgd(p, 0, x, grad, lr)


def _sgd(p: Stack, layer: int, inputs: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    # Fused: w += -lr * inputs^T @ grad inside the GEMM, no gradient tensor written to memory.
    p.w[layer].baddbmm_(inputs.transpose(1, 2), grad, alpha=-lr)
    p.b[layer].add_(grad.sum(1, keepdim=True), alpha=-lr)


# --- epochs -------------------------------------------------------------------------------------

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

    def keep_rates(self) -> tuple[float | None, ...]:
        return tuple(k / a if a else None for k, a in zip(self.kept, self.alive))


class MaskBuffers:
    """Scaled masks [K, batch, width] per layer; rows of p=0 / p=1 members are filled once."""

    def __init__(self, group: Sequence[Member], batch: int, widths: Sequence[int], device: str,
                 pool: ThreadPoolExecutor):
        self.group, self.widths, self.device, self.pool = group, widths, device, pool
        self.bufs = [torch.empty(len(group), batch, w, device=device) for w in widths]
        for k, m in enumerate(group):
            for i, p in enumerate(m.masks.probs):
                if p == 0.0 or p == 1.0:
                    self.bufs[i][k].fill_(1.0 if p == 0.0 else 0.0)

    def draw(self, rows: int) -> list[torch.Tensor]:
        """This minibatch's masks; members draw in parallel, each from its own generator."""
        halves = [range(0, len(self.group), 2), range(1, len(self.group), 2)]
        list(self.pool.map(lambda ks: self._draw(ks, rows), halves))
        return [buf[:, :rows] for buf in self.bufs]

    def _draw(self, ks: range, rows: int) -> None:
        for k in ks:
            m = self.group[k]
            for i, mask in m.masks.masks(rows, self.widths).items():
                self.bufs[i][k, :rows].copy_(mask)


def train_epoch(stack: Stack, group: Sequence[Member], data: Dataset, batch: int, lr: float,
                pool: ThreadPoolExecutor) -> StepStats:
    device = data.train_x.device
    n = len(data.train_y)
    # Each member's own order, drawn on the CPU once per epoch exactly like train._train_epoch.
    perms = torch.stack([torch.randperm(n, generator=m.order) for m in group]).to(device)
    widths = [w.shape[2] for w in stack.w[:-1]]
    masks = MaskBuffers(group, batch, widths, str(device), pool)
    stats = StepStats.zeros(len(group), device)
    for start in range(0, n, batch):
        idx = perms[:, start:start + batch]
        scaled = masks.draw(idx.shape[1])
        for lo in range(0, len(group), BLOCK):
            rows = slice(lo, lo + BLOCK)
            sel = idx[rows]
            x = data.train_x[sel.reshape(-1)].view(*sel.shape, -1)
            step(stack.rows(rows), x, data.train_y[sel], [s[rows] for s in scaled], lr, stats, rows)
    return stats


@torch.no_grad()
def test_accuracy(stack: Stack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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
            h = (xs @ wide).view(len(ys), c, hidden).transpose(0, 1).add_(p.b[0]).relu_()
            h = torch.baddbmm(p.b[1], h, p.w[1]).relu_()
            logits = torch.baddbmm(p.b[2], h, p.w[2])
            correct[rows] += (logits.argmax(2) == ys).sum(1)
    return correct


# --- the run ------------------------------------------------------------------------------------

def train_many(cells: list[Cell], data: Dataset) -> Iterator[Result]:
    """Train `cells` as one batched model on `data` (already on their device); a result per cell.

    A member whose epoch loss is not finite is recorded as diverged at the end of that epoch
    (as the sequential path does) and dropped from the stack; the others go on.
    """
    for result, _ in fit_many(cells, data):
        yield result


def fit_many(cells: list[Cell], data: Dataset) -> Iterator[tuple[Result, nn.Sequential]]:
    """`train_many`, each result with its member's final weights as the sequential model."""
    for cell in cells:
        _check_supported(cell)
    spec = cells[0].config.training
    group = [Member.of(c) for c in cells]
    stack = initial_stack(cells, cells[0].device)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="masks") as pool:
        for epoch in range(1, spec.epochs + 1):
            stats = train_epoch(stack, group, data, spec.batch_size, spec.lr, pool)
            test = test_accuracy(stack, data.test_x, data.test_y)
            finite = _record(group, stats, test, epoch, len(data.train_y), len(data.test_y))
            seconds = (time.perf_counter() - start) / len(cells)
            yield from (_result(m, stack, k, seconds) for k, m in enumerate(group) if not finite[k])
            if not all(finite):
                alive = [k for k in range(len(group)) if finite[k]]
                if not alive:
                    return
                group = [group[k] for k in alive]
                stack = stack.rows(torch.tensor(alive, device=stack.w[0].device))
    seconds = (time.perf_counter() - start) / len(cells)
    yield from (_result(m, stack, k, seconds) for k, m in enumerate(group))


def _record(group: Sequence[Member], stats: StepStats, test: torch.Tensor, epoch: int,
            n_train: int, n_test: int) -> list[bool]:
    """Append this epoch's metrics to each member; return which members stayed finite."""
    loss, correct = stats.loss.tolist(), stats.correct.tolist()
    alive, kept, test_correct = stats.alive.tolist(), stats.kept.tolist(), test.tolist()
    finite = []
    for k, m in enumerate(group):
        m.alive = [a + b for a, b in zip(m.alive, alive[k])]
        m.kept = [a + b for a, b in zip(m.kept, kept[k])]
        ok = math.isfinite(loss[k] / n_train)
        test_acc = test_correct[k] / n_test if ok else float("nan")
        m.epochs.append(EpochMetrics(epoch, loss[k] / n_train, correct[k] / n_train, test_acc))
        finite.append(ok)
    return finite


def _result(m: Member, stack: Stack, row: int, seconds: float) -> tuple[Result, nn.Sequential]:
    """`seconds` is this member's share of the batch's wall time."""
    epochs = tuple(m.epochs)
    net = member_net(m.cell, stack, row)
    result = Result(cell=m.cell, epochs=epochs,
                     status=sequential.status_of(epochs, m.cell.config.training.epochs),
                     textbook_check=sequential.textbook_check(epochs),
                     weights_sha256=sequential.weights_sha256(net), seconds=seconds,
                     keep_rates=m.keep_rates(), streams=m.seeds)
    return result, net
