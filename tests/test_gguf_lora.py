"""qlora export --format gguf-lora (qlora/gguf_lora.py): the adapter alone as a llama.cpp LoRA GGUF.
Read back with gguf's own GGUFReader; the delta it encodes (alpha / rank * lora_b @ lora_a, Q/K rows
put back in HF order by transformers' own GGUF reader code) equals the delta PEFT merges into the
transformers model."""
import json

import numpy as np
import pytest
import torch

from qlora.cli import main

from helpers import make_model_dir


def make_adapter(path, out, rslora=False, seed=5):
    from qlora.adapters import save_adapter
    from qlora.linear import QLoRALinear
    from qlora.model import LoraSettings, load_model
    m, _ = load_model(str(path), lora=LoraSettings(r=4, alpha=8, target="all", rslora=rslora), dtype="fp32",
                      progress=False)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.3
    return save_adapter(m, out, base_model=str(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("gl") / "m")


def peft_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """{HF weight name: merged - original} from PEFT's own merge on transformers' Llama."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    plain = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                       str(adapter)).merge_and_unload().state_dict()
    return {k: merged[k] - plain[k] for k in plain if not torch.equal(merged[k], plain[k])}


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_gguf_lora_reads_back_as_the_peft_delta(base, tmp_path, capsys, rslora):
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    adapter = make_adapter(base, tmp_path / "ad", rslora=rslora)
    out = tmp_path / "ad.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--type", "f32",
                 "--output", str(out)]) == 0
    assert "--lora" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "llama"
    alpha = field("adapter.lora.alpha")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert alpha == pytest.approx(8 * 2.0 if rslora else 8)  # llama.cpp scales by alpha / rank: sqrt(4) = 2
    t = {x.name: torch.from_numpy(np.array(x.data)) for x in r.tensors}
    ne = {x.name: [int(v) for v in x.shape] for x in r.tensors}
    want = peft_deltas(base, adapter)
    assert len(want) == 14 and len(t) == 28
    hf_config = {"num_attention_heads": 4, "num_key_value_heads": 2}
    proc = LlamaTensorProcessor(config=hf_config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for hf, delta in want.items():
        g = names.get_name(hf, try_suffixes=(".weight",))
        a, b = t[f"{g}.lora_a"], t[f"{g}.lora_b"]
        rank = a.shape[0]
        assert rank == cfg["r"] and ne[f"{g}.lora_a"] == [delta.shape[1], rank] and ne[f"{g}.lora_b"] == [rank, delta.shape[0]]
        got = (alpha / rank) * (b @ a)  # what llama.cpp adds to the (permuted) base matrix
        got = torch.from_numpy(proc.process(got.numpy(), g).weights)  # its Q/K rows back in HF order
        assert torch.allclose(got, delta, atol=1e-5), hf
    # the order follows the base's blocks: every lora_a right before its lora_b
    order = [x.name for x in r.tensors]
    assert order[0].startswith("blk.0.") and all(order[i + 1] == order[i][:-1] + "b" for i in range(0, 28, 2))


def test_gguf_lora_f16_default_and_bad_inputs(base, tmp_path, capsys):
    import gguf
    adapter = make_adapter(base, tmp_path / "ad")
    out = tmp_path / "a.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 0
    types = {x.tensor_type.name for x in gguf.GGUFReader(str(out)).tensors}
    assert types == {"F16"}
    capsys.readouterr()
    cases = [(["--format", "gguf-lora", "--output", str(tmp_path / "x.gguf")], "give --adapter DIR"),
             (["--format", "gguf-lora", "--adapter", str(adapter), "--type", "q4_k_m", "--output",
               str(tmp_path / "x.gguf")], "not an adapter type"),
             (["--format", "gguf-lora", "--adapter", str(adapter), "--output", str(out)], "already exists"),
             (["--format", "gguf-lora", "--adapter", str(adapter), "--ollama", "--output", str(tmp_path / "x.gguf")],
              "ADAPTER"),
             (["--type", "f32", "--output", str(tmp_path / "y.gguf")], "is for --format gguf-lora")]
    for flags, message in cases:
        assert main(["export", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (flags, err)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()
    # an adapter that does not fit the base: one line, nothing written
    other = make_model_dir(tmp_path / "other", hidden=32)
    assert main(["export", "--adapter", str(adapter), "--model", str(other), "--format", "gguf-lora",
                 "--output", str(tmp_path / "z.gguf")]) == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "z.gguf").exists()
