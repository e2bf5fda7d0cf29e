"""Training methods: what ``qlora train`` optimizes, behind one small interface (the seam between
the training run, qlora/train.py, and what is being learned).

A method turns records into examples and batches and a batch into a loss::

    class Method(Protocol):
        name: str
        def examples(self, records, fmt, tokenizer, cfg) -> (list, dict)      # tokenized, + stats
        def batches(self, examples, cfg, pad_id, train: bool)                 # len(), epoch(k) -> batches
        def tokens(self, batch) -> int                                        # the loss's normaliser
        def loss(self, model, batch, device, static_shapes=False) -> (loss_sum, metrics: dict)

``loss`` returns a *sum* over the batch (a 0-dim tensor) that the run divides by the step's total
``tokens`` (summed over micro-batches and processes), so gradient accumulation and data parallelism
do not change the result; ``metrics`` (name -> number or 0-dim tensor) are averaged over the step's
micro-batches into its metrics row (a CUDA-graph replay returns the loss only). ``static_shapes``: no
shape may depend on the data (a CUDA graph captures the step). :class:`SFT`, supervised fine-tuning on
the response tokens, is the default; a preference method (DPO, ORPO) implements the same four.
"""
from __future__ import annotations

from typing import Protocol

from . import loss as losses


class Method(Protocol):
    name: str

    def examples(self, records, fmt: str, tokenizer, cfg) -> tuple[list, dict]: ...

    def batches(self, examples: list, cfg, pad_id: int, train: bool): ...

    def tokens(self, batch: dict) -> int: ...

    def loss(self, model, batch: dict, device, static_shapes: bool = False) -> tuple: ...


class SFT:
    """Supervised fine-tuning: the sum of token cross-entropies over the trained tokens (responses,
    or every token with ``--train-on-prompt``), normalised by their number."""

    name = "sft"

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
