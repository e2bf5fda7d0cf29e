"""Training methods: what ``qlora train`` optimizes, behind one small interface (the seam between
the training run, qlora/train.py, and what is being learned).

A method turns records into examples and batches and a batch into a loss::

    class Method(Protocol):
        name: str
        def read(self, path, cfg) -> (records, fmt)                         # checked, before the model loads
        def examples(self, records, fmt, tokenizer, cfg) -> (list, dict)      # tokenized, + stats
        def batches(self, examples, cfg, pad_id, train: bool)                 # len(), epoch(k) -> batches
        def tokens(self, batch) -> int                                        # the loss's normaliser
        def loss(self, model, batch, device, static_shapes=False) -> (loss_sum, metrics: dict)

``loss`` returns a *sum* over the batch (a 0-dim tensor) that the run divides by the step's total
``tokens`` (summed over micro-batches and processes), so gradient accumulation and data parallelism
do not change the result; ``metrics`` (name -> number or 0-dim tensor) are averaged over the step's
micro-batches into its metrics row (a CUDA-graph replay returns the loss only). ``static_shapes``: no
shape may depend on the data (a CUDA graph captures the step). ``read`` reads and checks a data file
before any model loads. :class:`SFT`, supervised fine-tuning on the response tokens, is the default;
:class:`Preference` puts DPO and ORPO (qlora/preference.py) behind the same five; :func:`method_for`
picks one from ``--method``.

Optional attributes the run reads: ``graphs_refused`` (why the method's steps cannot be CUDA-graphed;
None: they can) and ``bar`` (progress-bar label -> metric name).
"""
from __future__ import annotations

from typing import Protocol

from . import loss as losses


class Method(Protocol):
    name: str

    def read(self, path, cfg) -> tuple: ...

    def examples(self, records, fmt: str, tokenizer, cfg) -> tuple[list, dict]: ...

    def batches(self, examples: list, cfg, pad_id: int, train: bool): ...

    def tokens(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict, device, static_shapes: bool = False) -> tuple: ...


class SFT:
    """Supervised fine-tuning: the sum of token cross-entropies over the trained tokens (responses,
    or every token with ``--train-on-prompt``), normalised by their number."""

    name = "sft"
    graphs_refused = None
    bar: dict = {}

    def read(self, path, cfg) -> tuple:
        """``(records, format)`` of an SFT data file (qlora.data.read_records); with ``--truncate false``
        over-long records are refused here too, when the model folder's tokenizer loads on its own."""
        from .data import check_lengths_before_load, read_records
        records, fmt = read_records(path, cfg.format, getattr(cfg, "data_field", None))
        if not cfg.truncate and fmt != "text":  # text documents are cut into windows, never refused
            tok_src = cfg.tokenizer_from if (cfg.model or "").startswith("shape:") else cfg.model
            check_lengths_before_load(records, fmt, tok_src, cfg.max_length, cfg.train_on_prompt, cfg.template)
        return records, fmt

    def examples(self, records, fmt: str, tokenizer, cfg) -> tuple[list, dict]:
        from .data import tokenize_records
        # text documents are never truncated: windows, or with --packing full rows of their concatenation
        text_mode = "stream" if cfg.packing else "windows"
        return tokenize_records(records, fmt, tokenizer, max_length=cfg.max_length,
                                train_on_prompt=cfg.train_on_prompt, truncate=cfg.truncate, template=cfg.template,
                                text_mode=text_mode, stride=getattr(cfg, "stride", 0))

    def batches(self, examples: list, cfg, pad_id: int, train: bool):
        from .data import Batches
        if train:
            return Batches(examples, cfg.batch_size, pad_id, packing=cfg.packing, max_length=cfg.max_length,
                           seed=cfg.seed)
        return Batches(examples, cfg.batch_size, pad_id, max_length=cfg.max_length, shuffle=False)

    def tokens(self, batch: dict) -> int:
        return int(batch["num_tokens"])

    def loss(self, model, batch: dict, device, static_shapes: bool = False) -> tuple:
        # looked up on the module at each call (tests replace qlora.loss.loss_sum)
        return losses.loss_sum(model, batch, device, static_shapes=static_shapes), {}


class Preference:
    """DPO or ORPO (``core``: a :class:`qlora.preference.DPO` or :class:`~qlora.preference.ORPO`) at the
    seam. A micro-batch holds ``--batch-size`` pairs (both answers of each); ``tokens`` is its number of
    pairs and ``loss`` the core's mean times that number, so the run's normalisation gives the mean loss
    over the step's pairs (TRL's weighting of accumulated micro-batches). Validation batches score the
    DPO reference live (the model with adapters off) even when the training pairs' reference log-probs
    were precomputed (those are indexed by training pair)."""

    graphs_refused = "preference batches vary in shape with the data (two answers per pair, not bucketed)"
    bar = {"acc": "rewards/accuracies", "margin": "rewards/margins"}

    def __init__(self, core):
        self.core, self.name = core, core.name

    def read(self, path, cfg) -> tuple:
        from .preference_data import read_pairs
        return read_pairs(path), "pairs"

    def examples(self, records, fmt: str, tokenizer, cfg) -> tuple[list, dict]:
        from .preference_data import tokenize_pairs
        pairs, stats = tokenize_pairs(records, tokenizer, max_length=cfg.max_length, truncate=cfg.truncate,
                                      template=cfg.template)
        from .shared_prefix import common_prefix
        shared = sum(common_prefix(p.chosen.input_ids, p.rejected.input_ids) for p in pairs)
        return pairs, dict(stats, examples=stats["kept"], shared_prompt_tokens=shared)

    def batches(self, examples: list, cfg, pad_id: int, train: bool):
        from .preference_data import PairBatches
        b = PairBatches(examples, cfg.batch_size, pad_id, seed=cfg.seed, shuffle=train)
        b.live_reference = not train
        return b

    def tokens(self, batch: dict) -> int:
        return int(batch["index"].numel())

    def loss(self, model, batch: dict, device, static_shapes: bool = False) -> tuple:
        core = self.core
        if batch.get("live_reference") and getattr(core, "ref_logps", None) is not None:
            import copy
            core = copy.copy(core)
            core.ref_logps = None
        loss, metrics = core.loss(model, batch, device)
        return loss * self.tokens(batch), metrics


def method_for(cfg):
    """The method ``cfg.method`` names, with its settings (``--beta``, ``--loss``, ``--sft-weight``)."""
    if cfg.method == "sft":
        return SFT()
    from .preference import DPO, ORPO
    share = getattr(cfg, "share_prompt", "auto")  # (resolved per device: qlora.shared_prefix.wanted)
    if cfg.method == "dpo":
        return Preference(DPO(beta=cfg.beta, loss_type=cfg.loss, sft_weight=cfg.sft_weight, share_prompt=share))
    if cfg.method == "orpo":
        return Preference(ORPO(beta=cfg.beta, share_prompt=share))
    from .errors import QLoraError
    raise QLoraError(f"--method {cfg.method!r}: choose one of sft, dpo, orpo")
