"""Both answers of a preference pair in one row: the prompt they share runs once, the rejected answer
attending to it but not to the chosen answer.

A pair batch (:class:`qlora.preference_data.PairBatches`) holds rows ``c1..cB, r1..rB``. The two sequences of
a pair are the same tokens up to their common prefix of ``P`` tokens (the prompt, and any first answer tokens
they share). :func:`pack` lays pair ``b`` out as one row ``chosen + rejected[P:]``, with

* positions ``0 .. len(chosen)-1`` then ``P .. len(rejected)-1`` (RoPE sees each sequence's own positions);
* for each scored token (label != -100) of either sequence, the row position whose hidden state predicts it:
  ``t - 1`` inside the shared prefix, the tail's own position after it.

Every layer but attention works token by token, so it runs ``P`` fewer tokens per pair: for typical
preference data (a long prompt, two short answers) most of the second sequence. Attention must let a token
of the rejected tail see the shared prefix and the tail before it, never the chosen answer. Two ways, by the
model's attention implementation (:func:`path`):

* **pair attention** (``sdpa``; :func:`pair_attention`), no mask. In every attention layer the row's
  queries, keys and values (after RoPE) are gathered into two batches: the chosen sequences (the rows' first
  positions) and the whole rejected sequences, rebuilt from the prompt's entries of the chosen part and the
  tail's (:class:`PairLayout`). Each runs transformers' SDPA attention with ``is_causal`` and no mask (on
  CUDA, SDPA can then take its flash kernel); the outputs are gathered back into the row, the rejected
  prompt's (duplicates of the chosen ones) dropped. The gathers are differentiable: the prompt gets the
  gradient of both sequences, as when they run apart. Extra work: the attention of the rejected prompt and
  the copies of the gathers. No ``B * S * S`` mask is built. Its speed on a GPU is still to be measured.
* **a 4D mask** (``eager``): a chosen token attends causally within the chosen sequence; a token of the
  rejected tail attends to the shared prefix and causally within the tail. The mask holds ``B * S * S``
  elements; SDPA given such a mask leaves its flash kernel (on an H100 that made the step slower than running
  the sequences whole), which is why sdpa models take pair attention instead.

Either way every hidden state is the one the unpacked sequence computes (same tokens, positions and
context), so the log-probs equal those of two separate rows up to float rounding. Other implementations
(flash-attention kernels) run the sequences whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compat import attention_implementation, sdpa_attention
from .data import IGNORE
from .errors import QLoraError

# Below this share of the batch's tokens saved, packing is not worth its extra work (the mask, or pair
# attention's gathers): the pairs run as two rows each. Chosen for the masked path; not measured for pair attention.
MIN_SAVED = 0.125


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading ids two id lists share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def wanted(setting, device, model=None) -> bool:
    """Whether ``--share-prompt`` (True, False, "true", "false" or "auto") packs pairs of ``model`` on ``device``.
    auto: packs, except on a CUDA device where the model's attention would take the masked path (eager, or no
    model given), which made the step slower than running both sequences whole (H100, 8B, seq 1024 with a
    half-length prompt: 0.73 s against 0.52 s). With pair attention (sdpa) packing is faster there too
    (0.461 s against 0.481 s, 0.35 GiB less; BENCHMARKS.md, session 19)."""
    setting = {"true": True, "false": False}.get(str(setting).lower(), setting)
    if setting == "auto":
        return torch.device(device).type != "cuda" or (model is not None and path(model) == "pairs")
    return bool(setting)


def path(model) -> str | None:
    """How pairs of ``model`` pack: "pairs" (sdpa: :func:`pair_attention`), "mask" (eager: a 4D mask),
    None (any other attention, e.g. flash-attention kernels, which take neither: run whole)."""
    return {"sdpa": "pairs", "eager": "mask"}.get(attention_implementation(model.config))


def pack(batch: dict, dtype: torch.dtype | None, min_saved: float = MIN_SAVED) -> dict | None:
    """The packed form of a pair batch (see the module docstring), or None when it saves less than
    ``min_saved`` of the tokens. Returns ``input_ids``, ``position_ids`` [B, S], per row ``src``/``tgt`` lists
    (chosen then rejected: 2B entries) of the predicting positions and target ids, and for the attention:

    * ``dtype`` None (pair attention): ``pair_layout`` (:class:`PairLayout`) and an all-ones ``attention_mask``
      [B, S] (so transformers' mask code builds no mask: without one it would read the position jumps as
      packed sequences and build a [B, 1, S, S] mask);
    * else the ``attention_mask`` [B, 1, S, S] (bool for ``torch.bool``, else additive 0 / -inf-like in ``dtype``).
    """
    ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B = ids.shape[0] // 2
    lens = am.sum(1).tolist()
    chosen, rejected = lens[:B], lens[B:]
    prefixes = [common_prefix(ids[b, :chosen[b]].tolist(), ids[B + b, :rejected[b]].tolist()) for b in range(B)]
    if sum(prefixes) < min_saved * sum(lens):
        return None
    S = max(lc + lr - p for lc, lr, p in zip(chosen, rejected, prefixes))
    out_ids = torch.zeros((B, S), dtype=ids.dtype)
    pos = torch.zeros((B, S), dtype=torch.long)
    src, tgt = [None] * (2 * B), [None] * (2 * B)
    for b, (lc, lr, p) in enumerate(zip(chosen, rejected, prefixes)):
        n = lc + lr - p
        out_ids[b, :lc], out_ids[b, lc:n] = ids[b, :lc], ids[B + b, p:lr]
        pos[b, :lc], pos[b, lc:n] = torch.arange(lc), torch.arange(p, lr)
        pos[b, n:] = torch.arange(S - n) + (lr if n else 0)  # padding: positions go on, never scored
        for k, (row, length, tail_start) in enumerate(((b, lc, None), (B + b, lr, p))):
            t = (labels[row, 1:length] != IGNORE).nonzero().squeeze(1) + 1  # scored token positions
            before = t - 1  # the position that predicts each (in its own sequence)
            if tail_start is not None:  # the rejected tail sits after the chosen sequence in the row
                before = torch.where(before < tail_start, before, before - tail_start + lc)
            src[b + k * B], tgt[b + k * B] = before, ids[row, t]
    out = {"input_ids": out_ids, "position_ids": pos, "src": src, "tgt": tgt, "saved_tokens": sum(prefixes)}
    if dtype is None:
        out["pair_layout"] = pair_layout(chosen, rejected, prefixes, S)
        out["attention_mask"] = torch.ones((B, S), dtype=torch.long)
    else:
        out["attention_mask"] = packed_mask(chosen, rejected, prefixes, S, dtype)
    return out


def packed_mask(chosen: list[int], rejected: list[int], prefixes: list[int], S: int, dtype: torch.dtype) -> torch.Tensor:
    """The [B, 1, S, S] mask of the masked path (True / 0 = attend) for rows of the given sequence lengths
    and shared prefixes."""
    allowed = torch.zeros((len(chosen), S, S), dtype=torch.bool)
    i, j = torch.arange(S).unsqueeze(1), torch.arange(S).unsqueeze(0)
    for b, (lc, lr, p) in enumerate(zip(chosen, rejected, prefixes)):
        n = lc + lr - p
        # causal; a rejected-tail query sees the shared prefix and its own tail only; padding keys never
        allowed[b] = (j <= i) & ((i < lc) | (j < p) | (j >= lc)) & (j < n)
        allowed[b, n:, 0] = True  # padding queries: one key, so no row of the mask is empty
    mask = allowed.unsqueeze(1)
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


# ------------------------------------------------------------------------------ pair attention
@dataclass
class PairLayout:
    """Where each sequence of a packed pair batch sits in its row, for :func:`pair_attention`. Pair ``b``
    has lengths ``lc``, ``lr`` and shared prefix ``P``; rows are ``S`` long.

    * ``chosen_len`` ``Lc`` (the longest ``lc``): the chosen sequences are the rows' first ``Lc`` positions,
      each followed by whatever comes after it in its row (right padding to a causal attention);
    * ``rejected_index`` [B, Lr] (``Lr`` the longest ``lr``): the row position of each position ``t`` of the
      rejected sequence: ``t`` for ``t < P``, ``lc + t - P`` after; 0 for padding;
    * ``out_index`` [B, S]: where each row position's output is in the chosen outputs (``0 .. Lc-1``)
      followed by the rejected ones (``Lc .. Lc+Lr-1``): ``t`` for ``t < lc``, ``Lc + P + t - lc`` in the
      tail; 0 for padding (any finite value does: padding is never scored and no real token attends to it).
    """
    chosen_len: int
    rejected_index: torch.Tensor
    out_index: torch.Tensor
    calls: int = 0  # attention calls that took this layout: proof that it reached the attention

    def to(self, device) -> PairLayout:
        return PairLayout(self.chosen_len, self.rejected_index.to(device), self.out_index.to(device))


def pair_layout(chosen: list[int], rejected: list[int], prefixes: list[int], S: int) -> PairLayout:
    """The :class:`PairLayout` of rows of the given sequence lengths and shared prefixes, ``S`` long."""
    Lc, Lr, B = max(chosen), max(rejected), len(chosen)
    rejected_index = torch.zeros((B, Lr), dtype=torch.long)
    out_index = torch.zeros((B, S), dtype=torch.long)
    for b, (lc, lr, p) in enumerate(zip(chosen, rejected, prefixes)):
        rejected_index[b, :p], rejected_index[b, p:lr] = torch.arange(p), torch.arange(lc, lc + lr - p)
        out_index[b, :lc], out_index[b, lc:lc + lr - p] = torch.arange(lc), torch.arange(Lc + p, Lc + lr)
    return PairLayout(Lc, rejected_index, out_index)


def pair_attention(module, query, key, value, layout: PairLayout, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of packed rows as two causal, mask-free batches (see the module docstring). ``query``
    [B, H, S, D], ``key``/``value`` [B, Hkv, S, D] (after RoPE; grouped-query heads are transformers'
    business); returns ``(output [B, S, H, D], None)`` as transformers' attention functions do."""
    window = kwargs.get("sliding_window")
    Lc, Lr = layout.chosen_len, layout.rejected_index.shape[1]
    if window is not None and window < max(Lc, Lr):  # a causal kernel without a mask sees the whole past
        raise QLoraError(f"--share-prompt: this model's attention has a sliding window ({window} tokens) shorter "
                         f"than its sequences ({max(Lc, Lr)}), which pair attention does not apply: use "
                         "--share-prompt false")
    kwargs.pop("is_causal", None)
    sdpa = sdpa_attention()
    layout.calls += 1
    chosen, _ = sdpa(module, query[:, :, :Lc], key[:, :, :Lc], value[:, :, :Lc], None, is_causal=True, **kwargs)
    q, k, v = (_positions(x, layout.rejected_index) for x in (query, key, value))
    rejected, _ = sdpa(module, q, k, v, None, is_causal=True, **kwargs)
    both = torch.cat((chosen, rejected), 1)  # [B, Lc + Lr, H, D]
    return both.gather(1, layout.out_index[:, :, None, None].expand(-1, -1, *both.shape[2:])), None


def _positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, S, D] at the sequence positions ``index`` [B, L] of each row: [B, H, L, D]."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, -1, D))


def install() -> None:
    """Have transformers' ``sdpa`` attention take pair attention for a call that carries a ``pair_layout``
    keyword (the model's forward passes its extra keywords down to the attention function), and run as
    before for any other call (idempotent). "sdpa" itself is wrapped, rather than a name of our own switched
    on in the config for the forward: gradient checkpointing recomputes a block in backward, after such a
    switch is undone, and looks the function up by the config's name again; the keywords it replays."""
    from transformers import AttentionInterface
    before = AttentionInterface()["sdpa"]
    if getattr(before, "qlora_pairs", False):
        return

    def sdpa_or_pairs(module, query, key, value, attention_mask, pair_layout: PairLayout | None = None, **kwargs):
        if pair_layout is None:
            return before(module, query, key, value, attention_mask, **kwargs)
        # attention_mask: None (the all-ones one pack gives makes transformers build none); unused either way
        return pair_attention(module, query, key, value, pair_layout, **kwargs)

    sdpa_or_pairs.qlora_pairs = True
    AttentionInterface.register("sdpa", sdpa_or_pairs)
