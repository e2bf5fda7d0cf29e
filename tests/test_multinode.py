"""Multi-node training (qlora/launch.py): two "nodes" on localhost, one gloo process each, started as two
`qlora train --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT` commands through torchrun's static
rendezvous, equal one process at the same global batch; bad launcher flags and an unreachable
rendezvous are one line, before anything is written."""
import os
import socket
import subprocess
import sys
import time

import pytest

from qlora.cli import main
from qlora.launch import command
from qlora.train import train

from helpers import cfg, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_equal_one_process(setup, tmp_path):
    one = tmp_path / "one"
    train(cfg(setup, one, grad_accum=2, dropout=0.0, save_every=3), log=lambda m: None)
    two, port = tmp_path / "two", free_port()
    args = ["--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output", str(two),
            "--rank", "4", "--alpha", "8", "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1",
            "--max-steps", "6", "--save-every", "3", "--compute-dtype", "fp32", "--progress", "false",
            "--optim", "adamw", "--warmup-ratio", "0", "--dropout", "0", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "qlora.cli", "train", "--gpus", "1", "--nnodes", "2",
                               "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "60",
                               *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]  # node 1 first: it waits for node 0's rendezvous
    outs = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [e[-2000:] for _, e in outs]
    assert "adapter:" in outs[1][0] and "adapter:" not in outs[0][0]  # node 0's rank 0 reports and writes
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    from safetensors.torch import load_file
    wa = load_file(one / "adapter" / "adapter_model.safetensors")
    wb = load_file(two / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all((wa[k] - wb[k]).abs().max() <= 1e-4 * max(1.0, float(wa[k].abs().max())) for k in wa)


def test_unreachable_rendezvous_is_one_line_after_the_timeout(setup, tmp_path, capsys):
    out, port = tmp_path / "r", free_port()  # nobody listens there
    t0 = time.time()
    rc = main(["train", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output", str(out),
               "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"127.0.0.1:{port}: no rendezvous answered within 2 s" in err, err
    assert time.time() - t0 < 15 and not out.exists()


@pytest.mark.slow  # torchrun's agent starts and waits for the missing node
def test_node0_whose_peers_never_come_is_one_line(setup, tmp_path):
    out, port = tmp_path / "r", free_port()
    r = subprocess.run([sys.executable, "-m", "qlora.cli", "train", "--data", str(setup / "data.jsonl"), "--model",
                        str(setup / "model"), "--output", str(out), "--nnodes", "2", "--node-rank", "0",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "2", "--device", "cpu"],
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert err[-1].startswith(f"qlora train: error: --rdzv-endpoint 127.0.0.1:{port}: Timed out") and \
        "not all 2 nodes joined within --rdzv-timeout 2 s" in err[-1], err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--nnodes", "2"], "give --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2: must be in 0..1"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "expected HOST:PORT"),
    (["--node-rank", "1"], "add --nnodes M"),
    (["--nnodes", "0"], "--nnodes must be >= 1"),
])
def test_bad_launcher_flags_are_one_line(setup, tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    assert main(["train", "--data", str(setup / "data.jsonl"), "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_torchrun_command_of_a_node():
    cmd = command(4, ["train", "--gpus", "4", "--nnodes=2", "--node-rank", "1", "--rdzv-endpoint", "n0:29500",
                      "--data", "d.jsonl"], 2, 1, ("n0", 29500), 30)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
                       "--rdzv-backend=static", "--rdzv-endpoint=n0:29500", "--rdzv-conf=timeout=30",
                       "-m", "qlora.cli", "train", "--data", "d.jsonl"]
    # torchrun's own parser accepts it and makes it a static rendezvous of 2 nodes x 4 processes
    from torch.distributed.run import config_from_args, get_args_parser
    config, _, _ = config_from_args(get_args_parser().parse_args(cmd[3:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.rdzv_backend) == (2, 2, 4, "static")
    assert config.rdzv_configs["rank"] == 1 and config.rdzv_endpoint == "n0:29500"
