"""Training data: read a local file, detect its format, render it to tokens with a loss mask,
and cut it into deterministic, resumable batches (padded, or packed several examples a row).

Files: ``.jsonl``/``.ndjson`` (one JSON object a line), ``.json`` (a list of objects),
``.csv``/``.tsv`` (a header row; a ``messages`` cell holds a JSON list), ``.parquet``.
Formats (one per file; detected from the keys, or forced):

* ``alpaca``:     ``{"instruction", "input"?, "output", "system"?}``
* ``chat``:       ``{"messages": [{"role": system|user|assistant, "content"}]}`` (ShareGPT's
  ``{"conversations": [{"from": human|gpt|system, "value"}]}`` is read as chat too)
* ``completion``: ``{"prompt", "completion", "system"?}``
* ``text``:       ``{"text"}``

Labels follow the transformers convention: ``labels`` is aligned with ``input_ids`` and the
model shifts it (the logits at position t are scored against ``labels[t + 1]``); -100 means
"no loss". ``labels[0]`` is always -100 (nothing predicts the first token), which also keeps a
packed row from scoring one example's first token against the previous example.

Longer than 500 lines: reading, format detection, rendering with loss masks and batching are one
pipeline in the order data flows through it; each part is short.
"""
from __future__ import annotations

import bisect
import csv
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import QLoraError

FORMATS = ("alpaca", "chat", "completion", "text")
TEMPLATES = ("auto", "chat", "plain")
IGNORE = -100
_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",),
           "completion": ("prompt", "completion"), "text": ("text",)}
_OPTIONAL = {"alpaca": ("input", "system"), "completion": ("system",), "chat": (), "text": ()}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant",  # chat and ShareGPT names
          "human": "user", "gpt": "assistant", "model": "assistant"}


class Record(dict):
    """A record as read from the file; ``where`` is ``"file:LINE"`` (``"file:row N"`` for Parquet)."""
    where: str = "?"


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding is masked out either way)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise QLoraError("the tokenizer has neither a pad nor an EOS token: cannot pad batches")
    return pid


def _record(obj, where: str) -> Record:
    if not isinstance(obj, dict):
        raise QLoraError(f"{where}: expected a JSON object {{...}}, got {type(obj).__name__}")
    r = Record(obj)
    r.where = where
    return r


# ----------------------------------------------------------------------------------- reading
def read_records(path, fmt: str | None = None, fields: str | None = None) -> tuple[list[Record], str]:
    """Read every record of a local JSONL/JSON/CSV/TSV/Parquet file (or a data set: qlora.hfdata) and
    check its format.

    Returns ``(records, format)``; ``fmt`` forces a format (missing fields are then errors),
    ``None`` or ``"auto"`` detects it from the first record and requires the rest to match;
    ``fields`` (``--data-field``) renames columns first, e.g. ``question=instruction,answer=output``."""
    from .hfdata import parse_fields, rename
    if fmt == "auto":
        fmt = None
    if fmt is not None and fmt not in FORMATS:
        raise QLoraError(f"unknown data format {fmt!r}: choose one of auto, {', '.join(FORMATS)}")
    mapping = parse_fields(fields)
    records = rename(read_file(path), mapping, str(path))
    fmt = _check_formats(records, fmt)
    if not any(_answered(r, fmt) for r in records):  # before any model loads
        raise QLoraError(f"{path}: 0 of {len(records)} examples have a response to train on: every "
                         f"{'text' if fmt == 'text' else 'assistant answer'} is empty")
    return records, fmt


def read_file(path) -> list[Record]:
    """Every record of a local JSONL/JSON/CSV/TSV/Parquet file, each knowing its file and line, with no
    format check (``read_records`` checks the SFT formats; preference data checks its own). A data set
    of the ``datasets`` library (``hf:org/name[:split]``, a save_to_disk folder) is read by qlora.hfdata."""
    from . import hfdata
    if hfdata.is_dataset(path):
        records = [_record(r, f"{path}:row {i}") for i, r in enumerate(hfdata.read(path), 1)]
        if not records:
            raise QLoraError(f"{path}: the data set has no rows")
        return records
    p = Path(path)
    if not p.exists():
        hint = " (only local files are read: download the data set first)" if "://" in str(path) else ""
        raise QLoraError(f"{path}: no such file{hint}")
    if not p.is_file():
        raise QLoraError(f"{path}: not a file (give a .jsonl, .json, .csv, .tsv or .parquet file)")
    if p.stat().st_size == 0:
        raise QLoraError(f"{path}: the file is empty")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        records = _read_parquet(p)
    elif suffix in (".csv", ".tsv"):
        records = _read_csv(p, "\t" if suffix == ".tsv" else ",")
    else:
        text = _read_text(p)
        head = text.lstrip()[:1]
        if suffix not in (".jsonl", ".ndjson", ".json", ".txt", "") and head not in ("[", "{"):
            raise QLoraError(f"{path}: unknown file type {suffix!r}: use .jsonl, .json, .csv, .tsv or .parquet")
        records = _read_json_array(p, text) if head == "[" else _read_jsonl(p, text)
    if not records:
        raise QLoraError(f"{path}: the file has no records")
    return records


def _answered(record: dict, fmt: str) -> bool:
    """The record has a non-empty response: an assistant message (or the text) that is not blank.
    A blank one would train only the end-of-turn token: a model that answers nothing."""
    if fmt == "text":
        return bool(str(record.get("text") or "").strip())
    return any(m["content"].strip() for m in to_messages(record, fmt) if m["role"] == "assistant")


def check_lengths_before_load(records, fmt: str, model_src, max_length: int, train_on_prompt: bool = False,
                              template: str = "auto") -> None:
    """``--truncate false``: refuse records longer than ``max_length`` tokens before the model loads,
    when its tokenizer loads on its own in a moment (a model folder with tokenizer files). A GGUF file
    or the embedded model carries its tokenizer inside the model file: there the check runs after the
    load, in :func:`tokenize_records`."""
    from .hub import local
    p = Path(local(model_src)).expanduser() if model_src else None
    if p is None or not p.is_dir() or not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception:  # noqa: BLE001 - the model load reports a bad tokenizer, with its own message
        return
    tokenize_records(records, fmt, tok, max_length=max_length, train_on_prompt=train_on_prompt, truncate=False,
                     template=template)


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise QLoraError(f"{p}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None


def _read_jsonl(p: Path, text: str) -> list[Record]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QLoraError(f"{p}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(_record(obj, f"{p}:{n}"))
    return out


def _read_json_array(p: Path, text: str) -> list[Record]:
    """A JSON list, decoded element by element so that each record knows its line."""
    dec, out = json.JSONDecoder(), []
    i = text.index("[") + 1
    line, counted = 1, 0

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def lineno(pos):
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    i = skip(i)
    while i < len(text) and text[i] != "]":
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise QLoraError(f"{p}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(_record(obj, f"{p}:{lineno(i)}"))
        i = skip(j)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i >= len(text) or text[i] != "]":
            raise QLoraError(f"{p}:{lineno(min(i, len(text)))}: invalid JSON (expected ',' or ']')")
    if i >= len(text):
        raise QLoraError(f"{p}:{lineno(len(text))}: invalid JSON (the list is not closed with ']')")
    if text[i + 1:].strip():
        raise QLoraError(f"{p}:{lineno(i)}: invalid JSON (extra data after the list)")
    return out


def _read_csv(p: Path, delimiter: str) -> list[Record]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts exceed the 128 KiB default
    out = []
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            start = 2
            for row in reader:
                where = f"{p}:{start}"
                start = reader.line_num + 1
                rec = {k: v for k, v in row.items() if k is not None and v is not None}
                for key in ("messages", "conversations"):
                    if isinstance(rec.get(key), str):
                        try:
                            rec[key] = json.loads(rec[key])
                        except json.JSONDecodeError as e:
                            raise QLoraError(f"{where}: column {key!r} is not valid JSON ({e.msg})") from None
                out.append(_record(rec, where))
    except UnicodeDecodeError as e:
        raise QLoraError(f"{p}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from None
    except csv.Error as e:
        raise QLoraError(f"{p}: invalid CSV ({e})") from None
    return out


def _read_parquet(p: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QLoraError("reading Parquet needs pyarrow: `pip install pyarrow` "
                         "(or convert the file to JSONL)") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise QLoraError(f"{p}: not a readable Parquet file ({e})") from None
    return [_record(r, f"{p}:row {i}") for i, r in enumerate(rows, 1)]


# ------------------------------------------------------------------------------------ formats
def detect_format(record: dict) -> str | None:
    """The format a record's keys point to, or None when no known key is present."""
    for key, fmt in (("messages", "chat"), ("conversations", "chat"), ("instruction", "alpaca"),
                     ("prompt", "completion"), ("text", "text"), ("output", "alpaca"),
                     ("completion", "completion")):
        if key in record:
            return fmt
    return None


def _check_formats(records: list[Record], forced: str | None) -> str:
    fmt, first = forced, None
    for r in records:
        if forced is None:
            got = detect_format(r)
            if got is None:
                raise QLoraError(f"{r.where}: cannot tell the format from the keys {sorted(r)}: expected "
                                 "instruction+output, messages, prompt+completion or text")
            if fmt is None:
                fmt, first = got, r
            elif got != fmt:
                raise QLoraError(f"{r.where}: record is in {got!r} format but the first record "
                                 f"({first.where}) is {fmt!r}; use one format per file")
        _check_fields(r, fmt)
    return fmt


def _check_fields(r: Record, fmt: str) -> None:
    if fmt == "chat":
        _chat_messages(r)
        return
    for key in _FIELDS[fmt]:
        if r.get(key) is None:
            raise QLoraError(f"{r.where}: missing field {key!r} (format {fmt} needs "
                             f"{' and '.join(_FIELDS[fmt])})")
    for key in _FIELDS[fmt] + _OPTIONAL[fmt]:
        if r.get(key) is not None and not isinstance(r[key], str):
            raise QLoraError(f"{r.where}: field {key!r} must be a string, got {type(r[key]).__name__}")


def _chat_messages(r: dict) -> list[dict]:
    """Validated ``[{"role", "content"}]`` of a chat (or ShareGPT) record."""
    where = getattr(r, "where", "record")
    share = "messages" not in r and "conversations" in r
    key, rk, ck = ("conversations", "from", "value") if share else ("messages", "role", "content")
    msgs = r.get(key)
    if msgs is None:
        raise QLoraError(f"{where}: missing field 'messages' (format chat needs messages)")
    if not isinstance(msgs, list) or not msgs:
        raise QLoraError(f"{where}: {key!r} must be a non-empty list of {{{rk!r}, {ck!r}}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise QLoraError(f"{where}: {key}[{i}] is missing field {rk!r} or {ck!r}")
        role = _ROLES.get(m[rk])
        if role is None:
            raise QLoraError(f"{where}: {key}[{i}] has role {m[rk]!r}: use system, user or assistant")
        if not isinstance(m[ck], str):
            raise QLoraError(f"{where}: {key}[{i}].{ck} must be a string, got {type(m[ck]).__name__}")
        out.append({"role": role, "content": m[ck]})
    if not any(m["role"] == "assistant" for m in out):
        raise QLoraError(f"{where}: the conversation has no assistant message to learn from")
    return out


def to_messages(record: dict, fmt: str) -> list[dict] | None:
    """The record as chat messages ``[{"role", "content"}]`` (system?, user, assistant...).

    alpaca: user = instruction, plus ``"\\n\\n" + input`` when input is non-empty; assistant =
    output. completion: user = prompt, assistant = completion. ``text`` has no turns: None."""
    if fmt == "text":
        return None
    if fmt == "chat":
        return _chat_messages(record)
    if fmt == "alpaca":
        user, answer = record["instruction"], record["output"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
    elif fmt == "completion":
        user, answer = record["prompt"], record["completion"]
    else:
        raise QLoraError(f"unknown data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


# --------------------------------------------------------------------------- tokens and masks
@dataclass
class Example:
    """One training sequence: ``labels[i]`` is ``input_ids[i]`` where the loss is taken, else -100."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class _Tok:
    """What we need to know about a tokenizer, worked out once per data set."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise QLoraError("the tokenizer has no EOS token, so responses cannot be ended: "
                             "use a tokenizer that defines eos_token")
        special = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        special.update(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens))
        self.end_ids = set(special) | {self.eos}
        self.end_strings = sorted(set(special.values()), key=len, reverse=True)
        with_, without = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
        n = len(without)
        starts = [i for i in range(len(with_) - n + 1) if with_[i:i + n] == without]
        self.prefix = list(with_[:starts[0]]) if starts else []  # e.g. BOS for Llama-style tokenizers
        try:
            tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
            self.offsets = True
        except (NotImplementedError, ValueError, TypeError):
            self.offsets = False  # slow tokenizer: tokenize each masked/trained piece on its own

    def render(self, msgs, gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def encode(self, layouts: list[tuple[str, list]]) -> list[tuple[list[int], list[int], list[int]]]:
        """For each ``(text, spans)``: token ids, the trained span of each token (-1: none) and
        each token's first character. A token belongs to a span when its last character lies
        inside it (so a byte-level token " word" whose space precedes the span counts)."""
        if not self.offsets:
            return [self._encode_pieces(text, spans) for text, spans in layouts]
        enc = self.tok([t for t, _ in layouts], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offs in zip(layouts, enc["input_ids"], enc["offset_mapping"]):
            span_starts = [s for s, _ in spans]
            span_of = []
            for s, e in offs:
                k = bisect.bisect_right(span_starts, e - 1) - 1
                span_of.append(k if e > s and k >= 0 and e - 1 < spans[k][1] else -1)
            out.append((list(ids), span_of, [s for s, _ in offs]))
        return out

    def _encode_pieces(self, text: str, spans: list) -> tuple[list[int], list[int], list[int]]:
        cuts = sorted({0, len(text), *(c for sp in spans for c in sp)})
        ids, span_of, starts = [], [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tok(text[a:b], add_special_tokens=False)["input_ids"]
            k = next((k for k, (s, e) in enumerate(spans) if s <= a and b <= e), -1)
            ids += piece
            span_of += [k] * len(piece)
            starts += [a] * len(piece)
        return ids, span_of, starts


def _plain_layout(msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}`` turn after turn."""
    text, spans = "", []
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            text += f"{m['content']}\n\n"
        elif m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n"
        else:
            text += "### Response:\n"
            spans.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + ("\n\n" if i + 1 < len(msgs) else "")
    return text, spans


def _chat_layout(tk: _Tok, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """Render with the chat template; each assistant turn's span runs from the end of the
    generation prompt (``render(msgs[:i], add_generation_prompt=True)``) to the end of the turn
    (``render(msgs[:i+1])``, trailing whitespace excluded) when the template renders prefixes
    as prefixes. Otherwise (templates that rewrite earlier turns) the span is found by searching
    the assistant text in the full rendering, extended over an end-of-turn token that follows."""
    try:
        text = tk.render(msgs, False)
    except Exception as e:  # jinja errors, raise_exception() in templates
        raise QLoraError(f"{where}: the tokenizer's chat template rejected this record ({e}); "
                         "fix the record or use --template plain") from None
    spans = []
    try:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                head, upto = tk.render(msgs[:i], True), tk.render(msgs[:i + 1], False)
                if not (upto.startswith(head) and text.startswith(upto)):
                    raise ValueError("not incremental")
                spans.append((len(head), max(len(head), len(upto.rstrip()))))
        return text, spans, False
    except Exception:
        spans, pos = [], 0
    for m in msgs:
        c = m["content"].strip()
        k = text.find(c, pos)
        if m["role"] == "assistant":
            if k < 0:
                raise QLoraError(f"{where}: the chat template changes the assistant's text, so its tokens "
                                 "cannot be located; use --template plain")
            end = k + len(c)
            end += next((len(s) for s in tk.end_strings if text.startswith(s, end)), 0)
            spans.append((k, end))
        if k >= 0:
            pos = k + len(c)
    return text, spans, True


def _example(tk: _Tok, encoded, spans, prefix: list[int], train_all: bool) -> Example:
    ids, span_of, starts = encoded
    last = {}
    for i, k in enumerate(span_of):
        if k >= 0:
            last[k] = i
    for k in reversed(range(len(spans))):  # every response ends with a trained EOS/end-of-turn
        if k in last and ids[last[k]] in tk.end_ids:
            continue
        pos = last[k] + 1 if k in last else bisect.bisect_left(starts, spans[k][0])
        ids.insert(pos, tk.eos)
        span_of.insert(pos, k)
        starts.insert(pos, spans[k][0])
    labels = list(ids) if train_all else [t if k >= 0 else IGNORE for t, k in zip(ids, span_of)]
    ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
    if labels:
        labels[0] = IGNORE
    return Example(ids, labels)


# A message longer than max_length * CUT_CHARS_PER_TOKEN characters is cut there before it is rendered and
# tokenized, so a huge record costs time and memory in proportion to max_length, not to its size. 32
# characters a token is a generous bound (English text averages ~4), and the cut is checked, not assumed:
# it is kept only when the message's first half of the kept characters already holds max_length + CUT_SLACK
# tokens, so the first max_length tokens lie far from the cut and are those of the uncut text; else (one
# giant word, a tokenizer whose unknown-word token swallows it) the bound doubles until that holds.
CUT_CHARS_PER_TOKEN = 32
CUT_SLACK = 8


class _Cutter:
    """Cuts over-long message texts by characters at a bound that provably leaves the first
    ``max_length`` tokens unchanged (see CUT_CHARS_PER_TOKEN)."""

    def __init__(self, tk: "_Tok", max_length: int):
        self.tk, self.need, self.bound = tk, max_length + CUT_SLACK, max_length * CUT_CHARS_PER_TOKEN

    def __call__(self, text: str) -> tuple[str, bool]:
        """(text, whether it was cut)."""
        c = self.bound
        while len(text) > c:
            if len(self.tk.tok(text[:c // 2], add_special_tokens=False)["input_ids"]) >= self.need:
                return text[:c], True
            c *= 2
        return text, False


def rendering(tokenizer, template: str, max_length) -> tuple["_Tok", bool]:
    """The checks every tokenization shares (``template`` one of :data:`TEMPLATES`, ``max_length`` an integer >= 2,
    ``chat`` only with a tokenizer that has a chat template: one line each), the tokenizer's wrapper, and whether
    the chat template renders (``chat``, or ``auto`` with a template)."""
    if template not in TEMPLATES:
        raise QLoraError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise QLoraError(f"max_length must be an integer >= 2, got {max_length!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        raise QLoraError("the tokenizer has no chat template: use --template plain (or auto)")
    return _Tok(tokenizer), template == "chat" or (template == "auto" and has_template)


def tokenize_records(records, fmt: str, tokenizer, max_length: int = 1024, train_on_prompt: bool = False,
                     truncate: bool = True, template: str = "auto", text_mode: str = "truncate",
                     stride: int = 0) -> tuple[list[Example], dict]:
    """Render, tokenize and mask every record.

    ``template``: ``auto`` uses the tokenizer's chat template when it has one and the plain
    ``### Instruction:/### Response:`` layout otherwise; ``chat``/``plain`` force one.
    Loss is on the assistant turns (each ending with a trained EOS or end-of-turn token) unless
    ``train_on_prompt``; ``text`` records train on every token plus an EOS. Sequences longer
    than ``max_length`` are cut at the end (``truncate``) or rejected; those left without a
    trained token are dropped. A message far longer than ``max_length`` is cut by characters before it
    is tokenized (:class:`_Cutter`: same first ``max_length`` tokens, time and memory bounded by
    ``max_length``). Data in which no record has a non-empty response (assistant turn, or text) is
    refused. Stats: records, examples, truncated, dropped, longest (before truncation; for a record cut
    by characters, its length after the cut, already more than ``max_length``), tokens,
    trained_tokens, template, template_fallback, cut (records cut by characters), empty_responses.

    ``text_mode`` (``text`` records only): ``truncate`` as above; ``windows`` splits each long document
    into windows of ``max_length`` tokens, ``stream`` concatenates the documents and cuts full rows
    (qlora.pretrain; ``stride``: tokens each window repeats as context); no text is lost, and stats gain
    ``documents`` and ``windows``."""
    if fmt not in FORMATS:
        raise QLoraError(f"unknown data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    tk, chat = rendering(tokenizer, template, max_length)
    use_chat = fmt != "text" and chat
    stats = {"records": len(records), "examples": 0, "truncated": 0, "dropped": 0, "longest": 0,
             "tokens": 0, "trained_tokens": 0, "template": "none" if fmt == "text" else
             ("chat" if use_chat else "plain"), "template_fallback": 0, "cut": 0, "empty_responses": 0}
    cut = _Cutter(tk, max_length)
    layouts = []  # (text, trained spans, prefix ids, train on all tokens)
    answered = []  # per record: has a non-empty response
    for n, rec in enumerate(records, 1):
        where = getattr(rec, "where", f"record {n}")
        if fmt == "text":
            text = rec.get("text")
            if not isinstance(text, str):
                raise QLoraError(f"{where}: missing field 'text' (format text needs text)")
            text, was_cut = cut(text) if text_mode == "truncate" else (text, False)  # windows keep every token
            stats["cut"] += was_cut
            answered.append(bool(text.strip()))
            layouts.append((text, [(0, len(text))], tk.prefix, True))
            continue
        if fmt != "chat":
            _check_fields(rec if isinstance(rec, Record) else _record(rec, where), fmt)
        msgs = to_messages(rec, fmt)
        was_cut = False
        for m in msgs:
            m["content"], c = cut(m["content"])
            was_cut |= c
        stats["cut"] += was_cut
        answered.append(any(m["content"].strip() for m in msgs if m["role"] == "assistant"))
        if use_chat:
            text, spans, fell_back = _chat_layout(tk, msgs, where)
            stats["template_fallback"] += fell_back
            layouts.append((text, spans, [], train_on_prompt))
        else:
            layouts.append((*_plain_layout(msgs), tk.prefix, train_on_prompt))
    stats["empty_responses"] = answered.count(False)
    if not any(answered):  # each would train only the end-of-turn token: a model that answers nothing
        raise QLoraError(f"0 of {len(records)} examples have a response to train on: every "
                         f"{'text' if fmt == 'text' else 'assistant answer'} is empty")
    examples, too_long, docs = [], 0, []
    for c in range(0, len(layouts), 1024):  # the tokenizer encodes a chunk at once (in parallel)
        chunk = layouts[c:c + 1024]
        for (text, spans, prefix, train_all), enc in zip(chunk, tk.encode([(t, sp) for t, sp, _, _ in chunk])):
            ex = _example(tk, enc, spans, prefix, train_all)
            stats["longest"] = max(stats["longest"], len(ex))
            if fmt == "text" and text_mode != "truncate":
                docs.append((ex.input_ids, ex.labels))  # cut into windows below, whole
                continue
            if len(ex) > max_length:
                too_long += 1
                ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            if not any(t != IGNORE for t in ex.labels):
                stats["dropped"] += 1
                continue
            examples.append(ex)
            stats["tokens"] += len(ex)
            stats["trained_tokens"] += sum(t != IGNORE for t in ex.labels)
    if docs:
        _text_windows(docs, text_mode, max_length, stride, examples, stats)
    if too_long and not truncate:
        raise QLoraError(f"{too_long} of {len(records)} records are longer than max_length={max_length} tokens "
                         f"(longest: {stats['longest']}): raise --max-length or allow truncation")
    stats["truncated"] = too_long
    stats["examples"] = len(examples)
    if not examples:
        raise QLoraError(f"no record has a token left to train on (of {len(records)}, {too_long} truncated "
                         f"to max_length={max_length}): raise --max-length")
    return examples, stats


def _text_windows(docs, mode: str, max_length: int, stride: int, examples: list, stats: dict) -> None:
    """Whole tokenized documents -> windows (``windows``) or full rows of their concatenation (``stream``)."""
    from .pretrain import stream, windows
    if mode not in ("windows", "stream"):
        raise QLoraError(f"unknown text mode {mode!r}: truncate, windows or stream")
    pieces = stream(docs, max_length, stride) if mode == "stream" else \
        [w for ids, labels in docs for w in windows(ids, labels, max_length, stride)]
    stats["documents"], stats["windows"] = len(docs), len(pieces)
    for ids, labels in pieces:
        if not any(t != IGNORE for t in labels):
            stats["dropped"] += 1
            continue
        examples.append(Example(ids, labels))
        stats["tokens"] += len(ids)
        stats["trained_tokens"] += sum(t != IGNORE for t in labels)


def load_examples(path, tokenizer, fmt: str | None = None, **kwargs) -> tuple[list[Example], dict]:
    """``read_records`` then ``tokenize_records`` (kwargs go to the latter); stats gain ``format``."""
    records, fmt = read_records(path, fmt)
    examples, stats = tokenize_records(records, fmt, tokenizer, **kwargs)
    stats["format"] = fmt
    return examples, stats


def split_validation(examples: list, val_split: float, seed: int = 0) -> tuple[list, list]:
    """Hold out ``round(n * val_split)`` examples (at least 1 when val_split > 0), chosen by a
    seeded shuffle; both parts keep the input order. Same inputs and seed -> same split."""
    if not 0 <= val_split < 1:
        raise QLoraError(f"--val-split must be in [0, 1), got {val_split}")
    from .validation import held_indices  # the one seeded choice; `qlora train` splits records with it
    held = set(held_indices(len(examples), float(val_split), seed))
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# ------------------------------------------------------------------------------------ batches
def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: example indices grouped into rows of <= max_length tokens."""
    rows, free = [], []  # free: sorted (space left, row) pairs
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], r))
    return rows


def block_causal_mask(position_ids, dtype=None):
    """A 4D ``[B, 1, T, T]`` mask for packed rows: token q sees token k iff k <= q and both lie
    in the same example (a new example starts wherever ``position_ids`` does not go up by 1).
    Boolean (True = attend) for SDPA, or additive (0 / dtype's min) when ``dtype`` is a float
    type, for attention code that adds the mask to the scores. Only needed by backends that do
    not read packing from ``position_ids`` themselves (transformers' do, given no attention_mask)."""
    import torch
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    seg = (step != 1).cumsum(-1)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class _Epoch(Sequence):
    """The batches of one epoch, built when indexed (so a large data set is not held twice)."""

    def __init__(self, owner: "Batches", plan: list[list[int]]):
        self.owner, self.plan = owner, plan

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.owner.collate(p) for p in self.plan[i]]
        return self.owner.collate(self.plan[i])


class Batches:
    """Deterministic, resumable batches: ``epoch(k)`` depends only on (examples, options, seed, k),
    so resuming at step s of epoch k is ``epoch(k)[s:]``.

    A batch is a dict of torch tensors: ``input_ids`` [B, T] long (right-padded with ``pad_id``),
    ``labels`` [B, T] long (-100 on padding and masked tokens), ``num_tokens`` (0-d long: labels
    != -100), and ``attention_mask`` [B, T] (1 = real token) -- or, with ``packing``, instead of
    the mask, ``position_ids`` [B, T] that restart at 0 for every example of a row (rows hold up
    to ``max_length`` tokens; padding at a row's end gets its own 0, 1, ... run). Pass packed
    batches to the model without ``attention_mask`` and with ``use_cache=False``: transformers
    then keeps attention inside each example (or use :func:`block_causal_mask`).

    Unpacked batches are grouped by length (examples of similar length share a batch: a seeded
    shuffle, then sorting inside windows of 64 batches), and the batch order is shuffled with
    the longest batch first, so that an out-of-memory shows at step 0. Packed rows are formed
    once (best-fit decreasing), and shuffled each epoch."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, packing: bool = False,
                 max_length: int | None = None, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, pad_to_multiple_of: int = 1):
        if not examples:
            raise QLoraError("no training examples")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise QLoraError(f"batch size must be a positive integer, got {batch_size!r}")
        if pad_id is None:
            raise QLoraError("pad_id is None: use the tokenizer's pad or EOS token id")
        if pad_to_multiple_of < 1:
            raise QLoraError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, int(pad_id)
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.group_by_length, self.multiple = group_by_length, pad_to_multiple_of
        lengths = [len(e.input_ids) for e in examples]
        self.max_length = max_length or max(lengths)
        if max(lengths) > self.max_length:
            raise QLoraError(f"an example has {max(lengths)} tokens, more than max_length={self.max_length}: "
                             "tokenize with the same max_length")
        self.rows = pack(lengths, self.max_length) if packing else [[i] for i in range(len(examples))]
        self.row_len = [sum(lengths[i] for i in r) for r in self.rows]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def plan(self, epoch: int) -> list[list[int]]:
        """Row indices of each batch of ``epoch`` (a row is one example unless packing)."""
        rng = random.Random(f"qlora-batches:{self.seed}:{epoch}")
        order = list(range(len(self.rows)))
        if self.shuffle:
            rng.shuffle(order)
        bs = self.batch_size
        if self.group_by_length and not self.packing:
            win = bs * 64
            order = [i for w in range(0, len(order), win)
                     for i in sorted(order[w:w + win], key=lambda i: -self.row_len[i])]
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if self.shuffle and self.group_by_length and not self.packing:
            rng.shuffle(batches)
            big = max(range(len(batches)), key=lambda b: max(self.row_len[i] for i in batches[b]) * len(batches[b]))
            batches[0], batches[big] = batches[big], batches[0]
        return batches

    def epoch(self, epoch: int) -> _Epoch:
        return _Epoch(self, self.plan(epoch))

    def collate(self, rows: list[int]) -> dict:
        import torch
        T = max(self.row_len[r] for r in rows)
        T = -(-T // self.multiple) * self.multiple
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        aux = torch.zeros((B, T), dtype=torch.long)  # attention_mask, or position_ids when packing
        for b, r in enumerate(rows):
            t = 0
            for i in self.rows[r]:
                ex = self.examples[i]
                n = len(ex.input_ids)
                ids[b, t:t + n] = torch.tensor(ex.input_ids, dtype=torch.long)
                labels[b, t:t + n] = torch.tensor(ex.labels, dtype=torch.long)
                if self.packing:
                    aux[b, t:t + n] = torch.arange(n)
                else:
                    aux[b, t:t + n] = 1
                t += n
            if self.packing:
                aux[b, t:] = torch.arange(T - t)
        out = {"input_ids": ids, "labels": labels, "position_ids" if self.packing else "attention_mask": aux}
        out["num_tokens"] = (labels != IGNORE).sum()
        return out
