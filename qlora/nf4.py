"""4-bit blockwise quantization (NF4 / FP4 / Int4) with Double Quantization, in pure torch.

This is the reference every kernel is tested against, and it reproduces
bitsandbytes 0.50 (CPU backend) bit for bit.

Format of a quantized weight ``W`` with ``n = W.numel()`` elements:

* ``packed``: uint8, shape ``[(n + 1) // 2, 1]``. Element ``2i`` of the flattened
  weight is the **high** nibble of byte ``i``, element ``2i + 1`` the low nibble.
  An odd ``n`` pads the last low nibble with the code of 0.0.
* ``absmax``: one scale per block of ``blocksize`` consecutive elements
  (``ceil(n / blocksize)`` of them; the last block may be short).
  The element is ``code[q] * absmax[block]``, computed in fp32, then cast.
* Double Quantization (DQ): ``absmax`` (fp32) is replaced by
  ``offset = mean(absmax)`` and ``absmax - offset`` quantized to 8 bits with the
  signed dynamic code, blocks of 256, one fp32 scale (``nested_absmax``) per block.
  Reconstruction: ``dyn_code[q8] * nested_absmax[block] + offset``.

Quantizing picks the nearest code value of ``w / absmax`` (ties go to the lower
code); the 8-bit DQ step follows bitsandbytes' CPU kernel, which rounds through
a 65536-entry lookup table, so that our bytes are identical to theirs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DQ_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# NF4: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero (QLoRA paper, App. E).
_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bitsandbytes' bias), indexed by bit pattern:
# bit 3 is the sign, bits 0-2 give 0, 1/16, 8, 12, 4, 6, 2, 3; divided by the max (12).
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# Int4: symmetric uniform levels -7..7 (index 8 is a second, negative zero), divided by 7.
_INT4 = [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values that the 4-bit indices 0..15 stand for (bitsandbytes' ``quant_map``)."""
    return _code_4bit_cpu(quant_type).to(device)


@lru_cache(maxsize=None)
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    table = {"nf4": _NF4, "fp4": _FP4, "int4": _INT4}.get(quant_type)
    if table is None:
        raise ValueError(f"unknown quant type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")
    t = torch.tensor(table, dtype=torch.float32)
    return t / t.abs().max()


@lru_cache(maxsize=None)
def _bounds_4bit_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted code values, and the index each sorted slot maps to."""
    code = _code_4bit_cpu(quant_type)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order


@lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    """Signed 8-bit dynamic-exponent code (Dettmers 2015), 256 sorted values in [-1, 1].

    For exponent e = 0..6 the slot holds ``2**e`` linear fraction values (midpoints of
    ``linspace(0.1, 1, 2**e + 1)``) scaled by ``10**(e - 6)``, each with both signs;
    plus 0 and 1. The fractions and the scaling are computed in fp32, exactly as bitsandbytes builds its table.
    """
    values: list[float] = []
    for e in range(7):
        b = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return _dynamic_code_cpu().to(device)


@lru_cache(maxsize=None)
def _dq_lut_cpu() -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer table: slot i stands for -1 + 2i/65535, and holds
    the index of the nearest dynamic-code value (first code whose upper midpoint >= it)."""
    code = _dynamic_code_cpu()
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    vals = -1.0 + (2.0 * i) / 65535.0
    return torch.bucketize(vals, mids).to(torch.uint8)


def check_blocksize(blocksize: int, allowed: tuple[int, ...] = BLOCKSIZES) -> None:
    if not isinstance(blocksize, int) or blocksize not in allowed:
        raise ValueError(f"block size must be a power of two in {allowed[0]}..{allowed[-1]}, got {blocksize!r}")


# ---------------------------------------------------------------------------------------------
# Quantization state


@dataclass
class QuantState:
    """Everything needed to dequantize one packed 4-bit tensor.

    ``absmax`` is fp32 ``[blocks]`` without DQ, or uint8 ``[blocks]`` with DQ, in which case
    ``nested_absmax`` (fp32 ``[ceil(blocks / 256)]``), ``nested_code`` (fp32 ``[256]``) and
    ``offset`` (python float) are set. ``dtype`` is the dtype of the original weight and of
    the dequantized result.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = DQ_BLOCKSIZE
    offset: float | None = None
    _absmax_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales (undoing DQ when it is on)."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize) + self.offset

    def to(self, device: torch.device | str) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, code=move(self.code), absmax=move(self.absmax), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code), _absmax_cache=None)

    def nbytes(self) -> int:
        ts = [self.code, self.absmax, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # -- bitsandbytes state-dict keys --------------------------------------------------------

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors transformers+bitsandbytes stores beside ``prefix`` (the packed weight's key).

        Keys: ``{prefix}.absmax``, ``.quant_map``, with DQ ``.nested_absmax`` and
        ``.nested_quant_map``, and ``.quant_state.bitsandbytes__{quant_type}``: a uint8 tensor
        holding UTF-8 JSON of the non-tensor fields, in bitsandbytes' key order.
        """
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes checkpoints hold nf4 or fp4 weights, not {self.quant_type}")
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset)
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "QuantState":
        """Inverse of :meth:`to_state_dict`; ``tensors`` may hold other keys too."""
        blob_keys = [k for k in tensors if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(blob_keys) != 1:
            raise ValueError(f"{prefix}: expected one quant_state.bitsandbytes__* entry, found {len(blob_keys)}")
        try:
            meta = json.loads(bytes(tensors[blob_keys[0]].cpu().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{prefix}: unreadable quant_state ({e})") from None
        quant_type = meta.get("quant_type", blob_keys[0].rsplit("__", 1)[1])
        for k in ("absmax", "quant_map"):
            if f"{prefix}.{k}" not in tensors:
                raise ValueError(f"{prefix}: missing {prefix}.{k}")
        nested = f"{prefix}.nested_absmax" in tensors
        return cls(
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            quant_type=quant_type,
            code=tensors[f"{prefix}.quant_map"].float(),
            absmax=tensors[f"{prefix}.absmax"],
            nested_absmax=tensors[f"{prefix}.nested_absmax"].float() if nested else None,
            nested_code=tensors[f"{prefix}.nested_quant_map"].float() if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", DQ_BLOCKSIZE)),
            offset=float(meta["nested_offset"]) if nested else None,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise (used for Double Quantization)

_CHUNK = 1 << 22  # elements per chunk, a multiple of every block size: bounds temporary memory


def quantize_blockwise(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-code blockwise quantization, as bitsandbytes' CPU kernel rounds it.

    Returns ``(q uint8 of x's shape, absmax fp32 [ceil(n / blocksize)])``. A block whose
    absmax is 0 encodes as index 0 (bitsandbytes' convention).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    pad = nblocks * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax
    scaled = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    # index = trunc((v + 1) * 0.5 * 65535 + 0.5); the C compiler fuses the last multiply-add,
    # so round once from (near) exact fp64 arithmetic.
    half = ((scaled + 1.0) * 0.5).double()
    idx = (half * 65535.0 + 0.5).float().to(torch.int32).clamp_(0, 65535)
    q = _dq_lut_cpu().to(x.device)[idx]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 ``code[q] * absmax[block]``, flattened."""
    n = q.numel()
    nblocks = absmax.numel()
    vals = code.to(q.device)[q.reshape(-1).long()]
    vals = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    return (vals * absmax.float()[:, None]).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# 4-bit


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState]:
    """Quantize any float tensor to packed 4-bit codes; see the module docstring for the format."""
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"can only quantize float32/float16/bfloat16 tensors, got {w.dtype}")
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    mids, order = (t.to(w.device) for t in _bounds_4bit_cpu(quant_type))
    code = code_4bit(quant_type, w.device)
    flat = w.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax_parts = []
    # Process whole blocks in chunks (an even number of elements each) so that temporaries stay small.
    for start in range(0, full, _CHUNK):
        stop = min(start + _CHUNK, full)
        a = flat[start:stop].float().view(-1, blocksize)
        am = a.abs().amax(dim=1)
        scaled = (a * (1.0 / am.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0).reshape(-1)
        packed[start // 2: stop // 2] = _pack(_codes(scaled, mids, order))
        absmax_parts.append(am)
    if full < n:  # short last block; bitsandbytes divides here instead of multiplying
        a = flat[full:].float()
        am = a.abs().amax().clamp(min=1e-38)
        scaled = (a / am).clamp_(-1.0, 1.0)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        packed[full // 2:] = _pack(_codes(scaled, mids, order))
        absmax_parts.append(am.reshape(1))
    absmax = torch.cat(absmax_parts)
    state = QuantState(shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code, absmax=absmax)
    if double_quant:
        offset = absmax.mean()
        q8, absmax2 = quantize_blockwise(absmax - offset, DQ_BLOCKSIZE)
        state = replace(state, absmax=q8, nested_absmax=absmax2, nested_code=dynamic_code(w.device),
                        offset=offset.item())
    return packed.view(-1, 1), state


def _codes(scaled: torch.Tensor, mids: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return order[torch.bucketize(scaled, mids)].to(torch.uint8)


def _pack(q: torch.Tensor) -> torch.Tensor:
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 codes 0..15 of the first ``n`` elements of a packed tensor."""
    p = packed.reshape(-1)
    return torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)[:n]


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: ``code[q] * absmax[block]`` in fp32, cast to ``dtype`` (default: the
    original dtype), shaped like the original."""
    n = state.numel
    absmax = state.absmax_fp32().to(packed.device)
    # One lookup per byte gives both of its values (high nibble first).
    pairs = _pair_table(state.code.to(packed.device))[packed.reshape(-1).long()]
    vals = pairs.reshape(-1)
    nblocks = absmax.numel()
    size = nblocks * state.blocksize
    if vals.numel() != size:
        vals = torch.nn.functional.pad(vals[:n], (0, size - n))
    out = (vals.view(nblocks, state.blocksize) * absmax[:, None]).reshape(-1)
    if out.numel() != n:
        out = out[:n]
    return out.to(dtype or state.dtype).reshape(state.shape)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: byte b -> (code[b >> 4], code[b & 15])."""
    b = torch.arange(256, device=code.device)
    return torch.stack((code[b >> 4], code[b & 15]), dim=1)


def quant_error(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True) -> float:
    """mean |w - dequant(quant(w))| / mean |w| (the figure QLoRA's paper uses for code quality)."""
    packed, st = quantize_4bit(w, blocksize, quant_type, double_quant)
    wf = w.float()
    return ((wf - dequantize_4bit(packed, st, torch.float32)).abs().mean() / wf.abs().mean()).item()


def bits_per_param(state: QuantState) -> float:
    """Storage of codes + scales (+ DQ constants) per weight element."""
    n = state.numel
    return ((n + 1) // 2 * 8 + state.nbytes() * 8) / n
