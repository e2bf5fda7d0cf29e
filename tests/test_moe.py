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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-expert matmuls: on a busy 2-core machine the OpenMP hand-off between two threads costs
    ~10 ms per op (a 6-step run took 17 s against 3 s on one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_moe(path, family, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    model.save_pretrained(str(path))
    from tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    assert len(tok) <= 64
    tok.save_pretrained(str(path))
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


def test_fused_and_per_expert_checkpoints_load_the_same(tmp_path):
    """transformers publishes experts per expert; a fused [E, 2I, H] checkpoint (its state_dict) loads to the
    same 4-bit bytes."""
    per = save_moe(tmp_path / "per", "mixtral")
    fused = tmp_path / "fused"
    fused.mkdir()
    from safetensors.torch import save_file
    ref = AutoModelForCausalLM.from_pretrained(str(per), dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    (fused / "config.json").write_text((per / "config.json").read_text())
    assert any(n.endswith("experts.gate_up_proj") for n in open_source(fused).names())
    assert any(".experts.0.w1.weight" in n for n in open_source(per).names())
    a, b = load_ours(per), load_ours(fused)
    for (n, x), (m, y) in zip(a.named_modules(), b.named_modules()):
        assert n == m
        if isinstance(x, QLoRALinear):
            assert torch.equal(x.weight_packed, y.weight_packed) and torch.equal(x.absmax, y.absmax), n


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_expert_bytes_equal_bitsandbytes_quantize_4bit(tmp_path, family):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    d = save_moe(tmp_path / family, family)
    ours = load_ours(d)
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    fused = moe.fused_experts(ref)
    checked = 0
    for n in block_linear_names(ours):
        if not moe.is_expert_linear(n):
            continue
        experts, proj, e = n.rsplit(".", 2)
        w = getattr(fused[experts], proj)[int(e)].detach()
        w = w.t().contiguous() if family == "llama4_text" else w  # Llama 4 stores [in, out]
        p_ref, s_ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        m = ours.get_submodule(n)
        assert torch.equal(m.weight_packed, p_ref) and torch.equal(m.absmax, s_ref.absmax), n
        assert torch.equal(m.nested_absmax, s_ref.state2.absmax) and m._meta["offset"] == s_ref.offset.item()
        checked += 1
    assert checked == 2 * 2 * 4  # layers x projections x experts


def test_routers_stay_16_bit_and_unadapted_shared_experts_are_dense_mlps(tmp_path):
    d = save_moe(tmp_path / "l4", "llama4_text")
    ours = load_ours(d, LoraSettings(r=4, alpha=8, dropout=0.0, target="all-linear"))
    router = ours.model.layers[0].feed_forward.router
    assert type(router).__name__ == "Llama4Router" and not any(p.requires_grad for p in router.parameters())
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    assert torch.equal(router.weight, ref.model.layers[0].feed_forward.router.weight)  # bit for bit as loaded
    shared = ours.model.layers[0].feed_forward.shared_expert
    assert all(isinstance(getattr(shared, p), QLoRALinear) and getattr(shared, p).r == 4
               for p in ("gate_proj", "up_proj", "down_proj"))
    # all-linear leaves the routed experts frozen (their LoRA is opt-in: docs/moe.md)
    assert all(m.r == 0 for m in ours.model.layers[0].feed_forward.experts.gate_up_proj)
    d2 = save_moe(tmp_path / "q2", "qwen2_moe")
    names = block_linear_names(skeleton(open_source(d2).config))
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    assert any(n.endswith("shared_expert.down_proj") for n in names)


def test_targets_name_expert_projections():
    names = block_linear_names(skeleton(CONFIGS["qwen3_moe"]()))
    experts = {n for n in names if moe.is_expert_linear(n)}
    assert len(experts) == 2 * 2 * 4
    assert select_targets(names, "all-linear") == set(names) - experts
    assert select_targets(names, "experts.down_proj") == {n for n in experts if ".down_proj." in n}
    assert select_targets(names, "q_proj,experts") == experts | {n for n in names if n.endswith("q_proj")}
    assert select_targets(names, "all-linear,experts.gate_up_proj") == \
        set(names) - {n for n in experts if ".down_proj." in n}
    with pytest.raises(QLoraError, match="experts.gate_up_proj"):
        select_targets(names, "w1")  # the message lists what exists


def test_expert_lora_gradients_equal_transformers_float_reference():
    """One layer's experts: ours (4-bit base, LoRA per expert) against transformers' own Qwen3MoeExperts
    forward whose fused parameters are dequant(W_e) + scaling * B_e @ A_e built from leaf tensors."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    cfg = CONFIGS["qwen3_moe"]()
    torch.manual_seed(0)
    hf = Qwen3MoeExperts(cfg)
    torch.nn.init.normal_(hf.gate_up_proj, std=0.2)
    torch.nn.init.normal_(hf.down_proj, std=0.2)
    model = torch.nn.Module()
    model.experts = hf
    moe.split_experts(model)
    from qlora.model import apply_qlora
    layer = torch.nn.Module()
    layer.layers = torch.nn.ModuleList([model])  # a numbered block, as in a transformer
    apply_qlora(layer, FP32, LoraSettings(r=4, alpha=8, dropout=0.0, target="experts"), seed=0)
    ours = model.experts
    g = torch.Generator().manual_seed(2)
    for m in list(ours.gate_up_proj) + list(ours.down_proj):
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.3
    x = torch.randn(10, 64, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    idx[0] = torch.tensor([0, 3])
    wts = torch.rand(10, 2, generator=g)
    out = ours(x, idx, wts)
    up = torch.randn(out.shape, generator=g)
    (out * up).sum().backward()
    leaves = {}
    fused = {}
    for proj in moe.PROJS:
        mods = getattr(ours, proj)
        a = [m.lora_A.detach().clone().requires_grad_() for m in mods]
        b = [m.lora_B.detach().clone().requires_grad_() for m in mods]
        leaves[proj] = (a, b)
        fused[proj] = torch.stack([m.base_weight(torch.float32) + m.scaling * bb @ aa
                                   for m, aa, bb in zip(mods, a, b)])
    ref = Qwen3MoeExperts(cfg)
    del ref.gate_up_proj, ref.down_proj
    ref.gate_up_proj, ref.down_proj = fused["gate_up_proj"], fused["down_proj"]
    x2 = x.detach().clone().requires_grad_()
    want = ref(x2, idx, wts)
    (want * up).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    nonzero = 0
    for proj in moe.PROJS:
        for m, aa, bb in zip(getattr(ours, proj), *leaves[proj]):
            torch.testing.assert_close(m.lora_A.grad, aa.grad, rtol=1e-4, atol=2e-5)
            torch.testing.assert_close(m.lora_B.grad, bb.grad, rtol=1e-4, atol=2e-5)
            nonzero += bool(aa.grad.abs().sum() > 0)
    assert nonzero >= 6  # the active experts learned something (expert 0 and 3 at least)


@pytest.fixture(scope="module")
def moe_train(tmp_path_factory):
    """A tiny Qwen3-MoE with the tiny tokenizer and 40 instruction records, as helpers.make_train_dir."""
    from helpers import CITIES
    from tiny import tiny_tokenizer
    d = tmp_path_factory.mktemp("moetrain")
    tok = tiny_tokenizer()
    cfg = CONFIGS["qwen3_moe"]()
    cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "model"))
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ."}
            for i in range(40) for c in [CITIES[i % 3]]]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_train_on_moe_learns_experts_and_resume_is_exact(moe_train, tmp_path):
    import shutil

    from helpers import cfg, losses
    from qlora.adapters import read_adapter
    from qlora.train import train
    kw = dict(target="all-linear,experts", max_steps=4, save_every=2, batch_size=2, grad_accum=1)
    full = tmp_path / "full"
    train(cfg(moe_train, full, **kw), log=lambda m: None)
    part = tmp_path / "part"
    train(cfg(moe_train, part, **kw), log=lambda m: None)
    shutil.rmtree(part / "checkpoints" / "step-0000004")  # as if the run had died after step 2
    train(cfg(moe_train, part, resume=True, **kw), log=lambda m: None)
    assert len(losses(full)) == 4 and losses(part) == losses(full)  # bit-identical on the CPU
    conf, pairs = read_adapter(full / "adapter")
    assert conf["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]  # peft's layout
    assert conf["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    moved = [n for n, (a, b) in pairs.items() if moe.is_expert_linear(n) and b.abs().sum() > 0]
    assert len(moved) >= 4  # routed experts' B left zero: they were trained


def _randomize_experts_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, QLoRALinear) and m.r:
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.3


def test_quantize_cli_writes_bitsandbytes_bytes_per_expert_and_loads_back(tmp_path, capsys):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    from qlora.checkpoint import CheckpointReader
    from qlora.cli import main
    d = save_moe(tmp_path / "m", "qwen3_moe")
    assert main(["quantize", str(d), str(tmp_path / "q")]) == 0
    capsys.readouterr()
    reader = CheckpointReader(tmp_path / "q")
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    for i in range(2):
        experts = ref.model.layers[i].mlp.experts
        for proj in moe.PROJS:
            for e in range(4):
                packed, state = reader.read_quantized(f"model.layers.{i}.mlp.experts.{proj}.{e}.weight")
                p_ref, s_ref = bnbF.quantize_4bit(getattr(experts, proj)[e].detach(), blocksize=64, quant_type="nf4",
                                                  compress_statistics=True)
                assert torch.equal(packed, p_ref) and torch.equal(state.absmax, s_ref.absmax)
    assert reader.read_quantized("model.layers.0.mlp.gate.weight") is None  # the router stays 16-bit
    a, b = load_ours(d).eval(), load_ours(tmp_path / "q").eval()
    with torch.no_grad():
        assert torch.equal(a(ids()).logits, b(ids()).logits)


def test_expert_adapter_saves_merges_and_generates(tmp_path, capsys):
    from qlora.adapters import save_adapter
    from qlora.cli import main
    from qlora.generate import load_for_inference
    d = save_moe(tmp_path / "m", "llama4_text")  # fused, transposed experts on disk
    ours = load_ours(d, LoraSettings(r=4, alpha=8, dropout=0.0, target="all-linear,experts")).eval()
    _randomize_experts_lora(ours)
    save_adapter(ours, tmp_path / "ad", quant=FP32)
    with torch.no_grad():
        want = ours(ids()).logits
    model, _ = load_for_inference(str(d), str(tmp_path / "ad"), device="cpu", dtype="fp32", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, want, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(d), "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, want, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    rc = main(["export", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "llama4_text" in err and len(err.strip().splitlines()) == 1


def test_vision_language_model_quantizes_only_the_language_model():
    from qlora.sources import quantizable_linear_names
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = skeleton(cfg)
    every = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    tower = [n for n in every if "vision_tower" in n or "multi_modal_projector" in n]
    assert tower and len([n for n in tower if "layers.0." in n]) >= 4  # the tower has block linears of its own
    names = block_linear_names(model)
    assert names and not set(names) & set(tower)
    assert all("language_model.layers." in n for n in names)
    assert {n[:-len(".weight")] for n in quantizable_linear_names(cfg)} == set(names)


def test_plan_counts_every_expert_in_nf4_and_the_routed_activations(tmp_path):
    from qlora.plan import count_model, estimate, shape_config
    c = count_model(shape_config("mixtral-8x7b"), rank=16)
    h, i, L, e = 4096, 14336, 32, 8
    attn = h * h * 2 + 2 * h * 1024  # q, o and the 8 kv heads' k, v
    assert c["quantized_params"] == L * (e * 3 * h * i + attn)  # ~46.4B: every expert is stored
    assert c["weights_4bit"] == c["quantized_params"] // 2
    assert c["intermediate"] == 2 * i and c["routed_k"] == 2  # activations of the top-2 experts per token
    # the tiny model: the plan's 4-bit bytes are what loading really allocates
    d = save_moe(tmp_path / "m", "qwen3_moe")
    tiny = count_model(open_source(d).config, rank=4, device="cpu")
    built = load_ours(d)
    packed = sum(m.weight_packed.numel() for m in built.modules() if isinstance(m, QLoRALinear))
    assert tiny["weights_4bit"] == packed
    # routing adds a per-token cost that grows with k
    cfg = open_source(d).config
    one = estimate(cfg, 512, 1, rank=4, counts=count_model(cfg, rank=4))["details"]["one_block"]
    cfg.num_experts_per_tok = 4
    four = estimate(cfg, 512, 1, rank=4, counts=count_model(cfg, rank=4))["details"]["one_block"]
    assert four > one


def test_expert_adapter_in_peft_layout_loads_in_peft_and_back(tmp_path):
    """qwen3_moe experts adapted: the adapter is written in peft's target_parameters layout; peft 0.21 loads it
    onto transformers' model (on our dequantized base) with our logits, and qlora reads it back exactly."""
    from peft import PeftModel
    from qlora.adapters import load_adapter, read_adapter, save_adapter
    d = save_moe(tmp_path / "m", "qwen3_moe")
    ours = load_ours(d, LoraSettings(r=4, alpha=8, dropout=0.05, target="q_proj,experts")).eval()
    _randomize_experts_lora(ours)
    save_adapter(ours, tmp_path / "ad", quant=FP32)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert conf["target_modules"] == ["q_proj"] and conf["lora_dropout"] == 0.0
    base = load_ours(d).eval()  # no adapter: the dequantized base for transformers
    ref = PeftModel.from_pretrained(reference(d, base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        want = ours(ids()).logits
        torch.testing.assert_close(ref(ids()).logits, want, rtol=1e-5, atol=1e-5)
    _, pairs = read_adapter(tmp_path / "ad")
    for n, m in ours.named_modules():
        if isinstance(m, QLoRALinear) and m.r:
            assert torch.equal(pairs[n][0], m.lora_A) and torch.equal(pairs[n][1], m.lora_B), n
    load_adapter(base, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(base(ids()).logits, want)


def test_unsupported_experts_refused_in_one_line():
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                                    num_experts_per_tok=2)
    with pytest.raises(QLoraError) as e:  # transformers 5.25 has no SDPA attention for it
        skeleton(cfg)
    assert "gpt_oss" in str(e.value) and "\n" not in str(e.value)
    with torch.device("meta"):  # and its experts (biases, interleaved gate/up) are refused on their own
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with pytest.raises(QLoraError, match="GptOssExperts.*not supported") as e:
        moe.split_experts(model)
    assert "\n" not in str(e.value)
