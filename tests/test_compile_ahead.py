"""qlora.kernels.warm.compile_ahead: the Triton kernels of a training step, compiled before it.

GPU only: a fresh process with an empty Triton cache compiles ahead for a small Llama shape, then runs
one real training step of that shape (NF4 base, LoRA, fused kernels); the step must compile nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, torch, triton
import triton.compiler as tc, triton.compiler.compiler as tcc, triton.runtime.jit as tjit
compiled = []
_compile = tcc.compile
def spy(src, *a, **k):
    compiled.append(getattr(src, "name", "?"))
    return _compile(src, *a, **k)
for mod in (tc, tcc, tjit):
    if hasattr(mod, "compile"):
        mod.compile = spy
from transformers import LlamaConfig
from qlora.kernels.warm import compile_ahead
from qlora.model import LoraSettings, QuantSettings, build_random
from qlora.loss import loss_sum
batch, seq = 2, 64
cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
from qlora.linear import dropout_key, keyed_dropout
dropout = float(sys.argv[1])
ran = compile_ahead("cuda", hidden=256, intermediate=688, head_dim=64, vocab=1000, tokens=batch * seq, seq=seq,
                    rank=8, dropout=dropout)
ahead = list(compiled)
compiled.clear()
model = build_random(cfg, QuantSettings(), LoraSettings(r=8, alpha=16, dropout=dropout), "cuda", "bf16",
                     progress=False)
model.train()
ids = torch.arange(batch * seq, device="cuda").reshape(batch, seq) % 1000
key = torch.tensor(dropout_key(0, 0), device="cuda") if dropout > 0 else None
with keyed_dropout(model, key):  # as the trainer runs a step
    loss = loss_sum(model, {"input_ids": ids, "labels": ids}, "cuda") / ids.numel()
    loss.backward()
torch.cuda.synchronize()
print(json.dumps(dict(ran=ran, ahead=ahead, step=compiled, loss=float(loss))))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compile_ahead_leaves_nothing_for_the_first_step(tmp_path, dropout):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, str(dropout)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    import json
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ran"] == ["rms_norm", "swiglu", "rope", "dequantize_4bit", "xent_grad"] + (["lora_dropout"] if dropout else []), r
    assert len(r["ahead"]) >= (10 if dropout else 7), r  # forward and backward kernels
    assert r["step"] == [], r  # the step found every kernel compiled
    assert 6.0 < r["loss"] < 8.0  # ~ln(1000): the step ran


def test_nothing_to_compile_without_triton_kernels(switch):
    switch("QLORA_KERNELS", "0")
    from qlora.kernels.warm import compile_ahead
    assert compile_ahead("cpu", hidden=64, intermediate=128, head_dim=16, vocab=100, tokens=8, seq=8) == []


def test_train_reads_the_kernel_sizes_without_transformers(tmp_path):
    """`qlora train` starts the warm-up before transformers is imported: the sizes come from a shape
    name or the model folder's config.json (as transformers' LlamaConfig would give them)."""
    from transformers import LlamaConfig

    from qlora.plan import shape_config
    from qlora.train import _model_dims
    c = shape_config("8b")
    assert _model_dims("shape:8b") == dict(head_dim=c.head_dim, hidden=c.hidden_size,
                                           intermediate=c.intermediate_size, vocab=c.vocab_size)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=200, num_attention_heads=6, vocab_size=321)
    cfg.save_pretrained(tmp_path)
    assert _model_dims(str(tmp_path)) == dict(head_dim=16, hidden=96, intermediate=200, vocab=321)
    assert _model_dims(str(tmp_path / "missing")) is None


def test_compiled_ahead_once_per_stamp(tmp_path, monkeypatch, switch):
    """A complete compile-ahead leaves a stamp and is skipped next time; an incomplete one (a kernel
    failed) leaves none, so the next start tries again."""
    from qlora.kernels import warm
    calls = []
    base = [k for k in warm.KERNELS if k != "lora_dropout"]  # no LoRA dropout: its kernels are not planned
    result = list(base)
    monkeypatch.setattr(warm, "_stamp", lambda device, **kw: tmp_path / "cache" / f"stamp-{kw['hidden']}")
    monkeypatch.setattr(warm, "compile_ahead", lambda device, **kw: calls.append(kw) or list(result))
    kw = dict(hidden=64, intermediate=128, head_dim=16, vocab=100, tokens=8, seq=8)
    assert warm.planned() == base
    assert warm.compile_ahead_once("cuda", **kw) == base
    assert warm.compile_ahead_once("cuda", **kw) is None and len(calls) == 1
    result.remove("rope")
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=32)) == result
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=32)) == result and len(calls) == 3
    result[:] = [k for k in base if k != "dequantize_4bit"]  # 16-bit LoRA: no dequantization
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=16, quant_type=None)) == result
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=16, quant_type=None)) is None and len(calls) == 4
    result[:] = list(warm.KERNELS)  # with LoRA dropout, its kernels too
    assert warm.planned("nf4", rank=16, dropout=0.05) == list(warm.KERNELS)
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=8, rank=16, dropout=0.05)) == result
    assert warm.compile_ahead_once("cuda", **dict(kw, hidden=8, rank=16, dropout=0.05)) is None and len(calls) == 5
    switch("QLORA_FUSED_DROPOUT", "0")
    assert "lora_dropout" not in warm.planned("nf4", rank=16, dropout=0.05)
