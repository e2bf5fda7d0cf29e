"""Training throughput and peak memory of qlora on random-weight Llama shapes (one GPU).

Same work as ../shared/bench/reference_qlora.py: LoRA r=16 (alpha 16, no dropout) on every block
linear, gradient checkpointing, paged AdamW 32-bit, clip 0.3, random token ids, median step time
after the first two steps. Modes: ``qlora`` (NF4 + double quant base) and ``lora16`` (the same code
path with a bf16 base). Prints one JSON line per run, and a table with the reference's and the
peers' figures when their outputs are passed with --peers FILE (the output of run_peers.sh).

    python bench/train_speed.py --shape 1b --seq 2048 --batch 4 --steps 8
"""
from __future__ import annotations

import time

T_START = time.time()  # time-to-first-step counts from here (imports included)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from qlora.lean_imports import fast_start  # noqa: E402

fast_start()  # as the qlora command does

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def run(shape: str, seq: int, batch: int, steps: int, mode: str, device: str, profile: bool = False,
        cast_once: bool = True, cuda_graphs: bool = True, memory_phases: bool = False, dropout: float = 0.0,
        keyed: bool = True, profile_detail: bool = False) -> dict:
    marks = {"start": round(time.time() - T_START, 2)}  # where the time to the first step goes
    import torch
    marks["torch imported"] = round(time.time() - T_START, 2)
    if device.startswith("cuda"):  # as `qlora train` does: first-use costs in the background
        from qlora.lean_imports import warm_up_cuda
        c = SHAPES[shape]
        warm_up_cuda(device, c["hidden_size"] // c["num_attention_heads"], seq,
                     dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                          tokens=seq * batch, quant_type="nf4" if mode.startswith("qlora") else None))
    from transformers import LlamaConfig

    from qlora.linear import lora_cast
    from qlora.model import LoraSettings, QuantSettings, build_random
    from qlora.optim import make_optimizer
    from qlora.train import micro_step_fn
    cfg = LlamaConfig(**SHAPES[shape], rope_theta=500000.0, max_position_embeddings=8192)
    cuda = device.startswith("cuda")
    if cuda:  # a previous mode's model in reference cycles would count in this mode's peak (the fused-kernel
              # routing made one until qlora.fast._Forward; the collection stays as a guard)
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    marks["transformers + qlora imported"] = round(time.time() - T_START, 2)
    t0 = time.time()
    quant = QuantSettings(quant_type="nf4" if mode.startswith("qlora") else None)
    model = build_random(cfg, quant, LoraSettings(r=16, alpha=16, dropout=dropout), device, "bf16", progress=False)
    from qlora.offload import enable_checkpointing
    off = enable_checkpointing(model, offload=mode.endswith("+offload"))  # offload: block inputs to pinned CPU memory
    model.train()
    load_s = time.time() - t0
    marks["model built"] = round(time.time() - T_START, 2)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    # +offload: the paged optimizer's state also waits in CPU memory between steps (page budget 0)
    opt = make_optimizer(params, "paged_adamw" if cuda else "adamw", lr=2e-4,
                         page_budget_bytes=0 if cuda and mode.endswith("+offload") else None)
    g = torch.Generator().manual_seed(0)
    times, first_step_at, loss, phases = [], None, float("nan"), []
    prof = None
    casts = lora_cast(model, enabled=cast_once)

    from qlora.cuda_graphs import GraphedMicroStep, supported
    from qlora.linear import dropout_key, keyed_dropout_usable
    keyed = keyed and dropout > 0 and keyed_dropout_usable(torch.device(device))  # as `qlora train` does
    graphs = cuda_graphs and supported(torch.device(device), dropout=dropout, keyed_dropout=keyed)[0]
    # forward + backward of one batch (what a CUDA graph replays)
    micro_step = micro_step_fn(model, device, off, casts, static_shapes=graphs)
    graphed = GraphedMicroStep(micro_step, params, torch.device(device), log=print,
                               accumulate=False) if graphs else None  # one micro-batch per step
    for i in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        b = {"input_ids": ids, "labels": ids}
        if keyed:  # LoRA dropout masks keyed per micro-batch (else nn.Dropout, which keeps the step eager)
            b["dropout_key"] = torch.tensor(dropout_key(0, i), device=device)
        if cuda:
            torch.cuda.synchronize()
        if profile and i == steps - 1:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []),
                                          record_shapes=profile_detail, with_stack=profile_detail)
            prof.__enter__()
        ts = time.time()
        n = int((ids[:, 1:] >= 0).sum())
        if memory_phases:
            torch.cuda.reset_peak_memory_stats()
        l = graphed(b, 1.0 / n) if graphed is not None else micro_step(b, 1.0 / n)
        if memory_phases:  # peak of this step's forward+backward, then of clipping + optimizer
            phases.append((i, "fwd+bwd", round(torch.cuda.max_memory_allocated() / 2**30, 3)))
            torch.cuda.reset_peak_memory_stats()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        if memory_phases:
            phases.append((i, "optimizer", round(torch.cuda.max_memory_allocated() / 2**30, 3),
                           round(torch.cuda.memory_allocated() / 2**30, 3)))
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.time() - ts)
        if prof is not None:
            prof.__exit__(None, None, None)
        loss = l.item()
        if first_step_at is None:
            first_step_at = time.time() - T_START
    steady = sorted(times[2:]) if len(times) > 2 else times
    med = steady[len(steady) // 2]
    n_matmul = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "lora_A"))
    n_matmul += cfg.vocab_size * cfg.hidden_size
    tok_s = batch * seq / med
    # LoRA step with full recompute: forward 2N + recompute 2N + input-gradient backward 2N FLOPs per token
    # (+ attention); MFU against 989 TFLOP/s dense bf16 (H100 SXM).
    flops_tok = 6 * n_matmul + 6 * 2 * cfg.num_hidden_layers * seq * cfg.hidden_size
    r = dict(mode=mode, shape=shape, seq=seq, batch=batch, steps=steps, load_s=round(load_s, 1),
             weights_gib=round(weights_gib, 2), step_s=round(med, 3), tok_s=round(tok_s, 1),
             loss=round(loss, 3), time_to_first_step_s=round(first_step_at, 1),
             ttfs_phases=dict(marks, **{"first step done": round(first_step_at, 2)}),
             peak_gib=round(max([torch.cuda.max_memory_allocated() / 2**30] + [p[2] for p in phases]), 2) if cuda else 0.0,
             mfu=round(tok_s * flops_tok / 989e12, 3) if cuda else None,
             cuda_graphs=dict(graphed.stats, failed=graphed.failed) if graphed is not None else False,
             dropout=dropout, keyed_dropout=keyed,
             **({"memory_phases": phases} if memory_phases else {}))
    if prof is not None:
        evs = prof.key_averages()
        r["profile_top"] = [
            (e.key[:80], round(e.self_device_time_total / 1e3, 1), e.count) for e in
            sorted(evs, key=lambda e: -e.self_device_time_total)[:30]]
        # self device time of all kernels (ms) against the step's wall time: the gap is launch/idle time
        kernels = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
        r["profile_gpu_busy_ms"] = round(sum(e.self_device_time_total for e in kernels) / 1e3, 1)
        r["profile_kernel_launches"] = sum(e.count for e in kernels)
        r["profile_step_ms"] = round(times[-1] * 1e3, 1)
        if profile_detail:
            r.update(profile_detail_tables(prof))
    del model, opt, graphed, casts
    import gc
    gc.collect()
    return r


ELEMENTWISE = {"aten::copy_", "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::cat", "aten::clone",
               "aten::fill_", "aten::zero_", "aten::index"}


def _caller(e) -> str:
    """Where a profiled op was called from: the nearest Python frames outside torch (forward), else the
    autograd node that ran it (backward, which runs in the engine's thread without Python frames)."""
    par, frames = e.cpu_parent, []
    while par is not None and len(frames) < 4:
        if ".py(" in par.name and "site-packages/torch/" not in par.name and not par.name.startswith("torch/"):
            frames.append(re.sub(r"^.*/(site-packages|qlora|bench)/", "", par.name))
        elif par.name.startswith("autograd::engine::evaluate_function: "):
            frames.append(par.name.split(": ", 1)[1])
            break
        par = par.cpu_parent
    if not frames:  # no Python frame and no autograd node: the op's parents by name
        par = e.cpu_parent
        while par is not None and len(frames) < 3:
            frames.append(par.name[:60])
            par = par.cpu_parent
    return " <- ".join(frames)


def profile_detail_tables(prof) -> dict:
    """``profile_ops``: the top ops other than matmul/attention kernels by self device time, with their input
    shapes; ``profile_callers``: device time of the elementwise ops (copies, adds, clones...) by caller. Device
    time of a host-memory copy counts too: those run on the offloader's or pager's own streams."""
    from collections import defaultdict
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0),
                 key=lambda e: -e.self_device_time_total)
    agg: dict = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.name in ELEMENTWISE:
            a = agg[(e.name, _caller(e))]
            a[0] += e.device_time_total
            a[1] += 1
    return {
        "profile_ops": [(e.key[:60], str(e.input_shapes)[:120], round(e.self_device_time_total / 1e3, 2), e.count)
                        for e in ops[:45]],
        "profile_callers": [(name, where[:200], round(t / 1e3, 2), n)
                            for (name, where), (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:30]],
    }


def parse_peers(path: str) -> dict:
    """The JSON lines of run_peers.sh: reference (first '{' line), liger and unsloth ('RESULT {...}')."""
    out, section = {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith("== "):
            section = line[3:].split()[0]
        m = re.search(r"(\{.*\})", line)
        if m and section:
            try:
                d = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue
            if "tok_s" in d:
                out[section] = d
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="qlora,lora16",
                    help="comma list of qlora, lora16, qlora+offload (checkpointed activations and optimizer "
                         "state in CPU memory)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--peers", help="output of ../shared/bench/peers/run_peers.sh on the same shape, to compare")
    ap.add_argument("--profile", action="store_true", help="profile the last step (top CUDA kernels)")
    ap.add_argument("--profile-detail", action="store_true",
                    help="with --profile: also the top ops with their input shapes, and the elementwise ops (copies, "
                         "adds, clones) by caller; use with --no-cuda-graphs, as a replayed graph hides the ops")
    ap.add_argument("--no-lora-cast", dest="lora_cast", action="store_false",
                    help="cast LoRA factors per layer call instead of once per step (qlora.linear.lora_cast)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="run every step eagerly instead of replaying forward+backward from a CUDA graph")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="LoRA dropout (default 0, as the reference and peer scripts; qlora train's default is 0.05)")
    ap.add_argument("--no-keyed-dropout", dest="keyed", action="store_false",
                    help="with --dropout: nn.Dropout instead of keyed masks (what qlora did before: no CUDA graph "
                         "with gradient checkpointing)")
    ap.add_argument("--memory-phases", action="store_true",
                    help="also report the peak memory of each step's forward+backward and optimizer step")
    a = ap.parse_args()
    res = {}
    for mode in a.modes.split(","):
        r = run(a.shape, a.seq, a.batch, a.steps, mode, a.device, a.profile, a.lora_cast, a.cuda_graphs,
                a.memory_phases, a.dropout, a.keyed, a.profile and a.profile_detail)
        r["lora_cast"] = a.lora_cast
        res[mode] = r
        print(json.dumps(r), flush=True)
    peers = parse_peers(a.peers) if a.peers else {}
    print(f"\n{a.shape} shape, seq {a.seq} x batch {a.batch}, LoRA r=16 all-linear")
    print(f"| stack | tok/s | peak GiB | vs reference | vs unsloth |")
    print("|---|---|---|---|---|")
    ref, uns = peers.get("reference", {}).get("tok_s"), peers.get("unsloth", {}).get("tok_s")
    rows = [(f"qlora ({m})", r) for m, r in res.items()] + [(k, v) for k, v in peers.items()]
    for name, r in rows:
        vr = f"{r['tok_s'] / ref:.2f}x" if ref else "-"
        vu = f"{r['tok_s'] / uns:.2f}x" if uns else "-"
        print(f"| {name} | {r['tok_s']:,.0f} | {r.get('peak_gib', '-')} | {vr} | {vu} |")
    if "qlora" in res and "lora16" in res:
        print(f"our QLoRA / our 16-bit LoRA: {res['qlora']['tok_s'] / res['lora16']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
