"""CUDA graphs for the training micro-step: one forward + backward replayed as a single launch.

On a fast GPU a QLoRA step is bound by the host: Python, autograd and the launch of some 4,000
(1B) to 8,000 (8B) kernels per step take longer than the kernels themselves (see BENCHMARKS.md,
profiles of session 3). A CUDA graph records those launches once and replays them with one call,
so the GPU runs back to back.

:class:`GraphedMicroStep` wraps a function ``step_fn(batch, scale) -> loss`` that runs the
forward pass, multiplies the summed loss by ``scale`` (a 0-dim fp32 device tensor: 1/number of
trained tokens of the whole step, which changes from step to step) and calls ``backward()``.

* The first ``warmup`` calls of one batch shape run eagerly (on a side stream, as CUDA graph
  capture wants: lazy initialisations and Triton's compilation happen there).
* The next call with that shape captures the step into a graph, then replays it. Later calls with
  that shape copy the batch into the graph's static input tensors and replay. Up to ``max_graphs``
  shapes get a graph (default one; each later shape warms up once), all captured into one memory pool
  that stays reserved for them, about the size of the largest graph's scratch memory. Once there is no
  room for another, a batch of another shape is handed to ``pad(batch, shapes)``, which may return it
  padded to a captured shape (e.g. rows padded with ignored tokens), else it runs eagerly. The trainer
  pads batches to a few bucket lengths first (:func:`bucket_length`, :func:`to_packed_form`), so every
  micro-batch replays a graph.
* ``accumulate=True``: gradients accumulate *in place* into ``.grad`` tensors that exist before
  the capture (the graph writes to their addresses), so callers zero them with
  ``zero_grad(set_to_none=False)``; :meth:`GraphedMicroStep.__call__` re-attaches (zeroed) ones
  that were set to None. ``accumulate=False`` (one micro-batch per optimizer step): after each
  call ``.grad`` holds that micro-batch's gradient alone; the backward creates the ``.grad``
  tensors inside the graph's memory pool, so no gradient memory exists during the forward pass
  (as in eager training with ``set_to_none=True``), and each replay writes them afresh.
* Anything that cannot be captured (a host synchronisation inside the step: an ``.item()``, a
  data-dependent shape, a host-side RNG state read) makes the capture fail; the wrapper says why
  once and runs eagerly from then on. Nothing is lost: a failed capture executes no kernel.

The results equal eager execution's: the same kernels run on the same data (the tests compare
losses and gradients on a GPU). Activation offload works inside a graph when its host buffers
are static (``ActivationOffloader(static=True)``, what ``enable_checkpointing`` makes; the step
function calls ``begin_step()``). Not for several processes (DDP/FSDP hooks) or input embeddings
in CPU memory; :func:`supported` says when graphs can be used.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .compat import attention_implementation, set_attention_implementation

Batch = dict


def supported(device: torch.device, *, parallel: bool = False, host_embeddings: bool = False, dropout: float = 0.0,
              checkpointing: bool = True, keyed_dropout: bool = False,
              streamed_weights: bool = False) -> tuple[bool, str]:
    """Whether the training micro-step can be replayed from a CUDA graph, and if not, why. ``keyed_dropout``:
    LoRA dropout draws keyed masks (``linear.keyed_dropout``), which a checkpoint's recompute repeats
    without restoring the RNG state. ``streamed_weights``: the blocks' weights are streamed (qlora.stream),
    whose hooks decide on the host, block by block, which slot to fill and which views the layers use."""
    if device.type != "cuda":
        return False, "not a CUDA device"
    if parallel:
        return False, "several processes (gradient sync hooks)"
    if host_embeddings:
        return False, "input embeddings in CPU memory (the lookup waits for the host)"
    if streamed_weights:
        return False, "block weights streamed from CPU memory (the host picks each block's slot as it runs)"
    if dropout > 0 and checkpointing and not keyed_dropout:
        return False, "LoRA dropout with gradient checkpointing (the recompute restores the RNG state on the host)"
    return True, ""


def capture_error(e: BaseException) -> str:
    """Why a capture failed, in one line: the exception's type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _key(batch: Batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in batch.items() if isinstance(v, torch.Tensor)))


class _Captured:
    """One captured graph: its static inputs (copied into before each replay), scale and loss."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: Batch, scale: torch.Tensor, out: torch.Tensor):
        self.graph, self.inputs, self.scale, self.out = graph, inputs, scale, out


class GraphedMicroStep:
    """Runs ``step_fn(batch, scale)`` (forward, ``backward()``, returns the detached loss) eagerly for
    ``warmup`` calls, then from a CUDA graph for batches of the shape captured. ``params``: the
    trainable parameters (their ``.grad`` tensors become fixed). ``log``: told once when capture
    fails. ``max_graphs`` > 1 (needs ``accumulate``): up to that many shapes get a graph each, all
    in one memory pool (its size is about the largest graph's, not the sum), for batches padded to a
    few bucket lengths. See the module docstring."""

    def __init__(self, step_fn: Callable[[Batch, torch.Tensor], torch.Tensor], params: list[torch.Tensor],
                 device: torch.device, warmup: int = 2, log: Callable[[str], None] | None = None,
                 pad: Callable[[Batch, dict], Batch | None] | None = None, accumulate: bool = True,
                 max_graphs: int = 1):
        if max_graphs > 1 and not accumulate:
            raise ValueError("several graphs need accumulate=True (gradients outside the graphs' pool)")
        self.step_fn, self.params, self.device = step_fn, list(params), torch.device(device)
        self.warmup, self.log, self.pad, self.accumulate = max(1, int(warmup)), log, pad, accumulate
        self.max_graphs = max(1, int(max_graphs))
        self.graphs: dict[tuple, _Captured] = {}
        self.failed: str | None = None
        self.stats = {"eager": 0, "replays": 0, "captures": 0}
        self._seen: dict = {}
        self._grads: list[torch.Tensor] = []
        self._pool = None
        self._side = torch.cuda.Stream(self.device)

    # -- eager ----------------------------------------------------------------------------------

    def _eager(self, batch: Batch, scale: float, side: bool = True) -> torch.Tensor:
        self.stats["eager"] += 1
        if not self.accumulate:
            for p in self.params:
                p.grad = None
        dev = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        s = torch.tensor(float(scale), dtype=torch.float32, device=self.device)
        cur = torch.cuda.current_stream(self.device)
        if not side:  # a shape that will not get a graph: plain eager on this stream
            return self.step_fn(dev, s)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            out = self.step_fn(dev, s)
        cur.wait_stream(self._side)
        return out

    # -- graph ----------------------------------------------------------------------------------

    def _attach_grads(self) -> None:
        for p, g in zip(self.params, self._grads):
            if p.grad is not g and not self.accumulate:  # the replay overwrites g
                p.grad = g
            elif p.grad is not g:
                if p.grad is not None:  # someone replaced it: keep its value in the graph's tensor
                    g.copy_(p.grad)
                else:
                    g.zero_()
                p.grad = g

    def _capture(self, key: tuple, batch: Batch) -> bool:
        if self.graphs:
            self._attach_grads()
        for p in self.params:
            if not self.accumulate:  # backward creates .grad inside the graph's pool: written afresh by each replay
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [p.grad for p in self.params]
        inputs = {k: v.to(self.device).clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        scale = torch.zeros((), dtype=torch.float32, device=self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # one pool for all graphs: a later capture reuses what the earlier ones freed. Safe here because
            # replays never overlap, and what a replay leaves for later (the loss, read before the next call;
            # the gradients, which live outside the pool) is never another graph's scratch memory
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.step_fn(inputs, scale)
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
            self._give_up(capture_error(e))
            return False
        if not self.accumulate:
            self._grads = [p.grad for p in self.params]
        moved = [i for i, (p, g) in enumerate(zip(self.params, self._grads)) if p.grad is not g]
        if moved:  # the backward did not accumulate in place: replays would not reach .grad
            self._give_up(f"{len(moved)} gradients were not accumulated in place")
            return False
        self.graphs[key] = _Captured(graph, inputs, scale, out)
        self.stats["captures"] += 1
        if self.log is not None:
            shape = "x".join(map(str, inputs["input_ids"].shape)) if "input_ids" in inputs else "?"
            more = f" (graph {len(self.graphs)} of at most {self.max_graphs})" if self.max_graphs > 1 else ""
            self.log(f"CUDA graph captured: micro-batches of {shape} tokens are replayed from now on{more}")
        return True

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.graphs = {}
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(self.device)
        if self.log is not None:
            self.log(f"CUDA graphs off, running eagerly: {why}")

    def __call__(self, batch: Batch, scale: float) -> torch.Tensor:
        """One micro-batch: forward + backward (gradients added to ``.grad``); returns the loss
        tensor (a static tensor when replayed: read it before the next call)."""
        if self.failed is not None:
            return self._eager(batch, scale)
        key = _key(batch)
        if key not in self.graphs and self.pad is not None and len(self.graphs) >= self.max_graphs:
            for k, c in self.graphs.items():  # no room for another graph: pad to a captured shape if it fits
                padded = self.pad(batch, {n: tuple(v.shape) for n, v in c.inputs.items() if isinstance(v, torch.Tensor)})
                if padded is not None and _key(padded) == k:
                    batch, key = padded, k
                    break
        c = self.graphs.get(key)
        if c is None:
            if len(self.graphs) >= self.max_graphs:
                return self._eager(batch, scale, side=False)
            self._seen[key] = self._seen.get(key, 0) + 1
            # the first shape warms up `warmup` times (lazy initialisation); later ones once (new kernels' plans)
            if self._seen[key] <= (self.warmup if not self.graphs else 1):
                return self._eager(batch, scale)
            if not self._capture(key, batch):
                return self._eager(batch, scale)
            c = self.graphs[key]
        else:
            self._attach_grads()
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    c.inputs[k].copy_(v, non_blocking=True)
        c.scale.fill_(float(scale))
        c.graph.replay()
        self.stats["replays"] += 1
        return c.out


# -- attention without a mask --------------------------------------------------------------------

CAUSAL_ATTENTION = "qlora_causal_sdpa"


def _register_causal() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)  # None: is_causal

    def no_mask(*args, **kwargs):
        return None

    AttentionInterface.register(CAUSAL_ATTENTION, attention)
    AttentionMaskInterface.register(CAUSAL_ATTENTION, no_mask)


@contextlib.contextmanager
def causal_attention(model, enabled: bool = True):
    """For a batch without padding or packing (no ``attention_mask``, no ``position_ids``): SDPA
    attention runs with ``is_causal`` and no mask tensor is built. transformers does the same when
    it runs eagerly, but while a CUDA graph is captured its mask code cannot look at the data and
    builds a full ``[B, 1, T, T]`` mask, which makes SDPA leave its flash kernel. Only a model whose
    attention is ``sdpa`` is switched; others are left alone."""
    cfg = getattr(model, "config", None)
    if not enabled or cfg is None or attention_implementation(cfg) != "sdpa":
        yield
        return
    if not getattr(causal_attention, "_registered", False):
        _register_causal()
        causal_attention._registered = True
    set_attention_implementation(cfg, CAUSAL_ATTENTION)
    try:
        yield
    finally:
        set_attention_implementation(cfg, "sdpa")


def pad_packed(batch: Batch, shapes: dict, pad_id: int) -> Batch | None:
    """A packed batch (``input_ids``, ``labels``, ``position_ids``) padded to ``shapes``: extra
    columns and rows hold ``pad_id`` tokens with ignored labels (-100) and positions that restart
    at 0, i.e. an example of their own that adds nothing to the loss or the gradients. None when
    the batch is not packed or does not fit."""
    if "position_ids" not in batch or "attention_mask" in batch or "input_ids" not in shapes:
        return None
    B, T = batch["input_ids"].shape
    B0, T0 = shapes["input_ids"]
    if B > B0 or T > T0 or any(tuple(batch[k].shape) != (B, T) for k in ("labels", "position_ids")):
        return None
    out = dict(batch)
    for k, fill in (("input_ids", pad_id), ("labels", -100)):
        t = torch.full((B0, T0), fill, dtype=batch[k].dtype, device=batch[k].device)
        t[:B, :T] = batch[k]
        out[k] = t
    pos = torch.empty((B0, T0), dtype=batch["position_ids"].dtype, device=batch["position_ids"].device)
    pos[:B, :T] = batch["position_ids"]
    pos[:B, T:] = torch.arange(T0 - T, dtype=pos.dtype, device=pos.device)
    pos[B:] = torch.arange(T0, dtype=pos.dtype, device=pos.device)
    out["position_ids"] = pos
    return out


def bucket_length(t: int, full: int) -> int:
    """The row length a batch of ``t`` tokens per row is padded to for a CUDA graph: ``t`` rounded up to a
    multiple of an eighth of the next power of two (at least 64), at most ``full``. At most ~12 lengths per
    doubling of ``t`` (1024 tokens: 12 graphs), at most 25% extra tokens (e.g. 513 -> 640), ~8% on average."""
    q = max(64, (1 << max(0, int(t) - 1).bit_length()) // 8)
    return min(int(full), -(-int(t) // q) * q)


def bucket_count(full: int) -> int:
    """How many lengths :func:`bucket_length` gives for rows of 1..``full`` tokens."""
    return len({bucket_length(t, full) for t in range(1, int(full) + 1)})


def to_packed_form(batch: Batch) -> Batch | None:
    """A right-padded batch (``attention_mask``) as the same rows in packed form (``position_ids``, no
    mask): each row's tokens keep positions 0..n-1 and its padding becomes an example of its own
    (positions from 0 again, labels ignored), which :func:`pad_packed` can pad further. The loss and the
    gradients are unchanged: real tokens attend to the same tokens as with the mask. A packed batch is
    returned as it is; None for left padding."""
    if "attention_mask" not in batch:
        return batch if "position_ids" in batch else None
    if "position_ids" in batch:
        return None
    m = batch["attention_mask"]
    n = m.sum(dim=1, keepdim=True)
    col = torch.arange(m.shape[1], device=m.device).unsqueeze(0)
    if not torch.equal(m.bool(), col < n):
        return None
    out = {k: v for k, v in batch.items() if k != "attention_mask"}
    out["position_ids"] = torch.where(col < n, col, col - n).to(torch.long)
    return out


def graph_batch(batch: Batch, rows: int, full: int, pad_id: int, packing: bool) -> Batch:
    """The batch the trainer hands to :class:`GraphedMicroStep` (few shapes, same loss and gradients):
    packed rows padded to ``rows`` x ``full``; a length-grouped batch whose rows are all real tokens and
    already ``rows`` x its bucket length as it is, without the mask (causal attention, no mask tensor);
    any other in packed form padded to ``rows`` x its bucket length. A batch none of this applies to
    (left padding, too many rows) is returned unchanged (it then runs eagerly or gets a graph of its own)."""
    if "attention_mask" in batch and "position_ids" not in batch:
        ids, m = batch["input_ids"], batch["attention_mask"]
        if tuple(ids.shape) == (rows, bucket_length(ids.shape[1], full)) and bool(m.all()):
            return {k: v for k, v in batch.items() if k != "attention_mask"}
    pb = to_packed_form(batch)
    if pb is None:
        return batch
    t = full if packing else bucket_length(pb["input_ids"].shape[1], full)
    return pad_packed(pb, {"input_ids": (rows, t)}, pad_id) or batch
