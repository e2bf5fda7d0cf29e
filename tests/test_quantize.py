"""`qlora quantize` against transformers+bitsandbytes: same bytes, same config, same logits;
every error path answers with one line and a non-zero exit code."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora import cli, nf4
from qlora.checkpoint import quantization_config
from qlora.quantize import quantize_model

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

COMBOS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def tiny_llama(path: Path, dtype=torch.bfloat16, max_shard_size=None, seed=0) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # make the scales differ from block to block
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 3)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base") / "m")


@pytest.fixture(scope="module")
def base_sharded(tmp_path_factory):
    p = tiny_llama(tmp_path_factory.mktemp("sharded") / "m", dtype=torch.float32, max_shard_size="40KB", seed=1)
    assert (p / "model.safetensors.index.json").is_file()
    return p


def bnb_config(qt, dq):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def fresh_logits(path, ids, **kw):
    """Logits of a freshly loaded model (bitsandbytes may repack 4-bit weights on the first
    no-grad forward, so each model runs exactly one forward)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    with torch.no_grad():
        return model(ids).logits


def quantized_state(path, **kw):
    """The state dict transformers+bitsandbytes would save, from a fresh load."""
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_cli(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("qt,dq", COMBOS)
def test_same_checkpoint_and_logits_as_bitsandbytes(base, tmp_path, capsys, qt, dq):
    out = tmp_path / "q"
    argv = ["quantize", str(base), str(out), "--quant-type", qt] + ([] if dq else ["--no-double-quant"])
    rc, stdout, _ = run_cli(argv, capsys)
    assert rc == 0
    assert "quantized 14 linear weights" in stdout
    cfg = json.loads((out / "config.json").read_text())
    ref_qc = json.loads(json.dumps(bnb_config(qt, dq).to_dict()))
    assert cfg["quantization_config"] == ref_qc
    # The state dict that transformers loads from our files is the one it builds by quantizing.
    ours, ref = quantized_state(out), quantized_state(base, quantization_config=bnb_config(qt, dq))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    a = fresh_logits(out, ids)
    b = fresh_logits(base, ids, quantization_config=bnb_config(qt, dq))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    # ...and quantizing really changed the model (the comparison can fail).
    c = fresh_logits(base, ids)
    assert not torch.equal(a, c.to(a.dtype))


def test_sharded_source_and_sharded_output(base_sharded, tmp_path, capsys):
    out = tmp_path / "q"
    rc, stdout, _ = run_cli(["quantize", str(base_sharded), str(out), "--max-shard-size", "30KB"], capsys)
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        sum(t.numel() * t.element_size() for t in _load_all(out / s).values()) for s in shards)
    # each quantized weight's side tensors live in its shard
    for k, f in index["weight_map"].items():
        if ".weight." in k:
            assert index["weight_map"][k.split(".weight.")[0] + ".weight"] == f
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    a = fresh_logits(out, ids)
    b = fresh_logits(base_sharded, ids, quantization_config=bnb_config("nf4", True))
    assert torch.equal(a, b)
    # unquantized tensors keep the source dtype (fp32 here)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def _load_all(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_summary_counts_and_bits(base, tmp_path):
    s = quantize_model(base, tmp_path / "q", progress=False)
    src = _load_all(base / "model.safetensors")
    linear = {k for k in src if any(p in k for p in ("_proj.weight",))}
    assert s["tensors_quantized"] == len(linear) == 14
    assert s["tensors_kept"] == len(src) - len(linear)
    assert s["params_quantized"] == sum(src[k].numel() for k in linear)
    assert s["params_total"] == sum(t.numel() for t in src.values())
    out = _load_all(tmp_path / "q" / "model.safetensors")
    assert s["output_mb"] * 1e6 == pytest.approx(sum(t.numel() * t.element_size() for t in out.values()))
    stored = sum(t.numel() * t.element_size() for k, t in out.items()
                 if any(k.startswith(n) for n in linear))
    assert s["bits_per_param"] == pytest.approx(8 * stored / s["params_quantized"])
    # bits from the format: 4 + 8/64 + 32/(64*256) per element, tables and JSON per tensor
    n = s["params_quantized"]
    assert 4.127 < s["bits_per_param"] < 4.127 + 8 * 14 * (16 * 4 + 256 * 4 + 4 * 4 + 256) / n


def test_error_paths_one_line(base, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    empty = tmp_path / "empty_cfg"
    empty.mkdir()
    (empty / "config.json").write_text((base / "config.json").read_text())
    pickle_only = tmp_path / "pickle_only"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((base / "config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((base / "config.json").read_text())
    data = (base / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 100])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text((base / "config.json").read_text())
    (garbage / "model.safetensors").write_bytes(os.urandom(300))
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    (no_cfg / "model.safetensors").write_bytes(data)
    unknown_arch = tmp_path / "unknown_arch"
    unknown_arch.mkdir()
    (unknown_arch / "config.json").write_text(json.dumps({"model_type": "no_such_arch_xyz"}))
    (unknown_arch / "model.safetensors").write_bytes(data)
    txt = tmp_path / "model.txt"
    txt.write_text("hello")
    out = str(tmp_path / "out")
    cases = [
        (["quantize", str(tmp_path / "missing"), out], "no such file"),
        (["quantize", str(empty), out], "no *.safetensors"),
        (["quantize", str(pickle_only), out], "convert it to safetensors"),
        (["quantize", str(corrupt), out], "model.safetensors"),
        (["quantize", str(garbage), out], "not a valid safetensors"),
        (["quantize", str(no_cfg), out], "no config.json"),
        (["quantize", str(unknown_arch), out], "unsupported architecture"),
        (["quantize", str(txt), out], "unknown model file type"),
        (["quantize", str(base), str(tmp_path / "exists")], "--force"),
        (["quantize", str(base), out, "--blocksize", "100"], "power of two"),
        (["quantize", str(base), out, "--blocksize", "16"], "power of two"),
        (["quantize", str(base), out, "--quant-type", "int8"], "nf4 or fp4"),
        (["quantize", str(base), out, "--quant-type", "int4"], "nf4 or fp4"),
        (["quantize", str(base), out, "--compute-dtype", "fp8"], "compute dtype"),
        (["quantize", str(base), out, "--max-shard-size", "lots"], "2GB"),
        (["quantize", str(base), str(base)], "already exists"),
        (["quantize", str(base), str(base), "--force"], "overwrite the source"),
    ]
    for argv, needle in cases:
        rc, stdout, err = run_cli(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("qlora quantize: error: "), (argv, err)
        assert needle in err, (argv, err)
        assert "Traceback" not in err
        assert not Path(out).exists()
    assert (tmp_path / "exists" / "keep.txt").is_file() and (base / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # the corrupt-file message names the file
    rc, _, err = run_cli(["quantize", str(corrupt), out], capsys)
    assert str(corrupt / "model.safetensors") in err and "truncated" in err


def test_already_quantized_source_refused(base, tmp_path, capsys):
    quantize_model(base, tmp_path / "q", progress=False)
    rc, _, err = run_cli(["quantize", str(tmp_path / "q"), str(tmp_path / "q2")], capsys)
    assert rc == 2 and "already a 4-bit checkpoint" in err


def test_force_replaces_output(base, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    rc, _, _ = run_cli(["quantize", str(base), str(out), "--force", "--quant-type", "fp4"], capsys)
    assert rc == 0
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp or old directories left


def test_failure_leaves_nothing_behind(base, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(nf4, "quantize_4bit", boom)
    with pytest.raises(RuntimeError):
        quantize_model(base, tmp_path / "q", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qlora.cli", "quantize", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_quantization_config_matches_transformers():
    from transformers import BitsAndBytesConfig
    for qt, dq in COMBOS:
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            ref = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                                     bnb_4bit_compute_dtype=dt).to_dict()
            assert quantization_config(qt, dq, dt) == json.loads(json.dumps(ref))


@pytest.mark.slow
def test_quantize_embedded_gguf(tmp_path):
    from qlora.embedded import embedded_model_path
    try:
        path = embedded_model_path()
    except Exception as e:  # noqa: BLE001
        pytest.skip(str(e))
    out = tmp_path / "smol"
    s = quantize_model(path, out, progress=False)
    L, h, kv, inter = 30, 576, 192, 1536  # SmolLM2-135M: 30 blocks, 9 heads (3 kv) of 64, MLP 1536
    per_block = 2 * h * h + 2 * h * kv + 3 * h * inter
    assert s["kind"] == "gguf"
    assert s["tensors_quantized"] == 7 * L and s["params_quantized"] == L * per_block
    assert s["tensors_kept"] == 1 + 2 * L + 1  # embeddings (tied head), two norms per block, final norm
    assert 4.127 < s["bits_per_param"] < 4.16
    assert s["params_total"] == L * per_block + 49152 * h + (2 * L + 1) * h
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "tokenizer.json").is_file()
    # transformers+bitsandbytes loads it and the embedded tokenizer round-trips
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert "lm_head.weight" not in _load_all(out / "model.safetensors")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
