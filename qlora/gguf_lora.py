"""A LoRA adapter as its own GGUF file (``qlora export --adapter DIR --format gguf-lora``): a few MB that
llama.cpp (``--lora FILE``) and Ollama (``ADAPTER FILE`` in a Modelfile) apply on top of a base GGUF the
user already has, the layout llama.cpp's ``convert_lora_to_gguf.py`` writes:

* metadata: ``general.type = adapter``, ``general.architecture`` (the base's GGUF arch),
  ``adapter.type = lora``, ``adapter.lora.alpha``; llama.cpp scales each pair by ``alpha / rank``,
  so an rsLoRA adapter (``alpha / sqrt(rank)``) is written with ``alpha * sqrt(rank)``;
* per adapted base matrix ``blk.N.attn_q.weight`` (GGUF names of :mod:`qlora.gguf_export`): tensors
  ``blk.N.attn_q.weight.lora_a`` = PEFT's A (rank x in) and ``.lora_b`` = B (out x rank), stored in
  that numpy order (ggml's ``ne`` is the reverse: ``lora_a.ne = [in, rank]``, ``lora_b.ne = [rank, out]``,
  what llama.cpp's adapter loader checks); for the llama arch the rows of B on ``attn_q``/``attn_k``
  take the same rotary interleave as the base's Q/K rows, so ``B @ A`` lands on the permuted weight.

The delta is applied to whatever base llama.cpp loads (f16 or a quantized GGUF), not to the NF4
weights it was trained on: the same as every PEFT adapter converted this way.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from .errors import QLoraError

LORA_TYPES = ("f32", "f16", "bf16", "q8_0")


def lora_alpha(cfg: dict) -> float:
    """The ``adapter.lora.alpha`` that gives llama.cpp's ``alpha / rank`` our scaling."""
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    return alpha * r ** 0.5 if cfg.get("use_rslora") else alpha


def lora_tensors(config, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """(GGUF name, tensor) of each factor, in the base's block order: ``NAME.lora_a``, ``NAME.lora_b``."""
    import gguf

    from .gguf_export import _check_config, _permute_qk
    arch = _check_config(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    out = []
    for module, (a, b) in pairs.items():
        g = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if g is None:
            raise QLoraError(f"adapter layer {module} has no GGUF name for the {arch} architecture")
        if arch == "llama" and re.search(r"\.attn_[qk]\.weight$", g):
            b = _permute_qk(b, n_head if ".attn_q." in g else n_kv, module)
        out.append((g, a, b))
    order = {n: i for i, n in enumerate(_block_order(config, arch))}
    out.sort(key=lambda x: order.get(x[0], len(order)))
    return arch, [(f"{g}.lora_{ab}", t) for g, a, b in out for ab, t in (("a", a), ("b", b))]


def _block_order(config, arch: str) -> list[str]:
    from .gguf_export import _expected_names
    return _expected_names(config, arch, bool(getattr(config, "tie_word_embeddings", False)))


def export_gguf_lora(config, peft_cfg: dict, pairs: dict, out_path, type: str = "f16", force: bool = False,
                     name: str | None = None) -> dict:
    """Write the adapter ``pairs`` ({module: (A, B)}, as :func:`qlora.adapters.read_adapter` gives them)
    of a model with ``config`` as a GGUF LoRA file; atomic (temp file + rename). Returns a summary."""
    import gguf

    from .gguf_export import _target, encode_tensor
    from .outdir import guard_write, lock_beside
    t0 = time.time()
    if type not in LORA_TYPES:
        raise QLoraError(f"--format gguf-lora: --type {type} is not an adapter type (choose {', '.join(LORA_TYPES)})")
    if peft_cfg.get("use_dora"):
        raise QLoraError("DoRA adapters (use_dora) have no GGUF LoRA form: merge it instead (--format gguf)")
    if not pairs:
        raise QLoraError("the adapter has no LoRA layers to export")
    arch, tensors = lora_tensors(config, pairs)
    out = _target(out_path, force)
    qt = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[type]
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with lock_beside(out, f"export output {out}"), guard_write(out, cleanup=(tmp,)):
        try:
            w = gguf.GGUFWriter(tmp, arch)
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_name(name or Path(str(peft_cfg.get("base_model_name_or_path") or arch)).name + "-lora")
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha(peft_cfg))
            for g, t in tensors:
                if not torch.isfinite(t).all():
                    raise QLoraError(f"adapter tensor {g} holds NaN or Inf values")
                # Q8_0 needs rows in blocks of 32 (lora_b's rows are rank long): F16 where they are not
                this = qt if qt != gguf.GGMLQuantizationType.Q8_0 or t.shape[-1] % 32 == 0 else \
                    gguf.GGMLQuantizationType.F16
                data = encode_tensor(t.float(), this)
                w.add_tensor(g, data, raw_dtype=this if data.dtype == np.uint8 else None)
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    return {"path": str(out), "type": type, "arch": arch, "tensors": len(tensors), "layers": len(pairs),
            "alpha": lora_alpha(peft_cfg), "rank": int(peft_cfg.get("r", 8)), "bytes": out.stat().st_size,
            "seconds": round(time.time() - t0, 1)}
