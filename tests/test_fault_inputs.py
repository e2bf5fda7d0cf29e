"""Bad or extreme input that used to pass silently, crash or take minutes (issue 32; docs/faults.md):
empty eval references, data with no response at all, non-integer YAML values for integer options,
binary and mistyped --config files, a 50 MB-style record cut lazily with the same tokens, and
--truncate false refused before the model loads."""
import json

import pytest

from qlora.cli import main
from qlora.config import build_config
from qlora.data import CUT_CHARS_PER_TOKEN, read_records, tokenize_records
from qlora.errors import QLoraError
from qlora.evaluate import check_references
from qlora.train import TrainConfig, train

from tiny import make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    make_tiny_model(d / "model")
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ."}
            for c in ["paris", "rome", "berlin"] * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (merges across characters, unlike tiny.py's word-level one)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(topics.values())[:40], trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def no_load(monkeypatch):
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- silent cases


def test_eval_refuses_empty_references_before_the_model_loads(setup, tmp_path, monkeypatch, capsys):
    """Issue 32, case 4: an empty reference was "contained" in every answer (contains: 1.0)."""
    import qlora.generate
    monkeypatch.setattr(qlora.generate, "load_for_inference", lambda *a, **k: pytest.fail("model loaded"))
    data = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}])
    assert main(["eval", "--model", str(setup / "model"), "--data", str(data)]) == 2
    assert "e.jsonl:2: the reference answer (the last assistant message) is empty" in capsys.readouterr().err
    records, fmt = read_records(data)
    with pytest.raises(QLoraError, match="e.jsonl:2"):
        check_references(records, fmt)
    check_references(records[:1], fmt)  # a filled one passes


@pytest.mark.parametrize("rows", [
    [{"instruction": "what is it ?", "output": ""}] * 3,
    [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}] * 2,
    [{"prompt": "p", "completion": "\n"}],
    [{"text": ""}, {"text": " "}],
])
def test_data_without_any_response_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch, rows):
    """Issue 32, case 6: every response empty trained 8 end-of-turn tokens and exited 0."""
    no_load(monkeypatch)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(QLoraError, match=rf"d.jsonl: 0 of {len(rows)} examples have a response to train on"):
        train(TrainConfig(data=str(data), model=str(setup / "model"), output=str(tmp_path / "o"), progress=False),
              log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_some_empty_responses_are_counted_not_refused(setup, bpe):
    recs = [{"instruction": "a", "output": ""}, {"instruction": "b", "output": "yes"}]
    _, stats = tokenize_records(recs, "alpaca", bpe, max_length=64, template="plain")
    assert stats["empty_responses"] == 1 and stats["examples"] == 2
    with pytest.raises(QLoraError, match="0 of 1 examples have a response"):
        tokenize_records(recs[:1], "alpaca", bpe, max_length=64, template="plain")


@pytest.mark.parametrize("key,value", [("max_steps", 2.9), ("rank", 4.7), ("batch_size", 1.5)])
def test_yaml_non_integer_for_an_integer_option_is_refused(tmp_path, key, value):
    """Issue 32, case 7: `max_steps: 2.9` and `rank: 4.7` became 2 and 4 (the flags refuse them)."""
    y = tmp_path / "c.yaml"
    y.write_text(f"{key}: {value}\n")
    with pytest.raises(QLoraError, match=rf"{y}: option {key}: expected int, got {value}"):
        build_config(TrainConfig, y)
    y.write_text(f"{key}: {float(int(value))}\n")  # 2.0 is an integer written as a float: taken
    assert getattr(build_config(TrainConfig, y), key) == int(value)
    # a flag overrides the file's bad value (the file's is never used)
    assert getattr(build_config(TrainConfig, y, {key: 3}), key) == 3


@pytest.mark.parametrize("text,match", [
    ("data: {a: 1}\n", r"option data: expected str, got \{'a': 1\}"),
    ("output: 123\n", "option output: expected str, got 123"),
    ("model: [a, b]\n", r"option model: expected str, got \['a', 'b'\]"),
])
def test_yaml_value_of_the_wrong_kind_names_file_and_key(tmp_path, capsys, text, match):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(QLoraError, match=f"{y}: {match}"):
        build_config(TrainConfig, y)
    assert main(["train", "--config", str(y)]) == 2
    assert "internal error" not in capsys.readouterr().err


def test_yaml_boolean_for_an_auto_true_false_option(tmp_path):
    """`share_prompt: true` (a YAML boolean) is the option's "true"; a word it does not know is refused."""
    y = tmp_path / "c.yaml"
    for text, want in (("true", "true"), ("false", "false"), ("auto", "auto"), ("yes", "true")):
        y.write_text(f"share_prompt: {text}\n")
        assert build_config(TrainConfig, y).share_prompt == want
    y.write_text("share_prompt: maybe\n")
    with pytest.raises(QLoraError, match="option share_prompt: 'maybe' is not one of auto, true, false"):
        build_config(TrainConfig, y)


def test_binary_config_file_is_one_line(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert f"{y}: not a text file" in err and "internal error" not in err


# --------------------------------------------------------------------------- lazy tokenization


def _words(n: int, seed: int = 0) -> str:
    import random
    rnd = random.Random(seed)
    vocab = "the capital of paris is a city where widget gadget costs seven dollars, and 12345 yes!".split()
    return " ".join(rnd.choice(vocab) + rnd.choice(["", "s", "ing", "\n"]) for _ in range(n))


def _full(monkeypatch, *args, **kw):
    """tokenize_records with cutting disabled: the whole text is tokenized, then truncated."""
    import qlora.data
    with monkeypatch.context() as m:
        m.setattr(qlora.data, "CUT_CHARS_PER_TOKEN", 10 ** 12)
        return tokenize_records(*args, **kw)


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text"])
def test_huge_record_is_cut_before_tokenizing_with_the_same_tokens(bpe, monkeypatch, fmt):
    """Issue 32, case 8: a 50 MB record with --max-length 64 took 10 min and 8.3 GB; now the text is cut by
    characters first (checked bound), and the tokens equal tokenizing everything and then truncating."""
    big = _words(40_000)  # ~300 KB: enough to show the cut, small enough to tokenize whole for the reference
    rec = {"alpaca": {"instruction": big, "output": "the answer"},
           "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": big}]},
           "text": {"text": big}}[fmt]
    small = {"alpaca": {"instruction": "what", "output": "paris"},
             "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
             "text": {"text": "short"}}[fmt]
    for max_length in (64, 200):
        kw = dict(max_length=max_length, template="plain", train_on_prompt=fmt == "alpaca")
        got, stats = tokenize_records([rec, small], fmt, bpe, **kw)
        want, _ = _full(monkeypatch, [rec, small], fmt, bpe, **kw)
        assert stats["cut"] == 1 and stats["truncated"] == 1
        assert [e.input_ids for e in got] == [e.input_ids for e in want]
        assert [e.labels for e in got] == [e.labels for e in want]
        assert len(got[0]) == max_length


def test_one_giant_word_still_gives_the_same_tokens(monkeypatch):
    """A tokenizer may give one token to a huge unknown word (tiny.py's word-level one does): then the bound
    holds far fewer tokens than it assumes, the check sees it, and the cut widens (here to the whole text),
    so the tokens stay those of the uncut text."""
    from tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    giant = "z" * 50_000 + " the answer is paris ." * 20_000
    got, stats = tokenize_records([{"text": giant}], "text", tok, max_length=64)
    want, _ = _full(monkeypatch, [{"text": giant}], "text", tok, max_length=64)
    assert got[0].input_ids == want[0].input_ids and got[0].input_ids[0] == tok.unk_token_id
    assert stats["cut"] == 1  # cut after all, once the bound took in enough tokens


def test_cut_bounds_the_tokenizer_work(setup, bpe, monkeypatch):
    """The tokenizer never sees more than max_length * CUT_CHARS_PER_TOKEN characters of a 5 MB text."""
    seen = []
    real = type(bpe).__call__
    monkeypatch.setattr(type(bpe), "__call__", lambda self, text, *a, **k: seen.append(
        max(map(len, text)) if isinstance(text, list) else len(text)) or real(self, text, *a, **k))
    big = _words(700_000)  # ~5 MB
    ex, stats = tokenize_records([{"text": big}], "text", bpe, max_length=64)
    assert len(ex[0]) == 64 and stats["cut"] == 1
    assert max(seen) <= 64 * CUT_CHARS_PER_TOKEN, max(seen)


def test_truncate_false_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    """Issue 32, case 9: --truncate false violations were reported after the model load."""
    no_load(monkeypatch)
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "what is the capital of paris ?",
                                                  "output": " ".join(["the answer is paris ."] * 40)}])
    with pytest.raises(QLoraError, match=r"1 of 1 records are longer than max_length=32"):
        train(TrainConfig(data=str(data), model=str(setup / "model"), output=str(tmp_path / "o"), max_length=32,
                          truncate=False, progress=False), log=lambda m: None)
    assert not (tmp_path / "o").exists()
