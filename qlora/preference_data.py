"""Preference data for DPO/ORPO: read pairs of a better and a worse answer to one prompt, check them
before any model loads, render both answers with the chat template, and batch each pair's two sequences
together.

Records (one layout per record; the file types of :func:`qlora.data.read_file`):

* strings: ``{"prompt": str, "chosen": str, "rejected": str}`` -- rendered as a user turn and one
  assistant turn, like the SFT ``completion`` format;
* TRL's conversational layout: ``{"chosen": [messages], "rejected": [messages]}``, two conversations
  that share every message but the last, an assistant answer; or with an explicit ``"prompt": [messages]``
  and ``chosen``/``rejected`` holding only the answer (``[{"role": "assistant", ...}]``). A string
  ``prompt`` beside message lists (UltraFeedback's layout) is ignored when the conversations hold a user
  turn, else it becomes that turn. In CSV/TSV files a ``prompt``/``chosen``/``rejected`` cell that holds
  a JSON list is read as messages.

The loss is only on the final answer (its tokens up to and including the end-of-turn/EOS token, as
:mod:`qlora.data` marks an assistant turn); the prompt, earlier turns and padding are -100.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .data import IGNORE, Batches, Example, _chat_layout, _example, _plain_layout, _ROLES, read_file, rendering
from .errors import QLoraError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PairRecord:
    """A checked record: the prompt as messages, and the two answers' texts."""
    prompt: list[dict]
    chosen: str
    rejected: str
    where: str


@dataclass
class Pair:
    """One tokenized pair; both sequences start with the same prompt tokens and train on the answer only."""
    chosen: Example
    rejected: Example
    where: str


# ----------------------------------------------------------------------------------- reading
def read_pairs(path) -> list[PairRecord]:
    """Every record of ``path`` as a checked :class:`PairRecord` (a one-line QLoraError naming the file and
    line of the first bad record otherwise)."""
    csv_cells = Path(path).suffix.lower() in (".csv", ".tsv")
    return [check_pair(_json_cells(r) if csv_cells else r, getattr(r, "where", "record")) for r in read_file(path)]


def _json_cells(r: dict) -> dict:
    """A CSV row with its JSON-list cells (conversations) decoded; other cells stay strings."""
    out = type(r)(r)
    out.where = getattr(r, "where", "record")
    for k in FIELDS:
        v = r.get(k)
        if isinstance(v, str) and v.lstrip().startswith("["):
            try:
                dec = json.loads(v)
            except json.JSONDecodeError:
                continue  # an answer that happens to start with "[" is text
            if isinstance(dec, list) and all(isinstance(m, dict) for m in dec):
                out[k] = dec
    return out


def check_pair(r: dict, where: str) -> PairRecord:
    """Check one record in either layout and bring it to a prompt (messages) and two answer texts."""
    for key in ("chosen", "rejected"):
        if r.get(key) is None:
            raise QLoraError(f"{where}: missing field {key!r} (preference data needs prompt, chosen and rejected, "
                             "or chosen and rejected conversations)")
    chosen, rejected, prompt = r["chosen"], r["rejected"], r.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        prompt, chosen, rejected = _conversations(chosen, rejected, prompt, where)
    else:
        if prompt is None:
            raise QLoraError(f"{where}: missing field 'prompt' (string chosen/rejected answers need a prompt)")
        for key, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(v, str):
                raise QLoraError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
        prompt = [{"role": "user", "content": prompt}]
    for key, v in (("chosen", chosen), ("rejected", rejected)):
        if not v.strip():
            raise QLoraError(f"{where}: the {key} response is empty")
    if chosen == rejected:
        raise QLoraError(f"{where}: chosen and rejected are identical, so there is no preference to learn")
    return PairRecord(prompt, chosen, rejected, where)


def _conversations(chosen, rejected, prompt, where: str) -> tuple[list[dict], str, str]:
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise QLoraError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    chosen, rejected = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
    if isinstance(prompt, list):
        prompt = _messages(prompt, "prompt", where)
        chosen, rejected = prompt + chosen, prompt + rejected
    elif isinstance(prompt, str):
        if not any(m["role"] == "user" for m in chosen + rejected):
            user = [{"role": "user", "content": prompt}]
            chosen, rejected = user + chosen, user + rejected
    elif prompt is not None:
        raise QLoraError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise QLoraError(f"{where}: the {key} conversation must end with an assistant answer, "
                             f"not a {msgs[-1]['role']} message")
    if chosen[:-1] != rejected[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                 min(len(chosen), len(rejected)) - 1)
        raise QLoraError(f"{where}: the chosen and rejected conversations have different prompts (they differ at "
                         f"message {i}); both must share every message but the final assistant answer")
    if not chosen[:-1]:
        raise QLoraError(f"{where}: the conversations hold only the answer and no prompt: add the user turn "
                         "or a 'prompt' field")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _messages(msgs: list, key: str, where: str) -> list[dict]:
    """``[{"role", "content"}]`` with checked roles (chat and ShareGPT names) and string contents."""
    if not msgs:
        raise QLoraError(f"{where}: {key!r} is an empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QLoraError(f"{where}: {key}[{i}] must be a {{'role', 'content'}} object")
        role = _ROLES.get(m["role"])
        if role is None:
            raise QLoraError(f"{where}: {key}[{i}] has role {m['role']!r}: use system, user or assistant")
        if not isinstance(m["content"], str):
            raise QLoraError(f"{where}: {key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": role, "content": m["content"]})
    return out


# -------------------------------------------------------------------------------- tokenizing
def tokenize_pairs(records: list[PairRecord], tokenizer, max_length: int = 1024, truncate: bool = True,
                   template: str = "auto") -> tuple[list[Pair], dict]:
    """Render and tokenize both sequences of every pair, the loss on the final answer only.

    ``template`` as in :func:`qlora.data.tokenize_records`. A sequence longer than ``max_length`` is cut
    at its end (as :mod:`qlora.data` and TRL's default ``keep_start`` do: the prompt stays whole and the
    answer keeps its beginning), or rejected when not ``truncate``; a pair is dropped when either answer
    has no token left or both kept answers are the same tokens. Stats: pairs, kept, truncated (pairs),
    dropped, longest (tokens before truncation), tokens, trained_tokens, template, template_fallback."""
    tk, use_chat = rendering(tokenizer, template, max_length)
    stats = {"pairs": len(records), "kept": 0, "truncated": 0, "dropped": 0, "longest": 0, "tokens": 0,
             "trained_tokens": 0, "template": "chat" if use_chat else "plain", "template_fallback": 0}
    pairs, too_long = [], 0
    for c in range(0, len(records), 512):  # the tokenizer encodes a chunk at once
        chunk = records[c:c + 512]
        layouts = []  # (text, [answer span], prefix ids) for chosen, rejected of each record
        for rec in chunk:
            for answer in (rec.chosen, rec.rejected):
                msgs = rec.prompt + [{"role": "assistant", "content": answer}]
                if use_chat:
                    text, spans, fell_back = _chat_layout(tk, msgs, rec.where)
                    stats["template_fallback"] += fell_back
                    layouts.append((text, spans[-1:], []))
                else:
                    text, spans = _plain_layout(msgs)
                    layouts.append((text, spans[-1:], tk.prefix))
        encoded = tk.encode([(t, sp) for t, sp, _ in layouts])
        for j, rec in enumerate(chunk):
            seqs = [_example(tk, encoded[2 * j + k], layouts[2 * j + k][1], layouts[2 * j + k][2], False)
                    for k in (0, 1)]
            stats["longest"] = max(stats["longest"], *map(len, seqs))
            if max(map(len, seqs)) > max_length:
                too_long += 1
                seqs = [Example(e.input_ids[:max_length], e.labels[:max_length]) for e in seqs]
            answers = [[t for t in e.labels if t != IGNORE] for e in seqs]
            if not answers[0] or not answers[1] or answers[0] == answers[1]:
                stats["dropped"] += 1
                continue
            pairs.append(Pair(seqs[0], seqs[1], rec.where))
            stats["tokens"] += len(seqs[0]) + len(seqs[1])
            stats["trained_tokens"] += len(answers[0]) + len(answers[1])
    if too_long and not truncate:
        raise QLoraError(f"{too_long} of {len(records)} pairs have a sequence longer than max_length={max_length} "
                         f"tokens (longest: {stats['longest']}): raise --max-length or allow truncation")
    stats["truncated"], stats["kept"] = too_long, len(pairs)
    if not pairs:
        raise QLoraError(f"no pair has two different answers left to train on (of {len(records)}, {too_long} "
                         f"truncated to max_length={max_length}): raise --max-length")
    return pairs, stats


def load_pairs(path, tokenizer, **kwargs) -> tuple[list[Pair], dict]:
    """:func:`read_pairs` then :func:`tokenize_pairs` (kwargs go to the latter)."""
    return tokenize_pairs(read_pairs(path), tokenizer, **kwargs)


def pairs_digest(pairs: list[Pair]) -> str:
    """sha256 of every pair's tokens and labels, in order: names the data that per-example values
    (precomputed reference log-probs) belong to."""
    h = hashlib.sha256()
    for p in pairs:
        for e in (p.chosen, p.rejected):
            h.update(json.dumps([e.input_ids, e.labels], separators=(",", ":")).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ batches
class PairBatches(Batches):
    """:class:`qlora.data.Batches` over pairs: the same seeded, resumable plan (a pair is one row, of the
    length of its two sequences together; grouped by length, longest batch first), and a batch of B pairs is

    ``input_ids``/``labels``/``attention_mask`` [2B, T]: rows ``c1..cB, r1..rB`` (chosen sequences, then
    the rejected ones in the same order), right-padded with ``pad_id``/-100/0; ``index`` [B] long: each
    pair's position in ``pairs`` (the key of precomputed values); ``num_tokens``: trained tokens; and
    ``live_reference: True`` when the instance's ``live_reference`` is set (validation pairs: their
    index is not a key of the training pairs' precomputed values)."""

    live_reference = False

    def __init__(self, pairs: list[Pair], batch_size: int, pad_id: int, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, pad_to_multiple_of: int = 1):
        if not pairs:
            raise QLoraError("no preference pairs")
        self.pairs = pairs
        # Batches plans from lengths only: a range stands in for each pair's tokens
        sizes = [Example(range(len(p.chosen) + len(p.rejected)), []) for p in pairs]
        super().__init__(sizes, batch_size, pad_id, packing=False, seed=seed, shuffle=shuffle,
                         group_by_length=group_by_length, pad_to_multiple_of=pad_to_multiple_of)

    def collate(self, rows: list[int]) -> dict:
        import torch
        idx = [i for r in rows for i in self.rows[r]]
        seqs = [self.pairs[i].chosen for i in idx] + [self.pairs[i].rejected for i in idx]
        T = max(len(e) for e in seqs)
        T = -(-T // self.multiple) * self.multiple
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, e in enumerate(seqs):
            n = len(e)
            ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[b, :n] = torch.tensor(e.labels, dtype=torch.long)
            mask[b, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask,
               "index": torch.tensor(idx, dtype=torch.long), "num_tokens": (labels != IGNORE).sum()}
        if self.live_reference:
            out["live_reference"] = True
        return out
