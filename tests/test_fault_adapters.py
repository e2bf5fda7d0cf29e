"""Hostile or broken adapters (issue 32; docs/faults.md): every bad adapter_config.json /
qlora_config.json field, NaN tensors and shape or rank mismatches fail with one line naming the file
and field, before the model's weights load (generate, eval, merge, export, train --resume)."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from qlora.adapters import PREFIX, check_fits, merge, read_adapter
from qlora.cli import main
from qlora.errors import QLoraError
from qlora.generate import load_for_inference
from qlora.train import TrainConfig, train

from tiny import make_tiny_model

# the block linears of tiny.py's model (hidden 64, intermediate 128, 4 heads, 2 KV heads of 16): (in, out)
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
          "mlp.down_proj": (128, 64)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("adapters") / "model")


def write_adapter(d, r=4, config=None, quant=None, shapes=SHAPES, value=0.01, layers=2):
    """A PEFT adapter folder written by hand (independent of qlora's writer)."""
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(layers):
        for name, (n_in, n_out) in shapes.items():
            key = f"{PREFIX}model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.full((r, n_in), value)
            tensors[f"{key}.lora_B.weight"] = torch.full((n_out, r), value)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(cfg if config is None else config))
    if quant is not None:
        (d / "qlora_config.json").write_text(quant if isinstance(quant, str) else json.dumps(quant))
    return d


@pytest.fixture
def no_load(monkeypatch):
    import qlora.model
    import qlora.sources
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("the model weights were loaded"))
    monkeypatch.setattr(qlora.sources.HFSource, "get", lambda *a, **k: pytest.fail("a weight was read"))


BAD = [
    (dict(config=[{"r": 4}]), r"adapter_config.json: expected a JSON object of settings, got a list"),
    (dict(config={"peft_type": "LORA", "r": "four"}), r"adapter_config.json: r must be an integer >= 1, got 'four'"),
    (dict(config={"peft_type": "LORA", "r": 0}), r"adapter_config.json: r must be an integer >= 1, got 0"),
    (dict(config={"peft_type": "LORA", "r": 4, "lora_alpha": "big"}),
     r"adapter_config.json: lora_alpha must be a number > 0, got 'big'"),
    (dict(config={"peft_type": "LORA", "r": 4, "lora_dropout": 2}), r"lora_dropout must be a number in \[0, 1\)"),
    (dict(quant="{not json"), r"qlora_config.json: invalid JSON"),
    (dict(quant=[1, 2]), r"qlora_config.json: expected a JSON object"),
    (dict(quant={"quant": {"blocksize": 7}}), r"qlora_config.json: quant.blocksize: block size must be a power of two"),
    (dict(quant={"quant": {"quant_type": "nf3"}}), r"qlora_config.json: quant.quant_type must be"),
    (dict(value=float("nan")), r"adapter_model.safetensors: model.layers.0.\S+ holds NaN or infinite"),
    (dict(r=4, config={"peft_type": "LORA", "r": 8}), r"has A \(4, \d+\) and B \(\d+, 4\), but .* says r=8"),
    (dict(shapes={**SHAPES, "mlp.down_proj": (96, 64)}),
     r"does not fit the model .*model.layers.0.mlp.down_proj expects A \(4, 128\) and B \(64, 4\)"),
    (dict(layers=3), r"has layers the model lacks, e.g. model.layers.2"),
]


@pytest.mark.parametrize("kw,match", BAD)
def test_bad_adapter_fails_before_the_model_loads(model_dir, tmp_path, no_load, kw, match):
    """Issue 32: a list config, an invalid qlora_config.json, r "four"/0, lora_alpha "big" were internal errors;
    blocksize 7 and shape mismatches were found after the model load; NaN tensors generated an empty answer
    with exit 0."""
    ad = write_adapter(tmp_path / "ad", **kw)
    with pytest.raises(QLoraError, match=match):
        load_for_inference(str(model_dir), str(ad), "cpu", "fp32", progress=False)


@pytest.mark.parametrize("kw,match", [BAD[0], BAD[2], BAD[7], BAD[9], BAD[11]])
def test_bad_adapter_is_one_line_in_every_command(model_dir, tmp_path, capsys, kw, match):
    ad = write_adapter(tmp_path / "ad", **kw)
    for argv in (["generate", "--model", str(model_dir), "--adapter", str(ad), "--prompt", "hi", "--device", "cpu"],
                 ["merge", "--model", str(model_dir), "--adapter", str(ad), "--output", str(tmp_path / "m")],
                 ["export", "--model", str(model_dir), "--adapter", str(ad), "--output", str(tmp_path / "m.gguf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "internal error" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(match, err), (argv, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.gguf").exists()


def test_merge_checks_shapes_before_reading_a_weight(model_dir, tmp_path, no_load):
    ad = write_adapter(tmp_path / "ad", shapes={**SHAPES, "self_attn.k_proj": (64, 64)})
    with pytest.raises(QLoraError, match=r"self_attn.k_proj expects A \(4, 64\) and B \(32, 4\)"):
        merge(str(model_dir), str(ad), tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_good_adapter_passes_the_checks(model_dir, tmp_path):
    ad = write_adapter(tmp_path / "ad")
    check_fits(ad, str(model_dir))
    cfg, pairs = read_adapter(ad)
    assert cfg["r"] == 4 and len(pairs) == 14


def test_resume_with_another_rank_or_model_fails_before_the_load(model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "what is the capital of paris ?", "output": "paris ."}) + "\n"
                            for _ in range(4)))
    out = tmp_path / "o"
    kw = dict(data=str(data), model=str(model_dir), output=str(out), rank=4, alpha=8, batch_size=4, grad_accum=1,
              max_steps=1, compute_dtype="fp32", progress=False, optim="adamw")
    train(TrainConfig(**kw), log=lambda m: None)
    import qlora.model
    monkeypatch.setattr(qlora.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(QLoraError, match=r"--resume: .*step-0000001/adapter was trained with --rank 4, this run asks "
                                         r"for --rank 8"):
        train(TrainConfig(**{**kw, "rank": 8, "resume": True, "max_steps": 2}), log=lambda m: None)
    wide = make_tiny_model(tmp_path / "wide", hidden=96)
    with pytest.raises(QLoraError, match=r"does not fit the model .*wide"):
        train(TrainConfig(**{**kw, "model": str(wide), "resume": True, "max_steps": 2}), log=lambda m: None)
