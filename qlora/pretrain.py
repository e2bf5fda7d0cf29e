"""Continued pretraining on long documents (``--format text``): no text is dropped at ``--max-length``.

* Without ``--packing`` each document is split into windows of ``max_length`` tokens
  (:func:`windows`); with ``--stride N`` each window repeats the last N tokens of the previous one as
  context only (not trained again), so with ``N >= 1`` every token of the document is a target once.
* With ``--packing`` the documents are concatenated, each with its BOS (if the tokenizer adds one)
  and an EOS after it, and the stream is cut into full rows of ``max_length`` tokens (the last row
  holds the rest): :func:`stream`. Documents share a row and attend across the EOS, as in
  pretraining.

Labels follow qlora.data: the first token of a row predicts nothing (-100).
"""
from __future__ import annotations

from .errors import QLoraError

IGNORE = -100


def check_stride(stride, max_length) -> None:
    """``--stride`` must leave each window at least one new token."""
    if not isinstance(stride, int) or isinstance(stride, bool) or not 0 <= stride < max_length:
        raise QLoraError(f"--stride must be an integer in [0, --max-length) = [0, {max_length}), got {stride!r}")


def windows(ids: list[int], labels: list[int], max_length: int, stride: int = 0) -> list[tuple[list, list]]:
    """``(ids, labels)`` cut into windows of at most ``max_length`` tokens, each starting ``max_length -
    stride`` tokens after the previous one; the ``stride`` repeated tokens are context only."""
    check_stride(stride, max_length)
    step, out, start = max_length - stride, [], 0
    while True:
        w_ids, w_labels = ids[start:start + max_length], list(labels[start:start + max_length])
        if start:
            w_labels[:stride] = [IGNORE] * min(stride, len(w_labels))
        if w_labels:
            w_labels[0] = IGNORE
        out.append((w_ids, w_labels))
        if start + max_length >= len(ids):
            return out
        start += step


def stream(docs: list[tuple[list, list]], max_length: int, stride: int = 0) -> list[tuple[list, list]]:
    """The documents' ``(ids, labels)`` concatenated (each already ends with its EOS) and cut into rows."""
    ids = [t for d, _ in docs for t in d]
    labels = [t for _, lab in docs for t in lab]
    return windows(ids, labels, max_length, stride)
