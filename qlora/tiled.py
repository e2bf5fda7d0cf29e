"""Sequence-tiled MLP: on long sequences a decoder block's MLP runs over chunks of the tokens, so that
its intermediates (gate, up, their product and, in backward, their gradients) exist for one chunk at a
time instead of for the whole sequence.

Why: the MLP is per token, and its intermediates are the largest part of a checkpointed block's backward
peak: about ``9.35 * I`` bytes a token (``qlora.plan.ACT["block_i"]``), 134 KB for Llama-3.1-8B
(I = 14336), 51 GiB at 400k tokens. Tiled, they take one chunk's worth (0.6 GiB with the defaults).

How (:class:`_TiledMLP`, one autograd node per MLP call):

* forward saves only the MLP's input ``x`` (and the LoRA factors, small) and returns its output
  *unfilled*; :func:`mlp_forward` then fills it chunk by chunk without an autograd graph. A checkpointed
  block's recompute (torch's non-reentrant checkpoint stops once the block's last saved tensor is saved
  again) therefore stops at this node, before the chunks run: the MLP forward runs twice per step, as
  without tiling (forward, and again in backward, where down_proj's frozen product is left out as the
  untiled recompute leaves it: :meth:`_Tiling._down_unused`), and each chunk dequantizes gate's and up's
  weights again; without checkpointing the MLP forward runs one more time.
* backward, chunk by chunk, runs the chunk's MLP again with autograd on and back-propagates the chunk's
  rows of the output gradient with ``torch.autograd.grad`` to the chunk's input and to the trainable
  tensors the MLP uses. Those tensors are inputs of the node (the LoRA factors in the compute dtype as the
  layers would use them, :func:`qlora.linear.adapter_factors`; any other trainable parameter as it is), so
  their gradients, summed over the chunks in fp32, reach the parameters through the ordinary graph (the one
  cast of :class:`qlora.linear.lora_cast`, DDP's hooks) exactly once per step. Tensors saved inside a chunk
  stay on the device (activation offload's hooks are bypassed: the chunk is gone a moment later). The frozen
  weights and norms are read from the module then: under FSDP2 the block's shards are gathered again by
  that time (its pre-backward hook fires on the gradients of the block's outputs, before any node inside
  the block, checkpoint recompute included; tests/test_distributed.py).

Results: per token the same math as the untiled MLP; without dropout the losses and gradients agree to
the order of floating-point sums (GEMMs of fewer rows; tests compare fp32 to 1e-5). LoRA dropout draws its
masks per chunk: keyed dropout (GPU) from a key derived from the micro-batch's key and the chunk's index,
``torch``'s RNG elsewhere (its state is kept from forward and replayed in backward), so a tiled run drops
other (equally random) elements than an untiled one.

When (:func:`tile_rows`): only when a call's tokens times the intermediate size exceed :data:`TILE_ABOVE`;
other calls run the MLP as before, untouched. ``qlora.fast.use_tiled_mlp`` installs it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .errors import QLoraError
from .linear import (LoraDropout, adapter_factors, current_dropout_key, dropout_key_as, fused_node_layer,
                     lora_factors_as, output_unused)

# Tile when a call's tokens x intermediate size exceed this: the untiled MLP's intermediates at the
# block's backward peak (~9.35 bytes per element) would pass ~2.3 GiB. Llama-3.1-8B (I 14336) tiles from
# 18,725 tokens up; the usual micro-batches (2 x 2048 tokens: 5.9e7) keep the untiled path.
TILE_ABOVE = 1 << 28
# Each chunk: about this many tokens x intermediate size (~0.6 GiB of intermediates; 4681 tokens for 8B,
# thousands of rows per GEMM, so the matmuls keep their speed and the chunk loop's overhead stays small).
CHUNK_ELEMENTS = 1 << 26
# Tokens per chunk when QLORA_TILE_ALL forces every call tiled (tests: several chunks on tiny micro-batches).
FORCED_ROWS = 16
# MLP classes whose forward returns down_proj's output as it is (``down(act(gate(x)) * up(x))``): their chunk
# backward needs no value of it, so down_proj's frozen product is left out there (qlora.linear.output_unused)
DOWN_IS_OUTPUT = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP", "GemmaMLP",
                  "Gemma2MLP", "Gemma3MLP"}
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: chunk keys far apart from each other


def tile_rows(tokens: int, intermediate: int, above: int = TILE_ABOVE, chunk: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk of a tiled MLP call on ``tokens`` tokens, or 0 when the call is not tiled."""
    if tokens * intermediate <= above:
        return 0
    return max(1, chunk // intermediate)


def chunk_bounds(tokens: int, rows: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk: as few as chunks of at most ``rows`` allow, of balanced sizes (no
    one-token last chunk)."""
    n = math.ceil(tokens / rows)
    size = math.ceil(tokens / n)
    return [(i, min(tokens, i + size)) for i in range(0, tokens, size)]


def check_tiling(above: int, chunk: int) -> None:
    for name, v in (("above", above), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise QLoraError(f"MLP tiling: {name} must be a positive integer (tokens x intermediate size), got {v!r}")


def chunk_key(key: torch.Tensor, index: int) -> torch.Tensor:
    """The keyed-dropout key of chunk ``index``: the micro-batch's key mixed with the index (a device op,
    so a CUDA graph replays it), so no two chunks of a call share a mask."""
    mix = ((index + 1) * _MIX) & ((1 << 64) - 1)
    return key ^ (mix - (1 << 64) if mix >= 1 << 63 else mix)


def _draws_rng(mlp: nn.Module, key) -> bool:
    """Whether the MLP's forward draws from torch's RNG (a dropout that is not keyed)."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training and not (isinstance(m, LoraDropout) and key is not None)
               for m in mlp.modules())


def _on_device(t: torch.Tensor) -> torch.Tensor:
    return t


class _Tiling:
    """One tiled call: the MLP and its per-chunk forward ``inner(mlp, x)``, the chunks, the adapted layers,
    the trainable parameters used as they are, and what its dropout draws from (a key, or the RNG state)."""

    def __init__(self, mlp: nn.Module, inner, x: torch.Tensor, rows: int, layers=(), params=()):
        self.mlp, self.inner, self.layers, self.params = mlp, inner, list(layers), list(params)
        self.bounds = chunk_bounds(x.numel() // x.shape[-1], rows)
        self.out_features = mlp.down_proj.out_features
        self.key = current_dropout_key()
        self.device = x.device
        self.rng = None
        if _draws_rng(mlp, self.key):
            self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)

    def _key(self, index: int):
        return dropout_key_as(chunk_key(self.key, index)) if self.key is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _replayed_rng(self):
        """The RNG as it was when forward drew the first chunk's masks (restored afterwards)."""
        if self.rng is None:
            yield
            return
        with torch.random.fork_rng(devices=[self.device] if self.rng[1] is not None else []):
            torch.set_rng_state(self.rng[0])
            if self.rng[1] is not None:
                torch.cuda.set_rng_state(self.rng[1], self.device)
            yield

    def fill(self, x: torch.Tensor, y: torch.Tensor, factors) -> None:
        """Write the MLP's output of ``x`` into ``y``, chunk by chunk, without autograd."""
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        given = lora_factors_as(self.layers, [f.detach() for f in factors]) if factors else contextlib.nullcontext()
        with torch.no_grad(), given:
            for i, (a, b) in enumerate(self.bounds):
                with self._key(i):
                    y2[a:b].copy_(self.inner(self.mlp, x2[a:b]))

    def _down_unused(self):
        """Inside the chunk backward: down_proj's frozen product left out of the chunk's output, whose value
        nothing reads (only its gradient is taken) -- one dequantization and GEMM fewer per chunk -- where the
        MLP returns down_proj's output as it is and down_proj is a plain (not DoRA) adapted QLoRA layer."""
        down = self.mlp.down_proj
        if type(self.mlp).__name__ in DOWN_IS_OUTPUT and fused_node_layer(down) and not down.disable_adapter:
            return output_unused(down)
        return contextlib.nullcontext()

    def backward(self, x, gy, factors, wanted, need_x):
        """``(grad of x or None, [grad of each of wanted])``: chunk by chunk, the MLP again with autograd and
        its backward from the chunk's rows of ``gy``; the wanted gradients summed in fp32."""
        x2, g2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
        gx = torch.empty_like(x2) if need_x else None
        sums = [None] * len(wanted)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_on_device, _on_device), \
                lora_factors_as(self.layers, factors), self._replayed_rng(), self._down_unused():
            for i, (a, b) in enumerate(self.bounds):
                xc = x2[a:b].detach().requires_grad_(need_x)
                with self._key(i):
                    out = self.inner(self.mlp, xc)
                got = torch.autograd.grad(out, ([xc] if need_x else []) + wanted, g2[a:b], allow_unused=True)
                if need_x:
                    gx[a:b].copy_(got[0])
                    got = got[1:]
                for j, g in enumerate(got):
                    if g is not None:
                        sums[j] = g.float() if sums[j] is None else sums[j].add_(g)
                del out, got
        grads = [None if s is None else s.to(w.dtype) for s, w in zip(sums, wanted)]
        return (gx.view(x.shape) if need_x else None), grads


class _TiledMLP(torch.autograd.Function):
    """``y = mlp(x)`` over chunks of tokens (see the module docstring); ``tensors``: the compute-dtype LoRA
    factors (``n_factors`` of them) then other trainable parameters. The output comes back unfilled:
    :func:`mlp_forward` fills it after apply returns."""

    @staticmethod
    def forward(ctx, x, tiling, n_factors, *tensors):
        ctx.tiling, ctx.n_factors = tiling, n_factors
        ctx.save_for_backward(x, *tensors[:n_factors])  # the parameters: tiling.params
        return x.new_empty(*x.shape[:-1], tiling.out_features)

    @staticmethod
    def backward(ctx, gy):
        x, *saved = ctx.saved_tensors
        tiling, need = ctx.tiling, ctx.needs_input_grad[3:]
        factors = [f.detach().requires_grad_(n) for f, n in zip(saved, need)]
        wanted = [t for t, n in zip(factors + tiling.params, need) if n]
        gx, grads = tiling.backward(x, gy, factors, wanted, ctx.needs_input_grad[0])
        it = iter(grads)
        return (gx, None, None, *[next(it) if n else None for n in need])


def mlp_forward(mlp: nn.Module, inner, x: torch.Tensor, above: int = TILE_ABOVE, chunk: int = CHUNK_ELEMENTS):
    """``inner(mlp, x)`` (an MLP's forward: per token, with ``gate_proj``/``up_proj``/``down_proj``), tiled
    over the tokens when :func:`tile_rows` says so, else exactly ``inner(mlp, x)``."""
    rows = tile_rows(x.numel() // x.shape[-1], mlp.up_proj.out_features, above, chunk) if x.dim() > 1 else 0
    if not rows:
        return inner(mlp, x)
    mlp._qlora_tiled_calls = getattr(mlp, "_qlora_tiled_calls", 0) + 1
    if not torch.is_grad_enabled():  # evaluation: the chunks alone
        tiling = _Tiling(mlp, inner, x, rows)
        y = x.new_empty(*x.shape[:-1], tiling.out_features)
        tiling.fill(x, y, None)
        return y
    layers, factors = adapter_factors(mlp)
    adapted = {id(p) for m in layers for p in (m.lora_A, m.lora_B)}
    params = [p for p in mlp.parameters() if p.requires_grad and id(p) not in adapted]
    tiling = _Tiling(mlp, inner, x, rows, layers, params)
    y = _TiledMLP.apply(x, tiling, len(factors), *factors, *params)
    tiling.fill(x, y, factors)
    return y
