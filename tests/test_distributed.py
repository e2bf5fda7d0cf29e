"""Data parallel with 2 gloo processes on the CPU equals one process at the same global batch,
and a checkpoint written by 2 processes resumes in 1."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from qlora.train import train

from helpers import cfg, losses

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, tmp, extra_env=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT="29517", **(extra_env or {}))
    r = subprocess.run([sys.executable, "-m", "qlora.cli", "train", "--gpus", "2", *args], env=env, cwd=tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_equal_one_with_same_global_batch(setup, tmp_path):
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


TINY_ARGS = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--batch-size", "4", "--max-steps", "6",
             "--save-every", "3", "--progress", "false", "--warmup-ratio", "0", "--dropout", "0"]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A 3-block model with its own LM head (untied), so FSDP shards embedding and head apart."""
    from tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("untied") / "model", tied=False, layers=3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp_two_processes_equal_one_and_resume_across_modes(setup, untied, tmp_path, tied):
    """FSDP2 over 2 gloo processes (4-bit base, LoRA and AdamW state sharded) computes the same losses
    and evaluation as 1 process with the same global batch; its checkpoint resumes in 1 process,
    and a 1-process checkpoint resumes under FSDP with 2."""
    model = str(setup / "model") if tied else str(untied)
    common = ["--data", str(setup / "data.jsonl"), "--model", model, *TINY_ARGS, "--compute-dtype", "fp32",
              "--optim", "paged_adamw", "--val-split", "0.2", "--eval-every", "3", "--device", "cpu"]
    one = tmp_path / "one"
    train(cfg(setup, one, model=model, grad_accum=2, dropout=0.0, optim="paged_adamw", val_split=0.2,
              eval_every=3), log=lambda m: None)
    two = tmp_path / "two"
    r = torchrun([*common, "--grad-accum", "1", "--output", str(two), "--parallel", "fsdp"], tmp_path)
    # the model really is sharded: each process holds about half of it
    line = next(x for x in r.stderr.splitlines() if x.startswith("fsdp: this process holds"))
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    w = line.split()
    here, whole = (float(w[i]) * units[w[i + 1]] for i in (4, 9))
    assert 0.4 * whole < here < 0.6 * whole, line
    rows = lambda out: [(r.get("loss"), r.get("eval_loss")) for r in  # noqa: E731
                        map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    a, b = rows(one), rows(two)
    assert len(a) == len(b) and sum(x[1] is not None for x in a) == 2
    close = lambda x, y: x is None and y is None or abs(x - y) <= 1e-4 * max(1.0, abs(x))  # noqa: E731
    assert all(close(x[0], y[0]) and close(x[1], y[1]) for x, y in zip(a, b)), (a, b)
    # the final adapters (gathered from the shards) match
    from safetensors.torch import load_file
    fa, fb = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (one, two))
    assert fa.keys() == fb.keys() and all((fa[k] - fb[k]).abs().max() < 1e-4 for k in fa)
    # FSDP x2 -> 1 process
    shutil.rmtree(two / "checkpoints" / "step-0000006")
    train(cfg(setup, two, model=model, grad_accum=2, dropout=0.0, optim="paged_adamw", val_split=0.2,
              eval_every=3, resume=True), log=lambda m: None)
    assert all(close(x[0], y[0]) for x, y in zip(a, rows(two))), (a, rows(two))
    # 1 process -> FSDP x2
    shutil.rmtree(one / "checkpoints" / "step-0000006")
    torchrun([*common, "--grad-accum", "1", "--output", str(one), "--parallel", "fsdp", "--resume"], tmp_path)
    assert all(close(x[0], y[0]) for x, y in zip(a, rows(one))), (a, rows(one))


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_fsdp_with_tiled_mlp_equals_one_process_untiled(setup, tmp_path, checkpointing):
    """The sequence-tiled MLP under FSDP2 (QLORA_TILE_ALL: every MLP call tiled, 16 tokens a chunk): its
    backward runs the MLP again, reading the block's 4-bit weights and norms from the module, which FSDP
    resharded after forward and gathers again when the block's backward starts (before the tiled node's).
    Losses and final adapters equal 1 untiled process's at the same global batch."""
    one = tmp_path / "one"
    train(cfg(setup, one, grad_accum=2, dropout=0.0, grad_checkpointing=checkpointing), log=lambda m: None)
    two = tmp_path / "two"
    r = torchrun(["--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), *TINY_ARGS,
                  "--grad-checkpointing", str(checkpointing).lower(), "--compute-dtype", "fp32", "--optim", "adamw",
                  "--device", "cpu", "--grad-accum", "1", "--output", str(two), "--parallel", "fsdp"], tmp_path,
                 {"QLORA_TILE_ALL": "1"})
    assert "every MLP call runs tiled" in r.stderr
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    from safetensors.torch import load_file
    fa, fb = (load_file(str(o / "adapter" / "adapter_model.safetensors")) for o in (one, two))
    assert fa.keys() == fb.keys() and all((fa[k] - fb[k]).abs().max() < 1e-4 for k in fa)


def test_two_processes_streaming_their_weights_equal_one_that_does_not(setup, tmp_path):
    """--offload-weights true under data parallel: each process streams its own copy of the blocks (on the CPU
    between CPU buffers, QLORA_STREAM_CPU), and the two together give one unstreamed process's losses."""
    kw = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--batch-size", "4", "--max-steps", "4", "--save-every", "0",
          "--compute-dtype", "fp32", "--progress", "false", "--optim", "adamw", "--warmup-ratio", "0", "--dropout", "0",
          "--device", "cpu", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model")]
    one = tmp_path / "one"
    train(cfg(setup, one, grad_accum=2, dropout=0.0, max_steps=4, save_every=0), log=lambda m: None)
    two = tmp_path / "two"
    r = torchrun(kw + ["--output", str(two), "--grad-accum", "1", "--offload-weights", "true"], tmp_path,
                 {"QLORA_STREAM_CPU": "1"})
    assert "weights: streamed from CPU memory" in r.stdout + r.stderr
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


def test_fsdp_refuses_what_it_cannot_shard(setup, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora.cli", "train", "--gpus", "2", "--data", str(setup / "data.jsonl"),
                        "--model", str(setup / "model"), "--output", str(tmp_path / "x"), "--device", "cpu",
                        "--parallel", "fsdp", "--optim", "paged_adamw8bit", "--progress", "false"],
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_PORT="29518"),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--parallel fsdp does not support --optim paged_adamw8bit" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not (__import__("torch").cuda.is_available() and __import__("torch").cuda.device_count() >= 2),
                    reason="needs 2 GPUs")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_equal_one(setup, tmp_path, mode):
    """NCCL on 2 GPUs, bf16 compute and the Triton kernels: same losses as 1 GPU at the same global batch."""
    common = ["--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), *TINY_ARGS,
              "--optim", "paged_adamw", "--device", "cuda"]
    one = tmp_path / "one"
    train(cfg(setup, one, grad_accum=2, dropout=0.0, optim="paged_adamw", compute_dtype="bf16", device="cuda"),
          log=lambda m: None)
    two = tmp_path / "two"
    torchrun([*common, "--grad-accum", "1", "--output", str(two), "--parallel", mode], tmp_path)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 2e-3 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


AGREE = """
import json, torch
from qlora import budget
from qlora.distributed import Dist
from qlora.plan import shape_config
from qlora.train import TrainConfig
d = Dist.from_env("cpu")
budget.host_available = lambda: (12 + 6 * d.rank) * 2**30  # each process sees different free memory
cfg = TrainConfig(data="x", model="shape:8b", max_length=2048, batch_size=2, rank=16, dropout=0.0, memory_budget="auto")
alone = budget.for_train(cfg, torch.device("cpu"), shape_config("8b"))
p = budget.for_train(cfg, torch.device("cpu"), shape_config("8b"), agree=d.min)
row = dict(rank=d.rank, alone=alone.budget, alone_keep=alone.keep, budget=p.budget, keep=p.keep, gemms=p.gemms,
           offload=p.offload, least=d.min(10 + d.rank))
open(f"rank{d.rank}.json", "w").write(json.dumps(row))
d.close()
"""


def test_processes_agree_on_the_memory_budget_policy(tmp_path):
    """--memory-budget auto under several processes: each sees its own free memory, and they would choose different
    policies from it; Dist.min makes them choose from the smallest, so every process keeps, offloads and streams
    the same blocks."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29518", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert rows[0]["alone"] < rows[1]["alone"] and rows[0]["alone_keep"] < rows[1]["alone_keep"]  # alone: they differ
    for key in ("budget", "keep", "gemms", "offload"):
        assert rows[0][key] == rows[1][key], (key, rows)
    assert rows[0]["budget"] == rows[0]["alone"] and rows[0]["least"] == rows[1]["least"] == 10
