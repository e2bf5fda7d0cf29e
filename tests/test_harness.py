"""qlora eval --harness (qlora.harness): lm-evaluation-harness tasks on OUR loaded model (base + adapter).
References: transformers' Llama carrying the same dequantized NF4 weights + LoRA (helpers.reference_model)
scores the same token ids; the task is a YAML file over a local JSONL written here."""
import json
import math

import pytest
import torch

from qlora.cli import main
from qlora.errors import QLoraError

from helpers import load, make_model_dir, reference_model, save_random_adapter

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'qlora[harness]')")

DOCS = [{"question": "what color is the sky ?", "choices": ["blue", "green", "red"], "label": 0},
        {"question": "what color is the grass ?", "choices": ["blue", "green", "red"], "label": 1},
        {"question": "the capital of france is", "choices": ["paris", "dog", "cat"], "label": 0},
        {"question": "how are you ?", "choices": ["fine", "no", "big"], "label": 0}]


def write_task(folder, name="tiny_qa", docs=DOCS):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, adapter_dir_module):
    path, adapter = adapter_dir_module
    model, tok = load(path, adapter)
    return path, model, tok, reference_model(path, model)


@pytest.fixture(scope="module")
def adapter_dir_module(tmp_path_factory):
    """A tiny model and an adapter with non-zero B (so the adapter changes the scores)."""
    path = make_model_dir(tmp_path_factory.mktemp("h") / "m")
    return path, save_random_adapter(path, tmp_path_factory.mktemp("ad") / "adapter", seed=3)


def ref_logp(ref, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(lp[p - 1, ids[p]] for p in range(len(ids) - n_cont, len(ids))))


def test_custom_yaml_task_accuracy_equals_the_reference_choice(tiny, tmp_path):
    from qlora import harness
    path, model, tok, ref = tiny
    tasks = harness.load_tasks("tiny_qa", str(write_task(tmp_path / "tasks")))
    got = harness.run(model, tok, tasks, batch_size=2)
    right = 0
    for d in DOCS:  # the harness's pairing: context "Q", continuation " choice"; argmax of summed log p
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = [ref_logp(ref, ctx + tok(" " + c, add_special_tokens=False)["input_ids"], 1) for c in d["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == d["label"]
    assert got["tiny_qa"]["acc"] == pytest.approx(right / len(DOCS))


def test_the_three_request_kinds_match_transformers(tiny):
    from lm_eval.api.instance import Instance
    from qlora.harness import make_lm
    path, model, tok, ref = tiny
    lm = make_lm(model, tok, batch_size=3)

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)
    pairs = [("what color is the sky ?", " blue"), ("hello", " world how are you"), ("the capital of", " france is")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (c, x), (lp, _) in zip(pairs, got):
        ids = tok(c + x, add_special_tokens=False)["input_ids"]
        n = len(ids) - len(tok(c, add_special_tokens=False)["input_ids"])
        assert lp == pytest.approx(ref_logp(ref, ids, n), abs=1e-4)
    text = "the sky is blue and the grass is green"
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]  # prefix token, then every token
    assert rolling == pytest.approx(ref_logp(ref, ids, len(ids) - 1), abs=1e-4) and math.isfinite(rolling)
    (gen,) = lm.generate_until([req("generate_until", ("tell me a story about", {"until": ["\n"],
                                                                                  "max_gen_toks": 6}))])
    prompt = tok("tell me a story about", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                            pad_token_id=0)[0, len(prompt):].tolist()
    want = want[:want.index(2)] if 2 in want else want
    assert gen == tok.decode(want, skip_special_tokens=True)


def test_cli_harness_json_and_bad_inputs(tiny, tmp_path, capsys):
    path, _, _, _ = tiny
    tasks = write_task(tmp_path / "tasks")
    assert main(["eval", "--model", str(path), "--harness", "tiny_qa", "--harness-include", str(tasks),
                 "--compute-dtype", "fp32", "--json", "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tiny_qa"} and 0.0 <= out["tiny_qa"]["acc"] <= 1.0
    # a task whose data file is gone: one line, before the model loads (--model does not exist)
    gone = write_task(tmp_path / "t2", "gone_qa")
    (gone / "gone_qa.jsonl").unlink()
    assert main(["eval", "--model", str(tmp_path / "nope"), "--harness", "gone_qa", "--harness-include",
                 str(gone)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data set could not be loaded" in err and "\n" not in err
    assert main(["eval", "--model", str(path), "--harness", "tiny_qa", "--data", "x.jsonl"]) == 2
    assert "one of the two" in capsys.readouterr().err


@pytest.mark.slow  # an unknown name is looked up in the harness's own index of thousands of tasks (~10 s)
def test_unknown_task_is_one_line_before_the_model(tmp_path, capsys):
    tasks = write_task(tmp_path / "tasks")
    assert main(["eval", "--model", str(tmp_path / "nope"), "--harness", "no_such_task_xyz",
                 "--harness-include", str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'no_such_task_xyz'" in err and "\n" not in err


def test_missing_harness_package_is_one_line(monkeypatch):
    import sys
    from qlora import harness
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(QLoraError, match=r"qlora\[harness\]"):
        harness.load_tasks("tiny_qa")
