"""Data-parallel training across processes (``torchrun --nproc-per-node N``, or ``qlora train
--gpus N`` which launches it): NCCL on GPUs, gloo on CPUs.

Every rank holds the (4-bit, so small) base and the LoRA factors; a step's global micro-batches
are dealt round-robin to the ranks, the loss is normalised by the trained tokens of the whole
step (summed over ranks), and the LoRA gradients are summed with one all-reduce before the
optimizer step, which every rank then takes identically. So N processes with ``grad_accum = G``
compute the same step as one process with ``grad_accum = N * G``, and a checkpoint written with
N processes resumes with M when ``N * G`` stays the same. Only rank 0 writes files.
NCCL's NVLink multicast is turned off (``NCCL_NVLS_ENABLE=0``) unless set otherwise.
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
        if not self.active:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64)
        if tdist.get_backend() == "nccl":
            t = t.cuda()
        tdist.all_reduce(t)
        return t.item()

    def all_reduce_grads(self, params) -> None:
        """Sum the gradients of ``params`` over ranks (one flat buffer, one collective)."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        tdist.all_reduce(flat)
        i = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[i:i + n].view_as(g))
            i += n

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()
