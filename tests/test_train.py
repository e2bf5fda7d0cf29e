"""Training loop: exact resume, loss regression, robustness (bad input, NaN, corrupt checkpoint,
disk full, interruption), on a tiny random Llama (see tiny.py)."""
import json
import os
import shutil
import signal

import pytest
import torch

from qlora.cli import main
from qlora.config import build_config
from qlora.errors import QLoraError
from qlora.train import TrainConfig, latest_checkpoint, train

from helpers import cfg, losses

def test_loss_falls_and_outputs_written(setup, tmp_path):
    s = train(cfg(setup, tmp_path / "r", max_steps=12, dropout=0.0, lr=1e-2), log=lambda m: None)
    ls = losses(tmp_path / "r")
    assert len(ls) == 12 and ls[-1] < ls[0] * 0.8, ls
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors"):
        assert (tmp_path / "r" / f).is_file(), f
    assert s["steps"] == 12 and s["final_loss"] == pytest.approx(ls[-1], abs=1e-3)


@pytest.mark.parametrize("optim", ["adamw", "paged_adamw8bit"])
def test_resume_gives_same_losses_as_uninterrupted(setup, tmp_path, optim):
    full = tmp_path / "full"
    train(cfg(setup, full, optim=optim), log=lambda m: None)
    part = tmp_path / "part"
    train(cfg(setup, part, optim=optim, max_steps=6), log=lambda m: None)
    # keep only the step-3 checkpoint, as if the run had died after step 3
    shutil.rmtree(part / "checkpoints" / "step-0000006")
    train(cfg(setup, part, optim=optim, resume=True), log=lambda m: None)
    assert losses(part) == losses(full)  # bit-identical on the CPU


def test_eval_before_and_during_training_does_not_change_training(setup, tmp_path):
    a = tmp_path / "a"
    train(cfg(setup, a), log=lambda m: None)
    b = tmp_path / "b"
    train(cfg(setup, b, val_split=0.2, eval_every=1), log=lambda m: None)
    c = tmp_path / "c"
    train(cfg(setup, c, val_split=0.2, eval_every=0), log=lambda m: None)
    assert losses(b) == losses(c)  # evaluating every step changes nothing
    rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in rows) == 6


def test_existing_output_refused_unless_resume_or_overwrite(setup, tmp_path):
    train(cfg(setup, tmp_path / "r", max_steps=1), log=lambda m: None)
    with pytest.raises(QLoraError, match="already holds a run"):
        train(cfg(setup, tmp_path / "r", max_steps=1), log=lambda m: None)
    train(cfg(setup, tmp_path / "r", max_steps=1, overwrite=True), log=lambda m: None)



@pytest.mark.parametrize("kw,flag", [
    (dict(dropout=1.5), "--dropout"), (dict(warmup_ratio=2.0), "--warmup-ratio"), (dict(val_split=1.0), "--val-split"),
    (dict(epochs=0.0, max_steps=None), "--epochs"), (dict(alpha=-1.0), "--alpha"), (dict(rank=0), "--rank"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm"), (dict(save_every=-1), "--save-every"),
    (dict(eval_every=-2), "--eval-every"), (dict(log_every=0), "--log-every"), (dict(keep_last=0), "--keep-last"),
    (dict(max_steps=0), "--max-steps"), (dict(max_steps=-3), "--max-steps"), (dict(blocksize=100), "--blocksize"),
    (dict(lr=-1.0), "learning rate"), (dict(weight_decay=-1.0), "weight decay"), (dict(batch_size=0), "--batch-size"),
    (dict(data="missing.jsonl"), "no such file"), (dict(val_data="missing.jsonl"), "no such file"),
    (dict(device="tpu"), "--device"), (dict(model="shape:1b"), "--tokenizer-from"),
    (dict(model="shape:nope", tokenizer_from="."), "unknown shape"), (dict(model="missing"), "--model"),
    (dict(model="shape:1b", tokenizer_from="missing"), "--tokenizer-from"),
])
def test_bad_settings_and_data_fail_before_the_model_loads(setup, tmp_path, monkeypatch, kw, flag):
    """Each of these used to load the model first (minutes for an 8B one) or was taken silently: a negative
    --save-every saved every step, --max-grad-norm -1 silently meant no clipping, --log-every 0 crashed after
    training, --max-steps -3 ran nothing and saved an untrained adapter, --alpha -1 trained a negated adapter."""
    import qlora.model
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")
    monkeypatch.setattr(qlora.model, "load_model", no_load)
    kw = {k: str(tmp_path / v) if v in ("missing.jsonl", "missing") else v for k, v in kw.items()}
    with pytest.raises(QLoraError, match=flag):
        train(cfg(setup, tmp_path / "o", **kw), log=lambda m: None)
    assert not (tmp_path / "o").exists()  # nothing written either


def test_a_run_that_stopped_before_training_leaves_its_output_reusable(setup, tmp_path, monkeypatch):
    """A model that cannot be read fails before anything of the run is written (config.yaml comes once every
    check has passed; the lock file goes with the run); running again (fixed) needs no --overwrite, while a
    folder with a run in it does."""
    import qlora.model
    out = tmp_path / "o"

    def unreadable(*a, **k):
        raise QLoraError("cannot read the model")
    with monkeypatch.context() as m:
        m.setattr(qlora.model, "load_model", unreadable)
        with pytest.raises(QLoraError, match="cannot read the model"):
            train(cfg(setup, out, max_steps=1), log=lambda m: None)
    assert [p.name for p in out.iterdir()] == []
    train(cfg(setup, out, max_steps=1), log=lambda m: None)
    with pytest.raises(QLoraError, match="already holds a run"):
        train(cfg(setup, out, max_steps=1), log=lambda m: None)


def test_unreadable_records_fail_before_the_model_loads(setup, tmp_path, monkeypatch):
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"foo": 1}\n')
    with pytest.raises(QLoraError, match=r"bad.jsonl:2: .*\['foo'\]"):
        train(cfg(setup, tmp_path / "o", data=str(tmp_path / "bad.jsonl")), log=lambda m: None)

def test_corrupt_checkpoint_detected_previous_used(setup, tmp_path):
    out = tmp_path / "r"
    train(cfg(setup, out, max_steps=6, keep_last=3), log=lambda m: None)
    newest = out / "checkpoints" / "step-0000006" / "adapter" / "adapter_model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    msgs = []
    assert latest_checkpoint(out, warn=msgs.append).name == "step-0000003"
    assert "step-0000006 is corrupt" in msgs[0]


def test_nan_loss_stops_with_step(setup, tmp_path, monkeypatch):
    import qlora.loss as L
    orig = L.loss_sum
    calls = {"n": 0}

    def nan_after_step_3(*a, **k):  # the loss turns NaN in step 4 (2 micro-batches a step)
        calls["n"] += 1
        return orig(*a, **k) * (float("nan") if calls["n"] > 6 else 1.0)

    monkeypatch.setattr(L, "loss_sum", nan_after_step_3)  # the training loss every path reads from qlora.loss
    with pytest.raises(QLoraError, match=r"loss became nan at step 4.*step-0000003"):
        train(cfg(setup, tmp_path / "r", max_steps=6), log=lambda m: None)


def test_disk_full_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
    import safetensors.torch as st
    out = tmp_path / "r"
    real = st.save_file
    calls = {"n": 0}

    def failing(tensors, path, *a, **k):
        calls["n"] += 1  # 3 safetensors files per checkpoint: the second checkpoint runs out of space
        if calls["n"] > 3:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(QLoraError, match="could not save the checkpoint of step 6.*step-0000003 is intact"):
        train(cfg(setup, out), log=lambda m: None)
    monkeypatch.setattr(st, "save_file", real)
    assert latest_checkpoint(out).name == "step-0000003"
    assert not list((out / "checkpoints").glob(".tmp*"))


def test_sigint_saves_checkpoint_and_resume_matches(setup, tmp_path):
    import qlora.train as T
    full = tmp_path / "full"
    train(cfg(setup, full, save_every=0), log=lambda m: None)
    out = tmp_path / "r"
    orig = T.lr_factor

    def interrupt_at_4(step, *a):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(step, *a)

    T.lr_factor = interrupt_at_4
    try:
        s = train(cfg(setup, out, save_every=0), log=lambda m: None)
    finally:
        T.lr_factor = orig
    assert s["interrupted"] and s["step"] == 4
    train(cfg(setup, out, save_every=0, resume=True), log=lambda m: None)
    assert losses(out) == losses(full)


def test_cli_yaml_and_flags(setup, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"data: {setup / 'data.jsonl'}\nmodel: {setup / 'model'}\nrank: 4\nmax_steps: 2\n"
                 f"compute_dtype: fp32\nprogress: false\nbatch_size: 8\n")
    rc = main(["train", "--config", str(y), "--output", str(tmp_path / "r"), "--max-steps", "1", "--grad-accum", "1"])
    assert rc == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "max_steps: 1" in saved and "rank: 4" in saved and "batch_size: 8" in saved
    bad = tmp_path / "bad.yaml"
    bad.write_text("rnak: 4\n")
    assert main(["train", "--config", str(bad), "--output", str(tmp_path / "x")]) == 2
    assert "unknown option(s) rnak" in capsys.readouterr().err
    with pytest.raises(QLoraError, match="option rank: expected int"):
        build_config(TrainConfig, None, {"rank": "many"})
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(setup / "model"),
                 "--output", str(tmp_path / "y")]) == 2


def test_offload_optimizer_gives_same_losses(setup, tmp_path):
    train(cfg(setup, tmp_path / "a", optim="paged_adamw"), log=lambda m: None)
    train(cfg(setup, tmp_path / "b", optim="paged_adamw", offload_optimizer=True), log=lambda m: None)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    with pytest.raises(QLoraError, match="paged optimizer"):
        train(cfg(setup, tmp_path / "c", optim="adamw", offload_optimizer=True), log=lambda m: None)
    assert not (tmp_path / "c").exists()  # refused before the output folder or the model


def test_integer_and_number_checks_refuse_bools():
    """One helper pair serves every settings check: a bool is never a count, a size or a rate."""
    from qlora.config import is_int, is_number
    assert is_int(3) and is_int(0) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_number(3) and is_number(0.5) and is_number(float("inf")) and not is_number(False) and not is_number("1")


def test_a_target_list_trains_only_those_layers(setup, tmp_path):
    """--target q_proj,v_proj puts adapters on those layers alone (the adapter's config and tensors name only
    them); a misspelt name fails naming it (model.build_from_source checks the skeleton before filling it)."""
    with pytest.raises(QLoraError, match="unknown target module.s. qproj"):
        train(cfg(setup, tmp_path / "bad", target="q_proj,qproj"), log=lambda m: None)
    out = tmp_path / "t"
    train(cfg(setup, out, target="q_proj,v_proj", max_steps=2, save_every=0), log=lambda m: None)
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
    from safetensors import safe_open
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        layers = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in f.keys()}
    assert layers == {"q_proj", "v_proj"}


def test_a_method_plugs_in_at_the_seam(setup, tmp_path):
    """A training method (qlora.methods) supplies the loss and its metrics: the run takes both, and the
    same loss through the default SFT gives the same losses."""
    from qlora.methods import SFT

    class Counting(SFT):
        def loss(self, model, batch, device, static_shapes=False):
            total, _ = super().loss(model, batch, device, static_shapes)
            return total, {"scored": batch["num_tokens"]}

    kw = dict(max_steps=2, dropout=0.0, save_every=0)
    train(cfg(setup, tmp_path / "sft", **kw), log=lambda m: None)
    train(cfg(setup, tmp_path / "m", **kw), log=lambda m: None, method=Counting())
    rows = [json.loads(r) for r in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "m") == losses(tmp_path / "sft")
    # the step's mean of the batches' scored tokens, against the batches themselves
    from qlora.data import Batches, read_records, tokenize_records
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(setup / "model"))
    examples, _ = tokenize_records(*read_records(str(setup / "data.jsonl")), tok, max_length=1024)
    ep = Batches(examples, 4, tok.pad_token_id, max_length=1024, seed=42).epoch(0)
    want = [sum(int(b["num_tokens"]) for b in ep[2 * s:2 * s + 2]) / 2 for s in range(2)]
    assert [r["scored"] for r in rows if "scored" in r] == pytest.approx(want)
