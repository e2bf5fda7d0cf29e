"""Keyed dropout: the mask is a hash of (key, salt, element index), not a draw from a random generator.

Why: with gradient checkpointing, each block's forward runs twice (forward, then again in backward) and
its dropout masks must be the same both times. torch's checkpoint restores the RNG state for that, on the
host, which a CUDA graph cannot replay: so LoRA dropout used to turn the graphed training step off (the
default ``--dropout 0.05`` lost ~1.2x (8B) to ~1.9x (1B) of speed). Here the mask depends only on

* ``key``: a 0-dim int64 *device* tensor, one value per micro-batch (the trainer derives it from the run's
  seed and the micro-batch's index, so a resumed run draws the same masks), read by the kernel on the GPU
  (a graph replay sees each step's new value);
* ``salt``: a per-layer integer (each LoRA layer drops independently);
* the element's flat index in the (contiguous) input,

so a recompute gives the same mask, backward needs no saved mask (it applies the same keyed dropout to the
gradient), and no RNG state is touched. Keep probability: an element is dropped when its 32-bit hash is
below ``round(p * 2**32)``; kept ones are scaled by ``1 / (1 - p)`` (as ``nn.Dropout``).

The hash of element ``i`` is ``fmix((i ^ k1) * PHI + k2)`` (murmur3's 32-bit finalizer ``fmix`` after a
multiply by an odd constant, ``k1``/``k2`` derived from the key and the salt): one finalizer per element, so
the kernels stay near memory speed (two finalizers made them bound by integer instructions). It is written
once for the GPU (:func:`_dropout_kernel`, uint32 arithmetic in Triton) and once in torch
(:func:`keep_mask_reference`, int64 with 32-bit wrap-around) and the two agree bit for bit (GPU test).
Flat indices wrap at 2**32 elements (a 4-billion-element activation; masks would repeat past that).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

M32 = 0xFFFFFFFF
C1, C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3 fmix32 multipliers
GOLDEN = 0x9E3779B9
PHI = 0x9E3779B1  # odd: multiplying by it is a bijection mod 2**32
BLOCK = 2048


def threshold(p: float) -> int:
    """Hashes below this are dropped: ``round(p * 2**32)``, within [0, 2**32 - 1]."""
    return min(int(round(p * 2.0 ** 32)), M32)


# -- torch reference (int64 holding uint32 values) ----------------------------------------------------


def _mul32(h: torch.Tensor | int, c: int):
    """``h * c mod 2**32`` for 0 <= h, c < 2**32 without int64 overflow (c split in 16-bit halves)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix(h):
    h = h ^ (h >> 16)
    h = _mul32(h, C1)
    h = h ^ (h >> 13)
    h = _mul32(h, C2)
    return h ^ (h >> 16)


def salt_mix(salt: int) -> int:
    """``fmix(salt * GOLDEN)``: the layer's part of the round keys, computed once on the host (kernels take it)."""
    return _fmix((int(salt) * GOLDEN) & M32)


def _i32(v: int) -> int:
    """A 32-bit pattern as the signed int32 with the same bits: Triton types an int argument i32 or i64 by its
    value, and a kernel compiles once per type, so values that fill 32 bits would compile each kernel twice
    (the kernels read these arguments as uint32 either way)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def launch_args(p: float, salt: int) -> tuple[int, int, float]:
    """``(salt_mix, thresh, scale)`` as the keyed-dropout kernels take them: one argument type for every salt
    and rate, so one compiled kernel serves all layers of a run."""
    return _i32(salt_mix(salt)), _i32(threshold(p)), 1.0 / (1.0 - p)


def _keys(key: int, salt: int) -> tuple[int, int]:
    """The two 32-bit round keys of one (key, salt) pair (what the kernel computes from the device key)."""
    lo, hi = key & M32, (key >> 32) & M32
    k1 = _fmix(lo ^ salt_mix(salt))
    k2 = _fmix(hi ^ k1 ^ GOLDEN)
    return k1, k2


def hash_reference(n: int, key: int, salt: int, device=None) -> torch.Tensor:
    """The 32-bit hash of flat indices ``0..n-1`` (int64 tensor of values in [0, 2**32))."""
    k1, k2 = _keys(int(key), int(salt))
    idx = torch.arange(n, dtype=torch.int64, device=device) & M32
    return _fmix((_mul32(idx ^ k1, PHI) + k2) & M32)


def keep_mask_reference(n: int, p: float, key: int, salt: int, device=None) -> torch.Tensor:
    """Which of ``n`` elements a keyed dropout keeps (bool [n])."""
    return hash_reference(n, key, salt, device) >= threshold(p)


def dropout_reference(x: torch.Tensor, p: float, key: int, salt: int) -> torch.Tensor:
    """Keyed dropout in torch: ``x * keep / (1 - p)`` (16-bit inputs computed in fp32, rounded once)."""
    keep = keep_mask_reference(x.numel(), p, key, salt, x.device).view(x.shape)
    wide = torch.promote_types(x.dtype, torch.float32)
    return torch.where(keep, x.to(wide) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


# -- Triton ------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _fmix32(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def round_keys(key_ptr, salt_mix):
        """(k1, k2) from the device key and the host's :func:`salt_mix` (what :func:`_keys` computes)."""
        key = tl.load(key_ptr).to(tl.uint64)
        lo = (key & 0xFFFFFFFF).to(tl.uint32)
        hi = (key >> 32).to(tl.uint32)
        k1 = _fmix32(lo ^ salt_mix.to(tl.uint32))
        k2 = _fmix32(hi ^ k1 ^ 0x9E3779B9)
        return k1, k2

    @triton.jit
    def keep(flat, k1, k2, thresh):
        """Whether the elements at int64 flat indices ``flat`` are kept (:func:`hash_reference` >= thresh)."""
        h = _fmix32((flat.to(tl.uint32) ^ k1) * 0x9E3779B1 + k2)
        return h >= thresh.to(tl.uint32)

    @triton.jit(do_not_specialize=["salt_mix", "thresh"])
    def _dropout_kernel(x_ptr, y_ptr, key_ptr, n, salt_mix, thresh, scale, BLOCK: tl.constexpr):
        k1, k2 = round_keys(key_ptr, salt_mix)
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = tl.where(keep(offs, k1, k2, thresh), x.to(tl.float32) * scale, 0.0)
        tl.store(y_ptr + offs, y.to(x.dtype), mask=mask)


def key_ok(x: torch.Tensor, key: torch.Tensor) -> bool:
    """A one-element int64 key on x's device (what the kernels read)."""
    return key.device == x.device and key.numel() == 1 and key.dtype == torch.int64


def usable(x: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether :func:`dropout` takes these tensors (Triton, CUDA, fp32/bf16/fp16, :func:`key_ok`)."""
    return (triton is not None and x.is_cuda and key_ok(x, key)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def dropout(x: torch.Tensor, p: float, key: torch.Tensor, salt: int) -> torch.Tensor:
    """Keyed dropout of ``x`` (a new tensor, x's shape and dtype) by the Triton kernel; callers check
    :func:`usable`. No autograd (see :class:`KeyedDropout`)."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, BLOCK),)](xc, y, key, n, *launch_args(p, salt),
                                                  BLOCK=BLOCK, num_warps=8)
    return y


def apply(x: torch.Tensor, p: float, key: torch.Tensor, salt: int) -> torch.Tensor:
    """Keyed dropout with autograd: the Triton kernel on a GPU, :func:`dropout_reference` elsewhere (it
    reads the key's value on the host)."""
    return KeyedDropout.apply(x, p, key, salt)


class KeyedDropout(torch.autograd.Function):
    """``y = keep * x / (1 - p)``; backward is the same keyed dropout of the gradient (no saved mask)."""

    @staticmethod
    def forward(ctx, x, p, key, salt):
        ctx.p, ctx.key, ctx.salt = p, key, salt
        return _run(x, p, key, salt)

    @staticmethod
    def backward(ctx, g):
        return _run(g, ctx.p, ctx.key, ctx.salt), None, None, None


def _run(x: torch.Tensor, p: float, key: torch.Tensor, salt: int) -> torch.Tensor:
    if usable(x, key):
        return dropout(x, p, key, salt)
    return dropout_reference(x.contiguous(), p, int(key.item()), salt)
