"""Candidate changes to the tensor-core GEMV (``qlora/kernels/gemv_cuda.py``), ready to measure on a GPU.

Each variant is the library's ``_MMA_KERNEL`` text with edits applied here; the runner swaps it in, checks
that its output is bitwise the library's on shapes that cover the kernel's paths (partial last group, K
split, fp16, no double quant, block sizes 64/128/256), then times library and variants alternately in one
process over rotating weight copies (``bench/kernel_speed.py``'s CUDA-graph harness). Nothing here changes the
library; adopt a variant by editing ``_MMA_KERNEL`` once it has measured faster.

Measured so far (H200, W 14336x4096 bf16, ``bench/results/gemv_experiments_2026-11-30_s10_h200.txt``):

* ``pinned`` (session 9): per-lane offsets held in registers behind an empty ``asm``, ring slot and
  barrier phase advanced incrementally, lookups and MMAs as non-volatile ``asm``; the consumer's per-group
  loop went from 280 to 263 SASS instructions. 13.13 us against 13.43, the LM head 83.4 against 85.1,
  bitwise equal on all 8 shapes: **adopted** into ``_MMA_KERNEL`` (session 10).
* ``psc`` (*producer-side scales*): the producer warp, otherwise idle between refills, turns each group's
  8-bit scales into fp32 (``nested_code[q] * nested_scale + offset``, the consumers' fused multiply-add)
  one group ahead into a per-slot float array; consumers wait on a third barrier and read their 8 scales
  as two 16-byte loads (double quant, block size 64, whole 256-element warps only: ``SC4``). 217
  instructions per group per consumer warp, yet **18.4 us** against 13.1 (LM head 133 against 83): the
  producer (warp 16, on scheduler 0 with consumer warps 0, 4, 8, 12) now sits on the critical path of
  every refill. Kept here as the record; not adopted.

Usage (GPU, compute capability 9.0+): ``python bench/gemv_experiments.py [--variants psc]``.
"""
from __future__ import annotations

import argparse
import sys



def _sub(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"the kernel text changed; this edit no longer applies: {old[:80]!r}")
    return text.replace(old, new)


# producer-side scales: DQ, block size 64, FULL (SC4) only
_PSC_PRODUCER_OLD = """    if (warp == nwarps) {
        for (int j = 0; j < my_groups; ++j) {
            mbar_wait(smem_addr(bars + DEPTH + j % (DEPTH + 1)), (j / (DEPTH + 1)) & 1);"""
_PSC_PRODUCER_NEW = """#if PSC
    // the split's scales of each group as fp32, [slot][row][block], written by the producer one group ahead
    float* scf = (float*)(ring0 + slot_bytes);
    const int nb = len / BS;                     // the split's blocks per row (a multiple of 4)
    const int kb0 = k0 / BS;
    const int wpr = nb >> 2, rpi = 32 / wpr;     // 4-scale words per row, rows per step of the warp
#define CONVERT(jj) {                                                                          \\
        const int s_ = (jj) % DEPTH, g_ = g0 + (jj);                                           \\
        mbar_wait(smem_addr(bars + s_), ((jj) / DEPTH) & 1);                                   \\
        const u8* q_ = (const u8*)(SLOT(s_) + R * rstride);                                   \\
        float* o_ = scf + s_ * R * nb;                                                         \\
        for (int r_ = lane / wpr; r_ < R && lane < rpi * wpr; r_ += rpi) {                    \\
            const int w_ = lane - (lane / wpr) * wpr;                                          \\
            const u32 q4 = *(const u32*)(q_ + r_ * kb + kb0 + 4 * w_);                         \\
            const unsigned i_ = (unsigned)(g_ * R + r_) * kb + kb0 + 4 * w_;                   \\
            const float n_ = nest[i_ / NBS - nest0];                                           \\
            float4 v_;                                                                         \\
            v_.x = nc[q4 & 255u] * n_ + offset;                                                \\
            v_.y = nc[(q4 >> 8) & 255u] * n_ + offset;                                         \\
            v_.z = nc[(q4 >> 16) & 255u] * n_ + offset;                                        \\
            v_.w = nc[q4 >> 24] * n_ + offset;                                                 \\
            *(float4*)(o_ + r_ * nb + 4 * w_) = v_;                                            \\
        }                                                                                      \\
        asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bars + 2 * DEPTH + 1 + s_)) : "memory"); \\
    }
#endif
    if (warp == nwarps) {
#if PSC
        if (my_groups > 0) CONVERT(0)
#endif
        for (int j = 0; j < my_groups; ++j) {
#if PSC
            if (j + 1 < my_groups) CONVERT(j + 1)
#endif
            mbar_wait(smem_addr(bars + DEPTH + j % (DEPTH + 1)), (j / (DEPTH + 1)) & 1);"""


def psc(k: str) -> str:
    """Producer-side scales (session 9; measured slower in session 10)."""
    k = _sub(k, _PSC_PRODUCER_OLD, _PSC_PRODUCER_NEW)
    # the "scales ready" barriers: bars[2 * DEPTH + 1 .. 3 * DEPTH], one arrival per producer lane
    k = _sub(k, """            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");""",
             """#if PSC
            for (int d = 0; d < DEPTH; ++d)
                asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bars + 2 * DEPTH + 1 + d)), "r"(32) : "memory");
#endif
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");""")
    k = _sub(k, "        mbar_wait(smem_addr(bars + s), par);\n",
             "        mbar_wait(smem_addr(bars + s), par);\n#if PSC\n"
             "        mbar_wait(smem_addr(bars + 2 * DEPTH + 1 + s), par);\n#endif\n")
    # consumers: the warp's 4 blocks' scales of rows gr and gr + 8 as two 16-byte loads
    k = _sub(k, """#if DQ && SC4
        // the scale bytes of the warp's 4 blocks, rows gr and gr + 8
        const u32 q0 = *(const u32*)(scales + gr * kb + (k0 >> 6) + 4 * warp);
        const u32 q1 = *(const u32*)(scales + (gr + 8) * kb + (k0 >> 6) + 4 * warp);
#endif""", """#if DQ && SC4 && PSC
        const float4 S0 = *(const float4*)(scf + (s * R + gr) * (len >> 6) + 4 * warp);
        const float4 S1 = *(const float4*)(scf + (s * R + gr + 8) * (len >> 6) + 4 * warp);
        const float s0v[4] = {S0.x, S0.y, S0.z, S0.w}, s1v[4] = {S1.x, S1.y, S1.z, S1.w};
        const u32 q0 = 0u, q1 = 0u;  // (read only by the consumer-side path, dead here)
#elif DQ && SC4
        // the scale bytes of the warp's 4 blocks, rows gr and gr + 8
        const u32 q0 = *(const u32*)(scales + gr * kb + (k0 >> 6) + 4 * warp);
        const u32 q1 = *(const u32*)(scales + (gr + 8) * kb + (k0 >> 6) + 4 * warp);
#endif""")
    k = _sub(k, """                if (DQ) {
#if SC4
                    const u32 e0""", """                if (DQ) {
#if SC4 && PSC
                    s0 = s0v[bb]; s1 = s1v[bb];
                } else if (false) {
#endif
#if SC4
                    const u32 e0""")
    return k


VARIANTS = {"psc": psc}


def defines_extra(name: str, defines: dict) -> dict:
    """Extra #defines a variant needs (PSC only where its fp32 scale arrays apply)."""
    if name.endswith("psc"):
        return dict(defines, PSC=int(bool(defines.get("SC4"))))
    return defines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--check-only", action="store_true", help="compile (NVRTC) and check bitwise equality, no timing")
    args = ap.parse_args()
    import torch

    from qlora import nf4
    from qlora.kernels import gemv_cuda as G
    import kernel_speed as KB  # bench/kernel_speed.py: the timing harness

    names = [v for v in args.variants.split(",") if v]
    base = G._MMA_KERNEL
    texts = {"library": base} | {n: VARIANTS[n](base) for n in names}
    real_compile = G._compile

    def use(name):  # the variant's text and defines, through the library's compile step
        G._kernels.clear()  # (its cache is keyed by the defines, not the source)

        def compile_(device, kname, source, defines, smem):
            if kname == "qlora_gemv_4bit_mma":
                source, defines = G._HELPERS + texts[name], defines_extra(name, defines)
            return real_compile(device, kname, source, defines, smem)
        G._compile = compile_

    cases = [((14336, 4096), 64, True, torch.bfloat16), ((4096, 14336), 64, True, torch.bfloat16),
             ((1000, 4096), 64, True, torch.bfloat16), ((700, 1536), 64, True, torch.float16),
             ((4096, 4096), 64, False, torch.bfloat16), ((4096, 4096), 128, True, torch.bfloat16),
             ((2048, 4096), 256, True, torch.float16), ((128256, 4096), 64, True, torch.bfloat16)]
    try:
        for (n, k), bs, dq, dt in cases:
            g = torch.Generator(device="cuda").manual_seed(n + k)
            w = torch.randn(n, k, device="cuda", dtype=dt, generator=g) * 0.02
            packed, st = nf4.quantize_4bit(w, bs, "nf4", dq)
            x = torch.randn(1, k, device="cuda", dtype=dt, generator=g)
            use("library")
            want = G.gemv_4bit_cuda(x, packed, st)
            row = []
            for name in names:
                use(name)
                got = G.gemv_4bit_cuda(x, packed, st)
                torch.cuda.synchronize()
                same = torch.equal(got, want)
                row.append(f"{name}: {'bitwise equal' if same else 'DIFFERS (max %.2e)' % (got.float() - want.float()).abs().max().item()}")
            print(f"W {n}x{k} bs {bs} dq {dq} {str(dt)[6:]}: " + "; ".join(row), flush=True)
            if args.check_only or not (dq and bs == 64 and dt == torch.bfloat16):
                continue
            ours, _ = KB.copies(packed, st, None)
            times = {name: [] for name in ["library"] + names}
            for _ in range(4):
                for name in times:
                    use(name)
                    t = KB.graph_ms([lambda p=p, s=s: G.gemv_4bit_cuda(x, p, s) for p, s in ours])
                    times[name].append(round(t * 1e3, 2))
            print("   GPU us: " + ", ".join(f"{nm} {min(v):.2f} {v}" for nm, v in times.items()), flush=True)
            del ours
    finally:
        G._compile = real_compile
        G._kernels.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
