"""Data parallel with 2 gloo processes on the CPU equals one process at the same global batch,
and a checkpoint written by 2 processes resumes in 1."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from qlora.train import train

from test_train import cfg, losses, setup  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, tmp):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT="29517")
    r = subprocess.run([sys.executable, "-m", "qlora.cli", "train", "--gpus", "2", *args], env=env, cwd=tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_equal_one_with_same_global_batch(setup, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    train(cfg(setup, one, grad_accum=2, dropout=0.0, save_every=3), log=lambda m: None)
    two = tmp_path / "two"
    torchrun(["--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output", str(two),
              "--rank", "4", "--alpha", "8", "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1",
              "--max-steps", "6", "--save-every", "3", "--compute-dtype", "fp32", "--progress", "false",
              "--optim", "adamw", "--warmup-ratio", "0", "--dropout", "0", "--device", "cpu"], tmp_path)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    # same math, different float summation order of the gradient sum: tolerance 1e-4 relative
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    # written by 2 processes, resumed by 1 (grad_accum 2 keeps the global batch)
    shutil.rmtree(two / "checkpoints" / "step-0000006")
    train(cfg(setup, two, grad_accum=2, dropout=0.0, save_every=3, resume=True), log=lambda m: None)
    c = losses(two)
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, c)), (a, c)
