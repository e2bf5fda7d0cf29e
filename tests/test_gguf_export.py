"""GGUF export: K-quant blocks against gguf's decoder, round trips through transformers' GGUF
loader (embedded SmolLM2-135M and tiny random llama/mistral/qwen2/qwen3), metadata against the
original embedded file, the Ollama Modelfile against transformers' chat templates, error paths."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qlora.errors import QLoraError
from qlora.gguf_export import (CHAT_STYLES, EXPORT_TYPES, chat_style, export_gguf, go_template, render_style,
                               tensor_qtype, tokenizer_metadata, write_modelfile)
from qlora.q4k import quantize_q4_k, quantize_q6_k

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _rel_rmse(x: np.ndarray, blocks: np.ndarray, qtype) -> float:
    y = gguf.quants.dequantize(blocks, qtype)
    assert y.shape == x.shape
    return float(np.sqrt(np.mean((y - x) ** 2)) / x.std())


def _gguf_rel_rmse(x: np.ndarray, qtype) -> float:
    return _rel_rmse(x, gguf.quants.quantize(x, qtype), qtype)


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


# ---------------------------------------------------------------------------------------------
# K-quant blocks


@pytest.mark.parametrize("dist", ["normal", "student_t", "uniform_pos"])
def test_k_quants_decode_with_gguf_within_expected_error(dist):
    g = torch.Generator().manual_seed(1)
    if dist == "normal":
        w = torch.randn(64, 1024, generator=g) * 0.02
    elif dist == "student_t":  # heavy tails, like real weights' outliers
        w = torch.randn(64, 1024, generator=g) / torch.rand(64, 1024, generator=g).clamp_min(0.05).sqrt() * 0.01
    else:
        w = torch.rand(64, 1024, generator=g) * 3 + 1.0  # all positive: Q4_K min is pinned to 0
    x = w.numpy()
    e4k = _rel_rmse(x, quantize_q4_k(w), T.Q4_K)
    e6k = _rel_rmse(x, quantize_q6_k(w), T.Q6_K)
    # same bits per weight as Q4_0 (4.5), fewer than Q4_1 (5.0): must beat both on centred data;
    # Q4_K's offsets are <= 0 (as in llama.cpp), so all-positive data only beats Q4_0
    assert e4k < _gguf_rel_rmse(x, T.Q4_0)
    if dist != "uniform_pos":
        assert e4k < _gguf_rel_rmse(x, T.Q4_1)
    # Q6_K (6.56 bpw) sits between Q5_0 (5.5) and Q8_0 (8.5)
    assert _gguf_rel_rmse(x, T.Q8_0) < e6k < _gguf_rel_rmse(x, T.Q5_0)
    if dist == "normal":  # uniform-grid theory: step = range/levels, rmse ~ step/sqrt(12)
        assert e4k < 4.2 / 15 / 12 ** 0.5  # ~4.2 sigma range over 32 values
        assert e6k < 5.0 / 63 / 12 ** 0.5


def test_k_quants_exact_cases():
    z = torch.zeros(3, 256)
    assert np.all(gguf.quants.dequantize(quantize_q4_k(z), T.Q4_K) == 0)
    assert np.all(gguf.quants.dequantize(quantize_q6_k(z), T.Q6_K) == 0)
    # values already on a 16-level grid of one sub-block come back (up to fp16 scale rounding)
    grid = (torch.arange(256) % 16).float().reshape(1, 256) * 0.5 - 3.0
    y = gguf.quants.dequantize(quantize_q4_k(grid), T.Q4_K)
    np.testing.assert_allclose(y, grid.numpy(), atol=2e-3)
    codes = torch.randint(-32, 32, (2, 256), generator=torch.Generator().manual_seed(0))
    codes[:, ::16] = -32  # every 16-value sub-block reaches the wide end of the 6-bit code
    sym = codes.float() * 0.25
    np.testing.assert_allclose(gguf.quants.dequantize(quantize_q6_k(sym), T.Q6_K), sym.numpy(), atol=2e-3)


def test_k_quants_reject_bad_input():
    with pytest.raises(QLoraError, match="multiple of 256"):
        quantize_q4_k(torch.randn(4, 576))
    bad = torch.randn(2, 256)
    bad[1, 3] = float("nan")
    with pytest.raises(QLoraError, match="NaN"):
        quantize_q6_k(bad)


def test_q4_k_m_mix_follows_llama_cpp_layout():
    for n in (16, 24, 30, 32):
        v = [tensor_qtype(f"blk.{i}.attn_v.weight", (1024, 1024), "q4_k_m", n, False) for i in range(n)]
        d = [tensor_qtype(f"blk.{i}.ffn_down.weight", (1024, 2816), "q4_k_m", n, False) for i in range(n)]
        assert v == d and set(v) == {T.Q4_K, T.Q6_K}
        more = [i for i, t in enumerate(v) if t == T.Q6_K]
        assert more[: n // 8] == list(range(n // 8))                 # the first eighth
        assert more[-(n - 7 * n // 8):] == list(range(7 * n // 8, n))  # the last eighth
        assert 0.35 <= len(more) / n <= 0.55                         # about half in all
    q = lambda name, shape, typ="q4_k_m", tied=False: tensor_qtype(name, shape, typ, 32, tied)  # noqa: E731
    assert q("blk.5.attn_q.weight", (1024, 1024)) == T.Q4_K
    assert q("output.weight", (32000, 1024)) == T.Q6_K
    assert q("token_embd.weight", (32000, 1024)) == T.Q4_K          # untied: an ordinary matrix
    assert q("token_embd.weight", (32000, 1024), tied=True) == T.Q6_K  # tied: it is the output
    assert q("token_embd.weight", (32000, 576), tied=True) == T.Q8_0   # 576 % 256: Q6_K -> Q8_0
    assert q("blk.5.attn_q.weight", (576, 576)) == T.Q5_0             # Q4_K -> Q5_0
    assert q("blk.5.attn_q.weight", (576, 100)) == T.F16              # not even 32-divisible
    assert q("blk.5.attn_norm.weight", (1024,)) == T.F32
    assert q("blk.5.attn_q.weight", (1024, 1024), "q4_0") == T.Q4_0
    assert q("output.weight", (32000, 1024), "q8_0") == T.Q8_0


# ---------------------------------------------------------------------------------------------
# the embedded model


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qlora.embedded import embedded_model_path
    try:
        p = embedded_model_path()
    except QLoraError as e:
        pytest.skip(str(e))
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    pre = _field(gguf.GGUFReader(str(p)), "tokenizer.ggml.pre")
    return {"path": p, "tok": tok, "model": model, "ids": ids, "logits": logits, "pre": pre}


def _load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _export(emb, tmp_path, typ, **kw):
    out = tmp_path / f"smol-{typ}.gguf"
    s = export_gguf(emb["model"].config, emb["model"].state_dict().items(), emb["tok"], out, typ,
                    progress=False, tokenizer_pre=emb["pre"], **kw)
    return out, s


def _rounded_logits(emb, dtype):
    """The source model with every weight rounded to ``dtype``: what an exact export gives."""
    m = emb["model"]
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        with torch.no_grad():
            for v in m.state_dict().values():
                if v.dim() == 2:  # 1-D tensors are stored as F32
                    v.copy_(v.to(dtype).float())
            return m(emb["ids"]).logits[0]
    finally:
        m.load_state_dict(saved)


@pytest.mark.slow
def test_embedded_f16_round_trip_and_metadata(embedded, tmp_path):
    out, s = _export(embedded, tmp_path, "f16", ollama=True)
    cfg = embedded["model"].config
    assert s["tensor_types"] == {"F16": 211, "F32": 61} and s["params"] == 134515008
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or spill left
    m2 = _load(out)
    with torch.no_grad():
        got = m2(embedded["ids"]).logits[0]
    torch.testing.assert_close(got, _rounded_logits(embedded, torch.float16), atol=1e-4, rtol=1e-4)
    assert (got - embedded["logits"]).abs().max() < 0.1  # f16 rounding of the weights only
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=embedded["tok"].eos_token_id)
    with torch.no_grad():
        a = embedded["model"].generate(embedded["ids"], **gen)
        b = m2.generate(embedded["ids"], **gen)
    assert torch.equal(a, b)

    # metadata: hyper-parameters from the config, tokenizer fields equal to the original file's
    r, orig = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(embedded["path"]))
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert _field(r, "llama.context_length") == cfg.max_position_embeddings
    assert _field(r, "llama.block_count") == cfg.num_hidden_layers
    assert _field(r, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(r, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert _field(r, "llama.rope.dimension_count") == cfg.head_dim
    for key in ("llama.embedding_length", "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon",
                "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert _field(r, key) == _field(orig, key), key
    assert "output.weight" not in {t.name for t in r.tensors}  # tied embeddings
    mf = (tmp_path / "smol-f16.Modelfile").read_text()
    assert f"FROM ./{out.name}" in mf and 'PARAMETER stop "<|im_end|>"' in mf


@pytest.mark.slow
def test_embedded_q4_k_m(embedded, tmp_path):
    out, s = _export(embedded, tmp_path, "q4_k_m")
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in r.tensors}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert types["token_embd.weight"] == T.Q8_0          # tied output, 576 columns: Q6_K -> Q8_0
    assert shapes["token_embd.weight"] == (576, 49152)   # GGUF lists the fastest dimension first
    assert types["blk.0.attn_q.weight"] == T.Q5_0        # 576 columns: Q4_K -> Q5_0
    assert types["blk.0.ffn_down.weight"] == T.Q6_K and types["blk.4.ffn_down.weight"] == T.Q4_K
    assert types["blk.0.attn_norm.weight"] == T.F32
    assert shapes["blk.0.attn_k.weight"] == (576, 192)
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert _field(r, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert len(s["fallbacks"]) == 1 + 30 * 6
    # real weights: Q4_K beats Q4_0 on every ffn_down it holds
    sd = embedded["model"].state_dict()
    for t in r.tensors:
        if t.tensor_type == T.Q4_K:
            i = int(t.name.split(".")[1])
            w = sd[f"model.layers.{i}.mlp.down_proj.weight"].numpy()
            assert _rel_rmse(w, np.asarray(t.data), T.Q4_K) < _gguf_rel_rmse(w, T.Q4_0)
    m2 = _load(out)
    with torch.no_grad():
        got = m2(embedded["ids"]).logits[0]
    ref = embedded["logits"]
    assert (got - ref).abs().mean() < 1.5
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.slow
# Stated error per type on this model (whose weights are already Q4_1 in the source GGUF):
# q8_0 mean |dlogit| < 0.4, greedy agreement >= 80%; q4_0 (blocks encoded by the gguf package
# itself, Q4_0 on every block linear) measured 2.33 and 58% over these 12 positions.
@pytest.mark.parametrize("typ,mean_tol,agree", [("bf16", None, None), ("q8_0", 0.4, 0.8), ("q4_0", 3.0, 0.5)])
def test_embedded_other_types(embedded, tmp_path, typ, mean_tol, agree):
    out, s = _export(embedded, tmp_path, typ)
    with torch.no_grad():
        got = _load(out)(embedded["ids"]).logits[0]
    if typ == "bf16":
        torch.testing.assert_close(got, _rounded_logits(embedded, torch.bfloat16), atol=1e-4, rtol=1e-4)
    else:
        assert (got - embedded["logits"]).abs().mean() < mean_tol
        assert (got.argmax(-1) == embedded["logits"].argmax(-1)).float().mean() >= agree


# ---------------------------------------------------------------------------------------------
# tiny random models of each family, with a small byte-level BPE trained here

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def small_tok():
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(topics.values())[:50], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


IDS = torch.tensor([[5, 77, 300, 12, 399, 150, 42, 8]])


def _tiny(model_type, vocab, hidden=64, layers=2, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n else 0.0))
    return m


@pytest.mark.parametrize("model_type,kw", [("llama", {"tie_word_embeddings": False}),
                                           ("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 128})])
def test_tiny_families_round_trip(small_tok, tmp_path, model_type, kw):
    m = _tiny(model_type, len(small_tok), **kw)
    out = tmp_path / f"{model_type}.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, out, "f16", progress=False)
    _assert_f16_file_gives_the_logits(m, out)


def _assert_f16_file_gives_the_logits(m, out):
    """transformers' own GGUF loader on the f16 file ``out`` gives ``m``'s logits once ``m``'s matrices are rounded
    to f16 as the file stores them (``m`` is changed so)."""
    m2 = _load(out)
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.dim() == 2:
                v.copy_(v.to(torch.float16).float())
        torch.testing.assert_close(m2(IDS).logits, m(IDS).logits, atol=1e-4, rtol=1e-4)


def test_k_quants_inside_a_file(small_tok, tmp_path):
    m = _tiny("llama", len(small_tok), hidden=256, layers=8, tie_word_embeddings=False)
    out = tmp_path / "k.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, out, "q4_k_m", progress=False)
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)].count(T.Q6_K) == 4
    # each block decodes (transformers' loader undoes the Q/K row order) close to the source
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    back = load_gguf_checkpoint(str(out), return_tensors=True, model_to_load=m)["tensors"]
    for name, w in m.state_dict().items():
        if w.dim() == 2:
            err = ((back[name] - w).pow(2).mean().sqrt() / w.std()).item()
            assert err < 0.12, name


def test_llama3_rope_freqs(small_tok, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    m = _tiny("llama", len(small_tok), rope_parameters=rope)
    out = tmp_path / "l3.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, out, "q8_0", progress=False)
    r = gguf.GGUFReader(str(out))
    freqs = next(np.asarray(t.data) for t in r.tensors if t.name == "rope_freqs.weight")
    d = m.config.head_dim
    base = 1.0 / (500000.0 ** (np.arange(0, d, 2) / d))
    # llama.cpp divides each default frequency by its factor: that must give the model's inv_freq
    np.testing.assert_allclose(base / freqs, m.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# tokenizer metadata for a SentencePiece-style (byte fallback) BPE


def test_byte_fallback_bpe_metadata():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})
    for t in ["\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab", "abc"]:
        vocab[t] = len(vocab)
    merges = [("a", "b"), ("\u2581", "a"), ("\u2581a", "b"), ("ab", "c")]
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    meta = tokenizer_metadata(tok, vocab_size=len(vocab) + 2)
    assert meta["model"] == "llama" and meta["add_space_prefix"] is True
    types, scores, toks = meta["token_type"], meta["scores"], meta["tokens"]
    assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.CONTROL
    assert toks[-1] == f"[PAD{len(vocab) + 1}]" and types[-1] == gguf.TokenType.UNUSED
    # earlier merges score higher, as llama.cpp's SentencePiece merging expects
    assert scores[vocab["ab"]] > scores[vocab["\u2581a"]] > scores[vocab["\u2581ab"]] > scores[vocab["abc"]]
    assert meta["bos_token_id"] == 1 and meta["eos_token_id"] == 2


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile

LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Good morning"},
         {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "And good night?"}]


def test_modelfile_chatml(embedded, tmp_path):
    tok = embedded["tok"]
    res = write_modelfile(tmp_path / "m.gguf", tok, tmp_path / "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    assert res["style"] == "chatml" and not res["warnings"]
    assert 'TEMPLATE """' + go_template("chatml") + '"""' in text
    hf_default = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert res["system"] and res["system"] in hf_default and f'SYSTEM """{res["system"]}"""' in text
    for msgs in (CONVO, CONVO[1:]):
        hf = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert render_style("chatml", msgs, res["system"]) == hf
    with pytest.raises(QLoraError, match="already exists"):
        write_modelfile(tmp_path / "m.gguf", tok, tmp_path / "Modelfile")


def test_modelfile_llama3_style(small_tok, tmp_path):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer.from_str(small_tok.backend_tokenizer.to_str())  # one that adds BOS, as Llama-3's does
    tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = LLAMA3_STYLE
    style, system, warns = chat_style(tok)
    assert style == "llama3" and system is None and not warns
    hf = tok.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True)
    assert tok.bos_token + render_style("llama3", CONVO) == hf
    res = write_modelfile(tmp_path / "m.gguf", tok, tmp_path / "Modelfile")
    text = (tmp_path / "Modelfile").read_text()
    for s in CHAT_STYLES["llama3"]["stops"]:
        assert f"PARAMETER stop {json.dumps(s)}" in text
    assert "SYSTEM" not in text and res["style"] == "llama3"
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_style(tok)[0] is None and chat_style(tok)[2]


# ---------------------------------------------------------------------------------------------
# errors and the CLI


def test_export_errors(small_tok, tmp_path):
    from transformers import GPT2Config
    tok, m = small_tok, _tiny("llama", len(small_tok))
    sd = m.state_dict()
    with pytest.raises(QLoraError, match="unsupported architecture"):
        export_gguf(GPT2Config(), iter(()), tok, tmp_path / "a.gguf", "f16", progress=False)
    with pytest.raises(QLoraError, match="unknown GGUF type"):
        export_gguf(m.config, sd.items(), tok, tmp_path / "a.gguf", "q3_k", progress=False)
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(QLoraError, match="already exists"):
        export_gguf(m.config, sd.items(), tok, tmp_path / "exists.gguf", "f16", progress=False)
    partial = [(k, v) for k, v in sd.items() if "layers.1.mlp.up_proj" not in k]
    with pytest.raises(QLoraError, match="missing 1 tensor"):
        export_gguf(m.config, partial, tok, tmp_path / "b.gguf", "f16", progress=False)
    nan = dict(sd)
    nan["model.layers.0.mlp.up_proj.weight"] = torch.full_like(sd["model.layers.0.mlp.up_proj.weight"], float("nan"))
    with pytest.raises(QLoraError, match="NaN"):
        export_gguf(m.config, nan.items(), tok, tmp_path / "c.gguf", "q8_0", progress=False)
    with pytest.raises(QLoraError, match="no GGUF name"):
        export_gguf(m.config, list(sd.items()) + [("model.extra.weight", torch.ones(2, 2))], tok,
                    tmp_path / "d.gguf", "f16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]  # nothing half-written
    export_gguf(m.config, sd.items(), tok, tmp_path / "exists.gguf", "f16", progress=False, force=True)
    assert gguf.GGUFReader(str(tmp_path / "exists.gguf")).tensors


def test_cli_export(small_tok, tmp_path, capsys):
    from qlora.cli import main
    m = _tiny("llama", len(small_tok))
    src = tmp_path / "src"
    m.save_pretrained(src)
    small_tok.save_pretrained(src)
    out = tmp_path / "out.gguf"
    argv = ["export", "--model", str(src), "--output", str(out), "--type", "q8_0", "--ollama"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    assert {t.tensor_type for t in r.tensors} == {T.Q8_0, T.F32}
    assert (tmp_path / "out.Modelfile").is_file()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--output", str(tmp_path / "y.gguf"), "--type", "q2_k"])
    assert set(EXPORT_TYPES) == {"f16", "bf16", "q8_0", "q4_0", "q4_k_m"}


def test_converted_gguf_is_cached_bit_for_bit(small_tok, tmp_path, monkeypatch):
    """The first open of a GGUF converts it with transformers and stores the result; the next reads the stored
    copy without converting, and gets the same config, tensors (bit for bit) and tokenizer."""
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    from qlora import gguf_cache
    from qlora.sources import open_source
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _tiny("llama", len(small_tok), tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, path, "q8_0", progress=False)
    first = open_source(path)
    first.progress = False
    assert first.cached is None
    ref = {n: first.get(n) for n in first.names()}  # transformers' conversion, stored as it happens
    assert first.cached is not None and first.cached.parent == tmp_path / "cache" / "qlora" / "gguf"

    def no_conversion(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", no_conversion)
    again = open_source(path)
    assert again.cached == first.cached and again.kind == "gguf"
    assert again.config.to_dict() | {"_name_or_path": ""} == first.config.to_dict() | {"_name_or_path": ""}
    assert sorted(again.names()) == sorted(ref)
    for n, t in ref.items():
        assert torch.equal(again.get(n), t), n
    text = "The capital of France is Paris."
    assert again.load_tokenizer()(text)["input_ids"] == small_tok(text)["input_ids"]
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # other bytes: another key, no stale copy
    assert gguf_cache.find(path) is None


def test_big_or_unwritable_gguf_cache_is_skipped(small_tok, tmp_path, monkeypatch):
    from qlora import gguf_cache
    from qlora.sources import open_source
    m = _tiny("llama", len(small_tok))
    path = tmp_path / "tiny.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, path, "f16", progress=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "CACHE_MAX_BYTES", 1000)
    s = open_source(path)
    s.names()
    assert s.cached is None and not (tmp_path / "cache").exists()
    monkeypatch.setattr(gguf_cache, "CACHE_MAX_BYTES", 1 << 30)
    (tmp_path / "ro").write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    s = open_source(path)
    lines = []
    s.cached = None
    assert gguf_cache.store(path, s.config, {n: s.get(n) for n in s.names()}, None, log=lines.append) is None
    assert "could not cache" in lines[0]


# ---------------------------------------------------------------------------------------------
# Gemma 2/3 and Phi-3: read back with gguf's reader (names, order, +1 norms, metadata) and with
# transformers' GGUF loader (same logits as the source model)


def _tiny_family(model_type, vocab):
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Phi3Config
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    cfg = {"gemma2": lambda: Gemma2Config(head_dim=32, sliding_window=128, **common),
           "gemma3_text": lambda: Gemma3TextConfig(head_dim=32, sliding_window=128, **common),
           "phi3": lambda: Phi3Config(pad_token_id=0, tie_word_embeddings=False, **common)}[model_type]()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if model_type != "phi3" else 1.0))
    return m


@pytest.mark.parametrize("model_type,arch", [("gemma2", "gemma2"), ("gemma3_text", "gemma3"), ("phi3", "phi3")])
def test_gemma_and_phi3_families(small_tok, tmp_path, model_type, arch):
    m = _tiny_family(model_type, len(small_tok))
    out = tmp_path / f"{arch}.gguf"
    s = export_gguf(m.config, m.state_dict().items(), small_tok, out, "f16", progress=False)
    assert s["arch"] == arch
    r = gguf.GGUFReader(str(out))
    assert _field(r, "general.architecture") == arch
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    sd = m.state_dict()
    back = {t.name: np.asarray(t.data).astype(np.float32) for t in r.tensors}
    hf_of = {}
    for hf, w in sd.items():
        if hf == "lm_head.weight" and m.config.tie_word_embeddings:
            continue
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert g in back, (hf, g)
        hf_of[g] = hf
        want = w.float() + (1.0 if arch != "phi3" and hf.endswith("norm.weight") else 0.0)  # llama.cpp's Gemma norm
        want = want.to(torch.float16).float() if w.dim() == 2 else want
        np.testing.assert_array_equal(back[g].reshape(want.shape), want.numpy(), err_msg=g)
    assert set(back) == set(hf_of)  # nothing more, nothing less
    # llama.cpp's order: token_embd, then block by block, output_norm (and output) last
    order = [t.name for t in r.tensors]
    assert order[0] == "token_embd.weight" and order.index("blk.1.attn_norm.weight") > order.index("blk.0.ffn_down.weight")
    per = {"gemma2": {"post_attention_norm", "post_ffw_norm", "attn_q", "ffn_gate"},
           "gemma3": {"post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"},
           "phi3": {"attn_qkv", "ffn_up"}}[arch]
    assert all(f"blk.0.{p}.weight" in back for p in per)
    assert ("output.weight" in back) == (arch == "phi3")
    meta = {k: _field(r, f"{arch}.{k}") for k in ("context_length", "embedding_length", "block_count",
                                                  "attention.head_count", "attention.head_count_kv")}
    assert meta == {"context_length": 512, "embedding_length": 64, "block_count": 2, "attention.head_count": 4,
                    "attention.head_count_kv": 2}
    if arch in ("gemma2", "gemma3"):
        assert _field(r, f"{arch}.attention.key_length") == 32 and _field(r, f"{arch}.attention.sliding_window") == 128
    if arch == "gemma2":
        assert _field(r, "gemma2.attn_logit_softcapping") == pytest.approx(m.config.attn_logit_softcapping)
        assert _field(r, "gemma2.final_logit_softcapping") == pytest.approx(m.config.final_logit_softcapping)
    if arch == "phi3":
        assert _field(r, "phi3.rope.dimension_count") == 16 and _field(r, "phi3.attention.sliding_window") == 0
    # transformers' own GGUF loader (it subtracts the Gemma +1 again) gives the source model's logits
    _assert_f16_file_gives_the_logits(m, out)


def test_phi3_longrope_factors(small_tok, tmp_path):
    """A 128k-style Phi-3: llama.cpp's rope_factors_long/short tensors and attention factor."""
    import math
    from transformers import AutoModelForCausalLM, Phi3Config
    long, short = [1.0 + i / 10 for i in range(8)], [1.0 + i / 100 for i in range(8)]
    cfg = Phi3Config(vocab_size=len(small_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                     original_max_position_embeddings=256, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "longrope", "long_factor": long, "short_factor": short,
                                      "rope_theta": 10000.0, "original_max_position_embeddings": 256})
    m = AutoModelForCausalLM.from_config(cfg).eval()
    out = tmp_path / "phi3.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, out, "f16", progress=False)
    r = gguf.GGUFReader(str(out))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    np.testing.assert_allclose(t["rope_factors_long.weight"], long, rtol=1e-6)
    np.testing.assert_allclose(t["rope_factors_short.weight"], short, rtol=1e-6)
    assert _field(r, "phi3.rope.scaling.original_context_length") == 256
    assert _field(r, "phi3.rope.scaling.attn_factor") == pytest.approx(math.sqrt(1 + math.log(8) / math.log(256)))


def test_gguf_cache_key_from_a_source_tree_without_metadata(monkeypatch):
    """Run from a checkout on PYTHONPATH (no installed qlora): the cache is keyed by the module's own version,
    apart from an installed one's, instead of failing (bench scripts on the GPU machine run so)."""
    import importlib.metadata as md

    from qlora import gguf_cache
    real = md.version

    def version(name):
        if name == "qlora":
            raise md.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(md, "version", version)
    assert gguf_cache._version("qlora") == "source-unknown"  # (the package defines no __version__)
    assert gguf_cache._version("transformers") == real("transformers")


def test_model_from_the_gguf_cache_generates_with_the_kv_cache(small_tok, tmp_path, monkeypatch):
    """Building a model turns config.use_cache off (training); the cached conversion must not keep that, or every
    later run generates without the KV cache (each step re-reads the whole sequence: ~10x slower on a CPU)."""
    import json

    from qlora.evaluate import greedy_answers
    from qlora.model import LoraSettings, QuantSettings, load_model
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _tiny("llama", len(small_tok), tie_word_embeddings=False)
    path = tmp_path / "tiny.gguf"
    export_gguf(m.config, m.state_dict().items(), small_tok, path, "q8_0", progress=False)
    kw = dict(quant=QuantSettings(compute_dtype="fp32"), lora=LoraSettings(r=4), dtype="fp32", progress=False)
    load_model(str(path), **kw)  # converts and stores
    stored = next((tmp_path / "cache" / "qlora" / "gguf").glob("*/config.json"))
    assert json.loads(stored.read_text()).get("use_cache", True) is True
    model, tok = load_model(str(path), **kw)  # from the cache
    model.eval()
    rows = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[1]))
    prompt = small_tok("The capital of France is")["input_ids"]
    greedy_answers(model, tok, [prompt, prompt[:3]], 5)
    assert rows[0] == len(prompt) and len(rows) > 1 and set(rows[1:]) == {1}  # prefill, then one token a step
