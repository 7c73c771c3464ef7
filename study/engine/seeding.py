"""One seed in, named random streams out; determinism modes as named, reported flag sets.

Nothing else in the package seeds or reads global random state, with one contained exception:
`nn.Dropout` can only draw from the global generator, so `train` forks it and seeds it from the
dropout stream for the duration of one run (see `global_dropout_rng`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Appended, never reordered: a stream's spawn key is its index here.
STREAMS = ("init", "data", "dropout", "inference")


@dataclass(frozen=True)
class StreamSeeds:
    """Independent 63-bit seeds, one per random stream of a run."""

    init: int
    data: int
    dropout: int
    # Masks of the stochastic test-set passes (`study.inference`), drawn only after training,
    # so it never moves the other streams or the trained weights. No `vary` names it: it
    # follows the seed under "all" and stays at the fixed seed otherwise.
    inference: int


def derive(seed: int, stream: str) -> int:
    """A seed for `stream`, independent of every other stream's (NumPy SeedSequence spawn keys)."""
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(STREAMS.index(stream),))
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def stream_seeds(seed: int, vary: str = "all", fixed: int = 0) -> StreamSeeds:
    """Seeds of a run: the streams named by `vary` follow `seed`, the others stay at `fixed`."""
    def pick(stream: str) -> int:
        return derive(seed if vary in ("all", stream) else fixed, stream)

    return StreamSeeds(init=pick("init"), data=pick("data"), dropout=pick("dropout"),
                       inference=pick("inference"))


def generator(seed: int, device: str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@contextlib.contextmanager
def global_dropout_rng(seed: int, device: str) -> Iterator[None]:
    """Seed the global generator(s) that nn.Dropout draws from, and restore them afterwards."""
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


# --- determinism modes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Flags:
    """The knobs that decide whether a run is bitwise repeatable."""

    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    # TF32 trades mantissa bits for speed on Ampere+; a mode claiming determinism must not
    # silently inherit it from whatever ran before.
    matmul_tf32: bool
    cudnn_tf32: bool
    cublas_workspace_config: str | None
    fill_uninitialized_memory: bool


MODES: dict[str, Flags] = {
    "default": Flags(False, False, False, False, True, None, False),
    "benchmark": Flags(False, False, True, False, True, None, False),
    "strict": Flags(True, True, False, False, False, ":4096:8", True),
    "portable": Flags(True, True, False, False, False, ":4096:8", True),
}


def current_flags() -> Flags:
    return Flags(
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        fill_uninitialized_memory=torch.utils.deterministic.fill_uninitialized_memory,
    )


def _set(flags: Flags) -> None:
    torch.use_deterministic_algorithms(flags.deterministic_algorithms)
    torch.backends.cudnn.deterministic = flags.cudnn_deterministic
    torch.backends.cudnn.benchmark = flags.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = flags.matmul_tf32
    torch.backends.cudnn.allow_tf32 = flags.cudnn_tf32
    if flags.cublas_workspace_config is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        # cuBLAS reads this when a handle is created; set before the first CUDA matmul.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = flags.cublas_workspace_config
    torch.utils.deterministic.fill_uninitialized_memory = flags.fill_uninitialized_memory


@contextlib.contextmanager
def determinism(mode: str) -> Iterator[Flags]:
    """Apply a named mode, yield the flags read back after applying it, then restore."""
    before = current_flags()
    _set(MODES[mode])
    try:
        yield current_flags()
    finally:
        _set(before)


# --- arithmetic: settings read once, when a library starts -------------------------------------

@dataclass(frozen=True)
class Arithmetic:
    """Environment variables that choose the CPU kernels, and so the bits, of a run.

    MKL reads MKL_CBWR at its first call and ATen its CPU dispatch at import; set later they are
    silently ignored. So a mode's arithmetic can only be applied to a fresh process, before torch
    starts (see `process_env`), and is read back inside that process (`current_arithmetic`).
    """

    # Any value turns on MKL's conditional numerical reproducibility (thread-count invariance);
    # COMPATIBLE also picks the same code path on every x86-64 CPU, at about 2x the GEMM time.
    mkl_cbwr: str | None
    # ATen's vectorised kernels follow the CPU's widest ISA unless capped here.
    aten_cpu_capability: str | None
    # oneDNN (the LeNet convolutions) has its own ISA switch.
    onednn_max_cpu_isa: str | None
    # numpy's OpenBLAS (the `openblas-haswell` kernel path, study.engine.kernels) picks its
    # kernels by CPU unless pinned here, when the library loads; one thread per product, so
    # members side by side each own a core. Unset in the other modes: torch never calls it.
    openblas_coretype: str | None = None
    openblas_num_threads: str | None = None


ARITHMETIC: dict[str, Arithmetic] = {
    "default": Arithmetic(None, None, None),
    "benchmark": Arithmetic(None, None, None),
    "strict": Arithmetic("AUTO", None, None),
    # MKL_CBWR=COMPATIBLE stays for what the OpenBLAS path does not cover (the `torch` kernel
    # path of runs from before it, convolutions' fallbacks, CUDA hosts' CPU work).
    "portable": Arithmetic("COMPATIBLE", "avx2", "AVX2", "Haswell", "1"),
}
_ARITHMETIC_ENV = {"mkl_cbwr": "MKL_CBWR", "aten_cpu_capability": "ATEN_CPU_CAPABILITY",
                   "onednn_max_cpu_isa": "ONEDNN_MAX_CPU_ISA",
                   "openblas_coretype": "OPENBLAS_CORETYPE",
                   "openblas_num_threads": "OPENBLAS_NUM_THREADS"}


def current_arithmetic() -> Arithmetic:
    return Arithmetic(**{field: os.environ.get(var) for field, var in _ARITHMETIC_ENV.items()})


def process_env(mode: str, count: int | None) -> dict[str, str | None]:
    """The variables a worker for (`mode`, `count` threads) starts with; None means unset.

    A mode owns its variables: `default` unsets an MKL_CBWR left in the shell, so that the flag
    recorded with a run is the one it ran under.
    """
    arithmetic = ARITHMETIC[mode]
    env: dict[str, str | None] = {var: getattr(arithmetic, field)
                                  for field, var in _ARITHMETIC_ENV.items()}
    env["CUBLAS_WORKSPACE_CONFIG"] = MODES[mode].cublas_workspace_config
    if count is not None:
        # OpenMP and MKL size their pools at start; torch.set_num_threads alone leaves them.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(count)
    return env


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[int]:
    """Use `count` CPU threads (None keeps torch's default); yield the count in effect."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
