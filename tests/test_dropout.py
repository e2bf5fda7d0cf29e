"""Keyed LoRA dropout (qlora/kernels/dropout.py, linear.LoraDropout): the 32-bit hash against exact Python
integer arithmetic, the drop rate and independence of masks against binomial bounds, gradients against the
mask applied by hand, checkpoint recompute against a run without checkpointing (everywhere); the Triton
kernel bit for bit against the torch form, and a CUDA-graph replayed step with dropout against eager steps
(GPU)."""
import math

import pytest
import torch
import torch.nn as nn
import transformers

from qlora.kernels import dropout as kd
from qlora.linear import LoraDropout, QLoRALinear, dropout_key, keyed_dropout
from qlora.model import LoraSettings, QuantSettings, build_random

M32 = 2**32


def _fmix_py(h):  # murmur3 fmix32 with Python's unbounded integers
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % M32
    return h ^ (h >> 16)


def _hash_py(i, key, salt):
    k1 = _fmix_py((key % M32) ^ _fmix_py((salt * 0x9E3779B9) % M32))
    k2 = _fmix_py(((key >> 32) % M32) ^ k1 ^ 0x9E3779B9)
    return _fmix_py((((i % M32) ^ k1) * 0x9E3779B1 + k2) % M32)


# -- everywhere ----------------------------------------------------------------------------------


def test_mul32_is_exact_modular_product():
    g = torch.Generator().manual_seed(0)
    h = torch.cat([torch.randint(0, M32, (5000,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, M32 - 1, 2**31, 2**31 - 1])])
    for c in (kd.C1, kd.C2, 0xFFFFFFFF, 1, 0x10001):
        got = kd._mul32(h, c)
        want = torch.tensor([(int(v) * c) % M32 for v in h], dtype=torch.int64)
        assert torch.equal(got, want)


def test_hash_matches_python_integers():
    for key, salt in ((0, 0), (12345, 3), (dropout_key(42, 7), 11), (dropout_key(2**31 - 1, 2**32 - 1), 10**6)):
        h = kd.hash_reference(300, key, salt)
        assert h.tolist() == [_hash_py(i, key, salt) for i in range(300)]
        assert int(h.min()) >= 0 and int(h.max()) < M32


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_and_independence(p):
    n = 1 << 20
    sd = math.sqrt(n * p * (1 - p))
    masks = [kd.keep_mask_reference(n, p, dropout_key(42, i), salt) for i, salt in ((0, 1), (0, 2), (1, 1))]
    for m in masks:  # each drops ~p of the elements (6 standard deviations)
        assert abs(int((~m).sum()) - n * p) < 6 * sd
    # another salt (layer) or another key (micro-batch): the drops overlap as independent draws would (~p^2)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = int((~masks[a] & ~masks[b]).sum())
        assert abs(both - n * p * p) < 6 * math.sqrt(n * p * p), (a, b, both)
    # no structure along the index: neighbours, and elements a row apart, are independent too
    m = ~masks[0]
    for lag in (1, 2, 3, 64, 4096):
        both = int((m[lag:] & m[:-lag]).sum())
        assert abs(both - (n - lag) * p * p) < 6 * math.sqrt(n * p * p), (lag, both)


def test_launch_args_are_one_int32_type_with_the_same_bits():
    """Triton types an int argument i32 or i64 by its value (one compile each): the kernels get the 32-bit salt
    mix and threshold as signed int32 with the same bits, whatever the salt and rate."""
    for salt in range(2000):
        for p in (0.0, 0.05, 0.5, 0.7, 0.999):
            sm, th, scale = kd.launch_args(p, salt)
            assert -2**31 <= sm < 2**31 and -2**31 <= th < 2**31
            assert sm & kd.M32 == kd.salt_mix(salt) and th & kd.M32 == kd.threshold(p)
            assert scale == 1.0 / (1.0 - p)
    assert any(kd.salt_mix(s) >= 2**31 for s in range(8)) and kd.threshold(0.7) >= 2**31  # both halves seen


def test_threshold_edges():
    assert kd.threshold(0.0) == 0 and kd.threshold(0.5) == 2**31 and kd.threshold(1 - 1e-12) == M32 - 1
    x = torch.randn(64)
    assert torch.equal(kd.dropout_reference(x, 0.0, 5, 1), x)


def test_keyed_function_forward_and_backward_cpu():
    x = torch.randn(7, 33, dtype=torch.float64, requires_grad=True)
    key = torch.tensor(dropout_key(1, 2))
    y = kd.apply(x, 0.2, key, 5)
    keep = kd.keep_mask_reference(x.numel(), 0.2, int(key), 5).view(x.shape)
    assert torch.equal(y, torch.where(keep, x * (1 / (1 - 0.2)), 0.0))
    g = torch.randn_like(x)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g * (1 / (1 - 0.2)), 0.0))


def test_lora_dropout_is_nn_dropout_outside_the_context():
    m = LoraDropout(0.3).train()
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = m(x)
    torch.manual_seed(3)
    assert torch.equal(a, nn.Dropout(0.3).train()(x))
    key = torch.tensor(dropout_key(0, 0))
    with keyed_dropout(m, key):
        assert torch.equal(m(x), kd.dropout_reference(x, 0.3, int(key), m.salt))
        assert m.salt == 1
        m.eval()
        assert torch.equal(m(x), x)  # eval: identity, keyed or not


def _tiny(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=128)
    torch.manual_seed(seed)
    m = build_random(cfg, QuantSettings(quant_type="nf4"), LoraSettings(r=4, alpha=8, dropout=0.25), "cpu", "fp32",
                     progress=False)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    return m.train()


def _grads(m, ids, key, checkpoint):
    from qlora.offload import enable_checkpointing
    if checkpoint:
        enable_checkpointing(m)
    else:
        (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
    m.zero_grad(set_to_none=True)
    with keyed_dropout(m, key):
        torch.manual_seed(int(torch.randint(0, 10**6, ())))  # the global RNG plays no part
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_checkpoint_recompute_draws_the_same_masks():
    m = _tiny()
    salts = [x.salt for x in m.modules() if isinstance(x, LoraDropout)]
    assert len(salts) == 2 * 7
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    key = torch.tensor(dropout_key(42, 0))
    l0, g0 = _grads(m, ids, key, checkpoint=False)
    l1, g1 = _grads(m, ids, key, checkpoint=True)
    assert sorted({x.salt for x in m.modules() if isinstance(x, LoraDropout)}) == list(range(1, 15))
    assert l1 == l0 and g1.keys() == g0.keys() and len(g0) == 4 * 7
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    l2, g2 = _grads(m, ids, torch.tensor(dropout_key(42, 1)), checkpoint=True)  # another micro-batch's masks
    assert l2 != l0
    m.eval()
    with torch.no_grad():
        ev = m(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert ev != l0  # eval drops nothing


def test_dropout_key_layout():
    assert dropout_key(42, 7) == (42 << 32) | 7
    assert dropout_key(2**40 + 3, 2**33 + 5) == (3 << 32) | 5


@pytest.mark.parametrize("need_x", [True, False])
def test_fused_dropout_autograd_equals_separate_dropout(need_x):
    """The LoRA node with dropout inside its products (what runs on a GPU; here the functions' float64 torch
    forms) against the node fed a separately dropped input: same output and gradients."""
    from qlora.linear import _qlora_matmul
    g = torch.Generator().manual_seed(0)
    k, n, r, p, salt, s = 48, 40, 6, 0.3, 4, 2.0
    x0 = torch.randn(2, 15, k, dtype=torch.float64, generator=g)
    w = torch.randn(n, k, dtype=torch.float64, generator=g) * 0.1
    a0 = torch.randn(r, k, dtype=torch.float64, generator=g) * 0.1
    b0 = torch.randn(n, r, dtype=torch.float64, generator=g) * 0.1
    gy = torch.randn(2, 15, n, dtype=torch.float64, generator=g)
    key = torch.tensor(dropout_key(7, 3))

    def run(fused):
        x = x0.clone().requires_grad_(need_x)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        if fused:
            y = _qlora_matmul(x, None, a, b, s, w, None, None, None, (p, key, salt))
        else:
            y = _qlora_matmul(x, kd.apply(x, p, key, salt), a, b, s, w, None, None, None)
        y.backward(gy)
        return y.detach(), x.grad, a.grad, b.grad

    got, want = run(True), run(False)
    assert (got[1] is None) == (not need_x)
    for u, v in zip(got, want):
        if v is not None:
            torch.testing.assert_close(u, v)
    keep = kd.keep_mask_reference(x0.numel(), p, int(key), salt).view(x0.shape)  # and by hand
    xd = torch.where(keep, x0 / (1 - p), 0.0)
    torch.testing.assert_close(got[0], x0 @ w.t() + s * (xd @ a0.t()) @ b0.t())
    torch.testing.assert_close(got[2], s * ((gy @ b0).reshape(-1, r).t() @ xd.reshape(-1, k)))
    if need_x:
        torch.testing.assert_close(got[1], gy @ w + torch.where(keep, s * (gy @ b0) @ a0 / (1 - p), 0.0))


def test_qloralinear_uses_lora_dropout():
    m = QLoRALinear(16, 8, r=4, dropout=0.1)
    assert isinstance(m.lora_dropout, LoraDropout) and isinstance(m.lora_dropout, nn.Dropout)
    assert isinstance(QLoRALinear(16, 8, r=4, dropout=0.0).lora_dropout, nn.Identity)


# -- GPU -----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_torch_bit_for_bit(dtype):
    for n, p, key, salt in ((1, 0.5, 3, 0), (5000, 0.05, dropout_key(42, 12345), 7),
                            (4096 * 33 + 17, 0.1, dropout_key(2**31 - 1, 2**32 - 1), 10**6), (2048, 0.9, 0, 1)):
        x = torch.randn(n, device="cuda", dtype=dtype)
        k = torch.tensor(key, device="cuda")
        assert kd.usable(x, k)
        got = kd.dropout(x, p, k, salt)
        want = kd.dropout_reference(x, p, key, salt)
        assert torch.equal(got, want), (n, p, dtype, (got != want).sum())


@pytest.mark.gpu
def test_kernel_reads_the_key_on_the_device_in_a_graph():
    x = torch.randn(10000, device="cuda", dtype=torch.bfloat16)
    k = torch.tensor(dropout_key(1, 0), device="cuda")
    kd.dropout(x, 0.1, k, 3)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = kd.dropout(x, 0.1, k, 3)
    for i in (5, 6):
        k.fill_(dropout_key(1, i))
        g.replay()
        assert torch.equal(y, kd.dropout_reference(x, 0.1, dropout_key(1, i), 3))


@pytest.mark.gpu
def test_graphed_checkpointed_steps_with_dropout_equal_eager_steps_without_checkpointing():
    from qlora.cuda_graphs import GraphedMicroStep, causal_attention
    from qlora.offload import enable_checkpointing
    from qlora.loss import loss_sum
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=500, max_position_embeddings=512)
    torch.manual_seed(0)
    m = build_random(cfg, QuantSettings(quant_type="nf4"), LoraSettings(r=8, alpha=16, dropout=0.1), "cuda", "bf16",
                     progress=False).train()
    m.config._attn_implementation = "sdpa"
    for n, p in m.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.02)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 500, (2, 64), generator=g)} for _ in range(5)]
    for b in batches:
        b["labels"] = b["input_ids"].clone()

    def micro(b, scale):
        with causal_attention(m), keyed_dropout(m, b["dropout_key"]):
            loss = loss_sum(m, b, "cuda", static_shapes=True) * scale
            loss.backward()
        return loss.detach()

    def run(graphed):
        out = []
        step = GraphedMicroStep(micro, params, torch.device("cuda"), warmup=2, accumulate=False) if graphed else None
        for i, b in enumerate(batches):
            b = dict(b, dropout_key=torch.tensor(dropout_key(42, i)))
            if graphed:
                loss = step(b, 1.0)
            else:
                for p in params:
                    p.grad = None
                loss = micro({k: v.cuda() for k, v in b.items()}, torch.tensor(1.0, device="cuda"))
            out.append((loss.item(), [p.grad.clone() for p in params]))
        return out, step

    (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()
    eager, _ = run(False)
    enable_checkpointing(m)
    graphed, step = run(True)
    assert step.failed is None and step.stats["replays"] >= 3, step.stats
    losses = [l for l, _ in eager]
    assert len(set(losses)) == len(losses)  # each micro-batch its own masks
    for (le, ge), (lg, gg) in zip(eager, graphed):
        assert lg == pytest.approx(le, rel=1e-3)
        for a, b in zip(ge, gg):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-5)


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,r", [(4096, 4096, 16), (1000, 14336, 64), (77, 200, 8), (513, 4096, 128)])
def test_fused_lora_dropout_kernels_match_float64(dtype, m, k, r):
    from qlora.kernels import lora_dropout as ld
    g = torch.Generator(device="cuda").manual_seed(m + k + r)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    a = (torch.randn(r, k, device="cuda", generator=g) * k ** -0.5).to(dtype)
    gxa = torch.randn(m, r, device="cuda", dtype=dtype, generator=g)
    gx = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    key = dropout_key(42, 7)
    kt = torch.tensor(key, device="cuda")
    assert ld.usable(x, a, kt)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3  # one rounding of the output
    for salt, p in ((5, 0.1), (1, 0.7)):  # salt 1 and p 0.7: salt mix and threshold past 2**31 (negative int32)
        assert _rel(ld.down(x, a, p, kt, salt), ld.down_reference(x, a, p, key, salt)) < tol
        assert _rel(ld.grad_a(gxa, x, p, kt, salt), ld.grad_a_reference(gxa, x, p, key, salt)) < tol
        want = ld.grad_x_add_reference(gx, gxa, a, p, key, salt)
        assert _rel(ld.grad_x_add_(gx.clone(), gxa, a, p, kt, salt), want) < tol
        # the same mask as the stand-alone keyed dropout: the unfused path's products agree to its extra rounding
        xd = kd.dropout(x, p, kt, salt)
        assert _rel(xd @ a.t(), ld.down_reference(x, a, p, key, salt)) < 2 * tol


@pytest.mark.gpu
def test_fused_dropout_layer_equals_unfused_layer(switch):
    torch.manual_seed(0)
    layer = QLoRALinear.from_weight(torch.randn(384, 256, device="cuda") * 0.05, r=16, alpha=32, dropout=0.2).cuda()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    layer.train()
    x0 = torch.randn(3, 50, 256, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(3, 50, 384, device="cuda", dtype=torch.bfloat16)
    key = torch.tensor(dropout_key(1, 3), device="cuda")
    out = {}
    for fused in (True, False):
        switch("QLORA_FUSED_DROPOUT", "1" if fused else "0")
        x = x0.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with keyed_dropout(layer, key):
            assert (layer.lora_dropout.fused_args(x, layer.lora_A.to(torch.bfloat16)) is not None) == fused
            y = layer(x)
            y.backward(gy)
        out[fused] = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for a, b in zip(out[True], out[False]):  # the unfused path rounds the dropped input to bf16 first: a few
        assert _rel(a, b.double()) < 1e-2     # outputs one bf16 step apart, relative to the largest value
    assert out[True][2].abs().max() > 0
