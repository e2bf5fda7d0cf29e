"""`qlora plan`: predict the peak GPU memory of a QLoRA training step before loading anything.

The prediction is of ``torch.cuda.max_memory_allocated`` (what PyTorch allocates; the CUDA
context, ~0.5 GiB, and allocator slack come on top, see :func:`fits`). It is counted from first
principles, in bytes, from the model's config only (a skeleton on the ``meta`` device):

* **frozen model** (exact): per quantized block linear with ``n = in*out`` weights, packed codes
  ``ceil(n/2)``; DQ constants: 8-bit block scales ``ceil(n/64)`` bytes (stored padded to a multiple
  of 256), fp32 second-level scales ``4*ceil(n/64/256)``, the code tables (64 + 1024 bytes per
  layer on a GPU); without DQ fp32 scales ``4*ceil(n/64)``. Embeddings, lm_head (when not tied),
  norms and biases in 16-bit.
* **LoRA** (exact): ``r*(in+out)`` fp32 parameters per adapted linear, as many fp32 gradients,
  optimizer states of 8 bytes per parameter (32-bit AdamW) or ``2 + 8/256`` (8-bit; tensors under
  4096 elements stay 32-bit). Paged optimizers keep on the GPU only what fits (the rest waits in
  host memory; see :func:`page_budget`).
* **activations**, with ``N = batch*seq`` tokens, ``H`` hidden, ``I`` intermediate size, ``L`` layers
  (a mixture of experts: ``I = k * expert size + shared expert size`` for top-k routing, plus each routed
  copy's gathered input and output, ``4*k*H`` bytes per token, and the router's ``6*E``; every expert's
  weights count in the frozen model, one 4-bit linear per expert and projection):
  with per-block checkpointing, the block inputs ``L*N*H*2`` (0 with offload, then they sit in
  pinned host memory); what is saved outside the blocks (final norm input in fp32, the loss'
  hidden states, RoPE tables); and the peak inside the one block being recomputed and
  back-propagated, ``N*(a_h*H + a_i*I)`` bytes. The per-token constants in :data:`ACT` come from
  counting the tensors alive at that moment (HF decoder block, QLoRA linear, SDPA) and were then
  calibrated against ``max_memory_allocated`` on an H100 (``bench/memory.py``, docs/memory.md). Long
  micro-batches run the MLP over chunks of tokens (qlora.tiled): their ``a_i*I`` term counts one chunk.
* **workspace**: the dequantized 16-bit copy of the largest block weight (alive during its matmul),
  the chunked loss (``rows*V*12`` bytes for one chunk of logits, ``rows = 2^24 // V``), the
  gradient of the hidden states, the optimizer's per-chunk temporaries, cuBLAS workspace.

The peak is the largest of three moments of a step: the loss backward (all block inputs saved),
the backward of a block (gradients accumulating), and the optimizer step (activations gone).

Longer than 500 lines: counting, the estimate, the advice and the command's printout share the
calibrated constants at the top; each part is short.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache

from .config import is_int, is_number
from .errors import QLoraError
from .settings import switches

STREAM_SLOTS = 2  # weight streaming's device slots (qlora.stream's default; the plan counts them)

GiB = 1 << 30
MiB = 1 << 20

# Shapes of well-known models (transformers config keyword arguments).
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False),
    # mixtures of experts: every expert counted in NF4, activations of the top-k routed tokens (see count_model)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
                         tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
}
ALIASES = {"embedded": "smollm2-135m", "llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b",
           "8b": "llama-3.1-8b", "70b": "llama-3.1-70b", "1b": "llama-3.2-1b", "3b": "llama-3.2-3b"}

# Activation constants: bytes per token per unit of hidden (h) / intermediate (i) size, for the HF
# decoder block with QLoRALinear layers, bf16, SDPA flash attention. Counting the tensors alive
# gives, per token, ~16.5*H + 8*I saved inside a block (fp32 RMSNorm inputs, normed inputs, RoPE'd
# q/k, v, attention output; gate, up, silu(gate), their product) plus the backward's transients.
# The values are fitted to measurements on an H100 (bench/memory.py "calib" rows: one block at
# 4096 and 16384 tokens, intermediate size 14336 and 4096; see docs/memory.md).
ACT = {
    # peak inside the block being recomputed + back-propagated (checkpointing), incoming gradient included
    "block_h": 27.7, "block_i": 9.35,
    # extra when LoRA dropout > 0 (each adapted linear drops its own copy of its input)
    "dropout_h": 14.4, "dropout_i": 0.6,
    # without checkpointing: saved per block, and the backward transient of one block. saved_*: fitted to kept
    # blocks on an H100 (train_speed --memory-budget 24GiB / auto, 23 and 32 kept; BENCHMARKS): 2I + ~2.9H less
    # than the CPU autograd count (kept_block_bytes_per_token: 17.2H + 8I), the fused SwiGLU and norm kernels
    # saving fewer tensors
    "saved_h": 14.3, "saved_i": 6.0, "nockpt_block_h": 8.4, "nockpt_block_i": 1.6,
    # the loss backward: final norm (fp32) input and its backward, the loss' hidden states and gradient
    "tail_h": 16.0,
}
# Sequence-tiled MLP (qlora.tiled; long micro-batches, see tiled_rows): the block keeps no I-sized tensor for the
# whole sequence, only for one chunk of ``rows`` tokens. Counted from first principles (not yet measured; to be
# calibrated on a GPU with bench/memory.py's "long" row), at the two candidates for the block's backward peak:
# * the tiled MLP's backward: the attention part's saved tensors, the MLP input (saved by the node), the norm
#   input, the block's output gradient and the MLP input's gradient (one 2H buffer filled chunk by chunk), plus
#   one chunk's recomputed MLP and its backward. Untiled, the same moment holds the same H-sized tensors but two
#   input gradients (gate's and up's) and their sum instead of one buffer: no more H-terms than block_h measured;
# * the attention's backward (after the MLP's): its saved tensors, the output and q/k/v gradients and SDPA's
#   transients (dq in fp32, GQA's per-head dk/dv): about 23H for Llama-3-8B, under block_h as well.
# So a tiled block is modelled as N * block_h * H (an upper bound) plus rows * block_i * I for the chunk; a kept
# (not checkpointed) block saves N * saved_h * H (no I-terms: the MLP saves only its input) and LoRA dropout's
# unfused copies lose their I-term (the MLP's are per chunk).
CE_BYTES_PER_LOGIT = 32        # one chunk of logits: fwd and bwd temporaries (measured; 16-bit + fp32 copies)
CE_CHUNK_ELEMENTS = 1 << 24    # as qlora.kernels.loss.CHUNK_ELEMENTS
DEQUANT_AT_PEAK = 0.4          # share of the largest dequantized weight alive at the block's peak (measured)
CUDA_WORKSPACE = 64 * MiB      # cuBLAS/cuBLASLt workspaces and allocator rounding
OPT_WORKSPACE = {32: 48 * MiB, 8: 160 * MiB}  # per-chunk temporaries of the optimizer step
PAGED_CHUNK = 32 * MiB         # as qlora.optim.PAGED_CHUNK_BYTES: a paged step holds two (updated, prefetched)
CONTEXT_BYTES = GiB // 2       # CUDA context + kernels: not in torch's counters
SLACK = 0.03                   # allocator fragmentation on top of the allocated peak
OPTIMS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


# ---------------------------------------------------------------------------------------------
# inputs


def parse_size(text: str | int | float) -> int:
    """'24GiB', '24G' and '24' are GiB; '80GB' is 80e9 bytes; also MiB/MB/TiB/TB. Returns bytes."""
    if is_number(text):
        return int(text * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m or not float(m.group(1)) > 0:
        raise QLoraError(f"cannot read the memory size {text!r}: write it like 24GiB, 80GB or 40G")
    unit = m.group(2) or "g"
    decimal = m.group(3) == "b"
    power = "kmgt".index(unit) + 1
    return int(float(m.group(1)) * ((1000 if decimal else 1024) ** power))


def shape_key(name: str) -> str:
    """The :data:`SHAPES` key of a shape name or alias (any case); unknown names come back lower-cased."""
    return ALIASES.get(name.lower(), name.lower())


def shape_config(name: str):
    """A transformers config for a shape of :data:`SHAPES` (or an alias)."""
    key = shape_key(name)
    if key not in SHAPES:
        raise QLoraError(f"unknown shape {name!r}: choose one of {', '.join(list(SHAPES) + list(ALIASES))}")
    from transformers import AutoConfig
    kw = dict(SHAPES[key])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.qlora_shape = key
    return cfg


# ---------------------------------------------------------------------------------------------
# counting


def _nbytes(numel: int, dtype) -> int:
    import torch
    return numel * torch.empty((), dtype=dtype).element_size()


@lru_cache(maxsize=16)
def _summary(config_json: str, model_type: str, dtype: str) -> dict:
    """What :func:`count_model` needs from a meta skeleton of the model (cached: building a 70B
    skeleton takes a second)."""
    import torch
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from .model import block_linear_names, parse_dtype, skeleton
    dt = parse_dtype(dtype)
    kw = json.loads(config_json)
    kw.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **kw)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no deprecation notes from building the skeleton
    try:
        model = skeleton(config, dt)
    finally:
        hf_logging.set_verbosity(verbosity)
    linears, seen = [], set()
    for n in block_linear_names(model):
        lin = model.get_submodule(n)
        linears.append((n, lin.in_features, lin.out_features, lin.bias is not None))
        seen.update({id(lin.weight), id(lin.bias)})
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            other += _nbytes(t.numel(), dt if (t.is_floating_point() and isinstance(t, torch.nn.Parameter)) else t.dtype)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    from .moe import QLoRAExperts
    experts = next(((m.num_experts, m.intermediate_dim) for m in model.modules() if isinstance(m, QLoRAExperts)), None)
    shared = max((o for n, _, o, _ in linears if "shared_expert" in n and n.endswith("up_proj")), default=0)
    return dict(linears=linears, other=other, embedding_numel=emb.weight.numel(),
                tied=head is not None and head.weight is emb.weight, experts=experts, shared_intermediate=shared)


def count_model(config, rank: int = 64, target: str = "all-linear", quant_type: str | None = "nf4",
                blocksize: int = 64, double_quant: bool = True, dtype: str = "bf16", device: str = "cuda",
                lora_dtype: str = "fp32", dora: bool = False) -> dict:
    """Exact bytes of the frozen model and the LoRA tensors as :func:`qlora.model.build_random` /
    ``load_model`` create them (``device="cpu"`` shares the code tables between layers; on a GPU
    each layer holds its own). Also lists the LoRA tensor sizes (for the optimizer). LoRA factors
    are fp32 by default; ``lora_dtype="bf16"`` halves them and their gradients (the QLoRA paper's
    65B setting), the optimizer states stay fp32. ``dora``: each adapted linear also trains a magnitude
    per output row (in the LoRA dtype) and keeps its base's squared row norms in fp32
    (qlora.linear.QLoRALinear._dora_wn2); ``adapted_out``: the output width summed over the adapted linears of
    one block (what DoRA's forward saves per token; 0 without DoRA)."""
    from .model import _BLOCK_PREFIX, parse_dtype, select_targets
    dt, ldt = parse_dtype(dtype), parse_dtype(lora_dtype)
    if not is_int(rank) or rank < 0:
        raise QLoraError(f"LoRA rank must be an integer >= 0, got {rank!r}")
    if not is_int(blocksize) or blocksize < 1:
        raise QLoraError(f"blocksize must be a positive integer, got {blocksize!r}")
    summ = _summary(config.to_json_string(use_diff=True), config.model_type, dtype)
    names = [n for n, *_ in summ["linears"]]
    targets = select_targets(names, target) if rank > 0 else set()
    out = dict(weights_4bit=0, dq_constants=0, frozen_16bit=summ["other"], lora_params=0, quantized_params=0,
               lora_numels=[], largest_linear=0, layers=int(config.num_hidden_layers), tied=summ["tied"],
               input_embedding=_nbytes(summ["embedding_numel"], dt), adapted_out=0, block_16bit=0)
    streamed: dict[str, int] = {}  # block prefix -> its base tensors' bytes in a weight-streaming buffer
    for n, fan_in, fan_out, bias in summ["linears"]:
        k = fan_in * fan_out
        out["largest_linear"] = max(out["largest_linear"], k)
        block = _BLOCK_PREFIX.match(n).group(1)
        streamed[block] = streamed.get(block, 0) + streamed_linear_bytes(k, fan_out, bias, quant_type, blocksize,
                                                                         double_quant, dt)
        out["block_16bit"] += _nbytes(fan_out, dt) if bias else 0
        if quant_type is None:
            out["frozen_16bit"] += _nbytes(k, dt)
            out["block_16bit"] += _nbytes(k, dt)
        else:
            out["quantized_params"] += k
            out["weights_4bit"] += (k + 1) // 2             # two codes per byte
            nb = -(-k // blocksize)
            if double_quant:                                # uint8 scales (padded to 256), fp32 nested scales
                out["dq_constants"] += -(-nb // 256) * 256 + 4 * -(-nb // 256)
                out["dq_constants"] += (64 + 1024) if device != "cpu" else 0
            else:
                out["dq_constants"] += 4 * nb + (64 if device != "cpu" else 0)
        if bias:
            out["frozen_16bit"] += _nbytes(fan_out, dt)
        if n in targets:
            out["lora_numels"] += [rank * fan_in, fan_out * rank] + ([fan_out] if dora else [])
            out["adapted_out"] += fan_out
            out["frozen_16bit"] += 4 * fan_out if dora else 0  # the base's squared row norms, fp32
    if quant_type is not None and device == "cpu":         # code tables shared by all layers
        out["dq_constants"] += 64 + (1024 if double_quant else 0)
    out["largest_block"] = max(streamed.values(), default=0)  # weight streaming: one slot
    out["blocks_bytes"] = sum(streamed.values())  # weight streaming: the host buffers
    out["lora_params"] = _nbytes(sum(out["lora_numels"]), ldt)
    out["adapted_out"] = out["adapted_out"] // max(1, out["layers"]) if dora else 0
    # a checkpointed block can keep its MLP gate/up outputs for the recompute (offload.enable_checkpointing's
    # keep_gemms) where both carry a plain (not DoRA) adapter
    out["gemms_keepable"] = not dora and all(any(n.endswith(f"mlp.{p}") for n in targets) for p in ("gate_proj", "up_proj"))
    out["vocab"] = int(config.vocab_size)
    out["hidden"] = int(config.hidden_size)
    out["intermediate"] = int(getattr(config, "intermediate_size", 4 * config.hidden_size))
    out["routed_k"] = out["experts"] = 0
    if summ["experts"] is not None:  # MoE: a token's MLP activations are those of its top-k experts (+ shared)
        out["experts"], k = summ["experts"][0], int(getattr(config, "num_experts_per_tok", 1))
        out["routed_k"] = k
        out["intermediate"] = k * summ["experts"][1] + summ["shared_intermediate"]
    heads = int(config.num_attention_heads)
    out["head_dim"] = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return out


def streamed_linear_bytes(k: int, fan_out: int, bias: bool, quant_type: str | None, blocksize: int,
                          double_quant: bool, dtype) -> int:
    """Bytes one block linear with ``k`` weights takes in a weight-streaming buffer (qlora.stream: each base tensor
    at an aligned offset, the code tables per layer): packed codes ``ceil(k/2)`` and the code table (16 fp32),
    uint8 block scales ``ceil(k/blocksize)`` with their fp32 second-level scales (one per 256) and the 256-entry
    fp32 table of DQ (fp32 scales without DQ), or a 16-bit weight where not quantized; the bias."""
    from .stream import aligned
    if quant_type is None:
        n = aligned(_nbytes(k, dtype))
    else:
        nb = -(-k // blocksize)
        n = aligned((k + 1) // 2) + aligned(64)  # codes, code table
        n += aligned(nb) + aligned(4 * -(-nb // 256)) + aligned(1024) if double_quant else aligned(4 * nb)
    return n + (aligned(_nbytes(fan_out, dtype)) if bias else 0)


def counts_for(config, rank: int = 64, target: str = "all-linear", quant_type: str | None = "nf4",
               blocksize: int = 64, double_quant: bool = True, lora_dtype: str = "fp32", dora: bool = False,
               **_) -> dict:
    """:func:`count_model` with the keyword arguments of :func:`estimate` (others ignored)."""
    return count_model(config, rank, target, quant_type, blocksize, double_quant, lora_dtype=lora_dtype, dora=dora)


def optimizer_state_bytes(lora_numels: list[int], optim: str) -> int:
    """Bytes of AdamW moment state for LoRA tensors of these sizes (see qlora.optim)."""
    if optim not in OPTIMS:
        raise QLoraError(f"unknown optimizer {optim!r}: choose one of {', '.join(OPTIMS)}")
    if not optim.endswith("8bit"):
        return 8 * sum(lora_numels)
    return sum(2 * n + 8 * -(-n // 256) if n >= 4096 else 8 * n for n in lora_numels)


# ---------------------------------------------------------------------------------------------
# the estimate


def estimate(config, seq: int, batch: int, rank: int = 64, optim: str = "paged_adamw", *,
             quant_type: str | None = "nf4", blocksize: int = 64, double_quant: bool = True,
             target: str = "all-linear", dropout: float = 0.0, grad_checkpointing: bool = True,
             offload: bool | int = False, embed_offload: bool = False, gpu_mem: int | None = None,
             page_budget: int | None = None, lora_dtype: str = "fp32", first_step: bool = False,
             counts: dict | None = None, fused_dropout: bool | None = None, keep_blocks: int = 0,
             mlp_tiling: bool = True, dora: bool = False, keep_gemms: int = 0, offload_weights: bool = False) -> dict:
    """Predicted peak of ``torch.cuda.max_memory_allocated`` for one training step (bytes).

    Returns ``{"peak", "phase", "components": {name: bytes}, "details": {...}, "host": {...}}``
    where the components sum to the peak; ``phase`` says which moment of the step it is
    (``loss backward``, ``block backward`` or ``optimizer step``); ``host`` holds what sits in
    CPU memory (offloaded activations, paged optimizer states). With a paged optimizer and
    ``gpu_mem``, states stay on the GPU only as far as they fit (see :func:`page_budget`); an
    explicit ``page_budget`` (the optimizer's ``page_budget_bytes``) caps them instead.
    ``offload``: the checkpointed blocks' inputs wait in pinned CPU memory, True all of them, an integer K the
    first K (:func:`offloaded_count`; ``settings["offload_blocks"]`` is that count).
    ``embed_offload``: the input embedding table sits in CPU memory
    (:func:`qlora.offload.offload_embeddings`; ignored for tied embeddings). ``lora_dtype``: see
    :func:`count_model`. ``first_step``: the first step, whose forward and backward run before
    any optimizer state exists. ``counts``: a :func:`count_model` result to reuse. ``fused_dropout``:
    LoRA dropout runs inside the LoRA products (``qlora train`` on a GPU with 16-bit compute) and keeps
    no dropped copy of each input; False: it does (CPU, fp32 compute); None: fused unless
    ``QLORA_FUSED_DROPOUT=0``. ``keep_blocks``: with checkpointing, the last K blocks keep all their
    activations (no recompute; :func:`activation_model`). ``mlp_tiling``: long micro-batches run the MLP
    over chunks of tokens, as ``qlora train`` does (:func:`tiled_rows`); False: never (the untiled model).
    ``keep_gemms``: of the checkpointed blocks, this many keep their MLP gate/up outputs for the recompute
    (:func:`activation_model`). ``dora``: DoRA adapters (:func:`count_model`): every adapted linear also saves its 16-bit output before the
    magnitude scaling (for the magnitude's gradient), in each kept block and in the block being back-propagated;
    with LoRA dropout (peft's form, qlora.linear.QLoRALinear._dora_forward_dropout) two outputs (the base's and
    the LoRA product's on the dropped input; the dropped input replaces the input plain LoRA saves).
    ``offload_weights``: the blocks' frozen base tensors are streamed from pinned CPU memory (qlora.stream), True
    every block's, an integer K those of K blocks (:func:`streamed_blocks`): on the device :data:`STREAM_SLOTS`
    slots of the largest block's bytes (component ``weight_slots``) instead of those blocks' 4-bit weights, DQ
    constants and 16-bit tensors (biases, a 16-bit base); ``host["weights"]`` is what waits in CPU memory;
    ``settings["streamed_blocks"]`` the count. The streamed blocks must be checkpointed (at most ``L - K``
    blocks kept).
    """
    for name, v in (("seq", seq), ("batch", batch)):
        if not is_int(v) or v < 1:
            raise QLoraError(f"{name} must be a positive integer, got {v!r}")
    if optim not in OPTIMS:
        raise QLoraError(f"unknown optimizer {optim!r}: choose one of {', '.join(OPTIMS)}")
    if not 0.0 <= dropout < 1.0:
        raise QLoraError(f"LoRA dropout must be in [0, 1), got {dropout}")
    c = counts or count_model(config, rank, target, quant_type, blocksize, double_quant, lora_dtype=lora_dtype,
                              dora=dora)
    n_tok, h, i, L, v = batch * seq, c["hidden"], c["intermediate"], c["layers"], c["vocab"]
    n_stream = streamed_count(offload_weights, L)
    if n_stream and (not grad_checkpointing or n_stream > L - keep_blocks):
        raise QLoraError("streamed block weights (--offload-weights) need their blocks recomputed in backward: "
                         f"gradient checkpointing on and no more blocks kept than are not streamed ({L - n_stream})")
    grads = c["lora_params"]  # one gradient per LoRA parameter, in its dtype
    states = optimizer_state_bytes(c["lora_numels"], optim)
    eight = 8 if optim.endswith("8bit") else 32

    # activations
    rope = n_tok * c["head_dim"] * 2 * 2          # cos and sin, 16-bit, shared by all blocks
    if fused_dropout is None:
        fused_dropout = switches().fused_dropout
    # MoE (not calibrated): each of a token's k routed copies has its gathered 16-bit input and weighted output
    # alive in the block, and the router keeps its logits and fp32 probabilities
    routed = n_tok * (c.get("routed_k", 0) * 4 * h + c.get("experts", 0) * 6)
    act = activation_model(c, n_tok, L if not grad_checkpointing else keep_blocks, offload,
                           unfused_dropout=dropout > 0 and rank > 0 and not fused_dropout, routed=routed,
                           tile=mlp_tiling, dora_per_token=2 * c["adapted_out"] * (2 if dropout > 0 else 1),
                           gemms=keep_gemms if grad_checkpointing and c.get("gemms_keepable") else 0)
    keep_blocks, offloaded, saved_all, block = act["keep"], act["offload"], act["saved"], act["one_block"]
    tail = int(n_tok * h * ACT["tail_h"])
    host_act = act["host"] + (n_tok * h * 6 if offloaded else 0)  # the tail's saved tensors (they come back for
    # the loss backward, so its peak does not change)

    ce_rows = min(n_tok, max(1, CE_CHUNK_ELEMENTS // v))
    ce = ce_rows * v * CE_BYTES_PER_LOGIT
    dequant = int(DEQUANT_AT_PEAK * 2 * c["largest_linear"]) if quant_type is not None else 0

    host_emb = c["input_embedding"] if embed_offload and not c["tied"] else 0

    # weight streaming: the streamed blocks' base tensors wait in host memory, the device holds the slots and
    # the other blocks' (the blocks are alike: each holds 1/L of the quantized weights)
    slots = STREAM_SLOTS * c["largest_block"] if n_stream else 0
    left = (L - n_stream) / L
    on_device = dict(weights_4bit=int(c["weights_4bit"] * left), dq_constants=int(c["dq_constants"] * left),
                     frozen_16bit=int(c["frozen_16bit"] - c["block_16bit"] * (1 - left) - host_emb))

    def phases(resident_states: int) -> list[tuple[str, dict]]:
        base = dict(on_device, weight_slots=slots, lora_params=c["lora_params"],
                    optimizer_states=0 if first_step else resident_states)
        # backward through the blocks: inputs are freed and gradients appear block by block;
        # the sum is largest at one end (first block processed, or last)
        _, g_b, s_b, t_b = max((s + grads * n // L + t, grads * n // L, s, t) for s, n, t in act["moments"])
        paged_chunk = 2 * PAGED_CHUNK if optim.startswith("paged") and resident_states < states else 0
        return [
            ("loss backward", dict(base, gradients=0, activations=saved_all + tail + rope,
                                   workspace=CUDA_WORKSPACE + ce)),
            ("block backward", dict(base, gradients=g_b, activations=s_b + rope + t_b,
                                    workspace=CUDA_WORKSPACE + dequant)),
            ("optimizer step", dict(base, optimizer_states=resident_states, gradients=grads, activations=0,
                                    workspace=CUDA_WORKSPACE + OPT_WORKSPACE[eight] + paged_chunk)),
        ]

    resident = states
    if optim.startswith("paged") and page_budget is not None:
        resident = min(states, max(0, page_budget))
    elif optim.startswith("paged") and gpu_mem is not None:
        without = max(sum(comp.values()) for _, comp in phases(0))
        resident = max(0, min(states, usable_bytes(gpu_mem) - without))
    phase, comps = max(phases(resident), key=lambda pc: sum(pc[1].values()))
    comps = {k: int(b) for k, b in comps.items()}
    return dict(peak=sum(comps.values()), phase=phase, components=comps,
                details=dict(tokens=n_tok, saved_block_inputs=saved_all, saved_outside_blocks=tail + rope,
                             one_block=block, mlp_chunk_tokens=act["tile_rows"], dequantized_weight=dequant,
                             loss_chunk=ce,
                             lora_parameters=sum(c["lora_numels"]), quantized_parameters=c["quantized_params"],
                             optimizer_states_total=states),
                host=dict(activations=int(host_act), optimizer_states=states - resident, embeddings=host_emb,
                          weights=int(c["blocks_bytes"] * n_stream / L)),
                settings=dict(seq=seq, batch=batch, rank=rank, optim=optim, quant_type=quant_type, target=target,
                              dropout=dropout, grad_checkpointing=grad_checkpointing, offload=bool(offloaded),
                              offload_blocks=offloaded, layers=L,
                              keep_blocks=keep_blocks, keep_gemms=act["gemms"], mlp_tiled=bool(act["tile_rows"]),
                              embed_offload=bool(host_emb), lora_dtype=lora_dtype, dora=bool(dora),
                              offload_weights=bool(n_stream), streamed_blocks=n_stream))


def tiled_rows(c: dict, n_tok: int) -> int:
    """Tokens per chunk of the sequence-tiled MLP on micro-batches of ``n_tok`` tokens (qlora.tiled's rule),
    0 when untiled. Dense models only: a mixture of experts is modelled untiled."""
    if c.get("experts"):
        return 0
    from .tiled import tile_rows
    return min(n_tok, tile_rows(n_tok, c["intermediate"]))


def _count(value: bool | int, total: int, what: str) -> int:
    """``value`` as a count of ``total`` (True: all, False/None: none, K: K); a bad value is one line naming
    ``what``."""
    if isinstance(value, bool) or value is None:
        return total if value else 0
    if not is_int(value) or not 0 <= value <= total:
        raise QLoraError(f"{what} must be True, False or a count in [0, {total}], got {value!r}")
    return int(value)


def streamed_count(offload_weights: bool | int, layers: int) -> int:
    """How many of ``layers`` blocks ``offload_weights`` (True: all, False: none, K: K) streams."""
    return _count(offload_weights, layers, "streamed blocks")


def streamed_blocks(layers: int, n: int, keep: int = 0) -> list[int]:
    """Which ``n`` of ``layers`` blocks stream their weights: spread evenly over the first ``layers - keep`` (the
    checkpointed ones), so that a resident block's compute can hide the next streamed block's copy."""
    room = layers - keep
    if not 0 <= n <= room:
        raise QLoraError(f"{n} streamed blocks do not fit among {room} checkpointed ones")
    return [j * room // n for j in range(n)] if n else []


def offloaded_count(offload: bool | int, checkpointed: int) -> int:
    """How many of ``checkpointed`` blocks ``offload`` (True: all, False: none, K: K) sends to CPU memory."""
    return _count(offload, checkpointed, "blocks whose inputs go to CPU memory (of the checkpointed ones)")


def activation_model(c: dict, n_tok: int, keep: int, offload: bool, unfused_dropout: bool = False,
                     routed: int = 0, tile: bool = True, dora_per_token: int = 0, gemms: int = 0) -> dict:
    """Activation bytes of a step whose last ``keep`` blocks keep all their activations (no recompute)
    and whose other ``L - keep`` blocks are checkpointed (their inputs, ``N*H*2`` bytes each, in pinned
    host memory with ``offload``: True all, an integer K the first K of them, :func:`offloaded_count`).
    ``keep = L`` is no checkpointing at all.

    A kept block saves ``N*(saved_h*H + saved_i*I)`` bytes (:data:`ACT`; counted from first principles,
    see :func:`kept_block_bytes_per_token`, and to be calibrated on a GPU). Returns ``saved`` (what is
    alive at the loss backward), ``host`` (offloaded), ``one_block`` (the backward transient of a
    checkpointed block, or of a kept one when all are kept) and ``moments``: ``(saved, blocks with
    gradients, transient)`` at the candidates for the peak of the backward through the blocks, the
    block processed first (the last, kept), the first checkpointed one (the kept ones freed) and block 0.
    ``routed``: a mixture-of-experts block's extra transient bytes (its routed copies, the router's outputs).
    ``tile``: model the sequence-tiled MLP where the runtime tiles (:func:`tiled_rows`; the comment at
    :data:`ACT`); ``tile_rows`` in the result is its chunk (0: untiled). ``dora_per_token``: what DoRA's
    linears save per token, more in every kept block and in the block being back-propagated (with the tiled
    MLP an upper bound: its linears' tensors live one chunk at a time). ``gemms``: of the ``L - keep``
    checkpointed blocks, the ones just below the kept ones (backward reaches them first) keep their MLP gate
    and up outputs, ``N*4*I`` bytes each, until their recompute (counted, not calibrated; none when tiled: the
    tiled MLP's recompute stops before its chunks and keeps nothing).
    """
    L, h, i = c["layers"], c["hidden"], c["intermediate"]
    if not is_int(keep) or not 0 <= keep <= L:
        raise QLoraError(f"blocks kept without recompute must be in [0, {L}], got {keep!r}")
    if not is_int(gemms) or not 0 <= gemms <= L - keep:
        raise QLoraError(f"blocks keeping their MLP GEMMs must be in [0, {L - keep}], got {gemms!r}")
    n_off = offloaded_count(offload, L - keep)    # (offload without checkpointing is not modelled)
    rows = tiled_rows(c, n_tok) if tile else 0
    per_i = 0 if rows else n_tok                  # tokens whose MLP intermediates are alive at once, per term
    chunk = rows * ACT["block_i"] * i             # a tiled MLP's chunk (its recompute and backward)
    kept = n_tok * ACT["saved_h"] * h + per_i * ACT["saved_i"] * i
    inp = n_tok * h * 2                           # a checkpointed block's input
    ckpt = n_tok * ACT["block_h"] * h + per_i * ACT["block_i"] * i + chunk
    copies = 2 * inp                              # an offloaded block's backward: its input back + the next prefetched
    nockpt = n_tok * ACT["nockpt_block_h"] * h + per_i * ACT["nockpt_block_i"] * i + chunk
    drop = (n_tok * ACT["dropout_h"] * h + per_i * ACT["dropout_i"] * i) * max(keep, 1) if unfused_dropout else 0
    drop += routed
    dora = n_tok * dora_per_token
    kept, ckpt, nockpt = kept + dora, ckpt + dora, nockpt + dora
    stash = gemms * per_i * 4 * i                 # gate and up outputs (16-bit) of the blocks keeping their GEMMs
    resident = (L - keep - n_off) * inp           # the inputs on the device (the offloaded ones are the first blocks)
    saved = int(keep * kept + resident + stash)
    moments = []
    if keep:
        moments.append((saved, 1, int(nockpt + drop)))
    if keep == L:
        moments.append((saved // L, L, int(nockpt + drop)))
    else:  # the first checkpointed block (offloaded only when all are), and block 0 (offloaded when any is)
        all_off = n_off == L - keep
        moments += [(int(resident + stash), keep + 1, int(ckpt + drop + (copies if all_off else 0))),
                    (int(0 if n_off else inp), L, int(ckpt + drop + (copies if n_off else 0)))]
    return dict(keep=keep, offload=n_off, saved=saved, moments=moments, tile_rows=rows, gemms=gemms if per_i else 0,
                one_block=int((nockpt if keep == L else ckpt + (copies if n_off else 0)) + drop),
                host=int(n_off * inp))


def kept_block_bytes_per_token(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
                               rank: int = 0, targets: int = 7) -> float:
    """Bytes per token a Llama block saves for backward when it is not checkpointed, counted tensor by
    tensor (bf16 compute, SDPA, QLoRA linears that save only their input):
    fp32 RMSNorm input 4H, its per-token rsqrt (4), and the normed 16-bit output 2H (saved once for
    q/k/v); RoPE'd q and k, v, the attention output (also o_proj's input: SDPA's output layout makes the
    head merge a view) and its logsumexp (fp32 per head); again 4H + 4 + 2H for the second norm; gate
    and up outputs, silu(gate) and the product (2I each); the LoRA intermediates x@A (r per adapted
    linear, 16-bit). For Llama-3-8B (GQA 4:1) that is 17H + 8I + small terms. A CPU test checks this
    count against the tensors autograd actually saves; on a GPU the fused kernels save less, and the
    estimate uses :data:`ACT` ``saved_h``/``saved_i`` as measured there (14.3H + 6I)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * heads
    norms = 2 * (4 * hidden + 4 + 2 * hidden)
    return norms + attn + 8 * intermediate + 2 * rank * targets


def usable_bytes(gpu_mem: int, context: int = CONTEXT_BYTES) -> int:
    """Of a GPU's ``gpu_mem`` bytes, what torch can allocate at its peak: minus the CUDA
    context, divided by (1 + allocator slack)."""
    return int((gpu_mem - context) / (1 + SLACK))


def required_bytes(est: dict, context: int = CONTEXT_BYTES) -> int:
    """GPU memory a run needs: its predicted peak plus slack and the CUDA context."""
    return int(est["peak"] * (1 + SLACK) + context)


HOST_PARTS = {"activations": "offloaded activations", "weights": "streamed block weights",
              "optimizer_states": "paged-out optimizer state", "embeddings": "input embeddings"}


def host_parts(host: dict) -> str:
    """``est["host"]`` in words: its non-zero parts with their sizes."""
    return "; ".join(f"{HOST_PARTS[k]} {v / GiB:.1f} GiB" for k, v in host.items() if v)


def host_bytes(est: dict) -> int:
    """CPU memory an estimated run fills beside the model's own load: offloaded activations, streamed block weights,
    paged-out optimizer state and an input embedding table kept there (``est["host"]``)."""
    return int(sum(est["host"].values()))


def host_fits(est: dict, host_mem: int | None) -> bool:
    """Whether what an estimated run keeps in CPU memory (:func:`host_bytes`) fits ``host_mem`` (None: unchecked)."""
    return host_mem is None or host_bytes(est) <= host_mem


def fits(est: dict, gpu_mem: int, context: int = CONTEXT_BYTES) -> bool:
    return required_bytes(est, context) <= gpu_mem


def page_budget(config, seq: int, batch: int, gpu_mem: int, **kw) -> int:
    """Bytes of optimizer state a paged optimizer can keep on the GPU without pushing the step
    over ``gpu_mem`` (pass as ``page_budget_bytes``)."""
    kw = dict(kw, optim=kw.get("optim", "paged_adamw"), page_budget=None)
    if not kw["optim"].startswith("paged"):
        kw["optim"] = "paged_" + kw["optim"]
    est = estimate(config, seq, batch, gpu_mem=gpu_mem, **kw)
    return est["components"]["optimizer_states"]


def max_fit(config, gpu_mem: int, seq: int | None = None, batch: int | None = None,
            context: int = CONTEXT_BYTES, limit: int = 1 << 22, host_mem: int | None = None, **kw) -> int:
    """Largest batch at ``seq`` (pass ``seq``) or longest sequence at ``batch`` (pass ``batch``;
    a multiple of 128 when above 128) that fits in ``gpu_mem`` (and, given ``host_mem``, whose CPU-memory
    parts fit that); 0 if none."""
    if (seq is None) == (batch is None):
        raise QLoraError("max_fit: give exactly one of seq and batch")
    kw.setdefault("counts", counts_for(config, **kw))

    def ok(x: int) -> bool:
        s, b = (seq, x) if seq is not None else (x, batch)
        est = estimate(config, s, b, gpu_mem=gpu_mem, **kw)
        return fits(est, gpu_mem, context) and host_fits(est, host_mem)

    lo, hi = 0, 1
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    if batch is not None and lo > 128:
        lo -= lo % 128
    return lo


# ---------------------------------------------------------------------------------------------
# advice


def _gib(b: float) -> str:
    return f"{b / GiB:.1f} GiB"


def suggestions(config, seq: int, batch: int, gpu_mem: int, context: int = CONTEXT_BYTES, **kw) -> list[str]:
    """Changes (each alone) that make the run fit in ``gpu_mem``, best first."""
    kw.setdefault("counts", counts_for(config, **kw))
    out = []

    def ok(**change) -> bool:
        k = dict(kw, **change)
        s, b = k.pop("seq", seq), k.pop("batch", batch)
        return fits(estimate(config, s, b, gpu_mem=gpu_mem, **k), gpu_mem, context)

    b = max_fit(config, gpu_mem, seq=seq, context=context, **kw)
    if 1 <= b < batch:
        out.append(f"a smaller batch: --batch-size {b} (with --grad-accum x{math.ceil(batch / b)} to keep the "
                   f"effective batch)")
    s = max_fit(config, gpu_mem, batch=batch, context=context, **kw)
    if 1 <= s < seq:
        out.append(f"shorter sequences: --max-length {s}")
    if kw.get("grad_checkpointing", True) is False and ok(grad_checkpointing=True):
        out.append("gradient checkpointing: --grad-checkpointing true")
    if not kw.get("offload", False) and ok(offload=True, grad_checkpointing=True):
        out.append("activation offload to CPU memory: --offload-activations true")
    if not kw.get("offload_weights", False) and ok(offload_weights=True, grad_checkpointing=True):
        out.append("the blocks' frozen weights streamed from CPU memory: --offload-weights true")
    if not kw.get("embed_offload", False) and ok(embed_offload=True):
        out.append("the input embedding table in CPU memory: --offload-embeddings true")
    if kw.get("optim", "paged_adamw") != "paged_adamw8bit" and ok(optim="paged_adamw8bit"):
        out.append("paged 8-bit optimizer states: --optim paged_adamw8bit")
    if kw.get("dropout", 0.0) > 0 and ok(dropout=0.0):
        out.append("no LoRA dropout: --dropout 0")
    rank = kw.get("rank", 64)
    for r in (32, 16, 8):
        if r < rank and ok(rank=r, counts=None):
            out.append(f"a lower LoRA rank: --rank {r}")
            break
    return out


def check_fits(config, seq: int, batch: int, gpu_mem: int, context: int = CONTEXT_BYTES, **kw) -> str | None:
    """None if the run fits in ``gpu_mem`` bytes, else a one-line message saying by how much it
    does not and what to change."""
    est = estimate(config, seq, batch, gpu_mem=gpu_mem, **kw)
    if fits(est, gpu_mem, context):
        return None
    need = required_bytes(est, context)
    msg = (f"this run needs about {_gib(need)} of GPU memory (peak {_gib(est['peak'])} at the {est['phase']}, "
           f"plus CUDA context and slack) but {_gib(gpu_mem)} is available")
    kw.pop("counts", None)
    tips = suggestions(config, seq, batch, gpu_mem, context, **kw)
    if tips:
        return msg + "; any of these would fit: " + "; ".join(tips)
    least = dict(kw, optim="paged_adamw8bit", offload=True, grad_checkpointing=True, dropout=0.0,
                 embed_offload=True, page_budget=0, offload_weights=True)
    floor = required_bytes(estimate(config, min(seq, 512), 1, **least), context)
    frozen = sum(est["components"][k] for k in ("weights_4bit", "dq_constants", "frozen_16bit", "weight_slots"))
    return (msg + f"; nothing simple fits: the frozen model alone takes {_gib(frozen)}, and even batch 1 x "
            f"{min(seq, 512)} tokens with offload, streamed block weights and paged 8-bit states needs "
            f"{_gib(floor)} — use a GPU with at least that much memory, or a smaller model")


def check_train_config(cfg, config=None, gpu_mem: int | None = None) -> str | None:
    """:func:`check_fits` for a :class:`qlora.train.TrainConfig` (``config``: the model's
    transformers config, read from ``cfg.model`` when None; ``gpu_mem``: the current CUDA
    device's total memory when None). Returns None on a CPU-only machine."""
    if gpu_mem is None:
        import torch
        if not torch.cuda.is_available():
            return None
        gpu_mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if config is None:
        config = model_config(cfg.model)
    return check_fits(config, cfg.max_length, rows_per_micro_batch(cfg), gpu_mem, **plan_kwargs(cfg))


def rows_per_micro_batch(cfg) -> int:
    """Sequences in one micro-batch of a :class:`qlora.train.TrainConfig`: preference methods (dpo, orpo) batch
    both answers of each of ``--batch-size`` pairs."""
    return cfg.batch_size * (2 if getattr(cfg, "method", "sft") in ("dpo", "orpo") else 1)


def plan_kwargs(cfg) -> dict:
    """:func:`estimate`'s settings of a :class:`qlora.train.TrainConfig` (its optimizer, LoRA, base
    and activation flags)."""
    return dict(rank=cfg.rank, optim=cfg.optim, quant_type=None if cfg.quant_type == "none" else cfg.quant_type,
                blocksize=cfg.blocksize, double_quant=cfg.double_quant, target=cfg.target, dropout=cfg.dropout,
                grad_checkpointing=cfg.grad_checkpointing, offload=getattr(cfg, "offload_activations", False),
                embed_offload=getattr(cfg, "offload_embeddings", False),
                page_budget=0 if getattr(cfg, "offload_optimizer", False) else None,
                fused_dropout=None if getattr(cfg, "compute_dtype", "bf16") in ("auto", "bf16", "fp16") else False,
                dora=bool(getattr(cfg, "dora", False)),
                offload_weights=str(getattr(cfg, "offload_weights", "false")).lower() == "true")


def model_config(src: str | None):
    """The transformers config of a model source (None: the embedded model), reading no weights.
    ``shape:NAME`` is a known shape, as ``qlora train --model shape:NAME`` takes it."""
    if src is None:
        return shape_config("embedded")
    if src.startswith("shape:"):
        return shape_config(src[len("shape:"):])
    from .sources import open_source
    return open_source(src).config


# ---------------------------------------------------------------------------------------------
# CLI

LABELS = [("weights_4bit", "4-bit weights (packed codes)"), ("dq_constants", "DQ constants (block scales)"),
          ("weight_slots", "streamed block slots"), ("frozen_16bit", "16-bit embeddings, head, norms"), ("lora_params", "LoRA parameters"),
          ("gradients", "LoRA gradients"), ("optimizer_states", "optimizer states"),
          ("activations", "activations"), ("workspace", "workspace")]


def _offload_words(s: dict) -> str:
    """``on``, ``off``, or ``on for K of the M checkpointed blocks' inputs`` (a budget's partial offload)."""
    n, m = s.get("offload_blocks", 0), s.get("layers", 0) - s.get("keep_blocks", 0)
    if not s["offload"]:
        return "off"
    return "on" if not m or n >= m else f"on for {n} of the {m} checkpointed blocks' inputs"


def _streamed_words(s: dict) -> str:
    n, layers = s.get("streamed_blocks", 0), s.get("layers", 0)
    if n and n < layers:
        return f", the weights of {n} of the {layers} blocks streamed from CPU memory"
    return ", block weights streamed from CPU memory"


def format_plan(est: dict, name: str, gpu_mem: int | None, context: int = CONTEXT_BYTES) -> list[str]:
    s, d, comps, host = est["settings"], est["details"], est["components"], est["host"]
    lines = [f"{name}: seq {s['seq']} x batch {s['batch']} ({d['tokens']} tokens), "
             f"{s['quant_type'] or '16-bit'} base ({d['quantized_parameters'] / 1e9:.2f}B quantized parameters), "
             f"LoRA r={s['rank']} on {s['target']} ({d['lora_parameters'] / 1e6:.1f}M), {s['optim']}, "
             f"checkpointing {'on' if s['grad_checkpointing'] else 'off'}"
             + (f" ({s['keep_blocks']} blocks kept without recompute)" if s["grad_checkpointing"] and s.get("keep_blocks")
                else "") + f", offload {_offload_words(s)}"
             + (", embeddings on CPU" if s["embed_offload"] else "")
             + (_streamed_words(s) if s.get("offload_weights") else "")]
    notes = {
        "optimizer_states": f"{host['optimizer_states'] / GiB:.2f} GiB paged out to CPU memory"
        if host["optimizer_states"] else "",
        "activations": (f"saved by the blocks {_gib(d['saved_block_inputs'])}, outside blocks "
                        f"{_gib(d['saved_outside_blocks'])}, one block {_gib(d['one_block'])}"
                        + (f" (MLP tiled, {d['mlp_chunk_tokens']} tokens a chunk)" if d.get("mlp_chunk_tokens") else "")
                        + (f"; {_gib(host['activations'])} offloaded to CPU" if host["activations"] else "")),
        "frozen_16bit": f"input embeddings in CPU memory ({_gib(host['embeddings'])})" if host["embeddings"] else "",
        "workspace": f"dequantized weight {_gib(d['dequantized_weight'])}, loss chunk {_gib(d['loss_chunk'])}",
        "weight_slots": f"{STREAM_SLOTS} x the largest block ({comps['weight_slots'] / STREAM_SLOTS / MiB:.1f} MiB); "
                        f"the blocks' {_gib(host['weights'])} in pinned CPU memory" if host.get("weights") else "",
    }
    for key, label in LABELS:
        if key == "weight_slots" and not s.get("offload_weights"):
            continue
        lines.append(f"  {label:<32} {comps[key] / GiB:8.2f} GiB  {notes.get(key, '')}".rstrip())
    lines.append(f"  {'predicted peak (at the ' + est['phase'] + ')':<32} {est['peak'] / GiB:8.2f} GiB  "
                 f"torch.cuda.max_memory_allocated")
    lines.append(f"  {'GPU memory needed':<32} {required_bytes(est, context) / GiB:8.2f} GiB  "
                 f"+{SLACK:.0%} allocator slack, +{_gib(context)} CUDA context")
    if host_bytes(est):
        lines.append(f"  {'CPU memory needed':<32} {host_bytes(est) / GiB:8.2f} GiB  {host_parts(host)}")
    return lines


def add_cli(sub) -> None:
    p = sub.add_parser("plan", help="predict the peak GPU memory of a training run, and whether it fits",
                       description="Predict the peak GPU memory of a QLoRA training step, broken down, from the "
                                   "model's config alone (no weights are read), and the CPU memory it keeps there; "
                                   "say whether it fits in --gpu-mem (and --host-mem) and the largest batch and "
                                   "sequence that do. Exit status 0: fits, 1: does not fit.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="SRC", help="model: HF dir, GGUF file, 4-bit checkpoint or Hub id "
                                                    "org/name[@revision] (config only), or shape:NAME (as --shape NAME)")
    src.add_argument("--shape", metavar="NAME", help=f"a known shape: {', '.join(SHAPES)} (default: embedded)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence (train's --max-length; default 1024)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (default 64)")
    p.add_argument("--target", default="all-linear", help="LoRA target layers (default all-linear)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05; > 0 costs memory)")
    p.add_argument("--optim", default="paged_adamw", choices=OPTIMS, help="optimizer (default paged_adamw)")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "none"], help="base weights")
    p.add_argument("--blocksize", type=int, default=64, help="quantization block size (default 64)")
    p.add_argument("--double-quant", default="true", choices=["true", "false"], help="DQ (default true)")
    p.add_argument("--grad-checkpointing", default="true", choices=["true", "false"],
                   help="per-block gradient checkpointing (default true)")
    p.add_argument("--offload", default="false", choices=["true", "false"],
                   help="offload checkpointed activations to CPU memory (default false)")
    p.add_argument("--offload-embeddings", default="false", choices=["true", "false"],
                   help="keep the input embedding table in CPU memory (untied embeddings; default false)")
    p.add_argument("--offload-optimizer", default="false", choices=["true", "false"],
                   help="paged optimizer state in CPU memory between steps (train's --offload-optimizer; default false)")
    p.add_argument("--offload-weights", default="auto", choices=["auto", "true", "false"],
                   help="stream the blocks' frozen weights from pinned CPU memory, two blocks on the GPU at a time "
                        "(train's --offload-weights): true plans the run so; auto (default) plans it without, and "
                        "--memory-budget may choose it when nothing else fits")
    p.add_argument("--lora-dtype", default="fp32", choices=["fp32", "bf16"], help="LoRA factors' dtype (default fp32)")
    p.add_argument("--dora", default="false", choices=["true", "false"],
                   help="DoRA adapters (train's --dora): a magnitude per output row, and each adapted linear's output "
                        "saved for its gradient (default false)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="print the policy `qlora train --memory-budget` would choose for this budget (auto: this "
                        "machine's free GPU memory): blocks kept without recompute, offload, optimizer paging")
    p.add_argument("--gpu-mem", metavar="SIZE", help="GPU memory, e.g. 24GiB, 80GB (default: this machine's GPU)")
    p.add_argument("--host-mem", metavar="SIZE|auto",
                   help="CPU memory the run may fill (offloaded activations, streamed weights, paged-out optimizer "
                        "state), e.g. 64GiB, or auto (this machine's available memory): the run, the largest batch "
                        "and longest sequence and --memory-budget's policy must fit it too (default: not checked; the "
                        "plan prints what is needed)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.model:
        config = model_config(args.model)
        name = getattr(config, "qlora_shape", None) or args.model
    else:
        config = shape_config(args.shape or "embedded")
        name = config.qlora_shape
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
    host_mem = _host_mem(args.host_mem)
    if gpu_mem is None:
        import torch
        if torch.cuda.is_available():
            gpu_mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if args.rank < 0 or args.blocksize < 1:
        raise QLoraError("--rank must be >= 0 and --blocksize >= 1")
    kw = dict(rank=args.rank, optim=args.optim, quant_type=None if args.quant_type == "none" else args.quant_type,
              blocksize=args.blocksize, double_quant=args.double_quant == "true", target=args.target,
              dropout=args.dropout,  # (streamed weights need every block recomputed: true turns checkpointing on)
              grad_checkpointing=args.grad_checkpointing == "true" or args.offload_weights == "true",
              offload=args.offload == "true", embed_offload=args.offload_embeddings == "true",
              lora_dtype=args.lora_dtype, dora=args.dora == "true", offload_weights=args.offload_weights == "true")
    if args.offload_optimizer == "true":
        from .optim import check_offload
        check_offload(args.optim, True)
        kw["page_budget"] = 0
    kw["counts"] = counts_for(config, **kw)
    if args.memory_budget:
        return _run_budget(args, config, name, kw, host_mem)
    est = estimate(config, args.seq, args.batch, gpu_mem=gpu_mem, **kw)
    host_ok = host_fits(est, host_mem)
    ok = None if gpu_mem is None else fits(est, gpu_mem) and host_ok
    if args.json:
        out = {k: est[k] for k in ("peak", "phase", "components", "details", "host", "settings")}
        out.update(required=required_bytes(est), gpu_mem=gpu_mem, fits=ok, host_required=host_bytes(est),
                   host_mem=host_mem)
        if gpu_mem is not None:
            out["max_batch"] = max_fit(config, gpu_mem, seq=args.seq, host_mem=host_mem, **kw)
            out["max_seq"] = max_fit(config, gpu_mem, batch=args.batch, host_mem=host_mem, **kw)
        print(json.dumps(out))
        return 0 if ok in (None, True) and host_ok else 1
    for line in format_plan(est, name, gpu_mem):
        print(line)
    if not host_ok:
        print(f"does NOT fit in --host-mem {_gib(host_mem)} of CPU memory: it needs {_gib(host_bytes(est))} there "
              f"({host_parts(est['host'])}); --memory-budget offloads only what must leave the GPU")
        return 1
    if gpu_mem is None:
        need = required_bytes(est)
        print(f"no --gpu-mem given and no GPU here: a GPU with at least {_gib(need)} is needed")
        return 0
    mb = max_fit(config, gpu_mem, seq=args.seq, host_mem=host_mem, **kw)
    ms = max_fit(config, gpu_mem, batch=args.batch, host_mem=host_mem, **kw)
    if ok:
        room = f"headroom {_gib(gpu_mem - required_bytes(est))}"
        if est["host"]["optimizer_states"]:
            room = (f"{_gib(est['host']['optimizer_states'])} of the optimizer states paged to CPU memory, the rest "
                    f"fills the room")
        print(f"fits in {_gib(gpu_mem)} ({room}); largest batch at seq {args.seq}: {mb}; longest sequence at "
              f"batch {args.batch}: {ms}")
        return 0
    kw.pop("counts")
    print(f"does NOT fit in {_gib(gpu_mem)}: " + check_fits(config, args.seq, args.batch, gpu_mem, **kw))
    return 1


def _host_mem(value: str | None) -> int | None:
    """``--host-mem``: a size, ``auto`` (this machine's available CPU memory), or None (not checked)."""
    if value is None:
        return None
    if value.strip().lower() == "auto":
        from .budget import host_available
        return host_available()
    return parse_size(value)


def _run_budget(args, config, name: str, kw: dict, host_mem: int | None = None) -> int:
    """`qlora plan --memory-budget`: the policy train would choose, and the estimate of the run with it."""
    from .budget import auto_budget, choose, parse_budget
    value = parse_budget(args.memory_budget)
    if value == "off":
        raise QLoraError("qlora plan --memory-budget: give a size like 24GiB (or auto on a machine with a GPU)")
    if value == "auto":
        import torch
        if not torch.cuda.is_available():
            raise QLoraError("qlora plan --memory-budget auto needs a GPU here: give a size like 24GiB")
        value = auto_budget(torch.device("cuda", torch.cuda.current_device()))
    kw = dict(kw)
    forced = True if kw.pop("offload") else None
    kw.pop("offload_weights")
    stream = {"true": True, "false": False}.get(args.offload_weights)
    policy = choose(config, args.seq, args.batch, value, checkpointing=kw.pop("grad_checkpointing") or bool(stream),
                    offload=forced, stream=stream, host_mem=host_mem, **kw)
    est = estimate(config, args.seq, args.batch, gpu_mem=value, keep_blocks=policy.keep, keep_gemms=policy.gemms,
                   offload=policy.offload, grad_checkpointing=True, offload_weights=policy.stream, **kw)
    if args.json:
        out = {k: est[k] for k in ("peak", "phase", "components", "details", "host", "settings")}
        out.update(required=required_bytes(est), memory_budget=value,
                   policy=dict(keep=policy.keep, gemms=policy.gemms, layers=policy.layers, offload=policy.offload,
                               page_budget=policy.page_budget, states_on_host=policy.states_on_host,
                               offload_weights=policy.stream))
        print(json.dumps(out))
        return 0
    for line in format_plan(est, name, value):
        print(line)
    print(policy.describe())
    return 0
