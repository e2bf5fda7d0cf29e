"""Chunked linear + cross-entropy: the LM-head loss without a full ``[N, V]`` fp32 logits tensor.

``chunked_linear_cross_entropy(hidden [N, H], weight [V, H], labels [N])`` equals
``F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=...)`` (labels already
shifted by the caller), but processes ``chunk_size`` rows at a time:

* forward, per chunk: ``logits = hidden_c.to(W.dtype) @ W.T`` in the weight's dtype,
  ``loss_i = logsumexp(logits_i) - logits_i[label_i]`` in fp32, summed over non-ignored rows;
  the result is that sum divided by the number of non-ignored rows (``reduction="mean"``; all
  rows ignored gives NaN, as ``F.cross_entropy`` does) or the sum itself (``reduction="sum"``,
  handy for normalising over several micro-batches).
* backward recomputes each chunk's logits (or, with ``grad_in_forward``, the forward pass
  forms the gradients below for a unit upstream gradient and backward only scales them): ``dlogits = (softmax - onehot(label)) * dloss / n``
  (0 on ignored rows), rounded to the weight's dtype like the reference's cast, then
  ``dhidden_c = dlogits @ W`` and, only if ``weight.requires_grad`` (a frozen LoRA lm_head does
  not), ``dW += dlogits.T @ hidden_c`` accumulated in fp32.

Peak extra memory is about ``chunk_size * V * (2 + 4 + 4)`` bytes (logits in the weight dtype,
their fp32 copy, one fp32 temporary) instead of ``N * V * 4`` and more for the unfused loss.
Torch matmuls; with ``grad_in_forward`` the softmax gradient between them is the Triton kernel
of :mod:`.ce` where the kernels are available. It runs on the CPU and on any GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import QLoraError

# Default chunk: about this many logits per chunk (64 MiB in fp32 on the CPU; 256 MiB on a GPU,
# where each chunk re-reads the whole lm_head, so chunks of a few hundred rows keep it fast).
CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS_GPU = 1 << 26


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The unfused loss: full logits in the weight's dtype, then fp32 cross-entropy."""
    logits = hidden.to(weight.dtype) @ weight.t()
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (h.to(weight.dtype) @ weight.t()).float()


def _chunk_grads(logits, h, weight, lab, valid, scale, grad_h_out, grad_w):
    """dlogits of one chunk from its fp32 logits (overwritten), then dhidden into ``grad_h_out``
    and dW accumulated into ``grad_w`` (each only when not None)."""
    g = torch.softmax(logits, dim=1)
    g[torch.arange(g.shape[0], device=g.device), torch.where(valid, lab, 0)] -= 1.0
    g *= torch.where(valid, scale, 0.0).unsqueeze(1)
    g = g.to(weight.dtype)  # the reference casts dlogits back to the logits' dtype here
    _grads_from(g, h, weight, grad_h_out, grad_w)


def _chunk_loss_and_grads_inplace(h, weight, lab, ignore_index, scale, grad_h_out, grad_w, lbuf, fbuf):
    """The forward pass with ``grad_in_forward``, every ``[rows, V]`` intermediate in preallocated
    buffers: the logits go into ``lbuf`` (weight dtype), :func:`.ce.softmax_xent_grad_` turns them
    into their gradient in place (Triton kernel on a GPU; on a CPU the torch version with ``fbuf``
    as fp32 work space), then ``dhidden`` and ``dW`` follow. Returns the chunk's row losses (fp32,
    0 on ignored rows). Same math as the general path: ``loss = logsumexp(logits) -
    logits[label]``, ``dlogits = softmax - onehot``."""
    from .ce import softmax_xent_grad_
    lb = lbuf[:h.shape[0]]
    torch.mm(h.to(weight.dtype), weight.t(), out=lb)
    losses = softmax_xent_grad_(lb, lab, scale, ignore_index, fbuf)
    _grads_from(lb, h, weight, grad_h_out, grad_w)
    return losses


def _grads_from(dlogits, h, weight, grad_h_out, grad_w):
    if grad_h_out is not None:
        if grad_h_out.dtype == dlogits.dtype and grad_h_out.is_contiguous():
            torch.mm(dlogits, weight, out=grad_h_out)
        else:
            grad_h_out.copy_(dlogits @ weight)
    if grad_w is not None:
        grad_w += (dlogits.t() @ h.to(weight.dtype)).float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd function behind :func:`chunked_linear_cross_entropy` (inputs already checked).

    ``grad_in_forward``: form the gradients (for a unit upstream gradient) while the logits are
    at hand and only scale them in backward: one logits matmul fewer, at the cost of keeping
    ``dhidden`` (the size of ``hidden``) between forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, grad_in_forward):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_valid = (labels != ignore_index).sum()
        need_h, need_w = grad_in_forward and hidden.requires_grad, grad_in_forward and weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        unit = 1.0 / n_valid.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
        # the in-place pass: on a CPU, and on a GPU where the Triton kernel runs (kernels.available)
        from . import available
        inplace = grad_in_forward and n > 0 and (not hidden.is_cuda or available(hidden.device))
        if inplace:
            rows = min(chunk_size, n)
            lbuf = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=hidden.device)
            fbuf = None if hidden.is_cuda else torch.empty(rows, weight.shape[0], dtype=torch.float32,
                                                           device=hidden.device)
        for start in range(0, n, chunk_size):
            lab = labels[start:start + chunk_size]
            h = hidden[start:start + chunk_size]
            if inplace:
                total += _chunk_loss_and_grads_inplace(
                    h, weight, lab, ignore_index, unit, grad_h[start:start + chunk_size] if need_h else None,
                    grad_w, lbuf, fbuf).sum()
                continue
            logits = _chunk_logits(h, weight)
            valid = lab != ignore_index
            target = logits.gather(1, torch.where(valid, lab, 0).unsqueeze(1)).squeeze(1)
            losses = torch.logsumexp(logits, dim=1) - target
            total += torch.where(valid, losses, 0.0).sum()
            if need_h or need_w:
                _chunk_grads(logits, h, weight, lab, valid, unit,
                             grad_h[start:start + chunk_size] if need_h else None, grad_w)
            del logits
        ctx.grad_in_forward = need_h or need_w
        if ctx.grad_in_forward:  # backward only scales these: keep neither hidden nor the (maybe gathered) weight
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        else:
            ctx.save_for_backward(hidden, weight, labels, n_valid)
        ctx.ignore_index, ctx.chunk_size, ctx.reduction = ignore_index, chunk_size, reduction
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.grad_in_forward:
            grad_h, grad_w = ctx.saved_tensors
            g = grad_out.float()
            return ((grad_h * g.to(grad_h.dtype)) if need_h and grad_h is not None else None,
                    (grad_w * g).to(ctx.weight_dtype) if need_w and grad_w is not None else None,
                    None, None, None, None, None)
        hidden, weight, labels, n_valid = ctx.saved_tensors
        scale = grad_out.float() / n_valid if ctx.reduction == "mean" else grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        cs = ctx.chunk_size
        for start in range(0, hidden.shape[0], cs):
            h = hidden[start:start + cs]
            lab = labels[start:start + cs]
            _chunk_grads(_chunk_logits(h, weight), h, weight, lab, lab != ctx.ignore_index, scale,
                         grad_h[start:start + cs] if need_h else None, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int = -100) -> None:
    """Every label is a class index in ``[0, vocab)`` or ``ignore_index`` (reads the values: a host
    sync for CUDA tensors)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise QLoraError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"found {int(labels[bad][0])}")


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int = -100, chunk_size: int | None = None,
                                 reduction: str = "mean", grad_in_forward: bool = False) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising all logits.

    ``hidden`` is ``[N, H]`` (or ``[..., H]`` with ``labels`` of the leading shape), ``weight``
    ``[V, H]``; labels are class indices in ``[0, V)`` or ``ignore_index``. ``chunk_size`` rows per
    chunk (default: about 16M logits per chunk on the CPU, 64M on a GPU, where the lm_head is
    re-read once per chunk and pass). ``grad_in_forward=True`` forms the gradients during the
    forward pass (when grad mode is on) instead of recomputing the logits in backward: faster,
    keeps one ``hidden``-sized tensor alive until backward. Returns an fp32 scalar; see the
    module docstring.
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
    if not (lab.is_cuda and torch.cuda.is_current_stream_capturing()):  # no host sync inside a CUDA graph
        check_labels(lab, vocab, ignore_index)
    if chunk_size is None:
        chunk_size = max(1, (CHUNK_ELEMENTS_GPU if hidden.is_cuda else CHUNK_ELEMENTS) // max(1, vocab))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise QLoraError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    grad_in_forward = bool(grad_in_forward) and torch.is_grad_enabled()
    return ChunkedLinearCrossEntropy.apply(h2, weight, lab, ignore_index, chunk_size, reduction, grad_in_forward)
