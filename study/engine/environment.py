"""What actually ran: library versions, device, driver, git commit and what decides the bits.

    python -c "from study.engine import environment; print(environment.describe('cpu'))"

`describe` belongs in the process that trains: the arithmetic keys (ISA, BLAS, MKL_CBWR in
effect, threads) describe the process that calls it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

from study.engine import kernels

ROOT = Path(__file__).resolve().parents[2]


def describe(device: str) -> dict[str, str]:
    env = {**_software(), "device_name": device_name(device), "git_commit": git_commit(),
           **arithmetic(device)}
    if device == "cuda":
        env["gpu_driver"] = _gpu_driver()
    return env


# The keys that decide the bits of a CPU run besides the cell itself: what `verify` and the
# golden test compare between a recorded run and this machine.
BITS_KEYS = ("torch_version", "machine", "cpu_isa", "cpu_model", "blas", "mkl_cbwr",
             "mkl_cbwr_effective", "aten_cpu_capability", "onednn_max_cpu_isa", "threads.intra_op",
             "threads.inter_op", "threads.omp_num_threads", "threads.mkl_num_threads")
# What also decides them on the `openblas-haswell` kernel path: the kernels numpy's OpenBLAS
# runs (asked of the library), the variable that pins them, and its thread count.
OPENBLAS_KEYS = ("openblas_corename", "openblas_coretype", "threads.openblas_num_threads")


def bits_keys(kernel_path: str) -> tuple[str, ...]:
    """The environment keys that decide the bits of a run on `kernel_path`."""
    return BITS_KEYS + OPENBLAS_KEYS if kernel_path == kernels.OPENBLAS else BITS_KEYS


def differences(recorded: dict[str, str], present: dict[str, str],
                keys: tuple[str, ...] = BITS_KEYS) -> list[str]:
    """`key: recorded -> present` for each key whose value differs (missing reads "absent")."""
    return [f"{k}: {recorded.get(k, 'absent')} -> {present.get(k, 'absent')}" for k in keys
            if recorded.get(k, "absent") != present.get(k, "absent")]


def arithmetic(device: str) -> dict[str, str]:
    """What decides the bits besides the seeds: ISA, kernels, BLAS and its modes, threads."""
    env = {"cpu_isa": cpu_isa(), "cpu_model": cpu_model(), "blas": blas(),
           "mkl_cbwr": os.environ.get("MKL_CBWR", "unset"), "mkl_cbwr_effective": mkl_cbwr_effective(),
           "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
           "threads.intra_op": str(torch.get_num_threads()),
           "threads.inter_op": str(torch.get_num_interop_threads()),
           "threads.omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
           "threads.mkl_num_threads": os.environ.get("MKL_NUM_THREADS", "unset"),
           "openblas_corename": kernels.corename(),
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset"),
           "threads.openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset")}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        env["gpu_capability"] = f"{major}.{minor}"
        env["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset")
    return env


# Widest first: the first one the CPU reports is the one its kernels can use.
_ISAS = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse4_2", "sse4.2"),
         ("sve", "sve"), ("asimd", "neon"))


@cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


@cache
def cpu_isa() -> str:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    found = next((name for flag, name in _ISAS if flag in flags), None)
    return found or platform.machine() or "unknown"


@cache
def cpu_model() -> str:
    """Model string with family/model/stepping: vendors reuse names like "AMD EPYC"."""
    info = _cpuinfo()
    ids = [f"{key} {info[key]}" for key in ("cpu family", "model", "stepping") if key in info]
    return f"{_cpu_model()} ({', '.join(ids)})" if ids else _cpu_model()


@cache
def blas() -> str:
    """BLAS and LAPACK as torch was built, with the MKL version when MKL is the BLAS."""
    config = torch.__config__.show()
    parts = []
    for name in ("BLAS", "LAPACK"):
        found = re.search(name + r"_INFO=(\w+)", config)
        parts.append(f"{name}={found.group(1) if found else 'unknown'}")
    if mkl := re.search(r"Math Kernel Library Version ([^ ]+)-Product Build (\d+)", config):
        parts.append(f"MKL {mkl.group(1)} (build {mkl.group(2)})")
    return "; ".join(parts)


# MKL's own codes for the branch in effect (mkl_service.h), STRICT as a bit on top.
_CBWR_NAMES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3",
               7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512"}
_CBWR_STRICT = 0x10000


def mkl_cbwr_effective() -> str:
    """The branch MKL runs, asked of MKL itself (the env var can be set too late to count).

    Intel-only branches (AVX2, AVX512) read back as AUTO on other CPUs. "unknown" where the
    symbol is not found (no MKL, or a build that hides it).
    """
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    code = get(-1)  # MKL_CBWR_ALL
    name = _CBWR_NAMES.get(code & ~_CBWR_STRICT, str(code & ~_CBWR_STRICT))
    return f"{name},STRICT" if code & _CBWR_STRICT else name


@cache
def _software() -> dict[str, str]:
    versions = {f"{name}_version": package_version(name)
                for name in ("torch", "torchvision", "mlflow", "numpy")}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**versions, "python_version": platform.python_version(),
            "cuda_version": str(torch.version.cuda), "cudnn_version": str(cudnn),
            "cpu": _cpu_model(), "machine": platform.machine()}


def package_version(name: str) -> str:
    """The installed version, or "not installed": a worker on a lent GPU machine trains without
    MLflow (the driver logs), and says so rather than failing to describe itself."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else _cpu_model()


@cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@cache
def _gpu_driver() -> str:
    return _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])


@cache
def git_commit() -> str:
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return f"{commit}+dirty" if dirty not in ("", "unknown") else commit


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
