"""QLoRALinear against a plain float LoRA computed on the dequantized weight."""
import math

import pytest
import torch

from qlora import nf4
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear


def _layer(out_f=48, in_f=80, r=8, alpha=16, dtype=torch.float32, quant_type="nf4", bias=True, **kw):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    m = QLoRALinear.from_weight(w, b, quant_type=quant_type, r=r, alpha=alpha, compute_dtype=dtype, **kw)
    with torch.no_grad():
        m.lora_B.normal_(generator=g)  # non-zero B so the LoRA path matters
    return m, w, b


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", None])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_equal_float_lora_on_dequantized_weight(quant_type, rslora):
    m, w, b = _layer(quant_type=quant_type, use_rslora=rslora)
    x = torch.randn(3, 5, 80, requires_grad=True)
    y = m(x)
    gy = torch.randn_like(y)
    y.backward(gy)

    wd = m.base_weight(torch.float32).clone() if quant_type else w
    if quant_type:  # the reference dequantizes independently through nf4
        wd = nf4.dequantize_4bit(m.weight_packed, m.state, torch.float32)
    A = m.lora_A.detach().clone().requires_grad_()
    B = m.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    scale = 16 / math.sqrt(8) if rslora else 16 / 8
    y2 = x2 @ wd.t() + b + scale * (x2 @ A.t()) @ B.t()
    y2.backward(gy)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.lora_A.grad, A.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.lora_B.grad, B.grad, rtol=1e-4, atol=1e-4)


def test_bf16_compute_close_to_fp32():
    m, w, b = _layer(dtype=torch.bfloat16)
    x = torch.randn(4, 80)
    ref = x @ m.base_weight(torch.float32).t() + b + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t()
    y = m(x)
    assert y.dtype == torch.float32  # output follows the input dtype
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=5e-2)  # bf16 rounding of x, W, A, B


def test_zero_B_gives_base_output_and_init_matches_peft_convention():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    m = QLoRALinear.from_weight(w, quant_type="nf4", r=4, compute_dtype=torch.float32)
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3
    x = torch.randn(7, 64)
    torch.testing.assert_close(m(x), x @ nf4.dequantize_4bit(m.weight_packed, m.state, torch.float32).t())


def test_packed_weight_unchanged_by_training_step_and_gets_no_grad():
    m, _, _ = _layer()
    before = m.weight_packed.clone(), m.absmax.clone(), m.nested_absmax.clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    assert {n for n, p in m.named_parameters()} == {"lora_A", "lora_B"}
    for _ in range(3):
        m(torch.randn(4, 80)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(m.weight_packed, before[0]) and torch.equal(m.absmax, before[1])
    assert torch.equal(m.nested_absmax, before[2])


def test_merge_equals_base_plus_scaled_BA():
    m, _, _ = _layer()
    ref = nf4.dequantize_4bit(m.weight_packed, m.state, torch.float32) + m.scaling * m.lora_B @ m.lora_A
    torch.testing.assert_close(m.merged_weight(torch.float32), ref, rtol=0, atol=1e-6)
    x = torch.randn(2, 80)
    torch.testing.assert_close(m(x), x @ m.merged_weight(torch.float32).t() + m.bias, rtol=1e-5, atol=1e-5)


def test_autograd_graph_holds_no_16bit_copy_of_W():
    out_f, in_f = 256, 512
    m = QLoRALinear.from_weight(torch.randn(out_f, in_f), quant_type="nf4", r=8,
                                compute_dtype=torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, in_f, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert saved, "hooks saw nothing"
    big = [t for t in saved if t.is_floating_point() and t.numel() >= out_f * in_f]
    assert not big, [(t.shape, t.dtype) for t in big]
    assert any(t.dtype == torch.uint8 and t.numel() == out_f * in_f // 2 for t in saved)
    y.sum().backward()  # and backward still works after the graph was built
    assert x.grad is not None and m.lora_A.grad is not None


def test_dropout_only_on_lora_path():
    m, _, _ = _layer(dropout=0.5)
    m.train()
    x = torch.randn(16, 80)
    m.disable_adapter = True
    torch.testing.assert_close(m(x), m(x))  # base path is deterministic
    m.disable_adapter = False
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_bad_rank(bad):
    with pytest.raises(QLoraError, match="rank"):
        QLoRALinear(8, 8, r=bad)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    m, _, _ = _layer(dtype=torch.float32)
    x = torch.randn(6, 80)
    y = m(x)
    mc = m.to("cuda")
    torch.testing.assert_close(mc(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)


def test_dequant_cache_same_output_and_inactive_with_grad():
    from qlora.linear import dequant_cache
    m, _, _ = _layer(dtype=torch.float32)
    x = torch.randn(3, 80)
    with torch.no_grad():
        ref = m(x)
    with dequant_cache(m):
        assert m._wcache is not None
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        xg = x.clone().requires_grad_()
        m(xg).sum().backward()  # with grad enabled the cache is not used
        assert xg.grad is not None
    assert m._wcache is None


def test_training_dequant_cache_gives_identical_grads():
    from qlora.linear import dequant_cache
    m, _, _ = _layer(dtype=torch.float32)
    x = torch.randn(5, 80, requires_grad=True)
    m(x).pow(2).sum().backward()
    ref = x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()
    x.grad = None
    m.zero_grad()
    with dequant_cache(m, training=True):
        m(x).pow(2).sum().backward()
    for a, b in zip(ref, (x.grad, m.lora_A.grad, m.lora_B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _two_layer_model(dtype):
    torch.manual_seed(3)
    net = torch.nn.Sequential(*[_layer(out_f=80, in_f=80, r=r, dtype=dtype)[0] for r in (4, 8)])
    with torch.no_grad():
        for m in net:
            m.lora_A.normal_()
    return net


@pytest.mark.parametrize("checkpointed", [False, True])
def test_lora_cast_gives_bit_identical_loss_and_grads(checkpointed):
    """One cast for all adapters (lora_cast) computes exactly what per-layer casts compute, also
    when the block is recomputed by gradient checkpointing inside the context."""
    from torch.utils.checkpoint import checkpoint

    from qlora.linear import lora_cast
    net = _two_layer_model(torch.bfloat16)
    x = torch.randn(6, 80, dtype=torch.bfloat16)

    def run():
        net.zero_grad()
        y = checkpoint(net, x, use_reentrant=False) if checkpointed else net(x)
        loss = y.float().pow(2).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]
    ref_loss, ref_grads = run()
    with lora_cast(net) as lc:
        assert all(m._lora_c is not None for m in net)
        loss, grads = run()
    assert lc.layers and all(m._lora_c is None for m in net)  # released on exit
    assert torch.equal(loss, ref_loss)
    assert len(grads) == 4 and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    with torch.no_grad():
        ref_y = net(x)
    with torch.no_grad(), lora_cast(net):  # generation: a plain cast, used while gradients stay off
        assert all(m._lora_c is not None and not m._lora_c_grad for m in net)
        assert torch.equal(net(x), ref_y)
        with torch.enable_grad():  # a forward with gradients inside it casts per call: grads still flow
            loss, grads = run()
    assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert all(m._lora_c is None for m in net)


def test_lora_path_matches_float_reference_with_scaling():
    """y = x W^T + b + (alpha/r) (x A^T) B^T (the addmm with the scaling in its epilogue), in fp32."""
    m, w, b = _layer(r=8, alpha=24, dtype=torch.float32, quant_type=None)
    x = torch.randn(3, 7, 80)
    want = x @ w.t() + b + (x @ m.lora_A.t().detach()) @ m.lora_B.t().detach() * 3.0
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_grad", [True, False])
def test_grads_with_lora_dropout_match_float_reference(x_grad):
    """The fused LoRA node (one autograd node for base + LoRA) with dropout on the LoRA input:
    x, A and B gradients against the same math in plain fp32 autograd with the same mask."""
    m, w, b = _layer(r=8, alpha=24, dtype=torch.float32, quant_type=None, dropout=0.5)
    m.train()
    x = torch.randn(2, 5, 80, requires_grad=x_grad)
    torch.manual_seed(7)
    y = m(x)
    (y * torch.linspace(-1, 1, 48)).sum().backward()
    a = m.lora_A.detach().clone().requires_grad_()
    bb = m.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_(x_grad)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(xr, 0.5, training=True)
    yr = xr @ w.t() + b + (xd @ a.t()) @ bb.t() * 3.0
    (yr * torch.linspace(-1, 1, 48)).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.lora_A.grad, a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.lora_B.grad, bb.grad, rtol=1e-4, atol=1e-4)
    if x_grad:
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_fused_and_unfused_lora_paths_agree(switch):
    """QLORA_FUSED_LORA=0 (separate autograd ops) computes what the fused node computes."""
    m, _, _ = _layer(r=8, alpha=16, dtype=torch.float32)
    x = torch.randn(4, 80, requires_grad=True)
    out = []
    for fused in (True, False):
        switch("QLORA_FUSED_LORA", "1" if fused else "0")
        x.grad = None
        m.zero_grad()
        y = m(x)
        y.pow(2).sum().backward()
        out.append((y.detach(), x.grad.clone(), m.lora_A.grad.clone(), m.lora_B.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lora_cast_reentered_follows_updated_factors():
    """One lora_cast instance entered per micro-batch casts the factors as they are at entry."""
    from qlora.linear import lora_cast
    net = _two_layer_model(torch.float32)
    casts = lora_cast(net)
    for scale in (1.0, 2.0):
        with torch.no_grad():
            net[0].lora_A.mul_(scale)
        with casts:
            assert torch.equal(net[0]._lora_c[0], net[0].lora_A.to(net[0].compute_dtype))
            assert torch.equal(net[1]._lora_c[1], net[1].lora_B.to(net[1].compute_dtype))
        assert net[0]._lora_c is None


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="the CUDA GEMV needs compute capability >= 9.0")
def test_one_row_inference_reads_4bit_weight_through_cuda_gemv(monkeypatch, switch):
    """Generating (no grad, one row on a Hopper GPU) multiplies by the 4-bit weight through the CUDA GEMV,
    prepared once per layer, dtype and device: the result is the dequantized weight's (float64 reference,
    bf16 tolerance); grad mode, more rows, a CPU move and QLORA_CUDA_GEMV=0 take the dequantizing path."""
    from qlora.kernels import gemv_cuda
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(320, 512, generator=g) * 0.05, torch.randn(320, generator=g)
    m = QLoRALinear.from_weight(w, bias, r=8, alpha=16, compute_dtype=torch.bfloat16).to("cuda")
    with torch.no_grad():
        m.lora_B.normal_()
    prepared = []
    real = gemv_cuda.prepare
    monkeypatch.setattr(gemv_cuda, "prepare", lambda *a, **kw: prepared.append(1) or real(*a, **kw))

    def exact(x):  # float64: base on the dequantized weight, bias, LoRA
        a, b = m.lora_A.double(), m.lora_B.double()
        x = x.double().reshape(-1, 512)
        return x @ m.base_weight(torch.float32).double().t() + m.bias.double() + m.scaling * (x @ a.t()) @ b.t()

    for shape in ((1, 1, 512), (512,), (1, 512)):
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = m(x)
        assert y.shape == (*shape[:-1], 320) and y.dtype == torch.bfloat16
        want = exact(x).reshape(y.shape)
        assert ((y.double() - want).norm() / want.norm()).item() < 8e-3
    assert prepared == [1] and m._gemv.ok  # planned once, then kept
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m(torch.randn(3, 512, device="cuda", dtype=torch.bfloat16))  # prefill: dequantize + matmul
    m(x)  # grad mode: the training path
    assert prepared == [1]
    m.to("cpu")
    assert m._gemv is None
    with torch.no_grad():
        m(x.cpu())
    m.to("cuda")
    switch("QLORA_CUDA_GEMV", "0")
    with torch.no_grad():
        y = m(x)
    assert prepared == [1] and not m._gemv.ok  # remembered as not taken
    want = exact(x).reshape(y.shape)
    assert ((y.double() - want).norm() / want.norm()).item() < 8e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_row_adapter_through_the_row_kernel_in_decoding(monkeypatch, dtype):
    """Inside row_kernels() (CUDA-graph decoding) a one-row no-grad forward adds the adapter with the Triton
    row kernel, in place; outside it, or with more rows, torch does. Both equal the float64 computation."""
    from qlora.kernels import lora_row
    from qlora.linear import row_kernels
    g = torch.Generator().manual_seed(4)
    w, bias = torch.randn(320, 512, generator=g) * 0.05, torch.randn(320, generator=g)
    m = QLoRALinear.from_weight(w, bias, r=8, alpha=16, compute_dtype=dtype).to("cuda")
    with torch.no_grad():
        m.lora_B.normal_()
    calls = []
    real = lora_row.lora_row_
    monkeypatch.setattr(lora_row, "lora_row_", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 512, device="cuda", dtype=dtype)
    a, b = m.lora_A.double(), m.lora_B.double()
    want = x.double() @ m.base_weight(torch.float32).double().t() + m.bias.double() + m.scaling * (x.double() @ a.t()) @ b.t()
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    with torch.no_grad():
        plain = m(x)
        assert calls == []
        with row_kernels():
            fused = m(x)
            assert calls == [1]
            m(torch.randn(3, 512, device="cuda", dtype=dtype))  # more rows: torch
        assert calls == [1]
    for y in (plain, fused):
        assert y.shape == (1, 320) and ((y.double() - want).norm() / want.norm()).item() < tol


def test_prepared_gemv_is_not_copied_or_pickled_with_a_layer():
    """A layer that decoded on a GPU holds a gemv_cuda.Prepared (device pointers, a compiled kernel): a deep
    copy or a pickle of the layer drops it (the copy prepares its own on first use) instead of failing."""
    import copy
    import pickle

    from qlora.kernels.gemv_cuda import Prepared
    m, _, _ = _layer()
    m._gemv = object.__new__(Prepared)  # what _decode_gemv leaves there (built without a GPU here)
    m2 = copy.deepcopy(m)
    assert m2._gemv is None and m._gemv is not None
    m3 = pickle.loads(pickle.dumps(m))
    assert m3._gemv is None
    x = torch.randn(2, 80)
    torch.testing.assert_close(m3(x), m(x), rtol=0, atol=0)
