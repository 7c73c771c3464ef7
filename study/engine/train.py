"""One cell in, one result out: the textbook training loop on in-memory tensors. No MLflow here.

Metrics follow d2l's `train_ch3`: train loss and accuracy are averaged over the epoch's examples
in train mode (dropout on); test accuracy is measured on the whole test set in eval mode after
every epoch, or every `training.eval_every` epochs and after the last (NaN in between).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from study.engine import kernels as gemms
from study.engine import model as models
from study.engine.data import Dataset
from study.engine.inference import McResult, mc_passes
from study.protocol.plan import Cell
from study.engine.seeding import Arithmetic, Flags, StreamSeeds, generator, global_dropout_rng, stream_seeds

CHANCE = 1.0 / models.CLASSES
# A run whose final test accuracy is this close to chance learned nothing (e.g. dropout 1.0).
DEGENERATE_MARGIN = 0.05


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    test_acc: float  # NaN on epochs without a test evaluation (training.eval_every)


@dataclass(frozen=True)
class Result:
    cell: Cell
    epochs: tuple[EpochMetrics, ...]
    status: str  # ok | degenerate | diverged
    textbook_check: bool  # d2l's `assert train_loss < 0.5 and train_acc > 0.7 and test_acc > 0.7`
    weights_sha256: str
    seconds: float
    keep_rates: tuple[float | None, ...]  # observed share of live units each dropout layer kept
    streams: StreamSeeds
    flags: Flags | None = None  # determinism flags in effect, filled in by the worker
    arithmetic: Arithmetic | None = None  # what the worker process started with
    threads: int | None = None
    started: float | None = None  # Unix time its training began (the MLflow run's start)
    # CPU time of the training (the process's, all its threads; a batched member's own thread
    # on the CPU), for costs on a shared machine where wall time also measures the neighbours.
    # None where not measured (members in lockstep).
    cpu_seconds: float | None = None
    # The stochastic test-set passes after training (`config.mc_passes` > 0), else None.
    inference: McResult | None = None
    # The GEMM path that trained it (study.engine.kernels); None on results from before it.
    kernels: str | None = None


@dataclass(frozen=True)
class EpochDone:
    """A run finished an epoch: progress only (engines that train many runs at once report it,
    so the driver's bar moves per member-epoch instead of jumping when a chunk ends)."""

    key: str
    epoch: int


def seeds_of(cell: Cell) -> StreamSeeds:
    return stream_seeds(cell.seed, cell.vary, cell.config.fixed_seed)


def mask_generator(cell: Cell, seeds: StreamSeeds) -> models.MaskGenerator | None:
    """Where masks come from: None means nn.Dropout's global generator (native `torch`).

    Portable `torch` masks come from a NumPy SFC64 seeded with the dropout seed; portable
    hand-written masks from a CPU torch generator, as the book's code draws them.
    """
    if cell.mask_rng == "sfc64":  # decided once, in the plan, and recorded as that param
        return np.random.SFC64(seeds.dropout)
    if cell.implementation == "torch":
        return None
    return generator(seeds.dropout, "cpu" if cell.config.randomness == "portable" else cell.device)


def train(cell: Cell, data: Dataset) -> Result:
    """Train one cell on `data` (already on `cell.device`)."""
    return fit(cell, data)[1]


def fit(cell: Cell, data: Dataset) -> tuple[nn.Module, Result]:
    """`train`, also handing back the trained model (for the benchmark's twin comparison)."""
    seeds = seeds_of(cell)
    gen = mask_generator(cell, seeds)
    drops = tuple(models.make_dropout(p, cell.implementation, gen)
                  for p in (cell.dropout1, cell.dropout2))
    net = initial_net(cell, drops, seeds)
    rng_scope = global_dropout_rng(seeds.dropout, cell.device) if gen is None \
        else contextlib.nullcontext()
    started, start, cpu = time.time(), time.perf_counter(), time.process_time()
    with rng_scope:
        epochs = _fit(net, cell, data, generator(seeds.data))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return net, Result(
        cell=cell, epochs=epochs, status=status_of(epochs, cell.config.training.epochs),
        textbook_check=textbook_check(epochs), weights_sha256=weights_sha256(net),
        seconds=seconds, keep_rates=models.keep_rates(net), streams=seeds,
        started=started, cpu_seconds=cpu_seconds, inference=inference(cell, net, data, epochs),
        kernels=cell.kernels)


def inference(cell: Cell, net: nn.Module, data: Dataset,
              epochs: tuple[EpochMetrics, ...]) -> McResult | None:
    """The cell's stochastic test-set passes, or None: none asked, or the run diverged (its
    weights are not finite, so there is nothing to predict with)."""
    if not cell.config.mc_passes or status_of(epochs, cell.config.training.epochs) == "diverged":
        return None
    return mc_passes(cell, net, data, seeds_of(cell))


def initial_net(cell: Cell, drops: tuple[nn.Module, nn.Module], seeds: StreamSeeds) -> nn.Module:
    """The cell's model at its initial weights: from the init stream, then, for `vary: bitflip`,
    one bit flipped by the cell's seed (all streams stay at the fixed seed)."""
    net = models.build(cell.config.model, drops, generator(seeds.init), cell.device,
                       gemms.linear_class(cell.kernels))
    if cell.vary == "bitflip":
        models.flip_lowest_bit(net, cell.seed)
    return net


def _fit(net: nn.Module, cell: Cell, data: Dataset, order: torch.Generator) -> tuple[EpochMetrics, ...]:
    spec = cell.config.training
    opt = torch.optim.SGD(net.parameters(), lr=spec.lr)
    epochs: list[EpochMetrics] = []
    for epoch in range(1, spec.epochs + 1):
        loss, acc = _train_epoch(net, opt, data, spec.batch_size, order)
        if not math.isfinite(loss):
            epochs.append(EpochMetrics(epoch, loss, acc, float("nan")))
            break  # diverged: the rest of the run cannot recover
        test_acc = evaluate(net, data.test_x, data.test_y) if spec.evaluated(epoch) else math.nan
        epochs.append(EpochMetrics(epoch, loss, acc, test_acc))
    return tuple(epochs)


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, data: Dataset, batch: int,
                 order: torch.Generator) -> tuple[float, float]:
    net.train()
    n = len(data.train_y)
    # The order is drawn on the CPU so that the same seed shuffles the same way on every device.
    perm = torch.randperm(n, generator=order).to(data.train_x.device)
    loss_sum = torch.zeros((), device=data.train_x.device)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.long)
    for idx in perm.split(batch):
        # index_select: ~4x faster than advanced indexing for a row gather on the CPU.
        x, y = data.train_x.index_select(0, idx), data.train_y.index_select(0, idx)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Summed on the device: a .item() here would force a GPU sync every minibatch.
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return float(loss_sum) / n, float(correct) / n


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return int((net(x).argmax(1) == y).sum()) / len(y)


def status_of(epochs: tuple[EpochMetrics, ...], planned: int) -> str:
    last = epochs[-1]
    if len(epochs) < planned or not math.isfinite(last.train_loss):
        return "diverged"
    return "degenerate" if last.test_acc <= CHANCE + DEGENERATE_MARGIN else "ok"


def textbook_check(epochs: tuple[EpochMetrics, ...]) -> bool:
    last = epochs[-1]
    return last.train_loss < 0.5 and last.train_acc > 0.7 and last.test_acc > 0.7


def weights_sha256(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
