"""``qlora eval``: loss, perplexity and answer accuracy of a model (plus adapter) on a data file.

Metrics (``evaluate`` returns them in a dict):

* ``loss`` -- mean negative log-likelihood per scored token, ``sum(-log p(y_t | y_<t)) / tokens``
  over the whole file (token-weighted, not a mean of per-record means). The scored tokens are
  exactly those training takes the loss on (:func:`qlora.data.tokenize_records`: the assistant
  turns and their end-of-turn token, every token for ``text`` records), the same template too;
* ``perplexity`` -- ``exp(loss)``;
* ``exact_match`` -- fraction of records whose greedy answer equals the reference once both are
  normalised (:func:`normalize`: case, runs of whitespace, trailing punctuation);
* ``contains`` -- fraction where the normalised reference occurs in the normalised answer, or a
  non-empty answer occurs in the reference (a short answer to a long reference counts);
* ``n`` (records), ``tokens`` (scored tokens), ``generated`` (answers), ``samples`` (the first few
  ``{prompt, reference, answer}``).

The answer is greedy decoding (at most ``max_new_tokens``) from the conversation before the last
assistant message, rendered with the template the loss uses; the reference is that last message.
``text`` records have no answer, so their ``exact_match``/``contains`` are None. Prompts are
batched with left padding, shortest first.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time

from .config import is_int
from .errors import QLoraError

_TRAILING = ".!?,;:\u3002\uff01\uff1f"  # ASCII and CJK full stops, marks, commas


def normalize(text: str) -> str:
    """Lower case, whitespace runs -> one space, trimmed, trailing punctuation removed."""
    s = re.sub(r"\s+", " ", text.lower()).strip()
    return s.rstrip(_TRAILING + " ")


def exact(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def contains(answer: str, reference: str) -> bool:
    a, r = normalize(answer), normalize(reference)
    return r in a or (bool(a) and a in r)


# -------------------------------------------------------------------------------- generation
def split_record(record: dict, fmt: str) -> tuple[list[dict], str] | None:
    """(messages before the last assistant turn, that turn's text), or None for ``text`` records."""
    from .data import to_messages
    msgs = to_messages(record, fmt)
    if msgs is None:
        return None
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


def check_references(records, fmt: str) -> None:
    """Refuse a record whose reference answer (its last assistant message) is empty: the empty string
    is "contained" in every answer, so ``contains`` would count it as right."""
    if fmt == "text":
        return
    for n, r in enumerate(records, 1):
        _, ref = split_record(r, fmt)
        if not ref.strip():
            where = getattr(r, "where", f"record {n}")
            raise QLoraError(f"{where}: the reference answer (the last assistant message) is empty, so it cannot "
                             "be scored: fill it in, drop the record, or pass --max-new-tokens 0 (loss only)")


def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
                   progress: bool = False) -> list[str]:
    """Greedy answers to token-id prompts, ``batch_size`` at a time, left-padded (so every row's
    next token sits in the last column); each answer is cut at its first stop token and decoded
    without special tokens."""
    import torch
    from tqdm.auto import tqdm

    from .generate import context_limit, stop_token_ids
    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    limit = context_limit(model)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for s in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress, leave=False):
        rows = order[s:s + batch_size]
        seqs = [prompts[i] for i in rows]
        new = max_new_tokens
        if limit is not None:  # keep the end of over-long prompts, leave room to answer
            room = max(1, limit - max_new_tokens)
            seqs = [q[-room:] for q in seqs]
            new = max(1, min(max_new_tokens, limit - max(map(len, seqs))))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, width - len(q):] = torch.tensor(q, dtype=torch.long)
            mask[r, width - len(q):] = 1
        # use_cache given here: generate follows generation_config (which a model's config may have turned off)
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad, use_cache=True)
        for r, i in enumerate(rows):
            gen = out[r, width:].tolist()
            cut = next((k for k, t in enumerate(gen) if t in stops), len(gen))
            answers[i] = tokenizer.decode(gen[:cut], skip_special_tokens=True)
    return answers


def evaluate(model, tokenizer, records, fmt: str, max_new_tokens: int = 64, batch_size: int = 8,
             template: str = "auto", max_length: int = 1024, n_samples: int = 3, cache: bool = True,
             progress: bool = False) -> dict:
    """Metrics of ``model`` on ``records`` (as read by :func:`qlora.data.read_records`) in format
    ``fmt``; see the module docstring. ``max_length`` cuts scored sequences as training does;
    ``max_new_tokens = 0`` skips generation (exact_match/contains None)."""
    import torch

    from .data import pad_id, tokenize_records
    from .generate import encode_messages, inference_cache, resolve_layout
    from .loss import token_loss
    if not records:
        raise QLoraError("no records to evaluate")
    check_settings(batch_size, max_new_tokens, max_length)
    if max_new_tokens > 0:
        check_references(records, fmt)
    t0 = time.perf_counter()
    examples, stats = tokenize_records(records, fmt, tokenizer, max_length=max_length, template=template)
    pad = pad_id(tokenizer)
    pairs = [split_record(r, fmt) for r in records] if fmt != "text" and max_new_tokens > 0 else []
    layout = resolve_layout(tokenizer, template, fallback="plain") if pairs else None
    prompts = [encode_messages(tokenizer, msgs, layout) for msgs, _ in pairs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_cache(model, cache):
            nll, tokens = token_loss(model, examples, pad, batch_size, progress)
            answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
    finally:
        model.train(was_training)
    loss = nll / tokens
    refs = [ref for _, ref in pairs]
    m = len(answers)
    out = {
        "n": len(records),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "exact_match": sum(map(exact, answers, refs)) / m if m else None,
        "contains": sum(map(contains, answers, refs)) / m if m else None,
        "tokens": tokens,
        "examples": stats["examples"],
        "truncated": stats["truncated"],
        "generated": m,
        "template": stats["template"],
        "seconds": round(time.perf_counter() - t0, 3),
        "samples": [{"prompt": msgs[-1]["content"] if msgs else "", "reference": ref, "answer": a}
                    for (msgs, ref), a in list(zip(pairs, answers))[:n_samples]],
    }
    return out


# ----------------------------------------------------------------------------------------- cli
def add_cli(sub) -> None:
    from .data import FORMATS, TEMPLATES
    from .generate import add_model_args
    p = sub.add_parser("eval", help="loss, perplexity and exact match of a model (+ adapter) on a data file",
                       description="Evaluate on a data file: mean token loss and perplexity of the reference "
                                   "responses (the tokens training scores), and greedy answers compared with the "
                                   "references (exact match and containment after normalising case, spaces and "
                                   "trailing punctuation).")
    add_model_args(p)
    p.add_argument("--data", default=None, metavar="FILE",
                   help=".jsonl, .json, .csv, .tsv or .parquet (required unless --harness; no default)")
    p.add_argument("--harness", default=None, metavar="TASK[,TASK]",
                   help="instead of --data: run these lm-evaluation-harness tasks on the model (+ adapter) "
                        "(needs the harness extra; --limit, --batch-size, --max-length apply; default: none)")
    p.add_argument("--harness-include", default=None, metavar="DIR",
                   help="a folder of your own harness task YAML files (e.g. over a local JSONL) (default: none)")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                   help="record format (default: auto, detected from the keys)")
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="auto: the tokenizer's chat template if it has one, else plain (default: auto)")
    p.add_argument("--max-length", type=int, default=1024, metavar="N", help="tokens per scored sequence (default: 1024)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="most tokens per greedy answer; 0 = loss only (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per forward (default: 8)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N records (default: all)")
    p.add_argument("--samples", type=int, default=3, metavar="N", help="answers shown next to their references (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics on stdout (default: a table)")
    p.set_defaults(func=_run)


def check_settings(batch_size: int, max_new_tokens: int, max_length: int) -> None:
    """Raise QLoraError for a batch size, answer length or sequence length out of range (``qlora eval`` calls it
    before loading the model)."""
    if not is_int(batch_size) or batch_size < 1:
        raise QLoraError(f"batch size must be a positive integer, got {batch_size!r}")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise QLoraError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not is_int(max_length) or max_length < 1:
        raise QLoraError(f"max_length must be a positive integer, got {max_length!r}")


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _run(args) -> int:
    from .data import read_records
    from .generate import load_for_inference, set_threads
    set_threads(args.threads)
    if args.limit is not None and args.limit < 1:
        raise QLoraError(f"--limit must be a positive integer, got {args.limit}")
    check_settings(args.batch_size, args.max_new_tokens, args.max_length)
    if (args.data is None) == (args.harness is None):
        raise QLoraError("give --data FILE (loss, perplexity, answers) or --harness TASK[,TASK] (lm-evaluation-harness)"
                         ", one of the two")
    if args.harness is not None:
        return _run_harness(args)
    records, fmt = read_records(args.data, args.format)  # before the model load: fail fast
    records = records[:args.limit] if args.limit else records
    if args.max_new_tokens > 0:
        check_references(records, fmt)
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()
    model, tok = load_for_inference(args.model, args.adapter, args.device, args.dtype, progress=tty,
                                    log=lambda m: print(m, file=sys.stderr))
    print(f"loaded model in {time.perf_counter() - t0:.1f} s; evaluating {len(records)} {fmt} records",
          file=sys.stderr)
    m = evaluate(model, tok, records, fmt, args.max_new_tokens, args.batch_size, args.template,
                 args.max_length, max(0, args.samples), args.dequant_cache, progress=tty)
    if args.json:
        print(json.dumps({k: _finite(v) for k, v in m.items()}, ensure_ascii=False))
        return 0
    pct = (lambda x: "n/a" if x is None else f"{100 * x:.1f}%")
    print(f"records      {m['n']} ({m['tokens']} scored tokens, template {m['template']})")
    print(f"loss         {m['loss']:.4f}")
    print(f"perplexity   {m['perplexity']:.3f}")
    print(f"exact match  {pct(m['exact_match'])} of {m['generated']} answers")
    print(f"contains     {pct(m['contains'])}")
    for i, s in enumerate(m["samples"], 1):
        print(f"\n[{i}] prompt:    {s['prompt']}\n    reference: {s['reference']}\n    answer:    {s['answer']}")
    print(f"({m['seconds']:.1f} s)", file=sys.stderr)
    return 0


def _run_harness(args) -> int:
    """``qlora eval --harness``: the tasks (and their data) first, then the model, then one row per metric."""
    from . import harness
    from .generate import load_for_inference
    tasks = harness.load_tasks(args.harness, args.harness_include)
    t0 = time.perf_counter()
    model, tok = load_for_inference(args.model, args.adapter, args.device, args.dtype, progress=sys.stderr.isatty(),
                                    log=lambda m: print(m, file=sys.stderr))
    print(f"loaded model in {time.perf_counter() - t0:.1f} s; lm-evaluation-harness: {args.harness}", file=sys.stderr)
    results = harness.run(model, tok, tasks, args.limit, args.batch_size, args.max_length, args.dequant_cache)
    if args.json:
        print(json.dumps({t: {k: _finite(v) for k, v in m.items()} for t, m in results.items()}, ensure_ascii=False))
        return 0
    for task, metrics in results.items():
        for k, v in metrics.items():
            print(f"{task:24s} {k:16s} {v:.4f}")
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
