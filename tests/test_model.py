"""Module swapping and loading across model families, against transformers on dequantized weights."""
import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from qlora import nf4
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, apply_qlora, block_linear_names, build_from_source, build_random

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "mistral": (transformers.MistralConfig, {}),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0)),
}


class DictSource:
    """The smallest Source: tensors held in a dict (the real readers are tested in test_sources.py)."""

    def __init__(self, model):
        self.config = model.config
        self.tensors = {k: v.clone() for k, v in model.state_dict().items()}

    def names(self):
        return list(self.tensors)

    def get(self, name):
        return self.tensors[name]

    def quantized(self, name):
        return None


def tiny(family, seed=0):
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cls(**COMMON, **extra)
    return AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()


def dequantized_reference(model, quant_type="nf4", blocksize=64):
    ref = copy.deepcopy(model)
    for n in block_linear_names(ref):
        lin = ref.get_submodule(n)
        p, s = nf4.quantize_4bit(lin.weight.data, blocksize, quant_type, True)
        lin.weight.data = nf4.dequantize_4bit(p, s, torch.float32)
    return ref


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_match_transformers_on_dequantized_weights(family):
    hf = tiny(family)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = dequantized_reference(hf)(ids).logits
    q = QuantSettings(compute_dtype="fp32")
    ours = build_from_source(DictSource(hf), q, LoraSettings(r=4, dropout=0.0), dtype="fp32", progress=False).eval()
    swapped = block_linear_names(ours)
    assert swapped and all(isinstance(ours.get_submodule(n), QLoRALinear) for n in swapped)
    assert not isinstance(ours.get_output_embeddings(), QLoRALinear)  # lm_head stays 16-bit
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-4, atol=1e-4)
    # only the LoRA factors train
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # a non-zero B changes the output; disabling adapters restores the base
    for m in ours.modules():
        if isinstance(m, QLoRALinear) and m.r:
            m.lora_B.data.normal_()
    with torch.no_grad():
        assert not torch.allclose(ours(ids).logits, ref, atol=1e-3)


def test_apply_qlora_in_place_equals_build_from_source():
    hf = tiny("llama")
    ids = torch.randint(0, 128, (1, 9))
    q = QuantSettings(compute_dtype="fp32")
    a = build_from_source(DictSource(hf), q, LoraSettings(r=4), dtype="fp32", progress=False).eval()
    b = apply_qlora(copy.deepcopy(hf), q, LoraSettings(r=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_target_filter_and_frozen_non_targets():
    hf = tiny("llama")
    m = build_from_source(DictSource(hf), QuantSettings(), LoraSettings(r=2, target="q_proj,v_proj"), progress=False)
    with_lora = {n for n, mod in m.named_modules() if isinstance(mod, QLoRALinear) and mod.r > 0}
    assert with_lora == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    # the other block linears are still 4-bit
    assert isinstance(m.get_submodule("model.layers.0.mlp.down_proj"), QLoRALinear)
    assert m.get_submodule("model.layers.0.mlp.down_proj").weight_packed is not None


def test_sixteen_bit_path_equals_transformers_exactly():
    hf = tiny("qwen2")
    ids = torch.randint(0, 128, (2, 7))
    m = build_from_source(DictSource(hf), QuantSettings(quant_type=None, compute_dtype="fp32"), LoraSettings(r=4),
                          dtype="fp32", progress=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_donor_buffers_equal_a_full_models_and_allocate_no_weights(family):
    from qlora.model import _donor_buffers, _parameters_on_meta
    cls, extra = FAMILIES[family]
    cfg = cls(**COMMON, **extra)
    full = dict(AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).named_buffers())
    donor = _donor_buffers(cfg, torch.float32)
    assert donor, family
    for name, buf in donor.items():  # layer 0's buffers stand for every layer's
        torch.testing.assert_close(buf, full[name], rtol=0, atol=0)
    with _parameters_on_meta():
        lin = torch.nn.Linear(4, 3)
    assert lin.weight.is_meta and lin.bias.is_meta
    assert not torch.nn.Linear(4, 3).weight.is_meta  # restored on exit


def test_random_build_in_4bit_trains():
    cfg = transformers.LlamaConfig(**COMMON)
    m = build_random(cfg, QuantSettings(), LoraSettings(r=4), dtype="bf16", progress=False)
    assert all(m.get_submodule(n).weight_packed is not None for n in block_linear_names(m))
    ids = torch.randint(0, 128, (2, 16))
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_errors():
    hf = tiny("llama")
    with pytest.raises(QLoraError, match="unknown target module.*q_proj"):
        build_from_source(DictSource(hf), QuantSettings(), LoraSettings(target="query"), progress=False)
    with pytest.raises(QLoraError, match="rank"):
        build_from_source(DictSource(hf), QuantSettings(), LoraSettings(r=0), progress=False)
    src = DictSource(hf)
    del src.tensors["model.norm.weight"]
    with pytest.raises(QLoraError, match="lack 1 tensor"):
        build_from_source(src, QuantSettings(), LoraSettings(), progress=False)
