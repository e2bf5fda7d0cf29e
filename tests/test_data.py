"""qlora.data: readers, format detection, masking against transformers' chat-template rendering,
truncation, packing (logits of a packed row == logits of each example alone on a tiny Llama),
deterministic resumable batches."""
import csv
import itertools
import json
import random

import pytest
import torch

from qlora.data import (IGNORE, Batches, Example, block_causal_mask, pack, read_records,
                        split_validation, to_messages, tokenize_records)
from qlora.errors import QLoraError

ALPACA = [{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"},
          {"instruction": "Count to three", "output": "1, 2, 3"}]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
                      {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"},
                      {"role": "assistant", "content": "D, \"quoted\"."}]}]
COMPLETION = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Grass is", "completion": " green."}]
TEXT = [{"text": "Hello world, how are you?"}, {"text": "Fine thanks."}]
BY_FMT = {"alpaca": ALPACA, "chat": CHAT, "completion": COMPLETION, "text": TEXT}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def smol():
    """The embedded model's tokenizer (ChatML chat template, EOS = <|im_end|>)."""
    from transformers import AutoTokenizer
    from qlora.embedded import embedded_model_path
    try:
        p = embedded_model_path()
    except QLoraError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def bpe():
    """A tiny byte-level BPE tokenizer without a chat template, adding <s> in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [json.dumps(r) for recs in BY_FMT.values() for r in recs] + ["### Instruction:\n### Response:\n"]
    tk.train_from_iterator(corpus * 5, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def with_template(tok, template):
    t = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = template
    return t


class NoOffsets:
    """A tokenizer proxy without offset mapping (as a slow tokenizer): exercises the piecewise path."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def trained_runs(tok, ex):
    """Decoded maximal runs of trained tokens."""
    return [tok.decode([t for t, _ in g]) for k, g in
            itertools.groupby(zip(ex.input_ids, ex.labels), key=lambda p: p[1] != IGNORE) if k]


# -------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("fmt", list(BY_FMT))
def test_jsonl_detects_each_format(tmp_path, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", BY_FMT[fmt])
    path.write_text("\n" + path.read_text())  # a blank line is skipped
    records, got = read_records(path)
    assert got == fmt
    assert records == BY_FMT[fmt]
    assert records[-1].where == f"{path}:{len(BY_FMT[fmt]) + 1}"


def test_json_array_with_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    recs = ALPACA + [{"instruction": "no output"}]
    path.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in recs) + "\n]\n")
    lines = path.read_text().splitlines()
    bad_line = next(i for i, l in enumerate(lines, 1) if '"no output"' in l) - 1  # the object's "{" line
    with pytest.raises(QLoraError, match=f"{path}:{bad_line}: missing field 'output'"):
        read_records(path)
    path.write_text(json.dumps(ALPACA))
    assert read_records(path) == (ALPACA, "alpaca")
    path.write_text("[]")
    with pytest.raises(QLoraError, match="no records"):
        read_records(path)


@pytest.mark.parametrize("delim,suffix", [(",", "csv"), ("\t", "tsv")])
def test_csv(tmp_path, delim, suffix):
    path = tmp_path / f"d.{suffix}"
    rows = [{"instruction": "Write, with commas", "input": "", "output": "line one\nline \"two\""},
            {"instruction": "Second", "input": "x", "output": "y"}]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"], delimiter=delim)
        w.writeheader()
        w.writerows(rows)
    records, fmt = read_records(path)
    assert fmt == "alpaca" and records == rows
    assert records[1].where == f"{path}:4"  # the first record spans lines 2-3
    assert to_messages(records[0], fmt)[0]["content"] == "Write, with commas"  # empty input dropped
    chat = tmp_path / "c.csv"
    with open(chat, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT[0]["messages"])])
    assert read_records(chat) == (CHAT, "chat")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    for fmt in ("chat", "completion"):
        path = tmp_path / f"{fmt}.parquet"
        pq.write_table(pa.Table.from_pylist(BY_FMT[fmt]), path)
        records, got = read_records(path)
        assert got == fmt and records == BY_FMT[fmt]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(QLoraError, match="not a readable Parquet file"):
        read_records(bad)


def test_forced_format(tmp_path):
    recs = [{"text": "t1", "prompt": "p1", "completion": "c1"}, {"text": "t2", "prompt": "p2", "completion": "c2"}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    assert read_records(path)[1] == "completion"
    assert read_records(path, "text")[1] == "text"
    with pytest.raises(QLoraError, match=f"{path}:1: missing field 'instruction'"):
        read_records(path, "alpaca")
    with pytest.raises(QLoraError, match="unknown data format"):
        read_records(path, "sharegpt")


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps(TEXT[1]) + "\n" + '{"text": "oops",\n')
    with pytest.raises(QLoraError, match=rf"{path}:3: invalid JSON \("):
        read_records(path)
    path.write_text(json.dumps(TEXT[0]) + "\n[1, 2]\n")
    with pytest.raises(QLoraError, match=f"{path}:2: expected a JSON object"):
        read_records(path)


def test_missing_and_bad_fields(tmp_path):
    cases = [([ALPACA[0], {"instruction": "x"}], ":2: missing field 'output'"),
             ([COMPLETION[0], {"completion": "x"}], ":2: missing field 'prompt'"),
             ([{"instruction": "x", "output": 3}], ":1: field 'output' must be a string"),
             ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: .*no assistant message"),
             ([{"messages": [{"role": "bot", "content": "hi"}]}], ":1: .*role 'bot'"),
             ([{"messages": [{"role": "user"}]}], ":1: .*missing field 'role' or 'content'"),
             ([{"question": "?", "answer": "!"}], ":1: cannot tell the format")]
    for recs, msg in cases:
        path = write_jsonl(tmp_path / "d.jsonl", recs)
        with pytest.raises(QLoraError, match=f"{path}{msg}"):
            read_records(path)


def test_sharegpt_is_chat(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B."}]}
    records, fmt = read_records(write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert fmt == "chat"
    assert to_messages(records[0], fmt) == [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."}]


def test_mixed_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA + CHAT)
    with pytest.raises(QLoraError, match=rf"{path}:3: record is in 'chat' format but the first record \({path}:1\) is 'alpaca'"):
        read_records(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(QLoraError, match="the file is empty"):
        read_records(empty)
    empty.write_text("\n  \n")
    with pytest.raises(QLoraError, match="no records"):
        read_records(empty)
    with pytest.raises(QLoraError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(QLoraError, match="not a file"):
        read_records(tmp_path)


def test_to_messages():
    rec = {"instruction": "Do", "input": "this", "output": "Done", "system": "S"}
    assert to_messages(rec, "alpaca") == [{"role": "system", "content": "S"}, {"role": "user", "content": "Do\n\nthis"},
                                          {"role": "assistant", "content": "Done"}]
    assert to_messages(COMPLETION[0], "completion")[1] == {"role": "assistant", "content": " blue."}
    assert to_messages(TEXT[0], "text") is None


# -------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("fmt", ["alpaca", "completion", "chat"])
def test_chat_template_mask(smol, fmt):
    examples, stats = tokenize_records(BY_FMT[fmt], fmt, smol)
    assert stats["template"] == "chat" and stats["template_fallback"] == 0
    for rec, ex in zip(BY_FMT[fmt], examples):
        msgs = to_messages(rec, fmt)
        # the ids are exactly transformers' rendering + tokenization of the conversation
        ref = smol(smol.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        assert ex.input_ids == ref
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert trained_runs(smol, ex) == [a + "<|im_end|>" for a in answers]
        assert sum(t != IGNORE for t in ex.labels) == sum(len(smol(a + "<|im_end|>")["input_ids"]) for a in answers)


def test_multi_turn_user_turns_masked(smol):
    ex = tokenize_records(CHAT, "chat", smol)[0][0]
    masked = smol.decode([t for t, l in zip(ex.input_ids, ex.labels) if l == IGNORE])
    assert "Be brief." in masked and "A?" in masked and "C?" in masked
    assert "B." not in masked and "quoted" not in masked
    assert trained_runs(smol, ex) == ["B.<|im_end|>", 'D, "quoted".<|im_end|>']


def test_train_on_prompt(smol, bpe):
    for tok in (smol, bpe):
        ex = tokenize_records(CHAT, "chat", tok, train_on_prompt=True)[0][0]
        assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_plain_template(bpe):
    examples, stats = tokenize_records(ALPACA, "alpaca", bpe)
    assert stats["template"] == "plain"
    ex = examples[0]
    text = "### Instruction:\nSay hi\n\nto Bob\n\n### Response:\nHi Bob!"
    assert ex.input_ids == bpe(text)["input_ids"] + [bpe.eos_token_id]  # <s> + text + </s>
    assert ex.input_ids[0] == bpe.bos_token_id and ex.labels[0] == IGNORE
    assert trained_runs(bpe, ex) == ["Hi Bob!</s>"]
    multi = tokenize_records(CHAT, "chat", bpe)[0][0]
    assert bpe.decode(multi.input_ids).startswith("<s>Be brief.\n\n### Instruction:\nA?\n\n### Response:\nB.</s>\n\n")
    assert trained_runs(bpe, multi) == ["B.</s>", 'D, "quoted".</s>']


def test_text_format(bpe, smol):
    for tok in (bpe, smol):
        examples, stats = tokenize_records(TEXT, "text", tok)
        ex = examples[0]
        assert ex.input_ids == tok(TEXT[0]["text"])["input_ids"] + [tok.eos_token_id]
        assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]
        assert stats["template"] == "none"


def test_eos_added_when_template_has_no_end_token(bpe):
    tok = with_template(bpe, "{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant:\n{% endif %}")
    ex = tokenize_records(CHAT, "chat", tok)[0][0]
    assert trained_runs(tok, ex) == ["B.</s>", 'D, "quoted".</s>']


def test_token_straddling_prompt_and_response_is_trained(smol):
    # "assistant: B." -- the byte-level token " B" starts in the prompt's space but ends in the
    # response: it is trained (else the response would lose its first token)
    saved = smol.chat_template
    smol.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    try:
        ex = tokenize_records(CHAT, "chat", smol)[0][0]
    finally:
        smol.chat_template = saved
    assert smol.convert_ids_to_tokens(smol(" B.")["input_ids"])[0] == "ĠB"  # one token " B"
    assert trained_runs(smol, ex) == [" B.<|im_end|>", ' D, "quoted".<|im_end|>']


def test_non_incremental_template_falls_back(bpe):
    # the last assistant turn is rendered differently from earlier ones (like Qwen3's <think>)
    tok = with_template(bpe, "{% for m in messages %}{{ m.role }}:\n{% if m.role == 'assistant' and loop.last %}"
                             "[final] {% endif %}{{ m.content }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant:\n{% endif %}")
    examples, stats = tokenize_records(CHAT, "chat", tok)
    assert stats["template_fallback"] == 1
    assert trained_runs(tok, examples[0]) == ["B.</s>", 'D, "quoted".</s>']


def test_template_errors_are_user_errors(bpe):
    tok = with_template(bpe, "{{ raise_exception('System role not supported') }}")
    with pytest.raises(QLoraError, match="chat template rejected.*System role not supported"):
        tokenize_records(CHAT, "chat", tok)
    with pytest.raises(QLoraError, match="no chat template"):
        tokenize_records(CHAT, "chat", bpe, template="chat")


@pytest.mark.parametrize("fmt,template", [("chat", "plain"), ("alpaca", "plain"), ("text", "auto"), ("chat", "chat")])
def test_piecewise_path_matches_offsets(bpe, fmt, template):
    tok = with_template(bpe, "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    a, _ = tokenize_records(BY_FMT[fmt], fmt, tok, template=template)
    b, _ = tokenize_records(BY_FMT[fmt], fmt, NoOffsets(tok), template=template)
    assert [trained_runs(tok, e) for e in a] == [trained_runs(tok, e) for e in b]
    assert [tok.decode(e.input_ids) for e in a] == [tok.decode(e.input_ids) for e in b]


# ----------------------------------------------------------------------------- truncation
def test_truncation_and_no_truncate(bpe):
    rng = random.Random(0)
    recs = [{"instruction": "Say hi " * rng.randint(1, 6), "output": "Fine thanks. " * rng.randint(1, 6)}
            for _ in range(20)]
    full, stats = tokenize_records(recs, "alpaca", bpe, max_length=10_000)
    lengths = [len(e) for e in full]
    limit = sorted(lengths)[12]
    expect = sum(n > limit for n in lengths)
    cut, stats = tokenize_records(recs, "alpaca", bpe, max_length=limit)
    assert stats["truncated"] == expect > 0 and stats["longest"] == max(lengths)
    assert all(len(e) <= limit for e in cut)
    assert [e.input_ids for e in cut] == [e.input_ids[:limit] for e in full]
    with pytest.raises(QLoraError, match=f"{expect} of 20 records are longer than max_length={limit} "
                                         rf"tokens \(longest: {max(lengths)}\).*--max-length"):
        tokenize_records(recs, "alpaca", bpe, max_length=limit, truncate=False)
    # a prompt longer than max_length leaves nothing to train on: dropped and counted
    recs.append({"instruction": "Say hi " * 200, "output": "x"})
    cut, stats = tokenize_records(recs, "alpaca", bpe, max_length=limit)
    assert stats["dropped"] == 1 and stats["examples"] == 20 == len(cut)


# -------------------------------------------------------------------------------- batches
def random_examples(n, vocab=100, lo=3, hi=40, seed=0):
    g = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [g.randrange(3, vocab) for _ in range(g.randint(lo, hi))]
        p = g.randint(1, len(ids) - 1)
        out.append(Example(ids, [IGNORE] * p + ids[p:]))
    return out


def test_split_validation_deterministic():
    ex = random_examples(50)
    tr, va = split_validation(ex, 0.2, seed=1)
    tr2, va2 = split_validation(ex, 0.2, seed=1)
    assert len(va) == 10 and len(tr) == 40 and tr == tr2 and va == va2
    assert sorted(map(id, tr + va)) == sorted(map(id, ex))
    assert split_validation(ex, 0.2, seed=2)[1] != va
    assert split_validation(ex, 0.0, seed=1) == (ex, [])
    with pytest.raises(QLoraError):
        split_validation(ex, 1.0, seed=1)


def test_batches_padding_and_coverage():
    ex = random_examples(37)
    b = Batches(ex, batch_size=4, pad_id=0, seed=3, pad_to_multiple_of=8)
    assert len(b) == 10
    seen = []
    for batch in b.epoch(0):
        ids, lab, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.dtype == lab.dtype == torch.long and ids.shape == lab.shape == att.shape
        assert ids.shape[1] % 8 == 0
        for row in range(ids.shape[0]):
            n = int(att[row].sum())
            assert att[row, :n].all() and not att[row, n:].any()  # right padding
            assert (ids[row, n:] == 0).all() and (lab[row, n:] == IGNORE).all()
            seen.append((ids[row, :n].tolist(), lab[row, :n].tolist()))
        assert int(batch["num_tokens"]) == int((lab != IGNORE).sum())
    assert sorted(seen) == sorted((e.input_ids, e.labels) for e in ex)


def test_batches_deterministic_and_resumable():
    ex = random_examples(60)
    for packing in (False, True):
        a = Batches(ex, 4, pad_id=0, seed=5, packing=packing, max_length=64)
        b = Batches(ex, 4, pad_id=0, seed=5, packing=packing, max_length=64)
        for k in (0, 3):
            ea, eb = a.epoch(k), b.epoch(k)
            assert len(ea) == len(eb) == len(a)
            for x, y in zip(ea, eb[0:]):
                assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x)
            tail = b.epoch(k)[5:]  # resume at step 5
            assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(list(ea)[5:], tail))
        assert a.plan(0) != a.plan(1)  # epochs are reshuffled
        assert Batches(ex, 4, pad_id=0, seed=6, packing=packing, max_length=64).plan(0) != a.plan(0)


def test_group_by_length_reduces_padding():
    ex = random_examples(256, lo=3, hi=200)
    pads = {}
    for group in (True, False):
        b = Batches(ex, 8, pad_id=0, seed=0, group_by_length=group)
        pads[group] = sum(int((x["attention_mask"] == 0).sum()) for x in b.epoch(0))
        first = b.epoch(0)[0]["input_ids"]
    assert pads[True] < pads[False] / 3
    b = Batches(ex, 8, pad_id=0, seed=0)
    assert b.epoch(0)[0]["input_ids"].numel() == max(x["input_ids"].numel() for x in b.epoch(0))


def test_pack_rows():
    lengths = [random.Random(i).randint(1, 50) for i in range(200)]
    rows = pack(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 1.1 + 1  # best-fit decreasing is near-optimal here


def test_packed_position_ids_and_labels():
    ex = random_examples(30, hi=20)
    b = Batches(ex, 3, pad_id=0, packing=True, max_length=48, seed=1)
    seen = []
    for batch in b.epoch(0):
        pos, ids, lab = batch["position_ids"], batch["input_ids"], batch["labels"]
        assert "attention_mask" not in batch and pos.shape == ids.shape
        for row in range(ids.shape[0]):
            starts = (pos[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for s, e in zip(starts, starts[1:]):
                assert pos[row, s:e].tolist() == list(range(e - s))  # restart at 0 per example
                if (lab[row, s:e] != IGNORE).any() or (ids[row, s:e] != 0).any():
                    seen.append((ids[row, s:e].tolist(), lab[row, s:e].tolist()))
                    assert lab[row, s] == IGNORE  # no target across example borders
    assert sorted(seen) == sorted((e.input_ids, e.labels) for e in ex)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return cfg, LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tiny_llama, attn):
    cfg, model = tiny_llama
    model.config._attn_implementation = attn
    ex = random_examples(12, hi=25, seed=2)
    batch = Batches(ex, 2, pad_id=0, packing=True, max_length=64, seed=0).epoch(0)[0]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        unmasked = model(input_ids=batch["input_ids"], use_cache=False).logits  # negative control
        dtype = None if attn == "sdpa" else torch.float32
        mask4d = block_causal_mask(batch["position_ids"], dtype)
        explicit = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=mask4d, use_cache=False).logits
        pos, n_checked, differs = batch["position_ids"], 0, False
        for row in range(pos.shape[0]):
            starts = (pos[row] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=batch["input_ids"][row:row + 1, s:e], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, s:e], alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(explicit[row, s:e], alone, atol=1e-5, rtol=1e-5)
                differs |= s > 0 and not torch.allclose(unmasked[row, s:e], alone, atol=1e-3)
                n_checked += 1
    assert n_checked > 2 and differs
    model.config._attn_implementation = "sdpa"


def test_packed_loss_is_token_mean_of_examples(tiny_llama):
    cfg, model = tiny_llama
    ex = random_examples(8, hi=25, seed=4)
    b = Batches(ex, 8, pad_id=0, packing=True, max_length=64, seed=0)
    assert len(b) == 1
    batch = b.epoch(0)[0]
    with torch.no_grad():
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     labels=batch["labels"], use_cache=False).loss
        total = torch.zeros(())
        for e in ex:
            logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(e.labels[1:]), reduction="sum")
    assert int(batch["num_tokens"]) == sum(sum(l != IGNORE for l in e.labels) for e in ex)
    torch.testing.assert_close(loss, total / batch["num_tokens"], atol=1e-5, rtol=1e-5)


def test_padded_batch_logits_equal_unpadded(tiny_llama):
    cfg, model = tiny_llama
    ex = random_examples(6, hi=25, seed=7)
    batch = Batches(ex, 6, pad_id=0, seed=0).epoch(0)[0]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        for row in range(6):
            n = int(batch["attention_mask"][row].sum())
            alone = model(input_ids=batch["input_ids"][row:row + 1, :n], use_cache=False).logits[0]
            torch.testing.assert_close(out[row, :n], alone, atol=1e-5, rtol=1e-5)


def test_batches_bad_input():
    ex = random_examples(4, hi=30)
    with pytest.raises(QLoraError, match="more than max_length=10"):
        Batches(ex, 2, pad_id=0, packing=True, max_length=10)
    with pytest.raises(QLoraError, match="batch size"):
        Batches(ex, 0, pad_id=0)
    with pytest.raises(QLoraError, match="no training examples"):
        Batches([], 2, pad_id=0)
