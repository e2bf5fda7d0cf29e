"""The ``QLORA_*`` environment switches, read once into one frozen object (:func:`switches`) that every
module asks, instead of each module reading ``os.environ`` (some on every call).

They are for debugging and measuring, not for training settings (those are flags/YAML, config.py).
Each is on/off: ``1/true/yes/on`` or ``0/false/no/off`` (any case); unset, empty or anything else
gives the default. The list (field: variable, default -- what it does):

* ``debug``: ``QLORA_DEBUG`` (off) -- the CLI shows the traceback of an internal error. Any non-empty
  value turns it on (kept from before this module, where the variable was only tested for presence).
* ``kernels``: ``QLORA_KERNELS`` (on) -- the Triton kernels; off runs the torch references.
* ``lora_row``: ``QLORA_LORA_ROW`` (on) -- the one-row LoRA kernel of decoding.
* ``cuda_gemv``: ``QLORA_CUDA_GEMV`` (on) -- the NVRTC CUDA GEMV for one-row 4-bit matmuls.
* ``gemv_mma``: ``QLORA_GEMV_MMA`` (on) -- its tensor-core variant (off: the FMA one).
* ``rope_kernel``: ``QLORA_ROPE_KERNEL`` (on) -- transformers' RoPE routed through our kernel.
* ``fused_lora``: ``QLORA_FUSED_LORA`` (on) -- the LoRA layer's single autograd node (off: separate ops).
* ``fused_dropout``: ``QLORA_FUSED_DROPOUT`` (on) -- keyed LoRA dropout inside the LoRA products on a GPU.
* ``cuda_graph_decode``: ``QLORA_CUDA_GRAPH_DECODE`` (on) -- generation replays a CUDA graph per token.
* ``pycache``: ``QLORA_PYCACHE`` (on) -- the CLI keeps compiled bytecode in a cache of its own.
* ``keep_imports``: ``QLORA_KEEP_IMPORTS`` (off) -- the CLI hides no unused packages.
* ``warmup``: ``QLORA_WARMUP`` (on) -- CUDA and Triton warmed up in the background while a run starts.
* ``tile_all``: ``QLORA_TILE_ALL`` (off) -- every MLP call of a loaded model runs sequence-tiled (qlora.tiled),
  in chunks of :data:`qlora.tiled.FORCED_ROWS` tokens, not only long ones: tiling on tiny models, in child
  processes too (tests under torchrun).
* ``stream_cpu``: ``QLORA_STREAM_CPU`` (off) -- ``qlora train --offload-weights true`` runs on a CPU device too,
  streaming between CPU buffers (qlora.stream's CPU mode: nothing saved; how the tests run that path of the run).

The object is read from the environment on first use; a program (or a test) that changes
``os.environ`` afterwards calls :func:`refresh`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .config import _FALSE, _TRUE


def _field(var: str, default: bool):
    return dataclasses.field(default=default, metadata={"var": var})


@dataclass(frozen=True)
class Switches:
    debug: bool = _field("QLORA_DEBUG", False)
    kernels: bool = _field("QLORA_KERNELS", True)
    lora_row: bool = _field("QLORA_LORA_ROW", True)
    cuda_gemv: bool = _field("QLORA_CUDA_GEMV", True)
    gemv_mma: bool = _field("QLORA_GEMV_MMA", True)
    rope_kernel: bool = _field("QLORA_ROPE_KERNEL", True)
    fused_lora: bool = _field("QLORA_FUSED_LORA", True)
    fused_dropout: bool = _field("QLORA_FUSED_DROPOUT", True)
    cuda_graph_decode: bool = _field("QLORA_CUDA_GRAPH_DECODE", True)
    pycache: bool = _field("QLORA_PYCACHE", True)
    keep_imports: bool = _field("QLORA_KEEP_IMPORTS", False)
    warmup: bool = _field("QLORA_WARMUP", True)
    tile_all: bool = _field("QLORA_TILE_ALL", False)
    stream_cpu: bool = _field("QLORA_STREAM_CPU", False)


def _flag(value: str | None, default: bool) -> bool:
    v = (value or "").strip().lower()
    return True if v in _TRUE else False if v in _FALSE else default


def read(environ=None) -> Switches:
    """The switches as ``environ`` (default ``os.environ``) sets them."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(Switches):
        raw = environ.get(f.metadata["var"])
        values[f.name] = bool(raw) if f.name == "debug" else _flag(raw, f.default)
    return Switches(**values)


_current: list[Switches] = []


def switches() -> Switches:
    """The switches of this process (read from the environment on the first call)."""
    if not _current:
        _current.append(read())
    return _current[0]


def refresh() -> Switches:
    """Read the environment again (after ``os.environ`` changed); returns the new switches."""
    _current[:] = [read()]
    return _current[0]


def variables() -> dict[str, str]:
    """``QLORA_* variable -> field name``, for documentation and tests."""
    return {f.metadata["var"]: f.name for f in dataclasses.fields(Switches)}
