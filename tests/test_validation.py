"""--val-split auto (sizes, seeded and resumable split), evaluations at each epoch's end with greedy-answer
metrics (checked against `qlora eval`'s own evaluate on the same records), and the before/after answers."""
import json
import math

import pytest

from helpers import CITIES, cfg
from qlora import validation
from qlora.data import read_records
from qlora.errors import QLoraError
from qlora.evaluate import evaluate
from qlora.train import train
from tiny import make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    make_tiny_model(d / "model")
    rows = [{"instruction": f"what is the capital of {CITIES[i % 3]} ? {i % 10}", "output": f"the answer is {CITIES[i % 3]} ."}
            for i in range(100)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def rows_of(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("n, k", [(0, 0), (99, 0), (100, 8), (160, 8), (200, 10), (1000, 50), (3999, 200),
                                  (100000, 200)])
def test_auto_sizes(n, k):
    assert validation.held_count(n, "auto") == k
    assert len(validation.held_indices(n, "auto", 3)) == k


def test_fractions_still_work_and_bad_values_are_one_line():
    assert validation.held_count(40, 0.2) == 8 and validation.held_count(40, 0.0) == 0
    assert validation.held_count(40, 0.001) == 1  # at least one when asked for some
    assert validation.parse_split("0.25") == 0.25 and validation.parse_split("AUTO") == "auto"
    for bad in ("half", 1.0, -0.1, float("nan"), True):
        with pytest.raises(QLoraError, match="--val-split"):
            validation.parse_split(bad)


def test_split_is_deterministic_by_seed_and_resume_keeps_it(tmp_path):
    recs = list(range(300))
    a = validation.split_records(recs, "auto", 1)
    assert a == validation.split_records(recs, "auto", 1)
    assert a[2] != validation.split_records(recs, "auto", 2)[2]
    assert sorted(a[0] + a[1]) == recs and len(a[1]) == 15
    validation.save_split(tmp_path, len(recs), a[2], "auto")
    # resumed with another seed and fraction: the recorded split wins
    assert validation.split_records(recs, 0.5, 2, tmp_path, resume=True) == a
    with pytest.raises(QLoraError, match="--resume"):
        validation.split_records(recs[:-1], "auto", 1, tmp_path, resume=True)


def test_epoch_evaluations_and_answer_metrics_match_qlora_eval(setup, tmp_path):
    out = tmp_path / "run"
    log = []
    s = train(cfg(setup, out, max_steps=None, epochs=2, batch_size=16, grad_accum=2, save_every=0,
                  eval_max_new_tokens=6, compare_prompts=2), log=log.append)
    assert any("8 held out for validation (--val-split auto" in m for m in log)
    held = json.loads((out / "validation.json").read_text())["held"]
    assert len(held) == 8
    records, fmt = read_records(setup / "data.jsonl")
    val = [records[i] for i in held]
    evals = [r for r in rows_of(out) if "eval_loss" in r]
    per_epoch = math.ceil(92 / 16) // 2  # micro-batches of the 92 training records, 2 a step
    assert [r["step"] for r in evals] == [per_epoch, 2 * per_epoch]  # each epoch's end (the last by finish)
    ref = evaluate(s["model"], s["tokenizer"], val, fmt, max_new_tokens=6, max_length=1024)
    last = evals[-1]
    assert last["answered"] == 8
    assert last["exact_match"] == pytest.approx(ref["exact_match"]) and last["contains"] == pytest.approx(ref["contains"])
    assert last["eval_loss"] == pytest.approx(ref["loss"], rel=1e-4)
    answers = json.loads((out / "answers.json").read_text())["items"]
    assert [a["expected"] for a in answers] == [r["output"] for r in val[:2]]
    assert all(a["before"] is not None and a["after"] is not None for a in answers)
    assert [a["after"] for a in answers] == validation.answer(
        s["model"], s["tokenizer"], [[{"role": "user", "content": r["instruction"]}] for r in val[:2]], 6)
    assert any(m.startswith("Q: ") and "before:" in m for m in log)


def test_resumed_run_keeps_split_and_before_answers(setup, tmp_path):
    out = tmp_path / "run"
    train(cfg(setup, out, max_steps=3, save_every=3, eval_max_new_tokens=4, eval_samples=2), log=lambda m: None)
    first = (out / "validation.json").read_text()
    before = [a["before"] for a in json.loads((out / "answers.json").read_text())["items"]]
    log = []
    train(cfg(setup, out, max_steps=5, save_every=3, eval_max_new_tokens=4, eval_samples=2, resume=True,
              val_split=0.5, seed=7), log=log.append)
    assert (out / "validation.json").read_text() == first
    assert [a["before"] for a in json.loads((out / "answers.json").read_text())["items"]] == before
    assert any("8 held out" in m for m in log)


def test_bad_flags_fail_before_the_model_loads(setup, tmp_path):
    for kw, flag in ((dict(val_split="most"), "--val-split"), (dict(eval_samples=-1), "--eval-samples"),
                     (dict(early_stop=1.5), "--early-stop"), (dict(eval_max_new_tokens=0), "--eval-max-new-tokens")):
        with pytest.raises(QLoraError, match=flag):
            train(cfg(setup, tmp_path / "x", model=str(tmp_path / "no-model-here"), **kw), log=lambda m: None)
