"""The compute dtype this machine runs fast: ``--compute-dtype auto`` resolved from the hardware.

* CUDA of compute capability >= 8.0 (A100, RTX 30xx/40xx, L4, H100) -> bf16;
* CUDA below 8.0 (T4, V100) -> fp16, trained with loss scaling;
* a CPU whose bf16 matmul is at least as fast as its fp32 one (native bf16: AVX512-BF16 or AMX on
  x86) -> bf16;
* any other CPU -> fp32. Without native bf16 instructions torch's CPU bf16 matmul is emulated,
  ~50x slower than fp32 (BENCHMARKS.md: "Compute dtype on CPUs").

The CPU answer is measured, not guessed from a model name: one small matmul per dtype on one core,
timed once per process (~3 ms where bf16 is native, ~150 ms where it is emulated). The CPU's flags are read only
to explain the choice. An explicit dtype always wins; :func:`resolve` then warns where it is slow.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from .config import COMPUTE_DTYPES
from .errors import QLoraError

_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PROBE_N = 256  # probe matmul size: big enough to reach the kernel's speed, small enough to cost ~1 ms
NATIVE = 0.8  # auto takes bf16 where its matmul is at least this fraction of fp32's (native: ~2-3x, emulated: ~1/50)
SLOW = 0.5  # an explicit dtype below this fraction of fp32's matmul speed gets a warning


@dataclass(frozen=True)
class ComputeChoice:
    """A resolved compute dtype (``bf16``/``fp16``/``fp32``), why it was chosen, and a warning for an
    explicit choice that this machine runs slowly (None otherwise)."""
    dtype: str
    reason: str
    warning: str | None = None

    def header(self) -> str:
        return f"compute: {self.dtype} ({self.reason})"


@functools.lru_cache(maxsize=None)
def cpu_matmul_gflops(dtype: str) -> float:
    """GFLOP/s of one core on a PROBE_N-square matmul in ``dtype`` (best of 5 after a warm-up), once per
    process and dtype. One thread: a multi-threaded probe on a busy machine measures the other
    processes (its threads wait for each other), one core measures the kernel."""
    n = PROBE_N
    a = torch.randn(n, n).to(_TORCH[dtype])
    b = torch.randn(n, n).to(_TORCH[dtype])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


def cpu_flags() -> set[str]:
    """The x86 flags that matter for bf16 (avx512_bf16, amx_bf16) found in /proc/cpuinfo (empty
    elsewhere); only used to explain a choice."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    return {f for f in ("avx512_bf16", "amx_bf16") if f in text.split()}


def _cpu_auto() -> ComputeChoice:
    fast, bf = cpu_matmul_gflops("fp32"), cpu_matmul_gflops("bf16")
    facts = (f"bf16 matmul {bf:.0f} vs fp32 {fast:.0f} GFLOP/s a core; "
             f"CPU flags: {', '.join(sorted(cpu_flags())) or 'no avx512_bf16/amx_bf16'}")
    if bf >= NATIVE * fast:
        return ComputeChoice("bf16", f"CPU with native bf16: {facts}")
    return ComputeChoice("fp32", f"CPU without native bf16: {facts}")


def _cpu_explicit(name: str) -> ComputeChoice:
    if name == "fp32":
        return ComputeChoice("fp32", "as asked")
    fast, got = cpu_matmul_gflops("fp32"), cpu_matmul_gflops(name)
    warning = None
    if got < SLOW * fast:
        warning = (f"--compute-dtype {name} on this CPU: its matmuls run {fast / max(got, 1e-9):.0f}x slower than "
                   f"fp32 ({got:.1f} vs {fast:.0f} GFLOP/s a core, no native {name} instructions); "
                   f"--compute-dtype auto picks {_cpu_auto().dtype} here")
    return ComputeChoice(name, "as asked", warning)


def _cuda(name: str, device: torch.device) -> ComputeChoice:
    major, minor = torch.cuda.get_device_capability(device)
    cc = f"compute capability {major}.{minor}"
    if name == "auto":
        if major >= 8:
            return ComputeChoice("bf16", f"CUDA {cc} has bf16")
        return ComputeChoice("fp16", f"CUDA {cc} has no bf16: fp16 with loss scaling")
    if name == "bf16" and major < 8:
        raise QLoraError(f"--compute-dtype bf16: this GPU ({cc}) has no bf16 support; use fp16 (or auto)")
    return ComputeChoice(name, "as asked")


def resolve(name: str, device: str | torch.device) -> ComputeChoice:
    """``name`` (auto/bf16/fp16/fp32) for ``device`` (a torch device or its name)."""
    if name not in COMPUTE_DTYPES:
        raise QLoraError(f"--compute-dtype {name!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda(name, device)
    if device.type != "cpu":
        return ComputeChoice("fp32" if name == "auto" else name, f"{device.type} device" if name == "auto" else "as asked")
    return _cpu_auto() if name == "auto" else _cpu_explicit(name)
