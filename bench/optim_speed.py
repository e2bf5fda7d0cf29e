"""Optimizer step time on a LoRA parameter set: state resident on the GPU against paged out between steps.

    python bench/optim_speed.py                      # 8B and 1B shapes, r 16, on CUDA
    python bench/optim_speed.py --shapes 1b --chunk-mib 8,32
    python bench/optim_speed.py --device cpu --shapes tiny   # checks the script

For each shape (the LoRA A/B factors of every q/k/v/o/gate/up/down projection, fp32, as ``qlora train``
makes them), ``paged_adamw`` with the budget decided from free memory (the state stays resident: what
``adamw`` costs) and with budget 0 (``--offload-optimizer``: every page goes to pinned host memory after
its update and comes back next step), at each ``--chunk-mib`` paging chunk size. Each step is
``clip_grad_norm_`` + ``step()`` with the device synchronised before and after; prints the median
step and the copies the pager issued per step. The GPU is otherwise idle here, so host overhead shows in
full; inside training the step's host work overlaps the end of the backward.
"""
from __future__ import annotations

import argparse
import sys
import time


import torch  # noqa: E402

from qlora import optim  # noqa: E402

# layers, hidden, key/value width, intermediate
SHAPES = {"8b": (32, 4096, 1024, 14336), "1b": (16, 2048, 512, 8192), "tiny": (2, 64, 16, 128)}


def lora_params(layers: int, hidden: int, kv: int, inter: int, r: int, device: str) -> list[torch.nn.Parameter]:
    out = []
    for _ in range(layers):
        for n_in, n_out in ((hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter),
                            (hidden, inter), (inter, hidden)):
            out += [torch.nn.Parameter(torch.randn(r, n_in, device=device) * 0.01),
                    torch.nn.Parameter(torch.zeros(n_out, r, device=device))]
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(shape: str, r: int, budget: int | None, chunk_mib: int, steps: int, device: str) -> dict:
    optim.PAGED_CHUNK_BYTES = chunk_mib << 20
    ps = lora_params(*SHAPES[shape], r, device)
    opt = optim.make_optimizer(ps, "paged_adamw", lr=2e-4, page_budget_bytes=budget)
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for i in range(steps):
        if i == 2:
            before = dict(opt.pager.stats)
        sync(device)
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(ps, 0.3)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in ps)
    st = opt.pager.stats
    per = {k: (st[k] - before.get(k, 0)) / (steps - 2) for k in ("copies_in", "copies_out")}
    return dict(shape=shape, rank=r, paged=budget == 0, chunk_mib=chunk_mib, params_m=round(n / 1e6, 1),
                state_mib=round(n * 8 / 2**20), step_ms=round(sorted(times[2:])[(steps - 2) // 2] * 1e3, 2),
                min_ms=round(min(times[2:]) * 1e3, 2), **{k: round(v, 1) for k, v in per.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8b,1b", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--chunk-mib", default="32", help="paging chunk sizes to time, comma-separated MiB (default 32)")
    ap.add_argument("--steps", type=int, default=12, help="steps per row, the first two not timed (default 12)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu (checks the script only)")
    if a.steps < 3:
        sys.exit("--steps must be at least 3 (two warm-up steps)")
    for shape in a.shapes.split(","):
        if shape not in SHAPES:
            sys.exit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        rows = [(None, 32)] + [(0, int(c)) for c in a.chunk_mib.split(",")]
        for budget, chunk in rows:
            r = run(shape, a.rank, budget, chunk, a.steps, a.device)
            print(f"{shape} {'paged, budget 0' if r['paged'] else 'resident':16s} chunk {chunk:3d} MiB: "
                  f"{r['params_m']}M params, {r['state_mib']} MiB state: step {r['step_ms']} ms "
                  f"(min {r['min_ms']}); copies per step in {r['copies_in']} / out {r['copies_out']}", flush=True)
            if a.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
