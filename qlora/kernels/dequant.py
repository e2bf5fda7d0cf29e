"""Triton 4-bit dequantization (NF4 / FP4 / Int4) with Double Quantization fused in.

Input format (see :mod:`qlora.nf4`): ``packed`` uint8 ``[(n + 1) // 2, 1]``, two codes per
byte, element ``2i`` in the high nibble of byte ``i``; per block of ``blocksize`` elements one
scale. With DQ the scale is ``nested_code[absmax_u8[b]] * nested_absmax[b // 256] + offset``,
without DQ it is ``absmax_fp32[b]``. Element ``e`` of block ``b`` is ``code[q_e] * scale_b``,
computed in fp32 and then rounded to the output dtype.

The kernel does the same fp32 operations in the same order as :func:`qlora.nf4.dequantize_4bit`
(one multiply, one add for the scale; one multiply for the element) and is compiled with
floating-point contraction off, so no multiply-add is fused into an FMA: the result is
**bit-identical** to the torch reference, for every dtype.

Work split: one program handles ``ROWS`` whole quantization blocks laid out as a
``[ROWS, blocksize // 8]`` tile of 32-bit words of packed codes, so each block's scale is decoded
once and broadcast along its row, and the nibbles come out of 32-bit shifts (byte-wide integer
code compiles to many byte permutes). Programs that lie wholly inside the tensor run without
masks (so the loads and stores stay 16 bytes wide); only the last one is masked.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import QLoraError
from ..nf4 import FLOAT_DTYPES, QuantState, dequantize_4bit as dequantize_4bit_reference

try:  # Triton is optional: CPU installs run the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Bytes of packed input per program (a multiple of every blocksize // 2 up to 2048) and warps.
# On an H100, 14336x4096: 2.79-2.81 TB/s for tiles of 1-4 KiB with 4 or 8 warps (bench/kernel_speed.py).
TILE_BYTES = 2048
NUM_WARPS = 4

def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (triton.cdiv is a jit function: slow to call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 for anything else, e.g. the CPU interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


__all__ = ["dequantize_4bit_reference", "dequantize_4bit_triton", "check_quantized"]


def check_quantized(packed: torch.Tensor, state: QuantState) -> None:
    """Raise :class:`QLoraError` unless ``packed`` / ``state`` describe a valid 4-bit tensor."""
    if not isinstance(state, QuantState):
        raise QLoraError(f"expected a qlora.nf4.QuantState, got {type(state).__name__}")
    if packed.dtype != torch.uint8:
        raise QLoraError(f"packed 4-bit weights must be uint8, got {packed.dtype}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise QLoraError(f"packed tensor has {packed.numel()} bytes but the state's shape "
                         f"{tuple(state.shape)} needs {(n + 1) // 2}; weight and quant state do not belong together")
    nblocks = -(-n // state.blocksize)
    if state.absmax.numel() != nblocks:
        raise QLoraError(f"quant state has {state.absmax.numel()} absmax values, expected {nblocks} "
                         f"for {n} elements in blocks of {state.blocksize}")
    if state.code.numel() != 16:
        raise QLoraError(f"4-bit code book must have 16 entries, got {state.code.numel()}")
    if state.blocksize % 2 or state.blocksize < 2:
        raise QLoraError(f"block size must be even, got {state.blocksize}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8:
            raise QLoraError(f"double-quantized absmax must be uint8, got {state.absmax.dtype}")
        if state.nested_code is None or state.nested_code.numel() != 256 or state.offset is None:
            raise QLoraError("double-quantized state needs a 256-entry nested_code and an offset")
        if state.nested_absmax.numel() != -(-nblocks // state.nested_blocksize):
            raise QLoraError("nested_absmax has the wrong length for the number of blocks")
    elif state.absmax.dtype != torch.float32:
        raise QLoraError(f"absmax must be float32 without double quantization, got {state.absmax.dtype}")


def _device_state(state: QuantState, device: torch.device):
    """The state's tensors on ``device`` in the dtypes the kernel reads."""
    def on(t, dtype):  # the common case (already there) costs no torch call: this runs per matmul
        if t.device == device and t.dtype == dtype and t.is_contiguous():
            return t
        return t.to(device=device, dtype=dtype).contiguous()
    code = on(state.code, torch.float32)
    absmax = on(state.absmax, torch.uint8 if state.double_quant else torch.float32)
    if state.double_quant:
        return code, absmax, on(state.nested_absmax, torch.float32), on(state.nested_code, torch.float32)
    return code, absmax, absmax, code  # placeholders, never read when DQ is off


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                           out: torch.Tensor | None = None, tile_bytes: int | None = None,
                           num_warps: int | None = None) -> torch.Tensor:
    """Dequantize with the Triton kernel; same result, bit for bit, as ``nf4.dequantize_4bit``.

    ``out``: optional preallocated buffer (contiguous, numel >= n, any float dtype; its dtype
    wins over ``dtype``), e.g. one workspace reused by every layer. The return value is a view of
    its first ``n`` elements in the state's shape. ``tile_bytes`` / ``num_warps`` override the
    tuned launch parameters (for benchmarking).
    """
    if triton is None:
        raise QLoraError("Triton is not installed; use qlora.kernels.dequantize_4bit, which falls back to torch")
    check_quantized(packed, state)
    n = state.numel
    if out is not None:
        if out.dtype not in FLOAT_DTYPES or not out.is_contiguous() or out.numel() < n:
            raise QLoraError(f"out buffer must be a contiguous float tensor with at least {n} elements, "
                             f"got {out.dtype} {tuple(out.shape)}")
        if out.device != packed.device:
            raise QLoraError(f"out buffer is on {out.device} but the weight is on {packed.device}")
        dest = out.view(-1)[:n]
    else:
        dtype = dtype or state.dtype
        if dtype not in FLOAT_DTYPES:
            raise QLoraError(f"can dequantize to float32/float16/bfloat16, not {dtype}")
        dest = torch.empty(n, dtype=dtype, device=packed.device)
    code, absmax, nested_absmax, nested_code = _device_state(state, packed.device)
    packed = packed.reshape(-1)
    if packed.data_ptr() % 4:  # the kernel reads whole 32-bit words
        packed = packed.clone()
    bs = state.blocksize
    half = bs // 2
    tile = tile_bytes or TILE_BYTES
    rows = max(1, tile // half)
    nblocks = absmax.numel()
    grid = (cdiv(nblocks, rows),)
    _dequant_kernel[grid](
        packed, absmax, nested_absmax, nested_code, code, dest,
        float(state.offset) if state.double_quant else 0.0, n, nblocks,
        BS=bs, NESTED_BS=state.nested_blocksize, ROWS=rows, DQ=state.double_quant,
        BIG=n + rows * bs >= 2 ** 31,
        num_warps=num_warps or NUM_WARPS, enable_fp_fusion=False,
    )
    return dest.view(state.shape)


if triton is not None:

    @triton.jit
    def _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, blk, nblocks, offset,
                NESTED_BS: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
        """fp32 scale of each block index in ``blk``: undo DQ if it is on."""
        if MASKED:
            am = tl.load(absmax_ptr + blk, mask=blk < nblocks, other=0)
        else:
            am = tl.load(absmax_ptr + blk)
        s = am
        if DQ:
            # Same two roundings as the reference: (code8 * nested_absmax) then + offset.
            s = tl.load(nested_code_ptr + am) * tl.load(nested_absmax_ptr + blk // NESTED_BS) + offset
        return s

    @triton.jit
    def nibbles(words):
        """uint32 words [..., W] -> 4-bit codes [..., W, 8] in element order. Byte i of a word
        (little-endian) holds element 2i in its high nibble and element 2i + 1 in its low one."""
        k = tl.arange(0, 8)
        shift = (k // 2) * 8 + (1 - k % 2) * 4
        return ((tl.expand_dims(words, len(words.shape)) >> shift) & 15).to(tl.int32)

    @triton.jit
    def _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                      offset, n, nblocks, blk,
                      BS: tl.constexpr, NESTED_BS: tl.constexpr, DQ: tl.constexpr, MASKED: tl.constexpr):
        WPB: tl.constexpr = BS // 8  # 32-bit words of packed codes per block
        word = blk[:, None] * WPB + tl.arange(0, WPB)[None, :]
        if MASKED:  # the tensor may end inside a word: read bytes and assemble the words
            byte = word[:, :, None] * 4 + tl.arange(0, 4)[None, None, :]
            b = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.uint32)
            w = tl.sum(b << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
        else:
            w = tl.load(packed_ptr.to(tl.pointer_type(tl.uint32)) + word, eviction_policy="evict_first")
        s = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, blk, nblocks, offset,
                    NESTED_BS, DQ, MASKED)
        vals = tl.load(code_ptr + nibbles(w)) * s[:, None, None]
        vals = tl.reshape(vals, (blk.shape[0], BS)).to(out_ptr.dtype.element_ty)
        elem = blk[:, None] * BS + tl.arange(0, BS)[None, :]
        if MASKED:
            tl.store(out_ptr + elem, vals, mask=elem < n)
        else:
            tl.store(out_ptr + elem, vals)

    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                        offset, n, nblocks,
                        BS: tl.constexpr, NESTED_BS: tl.constexpr, ROWS: tl.constexpr,
                        DQ: tl.constexpr, BIG: tl.constexpr):
        pid = tl.program_id(0)
        if BIG:
            pid = pid.to(tl.int64)
        blk = pid * ROWS + tl.arange(0, ROWS)
        if (pid + 1) * (ROWS * BS) <= n:
            _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                          offset, n, nblocks, blk, BS, NESTED_BS, DQ, False)
        else:
            _dequant_tile(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                          offset, n, nblocks, blk, BS, NESTED_BS, DQ, True)
