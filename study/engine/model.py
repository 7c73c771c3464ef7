"""The textbook models and the three dropout implementations the lesson compares.

- `torch`: `nn.Dropout`, drawing from the global generator (seeded per run by `train`).
- `scratch`: the book's hand-written mask, `(torch.rand(X.shape) > p).float() * X / (1 - p)`.
- `scratch-randn`: the lesson's printed version with `torch.randn`. Its keep-rate is
  P(N(0,1) > p), about 31% at p=0.5, yet it still rescales by 1/(1-p).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: workers and the GPU check run without pydantic and YAML
    from study.protocol.schema import Model

IMAGE_SIDE, CLASSES = 28, 10


# What draws a layer's masks: a torch generator, or (portable `torch` masks) a NumPy SFC64.
MaskGenerator = torch.Generator | np.random.SFC64


def scaled_mask(p: float, kind: str, shape: torch.Size, generator: MaskGenerator,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The factor a dropout layer multiplies its input by: kept/(1-p) or 0, for 0 < p < 1.

    kind "bernoulli": what nn.Dropout draws on the CPU, `empty.bernoulli_(1-p).div_(1-p)`,
    bit for bit, given the same generator state.
    kind "sfc64": the same Bernoulli(1-p) law from a NumPy SFC64 stream (the portable mask of the
    `torch` implementation); see `sfc64_mask`.
    kinds "rand"/"randn": the book's and the lesson's hand-written masks, `rand/randn(...) > p`.
    `out`, if given, receives the mask (a preallocated buffer of `shape`).
    """
    if kind == "sfc64":
        return sfc64_mask(p, shape, generator, out)
    device = generator.device
    if kind == "bernoulli":
        mask = torch.empty(shape, device=device).bernoulli_(1 - p, generator=generator).div_(1 - p)
    else:
        draw = torch.rand if kind == "rand" else torch.randn
        mask = (draw(shape, generator=generator, device=device) > p).float().div_(1 - p)
    return mask if out is None else out.copy_(mask)


def sfc64_mask(p: float, shape: torch.Size, bits: np.random.SFC64,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep a unit iff its 32-bit word >= round(p * 2^32): P(keep) = 1-p to within 2^-33.

    Each mask takes ceil(n/2) raw 64-bit outputs, each read as two 32-bit words (low half first
    on little-endian machines: x86, ARM). ~4x cheaper on the CPU than torch.rand's mt19937 floats
    (~90 vs ~380 us per 256x256 mask), and finer (torch.rand has 24 bits). NumPy keeps
    bit-generator streams stable across releases.
    `out`, a contiguous CPU float32 tensor of `shape`, receives the mask without an allocation.
    """
    n = math.prod(shape)
    words = bits.random_raw((n + 1) // 2).view(np.uint32)[:n]
    threshold = np.uint32(min(round(p * 2.0**32), 2**32 - 1))
    if out is None:
        out = torch.empty(shape)
    np.multiply(words >= threshold, np.float32(1.0) / np.float32(1.0 - p),
                out=out.view(n).numpy())  # view: fails loudly rather than fill a copy
    return out


class Dropout(nn.Module):
    """Dropout whose masks come from an explicit generator, drawn where that generator lives."""

    def __init__(self, p: float, kind: str, generator: MaskGenerator):
        super().__init__()
        self.p, self.kind, self.generator = p, kind, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same shortcuts as nn.Dropout and the book: p=0 and p=1 draw nothing.
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return torch.zeros_like(x)
        return x * scaled_mask(self.p, self.kind, x.shape, self.generator).to(x.device)


class KeepRate(nn.Module):
    """Counts the share of non-zero inputs a dropout layer keeps, whatever draws its mask.

    Counted on every `EVERY`-th training call only: the count costs three passes over the
    activations, and 1 call in 8 still sees ~2M units per epoch (standard error < 0.001).
    """

    EVERY = 8

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.kept: torch.Tensor | int = 0
        self.alive: torch.Tensor | int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            if self.calls % self.EVERY == 0:
                live = x != 0
                # Accumulated on the device: one transfer at the end of the run, no sync per batch.
                self.kept = self.kept + (live & (out != 0)).sum()
                self.alive = self.alive + live.sum()
            self.calls += 1
        return out

    def rate(self) -> float | None:
        alive = float(self.alive)
        return float(self.kept) / alive if alive else None


MASK_KINDS = {"torch": "sfc64", "scratch": "rand", "scratch-randn": "randn"}


def make_dropout(p: float, implementation: str, generator: MaskGenerator | None) -> nn.Module:
    """One dropout layer; `generator=None` means the global generator (native nn.Dropout)."""
    if implementation == "torch" and generator is None:
        return nn.Dropout(p)
    if generator is None:
        raise ValueError(f"implementation {implementation!r} needs an explicit generator")
    return Dropout(p, MASK_KINDS[implementation], generator)


def mlp(hidden: tuple[int, ...], drops: tuple[nn.Module, nn.Module],
        linear: type[nn.Linear] = nn.Linear) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(
        nn.Flatten(), linear(IMAGE_SIDE * IMAGE_SIDE, h1), nn.ReLU(), KeepRate(drops[0]),
        linear(h1, h2), nn.ReLU(), KeepRate(drops[1]), linear(h2, CLASSES))


def lenet(drops: tuple[nn.Module, nn.Module], linear: type[nn.Linear] = nn.Linear) -> nn.Sequential:
    """d2l's LeNet-5 (sigmoid, average pooling) with dropout after the two hidden dense layers.
    `linear` reaches the dense layers only: the convolutions stay on oneDNN."""
    return nn.Sequential(
        nn.Unflatten(1, (1, IMAGE_SIDE, IMAGE_SIDE)),
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
        linear(16 * 5 * 5, 120), nn.Sigmoid(), KeepRate(drops[0]),
        linear(120, 84), nn.Sigmoid(), KeepRate(drops[1]), linear(84, CLASSES))


def build(spec: Model, drops: tuple[nn.Module, nn.Module], init: torch.Generator,
          device: str, linear: type[nn.Linear] = nn.Linear) -> nn.Sequential:
    """Construct without touching the global generator (meta device), then initialise from `init`.
    `linear`: nn.Linear or a subclass with other GEMMs (study.engine.kernels.OpenBlasLinear)."""
    with torch.device("meta"):
        net = mlp(spec.hidden, drops, linear) if spec.arch == "mlp" else lenet(drops, linear)
    net = net.to_empty(device=device)
    for layer in net.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            _init_layer(layer, spec, init)
    return net


def _init_layer(layer: nn.Linear | nn.Conv2d, spec: Model, gen: torch.Generator) -> None:
    # Drawn on the generator's device (the CPU) and copied, so the same seed gives the same
    # initial weights on every device.
    fan_in = layer.weight[0].numel()
    fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel() if layer.weight.dim() > 2 \
        else layer.weight.shape[0]
    shape = layer.weight.shape
    if spec.init == "normal":
        w = torch.empty(shape).normal_(0.0, spec.init_std, generator=gen)
    else:
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = torch.empty(shape).uniform_(-bound, bound, generator=gen)
    # PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from our stream.
    bias_bound = 1.0 / math.sqrt(fan_in)
    b = torch.empty(layer.bias.shape).uniform_(-bias_bound, bias_bound, generator=gen)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)


def keep_rates(net: nn.Module) -> tuple[float | None, ...]:
    return tuple(m.rate() for m in net.modules() if isinstance(m, KeepRate))


def flip_lowest_bit(net: nn.Module, seed: int) -> tuple[str, int]:
    """Flip the lowest mantissa bit of one weight (not bias) of `net`, chosen by `seed` among
    all of them; return its (parameter name, flat index). Summers & Dinneen's one-bit change:
    the smallest difference float32 arithmetic can make to a starting point."""
    weights = [(name, p) for name, p in net.named_parameters() if name.endswith("weight")]
    sizes = [p.numel() for _, p in weights]
    pick = int(np.random.default_rng([seed, BITFLIP_STREAM]).integers(sum(sizes)))
    for (name, p), size in zip(weights, sizes):
        if pick < size:
            with torch.no_grad():
                p.view(-1).view(torch.int32)[pick] ^= 1
            return name, pick
        pick -= size
    raise AssertionError("unreachable: pick < total size")


# Spawn-key style tag that keeps the bit's choice apart from every seeded stream of a run.
BITFLIP_STREAM = 0xB17F
