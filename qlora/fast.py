"""Route a transformers model's RMSNorm and SwiGLU MLP through the fused Triton kernels of
:mod:`qlora.kernels` (forward and backward), by replacing those modules' ``forward`` on the
instance — no subclassing. The kernels compute what the modules compute (RMSNorm in fp32, cast
back, times the weight; ``down(silu(gate(x)) * up(x))``), and each call falls back to the torch
reference when the kernels are unavailable (CPU, no Triton, ``QLORA_KERNELS=0``)."""
from __future__ import annotations

import types

import torch.nn as nn

# norms of the form weight * normalize(x) (Gemma's 1 + weight differs: left alone)
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


def _norm_forward(self, hidden_states):
    from . import kernels
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    from . import kernels
    return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


def use_fused_kernels(model: nn.Module) -> dict:
    """Patch the supported modules; returns how many of each were patched."""
    act = str(getattr(model.config, "hidden_act", "")).lower()
    n = {"rmsnorm": 0, "swiglu_mlp": 0}
    for m in model.modules():
        name = type(m).__name__
        if name in _NORMS and hasattr(m, "variance_epsilon"):
            m.forward = types.MethodType(_norm_forward, m)
            n["rmsnorm"] += 1
        elif name.endswith("MLP") and act == "silu" and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")):
            m.forward = types.MethodType(_mlp_forward, m)
            n["swiglu_mlp"] += 1
    return n
