"""Cross-entropy loss and its logits gradient in one kernel, written over the logits in place.

``softmax_xent_grad_(logits [m, V], labels [m], scale, ignore_index)`` returns the per-row losses
``logsumexp(logits_i) - logits_i[label_i]`` (fp32; 0 on ignored rows) and overwrites ``logits``
with ``dlogits = (softmax(logits_i) - onehot(label_i)) * scale`` (0 on ignored rows), rounded to
the logits' dtype. That is what the chunked LM-head loss needs between its two matmuls
(``logits = h @ W.T`` before, ``dh = dlogits @ W`` after) when it forms gradients during forward.

The torch version does the same in an fp32 work buffer with about six passes over it;
the Triton kernel reads each row twice in its own dtype (pass 1: running max and sum of
exponentials; pass 2: the gradient) and writes it once, computing in fp32 registers — so the
``[m, V]`` fp32 intermediates never exist. One program per row.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def softmax_xent_grad_torch_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                             ignore_index: int = -100, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Torch version of :func:`softmax_xent_grad_`: the fp32 work goes into ``buf`` (at least
    ``[m, V]`` fp32, reused across calls; allocated when None). Reusing it matters on a CPU, where
    a fresh multi-MB tensor costs its page faults (a subtraction over 183 x 49152 fp32 took 14 ms
    fresh, 2 ms into a buffer) and the unfused ops would make about six of them per call."""
    m = logits.shape[0]
    f = buf[:m] if buf is not None else torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    f.copy_(logits)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    rows = torch.arange(m, device=f.device)
    target = f[rows, safe]
    mx = f.amax(dim=1, keepdim=True)
    f.sub_(mx).exp_()
    tot = f.sum(dim=1, keepdim=True)
    losses = torch.where(valid, (mx + tot.log()).squeeze(1) - target, 0.0)
    sc = torch.where(valid, scale.float(), 0.0)
    f.mul_(sc.unsqueeze(1) / tot)  # softmax, scaled (0 on ignored rows)
    f[rows, safe] -= sc
    logits.copy_(f)  # rounded to the logits' dtype, as the reference's cast of dlogits
    return losses


if triton is not None:
    # labels of a chunk start at row offsets like 523 * k (int64): not specialising on their 16-byte
    # alignment saves a second compilation in a run's first step (0.3 s); one scalar load per row
    @triton.jit(do_not_specialize=["labels_ptr"])
    def _xent_grad_kernel(logits_ptr, stride, labels_ptr, loss_ptr, scale_ptr, V, ignore_index,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        lab = tl.load(labels_ptr + row).to(tl.int64)
        valid = lab != ignore_index
        safe = tl.where(valid, lab, 0)
        cols0 = tl.arange(0, BLOCK)
        # pass 1: running max m and sum s of exp(x - m), elementwise per lane, combined at the end
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + cols0
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
            s = tl.where(m_new == float("-inf"), 0.0, s)
            m = m_new
        mx = tl.max(m, 0)
        tot = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0)
        lse = mx + tl.log(tot)
        target = tl.load(ptr + safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        sc = tl.where(valid, tl.load(scale_ptr), 0.0)
        # pass 2: dlogits, written over the logits
        for off in range(0, V, BLOCK):
            cols = off + cols0
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == safe, 1.0, 0.0)
            tl.store(ptr + cols, (g * sc).to(logits_ptr.dtype.element_ty), mask=cols < V)


def softmax_xent_grad_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                       ignore_index: int = -100, buf: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. ``logits`` [m, V]; ``labels`` [m] integer; ``scale`` a
    one-element fp32 tensor on the same device (no host sync). Returns fp32 [m]. The Triton
    kernel runs where :func:`qlora.kernels.available` and the logits are on CUDA with unit stride
    on V; otherwise :func:`softmax_xent_grad_torch_`, with ``buf`` as its fp32 work space."""
    from . import available
    if triton is None or not logits.is_cuda or logits.stride(1) != 1 or not available(logits.device):
        return softmax_xent_grad_torch_(logits, labels, scale, ignore_index, buf)
    return _launch(logits, labels, scale, ignore_index)


def _launch(logits, labels, scale, ignore_index):
    m, vocab = logits.shape
    losses = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m == 0:
        return losses
    block = min(4096, triton.next_power_of_2(vocab))
    _xent_grad_kernel[(m,)](logits, logits.stride(0), labels.contiguous(), losses,
                            scale.reshape(1).float().contiguous(), vocab, ignore_index,
                            BLOCK=block, num_warps=8)
    return losses
