"""Turn a Hugging Face causal LM into a QLoRA model, without subclassing it.

The model's skeleton is built on the ``meta`` device (no memory), then filled tensor by tensor
from a :class:`qlora.sources.Source`: every ``nn.Linear`` inside the transformer blocks becomes a
:class:`QLoRALinear` quantized on the target device as soon as its weight is read, so the full
model never exists in 16-bit; embeddings, norms and lm_head stay in ``dtype`` (bf16 default),
frozen. LoRA factors go on the layers chosen by a filter (``all-linear`` or names such as
``q_proj,v_proj``); the other block linears are frozen 4-bit layers without adapter.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import moe, nf4
from .compat import set_module_tensor
from .errors import QLoraError
from .linear import QLoRALinear
from .settings import switches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class QuantSettings:
    quant_type: str | None = "nf4"  # nf4 | fp4 | int4 | None (16-bit LoRA, same code path)
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: resolved for the device the model is built on (qlora.hardware)


@dataclass
class LoraSettings:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target: str = "all-linear"
    rslora: bool = False
    init: str = "gaussian"  # gaussian (A Kaiming-uniform, B = 0) | loftq | pissa (qlora.variants)
    loftq_iters: int = 1
    dora: bool = False


def resolve_dtypes(quant: QuantSettings, dtype: str | torch.dtype, device) -> tuple[QuantSettings, torch.dtype]:
    """``quant`` with its compute dtype and ``dtype`` (the unquantized tensors') resolved for ``device``
    where they say ``auto`` (qlora.hardware: what the device runs fast)."""
    from .hardware import resolve
    if quant.compute_dtype == "auto":
        quant = dataclasses.replace(quant, compute_dtype=resolve("auto", device).dtype)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = resolve("auto", device).dtype
    return quant, parse_dtype(dtype)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise QLoraError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------
# choosing and swapping layers

_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")  # a module under a numbered block (layers.N.)
_BLOCK_PREFIX = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the transformer blocks (lm_head and embeddings excluded; MoE routers
    and a vision-language model's vision tower too: qlora.moe). Routed experts appear one per expert."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, QLoRALinear)) and m is not out and _BLOCK.search(n)
            and not moe.is_router(n, m) and not moe.outside_language_model(n)]


def select_targets(linear_names: list[str], target: str | list[str]) -> set[str]:
    """``all-linear`` → every block linear but the routed experts; else a comma list of layer names
    (``q_proj,v_proj``) matched against the last component of each module name, ``experts.gate_up_proj`` /
    ``experts.down_proj`` (``experts``: both) for the routed experts, ``all-linear`` among them."""
    wanted = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    wanted = [w for t in wanted for w in (("experts.gate_up_proj", "experts.down_proj") if t == "experts" else (t,))]
    kinds = {n: moe.target_kind(n) for n in linear_names}
    available = sorted(set(kinds.values()))
    dense = any(t in ("all-linear", "all") for t in wanted)
    unknown = [t for t in wanted if t not in available and t not in ("all-linear", "all")]
    if not wanted or unknown:
        raise QLoraError(f"unknown target module(s) {', '.join(unknown) or repr(target)}: this model's "
                         f"block linears are {', '.join(available)} (or use all-linear)")
    return {n for n, k in kinds.items() if k in wanted or (dense and not moe.is_expert_linear(n))}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _lora_kwargs(lora: LoraSettings | None, quant: QuantSettings, on: bool) -> dict:
    kw = dict(compute_dtype=parse_dtype(quant.compute_dtype))
    if lora is not None and on:
        if not isinstance(lora.r, int) or lora.r <= 0:
            raise QLoraError(f"LoRA rank must be a positive integer, got {lora.r!r}")
        kw.update(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, use_rslora=lora.rslora)
    else:
        kw.update(r=0)
    return kw


def apply_qlora(model: nn.Module, quant: QuantSettings = QuantSettings(), lora: LoraSettings | None = LoraSettings(),
                seed: int | None = None) -> nn.Module:
    """Swap, in place, the block linears of a loaded model for QLoRALinear (quantizing their weights
    on their current device) and freeze everything but the LoRA factors."""
    moe.split_experts(model)
    names = block_linear_names(model)
    if not names:
        raise QLoraError(f"no linear layers found inside transformer blocks of {type(model).__name__}")
    quant, _ = resolve_dtypes(quant, torch.float32, next(model.parameters()).device)
    targets = select_targets(names, lora.target) if lora is not None else set()
    if seed is not None:
        torch.manual_seed(seed)
    for n in names:
        lin = model.get_submodule(n)
        if isinstance(lin, QLoRALinear):
            continue
        q = QLoRALinear.from_linear(lin, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                    double_quant=quant.double_quant, **_lora_kwargs(lora, quant, n in targets))
        if q.r > 0:
            _init_variant(q, lambda: lin.weight.detach(), lora, quant)
        set_module(model, n, q)
    freeze_base(model)
    return model


def _init_variant(layer: QLoRALinear, weight, lora: LoraSettings, quant: QuantSettings) -> None:
    """LoftQ / PiSSA initialisation from the original weight (``weight()`` gives it) and DoRA's magnitude
    (qlora.variants)."""
    if lora.init != "gaussian":
        from .variants import init_layer
        init_layer(layer, weight(), lora.init, lora.loftq_iters, quant)
    if lora.dora:
        layer.init_dora()


TRAINABLE = ("lora_A", "lora_B", "lora_magnitude")  # parameter names (last component) that train


def freeze_base(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(TRAINABLE))


def lora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLoRALinear) and m.r > 0}


# ---------------------------------------------------------------------------------------------
# building from a source, tensor by tensor


def skeleton(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model on the meta device (no memory). Unknown architectures → QLoraError."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, KeyError) as e:
        raise QLoraError(f"unsupported architecture {getattr(config, 'model_type', '?')!r}: {e}") from None
    model.config.use_cache = False
    return moe.split_experts(model)  # routed experts: one linear per expert (qlora.moe)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> bool:
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    if not set_module_tensor(mod, attr, value):
        return False
    return True


def _donor_buffers(config, dtype) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (rotary tables, embedding scales...) are computed from the config at
    construction, so the meta skeleton lacks them. Build a one-layer, tiny-vocabulary twin of the
    model on the CPU and take its buffers (layer 0's stand for every layer)."""
    from transformers import AutoModelForCausalLM
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    for attr, val in (("vocab_size", 8), ("intermediate_size", 8)):
        if hasattr(small, attr):
            setattr(small, attr, val)
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:1]
    with _parameters_on_meta():  # only the buffers are wanted: skip allocating and initializing weights
        twin = AutoModelForCausalLM.from_config(small, dtype=dtype, attn_implementation="sdpa")
    return {n: b for n, b in twin.named_buffers()}


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside go to the meta device (their init becomes a no-op); buffers are
    created normally. An 8B shape's one-layer twin otherwise costs ~1 s of CPU weight init."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _finish(model: nn.Module, config, device, dtype) -> None:
    """Tie embeddings, fill non-persistent buffers left on meta, check completeness."""
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    from .stream import NotResident  # (a streamed block's base tensors wait in host memory: not missing)
    meta_buffers = [n for n, b in model.named_buffers() if b.is_meta and not isinstance(b, NotResident)]
    if meta_buffers:
        donor = _donor_buffers(config, dtype)
        for n in meta_buffers:
            src = donor.get(_BLOCK.sub(lambda m: f"{m.group(1)}0{m.group(2)}", n, count=1))
            if src is not None:
                _set_tensor(model, n, src.to(device))
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta and not isinstance(t, NotResident)]
    if missing:
        raise QLoraError(f"the model files lack {len(missing)} tensor(s) the architecture needs, "
                         f"e.g. {', '.join(missing[:3])}")


def _block_callback(model: nn.Module, on_block, stream):
    """What runs once block ``prefix`` (``model.layers.N``) is complete: ``on_block(block)``, or the streamer taking
    block N (it may stream only some of them); None without either."""
    if on_block is not None:
        return lambda prefix: on_block(model.get_submodule(prefix))
    if stream is not None:
        return lambda prefix: stream.take_block(model.get_submodule(prefix), index=int(prefix.rsplit(".", 1)[1]))
    return None


def build_from_source(source, quant: QuantSettings = QuantSettings(), lora: LoraSettings | None = LoraSettings(),
                      device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                      seed: int = 0, progress: bool = True, on_block=None, stream=None) -> nn.Module:
    """Fill a meta skeleton from ``source`` (HF dir, GGUF or 4-bit checkpoint), quantizing block
    linears on ``device`` one at a time. LoRA init uses ``seed``.

    ``on_block(module)`` is called for each transformer block (``model.layers.N``) as soon as all
    of its tensors are in place, e.g. to shard it across processes (FSDP2) before the next block
    is read, so no process ever holds the whole model.

    ``stream``: a :class:`qlora.stream.WeightStreamer` (``--offload-weights``). Each block's quantized
    tensors move to its host memory as soon as the block is complete, so the device holds about one block
    beside the weights outside the blocks while the model is built; the streamer is installed on the
    finished model."""
    if stream is not None and on_block is not None:
        raise QLoraError("weight streaming does not run with FSDP2 (--parallel fsdp): its base tensors are sharded")
    from tqdm.auto import tqdm
    device = torch.device(device)
    quant, dtype = resolve_dtypes(quant, dtype, device)
    config = source.config
    if hasattr(source, "progress"):
        source.progress = progress
    model = skeleton(config, dtype)
    source = moe.wrap_source(source, model)  # per-expert names whatever the files' experts layout
    linears = block_linear_names(model)
    targets = select_targets(linears, lora.target) if lora is not None else set()
    by_weight = {n + ".weight": n for n in linears}
    biases = {}
    gen = torch.Generator().manual_seed(seed)
    unused = []
    pending: dict[str, set] = {}  # block prefix -> names still to read
    block_done = _block_callback(model, on_block, stream)
    if block_done is not None:
        for n in model.state_dict():
            m = _BLOCK_PREFIX.match(n)
            if m:
                pending.setdefault(m.group(1), set()).add(n)

    def done(name):
        m = _BLOCK_PREFIX.match(name) if pending else None
        if m is None or m.group(1) not in pending:
            return
        left = pending[m.group(1)]
        left.discard(name)
        if not left:
            prefix = m.group(1)
            del pending[prefix]
            for mod_name in [k for k in biases if k.startswith(prefix + ".")]:
                model.get_submodule(mod_name).bias = biases.pop(mod_name).to(device, parse_dtype(quant.compute_dtype))
            block_done(prefix)

    for name in tqdm(source.names(), desc="loading", unit="tensor", disable=not progress, leave=False):
        mod_name = by_weight.get(name)
        if mod_name is not None:
            kw = _lora_kwargs(lora, quant, mod_name in targets)
            q = source.quantized(name) if hasattr(source, "quantized") else None
            if q is not None:
                packed, state = q
                layer = QLoRALinear.from_quantized(packed.to(device), state.to(device), **kw)
            else:
                w = source.get(name).to(device)
                layer = QLoRALinear.from_weight(w, quant_type=quant.quant_type, blocksize=quant.blocksize,
                                                double_quant=quant.double_quant, **kw)
                del w
            if layer.r > 0:  # deterministic LoRA init, independent of device
                a = torch.empty_like(layer.lora_A, device="cpu")
                bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt 5)
                a.uniform_(-bound, bound, generator=gen)
                layer.lora_A.data.copy_(a)
                _init_variant(layer, lambda: (source.get(name) if q is None else  # read again only if needed
                                              nf4.dequantize_4bit(q[0], q[1], torch.float32)).to(device), lora, quant)
            set_module(model, mod_name, layer)
        elif name.endswith(".bias") and name[:-5] in linears:
            biases[name[:-5]] = source.get(name)
        else:
            t = source.get(name)
            if t.is_floating_point():
                t = t.to(dtype)
            # with on_block (sharded loading) tensors outside the blocks (embeddings, head, final norm)
            # wait in CPU memory: the sharding wrapper moves only each process's shard to the device
            staged = device if on_block is None or _BLOCK_PREFIX.match(name) else torch.device("cpu")
            if not _set_tensor(model, name, t.to(staged)):
                unused.append(name)
        done(name)
    for mod_name, b in biases.items():
        model.get_submodule(mod_name).bias = b.to(device, parse_dtype(quant.compute_dtype))
    _finish(model, config, device, dtype)
    freeze_base(model)
    from .fast import use_fused_kernels, use_tiled_mlp
    if device.type == "cuda":  # fused RMSNorm / SwiGLU (each call falls back when QLORA_KERNELS=0)
        use_fused_kernels(model)
    if switches().tile_all:  # QLORA_TILE_ALL: every call tiled, FORCED_ROWS tokens a chunk (tests)
        from .tiled import FORCED_ROWS
        use_tiled_mlp(model, above=1, chunk=FORCED_ROWS * getattr(config, "intermediate_size", 1))
    else:
        use_tiled_mlp(model)  # long sequences: the MLP over chunks of tokens (a no-op for shorter ones)
    model.qlora_unused_tensors = unused
    if stream is not None:
        stream.install(model)  # (takes any block the source left incomplete)
    return model


class RandomSource:
    """A :class:`qlora.sources.Source` of random weights for ``config``: norms 1, other floating tensors
    N(0, ``std``) drawn in :meth:`names` order from one generator on ``device`` (seeded), integer tensors 0.
    Read in that order twice, two instances of the same arguments give the same tensors: what lets a benchmark
    write the very weights :func:`build_random` quantizes to an HF folder for another stack
    (bench/dpo_speed.py)."""

    def __init__(self, config, dtype: torch.dtype, device, seed: int = 0, std: float = 0.02):
        self.config, self.dtype, self.device, self.std = config, dtype, torch.device(device), std
        self.shapes = {n: (t.shape, t.dtype) for n, t in skeleton(config, dtype).state_dict().items()}
        self.g = torch.Generator(device=self.device).manual_seed(seed)

    def names(self):
        return list(self.shapes)

    def get(self, name):
        shape, dt = self.shapes[name]
        if name.endswith("norm.weight") or re.search(r"norm[^.]*\.weight$", name):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        if not dt.is_floating_point:
            return torch.zeros(shape, dtype=dt, device=self.device)
        return torch.empty(shape, dtype=self.dtype, device=self.device).normal_(0.0, self.std, generator=self.g)


def build_random(config, quant: QuantSettings = QuantSettings(), lora: LoraSettings | None = LoraSettings(),
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", seed: int = 0,
                 std: float = 0.02, progress: bool = True, on_block=None, stream=None) -> nn.Module:
    """A model with random weights built directly in 4-bit, one layer at a time (for benchmarks of
    8B–70B shapes): each linear's random 16-bit weight exists only until it is quantized
    (weights: :class:`RandomSource`)."""
    device = torch.device(device)
    quant, dtype = resolve_dtypes(quant, dtype, device)
    src = RandomSource(config, dtype, device, seed, std)
    return build_from_source(src, quant, lora, device, dtype, seed, progress, on_block, stream)


def load_model(src=None, quant: QuantSettings = QuantSettings(), lora: LoraSettings | None = LoraSettings(),
               device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", seed: int = 0,
               progress: bool = True, on_block=None, stream=None):
    """Load ``src`` (HF dir, GGUF file, 4-bit checkpoint; None = the embedded SmolLM2-135M) as a
    QLoRA model. Returns ``(model, tokenizer)``. ``on_block``, ``stream``: see :func:`build_from_source`."""
    from .sources import open_source
    if src is None:
        from .embedded import embedded_model_path
        src = embedded_model_path()
    source = open_source(src)
    model = build_from_source(source, quant, lora, device, dtype, seed, progress, on_block, stream)
    tokenizer = source.load_tokenizer()
    model.qlora_source = str(src)
    return model, tokenizer
