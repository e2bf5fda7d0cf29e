"""Kernels (qlora/kernels) against their references.

* The Triton kernels run on a CUDA GPU (``-m gpu``). For development without one they also run
  on the CPU through Triton's interpreter: ``TRITON_INTERPRET=1 pytest tests/test_kernels.py``
  (there the interpreter's own fp32->bf16 cast truncates and its bf16 dot is wrong, so bf16 is
  compared with a tolerance and the bf16 dot path is skipped).
* The torch references are checked against transformers (LlamaRMSNorm, apply_rotary_pos_emb)
  and the chunked loss against F.cross_entropy, on the CPU.

Tolerances: dequantization and RoPE are bit-exact on the GPU; RMSNorm/SwiGLU use the GPU's fast
exp/rsqrt and must match the same-dtype reference to one unit in the last place; GEMV and the
backward passes are compared with a float64 computation by relative error ||out - ref|| / ||ref||.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from qlora import nf4
from qlora import kernels as K
from qlora.errors import QLoraError
from qlora.kernels import loss as loss_mod
from qlora.kernels import norm_act as na

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAVE_TRITON and not torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel tests: GPU tests, or plain tests when run through the interpreter.
kernel = (lambda f: f) if INTERPRET else pytest.mark.gpu

if INTERPRET:  # the interpreter calls int() on 1-element arrays, which numpy 2 refuses
    import triton.runtime.interpreter as _ti
    _orig_patch = _ti._patch_lang_tensor

    def _patch(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    _ti._patch_lang_tensor = _patch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEV)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _ulp_close(out, ref, ulps=1, bf16_inside=False):
    """|out - ref| <= ``ulps`` units in the last place of ref's dtype (relative), plus a tiny floor."""
    if INTERPRET and (ref.dtype == torch.bfloat16 or out.dtype == torch.bfloat16 or bf16_inside):
        assert _rel(out, ref) < 1e-2  # the interpreter truncates fp32 -> bf16, at every step
        return
    eps = torch.finfo(ref.dtype).eps
    tol = ref.double().abs() * eps * ulps + torch.finfo(ref.dtype).tiny * 4
    bad = (out.double() - ref.double()).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements differ by more than {ulps} ulp, e.g. {out[bad][:4]} vs {ref[bad][:4]}"


def _exact_or_ulp(out, ref):
    if INTERPRET and ref.dtype == torch.bfloat16:
        _ulp_close(out, ref)  # a tolerance: see _ulp_close
    else:
        assert torch.equal(out, ref), f"{int((out != ref).sum())} of {ref.numel()} elements differ"


# ---------------------------------------------------------------------------------------------
# dequantization

DQ_CASES = [
    # shape, blocksize, quant type, double quant
    ((64, 64), 64, "nf4", True), ((33, 17), 64, "nf4", True), ((1, 1), 64, "nf4", True), ((3,), 32, "fp4", False),
    ((257, 129), 128, "int4", True), ((300, 97), 64, "fp4", True), ((2, 3, 40), 32, "nf4", False),
    ((5, 4097), 4096, "nf4", True), ((70, 256), 256, "nf4", True), ((129, 64), 64, "nf4", False),
]


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bs,qt,dq", DQ_CASES)
def test_dequant_bit_exact(shape, bs, qt, dq, dtype):
    from qlora.kernels.dequant import dequantize_4bit_triton
    w = _rand(*shape, seed=sum(shape) + bs, scale=0.02, dtype=dtype)
    if w.numel() >= 128:
        w.view(-1)[:64] = 0  # an all-zero block
        w.view(-1)[100] = 0.7  # an outlier
    packed, st = nf4.quantize_4bit(w, bs, qt, dq)
    ref = nf4.dequantize_4bit(packed, st)
    out = dequantize_4bit_triton(packed, st)
    assert out.shape == ref.shape and out.dtype == dtype
    _exact_or_ulp(out, ref)
    assert torch.equal(dequantize_4bit_triton(packed, st, torch.float32), nf4.dequantize_4bit(packed, st, torch.float32))


@kernel
def test_dequant_into_reused_buffer():
    """One workspace for two layers of different sizes; only the first n elements are written."""
    from qlora.kernels.dequant import dequantize_4bit_triton
    buf = torch.full((9000,), float("nan"), dtype=torch.bfloat16, device=DEV)
    for shape, seed in (((70, 128), 1), ((33, 65), 2)):
        packed, st = nf4.quantize_4bit(_rand(*shape, seed=seed, dtype=torch.bfloat16), 64, "nf4", True)
        out = dequantize_4bit_triton(packed, st, out=buf)
        assert out.data_ptr() == buf.data_ptr() and out.shape == shape
        _exact_or_ulp(out, nf4.dequantize_4bit(packed, st))
    assert torch.isnan(buf[70 * 128:]).all()
    with pytest.raises(QLoraError):
        dequantize_4bit_triton(packed, st, out=torch.empty(10, dtype=torch.bfloat16, device=DEV))


@pytest.mark.gpu
def test_dequant_matches_bitsandbytes_gpu():
    """Weights quantized by bitsandbytes on the GPU dequantize to the same bits as its own kernel."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = _rand(512, 320, seed=3, scale=0.05, dtype=torch.bfloat16)
    packed, bst = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    st = nf4.QuantState.from_state_dict({f"w.{k}": v for k, v in bst.as_dict(packed=True).items()}, "w")
    assert torch.equal(K.dequantize_4bit(packed, st), bnbF.dequantize_4bit(packed, bst))


@pytest.mark.gpu
def test_dequant_large_gpu():
    w = _rand(4096, 1000, seed=5, scale=0.03, dtype=torch.bfloat16)
    packed, st = nf4.quantize_4bit(w, 64, "nf4", True)
    assert torch.equal(K.dequantize_4bit(packed, st), nf4.dequantize_4bit(packed, st))


# ---------------------------------------------------------------------------------------------
# GEMV

GEMV_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GEMV_CASES = [
    # (N, K), blocksize, rows, split_k
    ((64, 256), 64, 1, None), ((48, 576), 64, 3, 2), ((40, 576), 64, 8, None), ((33, 128), 128, 1, None),
    ((16, 8192), 4096, 2, None), ((70, 192), 64, 16, 3), ((130, 64), 64, 4, None), ((17, 1024), 32, 5, 4),
]


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nk,bs,m,split", GEMV_CASES)
def test_gemv_matches_float64(nk, bs, m, split, dtype):
    from qlora.kernels.gemv import gemv_4bit_reference, gemv_4bit_triton
    if INTERPRET and dtype == torch.bfloat16 and m > 1:
        pytest.skip("the Triton interpreter's bf16 dot is wrong")
    n, k = nk
    packed, st = nf4.quantize_4bit(_rand(n, k, seed=n + k, scale=0.05, dtype=dtype), bs, "nf4", bs != 32)
    x = _rand(m, k, seed=m, dtype=dtype)
    y = gemv_4bit_triton(x, packed, st, split_k=split)
    exact = x.double() @ nf4.dequantize_4bit(packed, st, torch.float32).double().t()
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, exact) < GEMV_TOL[dtype]
    assert _rel(y, gemv_4bit_reference(x, packed, st)) < 2 * GEMV_TOL[dtype]


@kernel
def test_matmul_4bit_paths():
    """3-D input through the GEMV; more than 16 rows and K not a multiple of the block size take
    the dequantize + matmul path; all equal the reference."""
    from qlora.kernels.gemv import gemv_4bit_reference, gemv_supported, matmul_4bit
    packed, st = nf4.quantize_4bit(_rand(96, 128, seed=1, scale=0.05), 64, "nf4", True)
    for x in (_rand(2, 3, 128, seed=2), _rand(40, 128, seed=3)):
        assert _rel(matmul_4bit(x, packed, st), gemv_4bit_reference(x, packed, st)) < 1e-5
    p2, st2 = nf4.quantize_4bit(_rand(8, 96, seed=4, scale=0.05), 64, "nf4", True)  # K % 64 != 0
    x2 = _rand(1, 96, seed=5)
    assert not gemv_supported(x2, st2)
    assert _rel(matmul_4bit(x2, p2, st2), gemv_4bit_reference(x2, p2, st2)) < 1e-5
    with pytest.raises(QLoraError):
        matmul_4bit(_rand(1, 64, seed=6), packed, st)


# LoRA for one row (lora_row.py): y += scaling * B @ (A @ x), in place

LORA_ROW_CASES = [  # (N, K, r)
    (4096, 4096, 16), (1024, 4096, 16), (14336, 4096, 16), (4096, 14336, 16), (100, 300, 8), (33, 64, 1),
    (4096, 4096, 64), (70, 1000, 3), (128, 4096, 128),
]


def test_lora_row_reference_is_the_float_computation():
    from qlora.kernels.lora_row import lora_row_reference
    y, x = _rand(50, seed=1), _rand(70, seed=2)
    a, b = _rand(4, 70, seed=3), _rand(50, 4, seed=4)
    want = y.double() + 0.5 * (b.double() @ (a.double() @ x.double()))
    assert _rel(lora_row_reference(y, x, a, b, 0.5), want) < 1e-6


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,r", LORA_ROW_CASES)
def test_lora_row_matches_float64(n, k, r, dtype):
    """The two-launch Triton LoRA row against float64, in place, and against the torch path's rounding."""
    from qlora.kernels.lora_row import lora_row_, lora_row_reference, usable
    y = _rand(n, seed=n, dtype=dtype)
    x = _rand(k, seed=k, dtype=dtype)
    a = _rand(r, k, seed=r, scale=k ** -0.5, dtype=dtype)
    b = _rand(n, r, seed=n + r, scale=0.1, dtype=dtype)
    want = y.double() + 2.0 * (b.double() @ (a.double() @ x.double()))
    ref = lora_row_reference(y, x, a, b, 2.0)
    assert usable(y, x, a, b)
    out = y.clone()
    got = lora_row_(out, x, a, b, 2.0)
    assert got is out and out.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert _rel(out, want) < tol and _rel(ref, want) < tol
    assert _rel(out, ref) < tol
    # what QLoRALinear's torch path computes (x @ A.T rounded to the dtype, then addmm)
    torch_path = torch.addmm(y.view(1, n), x.view(1, k) @ a.t(), b.t(), alpha=2.0).view(n)
    assert _rel(torch_path, want) < 2 * tol


# CUDA GEMV (gemv_cuda.py): one row, Hopper and newer

def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


hopper = pytest.mark.skipif(not _hopper(), reason="the CUDA GEMV needs compute capability >= 9.0")

CUDA_GEMV_CASES = [
    # (N, K), blocksize, double quant, split
    ((64, 256), 64, True, None), ((200, 4096), 64, True, None), ((48, 576), 64, False, None),
    ((40, 1024), 128, True, None), ((16, 8192), 4096, True, None), ((130, 14336), 64, True, None),
    ((17, 1024), 32, False, 2), ((96, 4096), 256, True, 3), ((700, 1536), 64, True, None),
]


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("variant", ["mma", "fma"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nk,bs,dq,split", CUDA_GEMV_CASES)
def test_cuda_gemv_matches_float64(nk, bs, dq, split, dtype, variant):
    """Both variants (tensor cores where x is 16-bit and K, the block size multiples of 64; FMA) at least
    as close to the float64 product as the reference (weights rounded to x's dtype)."""
    from qlora.kernels import gemv_cuda
    from qlora.kernels.gemv import gemv_4bit_reference
    n, k = nk
    if variant == "mma" and (dtype == torch.float32 or k % 64 or bs % 64):
        pytest.skip("the tensor-core variant needs 16-bit x and K, block size multiples of 64")
    packed, st = nf4.quantize_4bit(_rand(n, k, seed=n + k, scale=0.05, dtype=dtype), bs, "nf4", dq)
    x = _rand(1, k, seed=k, dtype=dtype)
    assert gemv_cuda.supported(x, st)
    if variant == "mma":
        assert gemv_cuda.kind(x, st) == "mma"  # what kernels.matmul_4bit runs here
    y = gemv_cuda.gemv_4bit_cuda(x, packed, st, split=split, variant=variant)
    exact = x.double() @ nf4.dequantize_4bit(packed, st, torch.float32).double().t()
    assert y.shape == (1, n) and y.dtype == dtype
    assert _rel(y, exact) < GEMV_TOL[dtype]
    assert _rel(y, exact) <= 1.25 * _rel(gemv_4bit_reference(x, packed, st), exact) + 1e-7


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("variant", ["mma", "fma"])
def test_cuda_gemv_more_nested_scales_than_threads(variant):
    """A block reads more nested scales than it has threads (a nested block of 8 scales, as a checkpoint
    may carry: 128 per 16-row group here, ~5 groups per block): the prologue's remainder loop."""
    from dataclasses import replace
    from qlora.kernels import gemv_cuda
    from qlora.kernels.gemv import gemv_4bit_reference
    n, k = 11264, 4096
    packed, st = nf4.quantize_4bit(_rand(n, k, seed=11, scale=0.05, dtype=torch.bfloat16), 64, "nf4", True)
    scales = st.absmax_fp32()
    offset = scales.mean()
    q, nested = nf4.quantize_blockwise(scales - offset, 8)
    st8 = replace(st, absmax=q, nested_absmax=nested, nested_blocksize=8, offset=float(offset), _absmax_cache=None)
    x = _rand(1, k, seed=12, dtype=torch.bfloat16)
    assert gemv_cuda.supported(x, st8) and gemv_cuda.kind(x, st8) == "mma"
    y = gemv_cuda.gemv_4bit_cuda(x, packed, st8, variant=variant)
    exact = x.double() @ nf4.dequantize_4bit(packed, st8, torch.float32).double().t()
    assert _rel(y, exact) <= 1.25 * _rel(gemv_4bit_reference(x, packed, st8), exact) + 1e-7


@pytest.mark.gpu
@hopper
def test_cuda_gemv_dispatch_and_fallbacks(monkeypatch, switch):
    """kernels.matmul_4bit sends one row to the CUDA kernel; QLORA_CUDA_GEMV=0, more rows, K > 4096,
    shapes it does not take and a failed compilation go to the Triton kernel, with the same result."""
    from qlora.kernels import gemv_cuda, gemv
    packed, st = nf4.quantize_4bit(_rand(96, 512, seed=1, scale=0.05, dtype=torch.bfloat16), 64, "nf4", True)
    x = _rand(1, 512, seed=2, dtype=torch.bfloat16)
    want = gemv.gemv_4bit_triton(x, packed, st)
    calls = []
    real = gemv_cuda.gemv_4bit_cuda
    monkeypatch.setattr(gemv_cuda, "gemv_4bit_cuda", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert _rel(K.matmul_4bit(x, packed, st), want) < 1e-2 and calls == [1]
    K.matmul_4bit(_rand(2, 512, seed=3, dtype=torch.bfloat16), packed, st)
    assert calls == [1] and gemv_cuda.kind(x, st) == "mma"
    p3, st3 = nf4.quantize_4bit(_rand(32, 8192, seed=7, scale=0.05, dtype=torch.bfloat16), 64, "nf4", True)
    x3 = _rand(1, 8192, seed=8, dtype=torch.bfloat16)
    assert gemv_cuda.kind(x3, st3) == "mma" and gemv_cuda.preferred(x3, st3)  # K split, tensor cores
    assert _rel(K.matmul_4bit(x3, p3, st3), gemv.gemv_4bit_triton(x3, p3, st3)) < 1e-2 and calls == [1, 1]
    x4 = x3.float()  # fp32 x, K > 4096: the FMA variant would split K; the Triton one is preferred
    assert gemv_cuda.kind(x4, st3) == "fma" and not gemv_cuda.preferred(x4, st3)
    assert _rel(K.matmul_4bit(x4, p3, st3), gemv.gemv_4bit_triton(x4, p3, st3)) == 0 and calls == [1, 1]
    switch("QLORA_CUDA_GEMV", "0")
    assert not gemv_cuda.supported(x, st)
    K.matmul_4bit(x, packed, st)
    assert calls == [1, 1]
    switch("QLORA_CUDA_GEMV", None)
    switch("QLORA_GEMV_MMA", "0")  # the FMA variant instead of the tensor-core one
    assert gemv_cuda.kind(x, st) == "fma" and _rel(K.matmul_4bit(x, packed, st), want) < 1e-2
    switch("QLORA_GEMV_MMA", None)
    p2, st2 = nf4.quantize_4bit(_rand(8, 4288, seed=4, scale=0.05), 64, "nf4", True)  # 8 rows x 67 scales
    assert not gemv_cuda.supported(_rand(1, 4288, seed=5), st2)
    with pytest.raises(QLoraError):
        real(_rand(1, 4288, seed=5), p2, st2)
    monkeypatch.setattr(gemv_cuda, "_kernels", {})
    monkeypatch.setattr(gemv_cuda, "_broken", [])

    def refuse(*a, **kw):
        raise RuntimeError("Kernel compilation failed: planted")
    monkeypatch.setattr(torch.cuda, "_compile_kernel", refuse)
    with pytest.warns(RuntimeWarning, match="planted"):
        y = K.matmul_4bit(x, packed, st)
    assert torch.equal(y, want) and not gemv_cuda.available(x.device)


@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336), (128256, 4096), (1000, 4288), (896, 4864),
                                 (4864, 896), (64, 32), (17, 1024)])
@pytest.mark.parametrize("dq", [True, False])
def test_cuda_gemv_plan_fits(n, k, dq):
    """The launch plan (pure arithmetic, checked on any machine): every split within a block's 16
    warps, the splits cover K, the shared memory fits an H100/H200 (227 KiB), the block's nested
    scales fit their buffer."""
    from qlora.kernels import gemv_cuda as G
    bs = 32 if k % 64 else 64
    kb_bytes = k // bs * (1 if dq else 4)
    split, split_len, warps, depth, blocks, cap = G.plan(n, k, kb_bytes, 256 if dq else 0, 132, 232448)
    assert split_len % 32 == 0 and split_len <= G.MAX_SPLIT_LEN
    assert split * split_len >= k > (split - 1) * split_len
    assert warps == -(-split_len // G.SLICE) <= 16 and 2 <= depth <= G.MAX_DEPTH
    assert 1 <= blocks <= max(1, 132 // split) and blocks <= -(-n // G.ROWS)
    assert G.smem_bytes(warps, split_len, depth, G.ROWS * kb_bytes, cap) <= 232448
    if dq:  # the nested scales of the largest group range, plus one for an unaligned start
        groups = -(-(-(-n // G.ROWS)) // blocks)
        assert cap >= groups * G.ROWS * (k // bs) // 256 + 2
    if k % 64 == 0:  # the tensor-core variant: 64-element blocks, 4 per consumer warp, the table's layout
        split, split_len, warps, blocks, cap = G.plan_mma(n, k, kb_bytes, 256 if dq else 0, 132)
        assert split_len % 64 == 0 and split_len <= G.MAX_SPLIT_LEN and split * split_len >= k > (split - 1) * split_len
        assert warps == -(-split_len // 256) <= 16 and 1 <= blocks <= max(1, 132 // split)
        front, total = G.mma_smem_bytes(warps, split_len, G.ROWS * kb_bytes, cap)
        assert front <= G.MMA_FRONT and total <= 232448
        if dq:
            groups = -(-(-(-n // G.ROWS)) // blocks)
            assert cap >= groups * G.ROWS * (k // bs) // 256 + 2


def test_cuda_gemv_refuses_cpu_and_rows():
    from qlora.kernels import gemv_cuda
    packed, st = nf4.quantize_4bit(_rand(64, 128, seed=1, scale=0.05).cpu(), 64, "nf4", True)
    assert not gemv_cuda.supported(torch.randn(1, 128), st)
    assert not gemv_cuda.supported(torch.randn(2, 128), st)
    with pytest.raises(QLoraError, match="does not handle"):
        gemv_cuda.gemv_4bit_cuda(torch.randn(1, 128), packed, st)


# ---------------------------------------------------------------------------------------------
# RMSNorm / SwiGLU / RoPE kernels

BWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,wdtype", [((3, 5, 96), None), ((7, 1000), None), ((1, 77), torch.float32), ((300, 64), None)])
def test_rms_norm(shape, wdtype, dtype):
    x = _rand(*shape, seed=shape[-1], dtype=dtype).requires_grad_()
    w = (1 + 0.1 * _rand(shape[-1], seed=1)).to(wdtype or dtype).requires_grad_()
    y = na.RMSNormFunction.apply(x, w, 1e-5)
    ref = na.rms_norm_reference(x.detach(), w.detach(), 1e-5)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # fp32: the sum order and rsqrt differ by a few ulps
    _ulp_close(y, ref, ulps=8 if ref.dtype == torch.float32 else 1, bf16_inside=dtype == torch.bfloat16)
    dy = _rand(*y.shape, seed=9, dtype=y.dtype)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    na.rms_norm_reference(x64, w64, 1e-5).backward(dy.double())
    assert x.grad.dtype == dtype and w.grad.dtype == w.dtype
    assert _rel(x.grad, x64.grad) < BWD_TOL[dtype]
    assert _rel(w.grad, w64.grad) < BWD_TOL[dtype]


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 77), (2, 3, 1024), (5000,)])
def test_swiglu(shape, dtype):
    g = (2 * _rand(*shape, seed=1, dtype=dtype)).requires_grad_()
    u = _rand(*shape, seed=2, dtype=dtype).requires_grad_()
    out = na.SwiGLUFunction.apply(g, u)
    ref = na.swiglu_reference(g.detach(), u.detach())
    # silu is rounded to the dtype before the product, so the product inherits up to one ulp
    silu_ref = F.silu(g.detach())
    if dtype == torch.float32:
        _ulp_close(out, ref, ulps=4)  # exp differs by an ulp or two
    else:
        _ulp_close(out, (silu_ref.double() * u.detach().double()).to(dtype))
    do = _rand(*shape, seed=3, dtype=dtype)
    out.backward(do)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    na.swiglu_reference(g64, u64).backward(do.double())
    assert _rel(g.grad, g64.grad) < BWD_TOL[dtype]
    assert _rel(u.grad, u64.grad) < BWD_TOL[dtype]


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_inplace_backward_equals_out_of_place(dtype):
    x = _rand(6, 300, seed=4, dtype=dtype).requires_grad_()
    grads = []
    for inplace in (False, True):
        x.grad = None
        gate, up = x * 2, x - 0.5  # fresh tensors, as gate_proj / up_proj give
        na.SwiGLUFunction.apply(gate, up, inplace).backward(_rand(6, 300, seed=5, dtype=dtype))
        grads.append(x.grad.clone())
        if inplace:  # the saved gate now holds its gradient: the memory was reused
            assert not torch.equal(gate.detach(), (x * 2).detach())
    assert torch.equal(grads[0], grads[1])


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bhsd,table,transposed", [
    ((2, 3, 7, 16), "batch", True), ((1, 4, 33, 64), "seq", False), ((3, 2, 5, 128), "one", True), ((1, 1, 1, 8), "batch", False),
])
def test_rope_bit_exact(bhsd, table, transposed, dtype):
    b, h, s, d = bhsd
    if transposed:  # [B, S, H, D] viewed as [B, H, S, D], as attention layers produce it
        x = _rand(b, s, h, d, seed=d, dtype=dtype).transpose(1, 2)
    else:
        x = _rand(b, h, s, d, seed=d, dtype=dtype)
    x = x.detach().requires_grad_()
    tshape = {"batch": (b, s, d), "seq": (s, d), "one": (1, s, d)}[table]
    cos, sin = _rand(*tshape, seed=1, dtype=dtype), _rand(*tshape, seed=2, dtype=dtype)
    y = na.RoPEFunction.apply(x, cos, sin)
    xr = x.detach().clone().requires_grad_()
    ref = na.rope_reference(xr, cos, sin)
    _exact_or_ulp(y, ref)
    dy = _rand(*y.shape, seed=3, dtype=dtype)
    y.backward(dy)
    ref.backward(dy)
    _exact_or_ulp(x.grad, xr.grad)


@kernel
def test_rope_rejects_bad_tables():
    x = _rand(1, 2, 4, 8)
    with pytest.raises(QLoraError):
        na.RoPEFunction.apply(x, _rand(4, 6), _rand(4, 6))
    with pytest.raises(QLoraError):
        na.RoPEFunction.apply(x, _rand(4, 8, dtype=torch.float16), _rand(4, 8, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------
# torch references vs transformers (CPU)


def test_references_match_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    g = _gen(0)
    for dtype in DTYPES:
        x = torch.randn(2, 5, 48, generator=g).to(dtype)
        norm = llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(48, generator=g))
        assert torch.equal(na.rms_norm_reference(x.cpu(), norm.weight, 1e-5), norm(x.cpu()))
        q, k = torch.randn(2, 3, 5, 16, generator=g).to(dtype), torch.randn(2, 1, 5, 16, generator=g).to(dtype)
        cos, sin = torch.randn(2, 5, 16, generator=g).to(dtype), torch.randn(2, 5, 16, generator=g).to(dtype)
        q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(na.rope_reference(q, cos, sin), q_ref)
        assert torch.equal(na.rope_reference(k, cos, sin), k_ref)


def test_dispatch_falls_back_on_cpu(switch):
    switch("QLORA_KERNELS", "0")
    assert not K.available()
    w = torch.randn(40, 64, generator=_gen(1)) * 0.05
    packed, st = nf4.quantize_4bit(w, 64, "nf4", True)
    assert torch.equal(K.dequantize_4bit(packed, st), nf4.dequantize_4bit(packed, st))
    buf = torch.zeros(3000, dtype=torch.float16)
    out = K.dequantize_4bit(packed, st, out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, nf4.dequantize_4bit(packed, st, torch.float16))
    x = torch.randn(3, 64, generator=_gen(2))
    assert torch.equal(K.matmul_4bit(x, packed, st), x @ nf4.dequantize_4bit(packed, st).t())
    h = torch.randn(4, 64, generator=_gen(3))
    assert torch.equal(K.rms_norm(h, torch.ones(64)), na.rms_norm_reference(h, torch.ones(64)))
    assert torch.equal(K.swiglu(h, x[:1].expand(4, 64)), F.silu(h) * x[:1])
    with pytest.raises(QLoraError):
        K.matmul_4bit(torch.randn(2, 63), packed, st)


@pytest.mark.gpu
def test_dispatch_uses_kernels_on_gpu():
    assert K.available() == HAVE_TRITON


# ---------------------------------------------------------------------------------------------
# chunked linear + cross-entropy (CPU)


def _ce_case(n, h, v, dtype, seed=0, ignore_every=4):
    g = _gen(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float16, 1e-6)])
@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
def test_chunked_ce_matches_cross_entropy(dtype, tol, chunk, grad_in_forward):
    hidden, weight, labels = _ce_case(37, 24, 101, dtype)
    h1 = hidden.clone().requires_grad_()
    loss = K.chunked_linear_cross_entropy(h1, weight, labels, chunk_size=chunk, grad_in_forward=grad_in_forward)
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    ref = F.cross_entropy((h2 @ weight.t()).float(), labels)
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    gtol = 1e-6 if dtype == torch.float32 else 1e-2  # the 16-bit matmul's own rounding
    assert _rel(h1.grad, h2.grad) < gtol
    assert h1.grad.dtype == dtype


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_chunked_ce_weight_grad_and_frozen_head(grad_in_forward):
    hidden, weight, labels = _ce_case(20, 16, 50, torch.float32, seed=1)
    w1 = weight.clone().requires_grad_()
    h1 = hidden.clone().requires_grad_()
    (2.5 * K.chunked_linear_cross_entropy(h1, w1, labels, chunk_size=6, grad_in_forward=grad_in_forward)).backward()
    w2 = weight.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    (2.5 * F.cross_entropy(h2 @ w2.t(), labels)).backward()
    assert _rel(w1.grad, w2.grad) < 1e-6 and _rel(h1.grad, h2.grad) < 1e-6
    # frozen lm_head: no weight gradient is formed
    h3 = hidden.clone().requires_grad_()
    K.chunked_linear_cross_entropy(h3, weight, labels, chunk_size=6, grad_in_forward=grad_in_forward).backward()
    assert weight.grad is None and _rel(h3.grad, h2.grad / 2.5) < 1e-6


def test_chunked_ce_sum_leading_dims_and_ignored():
    hidden, weight, labels = _ce_case(24, 8, 30, torch.float32, seed=2, ignore_every=3)
    h1 = hidden.view(4, 6, 8).clone().requires_grad_()
    loss = K.chunked_linear_cross_entropy(h1, weight, labels.view(4, 6), chunk_size=5, reduction="sum")
    loss.backward()
    h2 = hidden.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ weight.t(), labels, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(h1.grad.view(24, 8), h2.grad) < 1e-6
    assert (h1.grad.view(24, 8)[labels == -100] == 0).all()
    all_ignored = torch.full((24,), -100)
    assert torch.isnan(K.chunked_linear_cross_entropy(hidden, weight, all_ignored)).item() == \
        torch.isnan(F.cross_entropy(hidden @ weight.t(), all_ignored)).item()


def test_chunked_ce_never_forms_full_logits(monkeypatch):
    seen = []
    real = loss_mod._chunk_logits

    def spy(h, w):
        seen.append(h.shape[0])
        return real(h, w)
    monkeypatch.setattr(loss_mod, "_chunk_logits", spy)
    real_inplace = loss_mod._chunk_loss_and_grads_inplace

    def spy_inplace(h, w, lab, ignore, scale, gh, gw, lbuf, fbuf):  # the CPU path of grad_in_forward
        assert lbuf.shape[0] <= 16 and fbuf.shape[0] <= 16
        seen.append(h.shape[0])
        return real_inplace(h, w, lab, ignore, scale, gh, gw, lbuf, fbuf)
    monkeypatch.setattr(loss_mod, "_chunk_loss_and_grads_inplace", spy_inplace)
    hidden, weight, labels = _ce_case(50, 8, 64, torch.float32, seed=3)
    K.chunked_linear_cross_entropy(hidden.requires_grad_(), weight, labels, chunk_size=16).backward()
    assert max(seen) <= 16 and sum(seen) == 2 * 50  # forward + recompute in backward
    seen.clear()
    loss = K.chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16, grad_in_forward=True)
    loss.backward()
    assert max(seen) <= 16 and sum(seen) == 50  # gradients formed in the one forward pass
    seen.clear()
    with torch.no_grad():  # no gradients wanted: none are formed
        assert torch.allclose(K.chunked_linear_cross_entropy(hidden, weight, labels, grad_in_forward=True), loss)


def test_chunked_ce_rejects_bad_input():
    hidden, weight, labels = _ce_case(6, 8, 10, torch.float32)
    bad = labels.clone()
    bad[1] = 10
    with pytest.raises(QLoraError, match="labels"):
        K.chunked_linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(QLoraError):
        K.chunked_linear_cross_entropy(hidden, weight[:, :4], labels)
    with pytest.raises(QLoraError):
        K.chunked_linear_cross_entropy(hidden, weight, labels[:5])
    with pytest.raises(QLoraError):
        K.chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# fused softmax cross-entropy gradient (ce.py), written over the logits


def _xent_case(rows, vocab, dtype, seed=0):
    g = _gen(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::3] = -100
    return logits, labels


def _xent_autograd(logits, labels, scale):
    f = logits.float().requires_grad_()
    losses = F.cross_entropy(f, labels, reduction="none", ignore_index=-100)
    (losses.sum() * scale).backward()
    return losses.detach(), f.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 101, 5000])
@pytest.mark.parametrize("buffered", [False, True])
def test_xent_grad_torch_matches_autograd(dtype, vocab, buffered):
    from qlora.kernels import ce
    logits, labels = _xent_case(13, vocab, dtype)
    want_loss, want_grad = _xent_autograd(logits, labels, 0.37)
    out = logits.clone()
    buf = torch.full((20, vocab), float("nan")) if buffered else None  # larger than needed, stale contents
    losses = ce.softmax_xent_grad_torch_(out, labels, torch.tensor(0.37), buf=buf)
    assert losses.dtype == torch.float32 and out.dtype == dtype
    assert torch.allclose(losses, want_loss, rtol=1e-5, atol=1e-5)
    assert _rel(out, want_grad.to(dtype)) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (out[labels == -100] == 0).all()


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 101, 4096, 5000])
def test_xent_grad_kernel_matches_autograd(dtype, vocab):
    from qlora.kernels import ce
    logits, labels = _xent_case(9, vocab, dtype, seed=vocab)
    want_loss, want_grad = _xent_autograd(logits, labels, 0.25)
    out = logits.to(DEV)
    losses = ce._launch(out, labels.to(DEV), torch.tensor(0.25, device=DEV), -100)
    assert torch.allclose(losses.cpu(), want_loss, rtol=1e-5, atol=1e-4)
    assert _rel(out.cpu(), want_grad.to(dtype)) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (out.cpu()[labels == -100] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_chunked_ce_gpu_matches_cross_entropy(grad_in_forward):
    hidden, weight, labels = _ce_case(300, 64, 3001, torch.bfloat16, seed=5)
    h1 = hidden.cuda().requires_grad_()
    loss = K.chunked_linear_cross_entropy(h1, weight.cuda(), labels.cuda(), chunk_size=128,
                                          grad_in_forward=grad_in_forward)
    loss.backward()
    h2 = hidden.cuda().requires_grad_()
    ref = F.cross_entropy((h2 @ weight.cuda().t()).float(), labels.cuda())
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _rel(h1.grad, h2.grad) < 1e-2


def test_chunked_ce_fp32_hidden_bf16_head():
    """grad_in_forward's CPU path writes dhidden into a buffer of hidden's dtype, not the head's."""
    hidden, weight, labels = _ce_case(40, 16, 300, torch.float32, seed=6)
    weight = weight.bfloat16()
    h1 = hidden.clone().requires_grad_()
    K.chunked_linear_cross_entropy(h1, weight, labels, chunk_size=16, grad_in_forward=True).backward()
    h2 = hidden.clone().requires_grad_()
    F.cross_entropy((h2.bfloat16() @ weight.t()).float(), labels).backward()
    assert h1.grad.dtype == torch.float32 and _rel(h1.grad, h2.grad) < 1e-2
