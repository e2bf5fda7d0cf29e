"""Kernel benchmark on one CUDA GPU: our Triton kernels vs our torch references vs bitsandbytes.

    python bench/kernels.py [--sweep] [--json results.json]

Prints, each measured in this run with ``triton.testing.do_bench`` (median; it flushes the L2
cache before every call, so weights are read from device memory):

* the copy ceiling (device-to-device copy, bytes read + written);
* NF4+DQ dequantize to bf16, in TB/s counting packed codes + 8-bit absmax read + bf16 written
  (the same count as shared/bench/reference_dequant.py): ours (fresh output and preallocated
  buffer), our torch reference, bitsandbytes; for 4096², 14336x4096, 4096x14336, 128256x4096;
* a 4-bit matmul of 4096 tokens (our dequant into a reused buffer + cuBLAS) vs the bf16 matmul;
* the 1-token GEMV: ours vs bitsandbytes vs the torch reference, plus 4 and 16 rows;
* RMSNorm / SwiGLU / RoPE forward+backward vs torch, and the chunked loss vs the unfused one.

``--sweep`` also times launch configurations of the dequant and GEMV kernels (for tuning).
bitsandbytes is optional: its columns read "-" when it is not importable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# run from anywhere; and keep this folder off the path (bitsandbytes imports a package named "kernels")
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from qlora import nf4  # noqa: E402
from qlora.kernels import gemv, loss, norm_act  # noqa: E402
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
    print("\nNF4+DQ dequantize -> bf16 (TB/s = packed + u8 absmax + bf16 out)")
    print(f"{'shape':>13} {'ours ms':>8} {'ours TB/s':>9} {'ours buf':>8} {'torch ref':>9} {'bnb TB/s':>8} {'exact':>5}")
    for n, k in SHAPES:
        w, packed, st, ref = quantized(n, k)
        nbytes = n * k // 2 + n * k // 64 + n * k * 2
        buf = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
        exact = torch.equal(dequantize_4bit_triton(packed, st), nf4.dequantize_4bit(packed, st))
        ms = bench(lambda: dequantize_4bit_triton(packed, st), 50, 300)
        ms_buf = bench(lambda: dequantize_4bit_triton(packed, st, out=buf), 50, 300)
        ms_ref = bench(lambda: nf4.dequantize_4bit(packed, st), 10, 50)
        ms_bnb = bench(lambda: bnbF.dequantize_4bit(ref[0], ref[1]), 50, 300) if ref else None
        tb = lambda t: None if t is None else nbytes / t / 1e9  # noqa: E731
        r = dict(ms=ms, TBps=tb(ms), buf_TBps=tb(ms_buf), torch_ref_TBps=tb(ms_ref), bnb_TBps=tb(ms_bnb), exact=exact)
        RESULTS[f"dequant_{n}x{k}"] = r
        print(f"{n:>6}x{k:<6} {ms:8.4f} {tb(ms):9.2f} {tb(ms_buf):8.2f} {tb(ms_ref):9.2f} {fmt(tb(ms_bnb), '8.2f')} {exact!s:>5}")
        if sweep and (n, k) == (14336, 4096):
            for tile in (1024, 2048, 4096, 8192):
                for warps in (2, 4, 8):
                    t = bench(lambda: dequantize_4bit_triton(packed, st, out=buf, tile_bytes=tile, num_warps=warps))
                    RESULTS[f"sweep_dequant_{tile}_{warps}"] = tb(t)
                    print(f"    sweep tile={tile:5d} warps={warps}: {tb(t):.2f} TB/s")
        del w, packed, st, ref, buf
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
GEMV_SWEEP = [(16, 512, 4, 1), (16, 256, 4, 1), (16, 1024, 4, 1), (32, 256, 4, 1), (32, 512, 4, 1), (32, 512, 8, 1),
              (64, 128, 4, 1), (64, 256, 4, 1), (64, 256, 8, 1), (8, 512, 2, 1), (16, 512, 2, 1), (32, 128, 2, 1)]
DOT_SWEEP = [(32, 256, 4, 1), (64, 128, 4, 1), (64, 256, 8, 1), (32, 128, 4, 1), (16, 256, 4, 1), (64, 128, 4, 2),
             (128, 128, 8, 1)]


def gemv_table(sweep: bool):
    print("\n4-bit GEMV (weights read cold from device memory), ms")
    print(f"{'shape':>13} {'rows':>4} {'ours':>8} {'bnb':>8} {'torch ref':>9} {'deq+mm':>8} {'bf16 mm':>8} {'rel err':>8}")
    for n, k in SHAPES:
        w, packed, st, ref = quantized(n, k)
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = gemv.gemv_4bit_triton(x, packed, st)
            exact = x.double() @ nf4.dequantize_4bit(packed, st, torch.float32).double().t()
            err = ((y.double() - exact).norm() / exact.norm()).item()
            ms = bench(lambda: gemv.gemv_4bit_triton(x, packed, st))
            ms_bnb = bench(lambda: bnb.matmul_4bit(x, ref[0].t(), quant_state=ref[1])) if ref else None
            ms_ref = bench(lambda: gemv.gemv_4bit_reference(x, packed, st), 5, 30)
            ms_dm = bench(lambda: x @ dequantize_4bit_triton(packed, st).t())
            ms16 = bench(lambda: x @ w.t())
            RESULTS[f"gemv_{n}x{k}_m{m}"] = dict(ours=ms, bnb=ms_bnb, torch_ref=ms_ref, dequant_mm=ms_dm, bf16=ms16, rel_err=err)
            print(f"{n:>6}x{k:<6} {m:4d} {ms:8.4f} {fmt(ms_bnb, '8.4f')} {ms_ref:9.4f} {ms_dm:8.4f} {ms16:8.4f} {err:8.1e}")
            if sweep and m in (1, 16) and (n, k) in ((14336, 4096), (4096, 14336)):
                for cfg in (GEMV_SWEEP if m == 1 else DOT_SWEEP):
                    for split in ((None, 1) if (n, k) == (14336, 4096) else (None, 1, 4)):
                        t = bench(lambda: gemv.gemv_4bit_triton(x, packed, st, config=cfg, split_k=split))
                        RESULTS[f"sweep_gemv_{n}x{k}_m{m}_{cfg}_{split}"] = t
                        print(f"    sweep {cfg} split={split}: {t:.4f} ms")
        del w, packed, st, ref
        torch.cuda.empty_cache()


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
    for name, fn in (("chunked", lambda: loss.chunked_linear_cross_entropy(h, head, lab)),
                     ("unfused", lambda: loss.linear_cross_entropy_reference(h, head, lab))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        ms = bench(lambda: (setattr(h, "grad", None), fn().backward()), 3, 20)
        RESULTS[f"ce_{name}"] = dict(ms=ms, peak_GiB=peak)
        print(f"  linear+CE {name} N={n} V={vocab}: {ms:.2f} ms fwd+bwd, peak extra {peak:.2f} GiB")


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
    print("\n==== summary ====")
    print(f"copy ceiling {RESULTS.get('copy_TBps', 0):.2f} TB/s")
    for n, k in SHAPES:
        r = RESULTS.get(f"dequant_{n}x{k}")
        if r:
            print(f"dequant {n}x{k}: ours {r['TBps']:.2f} TB/s (buffer {r['buf_TBps']:.2f}), torch ref "
                  f"{r['torch_ref_TBps']:.2f}, bnb {fmt(r['bnb_TBps'], '.2f')}, bit-exact {r['exact']}")
    for n, k in SHAPES:
        r = RESULTS.get(f"gemv_{n}x{k}_m1")
        if r:
            print(f"gemv 1x{k} @ {k}x{n}: ours {r['ours'] * 1e3:.1f} us, bnb {fmt(r['bnb'] and r['bnb'] * 1e3, '.1f')} us, "
                  f"torch ref {r['torch_ref'] * 1e3:.1f} us, bf16 {r['bf16'] * 1e3:.1f} us, rel err {r['rel_err']:.1e}")
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
        print(f"best {group}: {key} -> {v:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time launch configurations")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--dump", help="write PTX of compiled kernels to DIR/kernels_ptx.txt and print register counts")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: dequant,matmul,gemv,ops")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU")
        return 2
    import triton
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bitsandbytes {bnb.__version__ if bnb else 'not installed'}")
    skip = set(args.skip.split(","))
    copy_ceiling()
    sections = [("dequant", lambda: dequant_table(args.sweep)), ("matmul", matmul_table),
                ("gemv", lambda: gemv_table(args.sweep)), ("ops", norm_act_table)]
    for name, fn in sections:
        if name in skip:
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the other sections
            print(f"!! section {name} failed: {type(e).__name__}: {e}")
            RESULTS[f"error_{name}"] = repr(e)
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
