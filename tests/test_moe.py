"""Mixture-of-experts models (issue 27): tiny random configs of each family built with transformers' own
config classes and saved with save_pretrained, loaded with experts in NF4 + LoRA per expert, checked against
transformers on the dequantized weights, bitsandbytes' quantize_4bit and a float LoRA reference."""
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from qlora import moe, nf4
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, block_linear_names, build_from_source, select_targets, skeleton
from qlora.sources import open_source

_COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=32,
                                                     num_experts=4, num_experts_per_tok=2, head_dim=32),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=32, num_experts=4,
                                                     num_experts_per_tok=2),
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32),
    "llama4_text": lambda: transformers.Llama4TextConfig(**_COMMON, intermediate_size=32, intermediate_size_mlp=64,
                                                         num_local_experts=4, num_experts_per_tok=1, head_dim=32),
}
FP32 = QuantSettings(compute_dtype="fp32")


def save_moe(path, family, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    model.save_pretrained(str(path))
    return path


def load_ours(path, lora=None, seed=0):
    return build_from_source(open_source(path), FP32, lora, device="cpu", dtype="fp32", seed=seed, progress=False)


def reference(path, ours):
    """transformers' own model with every block linear and expert slice set to our dequantized base weight
    plus scaling * B @ A where ours carries an adapter."""
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    fused = moe.fused_experts(ref)
    with torch.no_grad():
        for n, m in ours.named_modules():
            if not isinstance(m, QLoRALinear):
                continue
            w = m.merged_weight(torch.float32)
            if moe.is_expert_linear(n):
                experts, proj, e = n.rsplit(".", 2)
                param = getattr(fused[experts], proj)
                param[int(e)] = w.t() if type(fused[experts]).__name__ in moe.TRANSPOSED else w
            else:
                ref.get_submodule(n).weight.copy_(w)
    return ref


def ids(n=2, t=12, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_equal_transformers_on_dequantized_weights(tmp_path, family):
    d = save_moe(tmp_path / family, family)
    ours = load_ours(d).eval()
    experts = [n for n in block_linear_names(ours) if moe.is_expert_linear(n)]
    assert len(experts) >= 2 * 4, "every expert projection is a 4-bit linear"
    assert all(ours.get_submodule(n).weight_packed is not None for n in experts)
    ref = reference(d, ours)
    x = ids()
    with torch.no_grad():
        got, want = ours(x).logits, ref(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
