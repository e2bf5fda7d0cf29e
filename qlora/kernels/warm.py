"""Compile a training step's Triton kernels ahead of it.

On a freshly started GPU machine (an empty Triton cache), the first 8B training step compiled seven
Triton kernels one after another, ~1.2 s of compiling plus ~1.9 s waiting for ``ptxas`` and for the
C compiler that builds each kernel's launcher (bench/ttfs_profile.py --detail, session 8).
:func:`compile_ahead` runs each of them once on small tensors whose dtypes, alignment and integer
arguments fall into the same specialisation as the run's (the LoRA products with dropout inside: on the
run's own rows, whose count sets a compile-time split), so that the run finds them compiled (in
Triton's in-process and on-disk caches). :func:`qlora.lean_imports.warm_up_cuda` calls it (through
:func:`compile_ahead_once`) from one of its background threads while the main thread imports transformers and builds the model; the child
processes (``ptxas``, the C compiler) do not hold the interpreter lock.

Each kernel is tried on its own; a failure only means the run compiles that one itself. No random
numbers are drawn (the run's seeds are unaffected)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..settings import switches


KERNELS = ("rms_norm", "swiglu", "rope", "dequantize_4bit", "xent_grad", "lora_dropout")


def planned(quant_type: str | None = "nf4", rank: int = 0, dropout: float = 0.0) -> list[str]:
    """The kernels :func:`compile_ahead` runs: all of :data:`KERNELS`, less RoPE where
    ``QLORA_ROPE_KERNEL=0`` (transformers' rotary embedding runs instead), less the dequantization
    for a 16-bit base (``quant_type`` None), and the LoRA products with keyed dropout inside only for a
    run with LoRA dropout (``rank`` > 0, ``dropout`` > 0, not ``QLORA_FUSED_DROPOUT=0``)."""
    return [k for k in KERNELS if not (k == "rope" and not switches().rope_kernel)
            and not (k == "dequantize_4bit" and quant_type is None)
            and not (k == "lora_dropout" and not (rank > 0 and dropout > 0 and switches().fused_dropout))]


def compile_ahead(device, hidden: int, intermediate: int, head_dim: int, vocab: int, tokens: int, seq: int,
                  dtype: torch.dtype = torch.bfloat16, quant_type: str | None = "nf4", blocksize: int = 64,
                  double_quant: bool = True, rank: int = 0, dropout: float = 0.0) -> list[str]:
    """Compile (by running once) the Triton kernels of a decoder training step: RMSNorm, SwiGLU and RoPE
    forward and backward, the 4-bit dequantization (``quant_type`` None: none), the loss gradient, and
    with LoRA dropout (``rank``, ``dropout``) the three LoRA products that apply it.
    ``tokens``: tokens per micro-batch (rows of the norm's backward); ``seq``: positions per sequence.
    Returns the names of the kernels that ran."""
    from . import available, norm_act
    dev = torch.device(device)
    if not available(dev):
        return []
    done = []

    def attempt(name, fn):
        try:
            fn()
            done.append(name)
        except Exception:  # only a warm-up: the run compiles what failed here
            pass

    def norm():
        x = torch.ones(max(1, tokens), hidden, device=dev, dtype=dtype, requires_grad=True)
        w = torch.ones(hidden, device=dev, dtype=dtype)
        norm_act.RMSNormFunction.apply(x, w, 1e-5).sum().backward()

    def act():
        g = torch.ones(16, intermediate, device=dev, dtype=dtype, requires_grad=True)
        u = torch.ones(16, intermediate, device=dev, dtype=dtype, requires_grad=True)
        norm_act.SwiGLUFunction.apply(g, u, False).sum().backward()

    def rope():
        x = torch.ones(1, 2, seq, head_dim, device=dev, dtype=dtype, requires_grad=True)
        cos = torch.ones(1, seq, head_dim, device=dev, dtype=dtype)
        norm_act.RoPEFunction.apply(x, cos, cos).sum().backward()

    def dequant():
        from ..nf4 import quantize_4bit
        from .dequant import dequantize_4bit_triton
        w = torch.ones(256, hidden, device=dev, dtype=dtype)
        packed, state = quantize_4bit(w, blocksize, quant_type, double_quant)
        dequantize_4bit_triton(packed, state, dtype)

    def loss():
        from .ce import softmax_xent_grad_
        logits = torch.zeros(16, vocab, device=dev, dtype=dtype)
        labels = torch.zeros(16, device=dev, dtype=torch.long)
        softmax_xent_grad_(logits, labels, torch.ones(1, device=dev), -100)

    def lora_dropout():
        # the run's own rows and widths: grad_a's split over rows (a compile-time constant) follows from them.
        # Transient memory: one [tokens, intermediate] input (8B, 4096 tokens: 117 MB)
        from . import lora_dropout as ld
        key = torch.zeros((), dtype=torch.int64, device=dev)
        for k in sorted({hidden, intermediate}):
            x = torch.zeros(max(1, tokens), k, device=dev, dtype=dtype)
            a = torch.zeros(rank, k, device=dev, dtype=dtype)
            xa = ld.down(x, a, dropout, key, 1)
            ld.grad_a(xa, x, dropout, key, 1)
            ld.grad_x_add_(x, xa, a, dropout, key, 1)
            del x

    fns = {"rms_norm": norm, "swiglu": act, "rope": rope, "dequantize_4bit": dequant, "xent_grad": loss,
           "lora_dropout": lora_dropout}
    with torch.cuda.device(dev):
        for name in planned(quant_type, rank, dropout):
            attempt(name, fns[name])
        torch.cuda.synchronize(dev)
    return done


def _stamp(device, **kw) -> Path:
    """A file in Triton's cache folder that says these kernels were compiled ahead for these sizes by
    this Triton, torch and qlora on this GPU model (emptying Triton's cache removes it too)."""
    import hashlib
    import json
    import os
    from importlib.metadata import version
    folder = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.environ.get("TRITON_HOME") or Path.home(),
                                                                ".triton", "cache")
    here = Path(__file__).parent
    sources = [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(here.glob("*.py"))]
    key = json.dumps([sorted((k, str(v)) for k, v in kw.items()), sources, torch.__version__, version("triton"),
                      torch.cuda.get_device_capability(device), switches().rope_kernel])
    return Path(folder) / f"qlora-compiled-ahead-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def compile_ahead_once(device, **kw) -> list[str] | None:
    """:func:`compile_ahead`, unless it already ran to the end for the same sizes and versions (a stamp
    in Triton's cache folder): on a machine whose Triton cache holds the kernels, running them in a
    thread would only compete with the main thread's imports for the interpreter lock (warm starts were
    ~2 s slower with it). Returns the kernels that ran, or None when skipped."""
    try:
        stamp = _stamp(device, **kw)
        if stamp.exists():
            return None
    except Exception:  # no triton, no CUDA: compile_ahead decides
        stamp = None
    done = compile_ahead(device, **kw)
    if stamp is not None and done == planned(kw.get("quant_type", "nf4"), kw.get("rank", 0), kw.get("dropout", 0.0)):
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.touch()
        except OSError:
            pass
    return done
