"""AdamW with 32-bit or 8-bit blockwise states, optionally paged to (pinned) host memory.

Update (decoupled weight decay, bias correction as ``torch.optim.AdamW``), per element, step t:

    p <- p * (1 - lr * wd)
    m <- b1 * m + (1 - b1) * g            v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

* **32-bit** (``adamw``): ``exp_avg`` / ``exp_avg_sq`` are fp32 tensors shaped like the parameter
  (8 bytes per parameter). For fp32 parameters on a GPU the arithmetic is op for op that of
  ``torch.optim.AdamW``'s multi-tensor (foreach) path, its default there; on the CPU it is torch's
  fused kernel (``torch.optim.AdamW(fused=True)``, which differs from torch's single-tensor CPU
  default in the last bit). Results are bit-identical to that torch path and the state dict uses
  its keys; other parameter dtypes are updated in fp32 and cast back.
* **8-bit** (``adamw8bit``): each moment is stored as uint8 codes, flat ``[numel]``, plus
  one fp32 ``absmax`` per block of 256 elements (``ceil(n / 256)``), ~2.03 bytes per parameter.
  ``m`` uses the signed dynamic code, ``v`` the unsigned one (bitsandbytes' ``create_dynamic_map
  (signed=True/False)``); a value is ``code[q] * absmax[block]``. Each step dequantizes, runs the
  fp32 update with bitsandbytes' 8-bit formula (``m.mul_(b1).add_(g, alpha=1 - b1)``), and
  re-quantizes with bitsandbytes' CPU rounding (see :func:`quantize_8bit`), so on the CPU it is
  bit-identical to ``bitsandbytes.optim.AdamW8bit``. Parameters with fewer than
  ``min_8bit_size`` (4096) elements keep 32-bit state, as bitsandbytes does.
* **Paged** (``paged_*``): each parameter's state tensors form a *page*. A :class:`Pager` keeps at
  most a byte budget of pages on the parameter's device; pages over budget are copied to pinned
  host memory (on a copy stream) and their device memory is freed; a page comes back right
  before its parameter's update, prefetched on a second copy stream while the previous chunk
  updates. Pages evicted together share one host :class:`Block` and move as one copy each way.
  No CUDA managed memory is used. See ``docs/optim.md``.

Parameters are updated in chunks (consecutive tensors of one group, device, dtype and state kind,
up to CHUNK_ELEMS elements) with ``torch._foreach_*`` ops, so a step costs a few dozen kernel
launches per chunk instead of per tensor.

State dict: ``torch.optim`` layout. Per parameter ``step`` (fp32 0-dim CPU tensor) and either
``exp_avg`` / ``exp_avg_sq`` (fp32) or ``exp_avg_q8`` / ``exp_avg_absmax`` / ``exp_avg_sq_q8`` /
``exp_avg_sq_absmax`` (uint8 / fp32), wherever they currently live (device or pinned host).

Longer than 500 lines: the 8-bit state code, the pager and the AdamW step are one mechanism (the step
quantizes and pages its own states); each section is short and a reader of the step needs the other two.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import chain

import torch

from . import nf4
from .compat import fused_adamw_, has_fused_adamw
from .config import is_int, is_number
from .errors import QLoraError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
CHUNK_ELEMS = 1 << 22  # parameters updated together at most (bounds the 8-bit path's temporaries)
PAGED_CHUNK_BYTES = 32 << 20  # state paged in together at least (when a quarter budget is smaller); 8B LoRA
                              # set, budget 0, H200, one call: 8 MiB chunks 25-29 ms per step, 32 MiB 14-23
KEYS_32 = ("exp_avg", "exp_avg_sq")
KEYS_8 = ("exp_avg_q8", "exp_avg_absmax", "exp_avg_sq_q8", "exp_avg_sq_absmax")
_CHUNK = CHUNK_ELEMS  # elements quantized at a time (a multiple of BLOCKSIZE): bounds temporaries

# ---------------------------------------------------------------------------------------------
# 8-bit dynamic codes and blockwise quantization


@lru_cache(maxsize=None)
def _unsigned_code_cpu() -> torch.Tensor:
    """Unsigned 8-bit dynamic code: 256 sorted values in [0, 1]. Without a sign bit each exponent
    e = 0..6 gets twice the fraction values of the signed code: midpoints of
    ``linspace(0.1, 1, 2**(e + 1) + 1)`` (fp32) times ``10**(e - 6)``; plus 0 and 1."""
    values: list[float] = []
    for e in range(7):
        b = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)
        values += ((10 ** (e - 6)) * ((b[:-1] + b[1:]) / 2.0)).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def state_code(signed: bool, device: str = "cpu") -> torch.Tensor:
    """fp32 [256] code of the first (signed) or second (unsigned) moment, cached per device."""
    code = nf4.dynamic_code() if signed else _unsigned_code_cpu()
    return code.to(device)


@lru_cache(maxsize=None)
def _lut(signed: bool, device: str = "cpu") -> torch.Tensor:
    """uint8 [65536]: slot i stands for ``-1 + 2i/65535`` and holds the index of the nearest code
    value (ties to the lower one) -- the table bitsandbytes' CPU quantizer rounds through."""
    code = state_code(signed)
    mids = 0.5 * (code[:-1] + code[1:])
    slots = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.bucketize(slots, mids).to(torch.uint8).to(device)


def quantize_8bit(x: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of ``x`` with the signed or unsigned dynamic code.

    Returns ``(q, absmax)``: uint8 codes shaped like ``x`` and fp32 ``[ceil(n / blocksize)]``.
    ``absmax[b] = max |x|`` over block b; an element becomes ``s = x * (1 / absmax)`` (fp32), then
    ``q = LUT[trunc(fma((s + 1) * 0.5, 65535, 0.5))]`` clamped to the table (see :func:`_lut`),
    which is bitsandbytes' CPU kernel rounding: the nearest code value to within 1/65535.
    An all-zero block encodes as index 0. Generalizes ``nf4.quantize_blockwise`` to both codes.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    lut = _lut(signed, str(flat.device))
    chunk = _CHUNK - _CHUNK % blocksize
    if n <= chunk:
        q, absmax = _quantize_part(flat, lut, blocksize)
        return q.view(x.shape), absmax
    q = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    for start in range(0, n, chunk):
        qq, am = _quantize_part(flat[start:start + chunk], lut, blocksize)
        q[start:start + qq.numel()] = qq
        absmax[start // blocksize: start // blocksize + am.numel()] = am
    return q.view(x.shape), absmax


def _quantize_part(part: torch.Tensor, lut: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = part.numel()
    nb = -(-m // blocksize)
    if m % blocksize:
        part = torch.nn.functional.pad(part, (0, nb * blocksize - m))
    blocks = part.view(nb, blocksize)
    am = torch.linalg.vector_norm(blocks, ord=float("inf"), dim=1)  # max |x|
    t = (blocks * (1.0 / am)[:, None]).add_(1.0)
    # fma(t * 0.5, 65535, 0.5) == t * 32767.5 + 0.5 rounded once to fp32: exact in fp64, then rounded.
    # Scaled values just past +-1 land on the end slots after the clamp, as if clamped before.
    idx = torch.add(0.5, t.double(), alpha=32767.5).float().to(torch.int32).clamp_(0, 65535)
    q = torch.where(am[:, None] == 0, 0, lut[idx])  # zero block -> index 0; no host sync
    return q.view(-1)[:m], am


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, signed: bool, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """fp32 ``code[q] * absmax[block]``, shaped like ``q``."""
    code = state_code(signed, str(q.device))
    if q.numel() % blocksize:
        return nf4.dequantize_blockwise(q, absmax, code, blocksize).view(q.shape)
    return (code[q.reshape(-1).int()].view(-1, blocksize) * absmax[:, None]).view(q.shape)


# ---------------------------------------------------------------------------------------------
# Paging


class Page:
    """The state tensors of one parameter (``state`` is the optimizer's dict for it)."""

    def __init__(self, state: dict, keys: tuple[str, ...], device: torch.device, resident: bool):
        self.state, self.keys, self.device, self.resident = state, keys, device, resident
        self.nbytes = sum(state[k].numel() * state[k].element_size() for k in keys)
        self.host: dict[str, torch.Tensor] = {} if self.resident else {k: state[k] for k in keys}
        self.ready = None  # CUDA event: host->device copy finished
        self.written = None  # CUDA event: device->host copy (of the last eviction) finished
        self.block: Block | None = None  # the host block holding ``host`` (None: separate host tensors)
        self.on_block = False  # resident as views of ``block.device`` (moved in with the whole block)


ALIGN = 256  # bytes: where each state tensor starts inside a block


class Block:
    """The host copies of several pages' state in one flat (pinned) buffer: pages evicted together keep one
    layout, so the whole set moves in and out as one copy each way, into and out of one flat device buffer
    whose views become the state tensors (per-tensor copies cost ~40 us of host time each: the 896 state
    tensors of the 8B shape's LoRA factors made the paged step 33 ms, where the bytes alone take 7)."""

    def __init__(self, pages: list[Page], pin: bool):
        self.pages = pages
        # (page, key, dtype, shape, contiguous strides, offset in elements of dtype)
        self.entries: list[tuple[Page, str, torch.dtype, tuple, tuple, int]] = []
        off = 0
        for pg in pages:
            for k in pg.keys:
                t = pg.state[k]
                strides, n = [], 1
                for d in reversed(t.shape):
                    strides.insert(0, n)
                    n *= d
                self.entries.append((pg, k, t.dtype, tuple(t.shape), tuple(strides), off // t.element_size()))
                off += -(-(t.numel() * t.element_size()) // ALIGN) * ALIGN
        self.nbytes = off
        self.host = torch.empty(off, dtype=torch.uint8, pin_memory=pin)
        self.device: torch.Tensor | None = None  # the flat device buffer while the block is resident
        for pg in pages:
            pg.block, pg.host = self, {}
        self._views(self.host, "host")

    def _views(self, flat: torch.Tensor, where: str) -> None:
        """Point each page's ``host`` dict (``where`` "host") or state (``"state"``) at views of ``flat``."""
        typed = {dt: flat.view(dt) for dt in {e[2] for e in self.entries}}  # one op per entry below
        for pg, k, dt, shape, stride, off in self.entries:
            (pg.host if where == "host" else pg.state)[k] = typed[dt].as_strided(shape, stride, off)

    def move_in(self, device: torch.device) -> torch.Tensor:
        """A fresh device buffer for the block (its state views set); the caller copies ``host`` into it."""
        self.device = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self._views(self.device, "state")
        for pg in self.pages:
            pg.on_block = True
        return self.device

    def whole(self, pages: list[Page], resident: bool) -> bool:
        """``pages`` holds every page of this block, all resident on the block's device buffer (``resident``)
        or all out."""
        return len(pages) == len(self.pages) and all(
            (pg.on_block and self.device is not None) if resident else not pg.resident for pg in pages)


def _events(pages: list[Page], attr: str) -> list:
    """The distinct CUDA events (``ready`` or ``written``) of ``pages``."""
    return list({id(ev): ev for ev in (getattr(pg, attr) for pg in pages) if ev is not None}.values())


def _copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], stream, record_source: bool = False) -> None:
    """``dst.copy_(src)`` for each pair: queued on ``stream`` (CUDA; ``record_source``: the source's memory is
    reused only after its copy), or at once when ``stream`` is None (a CPU "device")."""
    if stream is None:
        for dst, src in pairs:
            dst.copy_(src)
        return
    with torch.cuda.stream(stream):
        for dst, src in pairs:
            dst.copy_(src, non_blocking=True)
            if record_source:
                src.record_stream(stream)


class Pager:
    """Keeps at most ``budget_bytes`` of optimizer state per device resident; the rest waits in
    host memory (pinned for CUDA parameters).

    ``budget_bytes=None``: on CUDA, decided at each step from free memory
    (``free + reserved - allocated - reserve_fraction * total``, plus what state already holds);
    on the CPU, unlimited. On a CPU "device" with an explicit budget the same logic runs with
    synchronous copies between separate CPU tensors, which is how the tests exercise it.

    Which pages leave: parameters are updated in the same order every step, so the page needed
    furthest in the future is the one updated most recently; evicting it first keeps a stable set
    resident and moves only the excess, once out and once in per step.
    """

    def __init__(self, budget_bytes: int | None = None, reserve_fraction: float = 0.1):
        self.budget_bytes, self.reserve_fraction = budget_bytes, reserve_fraction
        self.pages: dict[torch.Tensor, Page] = {}
        self.resident_bytes: Counter = Counter()
        self.stats: Counter = Counter()  # fetches, evictions, bytes_in, bytes_out
        self._streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
        self._begin([])

    def _begin(self, order: list) -> None:
        self._order = [self.pages.get(p) for p in order]
        self._budget: dict[torch.device, int | None] = {}
        self._updated: dict[torch.device, list[Page]] = defaultdict(list)
        used = {id(pg) for pg in self._order if pg is not None}
        self._idle = [pg for pg in self.pages.values() if id(pg) not in used]
        self._tail = len(order) - 1
        self._next: set[int] = set()  # ids of the pages being prefetched

    def begin_step(self, order: list[torch.Tensor]) -> None:
        """Start a step that updates the parameters ``order`` in that order."""
        self._begin(order)

    def register(self, p: torch.Tensor, state: dict, keys: tuple[str, ...], resident: bool = True,
                 position: int | None = None) -> None:
        """Track ``state[keys]``: on ``p``'s device if ``resident``, else already host buffers."""
        page = self.pages[p] = Page(state, keys, p.device, resident)
        if page.resident:
            self.resident_bytes[page.device] += page.nbytes
        if position is not None:
            self._order[position] = page

    def clear(self) -> None:
        self.synchronize()
        self.pages.clear()
        self.resident_bytes.clear()
        self._begin([])

    def _stream(self, device: torch.device, direction: str) -> torch.cuda.Stream:
        """The copy stream of one direction ("in": host to device, "out"): two streams, so that the copy
        engines move the next pages in while the last updated ones go out (one stream ran them in turn)."""
        if (device, direction) not in self._streams:
            self._streams[(device, direction)] = torch.cuda.Stream(device)
        return self._streams[(device, direction)]

    def fetch(self, params: list[torch.Tensor], wait: bool = True) -> None:
        """Bring the pages of ``params`` (one device) in, asynchronously on CUDA; ``wait``: order
        the current stream after their copies."""
        pages = [self.pages[p] for p in params if p in self.pages]
        absent = [pg for pg in pages if not pg.resident]
        if absent:
            dev = absent[0].device
            cuda = dev.type == "cuda"
            blocks, single = self._whole_blocks(absent, resident=False)
            fresh = [{k: torch.empty_like(h, device=dev) for k, h in pg.host.items()} for pg in single]
            copies = [(b.move_in(dev), b.host) for b in blocks]  # (device, host); allocated on the current stream
            copies += [(t, pg.host[k]) for pg, new in zip(single, fresh) for k, t in new.items()]
            ready = side = None
            if cuda:
                side = self._stream(dev, "in")
                side.wait_stream(torch.cuda.current_stream(dev))  # fresh memory's previous users are done
                for ev in _events(absent, "written"):
                    side.wait_event(ev)  # the evictions that wrote these host copies (on the other stream)
            _copy(copies, side)
            if cuda:
                ready = torch.cuda.Event()
                ready.record(side)
            for pg, new in zip(single, fresh):
                pg.state.update(new)
                pg.on_block = False
            for pg in absent:
                pg.resident, pg.ready = True, ready
            moved = sum(pg.nbytes for pg in absent)
            self.resident_bytes[dev] += moved
            self.stats.update(fetches=len(absent), bytes_in=moved, copies_in=len(copies))
        if wait:
            for ev in _events(pages, "ready"):
                torch.cuda.current_stream(pages[0].device).wait_event(ev)
            for pg in pages:
                pg.ready = None

    @staticmethod
    def _whole_blocks(pages: list[Page], resident: bool) -> tuple[list[Block], list[Page]]:
        """Split ``pages`` into the blocks they fill entirely (one copy each) and the other pages."""
        groups: dict[int, list[Page]] = defaultdict(list)
        for pg in pages:
            groups[id(pg.block)].append(pg)
        blocks, single = [], []
        for group in groups.values():
            b = group[0].block
            if b is not None and b.whole(group, resident):
                blocks.append(b)
            else:
                single.extend(group)
        return blocks, single

    def prefetch(self, params: list[torch.Tensor]) -> None:
        """Start bringing the pages of the next parameters in; they are not evicted meanwhile."""
        self.fetch(params, wait=False)
        self._next = {id(self.pages[p]) for p in params if p in self.pages}

    def _evict(self, pages: list[Page]) -> None:
        """Copy resident pages (one device) to host memory and drop their device tensors. Pages that fill
        a block whose device buffer holds them go out as one copy; pages without a block of their own get
        a new one (so they come back, and go out again, as one copy); the rest copy tensor by tensor."""
        if not pages:
            return
        dev = pages[0].device
        cuda = dev.type == "cuda"
        blocks, single = self._whole_blocks(pages, resident=True)
        copies = [(b.host, b.device) for b in blocks]  # (host, device) in the order issued
        loose = [pg for pg in single if pg.block is None]
        if loose:  # a block of their own from now on; their state is still in separate device tensors
            Block(loose, pin=cuda)
            self.stats.update(blocks=1)
        copies += [(pg.host[k], pg.state[k]) for pg in single for k in pg.keys]
        side = None
        if cuda:
            side = self._stream(dev, "out")
            side.wait_stream(torch.cuda.current_stream(dev))  # the updates have been issued before
            for ev in _events(pages, "ready"):
                side.wait_event(ev)  # a page fetched but never waited for: its copy in comes first
        _copy(copies, side, record_source=True)
        if cuda:
            written = torch.cuda.Event()
            written.record(side)
            for pg in pages:
                pg.written, pg.ready = written, None
        for b in blocks:
            b.device = None
        for pg in pages:
            pg.state.update(pg.host)
            pg.resident, pg.on_block = False, False
        moved = sum(pg.nbytes for pg in pages)
        self.resident_bytes[dev] -= moved
        self.stats.update(evictions=len(pages), bytes_out=moved, copies_out=len(copies))

    def budget(self, device: torch.device) -> int | None:
        if device not in self._budget:
            b = self.budget_bytes
            if b is None and device.type == "cuda":
                free, total = torch.cuda.mem_get_info(device)
                cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                b = self.resident_bytes[device] + free + cached - int(self.reserve_fraction * total)
            self._budget[device] = b
        return self._budget[device]

    def release(self, params: list[torch.Tensor], position: int) -> None:
        """After the update of ``params`` (one device; ``position``: the last one updated so far in
        this step's order): evict pages until the device is within budget."""
        if not params:
            return
        dev = params[0].device
        self._updated[dev].extend(self.pages[p] for p in params)
        budget = self.budget(dev)
        victims, resident = [], self.resident_bytes[dev]
        while budget is not None and resident > budget:
            victim = self._victim(dev, position)
            if victim is None:
                break
            victim.resident = False  # leaving: not a candidate again; _evict does the rest
            victims.append(victim)
            resident -= victim.nbytes
        self._evict(victims)

    def _victim(self, dev: torch.device, position: int) -> Page | None:
        # 1. pages not updated this step; 2. pages updated this step, latest first;
        # 3. pages still to come, last first (never the one being prefetched).
        for pool in (self._idle, self._updated[dev]):
            while pool:
                pg = pool.pop()
                if pg.resident and pg.device == dev:
                    return pg
        while self._tail > position:
            pg = self._order[self._tail]
            self._tail -= 1
            if pg is not None and pg.resident and pg.device == dev and id(pg) not in self._next:
                return pg
        return None

    def evict_all(self) -> None:
        by_device = defaultdict(list)
        for page in self.pages.values():
            if page.resident:
                by_device[page.device].append(page)
        for pages in by_device.values():
            self._evict(pages)

    def synchronize(self) -> None:
        """Wait for copies in flight, so that host copies are complete and readable."""
        for s in self._streams.values():
            s.synchronize()


# ---------------------------------------------------------------------------------------------
# Optimizer


class AdamW(torch.optim.Optimizer):
    """AdamW with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state, paged to
    host memory when ``paged`` (budget: ``page_budget_bytes``, see :class:`Pager`)."""

    def __init__(self, params, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, optim_bits: int = 32, paged: bool = False,
                 page_budget_bytes: int | None = None, min_8bit_size: int = MIN_8BIT_SIZE):
        check_hparams(lr, betas, eps, weight_decay, page_budget_bytes)
        if optim_bits not in (8, 32):
            raise QLoraError(f"optimizer state must be 8 or 32 bits, got {optim_bits!r}")
        super().__init__(params, dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                                      eps=float(eps), weight_decay=float(weight_decay)))
        self.optim_bits, self.min_8bit_size = optim_bits, int(min_8bit_size)
        self.pager = Pager(page_budget_bytes) if paged else None

    def state_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        """Names of ``p``'s state tensors besides ``step``."""
        return KEYS_8 if self.optim_bits == 8 and p.numel() >= self.min_8bit_size else KEYS_32

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if self.state_keys(p) is KEYS_8:
            nblocks = -(-p.numel() // BLOCKSIZE)
            for name in KEYS_32:
                state[f"{name}_q8"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                state[f"{name}_absmax"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
        else:
            for name in KEYS_32:
                state[name] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        for _, p in work:
            if p.grad.is_sparse or p.is_complex() or not p.is_floating_point():
                raise QLoraError(f"AdamW here needs real floating-point parameters with dense gradients "
                                 f"(got {p.dtype}{', sparse gradient' if p.grad.is_sparse else ''})")
        pager = self.pager
        if pager is not None:
            pager.begin_step([p for _, p in work])
        chunks = self._chunks(work)
        for c, chunk in enumerate(chunks):
            for pos, p in chunk:
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                    if pager is not None:
                        pager.register(p, state, self.state_keys(p), resident=True, position=pos)
            if pager is not None:
                pager.fetch([p for _, p in chunk])
            if pager is not None and c + 1 < len(chunks):
                pager.prefetch([p for _, p in chunks[c + 1]])
            group = work[chunk[0][0]][0]
            params = [p for _, p in chunk]
            states = [self.state[p] for p in params]
            if "exp_avg_q8" in states[0]:
                self._update_8bit(group, params, states)
            else:
                self._update_32bit(group, params, states)
            if pager is not None:
                pager.release(params, chunk[-1][0])
        return loss

    def _chunks(self, work: list) -> list[list[tuple[int, torch.Tensor]]]:
        """Split this step's (position, parameter) list into runs updated together: same group,
        device, dtype and state kind, at most CHUNK_ELEMS elements and, when paged with a budget,
        at most max(budget / 4, PAGED_CHUNK_BYTES) of state (at least one parameter each)."""
        budget = self.pager.budget_bytes if self.pager is not None else None
        chunks: list = []
        key, elems, nbytes = None, 0, 0
        for pos, (group, p) in enumerate(work):
            eight = self.state_keys(p) is KEYS_8
            k = (id(group), p.device, p.dtype, eight)
            b = p.numel() * (2 if eight else 8)
            if (not chunks or k != key or elems + p.numel() > CHUNK_ELEMS
                    or (budget is not None and nbytes + b > max(budget // 4, PAGED_CHUNK_BYTES))):
                chunks.append([])
                elems, nbytes = 0, 0
            chunks[-1].append((pos, p))
            key, elems, nbytes = k, elems + p.numel(), nbytes + b
        return chunks

    @staticmethod
    def _update_32bit(group: dict, params: list, states: list) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        fp32 = params[0].dtype == torch.float32
        ps = params if fp32 else [p.float() for p in params]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if params[0].device.type == "cpu" and has_fused_adamw():
            # torch's fused CPU kernel (= torch.optim.AdamW(fused=True)): one vectorized pass per
            # tensor instead of ~10 foreach ops, which the CPU runs tensor by tensor (4.6 vs 19.8 ms
            # a step for the demo's 420 LoRA factors)
            steps = [s["step"] for s in states]
            torch._foreach_add_(steps, 1.0)
            fused_adamw_(ps, grads, ms, vs, steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps)
        else:  # op for op torch.optim.adam._multi_tensor_adam (decoupled weight decay, no amsgrad)
            steps = _advance([s["step"] for s in states])
            if wd != 0:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
            step_size = [(lr / (1 - b1 ** t)) * -1 for t in steps]
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [(1 - b2 ** t) ** 0.5 for t in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, step_size)
        if not fp32:
            torch._foreach_copy_(params, ps)

    @staticmethod
    def _update_8bit(group: dict, params: list, states: list) -> None:
        # bitsandbytes' 8-bit blockwise Adam: dequantize, fp32 update, re-quantize. The chunk's
        # states are concatenated with each tensor padded to whole blocks (zeros do not change a
        # block's absmax), so one (de)quantization serves all and the blocks are the per-tensor ones.
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        sizes = [p.numel() for p in params]
        spans = [-(-n // BLOCKSIZE) * BLOCKSIZE for n in sizes]
        padded = [i for i, (n, span) in enumerate(zip(sizes, spans)) if span > n]
        flat, segs = {}, {}
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            qs = [s[f"{name}_q8"] for s in states]
            for i in padded:
                qs[i] = torch.nn.functional.pad(qs[i], (0, spans[i] - sizes[i]))
            x = dequantize_8bit(torch.cat(qs), torch.cat([s[f"{name}_absmax"] for s in states]), signed)
            parts = list(x.split(spans))
            for i in padded:
                parts[i][sizes[i]:].zero_()
                parts[i] = parts[i][:sizes[i]]
            flat[name], segs[name] = x, parts
        ms = [t.view(p.shape) for t, p in zip(segs["exp_avg"], params)]
        vs = [t.view(p.shape) for t, p in zip(segs["exp_avg_sq"], params)]
        fp32 = params[0].dtype == torch.float32
        ps = params if fp32 else [p.float() for p in params]
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        steps = _advance([s["step"] for s in states])
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        if wd > 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1.0 - b1 ** t) for t in steps])
        if not fp32:
            torch._foreach_copy_(params, ps)
        nblocks = [span // BLOCKSIZE for span in spans]
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            q, absmax = quantize_8bit(flat[name], signed)
            qparts = list(q.split(spans))
            for i in padded:
                qparts[i] = qparts[i][:sizes[i]]
            torch._foreach_copy_([s[f"{name}_q8"] for s in states], qparts)
            torch._foreach_copy_([s[f"{name}_absmax"] for s in states], list(absmax.split(nblocks)))

    def state_dict(self) -> dict:
        """``torch.optim`` layout; state tensors are live references (save or clone them before the
        next step), on the device or in (pinned) host memory, wherever their page is. A paged state
        tensor that lives inside a pager :class:`Block` is returned as a copy of its own (``torch.save``
        refuses views of one buffer as different dtypes; safetensors refuses shared buffers)."""
        if self.pager is None:
            return super().state_dict()
        self.pager.synchronize()
        sd = super().state_dict()
        sd["state"] = {pid: {k: t.clone() if torch.is_tensor(t) and t.untyped_storage().nbytes() != t.nbytes else t
                             for k, t in st.items()}  # new dicts: torch's are the live ones
                       for pid, st in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Exact inverse of :meth:`state_dict` (tensors are copied, never cast lossily). A paged
        optimizer puts loaded pages in host memory; they move in at their first update."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise QLoraError("not an optimizer state dict (needs 'state' and 'param_groups')")
        saved_groups = state_dict["param_groups"]
        have = [len(g["params"]) for g in self.param_groups]
        got = [len(g.get("params", ())) for g in saved_groups]
        if have != got:
            raise QLoraError(f"optimizer state was saved for parameter groups of sizes {got}, "
                             f"but this optimizer has {have}: resume with the same trainable parameters")
        params = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        state: defaultdict = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            if pid not in params:
                raise QLoraError(f"optimizer state has an entry for unknown parameter {pid!r}")
            p = params[pid]
            keys = self.state_keys(p)
            if set(saved) != {"step", *keys}:
                raise QLoraError(f"optimizer state for a parameter of shape {tuple(p.shape)} holds {sorted(saved)}, "
                                 f"this optimizer ({self.optim_bits}-bit) expects {sorted(('step',) + keys)}: "
                                 "resume with the optimizer the run was started with")
            st = state[p]
            st["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
            for k in keys:
                t = _checked_state_tensor(k, saved[k], p)
                if self.pager is not None:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=p.device.type == "cuda")
                    st[k] = host.copy_(t)
                else:
                    st[k] = t.to(device=p.device, copy=True)
        if self.pager is not None:  # only now that everything checked out
            self.pager.clear()
            for p, st in state.items():
                self.pager.register(p, st, self.state_keys(p), resident=False)
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        self.state = state

    def evict_all(self) -> None:
        """Move every page to host memory now (e.g. after catching ``torch.cuda.OutOfMemoryError``,
        before retrying the batch); each comes back at its parameter's next update. No-op unless paged."""
        if self.pager is not None:
            self.pager.evict_all()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of moment state on the parameters' devices and in host memory."""
        out = {"device": 0, "host": 0}
        for p, st in self.state.items():
            page = self.pager.pages.get(p) if self.pager is not None else None
            where = "device" if page is None or page.resident else "host"
            out[where] += sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
        return out


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit blockwise state (32-bit for tensors under ``min_8bit_size``)."""

    def __init__(self, params, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, paged: bool = False, page_budget_bytes: int | None = None,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paged=paged,
                         page_budget_bytes=page_budget_bytes, min_8bit_size=min_8bit_size)


def check_offload(name: str, offload: bool) -> None:
    """``--offload-optimizer`` keeps a paged optimizer's states in CPU memory: refuse it with any other."""
    if offload and not name.startswith("paged"):
        raise QLoraError(f"--offload-optimizer needs a paged optimizer (paged_adamw or paged_adamw8bit), not {name}")


def lora_plus_groups(names: list[str], params: list, lr: float, ratio: float) -> list:
    """LoRA+ (Hayou et al., 2024) parameter groups, as peft's ``create_loraplus_optimizer`` forms them: every
    ``lora_B`` and every 1-D parameter (DoRA's magnitude) at ``ratio * lr``, the rest (``lora_A``) at ``lr``.
    ``names`` name ``params`` one for one. Each group carries ``lr_ratio``: the schedule multiplies it in.
    ``ratio = 0``: one plain group (LoRA+ off). Empty groups are left out."""
    if not ratio:
        return list(params)
    params = list(params)
    if len(names) != len(params):
        raise QLoraError(f"LoRA+ groups: {len(names)} names for {len(params)} parameters")
    fast = [n.endswith("lora_B") or "lora_B." in n or p.dim() == 1 for n, p in zip(names, params)]
    groups = [{"params": [p for p, f in zip(params, fast) if not f], "lr": lr, "lr_ratio": 1.0},
              {"params": [p for p, f in zip(params, fast) if f], "lr": lr * ratio, "lr_ratio": float(ratio)}]
    return [g for g in groups if g["params"]]


def make_optimizer(params, name: str = "paged_adamw", lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, page_budget_bytes: int | None = None) -> torch.optim.Optimizer:
    """Build one of :data:`OPTIMIZERS` over ``params`` (tensors or param-group dicts)."""
    if name not in OPTIMIZERS:
        raise QLoraError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    paged = name.startswith("paged_")
    if page_budget_bytes is not None and not paged:
        raise QLoraError(f"page_budget_bytes applies to paged optimizers only, not {name}")
    params = list(params)
    if not params:
        raise QLoraError("no trainable parameters to optimize (did the LoRA target filter match no layer?)")
    cls = AdamW8bit if name.endswith("8bit") else AdamW
    return cls(params, lr, betas, eps, weight_decay, paged=paged, page_budget_bytes=page_budget_bytes)


def _advance(steps: list[torch.Tensor]) -> list[float]:
    """step += 1 for each (fp32 CPU scalars, as torch keeps them); returns the new values."""
    torch._foreach_add_(steps, 1.0)
    return torch.stack(steps).tolist()


def check_hparams(lr, betas, eps, weight_decay, page_budget_bytes) -> None:
    """Raise QLoraError for an AdamW setting out of range (``qlora train`` checks its flags with it before
    the model loads)."""
    def bad(what: str) -> QLoraError:
        return QLoraError(f"invalid optimizer setting: {what}")
    if not is_number(lr) or not lr >= 0:
        raise bad(f"learning rate must be a number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        raise bad(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not is_number(eps) or not eps >= 0:
        raise bad(f"eps must be >= 0, got {eps!r}")
    if not is_number(weight_decay) or not weight_decay >= 0:
        raise bad(f"weight decay must be >= 0, got {weight_decay!r}")
    if page_budget_bytes is not None and (not is_int(page_budget_bytes) or page_budget_bytes < 0):
        raise bad(f"page_budget_bytes must be an integer >= 0, got {page_budget_bytes!r}")


def _checked_state_tensor(key: str, t, p: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        raise QLoraError(f"optimizer state {key!r} is not a tensor")
    if key.endswith("_q8"):
        ok, want = t.dtype == torch.uint8 and t.shape == (p.numel(),), f"uint8 ({p.numel()},)"
    elif key.endswith("_absmax"):
        n = -(-p.numel() // BLOCKSIZE)
        ok, want = t.dtype == torch.float32 and t.shape == (n,), f"float32 ({n},)"
    else:
        ok, want = t.is_floating_point() and t.shape == p.shape, f"float {tuple(p.shape)}"
        t = t.float()
    if not ok:
        raise QLoraError(f"optimizer state {key!r} is {t.dtype} {tuple(t.shape)}, expected {want}")
    return t


# ---------------------------------------------------------------------------------------------
# Flat form for safetensors


def state_dict_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state dict for ``safetensors.torch.save_file``: tensors named
    ``state.{param index}.{key}`` (CPU, contiguous) and metadata ``{"param_groups": JSON}``."""
    tensors = {}
    for pid, st in state_dict["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"state.{pid}.{k}"] = t.detach().to("cpu").contiguous()
    try:
        groups = json.dumps(state_dict["param_groups"])
    except TypeError as e:
        raise QLoraError(f"optimizer settings cannot be saved as JSON ({e})") from None
    return tensors, {"format": "qlora.optim", "param_groups": groups}


def state_dict_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Inverse of :func:`state_dict_to_tensors`."""
    if not metadata or "param_groups" not in metadata:
        raise QLoraError("optimizer state file lacks its 'param_groups' metadata")
    state: defaultdict = defaultdict(dict)
    for name, t in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise QLoraError(f"unexpected tensor {name!r} in optimizer state file")
        state[int(parts[1])][parts[2]] = t
    return {"state": dict(state), "param_groups": json.loads(metadata["param_groups"])}
