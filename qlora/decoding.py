"""Token-by-token decoding on a static KV cache; on a GPU each step is one CUDA-graph replay.

transformers' ``generate`` spends ~48 ms of host time per token on an 8B model (224 QLoRA layers plus
attention, norms and rotary embeddings: about a thousand kernel launches, each through Python) for ~5 ms
of GPU work (BENCHMARKS.md, session 9). Here the KV cache lives in fixed buffers
(``transformers.StaticCache``), the attention mask is a ready 4-D tensor computed on the GPU from a
position buffer, and the next token is picked on the GPU (greedy argmax; or temperature and nucleus
sampling by the exponential race: argmax of p / E with E ~ Exp(1) draws from p). So one step reads and
writes only tensors at fixed addresses: it runs once eagerly (which also plans the 4-bit GEMVs and
compiles any Triton kernel), is then captured as a CUDA graph and replayed for every further token.
The host reads each token one step behind the GPU (a pinned buffer and an event per token), so the GPU
is never idle while the host streams text or checks for a stop token; the one extra step this may
compute after a stop token is discarded.

:func:`decode` is what :func:`qlora.generate.generate_full` runs on CUDA devices (CPU keeps
transformers' ``generate``, whose dynamic cache attends only to the tokens so far). :func:`unsupported`
says why a model cannot use it (sliding-window or non-standard attention, dynamic RoPE, a KV cache that
would not fit); then ``generate`` is used. If the capture fails, the same loop continues eagerly and
says why once. ``QLORA_CUDA_GRAPH_DECODE=0`` (or ``qlora generate --no-cuda-graph``) turns the graph off.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, Iterable

from .compat import attention_implementation

KV_MEMORY_SHARE = 0.5  # a static KV cache may take at most this share of the GPU's free memory


def _forward_params(model):
    return inspect.signature(type(model).forward).parameters


def _cache_arg(params) -> str | None:
    """Name of the forward's KV-cache argument (``past_key_values``; ``cache`` in later transformers)."""
    return next((n for n in ("past_key_values", "cache") if n in params), None)


def kv_bytes(model, max_len: int) -> int:
    """Bytes of a static KV cache of ``max_len`` positions, batch 1, in the model's dtype."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = getattr(model, "dtype", None)
    itemsize = dtype.itemsize if dtype is not None and dtype.is_floating_point else 2
    return 2 * cfg.num_hidden_layers * kv * head_dim * max_len * itemsize


def unsupported(model, max_len: int) -> str | None:
    """Why :func:`decode` cannot run ``model`` with ``max_len`` cache positions, or None when it can."""
    import torch
    from .stream import streamer_of
    if streamer_of(model) is not None:
        return "block weights streamed from CPU memory (each step's blocks are copied in by the host)"
    cfg = model.config
    impl = attention_implementation(cfg)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (sdpa or eager needed)"
    if _cache_arg(_forward_params(model)) is None:
        return f"{type(model).__name__}.forward takes no KV cache argument"
    types = getattr(cfg, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return "layers with sliding-window or other non-full attention"
    # Mistral-style configs set sliding_window with use_sliding_window unset (None); Qwen2 sets it to False
    if not types and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", None) is not False:
        return "sliding-window attention"
    for attr in ("rope_parameters", "rope_scaling"):  # (transformers 5 renamed rope_scaling)
        rope = getattr(cfg, attr, None)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
            return "RoPE scaling that depends on the sequence length"
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        need = kv_bytes(model, max_len)
        if need > KV_MEMORY_SHARE * free:
            return (f"a static KV cache of {max_len} positions needs {need / 2**30:.2f} GiB, more than half of "
                    f"the GPU's free {free / 2**30:.2f} GiB")
    return None


def pick(logits, temperature: float, top_p: float):
    """Next token ids [batch] from last-position logits [batch, vocab]: argmax when ``temperature`` is 0, else
    a draw from softmax(logits / T) restricted to the smallest top set whose probability reaches ``top_p``.
    Only tensor operations on the logits' device (capturable in a CUDA graph: no host synchronisation)."""
    import torch
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1:
        s, order = scores.sort(-1, descending=True)
        p = s.softmax(-1)
        s = s.masked_fill(p.cumsum(-1) - p >= top_p, float("-inf"))  # mass before the token already reaches top_p
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, s)
    probs = scores.softmax(-1)
    race = torch.empty_like(probs).exponential_().clamp_min_(1e-30)
    return (probs / race).argmax(-1)


def decode(model, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
           stops: Iterable[int] = (), on_token: Callable[[int], None] | None = None, graph: bool = True,
           log: Callable[[str], None] | None = None) -> list[int]:
    """New token ids after the prompt ``ids`` (batch 1): at most ``max_new_tokens``, ending with the first
    token in ``stops`` if one comes. ``on_token(t)`` gets each as soon as the host has it. Call under
    ``torch.no_grad()`` with the model in eval mode; the model's KV cache setting is not used (this passes
    its own cache). ``graph``: replay steps from a CUDA graph (CUDA devices only). ``log`` receives a line
    if the capture fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .errors import QLoraError
    from .linear import row_kernels
    if not ids:
        raise QLoraError("decode needs at least one prompt token")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QLoraError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    # not cuDNN attention: it builds a plan per new shape (0.3-1.4 s per call, each prompt length a new
    # one) and its masked one-token step was slower here (8B, H200: 7.1 against 5.4 ms per token)
    with row_kernels(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return _decode(model, ids, max_new_tokens, temperature, top_p, set(stops), on_token, graph, log)


def _decode(model, ids, max_new_tokens, temperature, top_p, stops, on_token, graph, log):
    import torch
    from transformers import StaticCache

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    n = len(ids)
    max_len = _cache_len(n + max_new_tokens)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    params = _forward_params(model)
    kw = {_cache_arg(params): cache, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    positions = torch.arange(max_len, device=device)

    eager_attn = attention_implementation(model.config) == "eager"
    dtype = model.get_input_embeddings().weight.dtype

    def logits_of(input_ids, position_ids, allowed):  # allowed: [1, 1, q, max_len] bool, True = attend
        mask = _mask(allowed, dtype, eager_attn)
        return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **kw).logits[:, -1, :]

    # prefill: the prompt's n positions attend causally (the mask covers the cache's max_len positions)
    first = positions[:n]
    mask = (positions[None, :] <= first[:, None])[None, None]
    tok = pick(logits_of(torch.tensor([ids], device=device), first[None], mask), temperature, top_p).view(1, 1)
    pos = torch.full((1,), n, dtype=torch.long, device=device)
    del mask

    def step():  # token at `pos` -> next token into `tok`, pos + 1; fixed addresses only
        m = (positions <= pos).view(1, 1, 1, max_len)
        nxt = pick(logits_of(tok, pos.view(1, 1), m), temperature, top_p)
        tok.copy_(nxt.view(1, 1))
        pos.add_(1)

    host = torch.empty(max_new_tokens, dtype=torch.long, pin_memory=cuda)
    events = []
    out: list[int] = []

    def push(i: int) -> None:  # token i (now in `tok`) -> host[i], without waiting
        host[i:i + 1].copy_(tok.view(1), non_blocking=cuda)
        if cuda:
            ev = torch.cuda.Event()
            ev.record()
            events.append(ev)

    def take(i: int) -> bool:  # hand on token i; True when it ends the answer
        if cuda:
            events[i].synchronize()
        t = int(host[i])
        out.append(t)
        if on_token is not None:
            on_token(t)
        return t in stops

    run = step
    side = _side_stream(device) if cuda and graph else None
    push(0)
    for i in range(1, max_new_tokens):
        if side is not None and i == 1:  # eagerly on the capture's stream: lazy set-up, GEMV plans, compiles
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            if side is not None and i == 2:
                run = _capture(step, side, device, log) or step
            run()
        push(i)
        if take(i - 1):
            return out
    take(max_new_tokens - 1)
    return out


def _cache_len(positions: int) -> int:
    """Length of the static KV cache for ``positions`` (prompt + new tokens); a hook for experiments
    (``bench/decode_experiments.py``)."""
    return positions


def _mask(allowed, dtype, eager: bool):
    """The attention mask the model gets from ``allowed`` ([1, 1, q, cache length] bool, True = attend): as is
    for SDPA, additive (0 / dtype min) for eager attention, which adds it to the scores."""
    import torch
    if not eager:
        return allowed
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


_STREAMS: dict = {}


def _side_stream(device):
    """One side stream per device for every call: cuBLAS keeps a workspace (32 MiB on Hopper) per stream
    it has run on, so a new stream per call would leave 32 MiB behind each time (up to PyTorch's pool of
    streams)."""
    import torch
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _capture(step, stream, device, log):
    """``step`` as a CUDA graph's ``replay`` (nothing runs while capturing), or None when it cannot be captured."""
    import torch

    from .cuda_graphs import capture_error
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize(device)
    try:
        with torch.cuda.graph(graph, stream=stream):
            step()
    except Exception as e:  # noqa: BLE001 - any failure to capture means: continue eagerly
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
        msg = f"CUDA graph decoding off, decoding step by step: {capture_error(e)}"
        if log is not None:
            log(msg)
        else:
            warnings.warn(msg, stacklevel=3)
        return None
    return graph.replay
