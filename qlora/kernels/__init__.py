"""GPU kernels (Triton, and one in CUDA C++), each beside its pure-torch reference, and dispatch functions.

Every function here takes the Triton path when :func:`available` (CUDA present, Triton
importable, compute capability >= 8.0, and not switched off with ``QLORA_KERNELS=0``) and the
tensors are on a CUDA device; otherwise it runs the torch reference, so callers never branch
themselves. :func:`describe` says which, for the run header.

=============================  ============================  ===================================
function                       Triton kernel                 reference
=============================  ============================  ===================================
dequantize_4bit                dequant.py (bit-exact)         qlora.nf4.dequantize_4bit
matmul_4bit                    gemv_cuda.py: 1 row, Hopper   x @ dequantize_4bit(W).T
                               (CUDA C++ via NVRTC);
                               gemv.py: 1..16 rows; else
                               Triton dequant + matmul
rms_norm                       norm_act.RMSNormFunction       norm_act.rms_norm_reference
swiglu                         norm_act.SwiGLUFunction        norm_act.swiglu_reference
rope                           norm_act.RoPEFunction          norm_act.rope_reference
chunked_linear_cross_entropy   torch + ce.py (softmax grad)   loss.linear_cross_entropy_reference
lora_row_                      lora_row.py (2 launches)       lora_row.lora_row_reference
dropout.apply (via linear.     dropout.py (bit-exact)         dropout.dropout_reference
LoraDropout in keyed_dropout)
=============================  ============================  ===================================
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..nf4 import QuantState
from ..nf4 import dequantize_4bit as _dequantize_4bit_torch
from ..settings import switches
from . import norm_act
from .loss import chunked_linear_cross_entropy, linear_cross_entropy_reference

__all__ = [
    "available", "describe", "dequantize_4bit", "matmul_4bit", "rms_norm", "swiglu", "rope",
    "chunked_linear_cross_entropy", "linear_cross_entropy_reference", "lora_row_",
]


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# The Triton kernels convert to and from bf16 with sm_80 instructions and were tuned and tested on sm_90
# (H100/H200): below compute capability 8.0 (T4, V100) every function here takes its torch reference.
MIN_CAPABILITY = (8, 0)


@lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return tuple(torch.cuda.get_device_capability(index)) >= MIN_CAPABILITY


def available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (default: the current CUDA device): CUDA, Triton,
    compute capability >= MIN_CAPABILITY, and ``QLORA_KERNELS`` is not ``0``."""
    if not switches().kernels:
        return False
    if not (torch.cuda.is_available() and _triton_importable()):
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def describe(device: torch.device | str) -> str:
    """One line saying which kernels a run on ``device`` uses, and why (printed in the run header)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "kernels: torch (CPU)"
    major, minor = torch.cuda.get_device_capability(device)
    if available(device):
        from .gemv_cuda import available as gemv_ok
        extra = "; one-row 4-bit GEMV in CUDA C++" if gemv_ok(device) else ""
        return f"kernels: Triton (compute capability {major}.{minor}){extra}"
    if not switches().kernels:
        why = "QLORA_KERNELS=0"
    elif not _triton_importable():
        why = "Triton is not installed"
    else:
        why = f"compute capability {major}.{minor} < {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    return f"kernels: torch references ({why})"


def _use(t: torch.Tensor) -> bool:
    return t.is_cuda and available(t.device)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a packed 4-bit tensor (see :mod:`qlora.nf4` for the format), optionally into the
    preallocated contiguous buffer ``out`` (numel >= n; its dtype wins; a view of it is returned)."""
    if _use(packed):
        from .dequant import dequantize_4bit_triton
        return dequantize_4bit_triton(packed, state, dtype, out=out)
    w = _dequantize_4bit_torch(packed, state, out.dtype if out is not None else dtype)
    if out is None:
        return w
    from .dequant import check_quantized
    check_quantized(packed, state)
    if not out.is_contiguous() or out.numel() < w.numel():
        from ..errors import QLoraError
        raise QLoraError(f"out buffer must be contiguous with at least {w.numel()} elements")
    dest = out.view(-1)[:w.numel()]
    dest.copy_(w.reshape(-1))
    return dest.view(w.shape)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(W).T``: fused GEMV for 1..16 rows on CUDA, else dequantize + matmul."""
    from .gemv import matmul_4bit as _mm
    if _use(x):
        return _mm(x, packed, state, workspace)
    from .gemv import gemv_4bit_reference, _check
    _check(x, packed, state)
    return gemv_4bit_reference(x, packed, state)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LlamaRMSNorm``: ``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``."""
    if _use(x) and weight.is_cuda:
        return norm_act.RMSNormFunction.apply(x, weight, eps)
    return norm_act.rms_norm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` (LlamaMLP's activation). ``inplace_backward`` (kernel path): backward
    overwrites gate and up with their gradients, for callers whose gate/up are used nowhere else."""
    if _use(gate) and up.is_cuda:
        return norm_act.SwiGLUFunction.apply(gate, up, inplace_backward)
    return norm_act.swiglu_reference(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x`` [B, H, S, D] and cos/sin [B or 1, S, D] or [S, D]."""
    if _use(x) and cos.is_cuda and cos.dtype == x.dtype and sin.dtype == x.dtype \
            and cos.stride(-1) == 1 and sin.stride(-1) == 1:
        return norm_act.RoPEFunction.apply(x, cos, sin)
    return norm_act.rope_reference(x, cos, sin)


def lora_row_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> bool:
    """``y += scaling * B @ (A @ x)`` in place for one row (``y`` [N], ``x`` [K], ``a`` [r, K], ``b`` [N, r];
    no autograd) when the Triton kernel takes it: returns True then, else False and ``y`` is untouched
    (the caller computes it with torch)."""
    if not (_use(x) and switches().lora_row):
        return False
    from . import lora_row
    if not lora_row.usable(y, x, a, b):
        return False
    lora_row.lora_row_(y, x, a, b, scaling)
    return True
