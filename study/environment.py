"""What actually ran: library versions, device, driver and the git commit, as flat strings."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def describe(device: str) -> dict[str, str]:
    env = {**_software(), "device_name": device_name(device), "git_commit": git_commit()}
    if device == "cuda":
        env["gpu_driver"] = _gpu_driver()
    return env


@cache
def _software() -> dict[str, str]:
    versions = {f"{name}_version": metadata.version(name)
                for name in ("torch", "torchvision", "mlflow", "numpy")}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {**versions, "python_version": platform.python_version(),
            "cuda_version": str(torch.version.cuda), "cudnn_version": str(cudnn),
            "cpu": _cpu_model(), "machine": platform.machine()}


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
