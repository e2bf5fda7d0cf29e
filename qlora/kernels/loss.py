"""Chunked linear + cross-entropy: the LM-head loss without a full ``[N, V]`` fp32 logits tensor.

``chunked_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])`` equals
``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=...)`` (labels already
shifted by the caller), but processes ``chunk_size`` rows at a time:

* forward, per chunk: ``logits = hidden_c.to(W.dtype) @ W.T`` in the weight's dtype,
  ``loss_i = logsumexp(logits_i) - logits_i[label_i]`` in fp32, summed over non-ignored rows;
  the result is that sum divided by the number of non-ignored rows (``reduction="mean"``; all
  rows ignored gives NaN, as ``F.cross_entropy`` does) or the sum itself (``reduction="sum"``,
  handy for normalising over several micro-batches).
* backward recomputes each chunk's logits: ``dlogits = (softmax - onehot(label)) * dloss / n``
  (0 on ignored rows), rounded to the weight's dtype like the reference's cast, then
  ``dhidden_c = dlogits @ W`` and, only if ``weight.requires_grad`` (a frozen LoRA lm_head does
  not), ``dW += dlogits.T @ hidden_c`` accumulated in fp32.

Peak extra memory is about ``chunk_size * V * (2 + 4 + 4)`` bytes (logits in the weight dtype,
their fp32 copy, one fp32 temporary) instead of ``N * V * 4`` and more for the unfused loss.
Pure torch: it runs on the CPU and on any GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import QLoraError

# Default chunk: about this many logits per chunk (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The unfused loss: full logits in the weight's dtype, then fp32 cross-entropy."""
    logits = hidden.to(weight.dtype) @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (h.to(weight.dtype) @ weight.t()).float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd function behind :func:`chunked_linear_cross_entropy` (inputs already checked)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            lab = labels[start:start + chunk_size]
            logits = _chunk_logits(hidden[start:start + chunk_size], weight)
            valid = lab != ignore_index
            target = logits.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
            losses = torch.logsumexp(logits, dim=1) - target
            total += torch.where(valid, losses, 0.0).sum()
            del logits
        n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(hidden, weight, labels, n_valid)
        ctx.ignore_index, ctx.chunk_size, ctx.reduction = ignore_index, chunk_size, reduction
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, n_valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_out.float() / n_valid if ctx.reduction == "mean" else grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        cs = ctx.chunk_size
        rows = torch.arange(min(cs, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], cs):
            h = hidden[start:start + cs]
            lab = labels[start:start + cs]
            valid = lab != ctx.ignore_index
            g = torch.softmax(_chunk_logits(h, weight), dim=1)  # fp32
            r = rows[:g.shape[0]]
            g[r, torch.where(valid, lab, 0)] -= 1.0
            g *= torch.where(valid, scale, 0.0).unsqueeze(1)
            g = g.to(weight.dtype)  # the reference casts dlogits back to the logits' dtype here
            if need_h:
                grad_h[start:start + cs] = (g @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h.to(weight.dtype)).float()
            del g
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = -100, chunk_size: int | None = None,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    ``hidden`` is ``[N, H]`` (or ``[..., H]`` with ``labels`` of the leading shape), ``weight``
    ``[V, H]``; labels are class indices in ``[0, V)`` or ``ignore_index``. ``chunk_size`` rows per
    chunk (default: about 16M logits per chunk). Returns an fp32 scalar; see the module docstring.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise QLoraError(f"hidden [..., H] and weight [V, H] do not fit: {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise QLoraError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise QLoraError(f"labels must be integer class indices, got {labels.dtype}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise QLoraError(f"hidden and weight must be float tensors, got {hidden.dtype} and {weight.dtype}")
    if reduction not in ("mean", "sum"):
        raise QLoraError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise QLoraError(f"hidden, weight and labels must be on one device, got {hidden.device}, "
                         f"{weight.device} and {labels.device}")
    vocab = weight.shape[0]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    lab = labels.reshape(-1).long()
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= vocab))
    if bool(bad.any()):
        raise QLoraError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"found {int(lab[bad][0])}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // max(1, vocab))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise QLoraError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return ChunkedLinearCrossEntropy.apply(h2, weight, lab, ignore_index, chunk_size, reduction)
