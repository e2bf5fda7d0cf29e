"""Data-parallel QLoRA throughput: the train_speed.py work (random-weight Llama shape, NF4 + DQ,
LoRA r=16 all-linear, gradient checkpointing, paged AdamW, clip 0.3) on N GPUs with qlora's
data-parallel step (qlora/distributed.py: each rank its own micro-batch, one all-reduce of the
LoRA gradients). Launch with torchrun; rank 0 prints one JSON line.

    torchrun --standalone --nproc-per-node 2 bench/ddp_speed.py --shape 8b --seq 2048 --batch 2
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--mem-cap-gib", type=float, default=None, help="cap each process (set_per_process_memory_fraction)")
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig

    from bench.train_speed import SHAPES
    from qlora.distributed import Dist
    from qlora.model import LoraSettings, QuantSettings, build_random
    from qlora.optim import make_optimizer
    from qlora.train import loss_sum
    dist = Dist.from_env("cuda")
    dev = dist.device("cuda")
    if a.mem_cap_gib:
        torch.cuda.set_per_process_memory_fraction(a.mem_cap_gib * 2**30 / torch.cuda.get_device_properties(dev).total_memory)
    cfg = LlamaConfig(**SHAPES[a.shape], rope_theta=500000.0, max_position_embeddings=8192)
    model = build_random(cfg, QuantSettings(), LoraSettings(r=16, alpha=16, dropout=0.0), dev, "bf16", progress=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "paged_adamw", lr=2e-4)
    g = torch.Generator().manual_seed(1000 + dist.rank)
    times = []
    for _ in range(a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
        torch.cuda.synchronize(dev)
        t = time.time()
        n = dist.sum(a.batch * (a.seq - 1))
        (loss_sum(model, {"input_ids": ids, "labels": ids}, dev) / n).backward()
        dist.all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(dev)
        times.append(time.time() - t)
    med = sorted(times[2:])[len(times[2:]) // 2]
    peak = torch.cuda.max_memory_allocated(dev) / 2**30
    if dist.main:
        print(json.dumps(dict(gpus=dist.world, shape=a.shape, seq=a.seq, batch_per_gpu=a.batch, step_s=round(med, 3),
                              tok_s=round(dist.world * a.batch * a.seq / med, 1), peak_gib_rank0=round(peak, 2),
                              device=torch.cuda.get_device_name(dev))), flush=True)
    dist.close()


if __name__ == "__main__":
    main()
