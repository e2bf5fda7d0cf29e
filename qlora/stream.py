"""Weight streaming (``--offload-weights``): each decoder block's frozen base waits in pinned CPU memory and is
copied into one of a few GPU slots just before the block runs, the next block's copy overlapping this one's compute.

What moves: every base tensor of the block's :class:`~qlora.linear.QLoRALinear` layers (``BASE_TENSORS``: packed
4-bit codes, block scales, DQ constants and code tables, or a 16-bit weight; biases), routed experts included
(qlora.moe holds one QLoRALinear per expert). LoRA factors, DoRA magnitudes (and the base's row norms DoRA keeps,
computed while the block is resident), norms, routers, embeddings and lm_head stay where they are.

Layout: per block one flat uint8 host buffer holds all its base tensors, each at an offset aligned to
:data:`ALIGN` bytes (the kernels read aligned words), page-locked in place (:func:`qlora.compat.register_host_memory`:
the exact size, where ``pin_memory()`` rounds up to a power of two). A slot is one device buffer the size of the
largest block. A block is *resident* while a slot holds it: its layers' buffers are then dtype/shape views of the
slot's bytes. A block that no slot holds carries :class:`NotResident` placeholders, never device tensors: a meta
tensor with the shape and dtype, refusing any other use with a QLoraError.

When: a forward pre-hook on each streamed layer asks for its block (:meth:`WeightStreamer.request`; the first
layer of a block asks, the others find it current). Forward reaches the blocks in ascending order; with
checkpointing, backward recomputes them in descending order (the recompute calls the block's layers again), each
block's backward running right after its recompute, while the block is still resident. The direction is read
from the order of the requests; with the asked-for block resident, the next one in that direction is copied into
another slot on a side CUDA stream. Before writing a slot the copy stream waits for all the work the compute
stream has been given (the slot's last readers among it); the compute stream waits for a block's copy (a CUDA
event) before it uses the block. Any other order (a DPO reference pass after the policy's forward, two forwards
before one backward, validation) is served too: a block asked for but not resident is copied then, and the
compute stream waits for that copy.

Every block must be recomputed in backward: autograd saves what a block's layers use (views of a slot) for
backward; a checkpointed block saves them again in its recompute and runs its backward before its slot is reused,
while a block keeping its activations (``enable_checkpointing(keep=...)``) would read a slot that other weights
have overwritten since. Kept blocks are refused, and a block that runs with gradients without being checkpointed
(e.g. a training forward in eval mode) is a QLoraError at its first layer. Should a saved view outlive its block
anyway, the slot's in-place refill bumps its version counter and autograd refuses the stale tensor.

On a CPU there is nothing to gain; ``include_cpu=True`` runs the same path with CPU slots and plain copies (how
the tests check exactness without a GPU).
"""
from __future__ import annotations

import weakref
from collections import Counter

import torch
import torch.nn as nn

from .compat import checkpoint_function, register_host_memory, set_module_tensor, unregister_host_memory
from .config import is_int
from .errors import QLoraError
from .plan import STREAM_SLOTS

ALIGN = 256          # byte alignment of each tensor in a block's buffer (and so in a slot)
PAGE = 4096          # host buffers are page-aligned and page-sized: registrations never share a page
DEFAULT_SLOTS = STREAM_SLOTS  # double buffering: the block being computed and the next one being copied


def aligned(n: int) -> int:
    """``n`` bytes rounded up to :data:`ALIGN` (a tensor's room in a block buffer)."""
    return -(-int(n) // ALIGN) * ALIGN


# -------------------------------------------------------------------------------------------- placeholder

_METADATA = frozenset({"shape", "dtype", "is_meta", "ndim", "dim", "size", "numel", "nelement", "element_size",
                       "nbytes", "itemsize", "is_floating_point", "layout", "requires_grad", "__repr__",
                       "__format__"})


class NotResident(torch.Tensor):
    """Stands in for a base tensor of a block no slot holds: its shape and dtype (a meta tensor), and nothing else;
    reading its device or data, or any op on it, raises a QLoraError naming the block."""

    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, where: str):
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"))
        t.where = where
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):  # a property: its descriptor's name
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name in _METADATA:
            return super().__torch_function__(func, types, args, kwargs or {})
        where = next((a.where for a in args if isinstance(a, NotResident)), "a streamed block")
        raise QLoraError(f"{where}: its frozen weights are not on the device now (--offload-weights streams them "
                         f"from CPU memory into the device only while the block runs); nothing else can read them "
                         f"(WeightStreamer.remove() first)")


# -------------------------------------------------------------------------------------------- the streamer


class _Part:
    """One base tensor of a block: which layer buffer, where in the block's bytes, its dtype and shape."""
    __slots__ = ("layer", "name", "offset", "nbytes", "dtype", "shape", "placeholder")

    def __init__(self, layer, name, offset, nbytes, dtype, shape, where):
        self.layer, self.name, self.offset, self.nbytes = weakref.ref(layer), name, offset, nbytes
        self.dtype, self.shape = dtype, shape
        self.placeholder = NotResident(shape, dtype, where)

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)


class _Block:
    """A decoder block's base tensors in one host buffer; ``slot``: the slot holding it (None: not resident)."""

    def __init__(self, module: nn.Module, parts: list[_Part], host: torch.Tensor, nbytes: int):
        self.module, self.parts, self.host, self.nbytes = weakref.ref(module), parts, host, nbytes
        self.index: int | None = None  # the decoder block's index in the model
        self.pos: int | None = None  # its place among the streamed blocks
        self.slot: _Slot | None = None
        self.views: dict[int, list[torch.Tensor]] = {}  # slot number -> the parts' views of it


class _Slot:
    """One device buffer; ``block``: the place among the streamed blocks of the block it holds; ``ready``: the event
    of its last copy (CUDA)."""

    def __init__(self, number: int, data: torch.Tensor):
        self.number, self.data = number, data
        self.block: int | None = None
        self.ready = None
        self.used = 0


class _Ask:
    """A streamed layer's forward pre-hook: ask for its block."""
    __slots__ = ("streamer", "index")

    def __init__(self, streamer: "WeightStreamer", index: int):
        self.streamer, self.index = streamer, index

    def __call__(self, module, args):
        self.streamer.request(self.index)


def _aligned_empty(n: int, device: torch.device) -> torch.Tensor:
    """``n`` uninitialised bytes on ``device`` starting at a multiple of :data:`ALIGN` (CUDA's allocator already
    aligns to 512; the CPU's to 64)."""
    if device.type == "cuda":
        return torch.empty(n, dtype=torch.uint8, device=device)
    raw = torch.empty(n + ALIGN, dtype=torch.uint8, device=device)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + n]


def _unregister(ptrs: list[int]) -> None:
    while ptrs:
        unregister_host_memory(ptrs.pop())


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks holding QLoRA layers, in order: transformers' ``GradientCheckpointingLayer``\\ s
    (each decoder layer; a vision tower's layers hold none), else the checkpointed blocks."""
    from .linear import QLoRALinear
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the blocks that carry a checkpoint function
        from .offload import _checkpointed_blocks
        return _checkpointed_blocks(model)
    out, inside = [], None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(m, GradientCheckpointingLayer) and any(isinstance(x, QLoRALinear) for x in m.modules()):
            out.append(m)
            inside = name + "."
    return out


class WeightStreamer:
    """Streams the frozen base of each decoder block from (pinned) host memory into ``slots`` device buffers
    (module docstring). :meth:`take_block` moves one block's base to host memory (``qlora.model`` calls it as
    each block is built, so the whole quantized model is never on the device); :meth:`install` takes the rest,
    allocates the slots and hooks the layers; :meth:`remove` gives every layer its own device tensors back.

    ``stats``: ``requests`` (a block asked for while another was current), ``hits`` (it was resident), ``misses``
    (it was copied then: the compute stream waited for the whole copy), ``prefetched`` (copies started ahead),
    ``fetched`` (all copies into a slot) and ``bytes`` (their bytes). ``include_cpu``: stream a model on the CPU
    too, with CPU slots and plain copies (for tests). ``only``: the decoder blocks (indices) to stream, the others
    keep their weights on the device (None: all; :func:`qlora.plan.streamed_blocks` spreads a count of them)."""

    def __init__(self, slots: int = DEFAULT_SLOTS, include_cpu: bool = False, only=None):
        if not is_int(slots) or slots < 2:
            raise QLoraError(f"weight streaming needs at least 2 slots (one computing, one being filled), got {slots!r}")
        only = None if only is None else list(only)
        if only is not None and (not all(is_int(i) and i >= 0 for i in only) or not only):
            raise QLoraError(f"blocks to stream must be block indices (at least one), got {only!r}")
        self.n_slots, self.include_cpu = slots, include_cpu
        self.only = None if only is None else frozenset(int(i) for i in only)
        self.device: torch.device | None = None
        self.blocks: list[_Block] = []
        self.slots: list[_Slot] = []
        self.stats: Counter = Counter()
        self.current: int | None = None
        self.direction = 1
        self.pinned = None  # how the host buffers are page-locked: "registered", or "pin_memory copies" (on a GPU)
        self._taken: dict[int, _Block] = {}
        self._hooks: list = []
        self._clock = 0
        self._stream = None
        self._model = None
        self._registered: list[int] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        self._finalizer.atexit = False  # (at exit the process's memory goes anyway; CUDA may be torn down by then)

    # -- host side ----------------------------------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        """Bytes of the blocks' base tensors in host memory (with their alignment)."""
        return sum(b.nbytes for b in self._taken.values())

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot (the largest block); :attr:`n_slots` of them sit on the device once installed."""
        return max((b.nbytes for b in self._taken.values()), default=0)

    def _set_device(self, device: torch.device) -> None:
        if self.device is None:
            if device.type == "cpu" and not self.include_cpu:
                raise QLoraError("weight streaming copies the blocks into a GPU: this model is on the CPU, where it "
                                 "saves nothing (include_cpu=True streams between CPU buffers, for tests)")
            if device.type not in ("cpu", "cuda"):
                raise QLoraError(f"weight streaming runs on CUDA devices, not {device}")
            self.device = device
            self.pinned = "registered" if device.type == "cuda" else "no (CPU mode)"
        elif device != self.device:
            raise QLoraError(f"weight streaming: blocks on {device} and on {self.device}: one device only")

    def _host_buffer(self, n: int) -> torch.Tensor:
        """``n`` bytes of host memory: page-locked in place on a CUDA machine (exact size; a pinned copy, rounded
        up by PyTorch's allocator, where that fails), plain CPU memory in the CPU mode."""
        if self.device.type != "cuda":
            return torch.empty(n, dtype=torch.uint8)
        size = -(-n // PAGE) * PAGE
        raw = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        buf = raw[start:start + size]
        if register_host_memory(buf):
            self._registered.append(buf.data_ptr())
            return buf[:n]
        self.pinned = "pin_memory copies"
        return torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def streams(self, index: int) -> bool:
        """Whether decoder block ``index`` is (to be) streamed."""
        return self.only is None or index in self.only

    def take_block(self, module: nn.Module, index: int | None = None) -> None:
        """Move the base tensors of ``module``'s QLoRA layers into one host buffer and leave placeholders in their
        place (a module without any, e.g. a vision tower's layer, is left alone; a block already taken too, and
        decoder block ``index`` when it is not among those to stream)."""
        from .linear import QLoRALinear
        if id(module) in self._taken or (index is not None and not self.streams(index)):
            return
        layers = [m for m in module.modules() if isinstance(m, QLoRALinear)]
        tensors = [(m, n, getattr(m, n)) for m in layers for n in m.BASE_TENSORS if getattr(m, n) is not None]
        if not tensors:
            return
        for m in layers:
            if m._carriers:
                raise QLoraError("weight streaming does not run with FSDP2 (--parallel fsdp): its base tensors "
                                 "are sharded parameters")
            if m._wcache is not None:
                raise QLoraError("weight streaming cannot keep dequantized weights (--cache-dequant on, "
                                 "dequant_cache): leave them off")
        if any(isinstance(t, NotResident) for _, _, t in tensors):
            raise QLoraError("these layers' weights are already streamed by another WeightStreamer")
        self._set_device(tensors[0][2].device)
        for _, _, t in tensors:
            self._set_device(t.device)
        where = "a streamed block"  # (install names it by its index)
        parts, off = [], 0
        for m, name, t in tensors:
            n = t.numel() * t.element_size()
            parts.append(_Part(m, name, off, n, t.dtype, tuple(t.shape), where))
            off += aligned(n)
        host = self._host_buffer(off)
        for p, (_, _, t) in zip(parts, tensors):
            if p.nbytes:
                host[p.offset:p.offset + p.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        del tensors
        block = _Block(module, parts, host, off)
        self._taken[id(module)] = block
        self._unbind(block)

    # -- install / remove ---------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> "WeightStreamer":
        """Stream ``model``'s decoder blocks from now on: take those not taken yet, allocate the slots on the
        device, hook the layers. Refuses blocks that keep their activations (module docstring)."""
        from .offload import _no_recompute
        if self.blocks:
            raise QLoraError("this WeightStreamer is installed already")
        if streamer_of(model) is not None:
            raise QLoraError("this model's weights are streamed already")
        blocks = decoder_blocks(model)
        if not blocks:
            raise QLoraError(f"{type(model).__name__}: no decoder blocks with QLoRA layers to stream")
        if self.only is not None and max(self.only) >= len(blocks):
            raise QLoraError(f"blocks to stream {sorted(self.only)}: the model has {len(blocks)} decoder blocks")
        streamed = []
        for i, b in enumerate(blocks):
            if not self.streams(i):
                if id(b) in self._taken:
                    raise QLoraError(f"block {i} was taken to CPU memory but is not among the blocks to stream")
                continue
            if checkpoint_function(b) is _no_recompute:
                raise QLoraError(_KEPT.format(i=i))
            self.take_block(b)
            self._taken[id(b)].index = i
            streamed.append(b)
        self.blocks = [self._taken[id(b)] for b in streamed]
        for k, blk in enumerate(self.blocks):
            blk.pos = k  # its place among the streamed blocks (what the hooks ask by and a slot holds)
            for p in blk.parts:  # placeholders name their block by its index now
                p.placeholder.where = f"block {blk.index}"
        size = max(b.nbytes for b in self.blocks)
        self.slots = [_Slot(k, _aligned_empty(size, self.device)) for k in range(self.n_slots)]
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            for slot in self.slots:  # freed only once the copy stream's work on it is done too
                slot.data.record_stream(self._stream)
        for k, blk in enumerate(self.blocks):  # (a hook asks by the block's place among the streamed ones)
            ask = _Ask(self, k)
            seen = set()
            for p in blk.parts:
                layer = p.layer()
                if id(layer) not in seen:
                    seen.add(id(layer))
                    self._hooks.append(layer.register_forward_pre_hook(ask))
        model.qlora_streamer = self
        self._model = weakref.ref(model)
        return self

    def remove(self) -> None:
        """Stop streaming: every layer gets its base tensors back as its own device tensors (the whole model on
        the device, as before :meth:`take_block`), hooks and slots go, the host memory is released."""
        if self._stream is not None:
            self._stream.synchronize()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for blk in self._taken.values():
            for p in blk.parts:
                layer = p.layer()
                if layer is not None:
                    t = torch.empty(p.shape, dtype=p.dtype, device=self.device).copy_(p.view(blk.host))
                    set_module_tensor(layer, p.name, t)
                    layer._gemv = None
            blk.slot, blk.views = None, {}
        model = self._model() if self._model is not None else None
        if model is not None and getattr(model, "qlora_streamer", None) is self:
            del model.qlora_streamer
        self.slots, self.blocks, self.current, self._stream = [], [], None, None
        self._finalizer()  # page-locked host memory unregistered before it is freed
        self._taken.clear()

    # -- residency ----------------------------------------------------------------------------------------

    def _bind(self, blk: _Block, slot: _Slot) -> None:
        views = blk.views.get(slot.number)
        if views is None:
            views = blk.views[slot.number] = [p.view(slot.data) for p in blk.parts]
        for p, v in zip(blk.parts, views):
            layer = p.layer()
            set_module_tensor(layer, p.name, v)
            layer._gemv = None  # (a one-row GEMV plan points at the slot it was made for)
        blk.slot, slot.block = slot, blk.pos

    def _unbind(self, blk: _Block) -> None:
        for p in blk.parts:
            layer = p.layer()
            if layer is not None:
                set_module_tensor(layer, p.name, p.placeholder)
                layer._gemv = None
        if blk.slot is not None:
            blk.slot.block = None
        blk.slot = None

    def _fetch(self, blk: _Block, slot: _Slot) -> None:
        """Copy ``blk`` into ``slot`` (after the compute stream's work so far: the slot's last readers)."""
        if slot.block is not None:
            self._unbind(self.blocks[slot.block])
        dst = slot.data[:blk.nbytes]
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                dst.copy_(blk.host, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self._stream)
        else:
            dst.copy_(blk.host)
        self._bind(blk, slot)
        slot.used = self._clock
        self.stats.update(fetched=1, bytes=blk.nbytes)

    def _free_slot(self, avoid: set) -> _Slot:
        """A slot to fill: an empty one, else the least recently used one not holding a block of ``avoid``."""
        candidates = [s for s in self.slots if s.block is None or s.block not in avoid]
        empty = [s for s in candidates if s.block is None]
        return empty[0] if empty else min(candidates, key=lambda s: s.used)

    def _check_recomputed(self, blk: _Block) -> None:
        from .offload import _no_recompute
        m = blk.module()
        if m is None:
            return
        if not (getattr(m, "gradient_checkpointing", False) and m.training
                and checkpoint_function(m) not in (None, _no_recompute)):
            raise QLoraError(f"block {blk.index} runs with gradients but is not checkpointed: with its weights "
                             f"streamed (--offload-weights) a block must be recomputed in backward (gradient "
                             f"checkpointing on, no kept blocks, the model in train mode)")

    def request(self, i: int) -> None:
        """Make the ``i``-th streamed block resident for the compute stream (its layers' buffers are views of a slot,
        the stream waits for their copy) and start copying the next streamed block in the current direction into
        another slot (blocks not streamed run between them, their compute hiding the copy too)."""
        blk = self.blocks[i]
        if torch.is_grad_enabled():
            self._check_recomputed(blk)
        if i == self.current:
            return
        prev, self.current = self.current, i
        if prev is not None:
            if i == prev + 1 or (i == 0 and i != prev - 1):
                self.direction = 1
            elif i == prev - 1 or i == len(self.blocks) - 1:  # backward's recompute, or its start
                self.direction = -1
        self.stats["requests"] += 1
        slot = blk.slot
        if slot is None:
            slot = self._free_slot({prev})
            self._fetch(blk, slot)
            self.stats["misses"] += 1
        else:
            self.stats["hits"] += 1
        self._clock += 1
        slot.used = self._clock
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        j = i + self.direction
        if 0 <= j < len(self.blocks) and self.blocks[j].slot is None:
            self._fetch(self.blocks[j], self._free_slot({i}))
            self.stats["prefetched"] += 1

    def resident(self) -> list[int]:
        """Decoder-block indices of the streamed blocks a slot holds now."""
        return sorted(self.blocks[s.block].index for s in self.slots if s.block is not None)

    def describe(self) -> str:
        gib = self.host_bytes / 2**30
        return (f"{len(self.blocks) or len(self._taken)} blocks' frozen weights ({gib:.2f} GiB) in "
                f"{'pinned ' if self.device is not None and self.device.type == 'cuda' else ''}CPU memory, "
                f"{self.n_slots} slots of {self.slot_bytes / 2**20:.1f} MiB on {self.device}")


_KEPT = ("block {i} keeps its activations (not checkpointed): with its weights streamed (--offload-weights) the "
         "block must be recomputed in backward (keep only blocks whose weights stay on the device)")


def streamer_of(model: nn.Module) -> WeightStreamer | None:
    """The :class:`WeightStreamer` installed on ``model``, if any."""
    return getattr(model, "qlora_streamer", None)
