"""Validation during `qlora train`: how many records ``--val-split`` holds out (``auto``: ~5% of data
sets of 100 or more), which ones (seeded, kept in OUT/validation.json so ``--resume`` evaluates on the
same records), when to evaluate (each epoch's end, or ``--eval-every``), the greedy-answer metrics of an
evaluation (exact and contains match, as ``qlora eval`` scores them), and the before/after answers to a
few validation prompts (OUT/answers.json), printed side by side as the demo prints its own.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from .config import is_int, is_number
from .errors import QLoraError

AUTO_FROM, AUTO_SHARE, AUTO_MIN, AUTO_MAX = 100, 0.05, 8, 200  # --val-split auto: held out from >= 100 records
SPLIT_FILE, ANSWERS_FILE = "validation.json", "answers.json"


def parse_split(v) -> str | float:
    """``--val-split``: ``auto`` or a fraction in [0, 1) (a number or its text)."""
    if isinstance(v, str) and v.strip().lower() == "auto":
        return "auto"
    try:
        f = float(v) if isinstance(v, str) else v
    except ValueError:
        f = None
    if not is_number(f) or not math.isfinite(f) or not 0 <= f < 1:
        raise QLoraError(f"--val-split must be auto or a fraction in [0, 1), got {v!r}")
    return float(f)


def held_count(n: int, spec) -> int:
    """How many of ``n`` records ``spec`` (parse_split's value) holds out."""
    if spec == "auto":
        return 0 if n < AUTO_FROM else min(AUTO_MAX, max(AUTO_MIN, round(n * AUTO_SHARE)))
    if spec == 0:
        return 0
    k = max(1, round(n * spec))
    if k >= n:
        raise QLoraError(f"--val-split {spec} leaves no training example ({n} examples)")
    return k


def held_indices(n: int, spec, seed: int) -> list[int]:
    """The held-out record indices, ascending: the first ``held_count`` of a shuffle seeded by ``seed``."""
    order = list(range(n))
    random.Random(f"qlora-val:{seed}").shuffle(order)
    return sorted(order[:held_count(n, spec)])


def split_records(records: list, spec, seed: int, out: Path | None = None, resume: bool = False):
    """(training records, validation records, held-out indices). With ``resume``, the indices that
    OUT/validation.json recorded when the run began (the same records, whatever the flags say now)."""
    saved = Path(out) / SPLIT_FILE if out is not None else None
    if resume and saved is not None and saved.is_file():
        info = json.loads(saved.read_text())
        if info.get("records") != len(records):
            raise QLoraError(f"--resume: {saved} was written for {info.get('records')} records, --data has "
                             f"{len(records)}: resume with the data the run started with")
        held = [int(i) for i in info["held"]]
    else:
        held = held_indices(len(records), parse_split(spec), seed)
    hs = set(held)
    return [r for i, r in enumerate(records) if i not in hs], [records[i] for i in held], held


def save_split(out: Path, n: int, held: list[int], spec) -> None:
    write_json(Path(out) / SPLIT_FILE, {"records": n, "val_split": spec, "held": held})


def describe(spec, n: int, k: int, val_file: str | None = None) -> str:
    """The data log line's validation part: how many are held out and why."""
    if val_file:
        return f"validation: {k} examples from {val_file}"
    if spec == "auto" and k == 0:
        return (f"no validation (--val-split auto holds out data only from {AUTO_FROM} examples; "
                "--val-data FILE or --val-split F asks for it)")
    if spec == "auto":
        return f"{k} held out for validation (--val-split auto: 5% of {n}, at least {AUTO_MIN}, at most {AUTO_MAX})"
    return f"{k} held out for validation (--val-split {spec:g})" if k else "no validation (--val-split 0)"


def eval_due(step: int, total: int, every: int, per_epoch: int) -> bool:
    """Evaluate after ``step``? Every ``every`` steps, or (0) at each epoch's end; the run's last step is
    evaluated by the run's finish."""
    if every:
        return step % every == 0
    return step % per_epoch == 0 and step < total


def check(cfg) -> None:
    """The validation flags, before anything slow."""
    parse_split(cfg.val_split)
    for name, low in (("eval_samples", 0), ("compare_prompts", 0), ("early_stop", 0), ("eval_max_new_tokens", 1)):
        v = getattr(cfg, name)
        if not is_int(v) or v < low:
            raise QLoraError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")


def write_json(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``, atomically (a temp file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- answers
def questions(records, fmt: str) -> list[tuple[list[dict], str]]:
    """(messages before the reference answer, reference) of each record that has one (not ``text``)."""
    from .evaluate import split_record
    if fmt == "text":
        return []
    pairs = []
    for r in records:
        try:
            msgs, ref = split_record(r, fmt)
        except (KeyError, TypeError, ValueError, QLoraError):  # a record another method reads (preference pairs)
            continue
        if ref.strip():
            pairs.append((msgs, ref))
    return pairs


def answer(model, tok, conversations: list[list[dict]], max_new_tokens: int, template: str = "auto",
           batch_size: int = 24) -> list[str]:
    """Greedy answers of ``model`` to ``conversations`` (each ending with a user turn), with the KV cache,
    in eval mode; the model's mode is restored."""
    import torch

    from .evaluate import greedy_answers
    from .generate import encode_messages, inference_cache, resolve_layout
    layout = resolve_layout(tok, template, fallback="plain")
    prompts = [encode_messages(tok, msgs, layout) for msgs in conversations]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_cache(model):
            return greedy_answers(model, tok, prompts, max_new_tokens, batch_size)
    finally:
        model.train(was_training)


def answer_metrics(answers: list[str], refs: list[str]) -> dict:
    """exact_match and contains (as qlora eval scores them) of ``answers`` against ``refs``."""
    from .evaluate import contains, exact
    n = len(refs)
    return {"exact_match": round(sum(map(exact, answers, refs)) / n, 4),
            "contains": round(sum(map(contains, answers, refs)) / n, 4), "answered": n}


def side_by_side(log, items: list[dict]) -> None:
    """Print before/after answers: ``items`` of {question, before, after, expected}."""
    for it in items:
        log(f"Q: {it['question']}\n   before: {str(it['before']).strip()}\n   after:  {str(it['after']).strip()}"
            f"\n   (expected: {it['expected']})")


class Validator:
    """The answer side of a run's validation: which records are asked at each evaluation (the first
    ``--eval-samples`` with a reference) and which ``--compare-prompts`` before and after training."""

    def __init__(self, cfg, records, fmt: str, sft: bool = True):
        pairs = questions(records, fmt) if sft else []
        self.cfg, self.scored, self.compared = cfg, pairs[:cfg.eval_samples], pairs[:cfg.compare_prompts]

    def metrics(self, model, tok) -> dict:
        """exact_match/contains of greedy answers (empty without scored records)."""
        if not self.scored:
            return {}
        got = answer(model, tok, [m for m, _ in self.scored], self.cfg.eval_max_new_tokens, self.cfg.template)
        return answer_metrics(got, [r for _, r in self.scored])

    def compare(self, model, tok, out: Path, when: str, main: bool = True) -> list[dict] | None:
        """Answers to the compared prompts now (``when``: before or after) into OUT/answers.json; after
        training, the items side by side. A resumed run keeps the answers from before its first step."""
        if not self.compared:
            return None
        path = Path(out) / ANSWERS_FILE
        got = answer(model, tok, [m for m, _ in self.compared], self.cfg.eval_max_new_tokens, self.cfg.template)
        if not main:
            return None
        old = json.loads(path.read_text()) if path.is_file() else None
        items = [{"question": m[-1]["content"] if m else "", "expected": r, "before": None, "after": None}
                 for m, r in self.compared]
        if old and [o["question"] for o in old["items"]] == [i["question"] for i in items]:
            items = old["items"]
        for it, a in zip(items, got):
            it[when] = a
        write_json(path, {"items": items})
        return items


# ----------------------------------------------------------------------------------- run files
STATS_FILE = "data_stats.json"


def lengths(examples) -> list[int]:
    """Token lengths of the training examples (empty for examples without one length, such as pairs)."""
    try:
        return [len(e) for e in examples]
    except TypeError:
        return []


def save_setup(out: Path, n_records: int, held: list[int] | None, spec, stats: dict) -> None:
    """What the report and a resumed run read back: the held-out record indices (OUT/validation.json,
    none with --val-data) and the data statistics (OUT/data_stats.json)."""
    split = Path(out) / SPLIT_FILE
    kept = json.loads(split.read_text()) if split.is_file() else {}  # a resumed run's: it records the first flags
    if held is not None and (kept.get("records"), kept.get("held")) != (n_records, held):
        save_split(out, n_records, held, spec)
    write_json(Path(out) / STATS_FILE, stats)
