"""Every place qlora reaches into another library's internals (private names of torch, transformers,
Triton; the import system's ``sys.modules``), each behind one small named function.

A new release of those libraries can rename or drop any of these without notice, so they live here
and nowhere else: each says what it touches, why no public API does the job, and the versions it was
checked against (torch 2.13, transformers 5.25; Triton only on a GPU machine, "GPU only").
tests/test_compat.py checks each one against the installed libraries and fails with a message that
names the internal that moved (the GPU-only ones in the GPU suite).

Imports nothing heavy at module level: lean_imports (which runs before torch is imported) uses it.
"""
from __future__ import annotations

import sys

# ---------------------------------------------------------------------------------------------
# transformers


def attention_implementation(config) -> str | None:
    """The attention implementation a model runs (``config._attn_implementation``: the resolved name;
    transformers 5.25 has no public reader of it)."""
    return getattr(config, "_attn_implementation", None)


def set_attention_implementation(config, name: str) -> None:
    """Switch a loaded model's attention to a registered implementation for a while, without
    ``model.set_attn_implementation`` (which checks and re-resolves the whole model on every call:
    too slow to do per micro-batch). Writes ``config._attn_implementation_internal``, which the
    ``_attn_implementation`` property returns (transformers 5.25)."""
    config._attn_implementation_internal = name


def sdpa_attention():
    """transformers' own SDPA attention function (``transformers.integrations.sdpa_attention.
    sdpa_attention_forward``, transformers 5.25: what the "sdpa" attention implementation runs; its grouped
    query heads, scaling and ``is_causal`` handling), reached by its module path: the public
    ``AttentionInterface()["sdpa"]`` may hold a wrapper (qlora.shared_prefix.install puts one there)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def checkpoint_function(block):
    """The function a transformers ``GradientCheckpointingLayer`` runs its forward through once
    gradient checkpointing is on (``block._gradient_checkpointing_func``, transformers 5.25; None
    when checkpointing is off). Wrapping it is the only way to act around each block's recomputation
    (activation offload)."""
    return getattr(block, "_gradient_checkpointing_func", None)


def set_checkpoint_function(block, fn) -> None:
    """Replace :func:`checkpoint_function` of ``block`` (transformers 5.25)."""
    block._gradient_checkpointing_func = fn


def modeling_function(cls, name: str):
    """The module-level function ``name`` of the modeling module that defines ``cls`` (e.g.
    ``apply_rotary_pos_emb`` of modeling_llama, which LlamaAttention.forward calls by its global
    name; transformers 5.25), or None."""
    fn = getattr(sys.modules.get(cls.__module__), name, None)
    return fn if callable(fn) else None


def set_modeling_function(cls, name: str, fn) -> None:
    """Replace the module-level function ``name`` of ``cls``'s modeling module, so every instance of
    every class of that module calls ``fn`` (transformers 5.25; there is no per-instance hook for RoPE)."""
    setattr(sys.modules[cls.__module__], name, fn)


# ---------------------------------------------------------------------------------------------
# torch


def set_module_tensor(module, attr: str, value) -> bool:
    """Put ``value`` in place of ``module``'s parameter (frozen) or buffer ``attr`` without the checks
    of ``setattr`` (which refuses a tensor where a Parameter is registered), through
    ``module._parameters`` / ``module._buffers`` (torch 2.13). False when ``attr`` is neither."""
    import torch
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        return False
    return True


def has_fused_adamw() -> bool:
    """torch's fused AdamW op (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs;
    torch 2.13) is there."""
    import torch
    return hasattr(torch, "_fused_adamw_")


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, weight_decay, eps) -> None:
    """One AdamW update of each tensor in place by ``torch._fused_adamw_`` (torch 2.13): one vectorized
    pass per tensor on the CPU. ``steps``: the step counts, already advanced (float tensors)."""
    import torch
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


# the multi-tensor ops the optimizers call (torch.optim's own foreach path runs the same ones; torch 2.13)
FOREACH_OPS = ("_foreach_add_", "_foreach_mul_", "_foreach_lerp_", "_foreach_addcmul_", "_foreach_sqrt",
               "_foreach_div_", "_foreach_addcdiv_", "_foreach_copy_")


def nvrtc_available() -> bool:
    """torch can compile CUDA C++ at run time (``torch.cuda._compile_kernel``, NVRTC; torch 2.13)."""
    import torch
    return hasattr(torch.cuda, "_compile_kernel")


def compile_cuda_kernel(source: str, name: str):
    """The kernel ``name`` of CUDA C++ ``source`` compiled with NVRTC (``torch.cuda._compile_kernel``,
    torch 2.13; the only way to build a kernel without nvcc). Raises RuntimeError/OSError/AttributeError
    where NVRTC or the driver refuses."""
    import torch
    return torch.cuda._compile_kernel(source, name)


def kernel_shared_memory(kernel) -> int:
    """The dynamic shared memory a compiled kernel is configured for (``kernel._max_shared_mem_bytes``,
    set by its ``set_shared_memory_config``; torch 2.13); 0 before any."""
    return getattr(kernel, "_max_shared_mem_bytes", 0)


def raw_stream_getter():
    """``device index -> the current CUDA stream's handle (an int)``: torch's raw getter
    (``torch._C._cuda_getCurrentRawStream``, what Triton's launcher uses, ~0.3 us; torch 2.13, CUDA
    builds) where it exists, else through a Stream object (~3 us)."""
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda index: torch.cuda.current_stream(index).cuda_stream


def register_host_memory(t) -> bool:
    """Page-lock the memory of the CPU tensor ``t`` in place for fast, asynchronous copies to the GPU
    (``torch.cuda.cudart().cudaHostRegister``, torch 2.13, CUDA builds; GPU only). ``tensor.pin_memory()``
    copies into PyTorch's pinned allocator, which rounds every block up to a power of two (a 440 MB block
    of a 70B model takes 512 MB); registering keeps the exact size. False where it fails (then the caller
    pins a copy). Undo with :func:`unregister_host_memory` before the memory is freed."""
    import torch
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    except (AttributeError, RuntimeError, TypeError):
        return False
    return int(getattr(err, "value", err)) == 0


def unregister_host_memory(ptr: int) -> None:
    """Undo :func:`register_host_memory` for the memory at ``ptr`` (``cudaHostUnregister``; GPU only)."""
    import torch
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # (a CUDA context going away: nothing left to unregister)
        pass


def ddp_ignore(module, names: list[str]) -> None:
    """Have DistributedDataParallel leave the named parameters and buffers of ``module`` alone (no
    broadcast at init, no gradient buckets): ``DDP._set_params_and_buffers_to_ignore_for_model``
    (torch 2.13; no public argument does this; the frozen 4-bit base would otherwise be synced)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    DDP._set_params_and_buffers_to_ignore_for_model(module, names)


def local_tensor(t):
    """The local shard of a DTensor as the very tensor it stores (``DTensor._local_tensor``, torch 2.13;
    the public ``to_local()`` is an autograd op that returns a view, whose updates and ``.grad`` do
    not reach the parameter), or ``t`` itself when it is no DTensor."""
    from torch.distributed.tensor import DTensor
    return t._local_tensor if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------
# the import system


def hide_packages(names) -> list[str]:
    """Make later ``import NAME`` fail and ``importlib.util.find_spec(NAME)`` report NAME absent, by
    ``sys.modules[NAME] = None`` (documented Python behaviour; transformers 5.25's availability checks
    go through find_spec, so it then treats the package as not installed). Names already imported are
    left alone; returns those hidden."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    return hidden


# ---------------------------------------------------------------------------------------------
# Triton (GPU only)


def triton_first_use() -> None:
    """Pay Triton's one-time costs ahead: hash its compiler for the cache key
    (``triton.runtime.cache.triton_key``), build its CUDA helper module (``triton.runtime.driver.active``)
    and ask ptxas for its version (``triton.compiler.compiler.make_backend(...).hash()``). Internal
    modules of Triton as installed with torch 2.13 on the GPU machines (GPU only)."""
    import triton
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key
    triton_key()  # lru-cached: hashes libtriton (~0.3 s warm, more from a cold disk)
    driver = triton.runtime.driver.active  # builds its cuda_utils module on first use (gcc)
    make_backend(driver.get_current_target()).hash()  # runs ptxas --version
