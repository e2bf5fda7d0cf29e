"""Continued pretraining (--format text): long documents become windows, or with --packing full rows
of the concatenated documents; every token of every document is in some window, checked against the
tokenizer run on the whole text."""
import json
import random

import pytest

from qlora.data import IGNORE, tokenize_records
from qlora.errors import QLoraError
from qlora.train import train

from helpers import cfg
from tiny import WORDS, tiny_tokenizer

TOK = tiny_tokenizer()
EOS = TOK.eos_token_id


def _docs(n, lengths, seed=0):
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS[:30]) for _ in range(k))} for k in lengths[:n]]


def _reference(doc):
    """The tokenizer on the whole text, plus the EOS a text example ends with."""
    return TOK(doc["text"], add_special_tokens=False)["input_ids"] + [EOS]


@pytest.mark.parametrize("stride", [0, 5])
def test_windows_hold_every_token(stride):
    docs = _docs(2, [300, 20])
    ex, stats = tokenize_records(docs, "text", TOK, max_length=32, text_mode="windows", stride=stride)
    want = [_reference(d) for d in docs]
    assert stats["documents"] == 2 and stats["windows"] == len(ex) and stats["truncated"] == 0
    got, i = [], 0
    for w in want:  # rebuild each document from its windows: the first whole, the next less the overlap
        rebuilt = []
        while len(rebuilt) < len(w):
            e = ex[i]
            assert len(e) <= 32
            rebuilt += e.input_ids[stride if rebuilt else 0:]
            trained = [t for t in e.labels if t != IGNORE]
            assert trained == e.input_ids[max(1, stride if len(rebuilt) > len(e) else 1):]  # overlap is context
            i += 1
        got.append(rebuilt)
    assert got == want and i == len(ex)
    assert all(len(e) == 32 for e in ex[:len(ex) - 2])  # only each document's last window is shorter
    if stride:  # with an overlap every token but the first of a document is trained exactly once
        trained = [t for e in ex for t in e.labels if t != IGNORE]
        assert trained == want[0][1:] + want[1][1:]


def test_packing_streams_documents_into_full_rows():
    docs = _docs(3, [70, 5, 41], seed=1)
    ex, stats = tokenize_records(docs, "text", TOK, max_length=16, text_mode="stream")
    stream = [t for d in docs for t in _reference(d)]
    assert [t for e in ex for t in e.input_ids] == stream  # EOS between documents, nothing lost
    assert all(len(e) == 16 for e in ex[:-1]) and 0 < len(ex[-1]) <= 16
    assert stats["tokens"] == len(stream) and stats["windows"] == len(ex) == -(-len(stream) // 16)


def test_truncate_mode_is_unchanged():
    ex, stats = tokenize_records(_docs(1, [100]), "text", TOK, max_length=16)
    assert len(ex) == 1 and len(ex[0]) == 16 and stats["truncated"] == 1


def test_bad_stride_fails_before_the_model_loads(setup, tmp_path):
    with pytest.raises(QLoraError, match=r"--stride must be an integer in \[0, --max-length\)"):
        train(cfg(setup, tmp_path / "r", stride=64, max_length=64), log=lambda m: None)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("packing", [False, True])
def test_training_reports_the_windows(setup, tmp_path, packing):
    docs = _docs(3, [200, 60, 90], seed=2)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    lines = []
    s = train(cfg(setup, tmp_path / "r", data=str(tmp_path / "docs.jsonl"), format="text", max_length=64,
                  packing=packing, max_steps=1, save_every=0, batch_size=2, grad_accum=1), log=lines.append)
    total = sum(len(_reference(d)) for d in docs)
    n = -(-total // 64) if packing else sum(-(-len(_reference(d)) // 64) for d in docs)
    line = next(x for x in lines if x.startswith("data:"))
    assert f"3 documents, {total} tokens in {n} {'rows' if packing else 'windows'} of up to 64" in line
    assert s["steps"] == 1
