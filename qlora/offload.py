"""Activation memory: per-block gradient checkpointing, and offloading what it keeps to CPU memory.

Gradient checkpointing (non-reentrant ``torch.utils.checkpoint``) keeps, per decoder block, only
the block's input ``hidden_states`` ``[B, T, H]`` (``B*T*H*2`` bytes in bf16) and recomputes the
block's inside during backward. For long sequences those inputs are what remains: ``L*B*T*H*2``
bytes, e.g. 32 layers x 200k tokens x 4096 x 2 = 52 GB for an 8B model. Offloading moves them to
pinned host memory as they are produced and brings each back just before its block is recomputed.

How it works: :class:`ActivationOffloader` installs ``torch.autograd.graph.saved_tensors_hooks``.

* pack (forward), for a saved tensor on a CUDA device of at least ``min_bytes`` that is not a
  parameter or buffer: a side stream waits for the compute stream, copies the tensor into a pinned
  host buffer (``non_blocking``), and ``record_stream`` keeps the caching allocator from reusing
  the device memory before that copy has run. The device tensor is released by autograd at once;
  the compute stream never waits for the copy.
* unpack (backward): the tensor is copied back on the side stream into fresh device memory and
  the compute stream waits for that copy (a CUDA event). At the same time the copy-in of the
  tensor packed just before it (the previous block's input, needed next in backward) is started,
  so it overlaps the current block's recompute and backward: one extra ``B*T*H*2`` on the device.
* The values are copied bit for bit, so losses and gradients are exactly those without offload.

Checkpoint's own hooks take precedence inside a checkpointed region (they keep nothing there);
the block input is saved by checkpoint *outside* its region, so it reaches these hooks. Wrapping
each block's checkpoint call (what :func:`enable_checkpointing` does) therefore offloads exactly
the block inputs. Wrapping the whole loss computation in :meth:`ActivationOffloader.hooks` as well
also offloads what is saved outside the blocks (final norm input, the loss' hidden states).

On the CPU there is nothing to gain; with ``include_cpu=True`` the same path runs with plain CPU
copies (that is how the tests check exactness without a GPU).

:func:`offload_embeddings` moves the frozen input embedding table (``vocab*H*2`` bytes, 1 GiB for
Llama-3-8B, 2 GiB for 70B) to CPU memory: a lookup gathers the batch's rows there and copies
only them (``N*H*2`` bytes) to the GPU. Not for tied embeddings (lm_head needs the table).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
import torch.nn as nn

from .compat import checkpoint_function, local_tensor, set_checkpoint_function
from .config import is_int
from .errors import QLoraError
from .plan import offloaded_count

DEFAULT_MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: copies would cost more than they free


class _Offloaded:
    """One saved tensor held in host memory; ``device_copy`` is its copy-in, once started."""

    __slots__ = ("host", "device", "ready", "device_copy", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, ready, prev):
        self.host, self.device, self.ready = host, device, ready
        self.device_copy: torch.Tensor | None = None
        self.prev = prev  # weakref to the handle packed just before this one


class ActivationOffloader:
    """Saved-tensor hooks that keep activations in (pinned) host memory between forward and backward.

    ``min_bytes``: smaller tensors are left alone. ``prefetch``: in backward, start copying in the
    tensor packed before the one being unpacked. ``exclude``: a module whose parameters and
    buffers are never offloaded (they stay on the device anyway; parameters are always skipped).
    ``include_cpu``: also "offload" CPU tensors (to separate CPU copies; for tests).
    ``static``: the host buffers are kept and reused: the i-th tensor packed in a forward pass
    goes to the i-th buffer (allocated the first time). A pass starts at :meth:`begin_step` or,
    without it, at the first pack after a backward has unpacked (so an ordinary training loop
    reuses them too). A CUDA graph that captured the copies writes to the same host memory on
    every replay, so it must stay allocated, and the capture then allocates no pinned memory. A
    tensor's host copy is valid until the next forward pass (not for a second backward after it).
    ``stats`` counts ``packed``, ``bytes_out``, ``unpacked``, ``bytes_in``, ``prefetched``.
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, prefetch: bool = True, exclude: nn.Module | None = None,
                 include_cpu: bool = False, static: bool = False):
        if not is_int(min_bytes) or min_bytes < 0:
            raise QLoraError(f"min_bytes must be an integer >= 0, got {min_bytes!r}")
        self.min_bytes, self.prefetch, self.include_cpu = min_bytes, prefetch, include_cpu
        self.stats: Counter = Counter()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last = None
        self._skip: set[int] = set()
        self.static, self._slots, self._slot, self._unpacked = static, [], 0, False
        self._captured: list[torch.Tensor] = []  # buffers a CUDA graph writes to: never freed
        if exclude is not None:
            self.exclude(exclude)

    def exclude(self, module: nn.Module) -> None:
        """Never offload tensors that share storage with ``module``'s parameters or buffers."""
        for t in list(module.parameters()) + list(module.buffers()):
            t = local_tensor(t)  # an FSDP2 shard (DTensor): its local storage
            if t is not None and not t.is_meta:
                self._skip.add(t.untyped_storage().data_ptr())

    def begin_step(self) -> None:
        """A new forward pass starts: with ``static``, its tensors reuse the buffers from the start."""
        self._slot, self._unpacked = 0, False

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        pin = t.device.type == "cuda"
        if not self.static:
            return torch.empty_like(t, device="cpu", pin_memory=pin)
        if self._unpacked:  # a backward ran since the last pack: this is a new forward pass
            self._slot, self._unpacked = 0, False
        i, self._slot = self._slot, self._slot + 1
        if i < len(self._slots) and self._slots[i].shape == t.shape and self._slots[i].dtype == t.dtype:
            host = self._slots[i]
        else:  # a new shape: a new buffer (the old one is freed unless a graph captured it)
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            if i < len(self._slots):
                self._slots[i] = host
            else:
                self._slots.append(host)
        if pin and torch.cuda.is_current_stream_capturing():
            self._captured.append(host)
        return host

    @contextlib.contextmanager
    def hooks(self):
        """Context in which tensors saved for backward are offloaded."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self

    # -- pack / unpack --------------------------------------------------------------------------

    def _wanted(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or t.layout != torch.strided or t.is_meta:
            return False
        if t.device.type != "cuda" and not (self.include_cpu and t.device.type == "cpu"):
            return False
        if t.numel() * t.element_size() < self.min_bytes:
            return False
        return t.untyped_storage().data_ptr() not in self._skip

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        ready = None
        if t.device.type == "cuda":
            side = self._stream(t.device)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t has been computed
            host = self._host_buffer(t)
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            t.record_stream(side)  # its memory is reused only after the copy
        else:
            host = self._host_buffer(t).copy_(t)
        handle = _Offloaded(host, t.device, ready, self._last)
        self._last = weakref.ref(handle)
        self.stats.update(packed=1, bytes_out=t.numel() * t.element_size())
        return handle

    def _copy_in(self, h: _Offloaded) -> None:
        if h.device_copy is not None:
            return
        if h.device.type == "cuda":
            side = self._stream(h.device)
            side.wait_stream(torch.cuda.current_stream(h.device))  # the fresh memory's last users are done
            out = torch.empty_like(h.host, device=h.device)
            with torch.cuda.stream(side):
                out.copy_(h.host, non_blocking=True)
                h.ready = torch.cuda.Event()
                h.ready.record(side)
        else:
            out = h.host.clone()
        h.device_copy = out
        self.stats.update(bytes_in=h.host.numel() * h.host.element_size())

    def _unpack(self, h):
        if not isinstance(h, _Offloaded):
            return h
        self._unpacked = True
        self._copy_in(h)
        if h.ready is not None:
            torch.cuda.current_stream(h.device).wait_event(h.ready)
        t, h.device_copy = h.device_copy, None  # the host copy stays (backward may run again)
        self.stats.update(unpacked=1)
        prev = h.prev() if h.prev is not None else None
        if self.prefetch and prev is not None and prev.device_copy is None:
            self._copy_in(prev)
            self.stats.update(prefetched=1)
        return t


@contextlib.contextmanager
def offload_activations(enabled: bool = True, min_bytes: int = DEFAULT_MIN_BYTES, model: nn.Module | None = None,
                        prefetch: bool = True):
    """Offload tensors saved for backward inside this context to pinned CPU memory (see module
    docstring); ``model``'s parameters and buffers are never offloaded. Yields the
    :class:`ActivationOffloader` (or None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    off = ActivationOffloader(min_bytes, prefetch, exclude=model)
    with off.hooks():
        yield off


# ---------------------------------------------------------------------------------------------
# checkpointing with offload


def _checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: any module that carries the checkpoint function
        GradientCheckpointingLayer = None
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and checkpoint_function(m) is not None
            and (GradientCheckpointingLayer is None or isinstance(m, GradientCheckpointingLayer))]


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t


def _on_device():
    """Saved-tensor hooks that keep what is saved where it is; they take precedence over an enclosing offloader's."""
    return torch.autograd.graph.saved_tensors_hooks(_kept, _kept)


def _no_recompute(function, *args, **kwargs):
    """A block's forward run as is: autograd keeps all its activations on their device, backward recomputes
    nothing. The identity saved-tensor hooks take precedence over an enclosing offloader's (the training step
    wraps its whole loss in one), which would otherwise move these activations to CPU memory: the plan and the
    memory budget count them on the device, and on a short sequence their copies take longer than the block's
    compute (8B at 4,096 tokens: ~0.6 GB a block each way, ~14 ms at 41 GB/s, against ~3 ms of forward)."""
    with _on_device():
        return function(*args, **kwargs)


def enable_checkpointing(model: nn.Module, offload: bool | int = False, *, min_bytes: int = DEFAULT_MIN_BYTES,
                         offloader: ActivationOffloader | None = None, keep=(),
                         keep_gemms=()) -> ActivationOffloader | None:
    """Turn on per-block gradient checkpointing (non-reentrant) of a transformers model and, with
    ``offload``, move each block's saved input to pinned CPU memory until its backward.

    ``offload``: True offloads every checkpointed block's input; an integer K only the first K checkpointed
    blocks' (in model order: their inputs wait longest between forward and backward), the others' inputs stay
    on the device, shielded from an enclosing offloader's hooks (the training step wraps its whole loss in one);
    False or 0 none. Where each input lives changes no value.

    ``keep``: indices of decoder blocks (0-based, in model order) that are *not* checkpointed: they
    keep all their activations and backward recomputes nothing for them (the memory budget's policy,
    qlora.budget, keeps the last K blocks). The math is the same op for op, so losses and gradients are
    bit for bit those of recomputing. Their activations are never offloaded. Blocks whose weights are
    streamed (qlora.stream) cannot be kept.

    ``keep_gemms``: indices of checkpointed blocks whose MLP gate and up projections keep their outputs from
    the forward until the block's recompute, which then skips those two GEMMs (over half of a Llama block's
    weights) and their dequantization (:func:`qlora.linear.keep_outputs`; same values, so the same losses
    and gradients): ``2 * I`` 16-bit values a token a block of memory, against a kept block's
    ``~14H + 6I``. Blocks whose gate/up carry no plain LoRA adapter (none, or DoRA) recompute as usual.

    Returns the :class:`ActivationOffloader` used (``offloader`` if given), or None without
    offload. Its ``hooks()`` can also wrap the loss computation to offload the tensors saved
    outside the blocks. Call again with ``offload=False`` to keep checkpointing without offload.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise QLoraError(f"{type(model).__name__} does not support gradient checkpointing")
    blocks = _checkpointed_blocks(model)
    if not blocks:
        raise QLoraError(f"{type(model).__name__}: no checkpointed decoder blocks found")
    keep = set(keep)
    keep_gemms = set(keep_gemms)
    bad = sorted(k for k in keep | keep_gemms if not is_int(k) or not 0 <= k < len(blocks))
    if bad:
        raise QLoraError(f"blocks to keep must be indices in [0, {len(blocks)}), got {bad}")
    if keep & keep_gemms:
        raise QLoraError(f"blocks both kept whole and kept for their MLP GEMMs: {sorted(keep & keep_gemms)}")
    if keep:
        from .stream import _KEPT, streamer_of
        streamer = streamer_of(model)
        streamed = sorted(i for i in keep if streamer is not None and streamer.streams(i))
        if streamed:
            raise QLoraError(_KEPT.format(i=streamed[0]))
    checkpointed = [i for i in range(len(blocks)) if i not in keep]
    offloaded = set(checkpointed[:offloaded_count(offload, len(checkpointed))])
    off = None
    if offloaded:
        off = offloader or ActivationOffloader(min_bytes, static=True)  # static: what a CUDA graph of the step needs
        off.exclude(model)
    for i, block in enumerate(blocks):
        inner = getattr(block, "_qlora_checkpoint_func", checkpoint_function(block))  # undo an earlier wrap
        block._qlora_checkpoint_func = inner
        layers = gemm_layers(block) if i in keep_gemms else []
        fn = _keeping_gemms(inner, layers) if layers else inner
        fn = _offloaded(fn, off) if i in offloaded else _resident(fn) if off is not None else fn
        set_checkpoint_function(block, _no_recompute if i in keep else fn)
    return off


def _resident(inner):
    """``inner`` (a block's checkpoint function) whose saved input stays on its device even inside an offloader's
    hooks (identity hooks take precedence)."""
    def resident_checkpoint(function, *args, **kw):
        with _on_device():
            return inner(function, *args, **kw)
    return resident_checkpoint


def gemm_layers(block: nn.Module) -> list:
    """The block's MLP gate and up projections that can keep their outputs for the recompute: QLoRA layers
    with a plain (not DoRA) adapter, whose forward is the fused LoRA node."""
    from .linear import fused_node_layer
    mlp = getattr(block, "mlp", None)
    return [m for m in (getattr(mlp, n, None) for n in ("gate_proj", "up_proj")) if fused_node_layer(m)]


def _keeping_gemms(inner, layers: list):
    """``inner`` (a block's checkpoint function) whose forward keeps ``layers``' outputs for the recompute
    (:func:`qlora.linear.keep_outputs`): the checkpoint calls the block's function twice, forward then
    recompute, and each checkpointed call gets its own store."""
    from .linear import keep_outputs

    def keeping_checkpoint(function, *args, **kw):
        if not torch.is_grad_enabled():  # no backward will recompute: nothing to keep
            return inner(function, *args, **kw)
        store, calls = {}, []

        def run(*a, **k):
            calls.append(1)
            with keep_outputs(layers, into=store) if len(calls) == 1 else keep_outputs(layers, take_from=store):
                return function(*a, **k)
        return inner(run, *args, **kw)
    return keeping_checkpoint


def _offloaded(inner, off: ActivationOffloader):
    """``inner`` (a block's checkpoint function) with the block's saved input offloaded by ``off``."""
    def offloaded_checkpoint(function, *args, **kw):
        with off.hooks():
            return inner(function, *args, **kw)
    return offloaded_checkpoint


# ---------------------------------------------------------------------------------------------
# input embeddings in host memory


class HostEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` whose table stays in CPU memory: ``forward(ids)`` gathers the rows
    on the CPU and returns them on the device the rest of the model is on (an empty buffer follows
    ``model.to(...)``; the table itself is a plain attribute, so it stays where it is)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.host_weight = embedding.weight.detach().to("cpu")
        self.register_buffer("_anchor", torch.empty(0, device=embedding.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the table (e.g. its dtype or shape)
        return self.host_weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids.to("cpu"), self.host_weight)
        return rows.to(self._anchor.device, non_blocking=False)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on cpu"


def offload_embeddings(model: nn.Module) -> bool:
    """Replace the model's input embedding by a :class:`HostEmbedding` (same outputs); returns
    False and changes nothing when the embeddings are tied to lm_head or trainable."""
    emb = model.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return True
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or emb.weight.requires_grad or (
            out is not None and out.weight.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr()):
        return False
    model.set_input_embeddings(HostEmbedding(emb))
    return True
