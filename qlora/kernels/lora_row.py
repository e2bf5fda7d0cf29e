"""One row's LoRA contribution added in place: ``y += scaling * B @ (A @ x)`` in two small Triton launches.

When decoding (one token, no gradients), each QLoRA layer's adapter went through torch as a [1, K] x [K, r]
GEMM (cuBLAS picks split-K: a GEMM and a reduction kernel), a copy of ``y`` (``addmm`` returns a new
tensor) and the [1, r] x [r, N] GEMM with ``y`` added: four launches, ~8.6 us of GPU time per layer on an
H200 for the 8B shapes, as much as the 4-bit GEMVs themselves (CUDA-graph decode profile,
``qlora/kernels/NOTES.md``). Here:

1. ``_down``: program p computes the partial products of its K chunk, ``part[p, :] = A[:, chunk] @ x[chunk]``
   (fp32), one chunk per program, no loop over K;
2. ``_up``: program q sums the partials into ``u = A @ x`` (fp32, never rounded), then updates its block of
   ``y``: ``y[n] = round(y[n] + scaling * B[n, :] @ u)``, fp32 inside, one rounding to y's dtype.

The torch path rounds ``x @ A.T`` to the compute dtype before the second product; this keeps it in fp32,
so results differ from it by that rounding (the test compares both with a float64 computation).
:func:`lora_row_reference` is the pure-torch reference with this kernel's rounding.
"""
from __future__ import annotations

import torch

from .dequant import cdiv, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK_K = 256   # K elements per `_down` program (K 4096: 16 programs; 14336: 56)
BLOCK_N = 128   # outputs per `_up` program (N 4096: 32 programs; 14336: 112)
MAX_R = 128     # ranks handled here (registers: BLOCK_K x next_pow2(r) fp32 products per program)


def lora_row_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y + scaling * B @ (A @ x)`` for one row (``y`` [N], ``x`` [K], ``a`` [r, K], ``b`` [N, r]), products and
    sums in fp32, rounded once to y's dtype; returns a new tensor."""
    u = a.float() @ x.float()
    return (y.float() + scaling * (b.float() @ u)).to(y.dtype)


def usable(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`lora_row_` takes these tensors (CUDA, Triton, contiguous, the shapes of one row)."""
    if triton is None or not (y.is_cuda and x.is_cuda and a.is_cuda and b.is_cuda):
        return False
    r, k = a.shape
    return (x.numel() == k and y.numel() == b.shape[0] and b.shape[1] == r and 0 < r <= MAX_R
            and x.is_contiguous() and y.is_contiguous() and a.is_contiguous() and b.is_contiguous()
            and a.dtype == b.dtype)


def lora_row_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y += scaling * B @ (A @ x)`` in place for one row (see the module docstring); returns ``y``. Callers
    check :func:`usable` first."""
    r, k = a.shape
    n = b.shape[0]
    parts = cdiv(k, BLOCK_K)
    part = torch.empty((parts, r), device=x.device, dtype=torch.float32)
    rp = next_pow2(r)
    _down[(parts,)](x, a, part, k, r, R_PAD=rp, BLOCK_K=BLOCK_K, num_warps=4)
    _up[(cdiv(n, BLOCK_N),)](part, b, y, n, r, parts, float(scaling), R_PAD=rp, P_PAD=next_pow2(parts),
                             BLOCK_N=BLOCK_N, num_warps=4)
    return y


if triton is not None:
    @triton.jit
    def _down(x_ptr, a_ptr, part_ptr, K, R, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
        p = tl.program_id(0)
        k = p * BLOCK_K + tl.arange(0, BLOCK_K)
        r = tl.arange(0, R_PAD)
        km = k < K
        xv = tl.load(x_ptr + k, mask=km, other=0.0).to(tl.float32)
        av = tl.load(a_ptr + r[:, None] * K + k[None, :], mask=(r[:, None] < R) & km[None, :], other=0.0)
        s = tl.sum(av.to(tl.float32) * xv[None, :], axis=1)
        tl.store(part_ptr + p * R + r, s, mask=r < R)

    @triton.jit
    def _up(part_ptr, b_ptr, y_ptr, N, R, P, scaling, R_PAD: tl.constexpr, P_PAD: tl.constexpr,
            BLOCK_N: tl.constexpr):
        q = tl.program_id(0)
        r = tl.arange(0, R_PAD)
        pp = tl.arange(0, P_PAD)
        parts = tl.load(part_ptr + pp[:, None] * R + r[None, :], mask=(pp[:, None] < P) & (r[None, :] < R), other=0.0)
        u = tl.sum(parts, axis=0)                                   # A @ x, fp32
        n = q * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        bv = tl.load(b_ptr + n[:, None] * R + r[None, :], mask=nm[:, None] & (r[None, :] < R), other=0.0)
        v = tl.sum(bv.to(tl.float32) * u[None, :], axis=1)
        yv = tl.load(y_ptr + n, mask=nm, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, (yv + scaling * v).to(y_ptr.dtype.element_ty), mask=nm)
