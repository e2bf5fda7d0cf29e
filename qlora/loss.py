"""Token losses, shared by training (train.py, parallel.py's DDP/FSDP wrapper) and evaluation
(evaluate.py): the sum of cross-entropies over a batch's scored tokens (labels != -100).

``loss_sum`` is the training loss (chunked LM head, no full fp32 logits where the architecture
allows); ``evaluate_loss`` is its mean per token over held-out batches (``qlora train``'s eval
loss); ``token_loss`` is ``qlora eval``'s fp32 sum over whole examples (logits only from the
first scored position on)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunked_loss_ok(model) -> bool:
    cfg = model.config
    return (hasattr(model, "model") and model.get_output_embeddings() is not None
            and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None)
            and cfg.model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"))


def loss_sum(model, batch: dict, device, grad_in_forward: bool = True, static_shapes: bool = False) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's trained tokens (labels != -100), computed
    without a full fp32 logits tensor where the architecture allows. ``grad_in_forward`` (default):
    the LM head's share of the backward pass is done during forward while its logits are at hand,
    saving the recomputation of the logits in backward (see kernels.loss); it only applies when
    gradients are enabled. ``static_shapes``: no shape depends on the data (the LM head runs on
    every position, ignored ones add 0) and nothing waits for the GPU, as a CUDA graph needs; the
    caller checks the labels' range."""
    from .kernels.loss import chunked_linear_cross_entropy
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    labels = batch["labels"].to(device)
    if _chunked_loss_ok(model):
        h = model.model(**inputs, use_cache=False).last_hidden_state
        tgt = labels[:, 1:]
        if static_shapes:
            return chunked_linear_cross_entropy(h[:, :-1], model.get_output_embeddings().weight, tgt,
                                                reduction="sum", grad_in_forward=grad_in_forward)
        keep = tgt != -100  # the LM head runs only where a token is scored (prompts are most tokens)
        return chunked_linear_cross_entropy(h[:, :-1][keep], model.get_output_embeddings().weight, tgt[keep],
                                            reduction="sum", grad_in_forward=grad_in_forward)
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")


@torch.no_grad()
def evaluate_loss(model, batches, device, loss_fn=None) -> float:
    """Mean token loss over ``batches`` (``loss_fn(batch)`` gives a batch's loss sum; default loss_sum)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        total += (loss_fn(b) if loss_fn is not None else loss_sum(model, b, device)).item()
        n += int(b["num_tokens"])
    model.train(was)
    return total / max(1, n)


def token_loss(model, examples, pad_id: int, batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """(sum of token NLL in fp32, number of scored tokens) over ``examples`` (:class:`qlora.data.Example`).

    Batches are right-padded; only logits from the earliest scored position of a batch on are
    computed (``logits_to_keep``), and only scored positions are up-cast to fp32."""
    from tqdm.auto import tqdm

    from .data import IGNORE, Batches
    device = next(model.parameters()).device
    batches = Batches(examples, batch_size, pad_id, shuffle=False)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in tqdm(batches.epoch(0), desc="loss", unit="batch", disable=not progress, leave=False):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        scored = labels[:, 1:] != IGNORE  # target t+1 is predicted at position t
        first = int(scored.any(0).nonzero()[0])
        keep = ids.shape[1] - first  # positions first .. T-1 (the last one predicts nothing)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits[:, :-1]
        targets = labels[:, first + 1:]
        sel = targets != IGNORE
        total += F.cross_entropy(logits[sel].float(), targets[sel], reduction="sum").double().cpu()
        count += int(sel.sum())
    return float(total), count
