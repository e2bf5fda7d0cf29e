"""Memory benchmark: peak GPU memory of QLoRA training steps next to `qlora plan`'s prediction.

    python bench/memory.py --all --out results.jsonl       # every row, one GPU, ~7 minutes on an H100
    python bench/memory.py --rows 8b,spike --time-limit 300
    python bench/memory.py --replay results.jsonl           # predictions again, from the current plan
    python bench/memory.py --cpu                            # tiny shapes on the CPU (checks the script)

Each row builds a random-weight model directly in 4-bit (``qlora.model.build_random``), trains a few
steps as ``qlora train`` does (``qlora.loss.loss_sum``: chunked loss; gradient clipping; our
paged optimizers; per-block checkpointing, optionally with activation offload), under a memory
cap set with ``torch.cuda.set_per_process_memory_fraction``, and prints one JSON line: measured
``torch.cuda.max_memory_allocated`` over the steps, the plan's prediction, their ratio, tokens/s.

Rows (``--rows``, comma separated; ``--all`` = all of them):

* ``calib``   one decoder block of the 8B shape (and a variant with another intermediate size),
              recomputed and back-propagated at several token counts, plus the loss tail: the
              measurements the plan's activation constants are fitted to (not the table rows);
              ``calib_block_tiled``: the 8B block with its MLP tiled (qlora.tiled), beside the plan's
              tiled terms (to calibrate them).
* ``8b``      Llama-3.1-8B shape, seq 2048 x batch 2, r=16, offload, paged 8-bit, under 6.5 GiB.
* ``spike``   8B, batch 1, seq 2048 with one step at 8192 in the middle, under a tight cap:
              paged AdamW (on OOM: every optimizer page to CPU, retry the batch) vs plain AdamW.
* ``70b``     Llama-3.1-70B shape, seq 2048 x batch 1, r=64 under 44 GiB; r=16 under 40 GiB.
* ``consumer`` the GPU capped as a 24 GiB card: 8B at batch 1, r=16 at `qlora plan`'s longest sequence
              (with and without activation offload) and 10% past it; then 70B, r=64, seq 2048 under 46 GiB
              (``--consumer-70b none|only``: without it, or it alone). Not in ``--all``.
* ``stream70b`` the 70B shape on a 24 GiB card (the allocator capped as in ``consumer``, the build too) with its
              block weights streamed from pinned CPU memory (qlora.stream, ``--offload-weights``): seq 2048 x
              batch 1, r=16, activation offload, input embeddings in CPU memory, paged AdamW with the plan's page
              budget, ``--steps-70b`` steps; step time, tok/s, measured peak beside the plan, the build's peak,
              the bytes copied per step. Not in ``--all``.
* ``long``    8B at batch 1: one step at ``--long-tokens`` (default 204800) with offload, after a
              probe at 32k tokens that predicts its time; ``--long-search`` binary-searches the
              longest sequence instead (each probe is a full step: slow). Sequences past ~18.7k
              tokens run the MLP tiled, as ``qlora train`` does (each row logs ``tiled_mlp_calls``);
              ``--mlp-tiling off`` runs every row untiled (and predicts it so), for comparison.

The rows share one 8B model (its LoRA rank is changed in place); the whole script keeps to
``--time-limit`` seconds, skipping rows that would not end in time.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from qlora import plan  # noqa: E402
from qlora.linear import LoraDropout, QLoRALinear  # noqa: E402
from qlora.fast import tiled_calls, use_tiled_mlp  # noqa: E402
from qlora.tiled import CHUNK_ELEMENTS, TILE_ABOVE, chunk_bounds, tile_rows  # noqa: E402
from qlora.model import LoraSettings, QuantSettings, build_random  # noqa: E402
from qlora.offload import ActivationOffloader, HostEmbedding, enable_checkpointing, offload_embeddings  # noqa: E402
from qlora.optim import make_optimizer  # noqa: E402
from qlora.loss import loss_sum  # noqa: E402

GiB = 1 << 30
NEVER = 1 << 62  # --mlp-tiling off: a tiling threshold no call reaches
T0 = time.time()
ARGS = None
OUT = None
BUILD_S: dict = {}


def log(row: dict) -> None:
    row = {"t": round(time.time() - T0, 1), **row}
    line = json.dumps(row)
    print(line, flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(line + "\n")


def left() -> float:
    return ARGS.time_limit - (time.time() - T0)


# ---------------------------------------------------------------------------------------------
# measuring


class CPUPeak:
    """Peak of live CPU tensor bytes during a block (torch profiler memory events), above the
    bytes live at its start; the CPU stand-in for ``torch.cuda.max_memory_allocated``."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        events = sorted((e.start_ns(), e.nbytes()) for e in self.prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        cur = self.peak = 0
        for _, n in events:
            cur += n
            self.peak = max(self.peak, cur)
        return False


def storage_bytes(*objs) -> int:
    """Bytes of the distinct storages of the tensors of modules / optimizers / tensors given."""
    seen, total = set(), 0
    for o in objs:
        if isinstance(o, torch.nn.Module):
            ts = list(o.parameters()) + list(o.buffers()) + [p.grad for p in o.parameters() if p.grad is not None]
        elif isinstance(o, torch.optim.Optimizer):
            ts = [t for st in o.state.values() for t in st.values() if torch.is_tensor(t) and t.device.type != "cpu"
                  or (torch.is_tensor(t) and ARGS.device == "cpu" and t.dim() > 0 and not getattr(t, "is_pinned", lambda: False)())]
        else:
            ts = [o]
        for t in ts:
            if t is None or t.is_meta:  # (also a streamed block's placeholders: its weights wait in host memory)
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def sync():
    if torch.cuda.is_available() and ARGS.device != "cpu":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available() and ARGS.device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):  # cached pinned host blocks (offload) back to the OS
            torch._C._host_emptyCache()


@contextlib.contextmanager
def memory_cap(cap: int | None):
    """Cap what torch may allocate on the GPU at ``cap`` bytes for the block."""
    if cap is None or ARGS.device == "cpu":
        yield
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def attention_backends():
    """Flash / memory-efficient / cuDNN attention only on CUDA: never the math path, whose T x T
    scores would make long sequences fail for the wrong reason."""
    if ARGS.device == "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


# ---------------------------------------------------------------------------------------------
# models and steps


def build(shape: str, rank: int, layers: int | None = None, embed_offload: bool = True, stream=None, **overrides):
    cfg = plan.shape_config(shape)
    if layers:
        cfg.num_hidden_layers = layers
    for k, v in overrides.items():
        setattr(cfg, k, v)
    t = time.time()
    model = build_random(cfg, QuantSettings(), LoraSettings(r=rank, alpha=16, dropout=0.0), device=ARGS.device,
                         dtype="bf16", progress=False, stream=stream)
    model.train()
    if not tiling_on():  # build_random routes the MLPs through the tiled MLP, as qlora train's loading does
        use_tiled_mlp(model, above=NEVER)
    if embed_offload:
        offload_embeddings(model)  # the input table waits in CPU memory (untied shapes only)
    sync()
    return cfg, model, time.time() - t


def tiling_on() -> bool:
    return ARGS.mlp_tiling == "on"


def build_row(name, cfg, model, seconds) -> dict:
    """Build time, and the model's bytes: counted, allocated, and as the plan counts them."""
    emb = isinstance(model.get_input_embeddings(), HostEmbedding)
    c = plan.counts_for(cfg, rank=16 if "8b" in name else 64)
    static = c["weights_4bit"] + c["dq_constants"] + c["frozen_16bit"] + c["lora_params"] \
        - (c["input_embedding"] if emb and not c["tied"] else 0)
    row = dict(row=name, seconds=round(seconds, 1), storage_bytes=storage_bytes(model), plan_bytes=static)
    if ARGS.device != "cpu":
        row["allocated"] = torch.cuda.memory_allocated()
    return row


def set_rank(model, rank: int, lora_dtype=torch.float32) -> None:
    """New LoRA factors of rank ``rank`` (in ``lora_dtype``) on every adapted layer."""
    dev = torch.device(ARGS.device)
    for m in model.modules():
        if isinstance(m, QLoRALinear) and m.r > 0:
            m.set_lora(rank, alpha=16, dropout=0.0, lora_dtype=lora_dtype, device=dev)
    free()


def batch_of(cfg, seq: int, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def train_steps(model, cfg, seqs: list[int], batch: int, optim: str, offload: bool | int, cap: int | None,
                page_budget: int | None = None, oom_retry: bool = False, clip: float = 0.3, keep: int = 0) -> dict:
    """Train ``len(seqs)`` steps (step k on a batch of ``batch`` x ``seqs[k]``) and measure. ``offload``: True every
    checkpointed block's input in CPU memory, K the first K; ``keep``: the last blocks not checkpointed."""
    dev = torch.device(ARGS.device)
    layers = cfg.num_hidden_layers
    off = enable_checkpointing(model, offload=offload, offloader=ActivationOffloader() if offload else None,
                               keep=range(layers - keep, layers))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim, lr=1e-4, page_budget_bytes=page_budget)
    res = dict(times=[], losses=[], retries=0, status="ok", phase_peaks=[])
    free()
    if ARGS.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        res["start_allocated"], res["start_reserved"] = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    peak_cpu = 0
    with memory_cap(cap), attention_backends():
        for k, seq in enumerate(seqs):
            b = batch_of(cfg, seq, batch, seed=k)
            n_tok = batch * (seq - 1)
            for attempt in range(2):
                oom = False
                try:
                    sync()
                    t = time.time()
                    with (CPUPeak() if ARGS.device == "cpu" else contextlib.nullcontext()) as cp:
                        with off.hooks() if off else contextlib.nullcontext():
                            loss = loss_sum(model, b, dev) / n_tok
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, clip)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    res["losses"].append(round(loss.item(), 4))
                    sync()
                    res["times"].append(time.time() - t)
                    if cp is not None:
                        base = storage_bytes(model, opt)
                        peak_cpu = max(peak_cpu, base + cp.peak)
                except torch.cuda.OutOfMemoryError:
                    oom = True  # clean up below, once the traceback (and what it holds) is gone
                if not oom:
                    break
                loss = None
                opt.zero_grad(set_to_none=True)
                free()
                if not oom_retry or attempt == 1:
                    res.update(status=f"OOM at step {k + 1} (seq {seq})")
                    break
                opt.evict_all()  # every optimizer page to host memory; they return at their update
                free()
                res["retries"] += 1
            if res["status"] != "ok":
                break
    res["peak"] = peak_cpu if ARGS.device == "cpu" else torch.cuda.max_memory_allocated()
    res["reserved"] = None if ARGS.device == "cpu" else torch.cuda.max_memory_reserved()
    res["state_bytes"] = opt.state_bytes() if hasattr(opt, "state_bytes") else None
    if off:
        res["offloaded_per_step"] = off.stats["bytes_out"] // max(1, len(res["times"]))
    enable_checkpointing(model, offload=False)
    del opt, params
    free()
    return res


def report(name: str, cfg, model, seqs, batch, rank, optim, offload, cap, lora_dtype="fp32", page_budget=None,
           oom_retry=False, offload_weights=False, keep=0, **extra) -> dict:
    seq = max(seqs)
    emb = isinstance(model.get_input_embeddings(), HostEmbedding)
    est = plan.estimate(cfg, seq, batch, rank, optim, offload=offload, embed_offload=emb, lora_dtype=lora_dtype,
                        page_budget=page_budget, first_step=len(seqs) == 1, mlp_tiling=tiling_on(),
                        offload_weights=offload_weights, keep_blocks=keep)
    tiled_before = tiled_calls(model)
    r = train_steps(model, cfg, seqs, batch, optim, offload, cap, page_budget, oom_retry, keep=keep)
    steady = r["times"][1:] or r["times"]
    med = sorted(steady)[len(steady) // 2] if steady else None
    row = dict(row=name, shape=cfg.qlora_shape, layers=cfg.num_hidden_layers, seq=seq, seqs=seqs, batch=batch,
               rank=rank, lora_dtype=lora_dtype, optim=optim, offload=offload, embed_offload=emb, page_budget=page_budget,
               cap_gib=None if cap is None else round(cap / GiB, 2), status=r["status"], retries=r["retries"],
               measured_gib=round(r["peak"] / GiB, 3), predicted_gib=round(est["peak"] / GiB, 3),
               ratio=round(r["peak"] / est["peak"], 3), phase=est["phase"], kept_blocks=keep,
               host_gib=round(plan.host_bytes(est) / GiB, 2),
               tok_s=round(batch * seqs[-1] / med, 1) if med else None,
               step_s=[round(t, 2) for t in r["times"]], losses=r["losses"], state_bytes=r["state_bytes"],
               offloaded_per_step=r.get("offloaded_per_step"), max_reserved=r["reserved"],
               start_allocated=r.get("start_allocated"), start_reserved=r.get("start_reserved"),
               tiled_mlp_calls=tiled_calls(model) - tiled_before, mlp_chunk_tokens=est["details"]["mlp_chunk_tokens"],
               **({"offload_weights": offload_weights} if offload_weights else {}), **extra)
    log(row)
    if cap is not None and r["status"].startswith("OOM") and not oom_retry and left() > 90:
        # over the cap: measure the same steps without it, so the plan can still be checked
        report(name + "_uncapped", cfg, model, seqs[:2], batch, rank, optim, offload, None, lora_dtype, page_budget,
               offload_weights=offload_weights, **extra)
    return row


# ---------------------------------------------------------------------------------------------
# rows


def block_delta(model, cfg, tokens: int, checkpoint: bool = True) -> dict:
    """Peak bytes above the start while one decoder block is run forward and back-propagated at
    ``tokens`` tokens (input, incoming gradient and the model allocated before the start)."""
    dev = torch.device(ARGS.device)
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    if checkpoint:
        enable_checkpointing(model, offload=False)
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    x = torch.randn(1, tokens, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(tokens, device=dev)[None]
    with torch.no_grad():
        cos, sin = rotary(x, pos)
    grad_out = torch.randn_like(x)
    free()
    sync()
    out = {}
    with attention_backends(), (CPUPeak() if ARGS.device == "cpu" else contextlib.nullcontext()) as cp:
        if ARGS.device != "cpu":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        y = y[0] if isinstance(y, tuple) else y
        sync()
        if ARGS.device != "cpu":
            out["forward"] = torch.cuda.max_memory_allocated() - base
            out["retained"] = torch.cuda.memory_allocated() - base
        y.backward(grad_out)
        sync()
    out["peak"] = cp.peak if cp is not None else torch.cuda.max_memory_allocated() - base
    del x, y, grad_out, cos, sin
    model.zero_grad(set_to_none=True)
    free()
    return out


def tail_delta(model, cfg, tokens: int, offload: bool) -> int:
    """Peak bytes above the start for the final norm + chunked loss, forward and backward."""
    from qlora.kernels.loss import chunked_linear_cross_entropy
    dev = torch.device(ARGS.device)
    x = torch.randn(1, tokens, cfg.hidden_size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (1, tokens), device=dev)
    off = ActivationOffloader(exclude=model, include_cpu=False) if offload else None
    free()
    sync()
    with (CPUPeak() if ARGS.device == "cpu" else contextlib.nullcontext()) as cp:
        if ARGS.device != "cpu":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with off.hooks() if off else contextlib.nullcontext():
            h = model.model.norm(x)  # then as qlora.loss.loss_sum: the head only at scored positions
            keep = labels[:, 1:] != -100
            loss = chunked_linear_cross_entropy(h[:, :-1][keep], model.get_output_embeddings().weight,
                                                labels[:, 1:][keep], reduction="sum")
        del h
        loss.backward()
        sync()
    peak = cp.peak if cp is not None else torch.cuda.max_memory_allocated() - base
    del x, loss
    free()
    return peak


def row_calib():
    """Measurements the activation constants are fitted to (one block; the loss tail)."""
    small = ARGS.device == "cpu"
    shape = ARGS.small_shape if small else "llama-3.1-8b"
    tokens = [128, 512] if small else [4096, 16384]
    for inter in ([None, 256] if small else [None, 4096]):
        over = {} if inter is None else {"intermediate_size": inter}
        cfg, model, built = build(shape, rank=16, layers=1, embed_offload=False, **over)
        if ARGS.device != "cpu":
            overhead = torch.cuda.memory_allocated() - storage_bytes(model)
        else:
            overhead = 0
        for n in tokens:
            for ckpt in (True, False):
                if not ckpt and n != tokens[0]:
                    continue
                d = block_delta(model, cfg, n, checkpoint=ckpt)
                log(dict(row="calib_block", shape=shape, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                         heads=cfg.num_attention_heads, kv=cfg.num_key_value_heads, tokens=n, checkpoint=ckpt,
                         dropout=0.0, peak=d["peak"], forward=d.get("forward"), retained=d.get("retained"),
                         cuda_overhead=overhead,
                         per_token=round(d["peak"] / n, 1), **({} if ckpt else kept_block_counts(cfg, d, n))))
        set_rank_dropout(model, 0.05)
        d = block_delta(model, cfg, tokens[0], checkpoint=True)
        log(dict(row="calib_block", shape=shape, hidden=cfg.hidden_size, inter=cfg.intermediate_size, tokens=tokens[0],
                 checkpoint=True, dropout=0.05, peak=d["peak"], per_token=round(d["peak"] / tokens[0], 1)))
        if inter is None:
            row_calib_tiled(model, cfg, shape, tokens)
            for n in tokens:
                for offload in (False, True):
                    p = tail_delta(model, cfg, n, offload)
                    log(dict(row="calib_tail", shape=shape, hidden=cfg.hidden_size, vocab=cfg.vocab_size, tokens=n,
                             offload=offload, peak=p, per_token=round(p / n, 1)))
        del model
        free()


def row_calib_tiled(model, cfg, shape: str, tokens: list[int]) -> None:
    """One checkpointed block with its MLP forced tiled (default chunks; smaller on the CPU), at the calib
    token counts and 4x the last: the measured peak beside the plan's tiled block (block_h*H per token plus
    one chunk's block_i*I), the numbers that calibrate the tiled terms."""
    from qlora.plan import ACT
    i = cfg.intermediate_size
    chunk = CHUNK_ELEMENTS if ARGS.device != "cpu" else 64 * i
    use_tiled_mlp(model, above=1, chunk=chunk)
    for n in tokens + [4 * tokens[-1]]:
        rows = max(b - a for a, b in chunk_bounds(n, tile_rows(n, i, 1, chunk)))
        before = tiled_calls(model)
        d = block_delta(model, cfg, n, checkpoint=True)
        planned = n * ACT["block_h"] * cfg.hidden_size + rows * ACT["block_i"] * i
        log(dict(row="calib_block_tiled", shape=shape, hidden=cfg.hidden_size, inter=i, tokens=n, chunk_tokens=rows,
                 tiled_calls=tiled_calls(model) - before, peak=d["peak"], forward=d.get("forward"),
                 per_token=round(d["peak"] / n, 1), planned=round(planned), ratio=round(d["peak"] / planned, 3)))
    use_tiled_mlp(model, above=TILE_ABOVE if tiling_on() else NEVER)  # back to the run's setting


def kept_block_counts(cfg, d: dict, tokens: int) -> dict:
    """For a block run without checkpointing (what --memory-budget keeps): what it retained after forward
    per token, beside the plan's ACT saved_h/saved_i and the first-principles count (the calibration of
    a kept block)."""
    from qlora.plan import ACT, kept_block_bytes_per_token
    h, i = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    return dict(retained_per_token=round(d["retained"] / tokens, 1) if d.get("retained") is not None else None,
                plan_saved_per_token=round(ACT["saved_h"] * h + ACT["saved_i"] * i, 1),
                counted_saved_per_token=kept_block_bytes_per_token(h, i, cfg.num_attention_heads,
                                                                   cfg.num_key_value_heads, hd, rank=16))


def set_rank_dropout(model, p: float) -> None:
    for m in model.modules():
        if isinstance(m, QLoRALinear) and m.r > 0:
            m.lora_dropout = LoraDropout(p) if p > 0 else torch.nn.Identity()  # (the layer's own kind: fused_args)


def row_8b(cfg, model):
    """8B shape, seq 2048 x batch 2 under a 6.5 GiB cap (Unsloth: 6.86 GiB)."""
    seq, batch = (ARGS.cpu_seq, 2) if ARGS.device == "cpu" else (2048, 2)
    set_rank(model, 16)
    cap = None if ARGS.device == "cpu" else int(6.5 * GiB)
    report("8b_2048x2", cfg, model, [seq] * ARGS.steps, batch, 16, "paged_adamw8bit", True, cap,
           page_budget=0 if cap else None)


def row_spike(cfg, model):
    """A 4x longer batch mid-run under a cap that holds it only without optimizer states on the GPU."""
    seq = ARGS.cpu_seq if ARGS.device == "cpu" else 2048
    rank = 64
    set_rank(model, rank)
    seqs = [seq, seq, 4 * seq, seq]
    # The cap: what the spike step measures without optimizer states (the first step creates them
    # only after its backward), plus half the states. Normal steps fit with the states on the GPU,
    # the spike only without them.
    probe = report("spike_probe", cfg, model, [4 * seq], 1, rank, "adamw", False, None)
    states = plan.optimizer_state_bytes(plan.counts_for(cfg, rank=rank)["lora_numels"], "adamw")
    cap = None if ARGS.device == "cpu" else int(probe["measured_gib"] * GiB + 0.5 * states)
    for optim in ("paged_adamw", "adamw"):
        report(f"spike_{optim}", cfg, model, seqs, 1, rank, optim, False, cap, oom_retry=optim.startswith("paged"))


def row_long(cfg, model):
    """Longest sequence at batch 1 with offload (80 GB GPU, no cap)."""
    set_rank(model, 16)
    if ARGS.device == "cpu" and tiling_on():  # the CPU's short sequences stand in for long ones: tiled from 1024
        use_tiled_mlp(model, above=1024 * cfg.intermediate_size, chunk=256 * cfg.intermediate_size)
    probes = [256, 1024] if ARGS.device == "cpu" else [8192, 32768]
    times = []
    for n in probes:
        r = report("long_probe", cfg, model, [n], 1, 16, "paged_adamw8bit", True, None)
        times.append(r["step_s"][0] if r["step_s"] else float("inf"))
    # step time ~ a*T + b*T^2 (matmuls, attention), from the two probes
    (t1, t2), (n1, n2) = times, probes
    b = max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))
    a = max(0.0, t1 / n1 - b * n1)

    def guess(n):
        return (a * n + b * n * n) * 1.25 + 15

    target = ARGS.long_tokens if ARGS.device != "cpu" else 4096
    if ARGS.long_search:
        lo, hi = n2, 2 * target
        while hi - lo > max(4096, lo // 32):
            mid = (lo + hi) // 2 // 1024 * 1024
            if guess(mid) > left():
                log(dict(row="long_search", status="stopped: time limit", lo=lo, hi=hi))
                break
            rr = report("long_try", cfg, model, [mid], 1, 16, "paged_adamw8bit", True, None)
            lo, hi = (mid, hi) if rr["status"] == "ok" else (lo, mid)
        log(dict(row="long_search", longest_ok=lo))
        return
    if guess(target) > left():
        log(dict(row="long", status=f"skipped: a step at {target} would take ~{guess(target):.0f}s, {left():.0f}s left"))
        return
    offload, keep, extra = True, 0, {}
    if ARGS.long_policy == "budget" and ARGS.device != "cpu":  # what --memory-budget picks on this card and host
        from qlora.budget import card_memory, choose, host_available
        # (a tenth of the card left unplanned and no block kept whole: the tiled terms are measured only on 4 blocks,
        # a kept block at this length not at all)
        pol = choose(cfg, target, 1, int(0.9 * card_memory(torch.device("cuda"))), host_mem=host_available(), rank=16,
                     optim="paged_adamw8bit", dropout=0.0, mlp_tiling=tiling_on(), stream=False, most_kept=0,
                     embed_offload=isinstance(model.get_input_embeddings(), HostEmbedding))
        offload, keep, extra = pol.offload, pol.keep, dict(policy=pol.describe())
    report("long", cfg, model, [target], 1, 16, "paged_adamw8bit", offload, None, expected_s=round(guess(target)),
           keep=keep, **extra)


def row_70b():
    """70B shape, seq 2048 x batch 1: r=64 under 44 GiB, then r=16 under 40 GiB."""
    shape, seq, layers = ("llama-3.1-70b", 2048, None) if ARGS.device != "cpu" else (ARGS.small_shape, ARGS.cpu_seq, 2)
    if BUILD_S.get("8b") and BUILD_S["8b"] * 9.5 + 45 > left():
        log(dict(row="70b", status=f"skipped: building it would take ~{BUILD_S['8b'] * 9.5:.0f}s, {left():.0f}s left"))
        return
    cfg, model, built = build(shape, rank=64, layers=layers)
    log(build_row("70b_build", cfg, model, built))
    runs = [(64, "fp32", 44), (64, "bf16", 44), (16, "fp32", 40)]
    status = {}
    for rank, ldt, cap_gib in runs:
        if ldt == "bf16" and status.get(64) == "ok":
            continue  # bf16 factors (the paper's 65B setting) only if fp32 ones did not fit
        cap = None if ARGS.device == "cpu" else cap_gib * GiB
        if left() < 60:
            log(dict(row=f"70b_r{rank}_{ldt}", status="skipped: time limit"))
            continue
        set_rank(model, rank, torch.float32 if ldt == "fp32" else torch.bfloat16)
        budget = 0 if cap else None  # all optimizer state in host memory: the cap leaves little room
        row = report(f"70b_r{rank}_{ldt}", cfg, model, [seq] * ARGS.steps_70b, 1, rank, "paged_adamw", True, cap,
                     ldt, page_budget=budget)
        status.setdefault(rank, row["status"])
    del model
    free()


def row_consumer():
    """Consumer GPUs, the allocator capped at what a 24 GiB card leaves after the CUDA context: the 8B shape at
    batch 1, r=16 (16-bit input embeddings on the GPU, `qlora plan`'s defaults) at the longest sequence
    `qlora plan --gpu-mem 24GiB` gives, without and with activation offload, and 10% past it (which should
    not fit); then the 70B shape, r=64, seq 2048 under 46 GiB with the input embeddings in CPU memory, as
    `qlora plan --gpu-mem 46GiB` suggests."""
    small = ARGS.device == "cpu"
    if ARGS.consumer_70b != "only":
        row_consumer_8b(small)
    if ARGS.consumer_70b != "none":
        row_consumer_70b(small)


def card_cap(gpu: int) -> int:
    """What torch's caching allocator may reserve on a card of ``gpu`` bytes: all of it but the CUDA context.
    (``set_per_process_memory_fraction`` caps reserved memory, so the allocator's slack, which the plan adds on top
    of the allocated peak, must fit inside the cap: capping at ``plan.usable_bytes`` would leave none.)"""
    return gpu - plan.CONTEXT_BYTES


def row_consumer_8b(small: bool):
    shape, layers = (ARGS.small_shape, 2) if small else ("llama-3.1-8b", None)
    cfg, model, built = build(shape, rank=16, layers=layers, embed_offload=False)
    log(build_row("consumer_8b_build", cfg, model, built))
    BUILD_S["8b"] = built
    gpu = 2 * GiB if small else 24 * GiB
    cap = None if small else card_cap(gpu)
    for offload in (False, True):
        longest = plan.max_fit(cfg, gpu, batch=1, rank=16, optim="paged_adamw", offload=offload)
        if small:  # the script check: a CPU step at the plan's longest sequence of 2 GiB would take minutes
            longest = min(longest, 4 * ARGS.cpu_seq)
        tag = "offload" if offload else "resident"
        for pct in range(0, 10 * ARGS.consumer_steps_over + 1, 10):  # the plan's longest, then +10%, +20%, ...
            seq, name = int(longest * (1 + pct / 100)) // 128 * 128, f"24g_8b_{tag}_plan_longest_plus_{pct}pct"
            if left() < 120:
                log(dict(row=name, status="skipped: time limit"))
                break
            r = report(name, cfg, model, [seq], 1, 16, "paged_adamw", offload, cap, oom_retry=True,
                       gpu_gib=gpu / GiB, plan_longest=longest)
            if r["status"] != "ok":
                break
    del model
    free()


def row_consumer_70b(small: bool):
    shape, seq, layers = ("llama-3.1-70b", 2048, None) if not small else (ARGS.small_shape, ARGS.cpu_seq, 2)
    if BUILD_S.get("8b") and BUILD_S["8b"] * 9.5 + 60 > left():
        log(dict(row="48g_70b", status="skipped: time limit"))
        return
    cfg, model, built = build(shape, rank=64, layers=layers, embed_offload=True)
    log(build_row("consumer_70b_build", cfg, model, built))
    gpu = 46 * GiB
    # oom_retry: as `qlora train` does, a step that runs out of memory moves the optimizer pages to CPU memory
    # and runs again (the plan's "fits" counts on that paging)
    fits = plan.fits(plan.estimate(cfg, seq, 1, 64, "paged_adamw", embed_offload=True, gpu_mem=gpu), gpu)
    cap = None if small else card_cap(gpu)
    report("46g_70b_r64", cfg, model, [seq] * ARGS.steps_70b, 1, 64, "paged_adamw", False, cap, oom_retry=True,
           gpu_gib=46, plan_fits=fits)
    # the optimizer keeps on the GPU only the state the plan leaves room for (what --memory-budget 46GiB passes
    # to it), instead of what is free at its first step (which the next backward then lacks)
    budget = plan.page_budget(cfg, seq, 1, gpu, rank=64, embed_offload=True)
    report("46g_70b_r64_plan_page_budget", cfg, model, [seq] * ARGS.steps_70b, 1, 64, "paged_adamw", False, cap,
           page_budget=budget, oom_retry=True, gpu_gib=46, plan_fits=fits)
    del model
    free()


def row_stream70b():
    """The 70B shape on a 24 GiB card with its block weights streamed from pinned CPU memory (qlora.stream): seq 2048
    x batch 1, r=16, activation offload, input embeddings in CPU memory, paged AdamW keeping the state the plan
    leaves room for; the allocator capped at what a 24 GiB card leaves after the CUDA context, for the build too
    (which moves each block to host memory as soon as it is complete). ``--cpu``: the small shape cut to 4 blocks,
    streamed between CPU buffers (a check of the script)."""
    from qlora.stream import WeightStreamer
    small = ARGS.device == "cpu"
    shape, seq, layers = ("llama-3.1-70b", 2048, None) if not small else (ARGS.small_shape, ARGS.cpu_seq, 4)
    if BUILD_S.get("8b") and BUILD_S["8b"] * 12 + 90 > left():
        log(dict(row="24g_70b_stream", status="skipped: time limit"))
        return
    gpu = 24 * GiB
    cap = None if small else card_cap(gpu)
    n, only = True, None
    if ARGS.stream_blocks == "fewest":  # as many blocks as the budget streams for this card (the others resident)
        from qlora.budget import choose
        cfg0 = plan.shape_config(shape)
        if layers:
            cfg0.num_hidden_layers = layers
        n = choose(cfg0, seq, 1, gpu if not small else 4 * GiB, rank=16, dropout=0.0, embed_offload=True,
                   offload=True).stream or True
        only = None if n is True or n == cfg0.num_hidden_layers else plan.streamed_blocks(cfg0.num_hidden_layers, n)
    st = WeightStreamer(include_cpu=small, only=only)
    if not small:
        torch.cuda.reset_peak_memory_stats()
    with memory_cap(cap):
        cfg, model, built = build(shape, rank=16, layers=layers, embed_offload=True, stream=st)
    # the plan's bytes of the built model: its weights on the device (the blocks not streamed, the slots) and LoRA
    est = plan.estimate(cfg, seq, 1, 16, embed_offload=isinstance(model.get_input_embeddings(), HostEmbedding),
                        offload=True, offload_weights=n)
    static = sum(est["components"][k] for k in ("weights_4bit", "dq_constants", "frozen_16bit", "weight_slots",
                                                "lora_params"))
    row = dict(row="24g_70b_stream_build", seconds=round(built, 1), plan_bytes=static, host_gib=round(st.host_bytes / GiB, 3),
               plan_host_gib=round(est["host"]["weights"] / GiB, 3),
               streamed_blocks=len(st.blocks), slot_mib=round(st.slot_bytes / 2**20, 1),
               pinned=st.pinned, storage_bytes=storage_bytes(model) + sum(s.data.numel() for s in st.slots))
    if not small:
        row.update(allocated=torch.cuda.memory_allocated(), build_peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 3))
    log(row)
    budget = plan.page_budget(cfg, seq, 1, gpu, rank=16, embed_offload=True, offload=True, offload_weights=n)
    before = dict(st.stats)
    r = report("24g_70b_stream_r16", cfg, model, [seq] * ARGS.steps_70b, 1, 16, "paged_adamw", True, cap,
               page_budget=budget, oom_retry=True, offload_weights=n, gpu_gib=24)
    steps = max(1, len(r["step_s"]))
    copied = st.stats["bytes"] - before.get("bytes", 0)
    log(dict(row="24g_70b_stream_copies", copied_gib_per_step=round(copied / steps / GiB, 2),
             fetched_per_step=round((st.stats["fetched"] - before.get("fetched", 0)) / steps, 1),
             misses=st.stats["misses"] - before.get("misses", 0),
             copied_gb_s_over_the_fastest_step=round(copied / steps / 1e9 / min(r["step_s"] or [1]), 1)))
    del model, st  # (the pinned host buffers go with the streamer)
    free()


def replay(path: str) -> None:
    """Recompute the predictions of a results file with the current plan; print a Markdown table."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| row | shape | seq x batch | rank | optim | offload | cap GiB | status | measured GiB | predicted GiB | ratio | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "measured_gib" not in r:
            continue
        cfg = plan.shape_config(r["shape"])
        cfg.num_hidden_layers = r["layers"]
        est = plan.estimate(cfg, r["seq"], r["batch"], r["rank"], r["optim"], offload=r["offload"],
                            embed_offload=r.get("embed_offload", False), lora_dtype=r.get("lora_dtype", "fp32"),
                            page_budget=r.get("page_budget"), first_step=len(r["seqs"]) == 1,
                            mlp_tiling=r.get("mlp_chunk_tokens", 0) > 0,  # (rows from before tiling: untiled)
                            offload_weights=r.get("offload_weights", False))
        p = est["peak"] / GiB
        print(f"| {r['row']} | {r['shape']} | {r['seq']} x {r['batch']} | {r['rank']} ({r.get('lora_dtype', 'fp32')}) | "
              f"{r['optim']} | {'yes' if r['offload'] else 'no'} | {r['cap_gib'] or '-'} | {r['status']} | "
              f"{r['measured_gib']:.2f} | {p:.2f} | {r['measured_gib'] / p:.3f} | {r['tok_s'] or '-'} |")


def main(argv=None) -> int:
    global ARGS, OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="calib,8b,spike,70b,long", help="comma list of rows")
    ap.add_argument("--all", action="store_true", help="every row")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    ap.add_argument("--steps", type=int, default=3, help="steps per row (default 3)")
    ap.add_argument("--steps-70b", type=int, default=2, help="steps per 70B row (default 2)")
    ap.add_argument("--time-limit", type=float, default=510, help="seconds for the whole script (default 510)")
    ap.add_argument("--long-tokens", type=int, default=204800, help="tokens of the long row (default 204800)")
    ap.add_argument("--long-search", action="store_true", help="binary-search the longest sequence (slow)")
    ap.add_argument("--stream-blocks", default="all", choices=["all", "fewest"],
                    help="the stream70b row: stream every block's weights (all, default) or only as many as the "
                         "memory budget streams for a 24 GiB card (fewest; the others stay on the device)")
    ap.add_argument("--long-policy", default="all", choices=["all", "budget"],
                    help="the long row's activations: every block input in CPU memory (all, default), or the policy "
                         "--memory-budget picks for this card and this machine's CPU memory (budget: only the inputs "
                         "that must leave the GPU)")
    ap.add_argument("--layers", type=int, default=None,
                    help="blocks of the 8B shape for the 8b/spike/long rows (default all 32): a step at 400k tokens "
                         "takes ~10 min with 32; fewer blocks check the same per-block peak in a quarter of it "
                         "(the plan predicts each row for the blocks it has)")
    ap.add_argument("--mlp-tiling", default="on", choices=["on", "off"],
                    help="on (default): long sequences run the MLP tiled, as qlora train does; off: never (to compare)")
    ap.add_argument("--cpu", action="store_true", help="run tiny shapes on the CPU (checks the script)")
    ap.add_argument("--small-shape", default="smollm2-135m", help="shape for --cpu (default smollm2-135m)")
    ap.add_argument("--cpu-seq", type=int, default=128)
    ap.add_argument("--replay", metavar="FILE", help="print the table of FILE with the current plan")
    ap.add_argument("--consumer-steps-over", type=int, default=1,
                    help="consumer row: also try the 8B sequence 10%%, 20%%, ... past the plan's longest, up to N steps")
    ap.add_argument("--consumer-70b", default="also", choices=["also", "none", "only"],
                    help="consumer row: the 70B part after the 8B one (also), not at all (none), or alone (only)")
    ARGS = ap.parse_args(argv)
    if ARGS.replay:
        replay(ARGS.replay)
        return 0
    ARGS.device = "cpu" if ARGS.cpu or not torch.cuda.is_available() else "cuda"
    OUT = ARGS.out
    rows = "calib,8b,spike,70b,long" if ARGS.all else ARGS.rows
    rows = [r.strip() for r in rows.split(",") if r.strip()]
    env = dict(row="env", device=torch.cuda.get_device_name(0) if ARGS.device == "cuda" else "cpu",
               torch=torch.__version__, rows=rows)
    if ARGS.device == "cuda":
        env["gpu_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 2)
    import transformers
    env["transformers"] = transformers.__version__
    log(env)
    for name in rows:
        if name not in ("calib", "8b", "spike", "70b", "long", "consumer", "stream70b"):
            raise SystemExit(f"unknown row {name!r}")
    shared = None
    order = [r for r in ("calib", "8b", "spike", "70b", "long", "consumer", "stream70b") if r in rows]
    for name in order:
        try:
            if name == "calib":
                row_calib()
            elif name in ("consumer", "stream70b"):
                if shared is not None:
                    shared[1].to("cpu")
                    free()
                row_consumer() if name == "consumer" else row_stream70b()
            elif name == "70b":
                if shared is not None:  # make room: the shared 8B model waits in CPU memory
                    shared[1].to("cpu")
                    free()
                row_70b()
                if shared is not None:
                    shared[1].to(ARGS.device)
            else:
                if shared is None:
                    small = ARGS.device == "cpu"
                    cfg, model, built = build(ARGS.small_shape if small else "llama-3.1-8b", rank=16,
                                              layers=2 if small else ARGS.layers)
                    log(build_row("8b_build", cfg, model, built))
                    BUILD_S["8b"] = built
                    shared = (cfg, model)
                {"8b": row_8b, "spike": row_spike, "long": row_long}[name](*shared)
        except Exception as e:  # keep going: one broken row must not cost the others
            import traceback
            log(dict(row=name, status=f"error: {type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:]))
        free()
        log(dict(row="time", after=name, left_s=round(left())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
