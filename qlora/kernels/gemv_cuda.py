"""One-row 4-bit GEMV in CUDA C++ (compiled at first use with NVRTC): ``y = x @ dequant(W).T``.

The decoding path of generation multiplies one token's activations by every 4-bit weight. The
Triton kernel (gemv.py) spends ~7.5 instructions per weight there, most of them on a code-table
gather with 64-bit addresses, and is bound by instruction issue (~28 us for W 14336x4096 on an
H200, NOTES.md). Both variants here decode through a table in shared memory that maps every byte of
packed codes to the two code values it holds, ``(code[b >> 4], code[b & 15])``, one copy per lane of
a shared-memory wavefront (entry ``(b, lane)`` at byte ``b * 256 + lane * width``), so lanes never hit
the same bank and ``__byte_perm`` builds a lookup's address from a byte of packed codes in one
instruction. Both stream the packed codes and scales of 16-row groups into a ring of shared-memory
slots with bulk copies (Hopper's copy engine: no registers or load instructions), each thread block
(one per SM) owning a contiguous range of groups and reading its nested scales (Double Quantization)
once; K > 4096 is split over thread blocks whose fp32 partial sums are added afterwards.

* **Tensor cores** (``_MMA_KERNEL``; fp16/bf16 x, K and the block size multiples of 64): the table holds
  16-bit code pairs of x's type, which are exactly the A fragments of ``mma.sync.m16n8k16`` (one group =
  the MMA's 16 rows); x is the B operand, in registers. Per 1024 weights a warp issues ~62 instructions
  instead of ~105. A producer warp streams the groups and adds the consumer warps' partial sums, so
  there is no block-wide barrier after the prologue; the table sits at a 64 KB-aligned shared address
  so that the ``prmt`` also supplies its upper address bits. Codes are rounded to x's dtype (as the
  reference rounds each weight), products and sums are fp32.
* **FMA** (``_FMA_KERNEL``; any x dtype, block size 32 too): fp16 pairs for fp16/bf16 x (exact to 2^-12),
  fp32 pairs for fp32 x, fp32 FMAs; eight lanes per row (a warp reads 4 rows x 128 contiguous bytes per
  step), x in registers, one barrier per group.

Speed (H200, GPU time from CUDA-graph replay over rotating weight copies; BENCHMARKS.md): W 14336x4096
13.1 us with tensor cores (FMA 16.8, the Triton kernel 28.1, bitsandbytes 29.3); the LM head 128256x4096
83 us (211 / 222). Host time: :func:`gemv_4bit_cuda` validates and plans each call (~70 us on the H200
machine); :func:`prepare` does it once, and its :class:`Prepared` launches in ~15 us (what ``QLoRALinear``
keeps for decoding).

Needs: compute capability >= 9.0 (bulk copies, transaction barriers), ``torch.cuda._compile_kernel``
(PyTorch >= 2.8, NVRTC from the CUDA wheels), one row of x, K and the block size multiples of 32,
and the scales of the last (partial) 16-row group whole 16-byte units. :func:`supported` says so;
callers fall back to the Triton kernel otherwise; :func:`kind` says which variant runs.
``QLORA_CUDA_GEMV=0`` turns the kernel off, ``QLORA_GEMV_MMA=0`` the tensor-core variant.

Longer than 500 lines: about 480 of them are the CUDA C++ source of the two kernel variants, kept
beside the Python that plans, compiles and launches them.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from functools import lru_cache

import torch

from ..compat import compile_cuda_kernel, kernel_shared_memory, nvrtc_available, raw_stream_getter
from ..errors import QLoraError
from ..nf4 import QuantState
from ..settings import switches

SLICE = 256                      # K elements per warp (8 lanes x 32)
MAX_SPLIT_LEN = 16 * SLICE       # at most 16 warps per thread block (x in registers)
MAX_DEPTH = 3                    # ring slots (H200 sweep: 3 slots 16.6 us, 4 slots 17.2 for W 14336x4096)
TABLE_BYTES = 256 * 256          # 256 byte values x 256-byte rows (16 fp32 or 32 fp16 pairs, 128 B unused)
ROWS = 16                        # rows per group: 16 rows of scales are always whole 16-byte units
MMA_DEPTH = 3                    # tensor-core variant: ring slots (one before the table, two after it)
MMA_PAD = 32                     # bytes after each row of codes in a slot (conflict-free 8-byte loads)
MMA_SMEM_BASE = 1024             # the dynamic shared memory's address this layout assumes (Hopper)
MMA_FRONT = 65536 - MMA_SMEM_BASE  # bytes from there to the first 64 KB-aligned address (the table)


def smem_bytes(warps: int, split_len: int, depth: int, scale_bytes: int, nest_cap: int) -> int:
    """Table, nested code, the warps' row sums (twice), 8 barriers, the block's nested scales, then the
    ring: ``depth`` slots of ROWS rows of codes and their scales."""
    fixed = TABLE_BYTES + 256 * 4 + 2 * warps * ROWS * 4 + 64 + -(-nest_cap * 4 // 128) * 128
    return fixed + depth * (ROWS * split_len // 2 + -(-scale_bytes // 16) * 16)


_HELPERS = r"""
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float to_f32(u16 v) {
#if XT == 1
    return __uint_as_float(((u32)v) << 16);
#else
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
#endif
}

#if XT == 0
typedef float xt;
__device__ __forceinline__ xt from_f32(float f) { return f; }
#else
typedef u16 xt;
__device__ __forceinline__ xt from_f32(float f) {
    u16 r;
#if XT == 1
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
#endif
    return r;
}
#endif

#if PARTIAL
typedef float ot;
__device__ __forceinline__ ot out_val(float f) { return f; }
#else
typedef xt ot;
__device__ __forceinline__ ot out_val(float f) { return from_f32(f); }
#endif

// 32 x values of one lane's segment, in fp32
__device__ __forceinline__ void load_x32(const xt* p, float* xr) {
#if XT == 0
#pragma unroll
    for (int j = 0; j < 8; ++j) { float4 v = __ldg((const float4*)p + j); xr[4*j] = v.x; xr[4*j+1] = v.y; xr[4*j+2] = v.z; xr[4*j+3] = v.w; }
#else
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        uint4 v = __ldg((const uint4*)p + j);
        u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) { xr[8*j+2*h] = to_f32((u16)(w[h] & 0xffff)); xr[8*j+2*h+1] = to_f32((u16)(w[h] >> 16)); }
    }
#endif
}

#if T16
// Two code values (fp16 pair) for each byte of a packed word, against 8 x values.
__device__ __forceinline__ void f16x2_to_f32(u32 e, float& lo, float& hi) {
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(lo), "=f"(hi) : "r"(e));
}
__device__ __forceinline__ float dot_word(u32 w, const char* smem, u32 lane_off, const float* xr) {
    const u32 e0 = *(const u32*)(smem + __byte_perm(w, lane_off, 0x5504));
    const u32 e1 = *(const u32*)(smem + __byte_perm(w, lane_off, 0x5514));
    const u32 e2 = *(const u32*)(smem + __byte_perm(w, lane_off, 0x5524));
    const u32 e3 = *(const u32*)(smem + __byte_perm(w, lane_off, 0x5534));
    float a0, b0, a1, b1, a2, b2, a3, b3;
    f16x2_to_f32(e0, a0, b0); f16x2_to_f32(e1, a1, b1); f16x2_to_f32(e2, a2, b2); f16x2_to_f32(e3, a3, b3);
    float s0 = a0 * xr[0];
    float s1 = b0 * xr[1];
    s0 = fmaf(a1, xr[2], s0);
    s1 = fmaf(b1, xr[3], s1);
    s0 = fmaf(a2, xr[4], s0);
    s1 = fmaf(b2, xr[5], s1);
    s0 = fmaf(a3, xr[6], s0);
    s1 = fmaf(b3, xr[7], s1);
    return s0 + s1;
}
#else
// Two code values (fp32 pair) for each byte of a packed word, against 8 x values.
__device__ __forceinline__ float dot_word(u32 w, const char* smem, u32 lane_off, const float* xr) {
    float2 t0 = *(const float2*)(smem + __byte_perm(w, lane_off, 0x5504));
    float2 t1 = *(const float2*)(smem + __byte_perm(w, lane_off, 0x5514));
    float2 t2 = *(const float2*)(smem + __byte_perm(w, lane_off, 0x5524));
    float2 t3 = *(const float2*)(smem + __byte_perm(w, lane_off, 0x5534));
    float s0 = t0.x * xr[0];
    float s1 = t0.y * xr[1];
    s0 = fmaf(t1.x, xr[2], s0);
    s1 = fmaf(t1.y, xr[3], s1);
    s0 = fmaf(t2.x, xr[4], s0);
    s1 = fmaf(t2.y, xr[5], s1);
    s0 = fmaf(t3.x, xr[6], s0);
    s1 = fmaf(t3.y, xr[7], s1);
    return s0 + s1;
}

#endif

// both kernels' parameters (one argument block, Prepared, serves both)
#define GEMV_PARAMS const xt* __restrict__ x, const u8* __restrict__ packed, const void* __restrict__ absmax, \
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, const float* __restrict__ code, \
    ot* __restrict__ out, double offset_d, int N, int K, int split_len, int n_groups, int nested_len, int nest_cap
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

"""

_FMA_KERNEL = r"""
// Thread block: one warp per 256-element slice of this split's part of K (blockDim.x = 32 * slices);
// lane = (rr = lane / 8, i = lane % 8): row rr of each 4-row step, elements 32i .. 32i+31 of the slice,
// whose 32 x values stay in registers. Each block owns a contiguous range of groups of R = 4G rows.
// Thread 0 streams each group's packed codes (R rows x the split's bytes) and stored scales (R whole
// rows of absmax) into a ring of DEPTH shared-memory slots with bulk copies (the copy engine: no
// registers, no load instructions), DEPTH - 1 groups ahead; the block's nested scales (DQ) are read
// once at the start. The warps' per-row sums meet in shared memory, one barrier per group, after
// which the slot just read is refilled.
extern "C" __global__ void __launch_bounds__(MAXT, 1)
qlora_gemv_4bit(GEMV_PARAMS) {
    extern __shared__ __align__(128) char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int i = lane & 7, rr = lane >> 3;
    const int k0 = blockIdx.y * split_len;
    const int len = min(K - k0, split_len);
    const u32 lenb = (u32)len >> 1;              // code bytes of one row in a slot
    const int kb = K / BS;                       // scales per row
    const u32 esz = DQ ? 1 : 4;
    const u32 ab = (R * kb * esz + 15) & ~15u;   // scale bytes of a slot
    const u32 slot_bytes = R * lenb + ab;
    // this block's groups: [g0, g1)
    const int g0 = (int)((long long)n_groups * blockIdx.x / gridDim.x);
    const int g1 = (int)((long long)n_groups * (blockIdx.x + 1) / gridDim.x);
    const int my_groups = g1 - g0;
    const int nest0 = (int)(((long long)g0 * R * kb) / NBS);  // first nested scale the block needs

    float* nc = (float*)(smem + 65536);
    float* red = nc + 256;                       // [2][nwarps][R]
    unsigned long long* bars = (unsigned long long*)(red + 2 * nwarps * R);
    float* nest = (float*)(bars + 8);            // nested scales of the block's rows
    char* ring = (char*)nest + ((nest_cap * 4 + 127) & ~127);  // [DEPTH][R rows of codes | scales]
    const int kseg = k0 + warp * 256 + 32 * i;
    const bool active = kseg < k0 + len;
    const unsigned kc = active ? kseg : k0;      // inactive lanes read valid bytes and add 0 * code
    const float offset = (float)offset_d;
    const unsigned kh = (unsigned)K >> 1;

    // group g0 + j -> slot j % DEPTH: R rows (those < N) of the split's code bytes, then the rows' scales
#define ISSUE(j) {                                                                             \
        const int g_ = g0 + (j);                                                               \
        const int rows_ = min(R, N - g_ * R);                                                  \
        const u32 bar_ = smem_addr(bars + (j) % DEPTH);                                        \
        char* dst_ = ring + ((j) % DEPTH) * slot_bytes;                                        \
        const u32 sb_ = rows_ * kb * esz;                                                      \
        mbar_expect(bar_, rows_ * lenb + sb_);                                                 \
        if (lenb == kh) bulk_copy(smem_addr(dst_), packed + (size_t)g_ * R * kh, rows_ * lenb, bar_); \
        else for (int r_ = 0; r_ < rows_; ++r_)                                                \
            bulk_copy(smem_addr(dst_ + r_ * lenb), packed + (size_t)(g_ * R + r_) * kh + (k0 >> 1), lenb, bar_); \
        bulk_copy(smem_addr(dst_ + R * lenb), (const char*)absmax + (size_t)g_ * R * kb * esz, sb_, bar_); \
    }
    if (tid == 0) {
        for (int d = 0; d < DEPTH; ++d) mbar_init(smem_addr(bars + d));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int d = 0; d < DEPTH - 1 && d < my_groups; ++d) ISSUE(d)
    }
    float xr[32];
    if (active) load_x32(x + kseg, xr);
    else {
#pragma unroll
        for (int j = 0; j < 32; ++j) xr[j] = 0.f;
    }
#if T16
    // the byte -> (code[hi], code[lo]) table as fp16 pairs, 32 copies per row (one per lane)
    for (int e = tid; e < 8192; e += blockDim.x) {
        const int b = e >> 5, m = e & 31;
        u16 hi, lo;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(code[b >> 4]));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(code[b & 15]));
        *(u32*)(smem + b * 256 + m * 4) = (u32)hi | ((u32)lo << 16);
    }
    const u32 lane_off = lane * 4;
#else
    // the byte -> (code[hi], code[lo]) table, 16 copies per row (one per lane of a half-warp)
    for (int e = tid; e < 4096; e += blockDim.x) {
        const int b = e >> 4, m = e & 15;
        *(float2*)(smem + b * 256 + m * 8) = make_float2(code[b >> 4], code[b & 15]);
    }
    const u32 lane_off = (lane & 15) * 8;
#endif
#if DQ
    for (int e = tid; e < 256; e += blockDim.x) nc[e] = nested_code[e];
    {
        const int nest1 = min(nested_len, (int)(((long long)g1 * R * kb - 1) / NBS) + 1);
        for (int e = tid; e < nest1 - nest0; e += blockDim.x) nest[e] = nested_absmax[nest0 + e];
    }
#endif
    __syncthreads();

    const unsigned kblk = kc / BS;               // the lane's scale within a row
    for (int j = 0; j < my_groups; ++j) {
        const int g = g0 + j;
        const int buf = j & 1;
        if (!SKIP_WAIT) mbar_wait(smem_addr(bars + j % DEPTH), (j / DEPTH) & 1);
        const char* slot = ring + (j % DEPTH) * slot_bytes;
        const char* codes = slot + ((kc - k0) >> 1);
        const char* scales = slot + R * lenb;
#pragma unroll
        for (int t = 0; t < G; ++t) {
            const int r = t * 4 + rr;
            const uint4 w = *(const uint4*)(codes + r * lenb);
            float sc;
            if (DQ) {
                const unsigned blk = (unsigned)(g * R + r) * kb + kblk;
                sc = nc[((const u8*)scales)[r * kb + kblk]] * nest[blk / NBS - nest0] + offset;
            } else sc = ((const float*)scales)[r * kb + kblk];
            float p = SKIP_DOT ? __uint_as_float(w.x ^ w.y ^ w.z ^ w.w) :
                dot_word(w.x, smem, lane_off, xr) + dot_word(w.y, smem, lane_off, xr + 8)
                + dot_word(w.z, smem, lane_off, xr + 16) + dot_word(w.w, smem, lane_off, xr + 24);
            p *= sc;
            p += __shfl_xor_sync(0xffffffffu, p, 1);
            p += __shfl_xor_sync(0xffffffffu, p, 2);
            p += __shfl_xor_sync(0xffffffffu, p, 4);
            if (i == 0) red[(buf * nwarps + warp) * R + r] = p;
        }
        __syncthreads();   // every warp is done with this group's slot and partial sums
        if (tid == 0 && j + DEPTH - 1 < my_groups) ISSUE(j + DEPTH - 1)
        // row r's sum: warp r % nwarps adds the warps' partials, one per lane, with shuffles
        for (int r = warp; r < R; r += nwarps) {
            float sum = lane < nwarps ? red[(buf * nwarps + lane) * R + r] : 0.f;
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            sum += __shfl_xor_sync(0xffffffffu, sum, 8);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            const int orow = g * R + r;
            if (lane == 0 && orow < N) out[(size_t)blockIdx.y * N + orow] = out_val(sum);
        }
    }
}
"""
_SOURCE = _HELPERS + _FMA_KERNEL

_MMA_KERNEL = r"""
// Tensor-core variant (16-bit x, block size a multiple of 64): one 16-row group = the M of mma.m16n8k16.
// Warp w < nwarps owns the split's 64-element blocks 4w .. 4w+3; lane (gr = lane / 4, c = lane % 4) reads
// code bytes 8c .. 8c+7 of each block for rows gr and gr + 8 and looks every byte up in the pair table
// (16-bit code pairs of x's type), which gives the A fragments directly: MMA m of a block takes bytes 2m
// (k pair 2c) and 2m + 1 (k pair 2c + 8). That assignment of k to the MMA's k slots is a permutation shared
// by A and B, so B (x, the same in all 8 columns) holds x[16c + 4m .. 16c + 4m + 3] of the block: 32
// registers per lane for the warp's 4 blocks. The block's fp32 result times its scale accumulates in fp32.
// Warp nwarps produces: it streams each group's rows (one bulk copy per row, rows padded by PAD bytes so
// that rows gr .. gr+3 fall on distinct banks) and scales into a ring of DEPTH slots, and once every
// consumer warp has arrived on done[j] (its partial sums of group j written), refills the slot with group
// j + DEPTH and adds the warps' partial sums of group j's rows. No block-wide barrier after the prologue.
// The code table sits at a 64 KB-aligned shared address, so one prmt builds a lookup's full address; the
// small arrays and slot 0 lie before it, slots 1 .. DEPTH-1 after it (the host checked the layout against
// the dynamic shared memory's base address, see _smem_base).
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if XT == 1
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 lds32(u32 a) { u32 v; asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a)); return v; }
// table entry of byte N of w: (table's upper 16 address bits) | byte << 8 | lane * 4
#define LUT(w, n) lds32(__byte_perm((w), lane_off, 0x7604 | ((n) << 4)))

extern "C" __global__ void __launch_bounds__(MAXT, 1)
qlora_gemv_4bit_mma(GEMV_PARAMS) {
    extern __shared__ __align__(128) char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = (blockDim.x >> 5) - 1;    // consumer warps; warp nwarps is the producer
    const int gr = lane >> 2, c = lane & 3;
    const int k0 = blockIdx.y * split_len;
    const int len = min(K - k0, split_len);
    const u32 lenb = (u32)len >> 1;
    const u32 rstride = lenb + PAD;              // a slot's row stride
    const int kb = K / BS;
    const u32 esz = DQ ? 1 : 4;
    const u32 ab = (R * kb * esz + 15) & ~15u;
    const u32 slot_bytes = R * rstride + ab;
    const int g0 = (int)((long long)n_groups * blockIdx.x / gridDim.x);
    const int g1 = (int)((long long)n_groups * (blockIdx.x + 1) / gridDim.x);
    const int my_groups = g1 - g0;
    const int nest0 = (int)(((long long)g0 * R * kb) / NBS);

    const u32 sbase = smem_addr(smem);
    char* table = smem + (((sbase + 65535u) & ~65535u) - sbase);
    float* nc = (float*)smem;
    float* red = nc + 256;                       // [DEPTH + 1][nwarps][R]
    unsigned long long* bars = (unsigned long long*)(red + (DEPTH + 1) * nwarps * R);  // full[DEPTH], done[DEPTH+1]
    float* nest = (float*)(bars + 16);
    char* ring0 = smem + ((((u32)((char*)nest - smem) + nest_cap * 4) + 1023) & ~1023u);  // 1 KB-aligned
#define SLOT(s) ((s) == 0 ? ring0 : table + 65536 + ((s) - 1) * slot_bytes)
    const float offset = (float)offset_d;
    const unsigned kh = (unsigned)K >> 1;

    // producer lanes 0 .. rows-1 copy a row each, lane 16 the scales; lane 0 arms the barrier first
#define ISSUE(j) {                                                                             \
        const int g_ = g0 + (j);                                                               \
        const int rows_ = min(R, N - g_ * R);                                                  \
        const u32 bar_ = smem_addr(bars + (j) % DEPTH);                                        \
        char* dst_ = SLOT((j) % DEPTH);                                                        \
        const u32 sb_ = rows_ * kb * esz;                                                      \
        if (lane == 0) mbar_expect(bar_, rows_ * lenb + sb_);                                  \
        __syncwarp();                                                                          \
        if (lane < rows_) bulk_copy(smem_addr(dst_ + lane * rstride), packed + (size_t)(g_ * R + lane) * kh + (k0 >> 1), lenb, bar_); \
        if (lane == 16) bulk_copy(smem_addr(dst_ + R * rstride), (const char*)absmax + (size_t)g_ * R * kb * esz, sb_, bar_); \
    }
    if (warp == nwarps) {
        if (lane == 0) {
            for (int d = 0; d < DEPTH; ++d) mbar_init(smem_addr(bars + d));
            for (int d = 0; d <= DEPTH; ++d)
                asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bars + DEPTH + d)), "r"(nwarps * 32) : "memory");
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncwarp();
        for (int d = 0; d < DEPTH && d < my_groups; ++d) ISSUE(d)
    }
    // every global load of the prologue first (code, nested code and scales, x), so that their latencies
    // overlap (one loop after another they cost ~1 us on the H200), then the shared-memory stores
    const float cv = code[lane & 15];
#if DQ
    const float ncv = tid < 256 ? nested_code[tid] : 0.f;
    const int nest_n = min(nested_len, (int)(((long long)g1 * R * kb - 1) / NBS) + 1) - nest0;
    const float nv = tid < nest_n ? nested_absmax[nest0 + tid] : 0.f;
#endif
#if FULL
    const int nblk = 4;
#else
    const int nblk = warp < nwarps ? min(4, (len >> 6) - 4 * warp) : 0;
#endif
    u32 xb[4][8];
    if (warp < nwarps) {
#pragma unroll
        for (int bb = 0; bb < 4; ++bb) {
            if (bb < nblk) {
                const uint4* p = (const uint4*)(x + k0 + 64 * (4 * warp + bb) + 16 * c);
                const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
                xb[bb][0] = v0.x; xb[bb][1] = v0.y; xb[bb][2] = v0.z; xb[bb][3] = v0.w;
                xb[bb][4] = v1.x; xb[bb][5] = v1.y; xb[bb][6] = v1.z; xb[bb][7] = v1.w;
            } else {
#pragma unroll
                for (int q = 0; q < 8; ++q) xb[bb][q] = 0u;
            }
        }
    }
    // the byte -> (code[hi], code[lo]) table as 16-bit pairs of x's type, 32 copies per row (one per lane);
    // a warp writes one row at a time, taking the two code values from the lanes that loaded them
    for (int b = warp; b < 256; b += blockDim.x >> 5) {
        const float hi = __shfl_sync(0xffffffffu, cv, b >> 4), lo = __shfl_sync(0xffffffffu, cv, b & 15);
        *(u32*)(table + b * 256 + lane * 4) = (u32)from_f32(hi) | ((u32)from_f32(lo) << 16);
    }
    u32 lane_off = lane * 4 + (smem_addr(table) & 0xffff0000u);
    asm volatile("" : "+r"(lane_off));  // kept in a register, not recomputed per group
#if DQ
    if (tid < 256) nc[tid] = ncv;
    if (tid < nest_n) nest[tid] = nv;
    // blocks of fewer than 256 threads (K < 2048), more nested scales than threads: the rest
    for (int e = tid + blockDim.x; e < 256; e += blockDim.x) nc[e] = nested_code[e];
    for (int e = tid + blockDim.x; e < nest_n; e += blockDim.x) nest[e] = nested_absmax[nest0 + e];
#endif
    __syncthreads();

    if (warp == nwarps) {
        for (int j = 0; j < my_groups; ++j) {
            mbar_wait(smem_addr(bars + DEPTH + j % (DEPTH + 1)), (j / (DEPTH + 1)) & 1);
            if (j + DEPTH < my_groups) ISSUE(j + DEPTH)
            const float* rp = red + (j % (DEPTH + 1)) * nwarps * R;
            const int r = lane & 15, h = lane >> 4;
            float sum = 0.f;
            for (int w = h; w < nwarps; w += 2) sum += rp[w * R + r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            const int orow = (g0 + j) * R + r;
            if (h == 0 && orow < N) out[(size_t)blockIdx.y * N + orow] = out_val(sum);
        }
        return;
    }
    u32 code_off = gr * rstride + 128 * warp + 8 * c, row8 = 8 * rstride;  // the lane's bytes in a slot
    asm volatile("" : "+r"(code_off), "+r"(row8));
    int s = 0, sd = 0;          // ring slot and done barrier of group j
    u32 par = 0;
    const char* slot = SLOT(0);
    for (int j = 0; j < my_groups; ++j) {
        const int g = g0 + j;
        mbar_wait(smem_addr(bars + s), par);
        const char* scales = slot + R * rstride;
        float acc0 = 0.f, acc1 = 0.f;
#if DQ && NEST_ROW
        // all blocks of a row share one nested scale
        const float n0 = nest[(unsigned)((g * R + gr) * kb) / NBS - nest0];
        const float n1 = nest[(unsigned)((g * R + gr + 8) * kb) / NBS - nest0];
#endif
#if DQ && SC4
        // the scale bytes of the warp's 4 blocks, rows gr and gr + 8
        const u32 q0 = *(const u32*)(scales + gr * kb + (k0 >> 6) + 4 * warp);
        const u32 q1 = *(const u32*)(scales + (gr + 8) * kb + (k0 >> 6) + 4 * warp);
#endif
#pragma unroll
        for (int bb = 0; bb < 4; ++bb) {
            if (bb < nblk) {
                const int kk = 64 * (4 * warp + bb);             // the block's start within the split
                const char* cp = slot + code_off + 32 * bb;
                const uint2 w0 = *(const uint2*)cp;
                const uint2 w1 = *(const uint2*)(cp + row8);
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                if (!SKIP_DOT) {
                    mma16816(d, LUT(w0.x, 0), LUT(w1.x, 0), LUT(w0.x, 1), LUT(w1.x, 1), xb[bb][0], xb[bb][1]);
                    mma16816(d, LUT(w0.x, 2), LUT(w1.x, 2), LUT(w0.x, 3), LUT(w1.x, 3), xb[bb][2], xb[bb][3]);
                    mma16816(d, LUT(w0.y, 0), LUT(w1.y, 0), LUT(w0.y, 1), LUT(w1.y, 1), xb[bb][4], xb[bb][5]);
                    mma16816(d, LUT(w0.y, 2), LUT(w1.y, 2), LUT(w0.y, 3), LUT(w1.y, 3), xb[bb][6], xb[bb][7]);
                } else {
                    d[0] = __uint_as_float(w0.x ^ w0.y); d[2] = __uint_as_float(w1.x ^ w1.y);
                }
                const unsigned kblk = (unsigned)(k0 + kk) / BS;
                float s0, s1;
                if (DQ) {
#if SC4
                    const u32 e0 = (q0 >> (8 * bb)) & 255u, e1 = (q1 >> (8 * bb)) & 255u;
#else
                    const u32 e0 = ((const u8*)scales)[gr * kb + kblk], e1 = ((const u8*)scales)[(gr + 8) * kb + kblk];
#endif
#if NEST_ROW
                    s0 = nc[e0] * n0 + offset;
                    s1 = nc[e1] * n1 + offset;
#else
                    const unsigned b0 = (unsigned)(g * R + gr) * kb + kblk, b1 = b0 + 8u * kb;
                    s0 = nc[e0] * nest[b0 / NBS - nest0] + offset;
                    s1 = nc[e1] * nest[b1 / NBS - nest0] + offset;
#endif
                } else {
                    s0 = ((const float*)scales)[gr * kb + kblk];
                    s1 = ((const float*)scales)[(gr + 8) * kb + kblk];
                }
                acc0 = fmaf(d[0], s0, acc0);   // column 0 of the MMA's output (all 8 columns are equal)
                acc1 = fmaf(d[2], s1, acc1);
            }
        }
        if (c == 0) {
            float* rp = red + sd * nwarps * R + warp * R;
            rp[gr] = acc0;
            rp[gr + 8] = acc1;
        }
        asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bars + DEPTH + sd)) : "memory");
        if (++s == DEPTH) { s = 0; par ^= 1u; }
        if (++sd == DEPTH + 1) sd = 0;
        slot = SLOT(s);
    }
}
"""


_XT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lock = threading.Lock()
_kernels: dict = {}
_broken: list[str] = []  # why compiling failed once (then every call takes the Triton kernel)
# Timing experiments only (NOTES.md): leave the wait for the copies or the dot products out.
DEBUG = "#define SKIP_WAIT 0\n#define SKIP_DOT 0\n"


def _compile(device: torch.device, name: str, source: str, defines: dict, smem: int):
    """The kernel ``name`` of ``source`` with these ``#define``s (and DEBUG), compiled once per device."""
    key = (device.index, name, tuple(sorted(defines.items())), DEBUG)
    kern = _kernels.get(key)
    if kern is None:
        with _lock:
            kern = _kernels.get(key)
            if kern is None:
                text = "".join(f"#define {k} {v}\n" for k, v in defines.items()) + DEBUG + source
                try:
                    with torch.cuda.device(device):
                        kern = compile_cuda_kernel(text, name)
                except (RuntimeError, OSError, AttributeError) as e:  # no NVRTC, a driver too old, ...
                    _broken.append(f"{type(e).__name__}: {e}")
                    warnings.warn(f"qlora: the CUDA GEMV kernel did not compile, using the Triton one "
                                  f"({_broken[0][:300]})", RuntimeWarning, stacklevel=3)
                    raise CompileError(_broken[0]) from e
                _kernels[key] = kern
    if kernel_shared_memory(kern) < smem:
        with torch.cuda.device(device):
            kern.set_shared_memory_config(smem)
    return kern


class CompileError(QLoraError):
    """NVRTC or the driver refused the kernel; :func:`available` is False from then on."""


def available(device: torch.device) -> bool:
    """True when this device can run the kernel: PyTorch with NVRTC kernels, compute capability >= 9.0
    (bulk copies and transaction barriers), not switched off with ``QLORA_CUDA_GEMV=0``, and no
    earlier compilation failed."""
    if _broken or not switches().cuda_gemv or not nvrtc_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


def supported(x: torch.Tensor, state: QuantState) -> bool:
    """True when :func:`gemv_4bit_cuda` handles this call: one row on a CUDA device of compute
    capability >= 9.0, K and the block size multiples of 32, the last group's scales whole 16-byte units."""
    if not x.is_cuda or len(state.shape) != 2 or x.dtype not in _XT:
        return False
    n_out, k = (int(s) for s in state.shape)
    bs = state.blocksize
    if x.numel() != k or k % 32 or bs % 32 or k % bs or n_out * k >= 2 ** 31:
        return False
    esz = 1 if state.double_quant else 4
    return (n_out % ROWS) * (k // bs) * esz % 16 == 0 and available(x.device)


def preferred(x: torch.Tensor, state: QuantState) -> bool:
    """Where ``kernels.matmul_4bit`` takes this kernel: :func:`supported`, and either the tensor-core
    variant applies (:func:`kind`; also with K split over blocks: 18.3 us against the Triton kernel's 28.8
    for W 4096x14336 on the H200) or K <= 4096 (the FMA variant only ties the Triton kernel when K is split)."""
    if not supported(x, state):
        return False
    return kind(x, state) == "mma" or int(state.shape[-1]) <= MAX_SPLIT_LEN


def kind(x: torch.Tensor, state: QuantState) -> str:
    """Which variant :func:`gemv_4bit_cuda` runs for a supported call: ``"mma"`` (tensor cores: fp16/bf16
    x, K and the block size multiples of 64, the shared-memory layout fits) or ``"fma"``."""
    n_out, k = (int(s) for s in state.shape)
    bs = state.blocksize
    if x.dtype == torch.float32 or k % 64 or bs % 64 or not switches().gemv_mma:
        return "fma"
    if _smem_base(x.device) != MMA_SMEM_BASE:  # not remembered inside, as it may be unknown for now
        return "fma"
    dq = state.double_quant
    fits = _mma_fits(n_out, k, k // bs * (1 if dq else 4), state.nested_blocksize if dq else 0, x.device)
    return "mma" if fits else "fma"


@lru_cache(maxsize=256)
def _mma_fits(n_out: int, k: int, kb_bytes: int, nbs: int, device: torch.device) -> bool:
    """The tensor-core variant's shared-memory layout fits this shape on this device (remembered: it is
    asked on every call, by :func:`preferred` and again by :func:`gemv_4bit_cuda`)."""
    split, split_len, warps, blocks, nest_cap = _plan_mma(n_out, k, kb_bytes, nbs, device)
    front, total = mma_smem_bytes(warps, split_len, ROWS * kb_bytes, nest_cap)
    return front <= MMA_FRONT and total <= _smem_limit(device)


def plan(n_out: int, k: int, kb_bytes: int, nbs: int, sms: int, smem_limit: int, split: int | None = None,
         depth: int | None = None) -> tuple[int, int, int, int, int, int]:
    """(split, elements per split, warps per block, ring depth, blocks, nested scales per block): a split
    keeps a block at <= 16 warps (x in registers); one persistent block per SM (per split), each with a
    contiguous range of row groups; a ring of up to MAX_DEPTH slots, as many as fit.
    ``kb_bytes``: the bytes of scales per weight row; ``nbs``: the nested block size (0 without DQ)."""
    split, split_len, warps, blocks, nest_cap = _split(n_out, k, kb_bytes, nbs, sms, split, 32)
    if depth is None:
        fixed = smem_bytes(warps, split_len, 0, 0, nest_cap)
        slot = smem_bytes(warps, split_len, 1, ROWS * kb_bytes, nest_cap) - fixed
        depth = max(2, min(MAX_DEPTH, (smem_limit - fixed) // slot))
    return split, split_len, warps, depth, blocks, nest_cap


def plan_mma(n_out: int, k: int, kb_bytes: int, nbs: int, sms: int, split: int | None = None
             ) -> tuple[int, int, int, int, int]:
    """(split, elements per split, consumer warps, blocks, nested scales per block) of the tensor-core
    variant: splits of at most 4096 elements (a multiple of 64), one consumer warp per 256 elements (plus
    the producer warp), one persistent block per SM and split."""
    return _split(n_out, k, kb_bytes, nbs, sms, split, 64)


def _split(n_out: int, k: int, kb_bytes: int, nbs: int, sms: int, split: int | None, unit: int):
    """(split, elements per split (a multiple of ``unit``, at most MAX_SPLIT_LEN), warps of SLICE elements,
    persistent blocks (one per SM and split), nested scales a block's contiguous range of groups needs)."""
    if split is None:
        split = -(-k // MAX_SPLIT_LEN)
    split_len = -(-k // (split * unit)) * unit
    if split_len > MAX_SPLIT_LEN:
        raise ValueError(f"K={k} needs a split of at most {MAX_SPLIT_LEN} elements, got {split_len}")
    split = -(-k // split_len)
    n_groups = -(-n_out // ROWS)
    blocks = min(n_groups, max(1, sms // split))
    nest_cap = (-(-n_groups // blocks) * ROWS * kb_bytes) // nbs + 2 if nbs else 1
    return split, split_len, -(-split_len // SLICE), blocks, nest_cap


def mma_smem_bytes(warps: int, split_len: int, scale_bytes: int, nest_cap: int) -> tuple[int, int]:
    """(bytes before the table, total dynamic shared memory) of the tensor-core variant: before the
    table (at the first 64 KB-aligned shared address, MMA_FRONT bytes in when the dynamic shared memory
    starts at MMA_SMEM_BASE) the nested code, the warps' partial sums, the barriers, the nested scales
    and ring slot 0 (at a 1 KB-aligned offset); after it slots 1 .. MMA_DEPTH-1."""
    slot = ROWS * (split_len // 2 + MMA_PAD) + -(-scale_bytes // 16) * 16
    front = -(-(256 * 4 + (MMA_DEPTH + 1) * warps * ROWS * 4 + 128 + nest_cap * 4) // 1024) * 1024 + slot
    return front, MMA_FRONT + TABLE_BYTES + (MMA_DEPTH - 1) * slot


_SMEM_BASE: dict = {}


def _smem_base(device: torch.device) -> int:
    """The shared-state-space address where a kernel's dynamic shared memory starts on this device (1 KB
    is reserved for the system on Hopper), read once with a one-line kernel; -1 if that fails (and, not
    remembered, while a CUDA graph is being captured: the probe cannot run then)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _SMEM_BASE:
        return _SMEM_BASE[idx]
    if torch.cuda.is_current_stream_capturing():
        return -1
    _SMEM_BASE[idx] = _probe_smem_base(device)
    return _SMEM_BASE[idx]


def _probe_smem_base(device: torch.device) -> int:
    try:
        with torch.cuda.device(device):
            probe = compile_cuda_kernel(
                'extern "C" __global__ void qlora_smem_base(unsigned* out) { extern __shared__ char s[];'
                ' out[0] = (unsigned)__cvta_generic_to_shared(s); }', "qlora_smem_base")
            out = torch.zeros(1, dtype=torch.int32, device=device)
            probe(grid=(1, 1, 1), block=(32, 1, 1), args=[out], shared_mem=16)
            return int(out.item())
    except (RuntimeError, OSError, AttributeError):
        return -1


@lru_cache(maxsize=256)
def _plan(n_out: int, k: int, kb_bytes: int, nbs: int, device: torch.device, split: int | None = None,
          depth: int | None = None) -> tuple[int, int, int, int, int, int]:
    """:func:`plan` for this device (its SM count and shared-memory limit), remembered per shape."""
    from .dequant import sm_count
    return plan(n_out, k, kb_bytes, nbs, sm_count(device), _smem_limit(device), split, depth)


@lru_cache(maxsize=256)
def _plan_mma(n_out: int, k: int, kb_bytes: int, nbs: int, device: torch.device, split: int | None = None):
    from .dequant import sm_count
    return plan_mma(n_out, k, kb_bytes, nbs, sm_count(device), split)


def gemv_4bit_cuda(x: torch.Tensor, packed: torch.Tensor, state: QuantState, split: int | None = None,
                   depth: int | None = None, t16: bool | None = None, variant: str | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` for one row of x (any leading shape holding one row); ``split`` overrides the
    planned K split; ``variant`` ("mma"/"fma", default :func:`kind`), ``depth`` and ``t16`` (the FMA
    variant's ring depth and table width) are for benchmarks and tests. Each call validates and plans
    again; a caller that multiplies by the same weight many times (decoding) keeps :func:`prepare`'s
    result instead."""
    return prepare(x, packed, state, split, depth, t16, variant)(x)


def prepare(x: torch.Tensor, packed: torch.Tensor, state: QuantState, split: int | None = None,
            depth: int | None = None, t16: bool | None = None, variant: str | None = None) -> "Prepared":
    """Validate and plan :func:`gemv_4bit_cuda` for this weight and for one-row inputs like ``x`` (its
    dtype and device): the returned :class:`Prepared` multiplies any such row by the weight at a
    fraction of the host time. Raises :class:`QLoraError` where the kernel does not handle the call."""
    from .dequant import _device_state, check_quantized
    check_quantized(packed, state)
    if not supported(x, state):
        raise QLoraError(f"the CUDA GEMV does not handle this call (x {tuple(x.shape)} {x.dtype} on {x.device}, "
                         f"weight {tuple(state.shape)}, block size {state.blocksize}); use kernels.matmul_4bit")
    n_out, k = (int(s) for s in state.shape)
    dq = state.double_quant
    kb, esz = k // state.blocksize, 1 if dq else 4
    nbs = state.nested_blocksize if dq else 0
    xt = _XT[x.dtype]
    variant = variant or kind(x, state)
    if variant == "mma":
        if xt == 0 or k % 64 or state.blocksize % 64:
            raise QLoraError("the tensor-core GEMV needs fp16/bf16 x and K and the block size multiples of 64")
        split, split_len, warps, blocks, nest_cap = _plan_mma(n_out, k, kb * esz, nbs, x.device, split)
        smem = mma_smem_bytes(warps, split_len, ROWS * kb * esz, nest_cap)[1]
        full = split_len % 256 == 0 and (k - (split - 1) * split_len) % 256 == 0
        defines = dict(XT=xt, DQ=int(dq), PARTIAL=int(split > 1), BS=state.blocksize, NBS=nbs or 256,
                       MAXT=32 * (warps + 1), R=ROWS, DEPTH=MMA_DEPTH, PAD=MMA_PAD, T16=1, FULL=int(full),
                       NEST_ROW=int(dq and nbs % kb == 0), SC4=int(dq and full and state.blocksize == 64))
        kern = _compile(x.device, "qlora_gemv_4bit_mma", _HELPERS + _MMA_KERNEL, defines, smem)
        threads = 32 * (warps + 1)
    else:
        split, split_len, warps, depth, blocks, nest_cap = _plan(n_out, k, kb * esz, nbs, x.device, split, depth)
        smem = smem_bytes(warps, split_len, depth, ROWS * kb * esz, nest_cap)
        defines = dict(XT=xt, DQ=int(dq), PARTIAL=int(split > 1), BS=state.blocksize, NBS=nbs or 256,
                       MAXT=32 * warps, R=ROWS, G=ROWS // 4,
                       T16=int(x.dtype != torch.float32 if t16 is None else t16), DEPTH=depth)
        kern = _compile(x.device, "qlora_gemv_4bit", _SOURCE, defines, smem)
        threads = 32 * warps
    code, absmax, nested_absmax, nested_code = _device_state(state, x.device)
    flat = packed.reshape(-1)
    if flat.data_ptr() % 16:
        flat = flat.clone()
    if absmax.data_ptr() % 16:
        absmax = absmax.clone()
    return Prepared(kern, x, packed, state.absmax, (flat, absmax, nested_absmax, nested_code, code), (blocks, split), threads, smem,
                    float(state.offset) if dq else 0.0,
                    (n_out, k, split_len, -(-n_out // ROWS), int(nested_absmax.numel()) if dq else 0, nest_cap))


def _nothing():
    return None


class Prepared:
    """The CUDA GEMV planned for one weight and one-row inputs of one dtype on one device (:func:`prepare`):
    the compiled kernel, the launch configuration and the weight's device pointers, with the launch's
    argument block built once, so that a call only writes x's and the output's pointers and launches
    (the weight's tensors are kept alive here). :meth:`matches` says whether it serves an input."""

    ok = True  # (a layer's cache also holds "not supported" markers, whose ok is False)
    _lib = None
    _stream = None

    def __init__(self, kern, x, packed, absmax, tensors, grid, threads, smem, offset, ints):
        if Prepared._lib is None:
            lib = ctypes.CDLL("libcuda.so.1")
            lib.cuLaunchKernel.restype = ctypes.c_int
            Prepared._lib, Prepared._stream = lib, staticmethod(raw_stream_getter())
        self.kern = kern  # keeps the module loaded
        self.tensors = tensors
        self.dtype, self.device, self.index = x.dtype, x.device, x.get_device()
        self.packed_ptr, self.absmax_ptr = packed.data_ptr(), absmax.data_ptr()
        self.n_out, self.k, self.split = ints[0], ints[1], grid[1]
        # kernel arguments: x, packed, absmax, nested_absmax, nested_code, code, out, offset, 6 ints
        self.x_cell, self.out_cell = ctypes.c_void_p(), ctypes.c_void_p()
        cells = [self.x_cell] + [ctypes.c_void_p(t.data_ptr()) for t in tensors] + [self.out_cell] \
            + [ctypes.c_double(offset)] + [ctypes.c_int(i) for i in ints]
        self.cells = cells
        self.params = (ctypes.c_void_p * len(cells))(*[ctypes.cast(ctypes.byref(c), ctypes.c_void_p) for c in cells])
        self.head = (kern.func, ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(1),
                     ctypes.c_uint(threads), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(smem))
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):
        return None  # a copied layer prepares its own (this one points at the original's tensors)

    def __reduce__(self):
        return (_nothing, ())  # nor is it pickled with a module (device pointers, a compiled kernel)

    def matches(self, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> bool:
        """True when this serves ``x`` (same dtype and device) times the weight of ``packed`` and ``absmax``
        (the same tensors' memory as when it was prepared)."""
        return (x.dtype is self.dtype and x.get_device() == self.index and packed.data_ptr() == self.packed_ptr
                and absmax.data_ptr() == self.absmax_ptr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        if x.shape[-1] != k or x.numel() != k or x.dtype is not self.dtype or x.get_device() != self.index:
            raise QLoraError(f"this GEMV was prepared for one row of {k} {self.dtype} values on {self.device}, "
                             f"got x {tuple(x.shape)} {x.dtype} on {x.device}")
        return self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__` for an ``x`` known to be one row of this dtype on this device (:meth:`matches`)."""
        k, n_out, split = self.k, self.n_out, self.split
        x1 = x.view(k) if x.is_contiguous() else x.reshape(k)
        if x1.data_ptr() % 16 or not x1.is_contiguous():
            x1 = x1.clone()
        partial = split > 1
        out = torch.empty((split, n_out) if partial else (n_out,), device=self.device,
                          dtype=torch.float32 if partial else self.dtype)
        stream = ctypes.c_void_p(self._stream(self.index))
        with self.lock:
            self.x_cell.value = x1.data_ptr()
            self.out_cell.value = out.data_ptr()
            res = self._lib.cuLaunchKernel(*self.head, stream, self.params, None)
        if res != 0:
            raise QLoraError(f"launching the CUDA GEMV failed (CUresult {res})")
        if partial:
            out = out.sum(0).to(self.dtype)
        return out.view(*x.shape[:-1], n_out)


@lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> int:
    return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 * 1024))
