"""GPUs other than the H100/H200 the kernels were tuned on: below compute capability 8.0 every kernel family
falls back to its torch reference (and the run header says so), with the results of the kernel path; the
Triton kernels compile for sm_80, sm_86 and sm_89 (A100, RTX 30xx, RTX 40xx / L4) without such a GPU."""
import contextlib
import json

import pytest
import torch

from qlora import kernels
from helpers import losses
from tiny import make_tiny_model


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend the CUDA device has compute capability ``cc`` (with CUDA and Triton present)."""
    def set_cc(cc):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cc)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(kernels, "_triton_importable", lambda: True)
        kernels._capable.cache_clear()
    yield set_cc
    kernels._capable.cache_clear()


@pytest.mark.parametrize("cc,triton", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                       ((8, 9), True), ((9, 0), True)])
def test_kernels_are_gated_by_compute_capability(gpu_of, switch, cc, triton):
    gpu_of(cc)
    switch("QLORA_KERNELS", None)
    assert kernels.available("cuda") is triton
    assert kernels.available("cpu") is False
    line = kernels.describe("cuda")
    if triton:
        assert line.startswith(f"kernels: Triton (compute capability {cc[0]}.{cc[1]})")
        assert ("CUDA C++" in line) is (cc >= (9, 0))  # the one-row GEMV needs Hopper's bulk copies
    else:
        assert line == f"kernels: torch references (compute capability {cc[0]}.{cc[1]} < 8.0)"
    switch("QLORA_KERNELS", "0")
    assert not kernels.available("cuda") and "QLORA_KERNELS=0" in kernels.describe("cuda")


def test_cpu_runs_say_torch():
    assert kernels.describe("cpu") == "kernels: torch (CPU)"


# -- on a GPU ----------------------------------------------------------------------------------


def _train(tmp_path, name):
    from qlora.train import TrainConfig, train
    make_tiny_model(tmp_path / "m", hidden=128, tied=False)
    data = tmp_path / "d.jsonl"
    if not data.exists():
        rows = [{"instruction": f"what is the price of the widget {i}", "output": f"the price is {i % 10} dollars"}
                for i in range(32)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    s = train(TrainConfig(data=str(data), model=str(tmp_path / "m"), output=str(tmp_path / name), max_steps=4,
                          batch_size=4, grad_accum=2, dropout=0.0, rank=8, lr=1e-3, compute_dtype="fp16",
                          progress=False, seed=1), log=lines.append)
    step_losses = losses(tmp_path / name)  # step rows (fit warnings are rows of their own)
    return s, step_losses, lines


@contextlib.contextmanager
def _no_kernel_launches():
    """Any Triton launch or CUDA C++ GEMV inside the block fails the test."""
    import triton.runtime.jit as jit

    from qlora.kernels import gemv_cuda

    def refuse(*a, **k):
        raise AssertionError("a kernel ran on the fallback path")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jit.JITFunction, "run", refuse)
        mp.setattr(gemv_cuda, "prepare", refuse)
        yield


@pytest.mark.gpu
def test_fallback_paths_train_like_the_kernels(tmp_path, monkeypatch):
    """The same fp16 run (what auto picks on a T4) with the kernels, and as on a T4 (compute capability 7.5: every
    torch reference), gives the same losses and adapter within 16-bit rounding; the fallback run launches no
    kernel and says why."""
    from safetensors.torch import load_file
    s_k, loss_k, lines_k = _train(tmp_path, "kernels")
    assert any(line.startswith("kernels: Triton") for line in lines_k)
    monkeypatch.setattr(kernels, "_capable", lambda index: False)
    real = torch.cuda.get_device_capability
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    with _no_kernel_launches():
        s_f, loss_f, lines_f = _train(tmp_path, "fallback")
    monkeypatch.setattr(torch.cuda, "get_device_capability", real)
    assert "kernels: torch references (compute capability 7.5 < 8.0)" in lines_f
    assert len(loss_f) == len(loss_k) == 4
    for a, b in zip(loss_f, loss_k):
        assert abs(a - b) <= 2e-2 * abs(b), (loss_f, loss_k)
    ta = load_file(tmp_path / "kernels" / "adapter" / "adapter_model.safetensors")
    tb = load_file(tmp_path / "fallback" / "adapter" / "adapter_model.safetensors")
    for k in ta:
        cos = torch.nn.functional.cosine_similarity(ta[k].flatten().float(), tb[k].flatten().float(), dim=0)
        assert cos > 0.99, (k, cos)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8])
def test_fallback_4bit_matmul_matches_the_kernels(monkeypatch, rows):
    """The decode path (one row: GEMV kernels; 8 rows: the small-batch GEMV) against its fallback."""
    from qlora.linear import QLoRALinear
    torch.manual_seed(0)
    lin = QLoRALinear.from_weight(torch.randn(1024, 512) * 0.05, r=8, compute_dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        lin.lora_B.normal_(0, 0.02)
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        want = lin(x)
        monkeypatch.setattr(kernels, "_capable", lambda index: False)
        with _no_kernel_launches():
            got = lin(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9)])
def test_triton_kernels_compile_for_consumer_targets(tmp_path, monkeypatch, cc):
    """Every Triton kernel a training step uses (kernels.warm.compile_ahead's list, LoRA dropout included)
    compiles to PTX for ``sm_{cc}`` on this GPU: Triton is told the target and compiles without launching."""
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget

    from qlora.kernels import warm
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    ours = [f for mod in _kernel_modules() for f in vars(mod).values() if isinstance(f, jit.JITFunction)]
    for f in ours:
        f.device_caches.clear()
    run = jit.JITFunction.run
    compiled = []

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel
    driver = triton.runtime.driver.active
    monkeypatch.setattr(driver, "get_current_target", lambda: GPUTarget("cuda", cc[0] * 10 + cc[1], 32))
    monkeypatch.setattr(jit.JITFunction, "run", compile_only)
    try:
        done = warm.compile_ahead("cuda", hidden=256, intermediate=512, head_dim=64, vocab=512, tokens=64, seq=64,
                                  rank=8, dropout=0.1)
    finally:
        for f in ours:  # the next test compiles for this GPU again
            f.device_caches.clear()
    assert set(done) == set(warm.KERNELS), done
    names = {n for n, _ in compiled}
    assert len(names) >= len(warm.KERNELS)
    for name, k in compiled:
        assert f".target sm_{cc[0]}{cc[1]}" in k.asm["ptx"], name


def _kernel_modules():
    from qlora.kernels import ce, dequant, dropout, gemv, lora_dropout, lora_row, norm_act
    return (ce, dequant, dropout, gemv, lora_dropout, lora_row, norm_act)
