"""qlora eval: loss against a hand computation with F.cross_entropy on the response tokens of
transformers' model over the dequantized weights, batched greedy answers against one-by-one
generation, exact match / contains, the CLI and its errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from qlora.cli import main
from qlora.errors import QLoraError
from qlora.evaluate import contains, evaluate, exact, greedy_answers, normalize
from qlora.generate import encode_messages, generate, load_for_inference

from helpers import EOS, load, make_model_dir, reference_model

CHAT = [
    {"messages": [{"role": "user", "content": "what color is the sky ?"},
                  {"role": "assistant", "content": "the sky is blue ."}]},
    {"messages": [{"role": "system", "content": "you are a cat"}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hello how are you"}, {"role": "user", "content": "fine thanks"},
                  {"role": "assistant", "content": "yes"}]},
    {"messages": [{"role": "user", "content": "tell me a story about a dog"},
                  {"role": "assistant", "content": "one big red dog and then a small cat ."}]},
    {"messages": [{"role": "user", "content": "the capital of france ?"},
                  {"role": "assistant", "content": "paris"}]},
    {"messages": [{"role": "user", "content": "grass ?"}, {"role": "assistant", "content": "green , yes"}]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for kind, template in (("chat", "default"), ("plain", None)):
        path = make_model_dir(root / kind, **({} if template else {"template": None}))
        model, tok = load(path)
        out[kind] = path, model, tok, reference_model(path, model)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scored_positions(tok, msgs, layout):
    """Token ids of the whole conversation and the positions training scores, worked out from the
    layout itself: each assistant turn's tokens (from the end of the prompt that precedes it to the
    end of the turn), followed by EOS where the layout has no end-of-turn token of its own."""
    if layout == "chat":
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        pos = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                head = tok(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
                upto = tok(tok.apply_chat_template(msgs[:i + 1], tokenize=False), add_special_tokens=False)["input_ids"]
                assert full[:len(upto)] == upto and upto[-1] == EOS  # the template ends the turn with </s>
                pos += range(len(head), len(upto))
        return full, pos
    # plain: "### Instruction:\n{user}\n\n### Response:\n{answer}" + EOS, BOS in front
    (u, a) = [m["content"] for m in msgs if m["role"] != "system"]
    prompt = tok(f"### Instruction:\n{u}\n\n### Response:\n")["input_ids"]
    answer = tok(a, add_special_tokens=False)["input_ids"] + [EOS]
    return prompt + answer, list(range(len(prompt), len(prompt) + len(answer)))


def hand_loss(ref, tok, records, layout):
    total, n = 0.0, 0
    for r in records:
        ids, pos = scored_positions(tok, r["messages"], layout)
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        p = torch.tensor(pos)
        total += F.cross_entropy(logits[p - 1].float(), torch.tensor(ids)[p], reduction="sum").item()
        n += len(pos)
    return total / n, n


@pytest.mark.parametrize("layout", ["chat", "plain"])
def test_loss_equals_hand_cross_entropy(tiny, layout):
    path, model, tok, ref = tiny[layout]
    records = CHAT if layout == "chat" else [r for r in CHAT if len(r["messages"]) == 2]
    want, n = hand_loss(ref, tok, records, layout)
    m = evaluate(model, tok, records, "chat", max_new_tokens=0, batch_size=2)  # 2 per batch: padding
    assert m["tokens"] == n and m["n"] == len(records) and m["template"] == layout
    assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert m["exact_match"] is None and m["generated"] == 0
    # batch size does not change the token-weighted mean
    assert evaluate(model, tok, records, "chat", max_new_tokens=0, batch_size=5)["loss"] == pytest.approx(want, rel=1e-5)


def test_loss_of_other_formats(tiny):
    path, model, tok, ref = tiny["chat"]
    alpaca = [{"instruction": "what color is the sky", "input": "", "output": "blue ."}]
    as_chat = [{"messages": [{"role": "user", "content": "what color is the sky"},
                             {"role": "assistant", "content": "blue ."}]}]
    assert evaluate(model, tok, alpaca, "alpaca", max_new_tokens=0)["loss"] == \
        pytest.approx(hand_loss(ref, tok, as_chat, "chat")[0], rel=1e-5)
    text = [{"text": "the sky is blue"}, {"text": "hello world"}]
    m = evaluate(model, tok, text, "text", max_new_tokens=8)
    total, n = 0.0, 0
    for r in text:  # every token after BOS, plus an EOS
        ids = tok(r["text"])["input_ids"] + [EOS]
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        n += len(ids) - 1
    assert m["tokens"] == n and m["loss"] == pytest.approx(total / n, rel=1e-5)
    assert m["exact_match"] is None and m["contains"] is None and m["generated"] == 0


def test_batched_left_padded_answers_equal_single(tiny):
    _, model, tok, _ = tiny["chat"]
    prompts = [r["messages"][:-1] for r in CHAT]
    ids = [encode_messages(tok, p, "chat") for p in prompts]
    assert len({len(i) for i in ids}) > 2  # different lengths, so rows are padded
    with torch.no_grad():
        batched = greedy_answers(model, tok, ids, max_new_tokens=7, batch_size=3)
    single = [generate(model, tok, p[-1]["content"], max_new_tokens=7, history=p[:-1]) for p in prompts]
    assert batched == single
    assert sum(len(a.split()) > 1 for a in batched) >= 3  # non-trivial answers


def test_exact_match_and_contains(tiny):
    _, model, tok, _ = tiny["chat"]
    recs = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": "x"}]} for r in CHAT[:4]]
    answers = [generate(model, tok, r["messages"][-2]["content"], max_new_tokens=7, history=r["messages"][:-2])
               for r in recs]
    assert all(len(a.split()) >= 2 for a in answers)
    refs = [answers[0], answers[1].upper() + " .", answers[2].split()[0], "zzz unrelated words"]
    for r, ref in zip(recs, refs):
        r["messages"][-1]["content"] = ref
    m = evaluate(model, tok, recs, "chat", max_new_tokens=7, batch_size=4, n_samples=2)
    assert m["exact_match"] == pytest.approx(0.5) and m["contains"] == pytest.approx(0.75)
    assert m["generated"] == 4 and len(m["samples"]) == 2
    assert m["samples"][0] == {"prompt": recs[0]["messages"][-2]["content"], "reference": refs[0],
                               "answer": answers[0]}


def test_normalize_and_scores():
    assert normalize("  The  Sky\nis BLUE!!  ") == "the sky is blue"
    assert normalize("Paris.") == normalize("paris") == "paris"
    assert normalize("3.5") == "3.5" and normalize("...") == ""
    assert exact("Paris.", " paris ") and not exact("Paris is nice", "Paris")
    assert contains("It is Paris.", "paris") and contains("Paris", "The answer is Paris")
    assert not contains("", "paris") and not contains("London", "Paris")
    assert contains("", "")


# ------------------------------------------------------------------------------------- cli
def test_eval_cli_json_and_table(tiny, tmp_path, capsys):
    path, model, tok, _ = tiny["chat"]
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    base = ["eval", "--model", str(path), "--data", str(data), "--device", "cpu", "--dtype", "fp32",
            "--max-new-tokens", "5", "--batch-size", "2"]
    assert main(base + ["--json", "--limit", "3"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert {"loss", "perplexity", "exact_match", "contains", "n"} <= set(got) and got["n"] == 3
    want = evaluate(model, tok, CHAT[:3], "chat", max_new_tokens=5, batch_size=2)
    for k in ("loss", "perplexity", "exact_match", "contains", "tokens"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert got["samples"] == want["samples"]
    assert main(base) == 0
    out, _ = capsys.readouterr()
    full = evaluate(model, tok, CHAT, "chat", max_new_tokens=0)
    assert f"loss         {full['loss']:.4f}" in out and f"perplexity   {full['perplexity']:.3f}" in out
    assert out.count("reference:") == 3


def test_eval_cli_errors(tiny, tmp_path, capsys, monkeypatch):
    path = tiny["chat"][0]
    data = write_jsonl(tmp_path / "d.jsonl", CHAT)
    (tmp_path / "empty.jsonl").write_text("")
    cases = [
        (["--model", str(path), "--data", str(tmp_path / "empty.jsonl")], "empty"),
        (["--model", str(path), "--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--model", str(tmp_path / "nope"), "--data", str(data)], "not found"),
        (["--model", str(path), "--data", str(data), "--adapter", str(tmp_path / "x")], "adapter directory not found"),
        (["--model", str(path), "--data", str(data), "--limit", "0"], "--limit"),
        (["--model", str(path), "--data", str(data), "--batch-size", "0"], "batch size"),
        (["--model", str(path), "--data", str(data), "--max-new-tokens", "-1"], "max_new_tokens"),
        (["--model", str(path), "--data", str(data), "--max-length", "0"], "max_length"),
    ]
    import qlora.generate
    load = qlora.generate.load_for_inference
    for extra, needle in cases:
        early = needle in ("batch size", "max_new_tokens", "max_length", "--limit")  # checked before the model loads
        monkeypatch.setattr(qlora.generate, "load_for_inference",
                            (lambda *a, **k: pytest.fail("model loaded before the check")) if early else load)
        rc = main(["eval", "--device", "cpu", "--dtype", "fp32", *extra])
        out, err = capsys.readouterr()
        assert rc == 2, (extra, err)
        assert needle in err.strip().splitlines()[-1] and "Traceback" not in err, (extra, err)
    with pytest.raises(QLoraError, match="no records"):
        evaluate(tiny["chat"][1], tiny["chat"][2], [], "chat")


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny):
    path, cpu_model, tok, _ = tiny["chat"]
    model, _ = load_for_inference(str(path), None, device="cuda", dtype="fp32", progress=False)
    want = evaluate(cpu_model, tok, CHAT, "chat", max_new_tokens=6, batch_size=2)
    got = evaluate(model, tok, CHAT, "chat", max_new_tokens=6, batch_size=2)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4) and got["tokens"] == want["tokens"]
    assert got["samples"] == want["samples"] and got["exact_match"] == want["exact_match"]
