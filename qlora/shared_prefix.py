"""Both answers of a preference pair in one row: the prompt they share runs once, the rejected answer
attending to it but not to the chosen answer.

A pair batch (:class:`qlora.preference_data.PairBatches`) holds rows ``c1..cB, r1..rB``. The two sequences of
a pair are the same tokens up to their common prefix of ``P`` tokens (the prompt, and any first answer tokens
they share). :func:`pack` lays pair ``b`` out as one row ``chosen + rejected[P:]``, with

* positions ``0 .. len(chosen)-1`` then ``P .. len(rejected)-1`` (RoPE sees each sequence's own positions);
* a 4D mask: a chosen token attends causally within the chosen sequence; a token of the rejected tail attends
  to the shared prefix and causally within the tail, never to the chosen answer;
* for each scored token (label != -100) of either sequence, the row position whose hidden state predicts it:
  ``t - 1`` inside the shared prefix, the tail's own position after it.

Every hidden state is then the one the unpacked sequence computes (same tokens, positions and context), so
the log-probs equal those of two separate rows up to float rounding, from ``P`` fewer tokens per pair: for
typical preference data (a long prompt, two short answers) most of the second sequence. The cost is the mask:
SDPA leaves its flash kernel for the one that takes a mask (on a GPU that made the step slower than running
the sequences whole, so ``auto`` packs only off CUDA: :func:`wanted`), and the mask holds ``B * S * S`` bytes.
"""
from __future__ import annotations

import torch

from .compat import attention_implementation
from .data import IGNORE

# Below this share of the batch's tokens saved, packing is not worth its mask (SDPA's masked kernel is slower
# than its flash kernel; a [B, 1, S, S] mask is built): the pairs run as two rows each.
MIN_SAVED = 0.125


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading ids two id lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def wanted(setting, device) -> bool:
    """Whether ``--share-prompt`` (True, False, "true", "false" or "auto") packs pairs on ``device``. auto: not on a CUDA
    device, where SDPA then leaves its flash kernel for the masked one and the step got slower than running
    both sequences whole (H100, 8B, seq 1024 with a half-length prompt: 0.73 s against 0.52 s; BENCHMARKS.md),
    though it needed less memory."""
    setting = {"true": True, "false": False}.get(str(setting).lower(), setting)
    if setting == "auto":
        return torch.device(device).type != "cuda"
    return bool(setting)


def usable(model) -> bool:
    """Whether the model's attention takes a custom 4D mask (sdpa and eager do; flash-attention kernels
    take none)."""
    return attention_implementation(model.config) in ("sdpa", "eager")


def pack(batch: dict, dtype: torch.dtype, min_saved: float = MIN_SAVED) -> dict | None:
    """The packed form of a pair batch (see the module docstring), or None when it saves less than
    ``min_saved`` of the tokens. Returns ``input_ids``, ``position_ids`` [B, S], ``attention_mask``
    [B, 1, S, S] (bool for ``dtype=torch.bool``, else additive 0 / -inf-like in ``dtype``), and per row
    ``src``/``tgt`` lists (chosen then rejected: 2B entries) of the predicting positions and target ids."""
    ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B = ids.shape[0] // 2
    lens = am.sum(1).tolist()
    prefixes = [common_prefix(ids[b, :lens[b]].tolist(), ids[B + b, :lens[B + b]].tolist()) for b in range(B)]
    if sum(prefixes) < min_saved * sum(lens):
        return None
    S = max(lens[b] + lens[B + b] - p for b, p in enumerate(prefixes))
    out_ids = torch.zeros((B, S), dtype=ids.dtype)
    pos = torch.zeros((B, S), dtype=torch.long)
    allowed = torch.zeros((B, S, S), dtype=torch.bool)
    src, tgt = [None] * (2 * B), [None] * (2 * B)
    i, j = torch.arange(S).unsqueeze(1), torch.arange(S).unsqueeze(0)
    for b, p in enumerate(prefixes):
        lc, lr = lens[b], lens[B + b]
        n = lc + lr - p
        out_ids[b, :lc], out_ids[b, lc:n] = ids[b, :lc], ids[B + b, p:lr]
        pos[b, :lc], pos[b, lc:n] = torch.arange(lc), torch.arange(p, lr)
        pos[b, n:] = torch.arange(S - n) + (lr if n else 0)  # padding: positions go on, never scored
        # causal; a rejected-tail query sees the shared prefix and its own tail only; padding keys never
        allowed[b] = (j <= i) & ((i < lc) | (j < p) | (j >= lc)) & (j < n)
        allowed[b, n:, 0] = True  # padding queries: one key, so no row of the mask is empty
        for k, (row, length, tail_start) in enumerate(((b, lc, None), (B + b, lr, p))):
            t = (labels[row, 1:length] != IGNORE).nonzero().squeeze(1) + 1  # scored token positions
            before = t - 1  # the position that predicts each (in its own sequence)
            if tail_start is not None:  # the rejected tail sits after the chosen sequence in the row
                before = torch.where(before < tail_start, before, before - tail_start + lc)
            src[b + k * B], tgt[b + k * B] = before, ids[row, t]
    mask = allowed.unsqueeze(1)
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return {"input_ids": out_ids, "position_ids": pos, "attention_mask": mask, "src": src, "tgt": tgt,
            "saved_tokens": sum(prefixes)}


def mask_dtype(model, hidden_dtype: torch.dtype) -> torch.dtype:
    """The mask dtype the model's attention wants: bool for SDPA (True = attend), additive for eager."""
    return torch.bool if attention_implementation(model.config) == "sdpa" else hidden_dtype
