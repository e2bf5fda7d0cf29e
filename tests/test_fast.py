"""Fused-kernel routing: same outputs and gradients as the unpatched transformers modules (the CPU
run checks the routing through the torch references; the GPU run checks the Triton kernels)."""
import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from qlora.fast import use_fused_kernels
from qlora.model import LoraSettings, QuantSettings, apply_qlora


def _pair(device):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    m = AutoModelForCausalLM.from_config(cfg).to(device)
    apply_qlora(m, QuantSettings(compute_dtype="fp32"), LoraSettings(r=4, dropout=0.0))
    for mod in m.modules():
        if hasattr(mod, "lora_B") and mod.lora_B is not None:
            mod.lora_B.data.normal_()
    fast = copy.deepcopy(m)
    counts = use_fused_kernels(fast)
    assert counts == {"rmsnorm": 5, "swiglu_mlp": 2, "rope": 2}
    return m, fast


def _loss_grads(m, ids):
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in m.parameters() if p.requires_grad]


def test_routing_equals_transformers_on_cpu():
    m, fast = _pair("cpu")
    ids = torch.randint(0, 100, (2, 16))
    l0, g0 = _loss_grads(m, ids)
    l1, g1 = _loss_grads(fast, ids)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_patched_model_is_freed_by_reference_counting_and_deep_copies():
    """A patched model goes when its last reference does (no reference cycle: its GPU memory is
    released at ``del``, not at the next cycle collection), and a deep copy computes with its own
    weights."""
    import gc
    import weakref
    m, fast = _pair("cpu")
    twin = copy.deepcopy(fast)
    norm = twin.model.norm
    with torch.no_grad():
        norm.weight.mul_(2.0)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(norm(x), 2.0 * fast.model.norm(x))
    gc.collect()
    gc.disable()
    try:
        mlp = fast.model.layers[0].mlp
        gone = [weakref.ref(x) for x in (fast, fast.model.norm, mlp, mlp.up_proj)]  # patched ones, a layer inside
        del fast, mlp
        assert [g() is None for g in gone] == [True] * 4
    finally:
        gc.enable()


@pytest.mark.gpu
def test_training_steps_kernels_on_and_off_same_losses(switch):
    from qlora.optim import make_optimizer
    losses = {}
    for on in (True, False):
        switch("QLORA_KERNELS", "1" if on else "0")
        try:
            m, fast = _pair("cuda")
            model = fast if on else m
            opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "paged_adamw", lr=1e-3)
            g = torch.Generator().manual_seed(1)
            out = []
            for _ in range(4):
                ids = torch.randint(0, 100, (2, 32), generator=g).cuda()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(loss.item())
            losses[on] = out
        finally:
            switch("QLORA_KERNELS", None)
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(losses[True], losses[False])), losses


@pytest.mark.gpu
def test_rope_kernel_equals_transformers_rotary_on_gpu():
    import transformers.models.llama.modeling_llama as ml
    m, fast = _pair("cuda")
    assert hasattr(ml.apply_rotary_pos_emb, "_qlora_original")
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    l1, g1 = _loss_grads(fast, ids)
    patched = ml.apply_rotary_pos_emb
    ml.apply_rotary_pos_emb = patched._qlora_original
    try:
        for p in fast.parameters():
            p.grad = None
        l0, g0 = _loss_grads(fast, ids)
    finally:
        ml.apply_rotary_pos_emb = patched
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
