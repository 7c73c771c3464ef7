"""The GEMMs of the MLP, through one seam: torch's own kernels, or numpy's OpenBLAS on its Haswell
kernels, the `portable` path on the CPU.

    python -c "from study.engine import kernels; print(kernels.corename())"

Why OpenBLAS: `portable` must give the same bits on Intel and AMD CPUs. MKL does so only on its
generic COMPATIBLE branch, at ~2.5x the GEMM time (36 against 94.5 GFLOP/s here, 32 against 149
on an Intel AVX-512 Xeon); its AVX2 branch is Intel-only and gives the native bits on AMD.
OpenBLAS picks its kernels by OPENBLAS_CORETYPE, read when the library loads: pinned to Haswell
(AVX2 + FMA), the same code runs on every x86-64 CPU with AVX2, and the MLP's GEMM shapes hash the
same on both vendors (shared/cross-machine probes), at 91-99 GFLOP/s. With OPENBLAS_NUM_THREADS=1
each product runs on the calling thread; members train side by side, one per core.

The calls go straight to `cblas_sgemm` of the library numpy loaded (ctypes, which releases the
GIL), on the tensors' own memory: no copy, none of numpy's non-BLAS fallbacks for some strides,
and `c = alpha * a @ b + beta * c` in one call, so the SGD update stays fused.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import nn

TORCH, OPENBLAS = "torch", "openblas-haswell"
# The kernel paths a cell can name; `torch` is the path of every run from before the seam.
KERNELS = (TORCH, OPENBLAS)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


class KernelError(RuntimeError):
    """The OpenBLAS path is not available in this process (no OpenBLAS, wrong tensor)."""


# --- the library ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Blas:
    sgemm: ctypes._CFuncPtr
    corename: str


def _library_paths() -> list[str]:
    """numpy's own OpenBLAS: the wheel's bundled copy, else whatever this process mapped."""
    wheel = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                   "*openblas*.so*"))
    if wheel:
        return wheel
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return []


# (prefix, suffix, integer type): scipy-openblas64 (numpy's wheels) is ILP64 and renamed.
_SYMBOLS = (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
            ("scipy_", "", ctypes.c_int), ("", "", ctypes.c_int))


@cache
def _blas() -> _Blas:
    for path in _library_paths():
        lib = ctypes.CDLL(path)
        for prefix, suffix, integer in _SYMBOLS:
            try:
                sgemm = getattr(lib, f"{prefix}cblas_sgemm{suffix}")
                name = getattr(lib, f"{prefix}openblas_get_corename{suffix}")
            except AttributeError:
                continue
            sgemm.restype, name.restype = None, ctypes.c_char_p
            sgemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer,
                              ctypes.c_float, ctypes.c_void_p, integer, ctypes.c_void_p, integer,
                              ctypes.c_float, ctypes.c_void_p, integer]
            return _Blas(sgemm, name().decode())
    raise KernelError("numpy's OpenBLAS was not found in this process (numpy built against "
                      "another BLAS?); the openblas-haswell kernel path needs it")


def corename() -> str:
    """The kernel set OpenBLAS runs (e.g. "Haswell"), asked of the library; "unavailable" where
    numpy has no OpenBLAS."""
    try:
        return _blas().corename
    except KernelError:
        return "unavailable"


# --- one product -----------------------------------------------------------------------------------

def _operand(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, transpose flag, leading dimension) of a 2-D operand read as row-major; a layout
    BLAS cannot read (broadcast, strided both ways) is copied first."""
    rows, cols = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(1, cols):
        return t, _NO_TRANS, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(1, rows):
        return t, _TRANS, t.stride(1)
    t = t.contiguous()
    return t, _NO_TRANS, max(1, cols)


def sgemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0,
          beta: float = 0.0) -> torch.Tensor:
    """c = alpha * a @ b + beta * c, in place, for 2-D float32 CPU tensors; returns c."""
    for t in (a, b, c):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise KernelError(f"openblas-haswell takes float32 CPU tensors, got {t.dtype} on "
                              f"{t.device}")
    (m, k), n = a.shape, b.shape[1]
    if c.stride(1) != 1 or c.stride(0) < max(1, n):
        if c.stride(0) == 1 and c.stride(1) >= max(1, m):  # column-major: c^T = b^T a^T
            sgemm(b.t(), a.t(), c.t(), alpha, beta)
            return c
        raise KernelError(f"output of strides {c.stride()} is neither row- nor column-major")
    if m == 0 or n == 0:
        return c
    (a, ta, lda), (b, tb, ldb) = _operand(a), _operand(b)
    _blas().sgemm(_ROW_MAJOR, ta, tb, m, n, k, alpha, a.data_ptr(), lda, b.data_ptr(), ldb,
                  beta, c.data_ptr(), c.stride(0))
    return c


# --- the seam the engines call ------------------------------------------------------------------

class Kernels:
    """torch's GEMMs (MKL on the CPU, cuBLAS on CUDA): what every run before the seam used."""

    name = TORCH
    # MKL forms the MLP's thin last layer 3-4x faster as [classes, rows] (see batched.logits).
    classes_first = True

    def baddbmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """bias + a @ b over a batch: a [K, m, k], b [K, k, n], bias broadcast to [K, m, n]."""
        return torch.baddbmm(bias, a, b)

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    def baddbmm_(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        """c += alpha * a @ b, in place (the fused SGD step)."""
        c.baddbmm_(a, b, alpha=alpha)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class OpenBlasKernels(Kernels):
    """The same products through numpy's OpenBLAS, one `cblas_sgemm` per member."""

    name = OPENBLAS
    # OpenBLAS's Haswell kernels take the thin layer faster as [rows, classes] (~130 against
    # ~190 us for 256 rows, one thread).
    classes_first = False

    def baddbmm(self, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = bias.expand(a.shape[0], a.shape[1], b.shape[2]).contiguous()
        for i in range(len(out)):
            sgemm(a[i], b[i], out[i], 1.0, 1.0)
        return out

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty(a.shape[0], a.shape[1], b.shape[2])
        for i in range(len(out)):
            sgemm(a[i], b[i], out[i])
        return out

    def baddbmm_(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
        for i in range(len(c)):
            sgemm(a[i], b[i], c[i], alpha, 1.0)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sgemm(a, b, torch.empty(a.shape[0], b.shape[1]))


_BY_NAME = {TORCH: Kernels(), OPENBLAS: OpenBlasKernels()}


def of(name: str) -> Kernels:
    return _BY_NAME[name]


# --- the sequential engine: nn.Linear whose products go through OpenBLAS --------------------------

class _LinearFunction(torch.autograd.Function):
    """y = x W^T + b with forward and backward GEMMs on OpenBLAS (ATen does the bias sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = bias.expand(x.shape[0], weight.shape[0]).contiguous()
        return sgemm(x, weight.t(), out, 1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = sgemm(grad, weight, torch.empty_like(x)) if ctx.needs_input_grad[0] else None
        grad_w = sgemm(grad.t(), x, torch.empty_like(weight)) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad.sum(0)


class OpenBlasLinear(nn.Linear):
    """nn.Linear (same parameters, state_dict and init) whose GEMMs run on OpenBLAS on the CPU;
    elsewhere (CUDA) it is nn.Linear itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 2:
            return super().forward(x)
        return _LinearFunction.apply(x, self.weight, self.bias)


def linear_class(name: str) -> type[nn.Linear]:
    return OpenBlasLinear if name == OPENBLAS else nn.Linear
