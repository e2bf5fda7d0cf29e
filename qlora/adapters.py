"""LoRA adapters in the PEFT format, and merging them into a plain 16-bit model.

An adapter directory holds ``adapter_config.json`` (PEFT's ``LoraConfig``) and
``adapter_model.safetensors`` with, per adapted layer ``M`` (a module name such as
``model.layers.0.self_attn.q_proj``), ``base_model.model.M.lora_A.weight`` [r, in] and
``base_model.model.M.lora_B.weight`` [out, r]. ``peft.PeftModel.from_pretrained`` loads it onto
the transformers model, and adapters peft saved load here. We also write ``qlora_config.json``
(how the base was quantized while training), which peft ignores and ``merge`` uses.

DoRA adds ``base_model.model.M.lora_magnitude_vector`` [out] per layer and ``"use_dora": true`` (peft's keys).
A LoftQ/PiSSA adapter holds ``qlora_base.safetensors``, the corrected 4-bit base it was trained on
(qlora.variants), and says ``"init_lora_weights": true``: peft's documented way to save such an adapter, so that
``PeftModel.from_pretrained`` does not run the SVD again on the base it is given.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import COMPUTE_DTYPES, is_int, is_number
from .errors import QLoraError
from .linear import QLoRALinear
from .model import LoraSettings, QuantSettings, block_linear_names, lora_modules, parse_dtype
from .moe import expert_layout, from_peft_layout, target_kind, to_peft_layout
from .outdir import guard_write, lock_beside
from .variants import BASE_FILE

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude, peft's key suffix (no ".weight")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
QCONFIG = "qlora_config.json"


def save_adapter(model, out_dir: str | os.PathLike, base_model: str | None = None,
                 quant: QuantSettings | None = None, extra: dict | None = None,
                 tensors: dict | None = None) -> Path:
    """Write the model's LoRA factors as a PEFT adapter directory, atomically (temp dir, rename).
    ``tensors``: {layer name: (A, B)} to write instead of the model's own (gathered from shards)."""
    mods = lora_modules(model)
    if not mods:
        raise QLoraError("the model has no LoRA layers to save")
    ranks = {m.r for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    rs = {m.use_rslora for m in mods.values()}
    if len(ranks) != 1 or len(alphas) != 1 or len(rs) != 1:
        raise QLoraError("saving adapters with per-layer ranks/alphas is not supported")
    dropout = next(iter(mods.values())).lora_dropout
    pairs = tensors if tensors is not None else {n: (m.lora_A, m.lora_B) for n, m in mods.items()}
    pairs = {n: (a.detach().cpu(), b.detach().cpu()) for n, (a, b) in ((n, pairs[n]) for n in mods)}
    pairs, target_parameters = to_peft_layout(pairs, expert_layout(model))  # MoE experts: peft's layout
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    for name, m in mods.items():  # DoRA's magnitudes (dense layers only: see qlora.variants)
        if m.lora_magnitude is not None:
            if name not in pairs:
                raise QLoraError(f"{name}: DoRA on routed experts is not supported (peft has no expert layout for it)")
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = m.lora_magnitude.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": ranks.pop(),
        "lora_alpha": alphas.pop(),
        # peft refuses dropout on parameter targets; it is a training setting (the run's config.yaml keeps it)
        "lora_dropout": 0.0 if target_parameters else getattr(dropout, "p", 0.0),
        "target_modules": sorted({target_kind(n) for n in mods if n in pairs}),  # (experts: target_parameters)
        "target_parameters": target_parameters or None,
        "use_rslora": rs.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": any(m.lora_magnitude is not None for m in mods.values()),
    }
    stored = getattr(model, "qlora_base_file", None)
    init = getattr(model, "qlora_init", None)
    if init:
        extra = {**(extra or {}), "init": init}
    out = Path(out_dir)
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    with guard_write(out, needed):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if stored is not None:
            _link_or_copy(Path(stored), tmp / BASE_FILE)
        _write_adapter_files(tmp, out, tensors, config, quant, extra, needed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (no extra disk space for the base in every checkpoint), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_adapter_files(tmp: Path, out: Path, tensors: dict, config: dict, quant, extra, needed: int) -> None:
    """Fill the temp folder ``tmp`` and swap it in as ``out``; a full disk or read-only folder is one
    QLoraError naming ``out`` (the caller removes ``tmp``)."""
    with guard_write(out, needed):
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if quant is not None or extra:
            q = dict(quant.__dict__) if quant is not None else {}
            (tmp / QCONFIG).write_text(json.dumps({"quant": q, **(extra or {})}, indent=2, default=str) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(peft config, {module name: (A, B)}) with every check a user may need to see."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise QLoraError(f"adapter directory not found: {d}")
    if not (d / CONFIG).is_file():
        raise QLoraError(f"{d} is not a PEFT adapter: no {CONFIG}")
    cfg = _read_json_object(d / CONFIG)
    _check_lora_fields(cfg, d / CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QLoraError(f"{d}: only LoRA adapters are supported, this is {cfg.get('peft_type')}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise QLoraError(f"{d}: adapters with rank_pattern/alpha_pattern are not supported")
    if cfg.get("modules_to_save"):
        raise QLoraError(f"{d}: adapters with modules_to_save ({cfg['modules_to_save']}) are not supported")
    wfile = d / WEIGHTS
    if not wfile.is_file():
        if (d / "adapter_model.bin").exists():
            raise QLoraError(f"{d}: only a pickle adapter_model.bin is there; it is refused (never unpickled) — "
                             "save it again with safetensors")
        raise QLoraError(f"{d}: no {WEIGHTS}")
    try:
        sd = load_file(str(wfile))
    except (SafetensorError, OSError) as e:
        raise QLoraError(f"{wfile}: corrupt safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        key = k[len(PREFIX):] if k.startswith(PREFIX) else k
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if key.endswith(suffix):
                    pairs.setdefault(key[: -len(suffix)], {})[part] = v
                    break
    if not pairs:
        raise QLoraError(f"{wfile}: holds no lora_A/lora_B weights")
    out = {}
    r = int(cfg.get("r", 8))
    for name, p in pairs.items():
        if set(p) != {"lora_A", "lora_B"}:
            raise QLoraError(f"{wfile}: {name} has only {', '.join(p)}")
        a, b = p["lora_A"], p["lora_B"]
        experts = cfg.get("target_parameters") and a.dim() == 2 and a.shape[0] % r == 0 and b.shape[-1] == a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or ((a.shape[0] != r or b.shape[1] != r) and not experts):
            raise QLoraError(f"{wfile}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, but "
                             f"{d / CONFIG} says r={r} (A must be [r, in], B [out, r])")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise QLoraError(f"{wfile}: {name} holds {a.dtype}/{b.dtype} tensors, not floating point")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # would generate nothing, silently
            raise QLoraError(f"{wfile}: {name} holds NaN or infinite values (the run that saved it diverged): "
                             "use an earlier checkpoint")
        out[name] = (a, b)
    return cfg, _per_expert(out, cfg, wfile)


def _per_expert(pairs: dict, cfg: dict, wfile: Path) -> dict:
    """Experts adapted in peft's layout (``target_parameters``) as qlora's per-expert pairs."""
    tp = cfg.get("target_parameters")
    if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) for t in tp)):
        raise QLoraError(f"{wfile.parent / CONFIG}: target_parameters must be a list of parameter names, got {tp!r}")
    return from_peft_layout(pairs, tp, int(cfg.get("r", 8)))


def read_magnitudes(adapter_dir, pairs: dict) -> dict[str, torch.Tensor]:
    """DoRA's {layer name: magnitude [out]} of a ``use_dora`` adapter (every layer of ``pairs`` must have one;
    {} for plain LoRA)."""
    d = Path(adapter_dir)
    if not _read_json_object(d / CONFIG).get("use_dora"):
        return {}
    sd = load_file(str(d / WEIGHTS))
    out = {}
    for name, (a, b) in pairs.items():
        m = next((sd[k] for k in (f"{PREFIX}{name}.{MAGNITUDE}", f"{PREFIX}{name}.{MAGNITUDE}.weight",
                                  f"{name}.{MAGNITUDE}") if k in sd), None)
        if m is None:
            raise QLoraError(f"{d / WEIGHTS}: use_dora is set but {name} has no {MAGNITUDE}")
        if tuple(m.shape) != (b.shape[0],) or not m.is_floating_point() or not torch.isfinite(m).all():
            raise QLoraError(f"{d / WEIGHTS}: {name}.{MAGNITUDE} must be {b.shape[0]} finite floats, "
                             f"got {m.dtype} {tuple(m.shape)}")
        out[name] = m
    return out


def set_magnitudes(model, mags: dict[str, torch.Tensor]) -> None:
    """Give each named layer DoRA's magnitude ``mags[name]`` (creating the parameter where missing)."""
    for name, mag in mags.items():
        m = model.get_submodule(name)
        if m.lora_magnitude is None:
            m.lora_magnitude = torch.nn.Parameter(torch.empty(m.out_features, dtype=m.lora_A.dtype,
                                                              device=m.lora_A.device))
        m.lora_magnitude.data.copy_(mag)


def _read_json_object(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QLoraError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise QLoraError(f"{path}: expected a JSON object of settings, got a {type(cfg).__name__}")
    return cfg


def _check_lora_fields(cfg: dict, path: Path) -> None:
    """r, lora_alpha, lora_dropout, use_rslora of a PEFT config: the values qlora reads, checked."""
    def bad(key, what):
        raise QLoraError(f"{path}: {key} must be {what}, got {cfg[key]!r}")
    if "r" in cfg and not (is_int(cfg["r"]) and cfg["r"] >= 1):
        bad("r", "an integer >= 1")
    if "lora_alpha" in cfg and not (is_number(cfg["lora_alpha"]) and math.isfinite(cfg["lora_alpha"])
                                    and cfg["lora_alpha"] > 0):
        bad("lora_alpha", "a number > 0")
    d = cfg.get("lora_dropout")
    if d is not None and not (is_number(d) and 0 <= d < 1):
        bad("lora_dropout", "a number in [0, 1)")
    if "use_rslora" in cfg and not isinstance(cfg["use_rslora"], bool):
        bad("use_rslora", "true or false")
    if "use_dora" in cfg and not isinstance(cfg["use_dora"], bool):
        bad("use_dora", "true or false")
    tm = cfg.get("target_modules")
    if tm is not None and not isinstance(tm, (str, list)):
        bad("target_modules", "a list of module names")


def load_adapter(model, adapter_dir: str | os.PathLike, trainable: bool = False):
    """Put the adapter's factors on the model's block linears (creating the LoRA layers the adapter
    has). Module or shape mismatches → QLoraError naming them."""
    cfg, pairs = read_adapter(adapter_dir)
    linears = set(block_linear_names(model))
    missing = sorted(set(pairs) - linears)
    if missing:
        raise QLoraError(f"adapter {adapter_dir} does not fit this base model: it has layers the model "
                         f"lacks, e.g. {', '.join(missing[:3])} ({len(missing)} in all)")
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    for name, (a, b) in pairs.items():
        m = model.get_submodule(name)
        if not isinstance(m, QLoRALinear):
            raise QLoraError(f"{name} is not a QLoRA linear layer")
        if a.shape != (r, m.in_features) or b.shape != (m.out_features, r):
            raise QLoraError(f"adapter {adapter_dir} does not fit this base model: {name} expects "
                             f"A {(r, m.in_features)} and B {(m.out_features, r)}, the adapter has "
                             f"A {tuple(a.shape)} and B {tuple(b.shape)}")
    for m in model.modules():  # layers not in the adapter carry no LoRA
        if isinstance(m, QLoRALinear) and m.r:
            m.set_lora(0)
    mags = read_magnitudes(adapter_dir, pairs)
    base = base_file(adapter_dir)
    if base is not None:  # LoftQ/PiSSA: the corrected base this adapter was trained on
        from .variants import load_base
        load_base(model, base)
    for name, (a, b) in pairs.items():
        m = model.get_submodule(name)
        dev = m.weight_packed.device if m.weight_packed is not None else m.weight.device
        m.set_lora(r, alpha, float(cfg.get("lora_dropout", 0.0) or 0.0), rslora, device=dev)
        m.lora_A.data.copy_(a)
        m.lora_B.data.copy_(b)
    set_magnitudes(model, mags)
    from .model import TRAINABLE
    for n, p in model.named_parameters():
        p.requires_grad_(trainable and n.endswith(TRAINABLE))
    return model


def base_file(adapter_dir) -> Path | None:
    """The corrected base a LoftQ/PiSSA adapter carries (None for other adapters); an adapter of ours whose
    ``qlora_config.json`` says it was trained on one but lacks the file is refused."""
    path = Path(adapter_dir) / BASE_FILE
    if path.is_file():
        return path
    p = Path(adapter_dir) / QCONFIG
    init = _read_json_object(p).get("init") if p.is_file() else None
    init = init.get("init", "gaussian") if isinstance(init, dict) else "gaussian"
    if init in ("loftq", "pissa"):
        raise QLoraError(f"{adapter_dir}: trained with --init {init} on a corrected base, but its {BASE_FILE} is "
                         "missing (copy the whole adapter folder)")
    return None


def adapter_quant_settings(adapter_dir) -> QuantSettings:
    """How the base was quantized when the adapter was trained (defaults if unknown), checked: a
    bad value names the file and field here, before any model loads (so is a LoftQ/PiSSA base file gone missing)."""
    from .nf4 import check_blocksize
    base_file(adapter_dir)
    p = Path(adapter_dir) / QCONFIG
    if not p.is_file():
        return QuantSettings()
    q = _read_json_object(p).get("quant", {})
    if not isinstance(q, dict):
        raise QLoraError(f"{p}: quant must be an object of quantization settings, got {q!r}")
    s = QuantSettings(**{k: v for k, v in q.items() if k in QuantSettings.__dataclass_fields__})
    if s.quant_type not in (None, "nf4", "fp4", "int4"):
        raise QLoraError(f"{p}: quant.quant_type must be nf4, fp4, int4 or null, got {s.quant_type!r}")
    try:
        check_blocksize(s.blocksize)
    except ValueError as e:
        raise QLoraError(f"{p}: quant.blocksize: {e}") from None
    if not isinstance(s.double_quant, bool):
        raise QLoraError(f"{p}: quant.double_quant must be true or false, got {s.double_quant!r}")
    if s.compute_dtype not in COMPUTE_DTYPES:
        raise QLoraError(f"{p}: quant.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {s.compute_dtype!r}")
    return s


def check_fits(adapter_dir, model_src, pairs: dict | None = None, config=None) -> None:
    """Refuse an adapter whose layers or shapes do not fit the model, from the model's config alone
    (a meta skeleton: no weights read), so the mistake costs seconds, not a model load. ``pairs``:
    the adapter's tensors if already read; ``config``: the model's, if already opened."""
    from .model import skeleton
    if pairs is None:
        cfg, pairs = read_adapter(adapter_dir)
    else:
        cfg = _read_json_object(Path(adapter_dir) / CONFIG)
    if config is None:
        from .sources import open_source
        if model_src is None:
            from .embedded import embedded_model_path
            model_src = embedded_model_path()
        config = open_source(model_src).config
    model = skeleton(config)
    linears = set(block_linear_names(model))
    missing = sorted(set(pairs) - linears)
    if missing:
        raise QLoraError(f"adapter {adapter_dir} does not fit the model {model_src}: it has layers the model "
                         f"lacks, e.g. {', '.join(missing[:3])} ({len(missing)} in all)")
    r = int(cfg.get("r", 8))
    for name, (a, b) in pairs.items():
        m = model.get_submodule(name)
        if tuple(a.shape) != (r, m.in_features) or tuple(b.shape) != (m.out_features, r):
            raise QLoraError(f"adapter {adapter_dir} does not fit the model {model_src}: {name} expects "
                             f"A {(r, m.in_features)} and B {(m.out_features, r)}, the adapter has "
                             f"A {tuple(a.shape)} and B {tuple(b.shape)}")


def check_resume_fits(ck_root: Path, model_src, rank: int) -> None:
    """``--resume``: the newest checkpoint's adapter must have ``rank`` (--rank) and fit the model,
    checked before the model loads (a corrupt newest checkpoint is left to the resume itself)."""
    steps = sorted(Path(ck_root).glob("step-*"))
    if not steps or not (steps[-1] / "adapter" / CONFIG).is_file():
        return
    ad = steps[-1] / "adapter"
    try:
        cfg, pairs = read_adapter(ad)
    except QLoraError:
        return  # corrupt: latest_checkpoint reports it and takes an older one
    if int(cfg.get("r", 8)) != rank:
        raise QLoraError(f"--resume: {ad} was trained with --rank {cfg.get('r')}, this run asks for --rank {rank}: "
                         "resume with the same settings")
    check_fits(ad, model_src, pairs)


# ---------------------------------------------------------------------------------------------
# merge


def merged_tensors(model_src, adapter_dir: str | os.PathLike | None, dtype: str | torch.dtype = "bf16",
                   quant: QuantSettings | None = None, fuse_experts: bool = True):
    """Stream the merged model: ``(config, tokenizer, iterator of (name, tensor))``.

    Block linear weights become ``dequant(quant(W))`` — the 4-bit base the adapter was trained on,
    quantized as in ``qlora_config.json`` — plus ``scaling * B @ A`` where adapted, summed in fp32
    and cast to ``dtype``; every other tensor passes through in ``dtype``. One weight is in memory
    at a time. A mixture-of-experts model's experts are merged one expert at a time and written as
    transformers' fused 3-D tensors (``fuse_experts``; else one weight per expert, qlora's layout).
    """
    from . import moe, nf4
    from .hub import base_for
    from .model import skeleton
    from .sources import open_source
    model_src = base_for(model_src, adapter_dir)  # no --model: the base the adapter records
    if model_src is None:
        from .embedded import embedded_model_path
        model_src = embedded_model_path()
    source = open_source(model_src)
    dtype = parse_dtype(dtype)
    cfg, pairs = read_adapter(adapter_dir) if adapter_dir else ({}, {})
    quant = quant or (adapter_quant_settings(adapter_dir) if adapter_dir else QuantSettings())
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    if adapter_dir:
        check_fits(adapter_dir, model_src, pairs, source.config)  # before a weight is read
    shape = skeleton(source.config)  # meta: the experts' layout, no weights
    layout, source = moe.expert_layout(shape), moe.wrap_source(source, shape)
    names = source.names()
    weight_names = {f"{n}.weight": n for n in pairs}
    mags = read_magnitudes(adapter_dir, pairs) if adapter_dir else {}
    stored_file = base_file(adapter_dir) if adapter_dir else None
    absent = [n for n in weight_names if n not in names]
    if absent:
        raise QLoraError(f"adapter {adapter_dir} does not fit base {model_src}: the base has no "
                         f"{', '.join(absent[:3])}")

    from .sources import quantizable_linear_names
    block_weights = set(quantizable_linear_names(source.config))

    def gen():
        from .variants import dora_merge, stored_base
        for name in names:
            q = source.quantized(name)
            stored = stored_base(stored_file, name[:-7]) if stored_file and name in weight_names else None
            if stored is not None:  # LoftQ/PiSSA: the corrected base the adapter was trained on
                w = stored
            elif q is not None:
                w = nf4.dequantize_4bit(q[0], q[1], torch.float32)
            elif name in block_weights and quant.quant_type:  # the 4-bit base that was trained on
                p, st = nf4.quantize_4bit(source.get(name), quant.blocksize, quant.quant_type, quant.double_quant)
                w = nf4.dequantize_4bit(p, st, torch.float32)
            else:
                w = source.get(name)
            if name in weight_names:
                a, b = pairs[weight_names[name]]
                if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
                    raise QLoraError(f"adapter {adapter_dir} does not fit base {model_src}: {name} is "
                                     f"{tuple(w.shape)}, the adapter has A {tuple(a.shape)}, B {tuple(b.shape)}")
                mag = mags.get(weight_names[name])
                w = (dora_merge(w, a, b, scaling, mag) if mag is not None
                     else w.float() + scaling * (b.float() @ a.float()))
            yield name, w.to(dtype) if w.is_floating_point() else w

    return source.config, source, moe.fuse_experts(gen(), layout) if fuse_experts else gen()


def merge(model_src, adapter_dir, output, dtype: str = "bf16", quantize: bool = False, force: bool = False,
          max_shard_size: str = "5GB", progress: bool = True) -> dict:
    """Write a plain Hugging Face model directory (or, with ``quantize``, a 4-bit checkpoint of the
    merged weights) with the tokenizer; transformers loads it without qlora installed. ``OUT.lock``
    beside the output keeps a second merge into it out while this one runs."""
    out = Path(output)
    if out.exists() and not force:  # before opening the model (converting a GGUF base takes a while)
        raise QLoraError(f"output {out} already exists (use --force to replace it)")
    if adapter_dir:
        read_adapter(adapter_dir)  # a bad adapter fails before the model opens
        adapter_quant_settings(adapter_dir)
    with lock_beside(out, f"merge output {out}"), guard_write(out):  # temp files: CheckpointWriter.abort
        return _merge_into(out, model_src, adapter_dir, dtype, quantize, force, max_shard_size, progress)


def _merge_into(out: Path, model_src, adapter_dir, dtype, quantize, force, max_shard_size, progress) -> dict:
    from tqdm.auto import tqdm

    from . import nf4
    from .checkpoint import CheckpointWriter, quantization_config
    from .sources import quantizable_linear_names
    config, source, tensors = merged_tensors(model_src, adapter_dir, dtype, fuse_experts=not quantize)
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = str(parse_dtype(dtype)).split(".")[-1]
    q = adapter_quant_settings(adapter_dir) if adapter_dir else QuantSettings()
    qnames = set(quantizable_linear_names(config)) if quantize else set()
    n = 0
    with CheckpointWriter(out, max_shard_size=max_shard_size, force=force) as w:
        for name, t in tqdm(tensors, total=len(source.names()), desc="merging", unit="tensor", disable=not progress):
            if name in qnames:
                packed, st = nf4.quantize_4bit(t, q.blocksize, q.quant_type or "nf4", q.double_quant)
                w.add_quantized(name, packed, st)
            else:
                w.add(name, t.contiguous())
            n += 1
        if quantize:
            # a 4-bit checkpoint is read by transformers+bitsandbytes on a GPU: auto means their bf16 there
            compute = "bf16" if q.compute_dtype == "auto" else q.compute_dtype
            cfg["quantization_config"] = quantization_config(q.quant_type or "nf4", q.double_quant,
                                                             parse_dtype(compute))
        source.save_tokenizer(w.tmp_dir)  # inside the temp dir: the output appears whole or not at all
        files = w.finish(cfg)
    return dict(output=str(out), tensors=n, files=[str(f) for f in files])


def add_cli(sub) -> None:
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model (plain 16-bit HF model)",
                       description="Write base + adapter as a plain Hugging Face model directory: each adapted "
                                   "weight becomes dequant(W) + scale*B@A (the 4-bit base the adapter was trained "
                                   "on), tensor by tensor; the tokenizer is copied. transformers loads the result "
                                   "without qlora.")
    p.add_argument("--model", default=None, help="base model: HF directory, GGUF file, 4-bit checkpoint or Hub id "
                                                 "org/name[@revision] (default: the base the adapter records, "
                                                 "else the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--output", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the merged weights (default bf16)")
    p.add_argument("--quantize", action="store_true",
                   help="re-quantize the merged linear weights to a 4-bit checkpoint (lossy: see docs/merge.md)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_run_merge)


def _run_merge(args) -> int:
    s = merge(args.model, args.adapter, args.output, args.dtype, args.quantize, args.force, args.max_shard_size)
    print(f"merged {s['tensors']} tensors into {s['output']} ({len(s['files'])} file(s))")
    return 0
