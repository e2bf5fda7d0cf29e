"""--compute-dtype auto: the dtype chosen for each kind of hardware (CPU speeds and CUDA capabilities
mocked, plus a real run on an emulated AVX2-only CPU), explicit choices winning, and the commands
recording and printing the choice."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from qlora import hardware
from qlora.errors import QLoraError
from qlora.hardware import resolve


@pytest.fixture
def cpu_speeds(monkeypatch):
    """Pretend this CPU's one-core matmul speeds (GFLOP/s) are the given ones."""
    def set_speeds(**gflops):
        monkeypatch.setattr(hardware, "cpu_matmul_gflops", lambda dt: gflops[dt])
    return set_speeds


def test_cpu_with_native_bf16_gets_bf16(cpu_speeds):
    cpu_speeds(fp32=80.0, bf16=200.0)
    c = resolve("auto", "cpu")
    assert c.dtype == "bf16" and "native bf16" in c.reason and c.warning is None
    assert c.header().startswith("compute: bf16 (CPU with native bf16")


def test_cpu_without_native_bf16_gets_fp32(cpu_speeds):
    cpu_speeds(fp32=54.0, bf16=1.0)  # the AVX2-only EPYC of issue 25
    c = resolve("auto", "cpu")
    assert c.dtype == "fp32" and "without native bf16" in c.reason and "1 vs fp32 54" in c.reason


def test_explicit_bf16_on_a_slow_cpu_runs_with_a_warning(cpu_speeds):
    cpu_speeds(fp32=54.0, bf16=1.0)
    c = resolve("bf16", "cpu")
    assert c.dtype == "bf16" and "54x slower" in c.warning and "auto picks fp32" in c.warning
    cpu_speeds(fp32=80.0, bf16=200.0)
    assert resolve("bf16", "cpu").warning is None
    assert resolve("fp32", "cpu") == hardware.ComputeChoice("fp32", "as asked")


def test_unknown_name_is_refused():
    with pytest.raises(QLoraError, match="choose one of auto, bf16, fp16, fp32"):
        resolve("float8", "cpu")


@pytest.mark.parametrize("cc,want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                     ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_cuda_choice_follows_compute_capability(monkeypatch, cc, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cc)
    c = resolve("auto", "cuda")
    assert c.dtype == want and f"compute capability {cc[0]}.{cc[1]}" in c.reason
    if want == "fp16":
        assert "loss scaling" in c.reason
        with pytest.raises(QLoraError, match="no bf16 support"):
            resolve("bf16", "cuda")
    assert resolve("fp32", "cuda").dtype == "fp32"


def test_emulated_avx2_cpu_resolves_to_fp32():
    """A real measurement: torch's AVX2 kernels and oneDNN capped at AVX2 behave as a CPU without native
    bf16 (bf16 matmul emulated), so auto must pick fp32 there, whatever this machine is."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = "from qlora.hardware import resolve; print(resolve('auto', 'cpu').dtype)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32", out.stderr


def test_probe_measures_the_dtype_asked_for():
    hardware.cpu_matmul_gflops.cache_clear()
    assert hardware.cpu_matmul_gflops("fp32") > 0
    assert torch.get_num_threads() >= 1  # the probe restores the thread count it lowered


def test_train_records_and_prints_the_resolved_dtype(tmp_path, cpu_speeds):
    from qlora.train import TrainConfig, train
    from tiny import make_tiny_model
    cpu_speeds(fp32=54.0, bf16=1.0)
    make_tiny_model(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "what is the capital", "output": "paris"}) + "\n"
                            for _ in range(8)))
    lines = []
    train(TrainConfig(data=str(data), model=str(tmp_path / "m"), output=str(tmp_path / "o"), max_steps=1,
                      batch_size=4, grad_accum=1, progress=False), log=lines.append)
    assert any(line.startswith("compute: fp32 (CPU without native bf16") for line in lines)
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["compute_dtype"] == "fp32"
    qcfg = json.loads((tmp_path / "o" / "adapter" / "qlora_config.json").read_text())
    assert qcfg["train"]["compute_dtype"] == "fp32" and qcfg["quant"]["compute_dtype"] == "fp32"


def test_every_model_command_takes_compute_dtype_with_the_old_spelling():
    from qlora.cli import build_parser
    p = build_parser()
    for cmd in (["train", "--data", "x"], ["generate", "--prompt", "x"], ["eval", "--data", "x"], ["demo"]):
        a = p.parse_args(cmd + ["--compute-dtype", "fp32"])
        b = p.parse_args(cmd)
        key = "dtype" if cmd[0] in ("generate", "eval") else "compute_dtype"
        assert getattr(a, key) == "fp32"
        assert getattr(b, key) in ("auto", None)  # train's flags default to None (the dataclass says auto)
        if cmd[0] != "train":
            assert getattr(p.parse_args(cmd + ["--dtype", "fp16"]), key) == "fp16"
    from qlora.train import TrainConfig
    assert TrainConfig().compute_dtype == "auto"
