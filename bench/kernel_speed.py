"""Kernel benchmark on one CUDA GPU: our Triton kernels vs our torch references vs bitsandbytes.

    python bench/kernel_speed.py [--sweep] [--gemv-decompose] [--skip SECTIONS] [--json results.json]

Prints, each measured in this run, two kinds of time: "graph" = GPU time per call replayed from
a CUDA graph over several copies of the weights read in turn (so reads come from device memory,
not L2, and no Python or launch overhead counts), and "eager" = ``triton.testing.do_bench`` of
the Python call (median; it flushes L2 before each call), which includes host overhead when the
host is slower than the GPU. Host microseconds per call are printed beside them.

* the copy ceiling (device-to-device copy, bytes read + written);
* NF4+DQ dequantize to bf16, in TB/s counting packed codes + 8-bit absmax read + bf16 written
  (the same count as shared/bench/reference_dequant.py): ours (fresh output and preallocated
  buffer), our torch reference, bitsandbytes; for 4096², 14336x4096, 4096x14336, 128256x4096;
* a 4-bit matmul of 4096 tokens (our dequant into a reused buffer + cuBLAS) vs the bf16 matmul;
* the 1-token GEMV: ours (the Triton kernel, and on Hopper the CUDA kernel of gemv_cuda.py that
  ``kernels.matmul_4bit`` takes there) vs bitsandbytes vs the torch reference, plus 4 and 16 rows
  (Triton only);
* RMSNorm / SwiGLU / RoPE forward+backward vs torch, and the chunked loss vs the unfused one;
* the one-row LoRA product of CUDA-graph decoding (lora_row.py) vs torch's x @ A.T + addmm;
* keyed LoRA dropout (dropout.py) vs torch's F.dropout, and the LoRA products with that dropout inside
  (lora_dropout.py) vs the separate dropout kernel + cuBLAS vs cuBLAS without dropout.

``--sweep`` also times launch configurations of the dequant and GEMV kernels (for tuning);
``--gemv-decompose`` times the CUDA GEMV with stages left out (where its time goes).
bitsandbytes is optional: its columns read "-" when it is not importable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from qlora import nf4  # noqa: E402
from qlora.kernels import gemv, gemv_cuda, loss, norm_act  # noqa: E402
from qlora.kernels.dequant import dequantize_4bit_triton  # noqa: E402

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # noqa: BLE001 - any import failure means "no reference here"
    bnb = bnbF = None

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
RESULTS: dict = {}


def bench(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fns, reps=10):
    """GPU time per call, replayed from a CUDA graph (no Python or launch overhead). ``fns`` are
    called in turn, each on its own copy of the weights, so that reads come from device memory
    rather than the 50 MB L2. Returns None when a call cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                for f in fns:
                    f()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return sorted(times)[len(times) // 2] / (reps * len(fns))
    except Exception as e:  # noqa: BLE001
        print(f"    (graph capture failed: {type(e).__name__}: {str(e)[:100]})")
        torch.cuda.synchronize()
        return None


def cpu_us(fn, n=100):
    """Host time per call (launch-bound when the GPU keeps up): explains eager timings."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def copies(packed, st, ref, nbytes_target=160e6):
    """Enough copies of a packed weight (and its scales) to overflow L2 when read in turn."""
    from dataclasses import replace
    r = max(2, int(nbytes_target // max(1, packed.numel())) + 1)
    ours = [(packed.clone(), replace(st, absmax=st.absmax.clone())) for _ in range(r)]
    theirs = [(ref[0].clone(), ref[1]) for _ in range(r)] if ref else []
    return ours, theirs


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def quantized(n, k, seed=0):
    """Our NF4+DQ weight and, if bitsandbytes is here, its quantization of the same weight."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    packed, st = nf4.quantize_4bit(w, 64, "nf4", True)
    ref = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) if bnbF else None
    return w, packed, st, ref


def copy_ceiling():
    x = torch.randn(2 ** 28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), 50, 300)
    tb = 2 * x.numel() * 2 / ms / 1e9
    RESULTS["copy_TBps"] = tb
    print(f"copy ceiling: {tb:.2f} TB/s")
    return tb


def dequant_table(sweep: bool):
    print("\nNF4+DQ dequantize -> bf16 (TB/s = packed + u8 absmax + bf16 out); 'graph' = GPU time from a"
          " CUDA graph over rotating weight copies, 'eager' = do_bench of the Python call")
    print(f"{'shape':>13} {'ours us':>8} {'ours TB/s':>9} {'eager':>6} {'bnb TB/s':>8} {'eager':>6} {'torch':>6} "
          f"{'cpu us ours/bnb':>15} {'exact':>5}")
    for n, k in SHAPES:
        w, packed, st, ref = quantized(n, k)
        nbytes = n * k // 2 + n * k // 64 + n * k * 2
        buf = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
        exact = torch.equal(dequantize_4bit_triton(packed, st), nf4.dequantize_4bit(packed, st))
        ours, theirs = copies(packed, st, ref)
        g_ours = graph_ms([lambda p=p, s=s: dequantize_4bit_triton(p, s, out=buf) for p, s in ours])
        g_bnb = graph_ms([lambda q=q, s=s: bnbF.dequantize_4bit(q, s) for q, s in theirs]) if ref else None
        ms = bench(lambda: dequantize_4bit_triton(packed, st), 50, 300)
        ms_bnb = bench(lambda: bnbF.dequantize_4bit(ref[0], ref[1]), 50, 300) if ref else None
        ms_ref = bench(lambda: nf4.dequantize_4bit(packed, st), 10, 50)
        c_ours = cpu_us(lambda: dequantize_4bit_triton(packed, st, out=buf))
        c_bnb = cpu_us(lambda: bnbF.dequantize_4bit(ref[0], ref[1])) if ref else None
        tb = lambda t: None if t is None else nbytes / t / 1e9  # noqa: E731
        r = dict(graph_us=g_ours and g_ours * 1e3, TBps=tb(g_ours), eager_TBps=tb(ms), bnb_TBps=tb(g_bnb),
                 bnb_eager_TBps=tb(ms_bnb), torch_ref_TBps=tb(ms_ref), cpu_us=c_ours, bnb_cpu_us=c_bnb, exact=exact)
        RESULTS[f"dequant_{n}x{k}"] = r
        print(f"{n:>6}x{k:<6} {fmt(r['graph_us'], '8.1f')} {fmt(tb(g_ours), '9.2f')} {tb(ms):6.2f} "
              f"{fmt(tb(g_bnb), '8.2f')} {fmt(tb(ms_bnb), '6.2f')} {tb(ms_ref):6.2f} "
              f"{c_ours:7.0f}/{fmt(c_bnb, '7.0f')} {exact!s:>5}")
        if sweep and (n, k) == (14336, 4096):
            for tile in (1024, 2048, 4096):
                for warps in (4, 8):
                    t = graph_ms([lambda p=p, s=s: dequantize_4bit_triton(p, s, out=buf, tile_bytes=tile, num_warps=warps)
                                  for p, s in ours])
                    RESULTS[f"sweep_dequant_{tile}_{warps}"] = tb(t)
                    print(f"    sweep tile={tile:5d} warps={warps}: {fmt(tb(t), '.2f')} TB/s")
        del w, packed, st, ref, buf, ours, theirs
        torch.cuda.empty_cache()


def matmul_table():
    print("\n4-bit matmul, 4096 tokens (our dequant into a reused buffer + cuBLAS) vs bf16 matmul")
    for n, k in SHAPES[:3]:
        w, packed, st, ref = quantized(n, k)
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
        buf = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
        ms16 = bench(lambda: x @ w.t())
        ms4 = bench(lambda: gemv.matmul_4bit(x, packed, st, workspace=buf))
        ms_bnb = bench(lambda: bnb.matmul_4bit(x, ref[0].t(), quant_state=ref[1])) if ref else None
        fl = 2 * 4096 * n * k
        RESULTS[f"mm4096_{n}x{k}"] = dict(bf16_ms=ms16, ours_ms=ms4, bnb_ms=ms_bnb)
        print(f"  {n}x{k}: bf16 {ms16:.3f} ms ({fl / ms16 / 1e9:.0f} TFLOP/s), ours 4-bit {ms4:.3f} ms "
              f"({fl / ms4 / 1e9:.0f} TFLOP/s), bnb 4-bit {fmt(ms_bnb)} ms")


# (rows per program, K per step, warps, pipeline stages)
GEMV_SWEEP = [(16, 512, 4, 1), (16, 1024, 4, 1), (8, 512, 2, 1), (8, 1024, 2, 1), (16, 512, 2, 1), (32, 512, 4, 1),
              (16, 256, 4, 1), (8, 256, 2, 1), (4, 512, 1, 1), (16, 1024, 8, 1), (32, 256, 4, 1)]
DOT_SWEEP = [(32, 256, 4, 1), (64, 128, 4, 1), (64, 256, 8, 1), (32, 128, 4, 1), (16, 256, 4, 1), (128, 128, 8, 1),
             (16, 512, 4, 1)]


def gemv_table(sweep: bool):
    print("\n4-bit GEMV: GPU us from a CUDA graph over rotating weight copies (eager do_bench us in brackets)")
    print(f"{'shape':>13} {'rows':>4} {'ours':>14} {'bnb':>14} {'bf16 mm':>8} {'deq+mm':>7} {'torch ref':>9} "
          f"{'cpu us':>9} {'rel err':>8}")
    for n, k in SHAPES:
        w, packed, st, ref = quantized(n, k)
        ours, theirs = copies(packed, st, ref)
        w16 = [w] + [w.clone() for _ in range(max(1, int(160e6 // (w.numel() * 2))))]
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = gemv.gemv_4bit_triton(x, packed, st)
            exact = x.double() @ nf4.dequantize_4bit(packed, st, torch.float32).double().t()
            err = ((y.double() - exact).norm() / exact.norm()).item()
            g = graph_ms([lambda p=p, s=s: gemv.gemv_4bit_triton(x, p, s) for p, s in ours])
            g_bnb = graph_ms([lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in theirs]) if ref else None
            g16 = graph_ms([lambda v=v: x @ v.t() for v in w16])
            g_dm = graph_ms([lambda p=p, s=s: x @ dequantize_4bit_triton(p, s).t() for p, s in ours[:2]])
            ms = bench(lambda: gemv.gemv_4bit_triton(x, packed, st))
            ms_bnb = bench(lambda: bnb.matmul_4bit(x, ref[0].t(), quant_state=ref[1])) if ref else None
            ms_ref = bench(lambda: gemv.gemv_4bit_reference(x, packed, st), 5, 30)
            c = cpu_us(lambda: gemv.gemv_4bit_triton(x, packed, st))
            c_bnb = cpu_us(lambda: bnb.matmul_4bit(x, ref[0].t(), quant_state=ref[1])) if ref else None
            us = lambda t: None if t is None else t * 1e3  # noqa: E731
            RESULTS[f"gemv_{n}x{k}_m{m}"] = dict(ours=us(g), ours_eager=us(ms), bnb=us(g_bnb), bnb_eager=us(ms_bnb),
                                                 bf16=us(g16), dequant_mm=us(g_dm), torch_ref_eager=us(ms_ref),
                                                 cpu_us=c, bnb_cpu_us=c_bnb, rel_err=err)
            if gemv_cuda.supported(x, st):  # the kernel kernels.matmul_4bit takes for one row here
                yc = gemv_cuda.gemv_4bit_cuda(x, packed, st)
                err_c = ((yc.double() - exact).norm() / exact.norm()).item()
                err_ref = ((gemv.gemv_4bit_reference(x, packed, st).double() - exact).norm() / exact.norm()).item()
                gc = graph_ms([lambda p=p, s=s: gemv_cuda.gemv_4bit_cuda(x, p, s) for p, s in ours])
                msc = bench(lambda: gemv_cuda.gemv_4bit_cuda(x, packed, st))
                cc = cpu_us(lambda: gemv_cuda.gemv_4bit_cuda(x, packed, st))
                RESULTS[f"gemv_{n}x{k}_m{m}"].update(cuda=us(gc), cuda_eager=us(msc), cuda_cpu_us=cc,
                                                     cuda_rel_err=err_c, torch_ref_rel_err=err_ref)
                RESULTS[f"gemv_{n}x{k}_m{m}"]["cuda_variant"] = gemv_cuda.kind(x, st)
                print(f"{'':>13} {'':>4} {fmt(us(gc), '6.1f')} ({us(msc):5.1f})  <- CUDA kernel (gemv_cuda.py, "
                      f"{gemv_cuda.kind(x, st)}), "
                      f"host {cc:.0f} us, rel err {err_c:.1e} (torch reference {err_ref:.1e})")
            print(f"{n:>6}x{k:<6} {m:4d} {fmt(us(g), '6.1f')} ({us(ms):5.1f}) {fmt(us(g_bnb), '6.1f')} "
                  f"({fmt(us(ms_bnb), '5.1f')}) {fmt(us(g16), '8.1f')} {fmt(us(g_dm), '7.1f')} {us(ms_ref):9.1f} "
                  f"{c:4.0f}/{fmt(c_bnb, '4.0f')} {err:8.1e}")
            if sweep and m in (1, 16) and (n, k) in ((14336, 4096), (4096, 14336), (4096, 4096)):
                for cfg in (GEMV_SWEEP if m == 1 else DOT_SWEEP):
                    splits = {(14336, 4096): (None,), (4096, 4096): (None, 1, 4)}.get((n, k), (None, 1, 2, 4, 8))
                    for split in splits:
                        t = graph_ms([lambda p=p, s=s: gemv.gemv_4bit_triton(x, p, s, config=cfg, split_k=split)
                                      for p, s in ours])
                        RESULTS[f"sweep_gemv_{n}x{k}_m{m}_{cfg}_{split}"] = us(t)
                        print(f"    sweep {cfg} split={split}: {fmt(us(t), '.1f')} us")
        del w, packed, st, ref, ours, theirs, w16
        torch.cuda.empty_cache()


def gemv_cuda_decompose():
    """Where the CUDA GEMV's time goes: the same kernel with stages left out (``gemv_cuda.DEBUG``; the
    results are wrong, only the time counts), W 14336x4096, bf16, 1 row: the tensor-core variant (what
    kernels.matmul_4bit runs) with and without its MMAs and table lookups, and the FMA variant (fp16 /
    fp32 code table) with and without its dot products. What remains without them is the kernel's
    skeleton (prologue, copies, barriers, row sums). (Not waiting for the copies is no longer measured:
    a block may then exit with copies in flight, which faulted on the H200.) See qlora/kernels/NOTES.md."""
    n, k = 14336, 4096
    print(f"\nCUDA GEMV, leave-one-out GPU us, W {n}x{k}")
    w, packed, st, ref = quantized(n, k)
    ours, _ = copies(packed, st, None)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    saved = gemv_cuda.DEBUG
    try:
        for name, wait, dot in (("full", 0, 0), ("no dot products", 0, 1)):
            gemv_cuda.DEBUG = f"#define SKIP_WAIT {wait}\n#define SKIP_DOT {dot}\n"
            t = graph_ms([lambda p=p, s=s: gemv_cuda.gemv_4bit_cuda(x, p, s, variant="mma") for p, s in ours])
            RESULTS[f"gemv_cuda_decompose_mma_{name.replace(' ', '_')}"] = None if t is None else t * 1e3
            print(f"  tensor cores, {name:>24}: {fmt(None if t is None else t * 1e3, '.1f')}")
        print("  FMA variant (fp16 table / fp32 table):")
        for name, wait, dot in (("full", 0, 0), ("no dot products", 0, 1)):
            gemv_cuda.DEBUG = f"#define SKIP_WAIT {wait}\n#define SKIP_DOT {dot}\n"
            row = []
            for t16 in (True, False):
                t = graph_ms([lambda p=p, s=s: gemv_cuda.gemv_4bit_cuda(x, p, s, t16=t16, variant="fma") for p, s in ours])
                row.append(None if t is None else t * 1e3)
                RESULTS[f"gemv_cuda_decompose_{name.replace(' ', '_')}_{'t16' if t16 else 'fp32'}"] = row[-1]
            print(f"  {name:>38}: {fmt(row[0], '.1f')} / {fmt(row[1], '.1f')}")
    finally:
        gemv_cuda.DEBUG = saved
        torch.cuda.synchronize()


def fwd_bwd(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return bench(run)


def norm_act_table():
    print("\nfused ops, forward+backward, ms (ours / torch reference)")
    dt = torch.bfloat16
    x = torch.randn(8192, 4096, device="cuda", dtype=dt, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    a = fwd_bwd(lambda x, w: norm_act.RMSNormFunction.apply(x, w, 1e-5), (x, w), dy)
    b = fwd_bwd(lambda x, w: norm_act.rms_norm_reference(x, w, 1e-5), (x, w), dy)
    RESULTS["rmsnorm_8192x4096"] = dict(ours=a, torch=b)
    print(f"  RMSNorm 8192x4096: {a:.3f} / {b:.3f}")
    g = torch.randn(8192, 14336, device="cuda", dtype=dt, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    do = torch.randn_like(g)
    a = fwd_bwd(norm_act.SwiGLUFunction.apply, (g, u), do)
    b = fwd_bwd(norm_act.swiglu_reference, (g, u), do)
    RESULTS["swiglu_8192x14336"] = dict(ours=a, torch=b)
    print(f"  SwiGLU 8192x14336: {a:.3f} / {b:.3f}")
    q = torch.randn(4, 2048, 32, 128, device="cuda", dtype=dt).transpose(1, 2).detach().requires_grad_()
    cos = torch.randn(4, 2048, 128, device="cuda", dtype=dt)
    sin = torch.randn_like(cos)
    dq = torch.randn(4, 32, 2048, 128, device="cuda", dtype=dt)
    a = fwd_bwd(lambda q: norm_act.RoPEFunction.apply(q, cos, sin), (q,), dq)
    b = fwd_bwd(lambda q: norm_act.rope_reference(q, cos, sin), (q,), dq)
    RESULTS["rope_4x32x2048x128"] = dict(ours=a, torch=b)
    print(f"  RoPE q 4x32x2048x128: {a:.3f} / {b:.3f}")
    del x, g, u, q
    torch.cuda.empty_cache()
    n, hdim, vocab = 8192, 4096, 128256
    h = torch.randn(n, hdim, device="cuda", dtype=dt, requires_grad=True)
    head = torch.randn(vocab, hdim, device="cuda", dtype=dt) * 0.02
    lab = torch.randint(0, vocab, (n,), device="cuda")
    ce = loss.chunked_linear_cross_entropy
    for name, fn in (("chunked (default)", lambda: ce(h, head, lab)),
                     ("chunked grad_in_forward", lambda: ce(h, head, lab, grad_in_forward=True)),
                     ("chunked 1024 rows", lambda: ce(h, head, lab, chunk_size=1024)),
                     ("chunked 1024 rows grad_in_forward", lambda: ce(h, head, lab, chunk_size=1024, grad_in_forward=True)),
                     ("chunked 128 rows", lambda: ce(h, head, lab, chunk_size=128)),
                     ("unfused", lambda: loss.linear_cross_entropy_reference(h, head, lab))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = bench(lambda: (setattr(h, "grad", None), fn().backward()), 3, 20)
        RESULTS[f"ce_{name}"] = dict(ms=ms, peak_GiB=peak)
        print(f"  linear+CE {name} N={n} V={vocab}: {ms:.2f} ms fwd+bwd, peak extra {peak:.2f} GiB")


def lora_row_table():
    """The one-row LoRA product of CUDA-graph decoding, y += s * B @ (A @ x): lora_row.py's two launches against
    torch's path (x @ A.T, then addmm / in-place addmm_), r=16 bf16, the 8B model's shapes, 8 rotating copies."""
    from qlora.kernels.lora_row import lora_row_, lora_row_reference
    print("\none-row LoRA, y += s * B @ (A @ x), r=16 bf16: GPU us from CUDA graphs (ours / torch addmm / torch addmm_)")
    dt, r = torch.bfloat16, 16
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        sets = [(torch.randn(k, device="cuda", dtype=dt), torch.randn(r, k, device="cuda", dtype=dt) * k ** -0.5,
                 torch.randn(n, r, device="cuda", dtype=dt) * 0.1, torch.randn(n, device="cuda", dtype=dt))
                for _ in range(8)]
        ours = graph_ms([lambda x=x, a=a, b=b, y=y: lora_row_(y, x, a, b, 2.0) for x, a, b, y in sets])
        torch_ = graph_ms([lambda x=x, a=a, b=b, y=y: torch.addmm(y.view(1, n), x.view(1, k) @ a.t(), b.t(), alpha=2.0)
                           for x, a, b, y in sets])
        inplace = graph_ms([lambda x=x, a=a, b=b, y=y: y.view(1, n).addmm_(x.view(1, k) @ a.t(), b.t(), alpha=2.0)
                            for x, a, b, y in sets])
        x, a, b, y = sets[0]
        exact = y.double() + 2.0 * (b.double() @ (a.double() @ x.double()))
        got = lora_row_(y.clone(), x, a, b, 2.0)
        err = ((got.double() - exact).norm() / exact.norm()).item()
        err_ref = ((lora_row_reference(y, x, a, b, 2.0).double() - exact).norm() / exact.norm()).item()
        us = lambda t: None if t is None else t * 1e3  # noqa: E731
        RESULTS[f"lora_row_{n}x{k}"] = dict(ours=us(ours), torch_addmm=us(torch_), torch_addmm_inplace=us(inplace),
                                            rel_err=err, reference_rel_err=err_ref)
        print(f"  N {n} K {k}: {fmt(us(ours), '.2f')} / {fmt(us(torch_), '.2f')} / {fmt(us(inplace), '.2f')} us, "
              f"rel err {err:.1e} (reference {err_ref:.1e})")


def dropout_table():
    """Keyed LoRA dropout (dropout.py: mask hashed from a device key) against torch's F.dropout (Philox), bf16,
    the 8B step's LoRA inputs (4096 tokens x 4096 / 14336), GPU time from CUDA graphs over 4 rotating inputs."""
    from qlora.kernels import dropout as kd
    print("\nLoRA dropout p=0.05, bf16: GPU us from CUDA graphs (keyed / torch F.dropout), GB/s read + written")
    key = torch.tensor(42 << 32, device="cuda")
    for n, k in ((4096, 4096), (4096, 14336)):
        xs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        ours = graph_ms([lambda x=x: kd.dropout(x, 0.05, key, 3) for x in xs])
        ref = graph_ms([lambda x=x: torch.nn.functional.dropout(x, 0.05, training=True) for x in xs])
        same = torch.equal(kd.dropout(xs[0], 0.05, key, 3), kd.dropout_reference(xs[0], 0.05, 42 << 32, 3))
        gbs = lambda t: None if t is None else 4 * n * k / t / 1e6  # noqa: E731
        RESULTS[f"dropout_{n}x{k}"] = dict(ours_us=None if ours is None else ours * 1e3,
                                           torch_us=None if ref is None else ref * 1e3, equal_to_reference=same)
        print(f"  {n}x{k}: {fmt(None if ours is None else ours * 1e3, '.1f')} / {fmt(None if ref is None else ref * 1e3, '.1f')} us"
              f" ({fmt(gbs(ours), '.0f')} / {fmt(gbs(ref), '.0f')} GB/s); equal to the torch form: {same}")


def lora_dropout_table(sweep: bool):
    """LoRA products with keyed dropout inside (lora_dropout.py) against the separate keyed-dropout kernel + cuBLAS
    (what QLORA_FUSED_DROPOUT=0 runs) and against cuBLAS without dropout, bf16, p = 0.05, per adapted input: the
    forward product (run twice per step with checkpointing), dA, and the input gradient's LoRA part. GPU us from
    CUDA graphs over 4 rotating inputs; --sweep also times launch configurations (each checked against float64)."""
    from qlora.kernels import dropout as kd
    from qlora.kernels import lora_dropout as ld
    print("\nLoRA with dropout p=0.05 inside, bf16: GPU us (fused / dropout kernel + cuBLAS / cuBLAS without dropout)")
    key = torch.tensor(42 << 32, device="cuda")
    p, salt, dt = 0.05, 3, torch.bfloat16
    us = lambda t: None if t is None else t * 1e3  # noqa: E731
    for m, k, r in ((4096, 4096, 16), (4096, 14336, 16), (8192, 2048, 16), (8192, 8192, 16), (4096, 4096, 64),
                    (4096, 4096, 128)):
        xs = [torch.randn(m, k, device="cuda", dtype=dt) for _ in range(4)]
        xds = [kd.dropout(x, p, key, salt) for x in xs]
        a = (torch.randn(r, k, device="cuda") * k ** -0.5).to(dt)
        gs = [torch.randn(m, r, device="cuda", dtype=dt) for _ in range(4)]
        gxs = [torch.randn(m, k, device="cuda", dtype=dt) for _ in range(4)]
        rows = {
            "down": (lambda cfg=None: [lambda x=x: ld.down(x, a, p, key, salt, cfg) for x in xs],
                     [lambda x=x: kd.dropout(x, p, key, salt) @ a.t() for x in xs], [lambda x=x: x @ a.t() for x in xs]),
            "grad_a": (lambda cfg=None: [lambda x=x, g=g: ld.grad_a(g, x, p, key, salt, cfg) for x, g in zip(xs, gs)],
                       [lambda xd=xd, g=g: g.t() @ xd for xd, g in zip(xds, gs)],
                       [lambda x=x, g=g: g.t() @ x for x, g in zip(xs, gs)]),
            "grad_x": (lambda cfg=None: [lambda gx=gx, g=g: ld.grad_x_add_(gx, g, a, p, key, salt, cfg)
                                         for gx, g in zip(gxs, gs)],
                       [lambda gx=gx, g=g: gx + kd.dropout(g @ a, p, key, salt) for gx, g in zip(gxs, gs)],
                       [lambda gx=gx, g=g: gx.addmm_(g, a) for gx, g in zip(gxs, gs)]),
        }
        tot = [0.0, 0.0, 0.0]
        line = []
        for name, (fused, sep, plain) in rows.items():
            t = [graph_ms(fused()), graph_ms(sep), graph_ms(plain)]
            n = 2 if name == "down" else 1  # forward and recompute
            for i in range(3):
                tot[i] += n * (t[i] or 0.0)
            RESULTS[f"lora_dropout_{name}_{m}x{k}_r{r}"] = dict(fused=us(t[0]), separate=us(t[1]), no_dropout=us(t[2]))
            line.append(f"{name} {fmt(us(t[0]), '.1f')} / {fmt(us(t[1]), '.1f')} / {fmt(us(t[2]), '.1f')}")
        print(f"  M {m} K {k} r {r}: " + "; ".join(line) +
              f"; per step (2 fwd + dA + dx) {us(tot[0]):.0f} / {us(tot[1]):.0f} / {us(tot[2]):.0f} us")
        if not sweep:
            continue
        x, g, gx = xs[0], gs[0], torch.randn(m, k, device="cuda", dtype=dt)  # gx: one the timings do not update
        refs = {"down": ld.down_reference(x, a, p, 42 << 32, salt), "grad_a": ld.grad_a_reference(g, x, p, 42 << 32, salt),
                "grad_x": ld.grad_x_add_reference(gx, g, a, p, 42 << 32, salt)}
        runs = {"down": lambda cfg: ld.down(x, a, p, key, salt, cfg), "grad_a": lambda cfg: ld.grad_a(g, x, p, key, salt, cfg),
                "grad_x": lambda cfg: ld.grad_x_add_(gx.clone(), g, a, p, key, salt, cfg)}
        grid = {"down": [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
                         (32, 128, 8, 3), (128, 64, 8, 3), (64, 256, 8, 3)],
                "grad_a": [(64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                           (128, 128, 8, 3), (32, 32, 4, 4)],
                "grad_x": [(64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2), (32, 128, 4, 2), (128, 64, 4, 2),
                           (64, 256, 8, 2), (128, 256, 8, 2)]}
        for name, cfgs in grid.items():
            res = []
            for cfg in cfgs:
                try:
                    got = runs[name](cfg).double()
                    err = ((got - refs[name]).abs().max() / refs[name].abs().max()).item()
                    t = graph_ms(rows[name][0](cfg))
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                    print(f"    {name} {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
                    continue
                res.append((t if t is not None and err < 1e-2 else float("inf"), cfg, err))
            res.sort(key=lambda z: z[0])
            print(f"    sweep {name}: " + ", ".join(f"{c} {us(t):.1f} us (err {e:.1e})" for t, c, e in res[:4]) +
                  f"; default {ld.launch_config(name, r)}")


def dump_kernels(outdir: str):
    """Registers/spills and PTX of every compiled variant, for reading without a GPU."""
    import re
    from qlora.kernels import dequant
    fns = {"dequant": dequant._dequant_kernel, "gemv_fma": gemv._gemv_fma_kernel, "gemv_dot": gemv._gemv_dot_kernel,
           "rms_fwd": norm_act._rms_fwd_kernel, "rms_bwd": norm_act._rms_bwd_kernel,
           "swiglu_fwd": norm_act._swiglu_fwd_kernel, "rope": norm_act._rope_kernel}
    os.makedirs(outdir, exist_ok=True)
    print("\ncompiled kernels: regs, spills, PTX global loads/stores (vector / scalar)")
    with open(os.path.join(outdir, "kernels_ptx.txt"), "w") as f:
        for name, fn in fns.items():
            for cache in fn.device_caches.values():
                for i, (key, k) in enumerate(cache[0].items()):
                    ptx = k.asm.get("ptx", "")
                    if isinstance(ptx, bytes):
                        ptx = ptx.decode()
                    ldv = len(re.findall(r"ld\.global[\w.:]*\.v[248]", ptx))
                    ld = len(re.findall(r"ld\.global", ptx)) - ldv
                    stv = len(re.findall(r"st\.global[\w.:]*\.v[248]", ptx))
                    st = len(re.findall(r"st\.global", ptx)) - stv
                    regs, spills = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
                    consts = getattr(getattr(k, "src", None), "constants", "")
                    print(f"  {name}[{i}] regs={regs} spills={spills} ld v/s={ldv}/{ld} st v/s={stv}/{st} {consts}")
                    if i < 2:
                        f.write(f"// ===== {name}[{i}] {consts}\n{ptx}\n")


def summary():
    """The headline numbers again, last, so they end the output."""
    print("\n==== summary (GPU time from CUDA graphs; eager = do_bench of the Python call) ====")
    print(f"copy ceiling {RESULTS.get('copy_TBps', 0):.2f} TB/s")
    for n, k in SHAPES:
        r = RESULTS.get(f"dequant_{n}x{k}")
        if r:
            print(f"dequant {n}x{k}: ours {fmt(r['TBps'], '.2f')} TB/s (eager {r['eager_TBps']:.2f}), bnb "
                  f"{fmt(r['bnb_TBps'], '.2f')} (eager {fmt(r['bnb_eager_TBps'], '.2f')}), torch ref "
                  f"{r['torch_ref_TBps']:.2f}, bit-exact {r['exact']}")
    for n, k in SHAPES:
        r = RESULTS.get(f"gemv_{n}x{k}_m1")
        if r:
            if r.get("cuda") is not None:
                print(f"gemv x[1,{k}] @ W[{n},{k}].T: ours (CUDA) {fmt(r['cuda'], '.1f')} us (eager "
                      f"{r['cuda_eager']:.1f}), rel err {r['cuda_rel_err']:.1e} (torch ref {r['torch_ref_rel_err']:.1e})")
            print(f"gemv x[1,{k}] @ W[{n},{k}].T: ours (Triton) {fmt(r['ours'], '.1f')} us (eager {r['ours_eager']:.1f}), "
                  f"bnb {fmt(r['bnb'], '.1f')} (eager {fmt(r['bnb_eager'], '.1f')}), bf16 {fmt(r['bf16'], '.1f')}, "
                  f"torch ref {r['torch_ref_eager']:.1f}, rel err {r['rel_err']:.1e}")
    best = {}
    for key, v in RESULTS.items():
        if key.startswith("sweep_gemv_") and isinstance(v, float):
            group = key.split("_(")[0]
            if group not in best or v < best[group][1]:
                best[group] = (key, v)
        if key.startswith("sweep_dequant_") and isinstance(v, float):
            if "dequant" not in best or v > best["dequant"][1]:
                best["dequant"] = (key, v)
    for group, (key, v) in best.items():
        print(f"best {group}: {key} -> {v:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--dump", help="write PTX of compiled kernels to DIR/kernels_ptx.txt and print register counts")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: dequant,matmul,gemv,ops,lora,dropout,lora_dropout")
    ap.add_argument("--gemv-decompose", action="store_true",
                    help="also time the CUDA GEMV with stages left out (Hopper; where its time goes)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU")
        return 2
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bitsandbytes {bnb.__version__ if bnb else 'not installed'}")
    skip = set(args.skip.split(","))
    copy_ceiling()
    sections = [("dequant", lambda: dequant_table(args.sweep)), ("gemv", lambda: gemv_table(args.sweep)),
                ("ops", norm_act_table), ("lora", lora_row_table), ("dropout", dropout_table),
                ("lora_dropout", lambda: lora_dropout_table(args.sweep)),
                ("matmul", matmul_table)]
    for name, fn in sections:
        if name in skip:
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the other sections
            print(f"!! section {name} failed: {type(e).__name__}: {e}")
            RESULTS[f"error_{name}"] = repr(e)
    if args.gemv_decompose:
        try:
            gemv_cuda_decompose()
        except Exception as e:  # noqa: BLE001
            print(f"!! gemv decompose failed: {type(e).__name__}: {e}")
    if args.dump:
        try:
            dump_kernels(args.dump)
        except Exception as e:  # noqa: BLE001
            print(f"!! dump failed: {e!r}")
    summary()
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
