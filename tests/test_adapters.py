"""PEFT-format adapters both ways (peft + transformers/bitsandbytes as references), and merge."""
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from qlora import nf4
from qlora.adapters import load_adapter, merge, merged_tensors, read_adapter, save_adapter
from qlora.cli import main
from qlora.errors import QLoraError
from qlora.linear import QLoRALinear
from qlora.model import LoraSettings, QuantSettings, build_from_source
from qlora.sources import open_source

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

# in/out sizes multiples of 64: bitsandbytes' AVX-512 CPU dequant mis-scales other widths (see test_nf4)
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
FP32 = QuantSettings(compute_dtype="fp32")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CFG)).save_pretrained(d)
    return d


def ours(base_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.0), quant=FP32, seed=0):
    m = build_from_source(open_source(base_dir), quant, lora, dtype="fp32", seed=seed, progress=False).eval()
    return m


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            mod.lora_B.data.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.1)


def bnb_model(base_dir):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32).eval()
    # bitsandbytes 0.50 on an AVX512-BF16 CPU repacks 4-bit weights in place on the first no-grad
    # forward and then computes in bf16; keep the reference on its plain dequantize + matmul path.
    for mod in m.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    return m


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def test_our_adapter_loads_in_peft_on_bitsandbytes_model_same_logits(base_dir, tmp_path):
    m = ours(base_dir)
    randomize_B(m)
    save_adapter(m, tmp_path / "ad", base_model=str(base_dir), quant=FP32)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) >= {"q_proj", "down_proj"}
    ref = peft.PeftModel.from_pretrained(bnb_model(base_dir), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)


def test_peft_adapter_loads_in_ours_same_logits(base_dir, tmp_path):
    torch.manual_seed(3)
    pm = peft.get_peft_model(bnb_model(base_dir), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                                  init_lora_weights=False, lora_dropout=0.0))
    pm.eval()
    with torch.no_grad():
        ref = pm(IDS).logits
    pm.save_pretrained(tmp_path / "peft_ad")
    m = ours(base_dir, lora=None)
    load_adapter(m, tmp_path / "peft_ad")
    assert {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, QLoRALinear) and mod.r} == \
        {"q_proj", "v_proj", "gate_proj"}
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip_in_ours(base_dir, tmp_path):
    m = ours(base_dir)
    randomize_B(m)
    save_adapter(m, tmp_path / "a")
    m2 = ours(base_dir, lora=None)
    load_adapter(m2, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(m2(IDS).logits, m(IDS).logits, rtol=0, atol=0)


def test_adapter_base_mismatch_names_the_layer(base_dir, tmp_path_factory, tmp_path):
    other = tmp_path_factory.mktemp("other")
    AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**CFG, "intermediate_size": 192})).save_pretrained(other)
    m_other = ours(other)
    save_adapter(m_other, tmp_path / "a")
    with pytest.raises(QLoraError, match=r"mlp\.(gate|up|down)_proj expects"):
        load_adapter(ours(base_dir, lora=None), tmp_path / "a")
    deep = transformers.LlamaConfig(**{**CFG, "num_hidden_layers": 3})
    d3 = tmp_path_factory.mktemp("deep")
    AutoModelForCausalLM.from_config(deep).save_pretrained(d3)
    save_adapter(ours(d3), tmp_path / "b")
    with pytest.raises(QLoraError, match="layers the model lacks, e.g. model.layers.2"):
        load_adapter(ours(base_dir, lora=None), tmp_path / "b")
    with pytest.raises(QLoraError, match="not found"):
        read_adapter(tmp_path / "nope")


def test_merge_equals_base_plus_scaled_BA_and_loads_in_plain_transformers(base_dir, tmp_path):
    m = ours(base_dir)
    randomize_B(m)
    save_adapter(m, tmp_path / "ad", quant=QuantSettings())
    rc = main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "merged"),
               "--dtype", "fp32"])
    assert rc == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    # per tensor: dequant(W) + scale * B @ A
    for name, mod in m.named_modules():
        if isinstance(mod, QLoRALinear):
            want = nf4.dequantize_4bit(mod.weight_packed, mod.state, torch.float32) + mod.scaling * mod.lora_B @ mod.lora_A
            torch.testing.assert_close(merged.get_submodule(name).weight, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, m(IDS).logits, rtol=1e-4, atol=1e-4)
    # output exists → refused
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "merged")]) == 2


def test_merge_quantize_writes_4bit_checkpoint_and_reports_error(base_dir, tmp_path):
    m = ours(base_dir)
    randomize_B(m)
    save_adapter(m, tmp_path / "ad", quant=QuantSettings())
    merge(base_dir, tmp_path / "ad", tmp_path / "mq", dtype="fp32", quantize=True, progress=False)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "mq").eval()  # transformers + bitsandbytes
    assert q.config.quantization_config.load_in_4bit
    with torch.no_grad():
        d = (q(IDS).logits.float() - m(IDS).logits).abs().mean().item()
    assert 0 < d < 0.5  # re-quantizing the merged weights is lossy, but bounded



def test_merge_refuses_an_existing_output_before_opening_the_model(tmp_path, monkeypatch):
    import qlora.adapters
    monkeypatch.setattr(qlora.adapters, "merged_tensors", lambda *a, **k: pytest.fail("model opened first"))
    (tmp_path / "out").mkdir()
    with pytest.raises(QLoraError, match="already exists"):
        merge(None, tmp_path / "ad", tmp_path / "out", progress=False)

def test_merged_tensors_rejects_mismatched_adapter(base_dir, tmp_path_factory, tmp_path):
    other = tmp_path_factory.mktemp("wide")
    AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**CFG, "intermediate_size": 192})).save_pretrained(other)
    save_adapter(ours(other), tmp_path / "a")
    with pytest.raises(QLoraError, match=r"does not fit the model .*mlp\.(gate|up|down)_proj expects"):
        merged_tensors(base_dir, tmp_path / "a", "fp32")  # from the config, before a weight is read


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_twenty_training_steps_match_transformers_bitsandbytes_peft(base_dir, tmp_path, compute):
    """Issue 6's "loss after 20 steps, same init": our training step (QLoRA model, chunked loss,
    our AdamW, clipping at 0.3) beside the reference stack (transformers + bitsandbytes NF4+DQ +
    peft LoRA, torch's AdamW, the model's own loss) from the same initial adapter on the same
    batches. Every step's loss within 0.5% of the reference's."""
    from qlora.optim import make_optimizer
    from qlora.loss import loss_sum
    dt = torch.float32 if compute == "fp32" else torch.bfloat16
    m = ours(base_dir, quant=QuantSettings(compute_dtype=compute)).train()
    save_adapter(m, tmp_path / "init", base_model=str(base_dir), quant=FP32)  # A random, B = 0
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dt)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.float32)
    for mod in base.modules():  # see bnb_model
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "init", is_trainable=True).train()
    mine = [p for p in m.parameters() if p.requires_grad]
    theirs = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in mine) == sum(p.numel() for p in theirs) > 0
    opt_m = make_optimizer(mine, "adamw", lr=1e-2)
    opt_r = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(7)
    data = []
    for _ in range(4):  # four batches seen five times each: the loss has something to learn
        ids = torch.randint(0, 96, (4, 24), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100  # a prompt
        data.append((ids, labels))
    got, want = [], []
    for step in range(20):
        ids, labels = data[step % 4]
        loss = loss_sum(m, {"input_ids": ids, "labels": labels}, "cpu") / int((labels[:, 1:] != -100).sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mine, 0.3)
        opt_m.step()
        opt_m.zero_grad()
        out = ref(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs, 0.3)
        opt_r.step()
        opt_r.zero_grad()
        got.append(loss.item())
        want.append(out.loss.item())
    assert got[-1] < 0.95 * got[0], got  # it trained
    rel = [abs(a - b) / b for a, b in zip(got, want)]
    assert max(rel) < 0.005, list(zip(got, want))
