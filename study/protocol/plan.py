"""Expand a protocol into cells: one cell is one training run.

    python -m study plan protocols/d2l-dropout.yaml
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: workers and the GPU check run without pydantic and YAML
    from study.protocol.schema import Data, Model, Protocol, Training

# Training images per dataset: a cell's size when it takes no subset (here, not in protocol.py,
# because workers read it and import no pydantic).
TRAIN_IMAGES = {"fashion-mnist": 60_000}


def is_evaluated(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether the test set is evaluated after `epoch` (1-based): every `eval_every`-th and the
    last, so the final accuracy always exists. The budget of protocol.Training and of the GPU
    check's plain copy of it."""
    return epoch % eval_every == 0 or epoch == epochs


@dataclass(frozen=True)
class RunConfig:
    """What every cell of a protocol shares and what changes the arithmetic of a run."""

    model: Model
    training: Training
    data: Data
    execution: str
    randomness: str
    # This cell's thread count (one entry of the protocol's list); decides the bits unless the
    # mode makes MKL thread-count invariant.
    threads: int | None
    fixed_seed: int
    # How many cells share one batched model; changes speed, not what a cell is.
    batch_members: int = 60
    # Stochastic test-set passes after training (protocol `inference.mc_passes`); 0: none.
    mc_passes: int = 0
    # The GEMM path `portable` cells take on the CPU (protocol `kernels`); see `Cell.kernels`.
    kernels: str = "openblas-haswell"


@dataclass(frozen=True)
class Cell:
    config: RunConfig
    dropout1: float
    dropout2: float
    seed: int
    device: str
    determinism: str
    implementation: str
    vary: str = "all"
    replicate: int = 0

    @property
    def key(self) -> str:
        """Stable identity of the run: a hash of everything that defines it, nothing else."""
        fields = asdict(self)
        del fields["config"]["batch_members"]
        if mc_passes := fields["config"].pop("mc_passes"):
            # Added with the passes (issue 13); absent means none, so keys of runs without
            # passes are those of before, and turning passes on makes new cells (the passes
            # need the trained weights, which the store does not keep).
            fields["mc_passes"] = mc_passes
        training = fields["config"]["training"]
        # Added with the size axis; a cell's budget is already resolved (by_size is empty) and
        # eval_every 1 is every epoch, as before: older keys stay valid.
        del training["by_size"]
        if training["eval_every"] == 1:
            del training["eval_every"]
        # The path that runs, not the protocol's choice: a default-mode cell's key must not
        # move with a knob it ignores.
        del fields["config"]["kernels"]
        if self.kernels != "torch":
            # Added with the OpenBLAS path (issue 22); absent means torch's kernels, so keys of
            # runs from before it stay valid and new portable runs are never taken for them.
            fields["kernels"] = self.kernels
        if self.mask_rng != "torch":
            # Added with the SFC64 masks; absent means torch's, so older keys stay valid and
            # runs drawn with torch.rand's portable masks are never taken for SFC64 ones.
            fields["mask_rng"] = self.mask_rng
        blob = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def mask_rng(self) -> str:
        """Which generator draws the dropout masks: "sfc64" (portable `torch`) or "torch"."""
        portable = self.config.randomness == "portable"
        return "sfc64" if portable and self.implementation == "torch" else "torch"

    @property
    def kernels(self) -> str:
        """The GEMM path that runs (study.engine.kernels): the protocol's choice for `portable`
        CPU cells, torch's own everywhere else (other modes promise nothing across CPUs, and
        CUDA has its own)."""
        portable = self.determinism == "portable" and self.device == "cpu"
        return self.config.kernels if portable else "torch"

    @property
    def name(self) -> str:
        parts = [f"p{self.dropout1:g}-{self.dropout2:g}", f"seed{self.seed}", self.device,
                 self.determinism, self.implementation]
        if self.vary != "all":
            parts.append(f"vary-{self.vary}")
        if self.config.threads is not None:
            parts.append(f"t{self.config.threads}")
        if self.config.data.train_subset is not None:
            parts.append(f"n{self.config.data.train_subset}")
        if self.replicate:
            parts.append(f"rep{self.replicate}")
        return " ".join(parts)

    def labels(self) -> dict[str, str | int | float]:
        """The fields that tell cells of one protocol apart, as logged params."""
        return {"dropout1": self.dropout1, "dropout2": self.dropout2, "seed": self.seed,
                "device": self.device, "determinism": self.determinism,
                "implementation": self.implementation, "vary": self.vary,
                "replicate": self.replicate, "execution": self.config.execution,
                "randomness": self.config.randomness, "mask_rng": self.mask_rng,
                "kernels": self.kernels, "train_images": self.train_images,
                **({"mc_passes": self.config.mc_passes} if self.config.mc_passes else {})}

    @property
    def train_images(self) -> int:
        """How many training images the cell trains on (its subset, or the whole set)."""
        data = self.config.data
        return TRAIN_IMAGES[data.dataset] if data.train_subset is None else data.train_subset


def run_config(protocol: Protocol, train_subset: int | None,
               threads: int | None = None) -> RunConfig:
    """One cell's shared config: a single training-set size and that size's budget."""
    return RunConfig(model=protocol.model, training=protocol.training.for_size(train_subset),
                     data=replace(protocol.data, train_subset=train_subset),
                     execution=protocol.execution, randomness=protocol.randomness,
                     threads=threads, fixed_seed=protocol.seeds.fixed,
                     batch_members=protocol.batch_members,
                     mc_passes=protocol.inference.mc_passes, kernels=protocol.kernels)


def expand(protocol: Protocol) -> list[Cell]:
    """All cells, ordered so that every setting gets its first seeds early (useful partial data).

    A thread count and a training-set size sit in the cell's config, as a single value always
    did, so the keys of protocols with one count and one size are unchanged by either becoming
    an axis. Sizes come first, in the file's order: each size's cells train in one worker.
    """
    return [cell for size in protocol.data.sizes()
            for cell in grid(run_config(protocol, size),
                             replicates=protocol.replicates, seeds=protocol.seeds.values(),
                             vary=protocol.vary, devices=protocol.devices,
                             modes=protocol.determinism, threads=protocol.thread_counts(),
                             implementations=protocol.implementations, dropout=protocol.dropout)]


def grid(base: RunConfig, *, replicates: int, seeds: Sequence[int], vary: Sequence[str],
         devices: Sequence[str], modes: Sequence[str], threads: Sequence[int | None],
         implementations: Sequence[str],
         dropout: Sequence[Sequence[float]]) -> list[Cell]:
    """The cells of every combination of the axes for one training-set size, in `expand`'s
    order (also for callers that hold a protocol as plain values: the GPU check)."""
    axes = itertools.product(range(replicates), seeds, vary, devices, modes, threads,
                             implementations, dropout)
    return [Cell(replace(base, threads=n), d1, d2, seed, device, mode, impl, v, rep)
            for rep, seed, v, device, mode, n, impl, (d1, d2) in axes]
