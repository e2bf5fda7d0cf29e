"""How ``qlora train --gpus N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`` starts its processes:
torchrun (``torch.distributed.run``) with N processes on this machine; on M machines its static rendezvous,
so that global rank = node rank * N + local rank and rank 0 (node 0's first process) is the one that writes
checkpoints, metrics and the adapter, as on one machine. Node 0 hosts the rendezvous at HOST:PORT (HOST is
node 0's address as the others reach it).

A node other than 0 first waits (at most ``--rdzv-timeout`` seconds) for node 0's rendezvous to answer,
so a wrong address, a closed port or a node 0 that never starts is one line, not a hang or a traceback.
"""
from __future__ import annotations

import os
import sys

from .errors import QLoraError

# flags of the launcher only: the processes it starts take the rest of the command line
LAUNCH_FLAGS = ("--gpus", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-timeout")


def add_args(p) -> None:
    p.add_argument("--nnodes", type=int, default=1, metavar="M",
                   help="machines taking part (default: 1); each runs the same command with its own --node-rank")
    p.add_argument("--node-rank", type=int, default=0, metavar="R",
                   help="this machine's index 0..M-1; node 0 hosts the rendezvous and writes the run (default: 0)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="node 0's address and a free port there, the same on every node (needed with --nnodes > 1)")
    p.add_argument("--rdzv-timeout", type=int, default=600, metavar="S",
                   help="seconds to wait for the other nodes at the rendezvous (default: 600)")


def check(gpus: int, nnodes: int, node_rank: int, endpoint: str | None, timeout: int) -> tuple[str, int] | None:
    """(host, port) of the rendezvous of a multi-node run, None for one machine; one line for a bad flag."""
    if nnodes < 1:
        raise QLoraError(f"--nnodes must be >= 1, got {nnodes}")
    if timeout < 1:
        raise QLoraError(f"--rdzv-timeout must be >= 1 second, got {timeout}")
    if nnodes == 1:
        if node_rank != 0 or endpoint:
            raise QLoraError("--node-rank and --rdzv-endpoint are for multi-node runs: add --nnodes M (M > 1)")
        return None
    if not 0 <= node_rank < nnodes:
        raise QLoraError(f"--node-rank {node_rank}: must be in 0..{nnodes - 1} for --nnodes {nnodes}")
    if not endpoint:
        raise QLoraError(f"--nnodes {nnodes}: give --rdzv-endpoint HOST:PORT (node 0's address and a free port)")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise QLoraError(f"--rdzv-endpoint {endpoint}: expected HOST:PORT (e.g. node0.cluster:29500)")
    return host.strip("[]"), int(port)


def wait_for_node0(host: str, port: int, timeout: int) -> None:
    """Block until node 0's rendezvous store answers at host:port (torch's own TCPStore client, which
    retries until the timeout), or one line after ``timeout`` seconds."""
    from datetime import timedelta

    import torch.distributed as tdist
    try:
        store = tdist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout),
                               wait_for_workers=False)
        del store
    except Exception as e:  # DistStoreError on the timeout, a socket error for a host that does not resolve
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QLoraError(f"--rdzv-endpoint {host}:{port}: no rendezvous answered within {timeout} s (is node 0 "
                         f"started with the same --rdzv-endpoint, the address reachable, the port open?): "
                         f"{why[:200]}") from None


def command(gpus: int, argv: list[str], nnodes: int = 1, node_rank: int = 0, rendezvous: tuple[str, int] | None = None,
            timeout: int = 600) -> list[str]:
    """The torchrun command line that starts this node's ``gpus`` processes of ``qlora train ARGV``."""
    rest, skip = [], False
    for a in argv:  # the launcher's flags stay here; each process gets the rest
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            rest.append(a)
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    if rendezvous is None:
        run.append("--standalone")
    else:
        host, port = rendezvous
        run += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=static",
                f"--rdzv-endpoint={host}:{port}", f"--rdzv-conf=timeout={timeout}"]
    return run + ["-m", "qlora.cli", *rest]


def launch(gpus: int, nnodes: int = 1, node_rank: int = 0, rendezvous: tuple[str, int] | None = None,
           timeout: int = 600) -> int:
    import subprocess
    if rendezvous is not None and node_rank > 0:
        wait_for_node0(*rendezvous, timeout)
    env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    cmd = command(gpus, sys.argv[1:], nnodes, node_rank, rendezvous, timeout)
    if rendezvous is None:
        return subprocess.call(cmd, env=env)
    # node 0 whose peers never come: torchrun's agent ends with a traceback; say it in one line instead
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    said_timeout = _relay(p.stderr, sys.stderr)
    rc = p.wait()
    if said_timeout and rc != 0:
        raise QLoraError(f"--rdzv-endpoint {rendezvous[0]}:{rendezvous[1]}: {said_timeout.rstrip('.')}; not all {nnodes} nodes "
                         f"joined within --rdzv-timeout {timeout} s (start every node with the same --nnodes and "
                         "--rdzv-endpoint, each with its own --node-rank)")
    return rc


def _relay(src, dst) -> str | None:
    """Copy ``src`` to ``dst`` line by line, holding each traceback back until its last line: a
    rendezvous timeout's traceback is dropped (its message returned), any other is passed on whole."""
    held: list[str] = []
    timed_out = None
    for line in src:
        if held or line.startswith("Traceback (most recent call last)"):
            held.append(line)
            if line[:1].isspace() or line.startswith(("Traceback", "The above exception", "During handling")) \
                    or not line.strip():
                continue
            if "DistStoreError" in line and "Timed out" in line:  # the static rendezvous' timeout
                timed_out = line.split(":", 1)[1].strip()
            else:
                dst.writelines(held)
            held = []
            continue
        dst.write(line)
        dst.flush()
    dst.writelines(held)
    return timed_out
