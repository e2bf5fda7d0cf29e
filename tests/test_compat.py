"""qlora.compat against the installed torch / transformers (and Triton on a GPU machine): each
internal qlora reaches into is still there and still does what we rely on. A failure here means a
new release moved it: the message names the internal, and qlora/compat.py says where it is used."""
import importlib.util
import inspect
import subprocess
import sys

import pytest
import torch
import transformers

from qlora import compat


def moved(what: str) -> str:
    return (f"{what} changed in torch {torch.__version__} / transformers {transformers.__version__}: "
            f"qlora/compat.py relies on it (checked against torch 2.13, transformers 5.25)")


def tiny_llama(**kw):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, **kw)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


# ---------------------------------------------------------------------------------- transformers


def test_attention_implementation_switch_reaches_the_attention_call():
    m = tiny_llama()
    assert compat.attention_implementation(m.config) == "sdpa", moved("config._attn_implementation")
    seen = []

    def spy(module, q, k, v, mask, **kw):  # a registered implementation, reached through the config field
        seen.append(module.layer_idx)
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(module, q, k, v, mask, **kw)

    transformers.AttentionInterface.register("qlora_compat_spy", spy)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = m(ids).logits
        compat.set_attention_implementation(m.config, "qlora_compat_spy")
        try:
            assert compat.attention_implementation(m.config) == "qlora_compat_spy", \
                moved("config._attn_implementation_internal")
            got = m(ids).logits
        finally:
            compat.set_attention_implementation(m.config, "sdpa")
    assert seen == [0, 1], moved("config._attn_implementation_internal (the attention no longer reads it)")
    torch.testing.assert_close(got, ref)


def test_forward_keywords_reach_the_attention_function_and_its_recompute():
    """qlora.shared_prefix's pair attention relies on these: transformers' own sdpa function is at its module
    path; an extra keyword of the model's forward reaches every attention call, also the recompute of a
    checkpointed block in backward; an all-ones 2D mask makes the sdpa mask code build no mask."""
    fn = compat.sdpa_attention()
    assert {"is_causal", "scaling"} <= set(inspect.signature(fn).parameters), \
        moved("transformers.integrations.sdpa_attention.sdpa_attention_forward")
    m, seen = tiny_llama(), []

    def spy(module, q, k, v, mask, qlora_probe=None, **kw):
        seen.append((module.layer_idx, qlora_probe, mask, torch.is_grad_enabled()))
        return fn(module, q, k, v, mask, **kw)

    from transformers.masking_utils import AttentionMaskInterface
    transformers.AttentionInterface.register("qlora_compat_kwargs", spy)
    AttentionMaskInterface.register("qlora_compat_kwargs", AttentionMaskInterface()["sdpa"])  # sdpa's masks
    compat.set_attention_implementation(m.config, "qlora_compat_kwargs")
    try:
        m.train()
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        out = m(ids, position_ids=torch.tensor([[0, 1, 2, 1, 2]]), attention_mask=torch.ones_like(ids),
                qlora_probe="p", use_cache=False).logits
        forward = len(seen)
        out.sum().backward()
    finally:
        compat.set_attention_implementation(m.config, "sdpa")
    assert [s[:2] for s in seen[:forward]] == [(0, "p"), (1, "p")], moved("forward keywords passed to the attention")
    assert sorted(s[:2] for s in seen[forward:]) == [(0, "p"), (1, "p")], \
        moved("forward keywords replayed by the checkpointed recompute")
    assert all(s[2] is None for s in seen), moved("sdpa_mask skipping an all-ones 2D mask")


def test_checkpoint_function_wraps_each_blocks_recomputation():
    m = tiny_llama()
    m.train()
    assert all(compat.checkpoint_function(b) is None for b in m.model.layers)
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for block in m.model.layers:
        inner = compat.checkpoint_function(block)
        assert callable(inner), moved("GradientCheckpointingLayer._gradient_checkpointing_func")

        def wrapped(fn, *a, _inner=inner, **k):
            calls.append(1)
            return _inner(fn, *a, **k)
        compat.set_checkpoint_function(block, wrapped)
    m(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert len(calls) == len(m.model.layers), moved("GradientCheckpointingLayer._gradient_checkpointing_func "
                                                    "(the block no longer calls it)")


def test_modeling_function_is_the_rope_the_attention_calls():
    from transformers.models.llama import modeling_llama
    cls = modeling_llama.LlamaAttention
    fn = compat.modeling_function(cls, "apply_rotary_pos_emb")
    assert fn is modeling_llama.apply_rotary_pos_emb, moved("modeling_llama.apply_rotary_pos_emb")
    assert "apply_rotary_pos_emb" in inspect.unwrap(cls.forward).__code__.co_names, \
        moved("LlamaAttention.forward calling apply_rotary_pos_emb by its module-level name")
    m, calls = tiny_llama(), []

    def counting(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    compat.set_modeling_function(cls, "apply_rotary_pos_emb", counting)
    try:
        with torch.no_grad():
            m(torch.tensor([[1, 2, 3]]))
    finally:
        compat.set_modeling_function(cls, "apply_rotary_pos_emb", fn)
    assert len(calls) == 2, moved("LlamaAttention.forward's use of apply_rotary_pos_emb")


# ---------------------------------------------------------------------------------------- torch


def test_set_module_tensor_replaces_parameters_and_buffers():
    lin, bn = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)
    new = torch.ones(2, 3)
    assert compat.set_module_tensor(lin, "weight", new)
    assert isinstance(lin.weight, torch.nn.Parameter) and not lin.weight.requires_grad
    assert torch.equal(lin.weight, new) and "weight" in dict(lin.named_parameters())
    assert compat.set_module_tensor(bn, "running_mean", torch.full((2,), 7.0))
    assert torch.equal(bn.state_dict()["running_mean"], torch.full((2,), 7.0)), moved("nn.Module._buffers")
    assert not compat.set_module_tensor(lin, "nothing", new)


def test_fused_adamw_matches_torch_adamw():
    assert compat.has_fused_adamw(), moved("torch._fused_adamw_")
    torch.manual_seed(0)
    p = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn_like(t) for t in p]
    ref = [t.clone().requires_grad_() for t in p]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    ms, vs = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
    steps = [torch.zeros(()) for _ in p]
    for _ in range(3):
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        torch._foreach_add_(steps, 1.0)
        compat.fused_adamw_(p, grads, ms, vs, steps, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, eps=1e-6)
    for got, want in zip(p, ref):
        torch.testing.assert_close(got, want.detach(), msg=lambda m: moved("torch._fused_adamw_") + "\n" + m)


def test_foreach_ops_exist():
    missing = [op for op in compat.FOREACH_OPS if not hasattr(torch, op)]
    assert not missing, moved(f"torch.{', torch.'.join(missing)}")


def test_nvrtc_compile_entry_point_exists():
    assert compat.nvrtc_available(), moved("torch.cuda._compile_kernel")
    params = inspect.signature(torch.cuda._compile_kernel).parameters
    assert list(params)[:2] == ["kernel_source", "kernel_name"], moved("torch.cuda._compile_kernel's arguments")


def test_ddp_ignore_marks_the_named_tensors():
    lin = torch.nn.Linear(2, 2)
    compat.ddp_ignore(lin, ["bias"])
    assert getattr(lin, "_ddp_params_and_buffers_to_ignore", None) == ["bias"], \
        moved("DistributedDataParallel._set_params_and_buffers_to_ignore_for_model")


def test_local_tensor_is_the_dtensors_own_storage(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    plain = torch.ones(3)
    assert compat.local_tensor(plain) is plain
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        d = DTensor.from_local(torch.zeros(4), mesh, [Replicate()])
        loc = compat.local_tensor(d)
        assert isinstance(loc, torch.Tensor) and not isinstance(loc, DTensor), moved("DTensor._local_tensor")
        loc.add_(2.0)  # an in-place update of the local tensor is the DTensor's value
        assert torch.equal(d.full_tensor(), torch.full((4,), 2.0)), moved("DTensor._local_tensor")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_raw_stream_getter_is_the_current_stream():
    assert hasattr(torch._C, "_cuda_getCurrentRawStream"), moved("torch._C._cuda_getCurrentRawStream")
    get = compat.raw_stream_getter()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert get(torch.cuda.current_device()) == s.cuda_stream, moved("torch._C._cuda_getCurrentRawStream")


@pytest.mark.gpu
def test_host_memory_is_page_locked_in_place():
    """qlora.stream's host buffers: cudaHostRegister through torch.cuda.cudart() pins a CPU tensor's own memory
    (torch then reports it pinned and copies it asynchronously), and unregistering undoes it."""
    t = torch.full((1 << 20,), 7, dtype=torch.uint8)
    assert compat.register_host_memory(t), moved("torch.cuda.cudart().cudaHostRegister")
    try:
        assert t.is_pinned(), moved("cudaHostRegister (torch does not see the memory as pinned)")
        d = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
        d.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        assert bool(d.eq(7).all())
    finally:
        compat.unregister_host_memory(t.data_ptr())
    assert not t.is_pinned(), moved("torch.cuda.cudart().cudaHostUnregister")


@pytest.mark.gpu
def test_compiled_kernel_runs_and_reports_shared_memory():
    kern = compat.compile_cuda_kernel('extern "C" __global__ void qlora_compat(float* x) { x[0] = 3.0f; }',
                                      "qlora_compat")
    x = torch.zeros(1, device="cuda")
    kern(grid=(1, 1, 1), block=(1, 1, 1), args=[x])
    assert x.item() == 3.0, moved("torch.cuda._compile_kernel")
    kern.set_shared_memory_config(64 * 1024)
    assert compat.kernel_shared_memory(kern) == 64 * 1024, moved("the compiled kernel's _max_shared_mem_bytes")


# ------------------------------------------------------------------------------ the import system


def test_hidden_package_is_unavailable_to_transformers():
    probe = ("import importlib.util, sys\nfrom qlora import compat\n"
             "assert compat.hide_packages(['sklearn', 'sys']) == ['sklearn']\n"
             "assert importlib.util.find_spec('sklearn') is None\n"
             "from transformers.utils import import_utils\n"
             "print(import_utils.is_sklearn_available())\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", moved("transformers' availability check (no longer through find_spec)")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_triton_first_use_internals():
    compat.triton_first_use()  # triton.runtime.cache.triton_key, runtime.driver.active, compiler.make_backend
