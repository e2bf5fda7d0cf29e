"""``qlora quantize SRC OUT``: turn a 16/32-bit model (transformers directory or GGUF file) into a
bitsandbytes-format 4-bit checkpoint that both qlora and transformers+bitsandbytes load.

Every ``nn.Linear`` weight of the transformer blocks (:func:`qlora.sources.quantizable_linear_names`)
becomes NF4 (or FP4) codes with one absmax per ``blocksize`` elements, double-quantized by
default; everything else (embeddings, norms, lm_head, biases) is copied in the source dtype.
A mixture-of-experts model's routed experts are written one quantized weight per expert and projection,
``<experts>.gate_up_proj.<N>.weight`` [2I, H] and ``<experts>.down_proj.<N>.weight`` [H, I] (qlora.moe),
whichever layout the source stores; transformers cannot load that layout (its experts are 3-D
parameters, which bitsandbytes does not quantize), qlora can.
A GGUF's tensors arrive as float32 and are written in the compute dtype; its quantized weights
are quantized from those float32 values and dequantize to the compute dtype.

Memory: tensors are read, quantized and spooled to disk one at a time, so the peak is about the
largest tensor (in float32 while it is quantized) plus its 4-bit output; a GGUF source is the
exception, its reader holds the whole model in float32.

Storage per quantized weight of ``n`` elements, block ``B``: 4 bits per element, plus 32/B bits
of fp32 absmax without DQ, or 8/B bits of uint8 absmax + 32/(256 B) of fp32 second-level scale
with DQ (4.127 bits at B=64, 4.5 without DQ), plus the 16-entry code table (and the 256-entry
DQ table), which only matter for tiny tensors.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from . import nf4
from .checkpoint import COMPUTE_DTYPES, CheckpointWriter, parse_size, quantization_config
from .errors import QLoraError
from .outdir import guard_write, lock_beside

QUANT_TYPES = ("nf4", "fp4")  # the 4-bit types a bitsandbytes checkpoint can hold
MB = 1e6


def _check_options(quant_type: str, blocksize: int, compute_dtype: str, max_shard_size) -> torch.dtype:
    if quant_type not in QUANT_TYPES:
        raise QLoraError(f"unknown quant type {quant_type!r}: choose nf4 or fp4")
    try:
        nf4.check_blocksize(blocksize)
    except ValueError as e:
        raise QLoraError(str(e)) from None
    if compute_dtype not in COMPUTE_DTYPES:
        raise QLoraError(f"unknown compute dtype {compute_dtype!r}: choose bf16, fp16 or fp32")
    parse_size(max_shard_size)
    return COMPUTE_DTYPES[compute_dtype]


def _check_paths(src_path: Path, out: Path) -> None:
    s, o = src_path.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise QLoraError(f"the output {out} would overwrite the source {src_path}: choose another output")


def quantize_model(src, out, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: str = "bf16", force: bool = False, progress: bool = True,
                   max_shard_size: int | str = "2GB") -> dict:
    """Quantize ``src`` into the checkpoint directory ``out``; returns the summary printed by the CLI.

    Summary keys: ``tensors_quantized``, ``tensors_kept``, ``params_quantized``, ``params_total``,
    ``source_mb`` (source tensor files on disk), ``dense_mb`` (the tensors as read),
    ``output_mb`` (output tensors), ``bits_per_param`` (stored bits of the quantized weights,
    tables and state included, per weight element), ``seconds``, ``files``.
    """
    t0 = time.perf_counter()
    cdtype = _check_options(quant_type, blocksize, compute_dtype, max_shard_size)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise QLoraError(f"{out} already exists: choose another output or pass --force to replace it")
    # OUT.lock beside the output: one writer at a time; a full disk or read-only folder is one line
    # (CheckpointWriter removes its temp folder)
    with lock_beside(out, f"quantize output {out}"), guard_write(out):
        return _quantize_into(src, out, quant_type, blocksize, double_quant, cdtype, force, progress,
                              max_shard_size, t0)


def _quantize_into(src, out: Path, quant_type, blocksize, double_quant, cdtype, force, progress, max_shard_size,
                   t0) -> dict:
    from .sources import open_source, quantizable_linear_names
    source = open_source(src)
    if source.kind == "bnb4":
        raise QLoraError(f"{source.path} is already a 4-bit checkpoint: quantize its 16-bit original instead")
    _check_paths(source.path, out)
    targets = set(quantizable_linear_names(source.config))
    from .model import skeleton
    from .moe import wrap_source
    source = wrap_source(source, skeleton(source.config))  # MoE: one weight per expert, either stored layout
    names = source.names()
    missing = sorted(targets - set(names))
    if missing:
        raise QLoraError(f"{source.path} does not match its architecture: {len(missing)} linear weights are "
                         f"missing, e.g. {missing[0]}")
    from tqdm.auto import tqdm

    stats = dict(tensors_quantized=0, tensors_kept=0, params_quantized=0, params_total=0,
                 dense_bytes=0, out_bytes=0, quant_bytes=0)
    out_dtype = None  # dtype of the unquantized tensors we write (and of dequantized weights)
    with CheckpointWriter(out, max_shard_size, force=force) as writer:
        for name in tqdm(names, desc=f"quantize {quant_type}", unit="tensor", disable=not progress,
                         file=sys.stderr, dynamic_ncols=True):
            t = source.get(name)
            stats["dense_bytes"] += t.numel() * t.element_size()
            stats["params_total"] += t.numel()
            keep_dtype = cdtype if (source.kind == "gguf" and t.dtype == torch.float32) else t.dtype
            if name in targets:
                if t.dtype not in nf4.FLOAT_DTYPES or t.dim() != 2:
                    raise QLoraError(f"{name}: cannot quantize a {t.dtype} tensor of shape {list(t.shape)}")
                packed, state = nf4.quantize_4bit(t, blocksize, quant_type, double_quant)
                state.dtype = keep_dtype
                nbytes = writer.add_quantized(name, packed, state)
                stats["tensors_quantized"] += 1
                stats["params_quantized"] += t.numel()
                stats["quant_bytes"] += nbytes
                stats["out_bytes"] += nbytes
                out_dtype = out_dtype or keep_dtype
            else:
                if t.is_floating_point():
                    t = t.to(keep_dtype)
                    out_dtype = out_dtype or keep_dtype
                writer.add(name, t)
                stats["tensors_kept"] += 1
                stats["out_bytes"] += t.numel() * t.element_size()
            del t
        if stats["tensors_quantized"] == 0:
            raise QLoraError(f"{source.path}: found no linear layer to quantize")
        source.save_tokenizer(writer.tmp_dir)
        files = writer.finish(_output_config(source, quant_type, double_quant, cdtype, out_dtype))
    return {
        "source": str(source.path), "kind": source.kind, "output": str(out),
        "quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
        "compute_dtype": str(cdtype).split(".")[-1],
        "tensors_quantized": stats["tensors_quantized"], "tensors_kept": stats["tensors_kept"],
        "params_quantized": stats["params_quantized"], "params_total": stats["params_total"],
        "source_mb": source.nbytes() / MB, "dense_mb": stats["dense_bytes"] / MB,
        "output_mb": stats["out_bytes"] / MB,
        "bits_per_param": 8 * stats["quant_bytes"] / stats["params_quantized"],
        "seconds": time.perf_counter() - t0, "files": [str(f) for f in files],
    }


def _output_config(source, quant_type, double_quant, cdtype, out_dtype) -> dict:
    """The source's config.json, plus ``quantization_config`` (and, for GGUF, the dtype and
    architectures that its metadata lacks)."""
    if source.kind == "gguf":
        cfg = json.loads(source.config.to_json_string(use_diff=True))
        cfg.pop("_name_or_path", None)
        cfg.setdefault("architectures", [_architecture(source.config)])
    else:
        cfg = json.loads((source.path / "config.json").read_text())
    if source.kind == "gguf" and out_dtype is not None:
        cfg["dtype"] = str(out_dtype).split(".")[-1]
    cfg["quantization_config"] = quantization_config(quant_type, double_quant, cdtype)
    return cfg


def _architecture(config) -> str:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return type(AutoModelForCausalLM.from_config(config)).__name__


def format_summary(s: dict) -> str:
    dq = "on" if s["double_quant"] else "off"
    return "\n".join([
        f"wrote {s['output']} ({len(s['files'])} shard{'s' if len(s['files']) > 1 else ''})",
        f"  quantized {s['tensors_quantized']} linear weights ({s['params_quantized'] / 1e6:.2f}M params) to "
        f"{s['quant_type']}, block {s['blocksize']}, double quant {dq}, compute {s['compute_dtype']}; "
        f"kept {s['tensors_kept']} tensors",
        f"  size: source {s['source_mb']:.2f} MB on disk ({s['kind']}), {s['dense_mb']:.2f} MB as read "
        f"-> {s['output_mb']:.2f} MB",
        f"  {s['bits_per_param']:.3f} bits per quantized parameter; {s['seconds']:.1f} s",
    ])


def add_cli(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model to a 4-bit (bitsandbytes-format) checkpoint",
                       description="Quantize every linear layer of the transformer blocks of SRC (a "
                                   "transformers directory with safetensors, or a .gguf file) to 4 bits and "
                                   "write a checkpoint directory OUT that qlora and transformers+bitsandbytes "
                                   "load.")
    p.add_argument("src", metavar="SRC", help="model directory (config.json + *.safetensors), .gguf file or Hub id org/name[@revision]")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --force)")
    p.add_argument("--quant-type", default="nf4", help="nf4 (default) or fp4")
    p.add_argument("--blocksize", type=int, default=64, help="elements per absmax scale: power of two, 32..4096 "
                                                            "(default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the absmax scales in fp32 instead of 8 bits (+0.37 bit/param)")
    p.add_argument("--compute-dtype", default="bf16", help="bf16 (default), fp16 or fp32: dtype of the "
                                                           "matmuls, and of a GGUF's unquantized tensors")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    summary = quantize_model(args.src, args.out, quant_type=args.quant_type, blocksize=args.blocksize,
                             double_quant=args.double_quant, compute_dtype=args.compute_dtype, force=args.force,
                             progress=True, max_shard_size=args.max_shard_size)
    print(format_summary(summary))
    return 0
