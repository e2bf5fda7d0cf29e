"""Decoding speed of a QLoRA model (4-bit base + LoRA adapters), ours beside the reference stack's.

Generates greedily from a random-weight model of a known shape (``--shape``, qlora.plan's shapes) and
prints decode tokens/s (one token's forward per step, after the prompt), the prompt's time and peak GPU
memory:

* ``ours``: what ``qlora generate`` runs on a GPU: ``qlora.decoding.decode`` (static KV cache, each step
  replayed from a CUDA graph; captured once per call, and that capture is part of the timing), QLoRALinear
  layers without a dequant cache where the CUDA GEMV (``kernels.gemv_cuda``, Hopper) serves one-row steps;
* ``ours-nograph``: the same model through transformers' ``generate`` (dynamic KV cache, eager steps),
  what ``qlora generate`` ran before CUDA-graph decoding (and runs with ``--no-cuda-graph``);
* ``ours+cache``: the same model inside ``qlora.linear.dequant_cache`` (a 16-bit copy of every weight,
  cuBLAS), what ``qlora generate`` did by default before the GEMV path;
* ``ours-dequant``: no cache, ``QLORA_CUDA_GEMV=0`` (dequantize + matmul per layer per step);

  (these two also through transformers' ``generate``)
* ``reference``: transformers + bitsandbytes ``Linear4bit`` (NF4, double quant, bf16 compute) + PEFT
  LoRA r=16 on all linear layers, as ``../shared/bench/reference_qlora.py`` loads it.

Every mode has LoRA r=16 on all linear layers (B random, so the adapters compute something).
Example: ``python bench/decode_speed.py --shape 8b --prompt 128 --new 128``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path


MODES = ("ours", "ours-nograph", "ours+cache", "ours-dequant", "reference")


def _lora_b_random(model, std: float = 0.02) -> None:
    import torch
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_ours(cfg, device: str):
    from qlora.model import LoraSettings, QuantSettings, build_random
    model = build_random(cfg, QuantSettings(quant_type="nf4"), LoraSettings(r=16, alpha=16, dropout=0.0), device, "bf16",
                         progress=False)
    _lora_b_random(model)
    model.config.use_cache = True  # built for training (no KV cache); `qlora generate` turns it on too
    return model.eval()


def build_reference(cfg, device: str):
    """transformers' Llama in bf16 with random weights, every decoder linear replaced by bitsandbytes'
    Linear4bit (quantized on the move to the GPU, as from_pretrained with BitsAndBytesConfig does), then
    PEFT LoRA on all linear layers."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
                q = q.to(device)  # quantizes
                if device.startswith("cuda") and not getattr(q.weight, "bnb_quantized", False):
                    raise RuntimeError("bitsandbytes did not quantize the reference's weight")
                setattr(parent, name, q)
                del lin
    gc.collect()
    torch.cuda.empty_cache()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    _lora_b_random(model)
    return model.eval()


def time_generate(model, cfg, prompt: int, new: int, device: str, graph: bool = False) -> dict:
    """Decode tokens/s from two greedy generations of the same prompt: ``new`` tokens and 1 token (the
    prompt's forward plus the first token); the difference is ``new - 1`` one-token steps. ``graph``:
    through ``qlora.decoding.decode`` (CUDA graph), else transformers' ``generate``."""
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (1, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True)
    failed = []

    def generate(n):
        if graph:
            from qlora.decoding import decode
            return decode(model, ids[0].tolist(), n, log=failed.append)
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)[0, prompt:].tolist()

    def gen(n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = generate(n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    gen(4)  # warm-up: kernels compiled, GEMVs prepared
    t1 = min(gen(1)[0] for _ in range(2))
    tn, out = gen(new)
    tn = min(tn, gen(new)[0])
    assert len(out) == new
    if failed:
        raise RuntimeError(failed[0])
    step = (tn - t1) / (new - 1)
    return dict(decode_tok_s=round(1 / step, 1), ms_per_token=round(step * 1e3, 2), prompt_s=round(t1, 3),
                tokens=out[:8])


def run(mode: str, cfg, args) -> dict:
    import torch
    cuda = args.device.startswith("cuda")
    if mode == "ours-dequant":
        os.environ["QLORA_CUDA_GEMV"] = "0"
    else:
        os.environ.pop("QLORA_CUDA_GEMV", None)
    from qlora.settings import refresh
    refresh()  # qlora reads its QLORA_* switches once
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_reference(cfg, args.device) if mode == "reference" else build_ours(cfg, args.device)
    build_s = time.perf_counter() - t0
    weights = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if mode == "reference":
        r = time_generate(model, cfg, args.prompt, args.new, args.device)
    else:  # as `qlora generate` runs: LoRA factors cast once (lora_cast), the dequant cache where asked
        from qlora.linear import dequant_cache, lora_cast
        with torch.no_grad(), dequant_cache(model, enabled=mode == "ours+cache"), lora_cast(model):
            r = time_generate(model, cfg, args.prompt, args.new, args.device, graph=mode == "ours")
    if mode in ("ours", "ours-nograph"):
        from qlora.linear import QLoRALinear
        layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
        r["gemv_layers"] = f"{sum(bool(getattr(m._gemv, 'ok', False)) for m in layers)}/{len(layers)}"
    r.update(mode=mode, build_s=round(build_s, 1), weights_gib=round(weights, 2),
             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0)
    del model
    gc.collect()
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b", help="a shape of qlora.plan (8b, 1b, 3b, llama-3.1-8b, ...; default 8b)")
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers (a quicker run)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)} (default: all)")
    ap.add_argument("--device", default="cuda", help="default cuda")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    import torch
    import transformers

    from qlora.plan import shape_config
    cfg = shape_config(args.shape)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or args.new < 2:
        ap.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}" if bad else "--new must be at least 2")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{dev} | torch {torch.__version__} | transformers {transformers.__version__} | shape {args.shape} "
          f"({cfg.num_hidden_layers} layers) | prompt {args.prompt} + {args.new} new tokens, greedy, batch 1", flush=True)
    results = {}
    for mode in modes:
        try:
            results[mode] = run(mode, cfg, args)
        except ImportError as e:
            print(f"{mode}: skipped ({e})", flush=True)
            continue
        print(json.dumps(results[mode]), flush=True)
    print(f"\n{'mode':>13} {'decode tok/s':>12} {'ms/token':>9} {'prompt s':>9} {'weights GiB':>11} {'peak GiB':>9}")
    for mode, r in results.items():
        print(f"{mode:>13} {r['decode_tok_s']:12.1f} {r['ms_per_token']:9.2f} {r['prompt_s']:9.3f} "
              f"{r['weights_gib']:11.2f} {r['peak_gib']:9.2f}")
    if "ours" in results:
        for other in ("reference", "ours-nograph", "ours+cache", "ours-dequant"):
            if other in results:
                print(f"ours / {other}: {results['ours']['decode_tok_s'] / results[other]['decode_tok_s']:.2f}x decode "
                      f"tokens/s at {results['ours']['peak_gib']:.2f} vs {results[other]['peak_gib']:.2f} GiB peak")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
