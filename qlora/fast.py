"""Route a transformers model's RMSNorm, SwiGLU MLP and rotary embedding through the fused Triton
kernels of :mod:`qlora.kernels` (forward and backward), by replacing those modules' ``forward`` on
the instance — no subclassing — and, for RoPE, the modeling module's ``apply_rotary_pos_emb``
(which falls back to the original wherever the kernel does not apply, e.g. on a CPU). The kernels
compute what the modules compute (RMSNorm in fp32, cast back, times the weight;
``down(silu(gate(x)) * up(x))``), and each call falls back to the torch reference when the kernels
are unavailable (CPU, no Triton, ``QLORA_KERNELS=0``).

:func:`use_tiled_mlp` routes the same MLP modules through :func:`qlora.tiled.mlp_forward`, which runs
their forward (fused or not) over chunks of the tokens when a call is long (see qlora.tiled)."""
from __future__ import annotations

import weakref

import torch.nn as nn

from .compat import modeling_function, set_modeling_function
from .settings import switches
from .tiled import CHUNK_ELEMENTS, TILE_ABOVE, check_tiling, mlp_forward

# norms of the form weight * normalize(x) (Gemma's 1 + weight differs: left alone)
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
# attention modules that call their modeling module's apply_rotary_pos_emb(q, k, cos, sin)
_ATTENTIONS = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}


def _norm_forward(self, hidden_states):
    from . import kernels
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from . import kernels
    # gate and up are fresh tensors read only by the activation: its backward may overwrite them
    return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=True))


def _rope_with_kernel(original):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` through the RoPE
    kernel (one launch per tensor, forward and backward) where it applies: CUDA tensors with the
    kernels available, full-width rotation, ``cos``/``sin`` of shape [B, S, D]; else the original."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, unsqueeze_dim=1, **kwargs):
        from . import kernels
        if (args or kwargs or unsqueeze_dim != 1 or not q.is_cuda or cos.dim() != 3 or cos.shape[-1] != q.shape[-1]
                or k.shape[-1] != q.shape[-1] or not kernels.available(q.device)):
            return original(q, k, cos, sin, *args, unsqueeze_dim=unsqueeze_dim, **kwargs)
        return kernels.rope(q, cos, sin), kernels.rope(k, cos, sin)

    apply_rotary_pos_emb._qlora_original = original
    return apply_rotary_pos_emb


def _patch_rope(attention_class) -> bool:
    """Route the rotary embedding of ``attention_class``'s modeling module through the kernel
    (module-wide: the module's function is replaced once; it falls back to the original itself)."""
    fn = modeling_function(attention_class, "apply_rotary_pos_emb")
    if fn is None:
        return False
    if not hasattr(fn, "_qlora_original"):
        set_modeling_function(attention_class, "apply_rotary_pos_emb", _rope_with_kernel(fn))
    return True


class _Forward:
    """``fn(module, ...)``, the patched ``forward`` of ``module``, holding the module weakly: a bound
    method stored on its own instance (module -> method -> module) is a reference cycle, which kept a
    whole model and its GPU memory alive after its last reference went, until Python's cycle collector
    ran (``del model; torch.cuda.empty_cache()`` freed nothing; the bench's next mode saw +2.9 GiB). A
    deep copy of the module gets one for the copy."""

    __slots__ = ("fn", "ref")

    def __init__(self, fn, module: nn.Module):
        self.fn, self.ref = fn, weakref.ref(module)

    def __call__(self, *args, **kwargs):
        return self.fn(self.ref(), *args, **kwargs)

    def __deepcopy__(self, memo):
        module = self.ref()
        return _Forward(self.fn, memo.get(id(module), module))


def use_fused_kernels(model: nn.Module) -> dict:
    """Patch the supported modules; returns how many of each were patched."""
    act = str(getattr(model.config, "hidden_act", "")).lower()
    n = {"rmsnorm": 0, "swiglu_mlp": 0, "rope": 0}
    for m in model.modules():
        name = type(m).__name__
        if switches().rope_kernel and name in _ATTENTIONS and _patch_rope(type(m)):
            n["rope"] += 1
        if name in _NORMS and hasattr(m, "variance_epsilon"):
            m.forward = _Forward(_norm_forward, m)
            n["rmsnorm"] += 1
        elif _is_mlp(m) and act == "silu":
            _set_mlp_forward(m, _mlp_forward)
            n["swiglu_mlp"] += 1
    return n


def _is_mlp(m: nn.Module) -> bool:
    """A per-token gated MLP (Llama's ``down(act(gate(x)) * up(x))`` and its kin)."""
    return type(m).__name__.endswith("MLP") and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))


def _set_mlp_forward(m: nn.Module, fn) -> None:
    """Make ``fn(m, x)`` the MLP's forward; for a tiled MLP, the forward it runs per chunk."""
    if "_qlora_mlp_inner" in m.__dict__:
        m._qlora_mlp_inner = fn
    else:
        m.forward = _Forward(fn, m)


def _tiled_mlp_forward(self, x):
    above, chunk = self._qlora_tiling
    return mlp_forward(self, self._qlora_mlp_inner, x, above, chunk)


def use_tiled_mlp(model: nn.Module, above: int = TILE_ABOVE, chunk: int = CHUNK_ELEMENTS) -> int:
    """Route each per-token MLP of ``model`` through the sequence-tiled MLP (qlora.tiled): a call on more
    than ``above`` tokens x intermediate size runs over chunks of about ``chunk`` of them; any other call
    runs the MLP's forward as it was (the fused kernels' if :func:`use_fused_kernels` ran, before or
    after). Calling again changes the thresholds (tests force tiling with small ones). Returns how many
    MLPs were routed."""
    check_tiling(above, chunk)
    n = 0
    for m in model.modules():
        if not (_is_mlp(m) and hasattr(m.up_proj, "out_features") and hasattr(m.down_proj, "out_features")):
            continue  # (tiling reads the intermediate and output sizes from them)
        if "_qlora_mlp_inner" not in m.__dict__:
            current = m.__dict__.get("forward")
            # a plain function, not a bound method: stored on its module, a bound method is a reference cycle
            m._qlora_mlp_inner = current.fn if isinstance(current, _Forward) else type(m).forward
            m.forward = _Forward(_tiled_mlp_forward, m)
        m._qlora_tiling = (above, chunk)
        n += 1
    return n


def tiled_calls(model: nn.Module) -> int:
    """How many MLP calls of ``model`` ran tiled so far (eager calls; for benchmarks and tests)."""
    return sum(getattr(m, "_qlora_tiled_calls", 0) for m in model.modules())
