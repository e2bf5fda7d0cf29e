"""Step time (and, on CUDA, peak memory) of one model under the three recompute policies of --memory-budget.

    python bench/recompute_policies.py                                   # CPU, a small Llama shape
    python bench/recompute_policies.py --device cuda --shape 8b --seq 2048 --batch 2

Policies, each applied to every block of the same model (qlora.offload.enable_checkpointing):

* ``recompute``  every block checkpointed: backward runs its forward again (down_proj's GEMM skipped);
* ``gemms``      every block checkpointed, keeping its MLP gate/up outputs for the recompute (``keep_gemms``):
                 the recompute skips those two GEMMs too;
* ``keep``       no block checkpointed: nothing recomputed.

One forward + backward per step (no optimizer), median after the first ``--warmup`` steps; the same batch each
step. Every policy's loss and LoRA gradients are checked equal to the first's (bit for bit), so the rows time
the same math; where they are not, each row gives its loss difference and its largest relative gradient difference,
and the first policy run again at the end (the default list) shows whether the device's kernels alone differ from
run to run (H100, 8B: the rows were not bit-equal in session 19, before this row existed). The table gives each policy's step against ``recompute`` and the share of a block's recompute
``budget.gemm_share`` expects the GEMM-keeping blocks to save.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SMALL = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1000)  # Llama-3-8B's ratios (I = 3.5 H, GQA 4:1), small


def shape(name: str) -> dict:
    if name == "small":
        return SMALL
    from train_speed import SHAPES
    return SHAPES[name]


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16") if f in info})
    return f"{model}, flags: {' '.join(flags) or 'no avx512_bf16/amx_bf16'}"


def step_fn(model, batch, device):
    import torch

    from qlora.loss import loss_sum

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, batch, device)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small", help="small (CPU), 1b or 8b (bench/train_speed.py's shapes)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--policies", default="recompute,gemms,keep,recompute",
                    help="comma list; a repeated first policy checks the device's run-to-run determinism")
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig

    from qlora.budget import gemm_share
    from qlora.model import LoraSettings, QuantSettings, build_random
    from qlora.offload import enable_checkpointing
    cfg = LlamaConfig(**shape(a.shape), rope_theta=500000.0, max_position_embeddings=max(8192, a.seq))
    model = build_random(cfg, QuantSettings(compute_dtype=a.dtype), LoraSettings(r=16, alpha=16, dropout=0.0),
                         a.device, a.dtype, progress=False)
    model.train()
    for n, p in model.named_parameters():  # B != 0, so every LoRA gradient is non-trivial
        if n.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator(p.device).manual_seed(len(n)))
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    L = cfg.num_hidden_layers
    settings = {"recompute": {}, "gemms": {"keep_gemms": range(L)}, "keep": {"keep": range(L)}}
    where = f"{torch.cuda.get_device_name()}" if a.device.startswith("cuda") else cpu_line()
    print(json.dumps(dict(device=where, torch=torch.__version__, shape=a.shape, seq=a.seq, batch=a.batch,
                          dtype=a.dtype, threads=torch.get_num_threads())), flush=True)
    rows, ref = [], None
    for name in a.policies.split(","):
        enable_checkpointing(model, **settings[name])
        step = step_fn(model, batch, a.device)
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], None
        for _ in range(a.steps):
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        if ref is None:
            ref = (loss, grads)
        same = bool(torch.equal(loss, ref[0]) and all(torch.equal(g, ref[1][n]) for n, g in grads.items()))
        # how far from the first row when not bit-equal: a repeated first policy (e.g. recompute,gemms,recompute)
        # tells run-to-run nondeterminism of the device's kernels from a difference of the policies
        diff = max((float((g.float() - ref[1][n].float()).norm() / ref[1][n].float().norm().clamp_min(1e-30))
                    for n, g in grads.items()), default=0.0)
        med = statistics.median(times[a.warmup:])
        row = dict(policy=name, step_s=round(med, 4), tok_s=round(a.batch * a.seq / med, 1), same_as_first=same, loss_diff=float((loss.float() - ref[0].float()).abs()), max_grad_rel_diff=diff,
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device.startswith("cuda") else None,
                   times=[round(x, 4) for x in times])
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["policy"] == "recompute"), rows[0])
    print(f"\n{a.shape} shape, seq {a.seq} x batch {a.batch}, {a.dtype}, {where}")
    print("| policy | step s | tok/s | vs recompute | peak GiB | same loss and grads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {base['step_s'] / r['step_s']:.2f}x | "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {r['same_as_first']} |")
    by = {r["policy"]: r["step_s"] for r in rows}
    if {"recompute", "gemms", "keep"} <= by.keys() and by["recompute"] > by["keep"]:
        got = (by["recompute"] - by["gemms"]) / (by["recompute"] - by["keep"])
        print(f"share of the recompute's time the GEMM-keeping blocks saved: {got:.2f} "
              f"(budget.gemm_share expects {gemm_share(cfg, a.seq):.2f} of its FLOPs)")


if __name__ == "__main__":
    main()
