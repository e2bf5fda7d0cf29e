"""K-quant encoders for GGUF: Q4_K and Q6_K, written from the format definition.

The `gguf` package can *decode* these blocks (``gguf.quants.dequantize``) but not encode
them; this module encodes, vectorised in torch (float32, on the input's device), and the
tests check every block against the gguf decoder.

Both formats group a row into super-blocks of ``QK_K = 256`` values, so a row's length
must be a multiple of 256 (the caller picks a 32-block fallback type otherwise).

**Q4_K** (144 bytes per super-block, 4.5 bits/weight)::

    d     fp16      super-block scale of the sub-block scales
    dmin  fp16      super-block scale of the sub-block mins
    scales[12]      8 six-bit scales sc[j] and 8 six-bit mins m[j], packed:
                      byte j   (j<4): sc[j]   | (sc[j+4] >> 4) << 6
                      byte 4+j (j<4): m[j]    | (m[j+4]  >> 4) << 6
                      byte 8+j (j<4): (sc[j+4] & 15) | (m[j+4] & 15) << 4
    qs[128]         4-bit codes q in 0..15; byte 32c+k holds value 64c+k in its low
                    nibble and value 64c+32+k in its high nibble (c = 0..3)

    value i of sub-block j (8 sub-blocks of 32):  x ~= d*sc[j]*q - dmin*m[j]

**Q6_K** (210 bytes per super-block, 6.5625 bits/weight)::

    ql[128]   low 4 bits:  for half h (128 values) and r in 0..127, value 128h+r sits in
              byte 64h + r%64, low nibble if r < 64 else high nibble
    qh[64]    high 2 bits: value 128h+r sits in byte 32h + r%32, bits 2*(r//32)..+1
    scales[16] int8 sub-block scales sc[j] (16 sub-blocks of 16 values)
    d         fp16

    x ~= d * sc[j] * (q - 32),  q in 0..63

Encoding is a two-level fit. First every sub-block gets its own float (scale, min) or
scale by a small search: candidate scales spread around the range-derived one, the codes
rounded for each, then the least-squares scale (and min) for those codes; the candidate
with the smallest squared error wins and is refined by a few re-round/re-fit steps.
Then the per-sub-block floats are themselves quantized (6-bit unsigned for Q4_K against
fp16 d/dmin; int8 for Q6_K against fp16 d) and the codes are re-rounded against the
scales as they will be decoded, so rounding of the scales is compensated where it can be.
Weights are plain (unweighted) squared error: no importance matrix.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import QLoraError

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_CHUNK_SUPERBLOCKS = 8192  # 2M values per step keeps the search's temporaries ~100 MB


def _as_rows(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise QLoraError(f"{name}: K-quants take a 2-D weight, got shape {tuple(t.shape)}")
    if t.shape[1] % QK_K != 0:
        raise QLoraError(f"{name}: row length {t.shape[1]} is not a multiple of {QK_K}; "
                         f"use a 32-block type (q8_0/q5_0/q4_0) for this tensor")
    if not t.is_floating_point():
        raise QLoraError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    t = t.detach().to(torch.float32)
    if not torch.isfinite(t).all():
        raise QLoraError(f"{name}: the weight holds NaN or Inf values; cannot quantize it")
    return t


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 value that will be stored (kept as float32 for the math)."""
    return x.to(torch.float16).to(torch.float32)


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b, dim=1)


def _fit_affine(x: torch.Tensor, nmax: int, steps: int = 11, refine: int = 2):
    """Per-row fit of x ~= a*q + b with q in 0..nmax integer, a >= 0, b <= 0.

    x: (S, n). Returns (a, b) of shape (S,). The offset is kept <= 0 because Q4_K stores
    the min as a non-negative multiple of a non-negative dmin (x ~= d*sc*q - dmin*m).
    For fixed codes q the best (a, b) is a 2x2 least-squares solve; its squared error is
    ``sum(x'^2) - n*sqx^2/det`` (x' = x - mean, so the sums stay well conditioned), so
    candidates are ranked by the explained part alone.
    """
    n = x.shape[1]
    mu = x.mean(dim=1)
    xc = x - mu[:, None]
    lo = torch.clamp(x.amin(dim=1), max=0.0)
    span = x.amax(dim=1) - lo
    ok = span > 0
    span = torch.where(ok, span, torch.ones_like(span))
    xl = x - lo[:, None]

    def fit(q):
        sq, sqq, sqx = q.sum(1), _vdot(q, q), _vdot(q, xc)
        det = n * sqq - sq * sq
        good = det > 0
        det = torch.where(good, det, torch.ones_like(det))
        a = n * sqx / det
        b = mu - sq * sqx / det
        score = torch.where(good, n * sqx * sqx / det, torch.full_like(det, -float("inf")))
        # an offset above zero is not representable: pin it to 0 and refit the scale alone
        pos = b > 0
        sqx0 = sqx + mu * sq
        a0 = sqx0 / torch.clamp(sqq, min=1e-30)
        score0 = torch.where(sqq > 0, sqx0 * sqx0 / torch.clamp(sqq, min=1e-30), torch.zeros_like(sqq)) - n * mu * mu
        a, b, score = torch.where(pos, a0, a), torch.where(pos, torch.zeros_like(b), b), torch.where(pos, score0, score)
        score = torch.where(a < 0, torch.full_like(score, -float("inf")), score)
        return a, b, score

    best_a, best_b, best_s = fit(torch.clamp_(torch.round(xl * (nmax / span)[:, None]), 0, nmax))
    for k in range(steps):
        iscale = (nmax - 1.0 + 2.0 * k / max(steps - 1, 1)) / span  # nmax-1 .. nmax+1 levels over the range
        a, b, sc = fit(torch.clamp_(torch.round(xl * iscale[:, None]), 0, nmax))
        better = sc > best_s
        best_a, best_b, best_s = (torch.where(better, a, best_a), torch.where(better, b, best_b),
                                  torch.where(better, sc, best_s))
    for _ in range(refine):
        inv = 1.0 / torch.where(best_a > 0, best_a, torch.ones_like(best_a))
        a, b, sc = fit(torch.clamp_(torch.round((x - best_b[:, None]) * inv[:, None]), 0, nmax))
        better = (sc > best_s) & (best_a > 0)
        best_a, best_b, best_s = (torch.where(better, a, best_a), torch.where(better, b, best_b),
                                  torch.where(better, sc, best_s))
    best_a = torch.where(ok & torch.isfinite(best_s), torch.clamp(best_a, min=0.0), torch.zeros_like(best_a))
    best_b = torch.where(ok & torch.isfinite(best_s), torch.clamp(best_b, max=0.0), lo)
    return best_a, best_b


def _fit_symmetric(x: torch.Tensor, qmin: int, qmax: int, steps: int = 9, refine: int = 2):
    """Per-row fit of x ~= a*q with q integer in qmin..qmax (qmin = -qmax-1). Returns a (S,).

    The value of largest magnitude is mapped near the wide end ``qmin`` (a may be negative),
    which uses the one extra negative level of a two's-complement code. For fixed q the best
    a is sqx/sqq and the squared error ``sum(x^2) - sqx^2/sqq``: candidates are ranked by
    ``sqx^2/sqq``.
    """
    idx = x.abs().argmax(dim=1, keepdim=True)
    vmax = torch.gather(x, 1, idx).squeeze(1)
    ok = vmax != 0
    vmax = torch.where(ok, vmax, torch.ones_like(vmax))

    def fit(iscale):
        q = torch.clamp_(torch.round(x * iscale[:, None]), qmin, qmax)
        sqq = torch.clamp(_vdot(q, q), min=1e-30)
        sqx = _vdot(q, x)
        return sqx / sqq, sqx * sqx / sqq

    best_a, best_s = fit(qmin / vmax)
    for k in range(steps):
        lev = qmin + 0.9 - 1.8 * k / max(steps - 1, 1)  # |qmin|-0.9 .. |qmin|+0.9 levels at vmax
        a, sc = fit(lev / vmax)
        better = sc > best_s
        best_a, best_s = torch.where(better, a, best_a), torch.where(better, sc, best_s)
    for _ in range(refine):
        a, sc = fit(1.0 / torch.where(best_a != 0, best_a, torch.ones_like(best_a)))
        better = (sc > best_s) & (best_a != 0)
        best_a, best_s = torch.where(better, a, best_a), torch.where(better, sc, best_s)
    return torch.where(ok, best_a, torch.zeros_like(best_a))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    nz = den != 0
    return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.uint8).cpu().numpy()


def _encode_q4_k(x: torch.Tensor) -> np.ndarray:
    """x: (B, 256) float32 -> (B, 144) uint8."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    a, b = _fit_affine(sub, 15)
    a, m = a.reshape(nb, 8), (-b).reshape(nb, 8)           # scales >= 0, mins >= 0
    d = _fp16(a.amax(dim=1) / 63)
    dmin = _fp16(m.amax(dim=1) / 63)
    sc = torch.clamp(torch.round(_safe_div(a, d[:, None])), 0, 63)
    mn = torch.clamp(torch.round(_safe_div(m, dmin[:, None])), 0, 63)
    eff_s = (d[:, None] * sc)[:, :, None]                   # (B, 8, 1) as decoded
    eff_m = (dmin[:, None] * mn)[:, :, None]
    xs = x.reshape(nb, 8, 32)
    q = torch.clamp(torch.round(_safe_div(xs + eff_m, eff_s.expand_as(xs))), 0, 15)

    sc_i, mn_i = sc.to(torch.int32), mn.to(torch.int32)
    packed = torch.empty(nb, 12, dtype=torch.int32, device=x.device)
    packed[:, 0:4] = sc_i[:, :4] | ((sc_i[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn_i[:, :4] | ((mn_i[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc_i[:, 4:] & 15) | ((mn_i[:, 4:] & 15) << 4)
    qi = q.to(torch.int32).reshape(nb, 4, 2, 32)
    qs = qi[:, :, 0, :] | (qi[:, :, 1, :] << 4)             # (B, 4, 32)

    d_b = d.to(torch.float16).cpu().numpy().view(np.uint8).reshape(nb, 2)
    dm_b = dmin.to(torch.float16).cpu().numpy().view(np.uint8).reshape(nb, 2)
    return np.concatenate([d_b, dm_b, _u8(packed), _u8(qs.reshape(nb, 128))], axis=1)


def _encode_q6_k(x: torch.Tensor) -> np.ndarray:
    """x: (B, 256) float32 -> (B, 210) uint8."""
    nb = x.shape[0]
    a = _fit_symmetric(x.reshape(nb * 16, 16), -32, 31).reshape(nb, 16)
    idx = a.abs().argmax(dim=1, keepdim=True)
    amax = torch.gather(a, 1, idx).squeeze(1)
    d = _fp16(amax / -128)                                   # the largest scale becomes -128
    sc = torch.clamp(torch.round(_safe_div(a, d[:, None])), -128, 127)
    eff = (d[:, None] * sc)[:, :, None]
    xs = x.reshape(nb, 16, 16)
    q = (torch.clamp(torch.round(_safe_div(xs, eff.expand_as(xs))), -32, 31) + 32).to(torch.int32)

    qr = q.reshape(nb, 2, 128)
    lo = (qr & 15).reshape(nb, 2, 2, 64)
    ql = lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)              # (B, 2, 64)
    hi = (qr >> 4).reshape(nb, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    sc_b = sc.to(torch.int8).cpu().numpy().view(np.uint8)
    d_b = d.to(torch.float16).cpu().numpy().view(np.uint8).reshape(nb, 2)
    return np.concatenate([_u8(ql.reshape(nb, 128)), _u8(qh.reshape(nb, 64)), sc_b, d_b], axis=1)


def _quantize(x, encode, nbytes: int, name: str) -> np.ndarray:
    t = _as_rows(x, name)
    rows, cols = t.shape
    flat = t.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], nbytes), dtype=np.uint8)
    with torch.no_grad():
        for s in range(0, flat.shape[0], _CHUNK_SUPERBLOCKS):
            out[s:s + _CHUNK_SUPERBLOCKS] = encode(flat[s:s + _CHUNK_SUPERBLOCKS])
    return out.reshape(rows, cols // QK_K * nbytes)


def quantize_q4_k(x, name: str = "tensor") -> np.ndarray:
    """Encode a (rows, cols) float weight (cols % 256 == 0) as Q4_K.

    Returns uint8 of shape (rows, cols // 256 * 144), the row-major GGUF tensor bytes;
    ``gguf.quants.dequantize(out, GGMLQuantizationType.Q4_K)`` decodes it to (rows, cols).
    """
    return _quantize(x, _encode_q4_k, Q4_K_BYTES, name)


def quantize_q6_k(x, name: str = "tensor") -> np.ndarray:
    """Encode a (rows, cols) float weight (cols % 256 == 0) as Q6_K.

    Returns uint8 of shape (rows, cols // 256 * 210); decode with
    ``gguf.quants.dequantize(out, GGMLQuantizationType.Q6_K)``.
    """
    return _quantize(x, _encode_q6_k, Q6_K_BYTES, name)
