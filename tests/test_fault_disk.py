"""Full disks and read-only outputs (docs/faults.md): one line naming the path, the bytes needed and
free, exit 2, temporary files removed, the last good checkpoint intact and named. Tested on real
small tmpfs filesystems where this process may mount one (root); the same paths with the write
failing by monkeypatch (ENOSPC/EDQUOT inside safetensors) run everywhere."""
import contextlib
import errno
import json
import os
import shutil
import subprocess

import pytest
import torch

from qlora.cli import main
from qlora.errors import QLoraError
from qlora.model import LoraSettings, QuantSettings, load_model
from qlora.optim import make_optimizer
from qlora.outdir import guard_write, human_bytes, write_error
from qlora.run_checkpoints import latest_checkpoint, save_checkpoint, verify_checkpoint

from tiny import make_tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("disk")
    make_tiny_model(d / "model")
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ."}
            for c in ["paris", "rome", "berlin"] * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (GGUF export takes BPE tokenizers only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["the capital of paris is paris", "what is the answer"] * 8, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("bpe") / "model"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@contextlib.contextmanager
def tmpfs(path, size="3m", ro=False):
    """A real small filesystem at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs, leave: int) -> None:
    """Fill the filesystem ``fs`` until ``leave`` bytes are free."""
    free = shutil.disk_usage(fs).free
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def leftovers(root) -> list[str]:
    """Temp names our writers use: .tmp-step-N, .NAME.tmp-*, .NAME.tmpPID, .NAME.dataPID, spool files."""
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".") and ".data" in p.name
            or p.name.startswith("spool-")]


def tiny_run(setup):
    model, _ = load_model(str(setup / "model"), QuantSettings(compute_dtype="fp32"), LoraSettings(r=4, alpha=8),
                          "cpu", "fp32", progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, "adamw", 1e-3)
    model(torch.tensor([[1, 5, 7, 9]])).logits.sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_on_a_full_disk(setup, tmp_path):
    """Issue 32, case 3: a full disk while saving a checkpoint was `internal error: SafetensorError`, exit 1,
    with a partial .tmp-step folder left behind."""
    model, opt = tiny_run(setup)
    with tmpfs(tmp_path / "fs") as fs:
        run = fs / "run"
        first = save_checkpoint(run, 1, model, opt, {"step": 1}, QuantSettings(), keep_last=3)
        fill(fs, 8 << 10)
        free = shutil.disk_usage(fs).free
        with pytest.raises(QLoraError) as e:
            save_checkpoint(run, 2, model, opt, {"step": 2}, QuantSettings(), keep_last=3)
        msg = str(e.value)
        assert "could not save the checkpoint of step 2" in msg and "no space left on the device" in msg
        assert "needs about" in msg and f"{human_bytes(free)} free there" in msg
        assert f"the previous checkpoint {first} is intact" in msg and "\n" not in msg
        assert leftovers(run) == []
        assert latest_checkpoint(run) == first and verify_checkpoint(first)


def test_train_on_a_full_disk_is_one_line_and_exit_2(setup, tmp_path, capsys):
    with tmpfs(tmp_path / "fs") as fs:
        fill(fs, 200 << 10)  # room for a checkpoint or two (~100 KB each), not for six
        rc = main(["train", "--data", str(setup / "data.jsonl"), "--model", str(setup / "model"), "--output",
                   str(fs / "run"), "--rank", "4", "--max-steps", "6", "--save-every", "1", "--batch-size", "4",
                   "--grad-accum", "1", "--compute-dtype", "fp32", "--optim", "adamw", "--progress", "false"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, err
        assert "internal error" not in err[-1] and "no space left on the device" in err[-1]
        assert leftovers(fs / "run") == []
        good = latest_checkpoint(fs / "run")
        assert good is not None and f"the previous checkpoint {good} is intact" in err[-1] and verify_checkpoint(good)


@pytest.mark.parametrize("command", ["export", "merge", "quantize"])
def test_merge_export_quantize_on_a_full_disk(bpe_model, tmp_path, capsys, command):
    """Issue 32, case 3: `qlora export` onto a full disk was `internal error: OSError`."""
    with tmpfs(tmp_path / "fs", size="1m") as fs:
        fill(fs, 64 << 10)  # the tiny model's files are ~200 KB
        out = fs / ("m.gguf" if command == "export" else "m")
        argv = {"export": ["export", "--model", str(bpe_model), "--output", str(out), "--type", "f16"],
                "merge": ["merge", "--model", str(bpe_model), "--adapter", "", "--output", str(out), "--dtype", "fp32"],
                "quantize": ["quantize", str(bpe_model), str(out), "--compute-dtype", "fp32"]}[command]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "internal error" not in err and f"cannot write {out}" in err and "no space left" in err
        assert "free there" in err
        assert not out.exists() and leftovers(fs) == [] and not (fs / "m.gguf.lock").exists()


def test_read_only_output_is_one_line(setup, bpe_model, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", size="1m", ro=True) as ro:
        common = ["--data", str(setup / "data.jsonl"), "--model", str(setup / "model")]
        assert main(["train", *common, "--output", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        assert f"cannot write {ro / 'run'}: read-only file system" in err and "internal error" not in err
        assert main(["export", "--model", str(bpe_model), "--output", str(ro / "m.gguf")]) == 2
        assert "read-only file system" in capsys.readouterr().err


def test_quota_inside_safetensors_is_explained_without_a_real_disk(setup, tmp_path, monkeypatch):
    """No mount needed: safetensors' own error (it carries the errno only in its text) for the optimizer
    file of a checkpoint, as a full quota gives it."""
    import safetensors.torch
    from safetensors import SafetensorError
    model, opt = tiny_run(setup)
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, model, opt, {"step": 1}, QuantSettings(), keep_last=3)
    real = safetensors.torch.save_file

    def save_file(tensors, path, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(QLoraError, match=rf"step 2 \(cannot write .*step-0000002: disk quota exceeded \(needs about "
                                         rf".*\); temporary files removed; the previous checkpoint {first} is intact"):
        save_checkpoint(run, 2, model, opt, {"step": 2}, QuantSettings(), keep_last=3)
    assert leftovers(run) == [] and latest_checkpoint(run) == first


def test_guard_write_names_path_sizes_and_last_good(tmp_path):
    tmp = tmp_path / ".x.tmp"
    tmp.mkdir()
    with pytest.raises(QLoraError) as e:
        with guard_write(tmp_path / "x", needed=3 << 20, cleanup=[tmp], last_good=lambda: "run/checkpoints/step-5"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value).startswith(f"cannot write {tmp_path / 'x'}: no space left on the device (needs about 3.0 MiB, ")
    assert str(e.value).endswith("free there); last good checkpoint: run/checkpoints/step-5")
    assert not tmp.exists()
    with pytest.raises(ValueError):  # anything else passes through untouched
        with guard_write(tmp_path / "x"):
            raise ValueError("a bug")
    assert write_error(OSError(errno.EIO, "I/O error"), tmp_path) is None
