"""Export a (merged) model to one GGUF file for llama.cpp / Ollama, plus an Ollama Modelfile.

File layout (GGUF v3, written with the ``gguf`` package): a header, key/value metadata, tensor
infos, then the tensor data, each tensor aligned to 32 bytes. Tensors arrive one at a time
(``(hf_name, tensor)`` pairs); each is renamed (``model.layers.3.self_attn.q_proj.weight`` ->
``blk.3.attn_q.weight``), converted and appended to a spill file beside the output, so only
one tensor is in memory; the header is written once all shapes are known, the spilled data is
copied after it into a temp file, and the temp file is renamed over the output.

Conventions of llama.cpp that the file follows:

* **Q/K row order** (llama arch only): HF stores each head's rotary pairs as two halves, llama.cpp
  interleaves them: ``W.reshape(heads, 2, d/2, in).swapaxes(1, 2)`` (``heads`` = the KV heads
  for ``k_proj``). transformers' GGUF loader undoes exactly this; qwen2/qwen3 are not permuted.
* **Tied embeddings**: no ``output.weight``; llama.cpp then reads ``token_embd`` as the output.
* **Gemma 2/3** (``gemma2``, ``gemma3_text``): every ``*norm.weight`` is stored plus 1 (HF's Gemma RMSNorm
  multiplies by ``1 + w``, llama.cpp's by ``w``); four norms per block (``attn_norm``,
  ``post_attention_norm``, ``ffn_norm``, ``post_ffw_norm``, Gemma 3 also ``attn_q_norm``/``attn_k_norm``);
  embeddings always tied; metadata adds key/value length (head_dim), the attention/final logit
  soft-capping (Gemma 2) and the sliding window. No Q/K permutation (NEOX rotary).
* **Phi-3** (``phi3``): the fused ``qkv_proj`` -> ``attn_qkv`` and ``gate_up_proj`` -> ``ffn_up`` as they
  are; rotary dimension ``partial_rotary_factor * hidden / heads``, the original context length,
  the sliding window (0 when none); LongRoPE models also get ``rope_factors_long``/``_short`` and the
  attention factor, as llama.cpp's converter writes them.
* **Types**: 1-D tensors (norms, biases) are F32. ``f16``/``bf16``/``q8_0`` store every 2-D
  tensor in that type. ``q4_0`` and ``q4_k_m`` follow llama.cpp's ``llama-quantize`` mix: the
  output matrix (or the tied embedding) is Q6_K; for ``q4_k_m`` ``attn_v`` and ``ffn_down`` take
  Q6_K on the layers where ``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` and Q4_K elsewhere,
  every other matrix Q4_K. K-quants need rows that are a multiple of 256; other rows fall back
  as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 (F16 if not even a multiple of 32).
  Q4_K/Q6_K are encoded by :mod:`qlora.q4k`; Q8_0, Q5_0, Q4_0 by ``gguf.quants``.

Metadata: ``general.*``, ``{arch}.*`` hyper-parameters (context length, sizes, heads, RoPE base
and scaling, RMS eps), ``tokenizer.ggml.*`` (model, pre-tokenizer, tokens, token types, merges or
scores, bos/eos/unk/pad ids, add_bos/add_eos) and ``tokenizer.chat_template``.

Longer than 500 lines: one export format end to end (tensor types and encoding, metadata, tokenizer,
Ollama Modelfile, the command); the parts are short and used only here.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import QLoraError
from .outdir import guard_write, lock_beside

EXPORT_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",  # HF model_type -> GGUF arch
         "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
GEMMA = ("gemma2", "gemma3")
# tensors llama.cpp wants that a HF checkpoint does not hold, generated from the config
EXTRA_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_SKIP = re.compile(r"rotary_emb\.inv_freq$")


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], export_type: str, n_layers: int, tied: bool):
    """The GGML type one tensor gets in an ``export_type`` file (see the module docstring)."""
    from gguf import GGMLQuantizationType as T
    if len(shape) == 1 or gguf_name in EXTRA_TENSORS:
        return T.F32
    if export_type in ("f16", "bf16"):
        return T.F16 if export_type == "f16" else T.BF16
    cols = shape[-1]
    if export_type == "q8_0":
        return T.Q8_0 if cols % 32 == 0 else T.F16
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    if is_output:
        want = T.Q6_K
    elif export_type == "q4_0":
        want = T.Q4_0
    else:
        want = T.Q4_K
        m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.weight$", gguf_name)
        if m and _use_more_bits(int(m.group(1)), n_layers):
            want = T.Q6_K
    if want in (T.Q4_K, T.Q6_K) and cols % 256:
        want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}[want]
    return want if cols % 32 == 0 else T.F16


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """Tensor -> the array ``GGUFWriter`` stores: float32/float16 values, or uint8 block bytes."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from . import q4k
    if qtype == T.F32:
        return t.detach().to(torch.float32).cpu().contiguous().numpy()
    if qtype == T.F16:
        return t.detach().to(torch.float16).cpu().contiguous().numpy()
    if qtype == T.BF16:  # round-to-nearest-even, as ggml does
        b = t.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy()
        return b.view(np.uint8)
    if qtype == T.Q4_K:
        return q4k.quantize_q4_k(t)
    if qtype == T.Q6_K:
        return q4k.quantize_q6_k(t)
    return quants.quantize(t.detach().to(torch.float32).cpu().numpy(), qtype)


def _permute_qk(w: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    if w.shape[0] % (2 * heads):
        raise QLoraError(f"{name}: {w.shape[0]} rows do not split into {heads} heads of rotary pairs")
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# metadata


def _rope(config) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]
    rp = dict(rp or getattr(config, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rp


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: per frequency, default inv_freq / llama3-scaled inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    d = _head_dim(config)
    base = 1.0 / (_rope(config)["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (base / scaled.to(torch.float64)).to(torch.float32)


def _arch_metadata(w, config, arch: str, warnings: list[str]) -> None:
    from gguf import RopeScalingType
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    hd = _head_dim(config)
    if arch != "phi3":  # phi3: its partial rotary dimension (_family_metadata)
        w.add_rope_dimension_count(hd)
    if arch in ("qwen3",) + GEMMA or hd != config.hidden_size // config.num_attention_heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    rp = _rope(config)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    kind = (rp.get("rope_type") or rp.get("type") or "default").lower()
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings")
                                            or config.max_position_embeddings))
        for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rp.get(key) is not None:
                add(float(rp[key]))
    elif kind == "dynamic":
        warnings.append("dynamic NTK RoPE scaling is not stored in GGUF; contexts past "
                        "max_position_embeddings will differ from transformers")
    elif kind not in ("default", "llama3") and not (arch == "phi3" and kind in ("longrope", "su")):
        raise QLoraError(f"RoPE scaling {kind!r} cannot be exported to GGUF by qlora "
                         f"(supported: default, linear, yarn, llama3)")
    if arch in GEMMA or arch == "phi3":
        _family_metadata(w, config, arch)
        return
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        warnings.append(f"sliding-window attention ({window} tokens) is not stored for the {arch} "
                        f"GGUF architecture; prompts longer than that attend to all tokens")


def _parts(tok_json: dict, key: str) -> list[dict]:
    """The steps of a tokenizer.json normalizer / pre_tokenizer, a Sequence flattened."""
    node = tok_json.get(key) or {}
    if node.get("type") == "Sequence":
        return [p for p in node.get("normalizers", node.get("pretokenizers", [])) if p]
    return [node] if node else []


def detect_pre_tokenizer(tok_json: dict, clean_spaces: bool = False) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE, from its pre-tokenizer."""
    parts = _parts(tok_json, "pre_tokenizer")
    regexes = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    for rx in regexes:
        if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in rx:
            return "llama-bpe" if r"\p{N}{1,3}" in rx else "qwen2"
    bytelevel = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    if bytelevel and digits and not regexes:
        return "starcoder" if clean_spaces else "smollm"
    if bytelevel and not regexes:
        return "gpt-2"
    return "default"


def tokenizer_metadata(tokenizer, vocab_size: int | None = None, pre: str | None = None) -> dict:
    """The ``tokenizer.ggml.*`` values for a fast (tokenizer.json) BPE tokenizer.

    Byte-level BPE (GPT-2 style) -> model ``gpt2`` with merges ``"a b"``; BPE with byte fallback
    (SentencePiece converted) -> model ``llama`` with scores ``-rank`` of the merge that makes each
    token, so llama.cpp's score-ordered merging follows the BPE merge order. Ids the tokenizer does
    not cover up to ``vocab_size`` (embedding padding) become ``[PAD<i>]`` tokens of type UNUSED.
    """
    from gguf import TokenType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QLoraError("GGUF export needs a fast tokenizer (a tokenizer.json); this one has none")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise QLoraError(f"GGUF export supports BPE tokenizers only, this one is {model.get('type')}")
    spm = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    size = int(vocab_size or n)
    if n > size:
        raise QLoraError(f"the tokenizer has {n} tokens but the model's embedding only {size} rows")
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    unk = tokenizer.unk_token_id
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], t = f"[PAD{i}]", TokenType.UNUSED
        elif i in added:
            t = TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            t = TokenType.BYTE
        elif spm and i == unk:
            t = TokenType.UNKNOWN
        else:
            t = TokenType.NORMAL
        types.append(int(t))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"model": "llama" if spm else "gpt2", "tokens": tokens, "token_type": types}
    if spm:
        scores = [0.0 if len(t) == 1 or types[i] != TokenType.NORMAL else -1e9 for i, t in enumerate(tokens)]
        for rank, m in enumerate(merges):
            i = vocab.get(m.replace(" ", "", 1)) if " " in m else None
            if i is not None and scores[i] == -1e9:
                scores[i] = -float(rank)
        meta["scores"] = scores
        meta["add_space_prefix"] = (
            any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in _parts(tj, "normalizer"))
            or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                   for p in _parts(tj, "pre_tokenizer")))
    else:
        meta["merges"] = merges
        meta["pre"] = pre or detect_pre_tokenizer(tj, bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))
        meta["add_space_prefix"] = False
    for key in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is not None:
            meta[f"{key}_token_id"] = int(tid)
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_sp) > len(plain)
    meta["add_bos_token"] = bool(extra and meta.get("bos_token_id") == with_sp[0])
    meta["add_eos_token"] = bool(extra and meta.get("eos_token_id") == with_sp[-1])
    ct = getattr(tokenizer, "chat_template", None)
    if ct:
        meta["chat_template"] = ct if isinstance(ct, str) else [{"name": k, "template": v} for k, v in ct.items()]
    return meta


def _write_tokenizer(w, meta: dict) -> None:
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
    if meta.get("merges"):
        w.add_token_merges(meta["merges"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_token_id" in meta:
            getattr(w, f"add_{key}_token_id")(meta[f"{key}_token_id"])
    w.add_add_bos_token(meta["add_bos_token"])
    w.add_add_eos_token(meta["add_eos_token"])
    w.add_add_space_prefix(meta["add_space_prefix"])
    if "chat_template" in meta:
        w.add_chat_template(meta["chat_template"])


def _family_metadata(w, config, arch: str) -> None:
    """What llama.cpp's converter adds for Gemma 2/3 and Phi-3 beyond the common hyper-parameters."""
    if arch in GEMMA:  # key/value length (head_dim) with the common ones
        if arch == "gemma2" and getattr(config, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if arch == "gemma2" or getattr(config, "sliding_window_pattern", None) != 1:
            w.add_sliding_window(int(config.sliding_window))
        return
    rp = _rope(config)
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
                                   * config.hidden_size) // config.num_attention_heads)
    w.add_rope_scaling_orig_ctx_len(int(rp.get("original_max_position_embeddings")
                                        or getattr(config, "original_max_position_embeddings", None)
                                        or config.max_position_embeddings))
    w.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    factors = _phi3_rope_factors(config)
    if factors is not None:
        w.add_rope_scaling_attn_factors(factors[2])


def _phi3_rope_factors(config):
    """(long, short, attention factor) of a LongRoPE Phi-3, else None (llama.cpp's converter's values)."""
    import math
    rp = _rope(config)
    if (rp.get("rope_type") or rp.get("type")) not in ("longrope", "su"):
        return None
    orig = int(rp.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    scale = config.max_position_embeddings / orig
    attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    return (torch.tensor(rp["long_factor"], dtype=torch.float32), torch.tensor(rp["short_factor"], dtype=torch.float32),
            attn)


# ---------------------------------------------------------------------------------------------
# export


def _check_config(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise QLoraError(f"unsupported architecture {mt!r} for GGUF export "
                         f"(supported: {', '.join(sorted(ARCHS))})")
    return ARCHS[mt]


def _expected_names(config, arch: str, tied: bool) -> list[str]:
    per = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    if arch in GEMMA:
        per += ["post_attention_norm", "post_ffw_norm"]
    if arch == "phi3":  # fused projections
        per = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
    if arch in ("qwen3", "gemma3"):
        per += ["attn_q_norm", "attn_k_norm"]
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    return names + [f"blk.{i}.{p}.weight" for i in range(config.num_hidden_layers) for p in per]


def _target(path, force: bool) -> Path:
    out = Path(path).expanduser()
    if out.is_dir():
        raise QLoraError(f"output {out} is a directory; give a file name such as {out / 'model.gguf'}")
    if out.exists() and not force:
        raise QLoraError(f"output {out} already exists (use --force to replace it)")
    with guard_write(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _model_name(config, name: str | None) -> str:
    if name:
        return name
    src = str(getattr(config, "name_or_path", "") or "")
    # not the bare model type: transformers' GGUF reader treats general.name == "mistral" specially
    return Path(src).name or src or f"{config.model_type}-qlora"


def export_gguf(config, tensors: Iterable[tuple[str, torch.Tensor]], tokenizer, out_path, type: str = "q4_k_m",
                force: bool = False, ollama: bool = False, progress: bool = True, name: str | None = None,
                tokenizer_pre: str | None = None) -> dict:
    """Write ``tensors`` (HF names, 16/32-bit, e.g. merged weights) of a llama/mistral/qwen2/qwen3
    ``config`` with ``tokenizer`` as a GGUF file of ``type`` (one of :data:`EXPORT_TYPES`).

    The file appears at ``out_path`` only when complete (temp file + rename); an existing file is
    refused unless ``force``. ``ollama`` also writes ``<stem>.Modelfile`` beside it.
    ``tokenizer_pre`` overrides the detected llama.cpp pre-tokenizer name. Returns a summary dict:
    path, type, arch, tensors, params, bytes, seconds, tensor_types (count per GGML type),
    fallbacks (tensors that could not take their K-quant), warnings, modelfile.
    """
    import gguf
    from tqdm.auto import tqdm

    t0 = time.time()
    if type not in EXPORT_TYPES:
        raise QLoraError(f"unknown GGUF type {type!r}: choose one of {', '.join(EXPORT_TYPES)}")
    arch = _check_config(config)
    out = _target(out_path, force)
    if ollama:
        _target(out.with_suffix(".Modelfile"), force)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    warnings: list[str] = []
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size, tokenizer_pre)
    if tok_meta.get("pre") == "default":
        warnings.append("unrecognised BPE pre-tokenizer: wrote 'default'; llama.cpp may split text "
                        "differently from transformers (pass tokenizer_pre= to set it)")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    rope_kind = (_rope(config).get("rope_type") or "default").lower()

    def stream():
        yield from tensors
        if rope_kind == "llama3":
            yield "rope_freqs.weight", _llama3_rope_factors(config)
        if arch == "phi3" and _phi3_rope_factors(config) is not None:
            long, short, _ = _phi3_rope_factors(config)
            yield "rope_factors_long.weight", long
            yield "rope_factors_short.weight", short

    infos, counts, fallbacks, seen = [], Counter(), [], set()
    n_params = 0
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    spill = out.with_name(f".{out.name}.data{os.getpid()}")
    expected = _expected_names(config, arch, tied)
    bar = tqdm(total=len(expected), desc=f"export {type}", unit="tensor", disable=not progress)
    # OUT.lock: one writer at a time; a full disk or read-only folder: one line, temp files removed
    with lock_beside(out, f"export output {out}"), guard_write(out, cleanup=(tmp, spill)):
        try:
            with open(spill, "wb") as f:
                for hf_name, t in stream():
                    if _SKIP.search(hf_name) or (tied and hf_name == "lm_head.weight"):
                        continue
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                        raise QLoraError(f"tensor {hf_name}: expected a floating-point torch tensor")
                    g = hf_name if hf_name in EXTRA_TENSORS else \
                        name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                    if g is None:
                        raise QLoraError(f"tensor {hf_name} has no GGUF name for the {arch} architecture")
                    if g in seen:
                        raise QLoraError(f"tensor {hf_name} given twice (as {g})")
                    seen.add(g)
                    if arch in GEMMA and hf_name.endswith("norm.weight"):  # HF's Gemma norm is x * (1 + w)
                        t = t.float() + 1.0
                    if arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", g):
                        t = _permute_qk(t, n_head if ".attn_q." in g else n_kv, hf_name)
                    if g == "token_embd.weight" and t.shape[0] != config.vocab_size:
                        raise QLoraError(f"{hf_name} has {t.shape[0]} rows, config.vocab_size is {config.vocab_size}")
                    if t.dim() == 2 and not torch.isfinite(t).all():
                        raise QLoraError(f"tensor {hf_name} holds NaN or Inf values")
                    qt = tensor_qtype(g, tuple(t.shape), type, n_layers, tied)
                    if type == "q4_k_m" and qt not in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K,
                                                       gguf.GGMLQuantizationType.F32):
                        fallbacks.append(g)
                    data = encode_tensor(t, qt)
                    infos.append((g, data.shape, data.dtype, data.nbytes, None if data.dtype != np.uint8 else qt, f.tell()))
                    f.write(np.ascontiguousarray(data).data)  # not tofile: a short write there has no errno
                    counts[qt.name] += 1
                    n_params += t.numel()
                    bar.update(1)
                    del t, data
            missing = [m for m in expected if m not in seen]
            if missing:
                raise QLoraError(f"the model is missing {len(missing)} tensor(s) the {arch} GGUF needs, "
                                 f"e.g. {', '.join(missing[:3])}")

            w = gguf.GGUFWriter(tmp, arch)
            w.add_type(gguf.GGUFType.MODEL)
            w.add_name(_model_name(config, name))
            w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                             "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}[type])
            if type not in ("f16", "bf16"):
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _arch_metadata(w, config, arch, warnings)
            _write_tokenizer(w, tok_meta)
            for g, shape, dtype, nbytes, raw, _ in infos:
                w.add_tensor_info(g, shape, dtype, nbytes, raw_dtype=raw)
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for g, shape, dtype, nbytes, raw, off in infos:
                w.write_tensor_data(np.memmap(spill, dtype=np.uint8, mode="r", offset=off, shape=(nbytes,)))
            w.close()
            os.replace(tmp, out)
            if ollama:
                modelfile = write_modelfile(out, tokenizer, out.with_suffix(".Modelfile"), force=force)["path"]
        finally:
            bar.close()
            for p in (tmp, spill):
                if p.exists():
                    p.unlink()
    summary = {"path": str(out), "type": type, "arch": arch, "tensors": len(infos), "params": n_params,
               "bytes": out.stat().st_size, "seconds": round(time.time() - t0, 1),
               "tensor_types": dict(counts), "fallbacks": fallbacks, "warnings": warnings, "modelfile": None}
    if ollama:
        summary["modelfile"] = modelfile
    return summary


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile

# Chat formats whose turns are ``A + role + B + content + C``; the generation prompt is
# ``A + "assistant" + B``. Ollama renders TEMPLATE with Go's text/template: ``.System`` holds the
# system messages (or the Modelfile's SYSTEM when there are none), ``.Messages`` every message.
CHAT_STYLES = {
    "chatml": {"mark": "<|im_start|>", "A": "<|im_start|>", "B": "\n", "C": "<|im_end|>\n",
               "stops": ["<|im_start|>", "<|im_end|>"]},
    "llama3": {"mark": "<|start_header_id|>", "A": "<|start_header_id|>", "B": "<|end_header_id|>\n\n",
               "C": "<|eot_id|>", "stops": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
}
_PROBES = ([{"role": "user", "content": "Hello there"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}])


def go_template(style: str) -> str:
    """The Ollama (Go text/template) TEMPLATE for a style of :data:`CHAT_STYLES`."""
    s = CHAT_STYLES[style]
    a, b, c = s["A"], s["B"], s["C"]
    return ("{{ if .System }}" + a + "system" + b + "{{ .System }}" + c + "{{ end }}"
            "{{ range .Messages }}{{ if ne .Role \"system\" }}" + a + "{{ .Role }}" + b + "{{ .Content }}" + c
            + "{{ end }}{{ end }}" + a + "assistant" + b)


def render_style(style: str, messages: list[dict], default_system: str | None = None) -> str:
    """What Ollama makes of :func:`go_template` for ``messages`` (a Python model of it)."""
    s = CHAT_STYLES[style]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or default_system or ""
    text = s["A"] + "system" + s["B"] + system + s["C"] if system else ""
    for m in messages:
        if m["role"] != "system":
            text += s["A"] + m["role"] + s["B"] + m["content"] + s["C"]
    return text + s["A"] + "assistant" + s["B"]


def chat_style(tokenizer) -> tuple[str | None, str | None, list[str]]:
    """(style, default system prompt, warnings) for the tokenizer's chat template, checked by
    rendering probe conversations with transformers and with :func:`render_style`."""
    ct = getattr(tokenizer, "chat_template", None)
    if isinstance(ct, dict):
        ct = ct.get("default") or next(iter(ct.values()), None)
    if not ct:
        return None, None, ["the tokenizer has no chat template: the Modelfile passes the prompt through as is"]
    style = next((k for k, s in CHAT_STYLES.items() if s["mark"] in ct), None)
    if style is None:
        return None, None, ["chat template is neither ChatML nor Llama-3 style: the Modelfile's TEMPLATE "
                            "passes the prompt through as is; write TEMPLATE by hand"]
    s, bos = CHAT_STYLES[style], getattr(tokenizer, "bos_token", None) or ""
    # a BOS the template writes is the one llama.cpp adds when the tokenizer adds it: not in TEMPLATE
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    strip_bos = bool(bos) and bool(ids) and ids[0] == tokenizer.bos_token_id

    def hf(msgs):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=ct)
        return text[len(bos):] if strip_bos and text.startswith(bos) else text

    first = hf(_PROBES[0])
    head = s["A"] + "system" + s["B"]
    default = first[len(head):first.index(s["C"], len(head))] if first.startswith(head) else None
    ok = all(hf(p) == render_style(style, p, default) for p in _PROBES)
    warns = [] if ok else [f"the {style} TEMPLATE does not reproduce this chat template exactly; check it"]
    return style, default, warns


def write_modelfile(gguf_path, tokenizer, out_path, temperature: float = 0.7, force: bool = False) -> dict:
    """Write an Ollama Modelfile: FROM the GGUF, TEMPLATE (Go template equivalent of the chat
    template, ChatML or Llama-3 style), SYSTEM (the template's default system prompt, if any),
    PARAMETER stop for the turn markers and the EOS token, PARAMETER temperature.
    Returns {path, style, system, stops, warnings}."""
    out = _target(out_path, force)
    gguf_path = Path(gguf_path).expanduser().resolve()
    style, system, warns = chat_style(tokenizer)
    template = go_template(style) if style else "{{ .Prompt }}"
    stops = list(CHAT_STYLES[style]["stops"]) if style else []
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    for text in (template, system or ""):
        if '"""' in text:
            raise QLoraError('the chat template or system prompt contains """, which a Modelfile cannot quote')
    src = f"./{gguf_path.name}" if gguf_path.parent == out.resolve().parent else str(gguf_path)
    lines = [f"# Ollama Modelfile written by qlora. Create the model with:",
             f"#   ollama create {gguf_path.stem.lower()} -f {out.name}",
             f"FROM {src}", f'TEMPLATE """{template}"""']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER temperature {float(temperature):g}")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return {"path": str(out), "style": style, "system": system, "stops": stops, "warnings": warns}


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file (llama.cpp / Ollama), optionally merging an adapter",
                       description="Merge an adapter into its base (optional) and write one GGUF file: "
                                   "f16/bf16, q8_0, q4_0 or q4_k_m (llama.cpp's Q4_K_M mix).")
    p.add_argument("--model", default=None, help="base model: a Hugging Face directory, a .gguf file or a Hub id "
                                                 "org/name[@revision] (default: the base the adapter records, "
                                                 "else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to merge in before export")
    p.add_argument("--output", "-o", required=True, help="GGUF file to write")
    p.add_argument("--format", default="gguf", choices=("gguf", "gguf-lora"),
                   help="gguf: the whole model (adapter merged in); gguf-lora: only the adapter, for llama.cpp "
                        "--lora / Ollama ADAPTER beside a base GGUF you have (default: gguf)")
    p.add_argument("--type", default=None, choices=sorted(set(EXPORT_TYPES) | {"f32"}),
                   help="tensor types (default: q4_k_m; gguf-lora: f16, and one of f32, f16, bf16, q8_0)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--ollama", action="store_true", help="also write <output>.Modelfile for `ollama create`")
    p.add_argument("--name", default=None, help="general.name stored in the file (default: from the model)")
    p.set_defaults(func=run)


def _source_pre(path) -> str | None:
    """The ``tokenizer.ggml.pre`` of a source GGUF (transformers' GGUF tokenizer loses it)."""
    if path is None or Path(path).suffix != ".gguf":
        return None
    import gguf
    f = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return f.contents() if f is not None else None


def _open_model(model, adapter):
    """(config, tokenizer, tensors, source GGUF path or None) of the merged model."""
    try:
        from .adapters import merged_tensors
    except ImportError:
        merged_tensors = None
    if merged_tensors is not None:
        kw = {}
        if not adapter:  # nothing to merge: export the base weights untouched, not a 4-bit round trip
            from .model import QuantSettings
            kw["quant"] = QuantSettings(quant_type=None)
        config, src, tensors = merged_tensors(model, adapter, torch.float32, **kw)
        tok = src.load_tokenizer() if hasattr(src, "load_tokenizer") else src
        path = getattr(src, "path", None) if getattr(src, "kind", None) == "gguf" else None
        return config, tok, tensors, path
    if adapter:
        raise QLoraError("merging an adapter needs qlora.adapters, which this installation lacks")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import embedded_model_path
    p = Path(model).expanduser() if model else embedded_model_path()
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    d = str(p.parent if p.suffix == ".gguf" else p)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)
    return m.config, AutoTokenizer.from_pretrained(d, **kw), iter(m.state_dict().items()), (p if kw else None)


def run(args) -> int:
    _target(args.output, args.force)  # fail before the (slow) model load
    with lock_beside(args.output, f"export output {args.output}"):  # export_gguf's lock, taken before the load
        return _run_locked(args)


def _run_lora(args) -> int:
    """``--format gguf-lora``: the adapter's factors only, checked against the base's config."""
    from .adapters import check_fits, read_adapter
    from .gguf_lora import export_gguf_lora
    from .hub import base_for
    from .sources import open_source
    if not args.adapter:
        raise QLoraError("--format gguf-lora exports an adapter: give --adapter DIR")
    if args.ollama:
        raise QLoraError("--ollama writes a Modelfile for a whole model; for an adapter add the line "
                         "'ADAPTER <file>.gguf' to the Modelfile of its base")
    peft_cfg, pairs = read_adapter(args.adapter)
    src = base_for(args.model, args.adapter)
    if src is None:
        from .embedded import embedded_model_path
        src = embedded_model_path()
    config = open_source(src).config  # the base's sizes and arch; its weights are not read
    check_fits(args.adapter, src, pairs, config)
    s = export_gguf_lora(config, peft_cfg, pairs, args.output, args.type or "f16", force=args.force, name=args.name)
    print(f"wrote {s['path']}: {s['bytes'] / 2**20:.2f} MiB, LoRA of {s['layers']} layers (rank {s['rank']}, "
          f"alpha {s['alpha']:g}, {s['type']}) for a {s['arch']} base; llama.cpp: --lora {s['path']}; "
          f"Ollama: ADAPTER {s['path']}")
    return 0


def _run_locked(args) -> int:
    from .hub import local
    if args.format == "gguf-lora":
        return _run_lora(args)
    args.type = args.type or "q4_k_m"
    if args.type not in EXPORT_TYPES:
        raise QLoraError(f"--type {args.type} is for --format gguf-lora; a model takes {', '.join(EXPORT_TYPES)}")
    if args.ollama:
        _target(Path(args.output).expanduser().with_suffix(".Modelfile"), args.force)
    if args.model and not Path(local(args.model)).expanduser().exists():
        raise QLoraError(f"model {args.model} not found (give a Hugging Face directory or a .gguf file)")
    if args.adapter and not Path(args.adapter).expanduser().is_dir():
        raise QLoraError(f"adapter directory {args.adapter} not found")
    config, tok, tensors, src_gguf = _open_model(args.model, args.adapter)
    if tok is None:
        raise QLoraError(f"no tokenizer found with the model {args.model}; GGUF files must carry one")
    _check_config(config)
    s = export_gguf(config, tensors, tok, args.output, args.type, force=args.force, ollama=args.ollama,
                    name=args.name, tokenizer_pre=_source_pre(src_gguf))
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(s["tensor_types"].items()))
    print(f"wrote {s['path']}: {s['bytes'] / 2**20:.1f} MiB, {s['tensors']} tensors ({kinds}), "
          f"{s['params'] / 1e6:.1f}M parameters, {s['seconds']} s")
    if s["fallbacks"]:
        print(f"note: {len(s['fallbacks'])} tensor(s) have rows that are not a multiple of 256 and use "
              f"Q5_0/Q8_0 instead of Q4_K/Q6_K")
    for w in s["warnings"]:
        print(f"warning: {w}")
    if s["modelfile"]:
        print(f"wrote {s['modelfile']}; create the Ollama model with:\n"
              f"  ollama create {Path(s['path']).stem.lower()} -f {s['modelfile']}")
    return 0
