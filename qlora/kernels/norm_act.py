"""Fused RMSNorm, SwiGLU and rotary embedding (RoPE), forward and backward, each beside its
pure-torch reference with Hugging Face Llama semantics.

* RMSNorm (``LlamaRMSNorm``): ``y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``;
  ``y`` has dtype ``promote(weight.dtype, x.dtype)``. Backward, with ``h = x * rstd`` (fp32) and
  ``g = dy * weight``: ``dx = rstd * (g - h * mean(g * h))``, ``dweight = sum_rows dy * h.to(x.dtype)``.
  Saved for backward: x and the fp32 ``rstd`` per row (4 bytes/row), never ``h``.
* SwiGLU (``LlamaMLP``'s ``act_fn(gate) * up`` with SiLU): ``a = silu(gate)`` rounded to the
  dtype, ``out = a * up`` rounded. Backward: ``dgate = dout * up * s * (1 + gate * (1 - s))``,
  ``dup = dout * silu(gate)``, ``s = sigmoid(gate)``, in fp32 with one rounding at the end.
* RoPE (``apply_rotary_pos_emb`` with ``rotate_half``): ``out = x * cos + rotate_half(x) * sin``,
  ``rotate_half(x) = cat(-x2, x1)``; ``x`` is ``[B, H, S, D]`` (any strides, unit stride on D),
  ``cos``/``sin`` are ``[B or 1, S, D]`` or ``[S, D]`` in x's dtype. The kernel rounds each product
  and the sum to the dtype like the unfused torch ops and is compiled without FMA contraction,
  so forward and backward are bit-identical to the reference.

RMSNorm and SwiGLU use the GPU's fast ``exp``/``rsqrt``; they match the reference to within one
unit in the last place of the output dtype, not bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import QLoraError
from .dequant import cdiv, next_pow2, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# ---------------------------------------------------------------------------------------------
# torch references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, S, D]; ``cos``/``sin`` [B, S, D] (or [S, D]), broadcast over heads."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _need_triton():
    if triton is None:
        raise QLoraError("Triton is not installed; use the qlora.kernels dispatch functions, which fall back to torch")


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8


# ---------------------------------------------------------------------------------------------
# RMSNorm


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm; saves x (as given) and one fp32 rstd per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        _need_triton()
        shape = x.shape
        hid = shape[-1]
        if weight.shape != (hid,):
            raise QLoraError(f"RMSNorm weight has shape {tuple(weight.shape)}, expected ({hid},)")
        x2 = x.reshape(-1, hid).contiguous()
        weight = weight.contiguous()
        rows = x2.shape[0]
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty(rows, hid, dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = next_pow2(hid)
        if rows:
            _rms_fwd_kernel[(rows,)](x2, weight, y, rstd, hid, float(eps), BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(*shape[:-1], hid)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, hid = x2.shape
        dy2 = dy.reshape(-1, hid).contiguous()
        dx = torch.empty_like(x2)
        block = next_pow2(hid)
        sms = sm_count(x2.device)
        progs = max(1, min(rows, 4 * sms))
        per_prog = cdiv(rows, progs) if rows else 0
        progs = cdiv(rows, per_prog) if rows else 1
        dw_part = torch.zeros(progs, hid, dtype=torch.float32, device=x2.device)
        if rows:  # more warps than forward: five row-sized fp32 temporaries per thread
            _rms_bwd_kernel[(progs,)](dy2, x2, weight, rstd, dx, dw_part, rows, hid, per_prog,
                                      BLOCK=block, num_warps=min(16, 2 * _warps(block)))
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


# ---------------------------------------------------------------------------------------------
# SwiGLU


class SwiGLUFunction(torch.autograd.Function):
    """Fused ``silu(gate) * up``; saves gate and up. ``inplace_backward``: the gradients are written
    over the saved gate and up (no new ``2 x [N, I]`` in backward, the largest tensors of a block's
    backward pass); only for gate/up that nothing else reads afterwards, and a single backward."""

    @staticmethod
    def forward(ctx, gate, up, inplace_backward=False):
        _need_triton()
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise QLoraError(f"SwiGLU needs gate and up of one shape and dtype, got {tuple(gate.shape)} "
                             f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
        g, u = gate.contiguous(), up.contiguous()
        out = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(cdiv(n, 1024),)](g, u, out, n, BLOCK=1024, num_warps=4)
        ctx.save_for_backward(g, u)
        ctx.inplace = bool(inplace_backward)
        return out

    @staticmethod
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        dout = dout.contiguous()
        # in place: each element's gradients are computed from its own g, u, dout and then stored
        dg, du = (g, u) if ctx.inplace else (torch.empty_like(g), torch.empty_like(u))
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(cdiv(n, 1024),)](dout, g, u, dg, du, n, BLOCK=1024, num_warps=4)
        return dg, du, None


# ---------------------------------------------------------------------------------------------
# RoPE


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, forward: bool) -> torch.Tensor:
    """Forward: ``x*cos + rotate_half(x)*sin``; backward (the transpose): ``dy*cos + rotate_half^T(dy*sin)``."""
    b, h, s, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()

    def batch_stride(t):  # 0 broadcasts one table over the batch
        return t.stride(0) if t.dim() == 3 and t.shape[0] > 1 else 0

    out = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
    block_s = min(next_pow2(s), max(1, 2048 // d))
    if out.numel():
        _rope_kernel[(b * h, cdiv(s, block_s))](
            x, cos, sin, out, h, s, d // 2, x.stride(0), x.stride(1), x.stride(2),
            batch_stride(cos), cos.stride(-2), batch_stride(sin), sin.stride(-2),
            int(forward), BLOCK_S=block_s, HALF=next_pow2(d // 2),
            num_warps=4, enable_fp_fusion=False)
    return out


def check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise QLoraError(f"RoPE input must be [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
    b, _, s, d = x.shape
    if d % 2:
        raise QLoraError(f"RoPE head_dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != (s, d) or (t.dim() == 3 and t.shape[0] not in (1, b)):
            raise QLoraError(f"RoPE {name} must be [batch or 1, {s}, {d}] or [{s}, {d}], got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.stride(-1) != 1:
            raise QLoraError(f"RoPE {name} must be {x.dtype} with unit stride on head_dim (got {t.dtype})")


class RoPEFunction(torch.autograd.Function):
    """Fused ``x * cos + rotate_half(x) * sin``; no grad for cos/sin (they are buffers)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        _need_triton()
        check_rope(x, cos, sin)
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, True)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, False), None, None


# ---------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(rstd_ptr + row, rstd)
        h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (w * h).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, R, H, rows_per_prog,
                        BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(0, rows_per_prog):
            row = pid * rows_per_prog + i
            m = ok & (row < R)
            x = tl.load(x_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * H + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < R, other=0.0)
            h = x * rstd
            g = dy * w
            c = tl.sum(g * h, axis=0) / H
            tl.store(dx_ptr + row * H + cols, (rstd * (g - h * c)).to(dx_ptr.dtype.element_ty), mask=m)
            dw += dy * h.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dw_ptr + pid * H + cols, dw, mask=ok)

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded like F.silu
        tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_bwd_kernel(do_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        do = tl.load(do_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        tl.store(dg_ptr + offs, (do * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=ok)
        tl.store(du_ptr + offs, (do * g * s).to(du_ptr.dtype.element_ty), mask=ok)

    # NH (32 query heads, 8 key heads) and the direction are not specialised on: one compilation serves
    # q and k, forward and backward (four compilations, ~0.6 s, of a run's first step before)
    @triton.jit(do_not_specialize=["NH", "forward"])
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, NH, S, HALF_D,
                     sxb, sxh, sxs, scb, scs, ssb, sss, forward,
                     BLOCK_S: tl.constexpr, HALF: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // NH
        hd = bh % NH
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, HALF)
        ok = (s[:, None] < S) & (d[None, :] < HALF_D)
        xp = x_ptr + b * sxb + hd * sxh + s[:, None] * sxs + d[None, :]
        cp = cos_ptr + b * scb + s[:, None] * scs + d[None, :]
        sp = sin_ptr + b * ssb + s[:, None] * sss + d[None, :]
        dt = out_ptr.dtype.element_ty
        x1 = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF_D, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cp, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cp + HALF_D, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sp, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sp + HALF_D, mask=ok, other=0.0).to(tl.float32)
        # every product and sum rounded to the dtype, as the unfused torch ops do
        a1 = (x1 * c1).to(dt).to(tl.float32)
        a2 = (x2 * c2).to(dt).to(tl.float32)
        if forward != 0:  # forward: rotate_half(x) * sin = (-x2 * s1, x1 * s2)
            r1 = (-x2 * s1).to(dt).to(tl.float32)
            r2 = (x1 * s2).to(dt).to(tl.float32)
        else:  # backward: rotate_half^T(dy * sin) = (dy2 * s2, -(dy1 * s1))
            r1 = (x2 * s2).to(dt).to(tl.float32)
            r2 = -((x1 * s1).to(dt).to(tl.float32))
        op = out_ptr + bh * S * (2 * HALF_D) + s[:, None] * (2 * HALF_D) + d[None, :]
        tl.store(op, (a1 + r1).to(dt), mask=ok)
        tl.store(op + HALF_D, (a2 + r2).to(dt), mask=ok)
