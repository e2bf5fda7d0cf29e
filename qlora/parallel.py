"""How gradients meet across processes: one process, DDP, or FSDP2 (``--parallel``).

All three share the same step: a :class:`LossModule` (the model plus its loss, so that PyTorch's
data-parallel wrappers see the whole computation as one ``forward``) turns a micro-batch into the
sum of its token cross-entropies; the training loop divides by the step's trained tokens, summed
over every process, and back-propagates.

* ``none`` — one process; gradients stay where they are.
* ``ddp`` — ``torch.nn.parallel.DistributedDataParallel``: every rank holds the whole (4-bit, so
  small) model; LoRA gradients are all-reduced in buckets *while* backward runs (only on the last
  micro-batch of a step: ``no_sync`` before). The frozen base is neither broadcast nor synced: all
  ranks build it identically from the same source and seed.
* ``fsdp`` — PyTorch FSDP2 (``fully_shard``): each transformer block is sharded across ranks as soon
  as it is loaded (the packed 4-bit bytes, the quantization state, norms and LoRA factors alike,
  as frozen/trainable parameters of mixed dtypes that FSDP2 all-gathers as bytes), then the input
  embedding and the LM head, then the root. Before a block runs, its shards are all-gathered; after
  it, freed; LoRA gradients are reduce-scattered during backward, and the optimizer updates only
  the local shard of each LoRA factor (its state is sharded too). A process holds ``1/N`` of the
  model plus one or two gathered blocks.

PyTorch's wrappers average gradients over ranks; the loss is multiplied by the world size so the
result is the sum the loss normalisation expects. Checkpoints always hold full tensors (gathered
before rank 0 writes), so a run saved with N processes in one mode resumes with M in any mode.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .methods import SFT
from .compat import ddp_ignore, local_tensor
from .errors import QLoraError
from .linear import QLoRALinear

MODES = ("auto", "none", "ddp", "fsdp")


class LossModule(nn.Module):
    """``forward(batch) -> (loss sum, metrics)`` of ``lm`` on ``batch`` by the training ``method``
    (qlora.methods; default SFT: the sum of token cross-entropies, see loss.loss_sum).

    ``head_unshard``: the LM head is an FSDP2 unit whose weight the chunked loss reads directly (not
    through its forward), so gather it around the loss; its gradients are formed in the forward pass
    (loss_sum's default ``grad_in_forward``) so backward never needs the gathered weight again."""

    def __init__(self, lm: nn.Module, device, head_unshard: bool = False, method=None):
        super().__init__()
        self.lm, self.device, self.head_unshard = lm, device, head_unshard
        self.method = method if method is not None else SFT()

    def forward(self, batch: dict, static_shapes: bool = False) -> tuple:
        if not self.head_unshard:
            return self.method.loss(self.lm, batch, self.device, static_shapes)
        head = self.lm.get_output_embeddings()
        head.unshard()
        try:
            return self.method.loss(self.lm, batch, self.device, static_shapes)
        finally:
            head.reshard()


def frozen_to_parameters(module: nn.Module) -> None:
    """Re-register each QLoRALinear's frozen base tensors (packed bytes, quantization state, 16-bit
    weight, bias) as parameters without gradient, so FSDP2 shards them (it shards parameters, not
    buffers); integer ones travel as bf16-typed bytes (see QLoRALinear.to_carriers)."""
    for m in module.modules():
        if isinstance(m, QLoRALinear):
            m.to_carriers()


class Parallel:
    """The data-parallel mode of a run: wrap the model, run a micro-batch's loss, control gradient
    sync, clip, zero, and move full tensors in and out of checkpoints."""

    def __init__(self, dist, mode: str = "auto", device: torch.device | None = None):
        if mode not in MODES:
            raise QLoraError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "ddp" if dist.active else "none"
        if mode != "none" and not dist.active:
            mode = "none"  # one process: nothing to distribute
        self.dist, self.mode, self.device = dist, mode, device
        self.module: nn.Module | None = None
        self.runner = None
        self.params: list[nn.Parameter] = []  # trainable parameters (DTensors under FSDP)
        self.mesh = None
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            self.mesh = init_device_mesh(device.type, (dist.world,))

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def grad_scale(self) -> float:
        """Factor on the loss so the wrappers' gradient average over ranks becomes a sum."""
        return float(self.dist.world) if self.mode in ("ddp", "fsdp") else 1.0

    # -- building --------------------------------------------------------------------------------

    def block_hook(self):
        """Callback for the model loader: shard each transformer block as soon as it is loaded."""
        if not self.sharded:
            return None
        from torch.distributed.fsdp import fully_shard

        def shard(block: nn.Module) -> None:
            frozen_to_parameters(block)
            fully_shard(block, mesh=self.mesh, reshard_after_forward=True)
        return shard

    def wrap(self, model: nn.Module, method=None) -> None:
        """Wrap ``model`` with the loss of ``method`` (qlora.methods; default SFT) for this mode."""
        if self.mode == "none":
            self.module = LossModule(model, self.device, method=method)
            self.runner = self.module
        elif self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.module = LossModule(model, self.device, method=method)
            frozen = [f"lm.{n}" for n, p in model.named_parameters() if not p.requires_grad]
            frozen += [f"lm.{n}" for n, _ in model.named_buffers()]
            ddp_ignore(self.module, frozen)
            with warnings.catch_warnings():  # torch >= 2.12 calls broadcast_buffers deprecated, but its successor
                # still syncs buffers at init, and these buffers (rotary tables...) are equal on every rank anyway
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                self.runner = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                  broadcast_buffers=False, find_unused_parameters=False)
        else:
            from torch.distributed.fsdp import FSDPModule, fully_shard
            frozen_to_parameters(model)
            for block in _blocks(model):
                if not isinstance(block, FSDPModule):
                    self.block_hook()(block)
            from .offload import HostEmbedding
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            tied = head is not None and getattr(emb, "weight", None) is head.weight
            if not tied:
                if not isinstance(emb, HostEmbedding):  # a host-memory table stays whole on every rank's CPU
                    fully_shard(emb, mesh=self.mesh, reshard_after_forward=True)
                if head is not None:
                    fully_shard(head, mesh=self.mesh, reshard_after_forward=True)
            self.module = LossModule(model, self.device, head_unshard=not tied and head is not None, method=method)
            fully_shard(self.module, mesh=self.mesh)
            self.runner = self.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def local_bytes(self) -> tuple[int, int]:
        """(bytes of model parameters and buffers held by this process, bytes of the whole model)."""
        here = whole = 0
        seen = set()
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if id(t) in seen or t.is_meta:
                continue
            seen.add(id(t))
            whole += t.numel() * t.element_size()
            loc = local_tensor(t)
            here += loc.numel() * loc.element_size()
        return here, whole

    def optimizer_params(self) -> list[torch.Tensor]:
        """What the optimizer updates: the parameters, or under FSDP the local shard of each (same
        storage, so updating it updates the parameter)."""
        if not self.sharded:
            return self.params
        return [local_tensor(p) for p in self.params]

    # -- the step ----------------------------------------------------------------------------------

    def forward(self, batch: dict, static_shapes: bool = False) -> tuple:
        """(loss sum, metrics) of a micro-batch through the wrapper (see LossModule)."""
        return self.runner(batch, static_shapes)

    def loss(self, batch: dict) -> torch.Tensor:
        return self.forward(batch)[0]

    def sync_context(self, last: bool):
        """Gradient sync only on the step's last micro-batch."""
        if self.mode == "ddp" and not last:
            return self.runner.no_sync()
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def before_optimizer(self) -> None:
        if self.sharded:  # hand the local gradient shards to the optimizer's local tensors
            for p, lt in zip(self.params, self.optimizer_params()):
                lt.grad = None if p.grad is None else local_tensor(p.grad)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        import torch.distributed as tdist
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            sq += g.float().pow(2).sum()
        tdist.all_reduce(sq)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.sharded:
            for lt in self.optimizer_params():
                lt.grad = None

    # -- full tensors for checkpoints ------------------------------------------------------------

    def full(self, t: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
        """The full tensor of local shard ``t`` of a parameter shaped like ``like`` (collective)."""
        if not self.sharded:
            return t
        from torch.distributed.tensor import DTensor
        d = DTensor.from_local(t.to(self.device), like.device_mesh, like.placements, run_check=False,
                               shape=like.shape, stride=like.stride())
        return d.full_tensor()

    def local(self, full: torch.Tensor, like: nn.Parameter) -> torch.Tensor:
        """This rank's shard of ``full`` (FSDP2 shards dim 0 in ``torch.chunk`` pieces)."""
        if not self.sharded:
            return full
        if tuple(full.shape) != tuple(like.shape):
            raise QLoraError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit parameter {tuple(like.shape)}")
        chunks = torch.chunk(full, self.dist.world, dim=0)
        return chunks[self.dist.rank] if self.dist.rank < len(chunks) else full[:0]

    def lora_tensors(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """{layer name: (A, B)} as full CPU tensors (collective under FSDP; None otherwise: read the model)."""
        if not self.sharded:
            return None
        from .model import lora_modules
        return {n: (m.lora_A.full_tensor().cpu(), m.lora_B.full_tensor().cpu()) for n, m in lora_modules(model).items()}

    def load_lora(self, model: nn.Module, pairs: dict) -> None:
        for name, (a, b) in pairs.items():
            m = model.get_submodule(name)
            for p, t in ((m.lora_A, a), (m.lora_B, b)):
                if self.sharded:
                    local_tensor(p).copy_(self.local(t.to(p.dtype), p))
                else:
                    p.data.copy_(t)

    def optimizer_state(self, state_dict: dict) -> dict:
        """The optimizer's state dict with every per-element state tensor gathered in full (collective)."""
        if not self.sharded:
            return state_dict
        out = {"param_groups": state_dict["param_groups"], "state": {}}
        for pid, st in sorted(state_dict["state"].items()):
            p = self.params[pid]
            out["state"][pid] = {k: (self.full(v, p).cpu() if torch.is_tensor(v) and v.dim() > 0 else v)
                                 for k, v in st.items()}
        return out

    def local_optimizer_state(self, state_dict: dict) -> dict:
        if not self.sharded:
            return state_dict
        return {"param_groups": state_dict["param_groups"],
                "state": {pid: {k: (self.local(v, self.params[pid]) if torch.is_tensor(v) and v.dim() > 0 else v)
                                for k, v in st.items()} for pid, st in state_dict["state"].items()}}


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the numbered children of the model's layer list)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(any(isinstance(x, QLoRALinear) for x in b.modules())
                                                           for b in m):
            return list(m)
    raise QLoraError(f"{type(model).__name__}: no transformer block list found to shard")
