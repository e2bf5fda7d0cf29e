"""Mixture-of-experts training on one GPU: qlora (experts in NF4, qlora.moe) beside transformers +
bitsandbytes + peft (experts stay 16-bit there: bitsandbytes quantizes nn.Linear only).

    python bench/moe.py                          # every row on one GPU (H100/H200), a few minutes
    python bench/moe.py --rows ours,peer --steps 6
    python bench/moe.py --small                  # tiny shapes on the CPU: checks the script end to end

Rows (``--rows``, comma separated):

* ``ours``     Qwen3-30B-A3B shape (48 layers, 128 experts, top-8), random weights built directly in 4-bit
               one linear at a time (``qlora.model.build_random``: no 16-bit copy of the model), seq 2048 x
               batch 1, LoRA r=16 on ``--target`` (default all-linear: attention; add ``,experts`` for the
               routed experts too), per-block checkpointing, paged AdamW, under a ``--cap-gib`` (20) GiB cap
               (``torch.cuda.set_per_process_memory_fraction``): peak ``max_memory_allocated``, tokens/s,
               and ``qlora plan``'s prediction.
* ``profile``  one more step of the ``ours`` model with the experts modules timed (forward, recompute and
               backward, synchronized hooks): the share of the step spent in the routed experts.
* ``peer``     the same shape and settings with transformers' own model: block linears as bitsandbytes
               ``Linear4bit`` (NF4 + double quant), the fused 3-D experts random bf16 parameters, peft LoRA
               r=16 on all-linear, gradient checkpointing, bitsandbytes' paged AdamW, under the same cap:
               its peak and tokens/s, or the OOM (with the bytes its 16-bit experts alone need).
* ``mixtral``  Mixtral-8x7B shape with ours, seq 2048 x batch 1, r=16, under ``--mixtral-cap-gib`` (32) GiB.

One JSON line per row, then a table with our figure beside the peer's.
"""
from __future__ import annotations

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from qlora import plan  # noqa: E402
from qlora.loss import loss_sum  # noqa: E402
from qlora.model import LoraSettings, QuantSettings, build_random  # noqa: E402
from qlora.moe import QLoRAExperts  # noqa: E402
from qlora.offload import enable_checkpointing  # noqa: E402
from qlora.optim import make_optimizer  # noqa: E402

GiB = 1 << 30
SMALL = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             vocab_size=512)
SMALL_EXPERTS = {"qwen3-30b-a3b": dict(moe_intermediate_size=64, intermediate_size=256, num_experts=8,
                                       num_experts_per_tok=2),
                 "mixtral-8x7b": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)}


def config(shape: str, small: bool):
    cfg = plan.shape_config(shape)
    if small:
        for k, v in {**SMALL, **SMALL_EXPERTS[shape]}.items():
            setattr(cfg, k, v)
    return cfg


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_cap(dev, cap_gib: float | None):
    """Cap what torch may allocate on the GPU at ``cap_gib`` for the block (no-op on the CPU)."""
    if dev.type != "cuda" or cap_gib is None:
        yield
        return
    idx = dev.index if dev.index is not None else torch.cuda.current_device()  # torch wants an index here
    total = torch.cuda.get_device_properties(idx).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), idx)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, idx)


def peak_bytes(dev) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def batch_of(cfg, seq: int, batch: int, seed: int) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def run_steps(step, cfg, args, dev) -> dict:
    """``step(batch) -> loss`` for ``args.steps`` steps: losses, median tokens/s after the first two."""
    times, losses = [], []
    for k in range(args.steps):
        b = batch_of(cfg, args.seq, args.batch, k)
        sync(dev)
        t = time.perf_counter()
        losses.append(round(float(step(b)), 4))
        sync(dev)
        times.append(time.perf_counter() - t)
    warm = times[2:] or times
    tok = args.batch * args.seq
    med = statistics.median(warm)
    return dict(losses=losses, step_s=round(med, 4), tokens_per_s=round(tok / med, 1))


# ---------------------------------------------------------------------------------------------
# ours


def build_ours(cfg, args, dev, target):
    t = time.perf_counter()
    model = build_random(cfg, QuantSettings(compute_dtype="bf16" if dev.type == "cuda" else "fp32"),
                         LoraSettings(r=args.rank, alpha=16, dropout=0.0, target=target), device=dev,
                         dtype="bf16" if dev.type == "cuda" else "fp32", progress=False)
    return model, time.perf_counter() - t


def ours_step_fn(model, dev):
    enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "paged_adamw", lr=1e-4)

    def step(b):
        n = int((b["labels"][:, 1:] != -100).sum())
        loss = loss_sum(model, b, dev) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def row_ours(name, shape, cap, args, dev, target, profile=False) -> list[dict]:
    cfg = config(shape, args.small)
    free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rows = []
    with memory_cap(dev, cap):
        try:
            model, build_s = build_ours(cfg, args, dev, target)
            step = ours_step_fn(model, dev)
            res = run_steps(step, cfg, args, dev)
            status = "ok"
        except torch.cuda.OutOfMemoryError as e:
            model, res, status, build_s = None, {}, f"OOM: {str(e).splitlines()[0][:120]}", None
        est = plan.estimate(cfg, args.seq, args.batch, args.rank, "paged_adamw", target=target)
        rows.append(dict(row=name, shape=shape, who="qlora", status=status, cap_gib=cap, peak_gib=_gib(peak_bytes(dev)),
                         plan_gib=round(est["peak"] / GiB, 2), build_s=round(build_s, 1) if build_s else None,
                         seq=args.seq, batch=args.batch, rank=args.rank, target=target, **res))
        if profile and model is not None:
            rows.append(dict(row="profile", shape=shape, **expert_share(model, step, cfg, args, dev)))
    del model
    free()
    return rows


def expert_share(model, step, cfg, args, dev) -> dict:
    """Time in the routed experts during one step: forward (and its recompute) and backward of every
    :class:`QLoRAExperts`, each bracketed by synchronized hooks (which slow the step a little)."""
    spent = {"forward": 0.0, "backward": 0.0}
    starts: dict = {}
    handles = []

    def pre(kind):
        def hook(mod, *_):
            sync(dev)
            starts[(id(mod), kind)] = time.perf_counter()
        return hook

    def post(kind):
        def hook(mod, *_):
            sync(dev)
            spent[kind] += time.perf_counter() - starts.pop((id(mod), kind))
        return hook

    for m in model.modules():
        if isinstance(m, QLoRAExperts):
            handles += [m.register_forward_pre_hook(pre("forward")), m.register_forward_hook(post("forward")),
                        m.register_full_backward_pre_hook(pre("backward")),
                        m.register_full_backward_hook(post("backward"))]
    try:
        b = batch_of(cfg, args.seq, args.batch, 99)
        sync(dev)
        t = time.perf_counter()
        step(b)
        sync(dev)
        total = time.perf_counter() - t
    finally:
        for h in handles:
            h.remove()
    return dict(step_s=round(total, 4), experts_forward_s=round(spent["forward"], 4),
                experts_backward_s=round(spent["backward"], 4),
                experts_share=round((spent["forward"] + spent["backward"]) / total, 3))


# ---------------------------------------------------------------------------------------------
# the peer: transformers + bitsandbytes + peft


def build_peer(cfg, args, dev):
    """transformers' model with random weights: block nn.Linear -> bitsandbytes Linear4bit (NF4 + DQ, quantized
    as each moves to the device), the rest (fused experts included) random 16-bit, one tensor at a time."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation="sdpa")
    g = torch.Generator(device=dev).manual_seed(0)
    head = model.get_output_embeddings()
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is torch.nn.Linear and child is not head and ".layers." in f"{name}.":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dt,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                w = torch.randn(child.out_features, child.in_features, device=dev, dtype=dt, generator=g) * 0.02
                q.weight = bnb.nn.Params4bit(w.cpu() if dev.type == "cpu" else w, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to(dev)
                setattr(mod, child_name, q)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            mod_name, _, attr = name.rpartition(".")
            t = (torch.ones if "norm" in attr or "norm" in mod_name.rsplit(".", 1)[-1] else torch.randn)(
                p.shape, device=dev, dtype=dt) * (1 if "norm" in name else 0.02)
            setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=False))
    from qlora.model import _donor_buffers  # rotary tables: computed from the config (a one-layer twin's)
    donor = _donor_buffers(cfg, dt)
    for name, b in list(model.named_buffers()):
        if b.is_meta:
            mod_name, _, attr = name.rpartition(".")
            model.get_submodule(mod_name).register_buffer(attr, donor[name].to(dev), persistent=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def row_peer(shape, cap, args, dev) -> dict:
    from peft import LoraConfig, get_peft_model
    cfg = config(shape, args.small)
    expert_bytes = sum(int(torch.Size(s).numel()) * 2 for s in _expert_shapes(cfg))
    free()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    out = dict(row="peer", shape=shape, who="transformers+bitsandbytes+peft", cap_gib=cap,
               experts_16bit_gib=round(expert_bytes / GiB, 3), seq=args.seq, batch=args.batch, rank=args.rank)
    with memory_cap(dev, cap):
        model = None
        try:
            t = time.perf_counter()
            model = build_peer(cfg, args, dev)
            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules="all-linear"))
            out["build_s"] = round(time.perf_counter() - t, 1)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = _peer_optimizer(params, dev)

            def step(b):
                loss = model(input_ids=b["input_ids"].to(dev), labels=b["labels"].to(dev), use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.3)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()
            out.update(run_steps(step, cfg, args, dev), status="ok")
        except torch.cuda.OutOfMemoryError as e:
            out["status"] = f"OOM{' while building' if 'build_s' not in out else ''}: {str(e).splitlines()[0][:120]}"
        out["peak_gib"] = _gib(peak_bytes(dev))
    del model
    free()
    return out


def _expert_shapes(cfg):
    from transformers import AutoModelForCausalLM

    from qlora.moe import fused_experts
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    return [tuple(p.shape) for mod in fused_experts(m).values() for p in (mod.gate_up_proj, mod.down_proj)]


def _peer_optimizer(params, dev):
    if dev.type == "cuda":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def _gib(b):
    return None if b is None else round(b / GiB, 2)


# ---------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = [f"{'row':9} {'shape':14} {'who':32} {'status':10} {'peak GiB':>9} {'plan GiB':>9} {'tok/s':>9}"]
    for r in rows:
        if r["row"] == "profile":
            lines.append(f"{'profile':9} {r['shape']:14} experts: {100 * r['experts_share']:.0f}% of a "
                         f"{r['step_s']:.3f} s step (fwd+recompute {r['experts_forward_s']:.3f} s, "
                         f"bwd {r['experts_backward_s']:.3f} s)")
            continue
        status = "ok" if r["status"] == "ok" else "OOM"
        lines.append(f"{r['row']:9} {r['shape']:14} {r['who']:32} {status:10} {_fmt(r.get('peak_gib')):>9} "
                     f"{_fmt(r.get('plan_gib')):>9} {_fmt(r.get('tokens_per_s')):>9}")
        if r["row"] == "peer":
            lines.append(f"{'':9} {'':14} (its 16-bit experts alone: {r['experts_16bit_gib']} GiB; "
                         f"cap {r['cap_gib']} GiB)")
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None else f"{v}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="ours,profile,peer,mixtral")
    p.add_argument("--small", action="store_true", help="tiny layer count and sizes (runs on the CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (--small: 64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--target", default="all-linear", help="LoRA targets of our rows (e.g. all-linear,experts)")
    p.add_argument("--cap-gib", type=float, default=20.0)
    p.add_argument("--mixtral-cap-gib", type=float, default=32.0)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.seq = args.seq or (64 if args.small else 2048)
    rows_wanted = args.rows.split(",")
    rows = []
    if "ours" in rows_wanted:
        rows += row_ours("ours", "qwen3-30b-a3b", args.cap_gib, args, dev, args.target, "profile" in rows_wanted)
    if "peer" in rows_wanted:
        rows.append(row_peer("qwen3-30b-a3b", args.cap_gib, args, dev))
    if "mixtral" in rows_wanted:
        rows += row_ours("mixtral", "mixtral-8x7b", args.mixtral_cap_gib, args, dev, args.target)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    for r in rows:
        r["device"] = dev_name
        line = json.dumps(r)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
