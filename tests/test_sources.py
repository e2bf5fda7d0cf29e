"""Model sources and the 4-bit checkpoint reader/writer, against safetensors, transformers and
bitsandbytes."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora import nf4
from qlora.checkpoint import CheckpointReader, CheckpointWriter, parse_size, read_header
from qlora.errors import QLoraError
from qlora.sources import open_source, quantizable_linear_names

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def llama_config(**kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def save_model(path, dtype=torch.bfloat16, seed=0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(**kw)).to(dtype)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "30KB"} if "shard" in str(path) else {}))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    p = tmp_path_factory.mktemp("hf") / "m"
    return p, save_model(p)


def test_hf_dir_names_and_tensors(hf_dir):
    path, model = hf_dir
    src = open_source(path)
    assert src.kind == "hf" and src.config.model_type == "llama" and src.quantized("lm_head.weight") is None
    sd = model.state_dict()
    assert sorted(src.names()) == sorted(sd)
    for name in src.names():
        t = src.get(name)
        assert t.dtype == torch.bfloat16 and torch.equal(t, sd[name]), name


def test_sharded_dir_reads_in_file_order(tmp_path):
    path = tmp_path / "shard"
    model = save_model(path, dtype=torch.float32, seed=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    src = open_source(path)
    files = [index["weight_map"][n] for n in src.names()]
    assert files == sorted(files) and len(set(files)) > 2  # shard by shard
    for name, t in model.state_dict().items():
        assert torch.equal(src.get(name), t)


def test_tied_model_has_no_lm_head(tmp_path):
    save_model(tmp_path / "tied", tie_word_embeddings=True)
    src = open_source(tmp_path / "tied")
    assert "lm_head.weight" not in src.names() and "model.embed_tokens.weight" in src.names()
    assert "lm_head.weight" not in quantizable_linear_names(src.config)


def _bnb_linear_names(config):
    """What transformers+bitsandbytes turns into Linear4bit for this config."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model),
                                    quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_quantizable_linear_names():
    from transformers import Phi3Config
    names = quantizable_linear_names(llama_config())
    assert names == [f"model.layers.{i}.{m}.weight" for i in range(2) for m in LINEARS]
    assert names == _bnb_linear_names(llama_config())
    phi = Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, pad_token_id=0)
    names = quantizable_linear_names(phi)
    assert "model.layers.1.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert names == _bnb_linear_names(phi)


def test_unsupported_architecture():
    from transformers import PretrainedConfig

    class Unknown(PretrainedConfig):
        model_type = "no_such_arch"
    with pytest.raises(QLoraError, match="unsupported architecture 'no_such_arch'"):
        quantizable_linear_names(Unknown())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False])
def test_reads_a_checkpoint_that_transformers_bnb_saved(hf_dir, tmp_path, qt, dq):
    path, _ = hf_dir
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    qmodel = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc)
    qmodel.save_pretrained(tmp_path / "bnb")
    src = open_source(tmp_path / "bnb")
    assert src.kind == "bnb4"
    assert sorted(src.names()) == sorted(open_source(path).names())
    modules = dict(qmodel.named_modules())
    quantized = [n for n in src.names() if src.quantized(n) is not None]
    assert sorted(quantized) == sorted(quantizable_linear_names(src.config))
    for name in quantized:
        packed, st = src.quantized(name)
        w = modules[name[: -len(".weight")]].weight
        assert torch.equal(packed, w.data) and st.quant_type == qt and st.double_quant == dq
        ref = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        ours = nf4.dequantize_4bit(packed, st)
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), name
        assert torch.equal(src.get(name), ref)
    sd = qmodel.state_dict()
    for name in set(src.names()) - set(quantized):
        assert torch.equal(src.get(name), sd[name])


def test_our_writer_roundtrips_through_our_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    packed, st = nf4.quantize_4bit(w, 64, "nf4", True)
    plain = {"a.f32": torch.randn(3, 5, generator=g), "b.i64": torch.arange(7), "c.bool": torch.tensor([True, False]),
             "d.f16": torch.randn(1, generator=g).half(), "e.scalar": torch.tensor(2.5)}
    with CheckpointWriter(tmp_path / "ck", max_shard_size="1KB") as wr:
        for k, v in plain.items():
            wr.add(k, v)
        wr.add_quantized("x.weight", packed, st)
        wr.finish({"model_type": "llama"})
    files = sorted((tmp_path / "ck").glob("*.safetensors"))
    assert len(files) > 1 and not list((tmp_path / "ck").glob("spool*"))
    merged = {}
    for f in files:
        merged.update(load_file(str(f)))  # the reference reader accepts every shard
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
        for info in read_header(f).values():  # every tensor starts aligned to its element size
            assert (info.start) % info.dtype.itemsize == 0
    for k, v in plain.items():
        assert merged[k].dtype == v.dtype and torch.equal(merged[k], v)
    assert torch.equal(merged["x.weight"], packed)
    rd = CheckpointReader(tmp_path / "ck")
    p2, st2 = rd.read_quantized("x.weight")
    assert torch.equal(nf4.dequantize_4bit(p2, st2), nf4.dequantize_4bit(packed, st))
    assert rd.read_quantized("a.f32") is None and not rd.is_aux("a.f32") and rd.is_aux("x.weight.absmax")


def test_writer_aborts_cleanly(tmp_path):
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "ck") as wr:
            wr.add("a", torch.zeros(3))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("30KB") == 30_000 and parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234 and parse_size("500mb") == 5 * 10**8
    for bad in ("", "2 XB", "-1", "0"):
        with pytest.raises(QLoraError):
            parse_size(bad)


def test_open_errors(hf_dir, tmp_path):
    path, _ = hf_dir
    cfg = (path / "config.json").read_text()
    data = (path / "model.safetensors").read_bytes()

    def mk(name, files):
        d = tmp_path / name
        d.mkdir()
        for f, content in files.items():
            (d / f).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d
    cases = {
        "missing": (tmp_path / "nope", "no such file"),
        "nocfg": (mk("nocfg", {"model.safetensors": data}), "no config.json"),
        "two_gguf": (mk("two_gguf", {"a.gguf": b"GGUF", "b.gguf": b"GGUF"}), "2 .gguf files"),
        "empty": (mk("empty", {"config.json": cfg}), "no *.safetensors"),
        "pickle": (mk("pickle", {"config.json": cfg, "model.pt": b"x"}), "convert it to safetensors"),
        "trunc": (mk("trunc", {"config.json": cfg, "model.safetensors": data[:-1]}), "truncated"),
        "padded": (mk("padded", {"config.json": cfg, "model.safetensors": data + b"\0"}), "truncated"),
        "hugeheader": (mk("hugeheader", {"config.json": cfg, "model.safetensors": struct.pack("<Q", 10**12) + b"{}"}),
                       "does not fit"),
        "badjson": (mk("badjson", {"config.json": "{oops", "model.safetensors": data}), "not valid JSON"),
        "badindex": (mk("badindex", {"config.json": cfg, "model-00001-of-00002.safetensors": data,
                                     "model.safetensors.index.json": json.dumps(
                                         {"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                         "b": "model-00002-of-00002.safetensors"}})}),
                     "model-00002-of-00002.safetensors"),
        "gptq": (mk("gptq", {"config.json": json.dumps({**json.loads(cfg), "quantization_config":
                                                         {"quant_method": "gptq", "bits": 4}}),
                             "model.safetensors": data}), "gptq"),
    }
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 60)
    (tmp_path / "w.pth").write_bytes(b"x")
    (tmp_path / "lone.safetensors").write_bytes(data)
    cases["badmagic"] = (tmp_path / "bad.gguf", "not a GGUF file")
    cases["pth"] = (tmp_path / "w.pth", "convert it to safetensors")
    cases["lone"] = (tmp_path / "lone.safetensors", "pass the directory")
    for key, (p, needle) in cases.items():
        with pytest.raises(QLoraError) as e:
            open_source(p)
        assert needle in str(e.value) and "\n" not in str(e.value), (key, str(e.value))


def test_tokenizer_load_and_copy(hf_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path, _ = hf_dir
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "user", "assistant"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    d = tmp_path / "with_tok"
    import shutil
    shutil.copytree(path, d)
    tok.save_pretrained(str(d))
    src = open_source(d)
    loaded = src.load_tokenizer()
    assert loaded("hello world").input_ids == tok("hello world").input_ids == [3, 4]
    out = tmp_path / "out"
    out.mkdir()
    written = src.save_tokenizer(out)
    assert (out / "tokenizer.json") in written and (out / "generation_config.json").is_file()
    again = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hello"}]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    assert open_source(path).load_tokenizer() is None  # the bare model has no tokenizer


@pytest.mark.slow
def test_gguf_source():
    from qlora.embedded import embedded_model_path
    try:
        p = embedded_model_path()
    except QLoraError as e:
        pytest.skip(str(e))
    src = open_source(p)
    assert src.kind == "gguf" and src.config.model_type == "llama" and src.config.tie_word_embeddings
    names = src.names()
    assert "lm_head.weight" not in names
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(src.config)
    assert set(names) == set(model.state_dict()) - {"lm_head.weight"}
    for n in names:
        t = src.get(n)
        assert t.dtype == torch.float32 and t.shape == model.state_dict()[n].shape
    assert set(quantizable_linear_names(src.config)) <= set(names)
    q = src.get("model.layers.0.self_attn.q_proj.weight")
    assert torch.isfinite(q).all() and q.abs().max() > 0
