"""LoRA products with keyed dropout inside them: the dropped copy of the input is never written.

With LoRA dropout, each adapted layer used to write ``xd = dropout(x)`` (forward and recompute), read it in the
``xd @ A.T`` GEMM and again for ``dA``, and in backward pass ``gxa @ A`` through a dropout and an addition to
the base part of the input gradient: ~8 extra passes over an input-sized tensor per layer against dropout 0
(7% of an 8B step, 9% of a 1B step; ``kernels/NOTES.md``). The keyed mask (``dropout.py``) is a function of
the element's index, so each kernel here recomputes it where it loads ``x``:

* :func:`down`:  ``xa = (keep * x / (1 - p)) @ A.T``  ([M, K] x [K, r]; reads x once);
* :func:`grad_a`: ``dA = gxa.T @ (keep * x / (1 - p))`` ([r, M] x [M, K]; reads x once, split over M into fp32
  partials summed in a fixed order, so results do not depend on scheduling);
* :func:`grad_x_add_`: ``gx += keep * (gxa @ A) / (1 - p)`` in place ([M, r] x [r, K]; reads and writes gx once).

Products accumulate in fp32; the 1/(1-p) scale is applied to the fp32 result, one rounding to the output dtype
(the unfused path rounds ``x / (1 - p)`` to bf16 first, so results differ by that rounding; tests compare both
with a float64 computation). The mask equals :func:`dropout.keep_mask_reference` of ``x``'s flat index
``m * K + k``, so these match ``dropout.dropout`` followed by the plain products.
Only 16-bit inputs (bf16/fp16: tensor-core dots) and r <= 128; :func:`usable` says when. Off the GPU each
function computes its float64 reference instead (for CPU tests of the autograd code that calls them).
"""
from __future__ import annotations

import torch

from .dropout import key_ok, keep_mask_reference, launch_args

try:
    import triton
    import triton.language as tl

    from .dropout import keep, round_keys
except ImportError:  # pragma: no cover
    triton = None

MAX_R = 128
# (rows, columns, warps, stages) per kernel and padded rank (16, 32, 64, 128); bench/kernel_speed.py --sweep times
# alternatives. Chosen on an H200 (bench/results/kernels_lora_dropout_sweep_2026-11-30_s12_h200.txt): down at
# r 16 256-wide K steps (-10 to -23% against 128-wide), narrower row tiles at r 64 and 128 (r 128 with 256-wide
# steps would not fit shared memory); grad_x with 32-row tiles at r 16-32 (-13 to -16%), 64x64 above.
CONFIGS = {
    "down": {16: (32, 256, 4, 3), 32: (32, 256, 4, 3), 64: (16, 128, 4, 3), 128: (32, 128, 8, 3)},
    "grad_a": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 64, 4, 3)},
    "grad_x": {16: (32, 128, 4, 2), 32: (32, 128, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 4, 2)},
}


def launch_config(name: str, r: int) -> tuple[int, int, int, int]:
    """The launch configuration of kernel ``name`` ("down", "grad_a", "grad_x") at LoRA rank ``r``."""
    return CONFIGS[name][_rp(r)]


if triton is not None:
    @triton.jit
    def _keep(rm, rk, K, k1, k2, thresh):
        return keep(rm[:, None].to(tl.int64) * K + rk[None, :], k1, k2, thresh)

    @triton.jit(do_not_specialize=["salt_mix", "thresh"])
    def _down_kernel(x_ptr, a_ptr, out_ptr, key_ptr, M, K, R, stride_xm, salt_mix, thresh, scale,
                     BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
        k1, k2 = round_keys(key_ptr, salt_mix)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        acc = tl.zeros((BM, RP), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            inb = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=inb, other=0.0)
            x = tl.where(_keep(rm, rk, K, k1, k2, thresh), x, tl.zeros_like(x))
            at = tl.load(a_ptr + rr[None, :] * K + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc = tl.dot(x, at, acc)
        acc = acc * scale
        tl.store(out_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit(do_not_specialize=["salt_mix", "thresh"])
    def _grad_a_kernel(g_ptr, x_ptr, part_ptr, key_ptr, M, K, R, stride_xm, salt_mix, thresh, scale,
                       SPLIT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
        k1, k2 = round_keys(key_ptr, salt_mix)
        rk = tl.program_id(0) * BK + tl.arange(0, BK)
        s = tl.program_id(1)
        rr = tl.arange(0, RP)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for m0 in range(s * BM, M, BM * SPLIT):
            rm = m0 + tl.arange(0, BM)
            gt = tl.load(g_ptr + rm[None, :].to(tl.int64) * R + rr[:, None], mask=(rr[:, None] < R) & (rm[None, :] < M),
                         other=0.0)
            inb = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :], mask=inb, other=0.0)
            x = tl.where(_keep(rm, rk, K, k1, k2, thresh), x, tl.zeros_like(x))
            acc = tl.dot(gt, x, acc)
        acc = acc * scale
        tl.store(part_ptr + s * R * K + rr[:, None] * K + rk[None, :], acc, mask=(rr[:, None] < R) & (rk[None, :] < K))

    @triton.jit(do_not_specialize=["salt_mix", "thresh"])
    def _grad_x_kernel(gx_ptr, g_ptr, a_ptr, key_ptr, M, K, R, salt_mix, thresh, scale,
                       BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr):
        k1, k2 = round_keys(key_ptr, salt_mix)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, RP)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R),
                    other=0.0)
        a = tl.load(a_ptr + rr[:, None] * K + rk[None, :], mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        t = tl.dot(g, a)
        inb = (rm[:, None] < M) & (rk[None, :] < K)
        ptrs = gx_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
        gx = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        gx = tl.where(_keep(rm, rk, K, k1, k2, thresh), gx + t * scale, gx)
        tl.store(ptrs, gx.to(gx_ptr.dtype.element_ty), mask=inb)


def _rp(r: int) -> int:
    return max(16, 1 << (int(r) - 1).bit_length())


def usable(x: torch.Tensor, a: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether these kernels take a layer's input ``x`` [..., K] and LoRA factor ``a`` [r, K]: Triton, CUDA, bf16
    or fp16 (both the same), 0 < r <= 128, ``x`` with unit stride along K, a one-element int64 key on the device."""
    return (triton is not None and x.is_cuda and a.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and a.dtype == x.dtype and 0 < a.shape[0] <= MAX_R and a.shape[1] == x.shape[-1] and x.stride(-1) == 1
            and a.is_contiguous() and key_ok(x, key))


def _gpu(t: torch.Tensor) -> bool:
    """The Triton kernels run (CUDA tensor, Triton importable); else the float64 torch forms below stand in
    (slow: for tests of the code around them on a CPU)."""
    return triton is not None and t.is_cuda


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def down(x: torch.Tensor, a: torch.Tensor, p: float, key: torch.Tensor, salt: int, config=None) -> torch.Tensor:
    """``(keep * x / (1 - p)) @ a.T`` for ``x`` [M, K] (or [..., K], flattened), ``a`` [r, K]: [M, r] in x's dtype."""
    if not _gpu(x):
        return down_reference(x, a, p, int(key), salt).to(x.dtype)
    x2 = _rows(x)
    m, k = x2.shape
    r = a.shape[0]
    bm, bk, warps, stages = config or launch_config("down", r)
    out = torch.empty((m, r), device=x.device, dtype=x.dtype)
    if m:
        _down_kernel[(triton.cdiv(m, bm),)](x2, a, out, key, m, k, r, x2.stride(0),
                                            *launch_args(p, salt), BM=bm, BK=bk, RP=_rp(r),
                                            num_warps=warps, num_stages=stages)
    return out


def grad_a(gxa: torch.Tensor, x: torch.Tensor, p: float, key: torch.Tensor, salt: int, config=None) -> torch.Tensor:
    """``gxa.T @ (keep * x / (1 - p))`` for ``gxa`` [M, r], ``x`` [M, K]: [r, K] in x's dtype."""
    if not _gpu(x):
        return grad_a_reference(gxa, x, p, int(key), salt).to(x.dtype)
    x2 = _rows(x)
    g = gxa.reshape(-1, gxa.shape[-1]).contiguous()
    m, k = x2.shape
    r = g.shape[1]
    bm, bk, warps, stages = config or launch_config("grad_a", r)
    cols = triton.cdiv(k, bk)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    split = max(1, min(triton.cdiv(2 * sms, cols), triton.cdiv(m, bm), 16))  # ~2 programs per SM
    part = torch.empty((split, r, k), device=x.device, dtype=torch.float32)
    if m:
        _grad_a_kernel[(cols, split)](g, x2, part, key, m, k, r, x2.stride(0), *launch_args(p, salt),
                                      SPLIT=split, BM=bm, BK=bk, RP=_rp(r), num_warps=warps,
                                      num_stages=stages)
    else:
        part.zero_()
    return (part[0] if split == 1 else part.sum(0)).to(x.dtype)


def grad_x_add_(gx: torch.Tensor, gxa: torch.Tensor, a: torch.Tensor, p: float, key: torch.Tensor,
                salt: int, config=None) -> torch.Tensor:
    """``gx += keep * (gxa @ a) / (1 - p)`` in place for contiguous ``gx`` [M, K], ``gxa`` [M, r], ``a`` [r, K];
    returns gx."""
    if not _gpu(gx):
        return gx.copy_(grad_x_add_reference(gx, gxa, a, p, int(key), salt))
    m, k = gx.shape
    g = gxa.reshape(-1, gxa.shape[-1]).contiguous()
    r = g.shape[1]
    bm, bk, warps, stages = config or launch_config("grad_x", r)
    if m:
        _grad_x_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            gx, g, a, key, m, k, r, *launch_args(p, salt), BM=bm, BK=bk, RP=_rp(r),
            num_warps=warps, num_stages=stages)
    return gx


# -- torch references (the same math through dropout.dropout_reference) -------------------------------


def _kept64(t: torch.Tensor, p, key: int, salt) -> torch.Tensor:
    """``t`` as [M, K] float64 with the keyed mask of its flat indices applied (dropped elements 0, unscaled)."""
    t2 = t.reshape(-1, t.shape[-1])
    return torch.where(keep_mask_reference(t2.numel(), p, key, salt, t.device).view(t2.shape), t2.double(), 0.0)


def down_reference(x, a, p, key: int, salt):
    return (_kept64(x, p, key, salt) @ a.double().t()) / (1.0 - p)


def grad_a_reference(gxa, x, p, key: int, salt):
    return gxa.reshape(-1, gxa.shape[-1]).double().t() @ _kept64(x, p, key, salt) / (1.0 - p)


def grad_x_add_reference(gx, gxa, a, p, key: int, salt):
    return gx.double() + _kept64(gxa.double() @ a.double(), p, key, salt) / (1.0 - p)
