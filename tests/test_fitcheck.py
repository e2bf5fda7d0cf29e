"""Fit warnings fire on constructed runs (too few steps, rising validation loss, flat loss, truncation)
and stay quiet on a healthy run; --early-stop keeps the adapter of the best evaluation bit for bit."""
import json
import math
import re
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from helpers import cfg, make_train_dir
from qlora import fitcheck
from qlora.errors import QLoraError
from qlora.train import train
from test_validation import setup as val_setup  # noqa: F401  (100 records: 8 held out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_train_dir(tmp_path_factory.mktemp("fit"))  # 40 records: no validation


def warnings_of(out):
    return {r["kind"]: r["warning"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "warning" in r}


def rows(train_losses, evals):
    out = [{"step": i + 1, "loss": x} for i, x in enumerate(train_losses)]
    return out + [{"step": s, "eval_loss": e} for s, e in evals]


def test_too_few_steps_warns_with_settings_that_give_enough(setup, tmp_path):
    log = []
    train(cfg(setup, tmp_path / "r", max_steps=None, epochs=1, save_every=0), log=log.append)  # 40 / (4x2) = 5 steps
    w = warnings_of(tmp_path / "r")["few_steps"]
    assert w.startswith("5 optimizer steps") and f"warning: {w}" in log
    assert "--batch-size" not in w  # 40 examples, one epoch: no batch size gives 50 steps
    w400 = fitcheck.few_steps(5, 400, cfg(setup, tmp_path, max_steps=None))  # 400 examples: a batch size helps
    b = int(re.search(r"--batch-size (\d+) --grad-accum 1", w400).group(1))
    assert b <= 4 and math.ceil(400 / b) >= fitcheck.MIN_STEPS  # one epoch of batches of b: that many steps
    e = int(re.search(r"--epochs (\d+)", w).group(1))
    assert e * (math.ceil(40 / 4) // 2) >= fitcheck.MIN_STEPS > (e - 1) * (math.ceil(40 / 4) // 2)


def test_a_healthy_run_is_quiet(setup, tmp_path):
    out = tmp_path / "r"
    train(cfg(setup, out, max_steps=50, batch_size=2, grad_accum=1, save_every=0), log=lambda m: None)
    assert warnings_of(out) == {}


def test_flat_loss_warns(setup, tmp_path):
    out = tmp_path / "r"
    train(cfg(setup, out, max_steps=fitcheck.FLAT_MIN_STEPS, batch_size=1, grad_accum=1, save_every=0, lr=1e-9),
          log=lambda m: None)
    assert "training loss is not moving" in warnings_of(out)["flat"] and "--lr" in warnings_of(out)["flat"]
    assert fitcheck.flat(rows([3.0 - 0.05 * i for i in range(30)], []), 1e-4) is None


def test_overfitting_needs_two_rises_while_training_loss_falls(tmp_path):
    falling = [2.0 - 0.1 * i for i in range(12)]
    w = fitcheck.overfitting(rows(falling, [(4, 1.0), (8, 1.1), (12, 1.2)]), tmp_path)
    assert "overfitting" in w and "at step 4" in w and "no checkpoint" in w
    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    assert str(tmp_path / "checkpoints" / "step-0000004") in fitcheck.overfitting(
        rows(falling, [(4, 1.0), (8, 1.1), (12, 1.2)]), tmp_path)
    assert fitcheck.overfitting(rows(falling, [(4, 1.0), (8, 1.1), (12, 1.05)]), tmp_path) is None  # one rise
    assert fitcheck.overfitting(rows(falling[::-1], [(4, 1.0), (8, 1.1), (12, 1.2)]), tmp_path) is None  # train up


def test_most_examples_truncated_warns():
    assert "raise --max-length to 300" in fitcheck.truncated({"records": 10, "truncated": 6, "longest": 300}, 128)
    assert fitcheck.truncated({"records": 10, "truncated": 5, "longest": 300}, 128) is None


def test_few_steps_with_max_steps_suggests_max_steps():
    c = SimpleNamespace(batch_size=4, grad_accum=4, epochs=1.0, max_steps=10)
    assert "--max-steps 50" in fitcheck.few_steps(10, 100, c)
    assert fitcheck.few_steps(50, 100, c) is None


def test_early_stop_keeps_the_best_adapter_bit_for_bit(val_setup, tmp_path):  # noqa: F811
    out = tmp_path / "r"
    log = []
    s = train(cfg(val_setup, out, max_steps=12, eval_every=1, save_every=1, keep_last=100, early_stop=2, lr=0.05,
                  eval_samples=0, compare_prompts=0), log=log.append)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])["step"]
    assert s["steps"] == evals[-1]["step"] and evals[-1]["step"] - best == 2  # stopped 2 evaluations after the best
    assert any(m.startswith("early stop") for m in log)
    ours = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ck = load_file(str(out / "checkpoints" / f"step-{best:07d}" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ck.keys() and all((ours[k] == ck[k]).all() for k in ours)
    last = load_file(str(out / "checkpoints" / f"step-{s['steps']:07d}" / "adapter" / "adapter_model.safetensors"))
    assert any((ours[k] != last[k]).any() for k in ours)


def test_early_stop_without_validation_is_one_line(setup, tmp_path):
    with pytest.raises(QLoraError, match="--early-stop 2 needs validation data"):
        train(cfg(setup, tmp_path / "r", early_stop=2), log=lambda m: None)
