"""Processes of a multi-process run (``torchrun --nproc-per-node N``, or ``qlora train --gpus N``
which launches it): NCCL on GPUs, gloo on CPUs, and the few scalar collectives the training loop
needs (token counts, losses, stop signals). How gradients meet (DDP or FSDP2) is qlora/parallel.py.
Only rank 0 writes files. NCCL's NVLink multicast is turned off (``NCCL_NVLS_ENABLE=0``) unless
set otherwise.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


class Dist:
    """Rank/world of this process and the few collectives the training loop needs (no-ops alone)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, active: bool = False):
        self.rank, self.world, self.local_rank, self.active = rank, world, local_rank, active

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(tdist.get_rank(), tdist.get_world_size(), local, True)

    def device(self, name: str) -> str:
        if self.active and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def sum(self, x: float) -> float:
        return self._reduce(x, tdist.ReduceOp.SUM)

    def min(self, x: int) -> int:
        """The smallest ``x`` of all processes (an integer: bytes, counts), so that they decide alike."""
        return int(self._reduce(x, tdist.ReduceOp.MIN))

    def _reduce(self, x: float, op) -> float:
        if not self.active:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t, op=op)
        return t.item()

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()
