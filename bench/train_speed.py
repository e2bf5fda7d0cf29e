"""Training throughput and peak memory of qlora on random-weight Llama shapes (one GPU).

Same work as ../shared/bench/reference_qlora.py: LoRA r=16 (alpha 16, no dropout) on every block
linear, gradient checkpointing, paged AdamW 32-bit, clip 0.3, random token ids, median step time
after the first two steps. Modes: ``qlora`` (NF4 + double quant base) and ``lora16`` (the same code
path with a bf16 base). Prints one JSON line per run, and a table with the reference's and the
peers' figures when their outputs are passed with --peers FILE (the output of run_peers.sh).

    python bench/train_speed.py --shape 1b --seq 2048 --batch 4 --steps 8
    python bench/train_speed.py --shape 8b --seq 2048 --batch 2 --memory-budget 24GiB

With --memory-budget the run takes the policy ``qlora train --memory-budget`` would (qlora.budget): its row
has the policy, the predicted peak (``plan_peak_gib``; every row has it) beside the measured one
(``peak_gib``), and MFU on 6N FLOPs/token (``mfu``) and on the FLOPs executed (``mfu_executed``: no weight
gradients for the frozen base, the recompute of the checkpointed blocks counted).
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


VARIANTS = {"dora": {"dora": True}, "pissa": {"init": "pissa"}, "loftq": {"init": "loftq"}}  # mode suffix -> LoraSettings


def mode_variant(mode: str) -> dict:
    """LoraSettings overrides of a mode's LoRA variant suffix (``qlora+dora``, ``qlora+pissa``, ...)."""
    parts = mode.split("+")
    if parts[0] not in ("qlora", "lora16") or any(p not in VARIANTS and p != "offload" for p in parts[1:]):
        raise SystemExit(f"train_speed.py: error: unknown mode {mode!r} (qlora or lora16, then +offload, "
                         f"{', '.join('+' + v for v in VARIANTS)})")
    return {k: v for p in parts[1:] if p in VARIANTS for k, v in VARIANTS[p].items()}


def run(shape: str, seq: int, batch: int, steps: int, mode: str, device: str, profile: bool = False,
        cast_once: bool = True, cuda_graphs: bool = True, memory_phases: bool = False, dropout: float = 0.0,
        keyed: bool = True, profile_detail: bool = False, memory_budget: str | None = None) -> dict:
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
    variant = mode_variant(mode)
    model = build_random(cfg, quant, LoraSettings(r=16, alpha=16, dropout=dropout, **variant), device, "bf16",
                         progress=False)
    from qlora.offload import enable_checkpointing
    optim = "paged_adamw" if cuda else "adamw"
    plan_kw = dict(rank=16, optim=optim, quant_type=quant.quant_type, dropout=dropout, dora=bool(variant.get("dora")))
    policy = choose_policy(cfg, seq, batch, memory_budget, device, plan_kw, offload="offload" in mode.split("+"))
    # offload: block inputs to pinned CPU memory; a budget's policy: the last K blocks keep their activations
    off = enable_checkpointing(model, offload=policy.offload if policy else "offload" in mode.split("+"),
                               keep=policy.keep_indices if policy else (),
                               keep_gemms=policy.gemm_indices if policy else ())
    model.train()
    load_s = time.time() - t0
    marks["model built"] = round(time.time() - T_START, 2)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    # +offload: the paged optimizer's state also waits in CPU memory between steps (page budget 0)
    pages = 0 if cuda and "offload" in mode.split("+") else None
    opt = make_optimizer(params, optim, lr=2e-4, page_budget_bytes=policy.page_budget if policy else pages)
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
    tok_s = batch * seq / med
    flops = flops_per_token(model, cfg, seq, policy.keep if policy else 0, policy.gemms if policy else 0)
    if policy is None:  # the plan's prediction for this mode's settings, beside the measurement
        from qlora.plan import estimate
        predicted = estimate(cfg, seq, batch, offload="offload" in mode.split("+"), fused_dropout=True,
                             page_budget=pages, **plan_kw)["peak"]
    else:
        predicted = policy.peak
    r = dict(mode=mode, shape=shape, seq=seq, batch=batch, steps=steps, load_s=round(load_s, 1),
             weights_gib=round(weights_gib, 2), step_s=round(med, 3), tok_s=round(tok_s, 1),
             loss=round(loss, 3), time_to_first_step_s=round(first_step_at, 1),
             ttfs_phases=dict(marks, **{"first step done": round(first_step_at, 2)}),
             peak_gib=round(max([torch.cuda.max_memory_allocated() / 2**30] + [p[2] for p in phases]), 2) if cuda else 0.0,
             plan_peak_gib=round(predicted / 2**30, 2),
             measured_over_plan=round(torch.cuda.max_memory_allocated() / predicted, 3) if cuda else None,  # target: 0.95-1.05
             mfu=round(tok_s * flops["6n"] / PEAK_FLOPS, 3) if cuda else None,  # 6N/token (+ attention)
             mfu_executed=round(tok_s * flops["executed"] / PEAK_FLOPS, 3) if cuda else None,
             flops_per_token=flops,
             **({"memory_budget_gib": round(policy.budget / 2**30, 2), "policy": policy.describe(),
                 "kept_blocks": policy.keep, "gemm_blocks": policy.gemms, "offload": policy.offload}
                if policy else {}),
             cuda_graphs=dict(graphed.stats, failed=graphed.failed) if graphed is not None else False,
             dropout=dropout, keyed_dropout=keyed,
             **({"memory_phases": phases} if memory_phases else {}))
    if prof is not None:
        r.update(profile_summary(prof, times[-1]))
        if profile_detail:
            r.update(profile_detail_tables(prof))
    del model, opt, graphed, casts
    import gc
    gc.collect()
    return r


def budget_list(text: str | None, peers: dict) -> list[tuple[str | None, str | None]]:
    """``--memory-budget`` as (row label, budget) pairs: None alone without the flag; ``peer`` becomes the
    budget whose allocated peak is the Unsloth row's (``peak_gib`` in --peers): a budget covers the plan's
    slack and the CUDA context on top of the allocations (qlora.plan.required_bytes)."""
    if text is None:
        return [(None, None)]
    out = []
    for b in text.split(","):
        if b == "peer":
            peak = peers.get("unsloth", {}).get("peak_gib")
            if peak is None:
                raise SystemExit("train_speed.py: error: --memory-budget peer needs --peers with an unsloth row")
            from qlora.plan import CONTEXT_BYTES, SLACK
            budget = peak * (1 + SLACK) + CONTEXT_BYTES / 2**30
            out.append((f"peak <= unsloth's {peak} GiB", f"{budget:.3f}GiB"))
        else:
            out.append((b, b))
    return out


PEAK_FLOPS = 989e12  # dense bf16, H100 SXM (H200: the same chip)


def choose_policy(cfg, seq: int, batch: int, budget: str | None, device: str, plan_kw: dict, offload: bool):
    """The --memory-budget policy (qlora.budget) for this run, or None without a budget."""
    if budget is None:
        return None
    import torch

    from qlora.budget import auto_budget, choose, parse_budget
    from qlora.plan import CONTEXT_BYTES
    value = parse_budget(budget)
    if value == "off":
        return None
    dev = torch.device(device)
    if value == "auto":
        value = auto_budget(dev)
    return choose(cfg, seq, batch, value, context=CONTEXT_BYTES if dev.type == "cuda" else 0,
                  offload=True if offload else None, fused_dropout=True, **plan_kw)


def flops_per_token(model, cfg, seq: int, kept: int, gemms: int = 0) -> dict:
    """Matmul FLOPs per token of one training step. ``6n``: the usual 6N (N = block linears + lm_head) plus
    attention (fwd + bwd, 12*L*seq*H); ``executed``: what runs, with the frozen base's missing weight
    gradients and the recompute counted: forward 2N, input-gradient backward 2N, LoRA 6 per parameter,
    the recompute of the L - kept checkpointed blocks (their linears but down_proj, whose GEMM the recompute
    skips, and gate/up too in the ``gemms`` blocks keeping their outputs), causal attention forward 2*seq*H, backward
    4*seq*H and again 2*seq*H when recomputed, per layer."""
    L, H = cfg.num_hidden_layers, cfg.hidden_size
    linears = [m for m in model.modules() if hasattr(m, "lora_A")]
    n_blocks = sum(m.in_features * m.out_features for m in linears)
    n_down = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if hasattr(m, "lora_A") and n.endswith("down_proj"))
    n = n_blocks + cfg.vocab_size * H
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_gate_up = sum(m.in_features * m.out_features for n, m in model.named_modules()
                    if hasattr(m, "lora_A") and n.endswith(("gate_proj", "up_proj")))
    recomputed = (L - kept) / L
    executed = (4 * n + 6 * lora + 2 * (n_blocks - n_down) * recomputed - 2 * n_gate_up * gemms / L
                + L * seq * H * (2 + 4 + 2 * recomputed))
    return {"6n": int(6 * n + 12 * L * seq * H), "executed": int(executed)}


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


def profile_summary(prof, step_s: float, top: int = 30) -> dict:
    """The top ops by self device time, and the device time of all kernels against the step's wall time (the gap
    is launch or idle time)."""
    import torch
    evs = prof.key_averages()
    kernels = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"profile_top": [(e.key[:80], round(e.self_device_time_total / 1e3, 1), e.count)
                            for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:top]],
            "profile_cpu_top": [(e.key[:80], round(e.self_cpu_time_total / 1e3, 1), e.count)
                                for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:12]],
            "profile_gpu_busy_ms": round(sum(e.self_device_time_total for e in kernels) / 1e3, 1),
            "profile_kernel_launches": sum(e.count for e in kernels),
            "profile_step_ms": round(step_s * 1e3, 1)}


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
    ap.add_argument("--memory-budget", metavar="off|auto|SIZE|peer[,...]",
                    help="as qlora train --memory-budget: the plan chooses how many blocks keep their activations, "
                         "offload and optimizer paging; the row gives the policy, predicted and measured peak "
                         "(default modes then: qlora). A comma list gives one row per budget; 'peer': the budget "
                         "whose predicted peak allocation is Unsloth's measured one (--peers), i.e. that peak plus "
                         "the plan's slack and CUDA context, so both peaks are the same counter "
                         "(torch.cuda.max_memory_allocated)")
    ap.add_argument("--modes", default=None,
                    help="comma list of qlora, lora16, qlora+offload (checkpointed activations and optimizer "
                         "state in CPU memory), and the LoRA variants qlora+dora, qlora+pissa, qlora+loftq "
                         "(issue 30: DoRA's step time; the inits' cost is in load_s); default qlora,lora16")
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
    peers = parse_peers(a.peers) if a.peers else {}
    budgets = budget_list(a.memory_budget, peers)
    modes = a.modes or ("qlora" if a.memory_budget else "qlora,lora16")
    for mode in modes.split(","):
        for label, budget in budgets:
            r = run(a.shape, a.seq, a.batch, a.steps, mode, a.device, a.profile, a.lora_cast, a.cuda_graphs,
                    a.memory_phases, a.dropout, a.keyed, a.profile and a.profile_detail, budget)
            r["lora_cast"] = a.lora_cast
            res[mode + (f" @ {label}" if label else "")] = r
            print(json.dumps(r), flush=True)
    print(f"\n{a.shape} shape, seq {a.seq} x batch {a.batch}, LoRA r=16 all-linear")
    print(f"| stack | tok/s | peak GiB | plan GiB | MFU 6N | MFU executed | policy | vs reference | vs unsloth |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref, uns = peers.get("reference", {}).get("tok_s"), peers.get("unsloth", {}).get("tok_s")
    rows = [(f"qlora ({m})", r) for m, r in res.items()] + [(k, v) for k, v in peers.items()]
    for name, r in rows:
        vr = f"{r['tok_s'] / ref:.2f}x" if ref else "-"
        vu = f"{r['tok_s'] / uns:.2f}x" if uns else "-"
        policy = (f"{r['kept_blocks']} kept{', ' + str(r['gemm_blocks']) + ' keep gate/up' if r.get('gemm_blocks') else ''}"
                  f"{', offload' if r['offload'] else ''}" if "kept_blocks" in r else "-")
        print(f"| {name} | {r['tok_s']:,.0f} | {r.get('peak_gib', '-')} | {r.get('plan_peak_gib', '-')} | "
              f"{r.get('mfu') or '-'} | {r.get('mfu_executed') or '-'} | {policy} | {vr} | {vu} |")
    if "qlora" in res and "lora16" in res:
        print(f"our QLoRA / our 16-bit LoRA: {res['qlora']['tok_s'] / res['lora16']['tok_s']:.2f}x")
    for m in (m for m in res if " @ " not in m and mode_variant(m) and "qlora" in res):  # issue 30's target: DoRA <= 1.3x
        print(f"step of {m} / step of qlora: {res[m]['step_s'] / res['qlora']['step_s']:.2f}x "
              f"(load + init {res[m]['load_s']} s against {res['qlora']['load_s']} s)")


if __name__ == "__main__":
    from qlora.errors import QLoraError
    try:
        main()
    except QLoraError as e:  # a bad --memory-budget, or one nothing fits: one line, as qlora train says it
        raise SystemExit(f"train_speed.py: error: {e}") from None
