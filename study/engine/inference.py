"""Dropout left on at inference (claim C7): T stochastic passes over the test set after training.

    python -m study run protocols/d2l-dropout.yaml    # its `inference: {mc_passes: T}` turns it on

The lesson: "at inference you don't need dropout; you can use it, but it adds randomness and you
must compute several times; the first pass says cat, the second may say dog". After training,
in the worker that trained it, the network makes T forward passes over the test set with its
dropout layers on, and is scored against its eval-mode (dropout off) predictions:

- flip rate: per image, the share of the T(T-1)/2 pass pairs whose predicted classes differ,
  averaged over images; exact from each image's class counts n_c:
  (T^2 - sum_c n_c^2) / (T (T - 1)), no loop over pairs;
- unstable share: images whose predicted class changes at least once in the T passes;
- accuracy, negative log-likelihood and expected calibration error (ECE_BINS equal-width
  confidence bins) of the averaged softmax (MC) and of the eval-mode softmax.

Masks: each (pass, layer) draws from its own generator, spawned from the run's `inference`
stream (`seeding`) with spawn key (pass, layer), on the CPU, with the mask law the run trained
with (`mask_kind`). So the passes are repeatable, the same on every device and engine given the
same weights, and paired across settings: with SFC64 masks two settings of one seed compare
the same 32-bit words against different thresholds, so their masks are nested.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from study.engine import model as models
from study.engine.data import Dataset
from study.protocol.plan import Cell
from study.engine.seeding import StreamSeeds, generator
# Test images per forward slice: bounds the LeNet's convolution activations (~50 MB).
CHUNK = 2500
# Equal-width confidence bins of the ECE. Workers import only torch, numpy and the standard
# library (make gpu-check runs without pandas), so this is not study.results.ECE_BINS, which
# the analysis reads; tests/test_inference.py holds the two equal.
ECE_BINS = 15


@dataclass(frozen=True)
class Scores:
    """One set of test-set predictions scored against the labels."""

    accuracy: float
    nll: float  # mean -log p(true class), natural log
    ece: float  # expected calibration error over ECE_BINS equal-width bins of max-probability


@dataclass(frozen=True)
class McResult:
    passes: int
    flip_rate: float
    unstable_share: float
    eval: Scores  # dropout off (eval mode), as test_acc is measured
    mc: Scores  # the softmax averaged over the T passes
    # The test image whose prediction flips most often (lowest index among ties); None when no
    # image ever flipped.
    flip_example: int | None
    seconds: float  # wall time of the passes and the scoring, in the thread that ran them


# --- the numbers, from predictions -------------------------------------------------------------


def pair_flip_rates(counts: np.ndarray) -> np.ndarray:
    """counts: [n, C] how many of T >= 2 passes predicted each class -> [n] share of pass pairs
    that disagree. Pairs agreeing on class c: n_c (n_c - 1) / 2 out of T (T - 1) / 2."""
    counts = np.asarray(counts, dtype=np.int64)
    t = counts.sum(1)
    if (t < 2).any():
        raise ValueError("every image needs at least 2 passes to flip between")
    return (t * t - (counts * counts).sum(1)) / (t * (t - 1))


def unstable(counts: np.ndarray) -> np.ndarray:
    """counts: [n, C] -> [n] bool: the predicted class changed at least once."""
    counts = np.asarray(counts)
    return counts.max(1) < counts.sum(1)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """probs: [n, C] rows summing to 1, labels: [n] -> mean -log p(label). A probability that
    underflowed to 0 counts as the smallest positive float64, not as infinity."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(p, np.finfo(np.float64).tiny)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """probs: [n, C], labels: [n] -> sum over bins of (share of images) x |accuracy - mean
    confidence|, confidence = max probability, bins (k/B, (k+1)/B] (the first also holds 0)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    # Per bin |sum(correct) - sum(conf)| / n_total = (n_bin / n_total) |acc_bin - conf_bin|.
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, conf, bins))
    return float(gap.sum() / len(labels))


def scores(probs: np.ndarray, labels: np.ndarray) -> Scores:
    return Scores(float((probs.argmax(1) == labels).mean()), nll(probs, labels), ece(probs, labels))


def flip_example(counts: np.ndarray) -> int | None:
    rates = pair_flip_rates(counts)
    return int(rates.argmax()) if rates.max() > 0 else None


def summarise(counts: np.ndarray, mean_probs: np.ndarray, eval_probs: np.ndarray,
              labels: np.ndarray, seconds: float = 0.0) -> McResult:
    """counts [n, C] (class counts over the passes), mean_probs and eval_probs [n, C], labels
    [n] -> the run's C7 numbers."""
    return McResult(passes=int(np.asarray(counts)[0].sum()),
                    flip_rate=float(pair_flip_rates(counts).mean()),
                    unstable_share=float(unstable(counts).mean()),
                    eval=scores(eval_probs, labels), mc=scores(mean_probs, labels),
                    flip_example=flip_example(counts), seconds=seconds)


# --- the passes ----------------------------------------------------------------------------------


def mask_kind(cell: Cell) -> str:
    """The mask law the run trained with: SFC64 for portable `torch`, nn.Dropout's Bernoulli for
    native `torch`, the book's or the lesson's hand-written mask for the scratch ones."""
    if cell.mask_rng == "sfc64":
        return "sfc64"
    return "bernoulli" if cell.implementation == "torch" else models.MASK_KINDS[cell.implementation]


def pass_generator(seed: int, step: int, layer: int, kind: str) -> models.MaskGenerator:
    """The generator of one (pass, layer), spawned from the inference stream's seed: no pass's
    draws depend on another's, nor on which layers draw (p = 0 and p = 1 draw nothing)."""
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(step, layer))
    if kind == "sfc64":
        return np.random.SFC64(seq)
    return generator(int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))


class PassMasks:
    """One pass's masks [n_test, width] per dropout layer, drawn whole at first use so that the
    forward can go slice by slice."""

    def __init__(self, probs: tuple[float, ...], kind: str, seed: int, step: int):
        self.probs, self.kind, self.seed, self.step = probs, kind, seed, step
        self.masks: dict[int, torch.Tensor] = {}

    def apply(self, layer: int, h: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
        p = self.probs[layer]
        if p == 0.0:
            return h
        if p == 1.0:
            return torch.zeros_like(h)
        if layer not in self.masks:
            gen = pass_generator(self.seed, self.step, layer, self.kind)
            self.masks[layer] = models.scaled_mask(p, self.kind, torch.Size((n, h.shape[1])), gen)
        return h * self.masks[layer][rows].to(h.device)


def forward(net: nn.Sequential, x: torch.Tensor, masks: PassMasks | None) -> torch.Tensor:
    """Logits [n, C] of `net` (a `model.build` network) slice by slice; at each dropout layer
    (`model.KeepRate`) the pass's mask, or nothing when `masks` is None (eval mode)."""
    out = []
    for start in range(0, len(x), CHUNK):
        rows = slice(start, start + CHUNK)
        h, layer = x[rows], 0
        for module in net:
            if isinstance(module, models.KeepRate):
                h = h if masks is None else masks.apply(layer, h, rows, len(x))
                layer += 1
            else:
                h = module(h)
        out.append(h)
    return torch.cat(out)


def _probs(logits: torch.Tensor) -> np.ndarray:
    # float64: a float32 softmax underflows to 0 for confident wrong answers (NLL infinite).
    return torch.softmax(logits.double(), 1).cpu().numpy()


def split(net: nn.Sequential) -> tuple[nn.Sequential, nn.Sequential]:
    """(the layers before the first dropout layer, the rest). Dropout draws nothing before it,
    so every pass shares the head's output: for the MLP 3/4 of a pass's FLOPs are computed once."""
    first = next(i for i, m in enumerate(net) if isinstance(m, models.KeepRate))
    return net[:first], net[first:]


@torch.no_grad()
def mc_passes(cell: Cell, net: nn.Sequential, data: Dataset, seeds: StreamSeeds) -> McResult:
    """The cell's `config.mc_passes` stochastic passes of the trained `net` over the test set."""
    start = time.perf_counter()
    device = data.test_x.device
    if next(net.parameters()).device != device:  # a batched member comes back on the CPU
        net = copy.deepcopy(net).to(device)
    head, tail = split(net)
    shared = forward(head, data.test_x, None)
    labels = data.test_y.cpu().numpy()
    n, classes = len(labels), models.CLASSES
    counts = np.zeros((n, classes), dtype=np.int64)
    total = np.zeros((n, classes))
    probs = (cell.dropout1, cell.dropout2)
    for step in range(cell.config.mc_passes):
        p = _probs(forward(tail, shared, PassMasks(probs, mask_kind(cell), seeds.inference, step)))
        total += p
        counts[np.arange(n), p.argmax(1)] += 1
    eval_probs = _probs(forward(tail, shared, None))
    return summarise(counts, total / cell.config.mc_passes, eval_probs, labels,
                     time.perf_counter() - start)
