"""Fused 4-bit matmul for a few rows (decoding): ``y = x @ dequant(W).T`` without materializing W.

``x`` is ``[..., K]`` with 1..16 rows in all (``M``); ``W`` is a 4-bit ``[N, K]`` weight in the
format of :mod:`qlora.nf4` (packed row-major, two codes per byte, high nibble first, one scale per
``blocksize`` consecutive elements, optional Double Quantization). ``y`` is ``[..., N]`` in x's dtype.

Math::

    y[m, n] = sum_blocks scale[n, b] * sum_{k in b} code[q_nk] * x[m, k]

Two kernels share the tiling (each program: ``BLOCK_N`` output rows; per loop step ``T`` chunks
of 32 elements of ``K``, one scale per row and chunk):

* M == 1 (``_gemv_fma_kernel``): CUDA-core fp32 multiply-adds; each chunk's partial dot product
  is formed inside one thread with the unscaled code values and multiplied by its scale once. More exact than
  the reference (no bf16 rounding of the weights), so it matches it to bf16 matmul tolerance.
* 1 < M <= 16 (``_gemv_dot_kernel``): the weights are rebuilt exactly as the reference rounds them
  (``(code * scale).to(x.dtype)``) and fed to tensor-core dots, ``x`` padded to 16 rows.

Each loop step reads ``T`` chunks of 16 bytes (32 codes, inside one quantization block) per row
as 32-bit words, and the next step's words are loaded before the current step is computed, so
DRAM latency overlaps the decode. ``K`` must be a multiple of the block size (true of every
linear layer we know); other shapes and more rows go to :func:`matmul_4bit`'s
dequantize-then-matmul path. Split over ``K`` into fp32 partial sums when there are too few
row blocks to fill the GPU.

Speed (H100, GPU time): about bitsandbytes' GEMV (28 us for W 14336x4096), limited by
instruction issue of the per-element code-table gather, not by DRAM; see NOTES.md. On Hopper,
one row goes to the CUDA kernel of gemv_cuda.py instead (14.2 us there, H200).
"""
from __future__ import annotations

import torch

from ..errors import QLoraError
from ..nf4 import FLOAT_DTYPES, QuantState, dequantize_4bit
from .dequant import cdiv, next_pow2, sm_count, _device_state, check_quantized, dequantize_4bit_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_GEMV_ROWS = 16
# Launch parameters: (rows per program, K elements per loop step, warps, software-pipeline
# stages); the split over K comes from the SM count. Chosen from bench/kernel_speed.py --sweep on an
# H100 (GPU time, bf16, 1 row): 10.6 us for 4096x4096, 28.3 us for W 14336x4096, 28.8 us for
# W 4096x14336; 16 rows: 19.8 / 58.2 / 51.3 us. See NOTES.md.
FMA_CONFIG = (8, 1024, 2, 1)
DOT_CONFIG = (64, 128, 4, 1)


def gemv_4bit_reference(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``x @ dequantize_4bit(W, x.dtype).T``: the weights rounded to x's dtype, then a plain matmul."""
    return x @ dequantize_4bit(packed, state, x.dtype).t()


def _check(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> tuple[int, int]:
    check_quantized(packed, state)
    if len(state.shape) != 2:
        raise QLoraError(f"4-bit matmul needs a 2-D [out, in] weight, got shape {tuple(state.shape)}")
    n_out, k = (int(s) for s in state.shape)
    if x.dtype not in FLOAT_DTYPES:
        raise QLoraError(f"input must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise QLoraError(f"input's last dimension is {x.shape[-1] if x.dim() else None}, the weight has {k} input features")
    return n_out, k


def gemv_supported(x: torch.Tensor, state: QuantState) -> bool:
    """True when the fused kernel handles this call (otherwise use dequantize + matmul)."""
    if triton is None or len(state.shape) != 2:
        return False
    n_out, k = (int(s) for s in state.shape)
    m = x.numel() // max(1, x.shape[-1])
    return 1 <= m <= MAX_GEMV_ROWS and k % state.blocksize == 0 and n_out * k < 2 ** 31


def _split_k(n_programs: int, k_steps: int, device: torch.device) -> int:
    """Split K until there are about two programs per SM (never below one loop step each)."""
    sms = sm_count(device)
    split = 1
    while n_programs * split < 2 * sms and split * 2 <= k_steps:
        split *= 2
    return split


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                     config: tuple[int, int, int, int] | None = None, split_k: int | None = None) -> torch.Tensor:
    """Fused ``x @ dequant(W).T`` for 1..16 rows; ``config`` = (BLOCK_N, K per step, warps, stages)."""
    if triton is None:
        raise QLoraError("Triton is not installed; use qlora.kernels.matmul_4bit, which falls back to torch")
    n_out, k = _check(x, packed, state)
    if not gemv_supported(x, state):
        raise QLoraError(f"fused 4-bit GEMV needs 1..{MAX_GEMV_ROWS} rows and K a multiple of the block "
                         f"size {state.blocksize}; got {x.numel() // k} rows, K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    use_dot = m > 1
    block_n, tke, warps, stages = config or (DOT_CONFIG if use_dot else FMA_CONFIG)
    if block_n < (16 if use_dot else 2) or block_n & (block_n - 1):
        raise QLoraError(f"BLOCK_N must be a power of two >= {16 if use_dot else 2}, got {block_n}")
    bs = state.blocksize
    tke = max(32, min(tke, next_pow2(k)))  # a step: T chunks of 32 elements per row
    k_steps = cdiv(k, tke)
    n_prog = cdiv(n_out, block_n)
    split = split_k or _split_k(n_prog, k_steps, x.device)
    split = max(1, min(split, k_steps))
    steps_per_split = cdiv(k_steps, split)
    split = cdiv(k_steps, steps_per_split)
    code, absmax, nested_absmax, nested_code = _device_state(state, x.device)
    packed = packed.reshape(-1)
    if packed.data_ptr() % 16:  # the kernel reads aligned 32-bit words
        packed = packed.clone()
    if split == 1:
        out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split, m, n_out, dtype=torch.float32, device=x.device)
    m_pad = 16 if use_dot else 1
    kernel, extra = _gemv_fma_kernel, {}
    if use_dot:  # fp32 inputs: true fp32 products, not tf32
        kernel, extra = _gemv_dot_kernel, {"PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}
    kernel[(n_prog, split)](
        x2, packed, absmax, nested_absmax, nested_code, code, out,
        float(state.offset) if state.double_quant else 0.0,
        m, n_out, k, x2.stride(0), k // 2, k // bs, steps_per_split * tke // 2,
        BS=bs, NESTED_BS=state.nested_blocksize, DQ=state.double_quant, M_PAD=m_pad,
        BLOCK_N=block_n, T=tke // 32, EVEN_N=n_out % block_n == 0, EVEN_K=k % (steps_per_split * tke) == 0,
        num_warps=warps, num_stages=stages, **extra,
    )
    if split > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*lead, n_out)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` for any number of rows: on CUDA, one row goes to the CUDA GEMV
    (gemv_cuda.py, Hopper and newer, where ``gemv_cuda.preferred``) or else the Triton one, 2..16 rows to the Triton GEMV; otherwise
    dequantize (with the Triton kernel on CUDA, into ``workspace`` if given) and matmul."""
    _check(x, packed, state)
    on_gpu = x.is_cuda and triton is not None
    if x.is_cuda and x.numel() == x.shape[-1]:  # one row: the CUDA kernel where it runs (gemv_cuda.py)
        from . import gemv_cuda
        if gemv_cuda.preferred(x, state):
            try:
                return gemv_cuda.gemv_4bit_cuda(x, packed, state)
            except gemv_cuda.CompileError:
                pass  # remembered (warned once); the Triton kernel from now on
    if on_gpu and gemv_supported(x, state):
        return gemv_4bit_triton(x, packed, state)
    if on_gpu:
        w = dequantize_4bit_triton(packed, state, x.dtype,
                                   out=workspace if workspace is not None and workspace.dtype == x.dtype else None)
    else:
        w = dequantize_4bit(packed, state, x.dtype)
    return x @ w.t()


if triton is not None:
    from .dequant import nibbles

    @triton.jit
    def _load_words(packed_ptr, absmax_ptr, rows, kb0, N, KH, KBLK, kb_end,
                    BS: tl.constexpr, T: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        """Raw data of the step at byte column ``kb0``: packed codes as words [BLOCK_N, T, 4] (T chunks
        of 16 bytes = 32 elements, each inside one quantization block) and the chunks' stored
        absmax [BLOCK_N, T]. Issued one step ahead of its use, so DRAM latency overlaps compute."""
        c = tl.arange(0, T)
        word = kb0 // 4 + c[:, None] * 4 + tl.arange(0, 4)[None, :]               # [T, 4]
        ptrs = packed_ptr.to(tl.pointer_type(tl.uint32)) + rows[:, None, None] * (KH // 4) + word[None, :, :]
        blk = rows[:, None] * KBLK + (kb0 + c[None, :] * 16) // (BS // 2)          # [BLOCK_N, T]
        if EVEN_N and EVEN_K:
            words = tl.load(ptrs, eviction_policy="evict_first")
            am = tl.load(absmax_ptr + blk)
        else:
            row_ok = rows < N
            col_ok = (kb0 + c * 16) < kb_end
            words = tl.load(ptrs, mask=row_ok[:, None, None] & col_ok[None, :, None], other=0,
                            eviction_policy="evict_first")
            am = tl.load(absmax_ptr + blk, mask=row_ok[:, None] & col_ok[None, :], other=0)
        return words, am

    @triton.jit
    def _decode(words, am, rows, kb0, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, KBLK,
                BS: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, T: tl.constexpr):
        """Unscaled fp32 code values [BLOCK_N, T, 4, 8] and the fp32 chunk scales [BLOCK_N, T]."""
        s = am
        if DQ:
            blk = rows[:, None] * KBLK + (kb0 + tl.arange(0, T)[None, :] * 16) // (BS // 2)
            s = tl.load(nested_code_ptr + am) * tl.load(nested_absmax_ptr + blk // NESTED_BS) + offset
        return tl.load(code_ptr + nibbles(words)), s

    @triton.jit
    def _x_tile(x_ptr, kb0, kb_end, T: tl.constexpr, EVEN_K: tl.constexpr):
        """One row of x for the step, [T, 4, 8] in x's dtype (0 past K); ``x_ptr`` points at the row."""
        col = 2 * kb0 + (tl.arange(0, T)[:, None, None] * 32 + tl.arange(0, 4)[None, :, None] * 8
                         + tl.arange(0, 8)[None, None, :])
        if EVEN_K:
            return tl.load(x_ptr + col)
        return tl.load(x_ptr + col, mask=col < 2 * kb_end, other=0.0)

    @triton.jit
    def _x_rows(x_ptr, kb0, M, stride_xm, kb_end, M_PAD: tl.constexpr, T: tl.constexpr, EVEN_K: tl.constexpr):
        """Rows of x for the step, [M_PAD, T * 32] in x's dtype (0 outside)."""
        m = tl.arange(0, M_PAD)
        col = 2 * kb0 + tl.arange(0, T * 32)
        ok = m[:, None] < M  # constant along the row: keeps the loads vectorized
        if not EVEN_K:
            ok = ok & (col[None, :] < 2 * kb_end)
        return tl.load(x_ptr + m[:, None] * stride_xm + col[None, :], mask=ok, other=0.0)

    @triton.jit
    def _store_out(out_ptr, acc, rows, M, N, M_PAD: tl.constexpr):
        split = tl.program_id(1)
        m = tl.arange(0, M_PAD)
        ptrs = out_ptr + split * M * N + m[:, None] * N + rows[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(m[:, None] < M) & (rows[None, :] < N))

    @triton.jit
    def _gemv_fma_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                         offset, M, N, K, stride_xm, KH, KBLK, split_bytes,
                         BS: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, T: tl.constexpr,
                         EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
        STEP: tl.constexpr = T * 16
        kb_start = tl.program_id(1) * split_bytes
        kb_last = kb_start + split_bytes - STEP
        kb_end = KH  # bound for masks; the last split's loop may run past it, fully masked
        # The products and the per-chunk sums stay inside each thread (its layout spans whole
        # chunks); each chunk's sum is scaled once. Two row groups share every converted x value.
        HALF: tl.constexpr = BLOCK_N // 2
        rows_a = tl.program_id(0) * BLOCK_N + tl.arange(0, HALF)
        rows_b = rows_a + HALF
        acc_a = tl.zeros((HALF, T), dtype=tl.float32)
        acc_b = tl.zeros((HALF, T), dtype=tl.float32)
        wa, ama = _load_words(packed_ptr, absmax_ptr, rows_a, kb_start, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
        wb, amb = _load_words(packed_ptr, absmax_ptr, rows_b, kb_start, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
        x = _x_tile(x_ptr, kb_start, kb_end, T, EVEN_K)
        for kb0 in range(kb_start, kb_start + split_bytes, STEP):
            nxt = tl.minimum(kb0 + STEP, kb_last)  # the last step re-reads itself (cache hit)
            wa_n, ama_n = _load_words(packed_ptr, absmax_ptr, rows_a, nxt, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
            wb_n, amb_n = _load_words(packed_ptr, absmax_ptr, rows_b, nxt, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
            x_n = _x_tile(x_ptr, nxt, kb_end, T, EVEN_K)
            xf = x.to(tl.float32)[None, :, :, :]
            w, s = _decode(wa, ama, rows_a, kb0, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, KBLK,
                           BS, NESTED_BS, DQ, T)
            acc_a += tl.sum(tl.sum(w * xf, axis=3), axis=2) * s
            w, s = _decode(wb, amb, rows_b, kb0, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, KBLK,
                           BS, NESTED_BS, DQ, T)
            acc_b += tl.sum(tl.sum(w * xf, axis=3), axis=2) * s
            wa, ama, wb, amb, x = wa_n, ama_n, wb_n, amb_n, x_n
        _store_out(out_ptr, tl.sum(acc_a, axis=1)[None, :], rows_a, M, N, 1)
        _store_out(out_ptr, tl.sum(acc_b, axis=1)[None, :], rows_b, M, N, 1)

    @triton.jit
    def _gemv_dot_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                         offset, M, N, K, stride_xm, KH, KBLK, split_bytes,
                         BS: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, T: tl.constexpr,
                         EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        STEP: tl.constexpr = T * 16
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kb_start = tl.program_id(1) * split_bytes
        kb_last = kb_start + split_bytes - STEP
        kb_end = KH
        acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)  # y^T = W x^T: the weights are operand A
        words, am = _load_words(packed_ptr, absmax_ptr, rows, kb_start, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
        for kb0 in range(kb_start, kb_start + split_bytes, STEP):
            nxt = tl.minimum(kb0 + STEP, kb_last)
            words_n, am_n = _load_words(packed_ptr, absmax_ptr, rows, nxt, N, KH, KBLK, kb_end, BS, T, EVEN_N, EVEN_K)
            x = _x_rows(x_ptr, kb0, M, stride_xm, kb_end, M_PAD, T, EVEN_K)
            w, s = _decode(words, am, rows, kb0, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, KBLK,
                           BS, NESTED_BS, DQ, T)
            # the weights exactly as the reference rounds them: (code * scale) in fp32, then to x's dtype
            w = tl.reshape((w * s[:, :, None, None]).to(x.dtype), (BLOCK_N, T * 32))
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
            words, am = words_n, am_n
        _store_out(out_ptr, tl.trans(acc), rows, M, N, M_PAD)
