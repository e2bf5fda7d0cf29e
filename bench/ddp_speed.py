"""Multi-GPU QLoRA throughput and memory: the train_speed.py work (random-weight Llama shape,
NF4 + DQ, LoRA r=16 all-linear, gradient checkpointing, paged AdamW, clip 0.3) with the
data-parallel modes of ``qlora train`` (qlora/parallel.py, the same step code):

* ``--parallel none``  one process (run without torchrun): the baseline;
* ``--parallel ddp``   torch DDP, every GPU holds the 4-bit model, LoRA grads all-reduced in backward;
* ``--parallel fsdp``  FSDP2: the 4-bit base, LoRA and optimizer state sharded over the GPUs,
  each block sharded as it is built (no process ever holds the whole model).

``--mem-cap-gib`` caps each process's CUDA allocator (``set_per_process_memory_fraction``), e.g.
24 to act as a 24 GB card. Rank 0 prints one JSON line (tokens/s over all GPUs, peak memory).

    python bench/ddp_speed.py --shape 8b --parallel none
    torchrun --standalone --nproc-per-node 2 bench/ddp_speed.py --shape 8b --parallel ddp
    torchrun --standalone --nproc-per-node 2 bench/ddp_speed.py --shape 70b --batch 1 --parallel fsdp \\
        --mem-cap-gib 24 --offload-activations
"""
import argparse
import json
import time



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", help="a `qlora plan` shape: 1b, 8b, 70b, ...")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    ap.add_argument("--steps", type=int, default=6, help="steps timed (the first 2 are warm-up, not counted)")
    ap.add_argument("--parallel", default="ddp", choices=["none", "ddp", "fsdp"])
    ap.add_argument("--mem-cap-gib", type=float, default=None, help="cap each process (set_per_process_memory_fraction)")
    ap.add_argument("--offload-activations", action="store_true", help="checkpointed block inputs in pinned CPU memory")
    ap.add_argument("--offload-embeddings", action="store_true", help="input embedding table in CPU memory")
    ap.add_argument("--trace-memory", action="store_true", help="rank 0 prints allocated GiB at each phase of step 1")
    a = ap.parse_args()
    import os
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from qlora.distributed import Dist
    from qlora.model import LoraSettings, QuantSettings, build_random
    from qlora.offload import enable_checkpointing
    from qlora.optim import make_optimizer
    from qlora.parallel import Parallel
    from qlora.plan import shape_config
    t_start = time.time()
    dist = Dist.from_env("cuda")
    dev = torch.device(dist.device("cuda"))
    if a.mem_cap_gib:
        torch.cuda.set_per_process_memory_fraction(a.mem_cap_gib * 2**30 / torch.cuda.get_device_properties(dev).total_memory)
    par = Parallel(dist, a.parallel, dev)
    cfg = shape_config(a.shape)
    model = build_random(cfg, QuantSettings(), LoraSettings(r=16, alpha=16, dropout=0.0), dev, "bf16", progress=False,
                         on_block=par.block_hook())
    mem = lambda what: a.trace_memory and dist.main and print(  # noqa: E731
        f"memory {what}: {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB allocated, "
        f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} peak", flush=True)
    mem("built")
    if a.offload_embeddings:
        from qlora.offload import offload_embeddings
        offload_embeddings(model)
    off = enable_checkpointing(model, offload=a.offload_activations)
    model.train()
    par.wrap(model)
    mem("wrapped")
    here, whole = par.local_bytes()
    load_s = time.time() - t_start
    opt = make_optimizer(par.optimizer_params(), "paged_adamw", lr=2e-4)
    g = torch.Generator().manual_seed(1000 + dist.rank)
    times, losses = [], []
    import contextlib
    for _ in range(a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
        torch.cuda.synchronize(dev)
        t = time.time()
        n = dist.sum(a.batch * (a.seq - 1))
        with (off.hooks() if off is not None else contextlib.nullcontext()), par.sync_context(True):
            loss = par.loss({"input_ids": ids, "labels": ids}) / n
            mem("after forward")
            (loss * par.grad_scale).backward()
        mem("after backward")
        par.before_optimizer()
        par.clip_grad_norm(0.3)
        opt.step()
        mem("after optimizer step")
        a.trace_memory = False
        opt.zero_grad(set_to_none=True)
        par.zero_grad()
        losses.append(dist.sum(loss.item()))
        torch.cuda.synchronize(dev)
        times.append(time.time() - t)
    timed = times[2:] or times
    med = sorted(timed)[len(timed) // 2]
    peak = dist.sum(torch.cuda.max_memory_allocated(dev) / 2**30) / dist.world
    peak_max = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30], device=dev)
    reserved = torch.tensor([torch.cuda.max_memory_reserved(dev) / 2**30], device=dev)
    if dist.active:
        import torch.distributed as tdist
        tdist.all_reduce(peak_max, op=tdist.ReduceOp.MAX)
        tdist.all_reduce(reserved, op=tdist.ReduceOp.MAX)
    if dist.main:
        print(json.dumps(dict(gpus=dist.world, parallel=par.mode, shape=a.shape, seq=a.seq, batch_per_gpu=a.batch,
                              step_s=round(med, 3), tok_s=round(dist.world * a.batch * a.seq / med, 1),
                              peak_gib_mean=round(peak, 2), peak_gib_max=round(peak_max.item(), 2),
                              reserved_gib_max=round(reserved.item(), 2), cap_gib=a.mem_cap_gib,
                              model_gib_per_gpu=round(here / 2**30, 2), model_gib=round(whole / 2**30, 2),
                              load_s=round(load_s, 1), losses=[round(x, 4) for x in losses],
                              offload_activations=a.offload_activations, offload_embeddings=a.offload_embeddings,
                              device=torch.cuda.get_device_name(dev), torch=torch.__version__)), flush=True)
    dist.close()


if __name__ == "__main__":
    main()
