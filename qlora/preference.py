"""Preference losses on the QLoRA model: DPO (sigmoid, IPO) and ORPO, the reference policy being the same
model with its LoRA adapters switched off (no second copy), and reference log-probs precomputed once per pair.

Batches come from :class:`qlora.preference_data.PairBatches`: rows ``c1..cB, r1..rB``, labels -100 outside
the answers. Definitions follow TRL (``DPOTrainer`` 1.x, ``experimental.orpo.ORPOTrainer``); with
``pc, pr, rc, rr`` the summed answer log-probs of chosen/rejected under the policy/reference and
``d = (pc - rc) - (pr - rr)``:

* DPO sigmoid: ``-(1 - ls) log σ(β d) - ls log σ(-β d)`` (``ls``: label smoothing, cDPO; 0 default);
* IPO: ``(d' - 1/(2β))²`` with ``d'`` the same difference of *per-token averaged* log-ratios;
* ORPO: ``NLL(chosen) - β log σ(log odds)``, ``log odds = (ac - ar) - (log(1 - e^ac) - log(1 - e^ar))``
  on the answers' mean per-token log-probs ``ac, ar``; NLL is the mean token cross-entropy of the chosen rows.

Each method's ``loss`` returns the mean over the micro-batch's pairs (TRL's value for that batch); a trainer
accumulating micro-batches weights each by its number of pairs (``len(batch["index"])``) over the step's.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from . import shared_prefix
from .data import IGNORE
from .errors import QLoraError
from .linear import QLoRALinear

DPO_LOSSES = ("sigmoid", "ipo")


# ------------------------------------------------------------------------------ reference
@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Run ``model`` as its frozen base inside: every :class:`QLoRALinear` with an adapter skips it (its
    ``disable_adapter`` flag, which takes the layer's no-LoRA path: no LoRA GEMM at all)."""
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear) and m.r > 0 and not m.disable_adapter]
    for m in layers:
        m.disable_adapter = True
    try:
        yield
    finally:
        for m in layers:
            m.disable_adapter = False


# -------------------------------------------------------------------------------- log-probs
def _chunked_ok(model) -> bool:
    from .loss import _chunked_loss_ok  # the architectures whose LM head the chunked loss reproduces
    return _chunked_loss_ok(model)


def scored_sums(model, inputs: dict, rows: list) -> torch.Tensor:
    """One forward pass over ``inputs``; for each ``(row, positions, targets)`` of ``rows``, the sum of the
    log-probs of ``targets`` as predicted at ``positions`` of that row, fp32 [len(rows)]. Where the
    architecture allows (train.loss_sum's check) the LM head runs in chunks on those positions only
    (:func:`kernels.loss.chunked_linear_cross_entropy`), so no full logits tensor exists; else the logits
    are scored row by row."""
    if _chunked_ok(model):
        from .kernels.loss import chunked_linear_cross_entropy
        h = model.model(**inputs, use_cache=False).last_hidden_state
        w = model.get_output_embeddings().weight
        grad = torch.is_grad_enabled()
        return torch.stack([-chunked_linear_cross_entropy(h[b][s], w, t, reduction="sum", grad_in_forward=grad)
                            for b, s, t in rows])
    logits = model(**inputs, use_cache=False).logits
    return torch.stack([torch.log_softmax(logits[b][s].float(), -1).gather(1, t.unsqueeze(1)).sum() for b, s, t in rows])


def row_logps(model, batch: dict, device, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each mask [R, T-1] (over next-token positions: position t scores token t + 1), the per-row sum of
    the log-probs of the tokens it selects, fp32 [R], from one forward pass (:func:`scored_sums`)."""
    ids = batch["input_ids"].to(device)
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"].to(device)}
    tgt, R = ids[:, 1:], ids.shape[0]
    rows = [(b, m[b].nonzero().squeeze(1), tgt[b][m[b]]) for m in (m.to(device) for m in masks) for b in range(R)]
    return list(scored_sums(model, inputs, rows).split(R))


def answer_mask(batch: dict) -> torch.Tensor:
    """[R, T-1] bool: the next-token positions whose target is an answer token."""
    return batch["labels"][:, 1:] != IGNORE


def sequence_logps(model, batch: dict, device=None, share_prompt: bool | str = False) -> torch.Tensor:
    """Sum of the answer tokens' log-probs of every row, fp32 [2B] (chosen rows first). ``share_prompt`` (True,
    False or "auto": :func:`qlora.shared_prefix.wanted`): where the attention allows it (sdpa: pair attention;
    eager: a 4D mask) and it saves enough, each pair's shared prompt runs once (:mod:`qlora.shared_prefix`)."""
    device = device if device is not None else batch["input_ids"].device
    how = shared_prefix.path(model) if shared_prefix.wanted(share_prompt, device, model) else None
    if how is not None:
        dtype = None if how == "pairs" else model.get_input_embeddings().weight.dtype
        key = "_packed_pairs" if dtype is None else f"_packed_{dtype}"  # DPO's policy and reference passes share one packing of the batch
        if key not in batch:
            batch[key] = shared_prefix.pack(batch, dtype)
        if batch[key] is not None:
            return packed_logps(model, batch[key], device)
    return row_logps(model, batch, device, [answer_mask(batch)])[0]


def packed_logps(model, packed: dict, device) -> torch.Tensor:
    """:func:`sequence_logps` of a :func:`qlora.shared_prefix.pack` batch: one forward over the packed rows,
    each sequence's scored tokens read at the positions that predict them."""
    inputs = {k: packed[k].to(device) for k in ("input_ids", "position_ids", "attention_mask")}
    layout = packed.get("pair_layout")
    if layout is not None:  # a forward keyword: transformers hands it to every attention call, recomputes too
        shared_prefix.install()
        inputs["pair_layout"] = layout = layout.to(device)
    B = inputs["input_ids"].shape[0]
    sums = scored_sums(model, inputs, [(k % B, s.to(device), t.to(device))
                                       for k, (s, t) in enumerate(zip(packed["src"], packed["tgt"]))])
    if layout is not None and not layout.calls:  # else every token attended to the whole row: wrong log-probs
        raise QLoraError(f"--share-prompt: the attention of {type(model).__name__} never received the pair layout "
                         "(its forward does not pass extra keywords down to an sdpa attention function): use "
                         "--share-prompt false")
    return sums


# ----------------------------------------------------------------------------------- losses
def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             lengths: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-pair DPO losses [B] from summed answer log-probs (see the module docstring); ``lengths`` (answer
    token counts of chosen and rejected) are needed by IPO, which averages the log-ratios per token."""
    dc, dr = pc - rc, pr - rr
    if loss_type == "sigmoid":
        z = beta * (dc - dr)
        return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if loss_type == "ipo":
        if lengths is None:
            raise QLoraError("the IPO loss needs the answers' token counts (lengths=)")
        nc, nr = (n.to(dc.dtype).clamp(min=1.0) for n in lengths)
        return (dc / nc - dr / nr - 1 / (2 * beta)) ** 2
    raise QLoraError(f"unknown DPO loss {loss_type!r}: choose one of {', '.join(DPO_LOSSES)}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(ac: torch.Tensor, ar: torch.Tensor, nll: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, log_odds [B])``: ``nll - β mean(log σ(log odds))`` from the answers' mean per-token log-probs."""
    ac, ar = ac.float(), ar.float()
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    return nll - beta * F.logsigmoid(log_odds).mean(), log_odds


def _reward_metrics(cr: torch.Tensor, rr: torch.Tensor, lc: torch.Tensor, lr: torch.Tensor) -> dict:
    """TRL's metric names, each the mean over the micro-batch's pairs (detached 0-d tensors: no host sync)."""
    return {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
            "rewards/accuracies": (cr > rr).float().mean(), "logps/chosen": lc.detach().mean(),
            "logps/rejected": lr.detach().mean()}


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise QLoraError(f"--beta must be a positive number, got {beta!r}")
    return float(beta)


# ---------------------------------------------------------------------------------- methods
class DPO:
    """Direct Preference Optimization against the adapter-free model (or precomputed reference log-probs,
    ``ref_logps`` [N, 2] fp32 indexed by ``batch["index"]``: see :func:`precompute_reference`)."""
    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ref_logps: torch.Tensor | None = None, sft_weight: float = 0.0, share_prompt: bool | str = False):
        if isinstance(sft_weight, bool) or not isinstance(sft_weight, (int, float)) or not math.isfinite(sft_weight) \
                or sft_weight < 0:
            raise QLoraError(f"--sft-weight must be a number >= 0, got {sft_weight!r}")
        self.sft_weight = float(sft_weight)
        if loss_type not in DPO_LOSSES:
            raise QLoraError(f"unknown DPO loss {loss_type!r}: choose one of {', '.join(DPO_LOSSES)}")
        if not 0.0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
            raise QLoraError(f"label smoothing must be in [0, 0.5) and used with the sigmoid loss only, "
                             f"got {label_smoothing} with {loss_type}")
        self.beta, self.loss_type, self.label_smoothing = _check_beta(beta), loss_type, float(label_smoothing)
        self.ref_logps, self.share_prompt = ref_logps, share_prompt  # (True, False or "auto")

    def reference(self, model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the batch's chosen and rejected answers, [B] each."""
        if self.ref_logps is not None:
            ref = self.ref_logps[batch["index"]].to(device)
            return ref[:, 0], ref[:, 1]
        with torch.no_grad(), adapters_off(model):
            return sequence_logps(model, batch, device, self.share_prompt).chunk(2)

    def loss(self, model, batch: dict, device) -> tuple[torch.Tensor, dict]:
        mask = answer_mask(batch)
        pc, pr = sequence_logps(model, batch, device, self.share_prompt).chunk(2)
        rc, rr = self.reference(model, batch, device)
        losses = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing,
                          lengths=mask.sum(1).to(device).chunk(2))
        cr, rr_ = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        loss, metrics = losses.mean(), _reward_metrics(cr, rr_, pc, pr)
        if self.sft_weight:  # TRL's loss_type=[..., "sft"]: the chosen answers' mean NLL per token, weighted
            nll = -pc.sum() / mask[:pc.shape[0]].sum().to(device).clamp(min=1)
            loss = loss + self.sft_weight * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics


class ORPO:
    """Odds Ratio Preference Optimization: no reference model. ``nll_on_prompt``: the NLL term also covers
    the prompt tokens of the chosen rows, as TRL's ORPOTrainer computes it; default off, the NLL is on the
    chosen answer only, like our SFT loss."""
    name = "orpo"

    def __init__(self, beta: float = 0.1, nll_on_prompt: bool = False, share_prompt: bool | str = False):
        self.beta, self.nll_on_prompt = _check_beta(beta), bool(nll_on_prompt)
        self.share_prompt = share_prompt  # (True, False or "auto")

    def loss(self, model, batch: dict, device) -> tuple[torch.Tensor, dict]:
        mask = answer_mask(batch)
        masks = [mask]
        if self.nll_on_prompt:  # every real next token that is not an answer token (scored per row: no sharing)
            masks.append((batch["attention_mask"][:, 1:] == 1) & ~mask)
            sums = row_logps(model, batch, device, masks)
        else:
            sums = [sequence_logps(model, batch, device, self.share_prompt)]
        n = mask.sum(1).to(device)
        B = n.shape[0] // 2
        nll_sum, nll_n = -sums[0][:B].sum(), n[:B].sum()
        if self.nll_on_prompt:
            nll_sum, nll_n = nll_sum - sums[1][:B].sum(), nll_n + masks[1][:B].sum().to(device)
        avg = sums[0] / n.clamp(min=1)
        ac, ar = avg.chunk(2)
        nll = nll_sum / nll_n
        loss, log_odds = orpo_loss(ac, ar, nll, self.beta)
        metrics = _reward_metrics(self.beta * ac.detach(), self.beta * ar.detach(), ac, ar)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": F.logsigmoid(log_odds).detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        return loss, metrics


# ------------------------------------------------------------------- precomputed reference
@torch.no_grad()
def precompute_reference(model, batches, device, share_prompt: bool | str = False) -> torch.Tensor:
    """Reference log-probs of every pair, [N, 2] fp32 (chosen, rejected) with row i for ``batches.pairs[i]``:
    one pass of the adapter-free model over one epoch of ``batches`` (a :class:`PairBatches`)."""
    out = torch.full((len(batches.pairs), 2), float("nan"), dtype=torch.float32)
    with adapters_off(model):
        for b in batches.epoch(0):
            out[b["index"]] = torch.stack(sequence_logps(model, b, device, share_prompt).float().cpu().chunk(2), dim=1)
    return out


def save_reference(path, ref: torch.Tensor, digest: str) -> None:
    """Write ``ref`` [N, 2] as safetensors (``ref_logps``; metadata: the pairs' digest), atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"ref_logps": ref.float().contiguous()}, tmp, metadata={"digest": digest, "pairs": str(len(ref))})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reference(path, digest: str) -> torch.Tensor:
    """The [N, 2] reference log-probs saved by :func:`save_reference`, checked against the data's digest."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, ref = f.metadata() or {}, f.get_tensor("ref_logps")
    except Exception as e:  # missing file, not safetensors, no ref_logps tensor
        raise QLoraError(f"{path}: cannot read reference log-probs ({e})") from None
    if meta.get("digest") != digest:
        raise QLoraError(f"{path}: the reference log-probs were computed for other preference data "
                         "(tokens differ): precompute them again")
    return ref
