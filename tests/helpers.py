"""Helpers shared by several test files (tests import them from here, never from another test file):
the tiny random Llama + word-level tokenizer of the generation tests, and the training tests' run
settings. Fixtures built on them live in conftest.py."""
import json

import torch

from qlora import nf4
from qlora.generate import load_for_inference
from qlora.linear import QLoRALinear
from qlora.train import TrainConfig

from tiny import make_tiny_model

# ------------------------------------------------------------------ generation: a model directory

WORDS = ("<pad> <s> </s> <unk> <user> <assistant> <system> ### Instruction Response : . , ? "
         "the capital of france is paris sky blue green grass what color hello world how are you fine "
         "thanks yes no one two three four five cat dog red big small tell me a story about and then").split()
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
EOS = 2


def nonzero_lora_b(model):
    """``model`` in train mode with every LoRA B drawn (seeded by its name, scale 0.05): with B = 0, as at init,
    A's gradients would be zero and a gradient comparison could not fail."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return model.train()


class DequantCounter:
    """How often each 4-bit weight of ``model`` is dequantized (``qlora.linear._dequant``, patched through
    ``monkeypatch``) while ``on``: ``counts[(block index, layer name)]``, ``by_name()`` summed over the blocks.
    Which weights a forward or a backward dequantizes says which GEMMs a recompute ran."""

    def __init__(self, monkeypatch, model, on: bool = True):
        import qlora.linear as lin
        where = {m.weight_packed.data_ptr(): n for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
        self.on, self.counts, real = on, {}, lin._dequant

        def counting(packed, state, dtype):
            if self.on:
                name = where[packed.data_ptr()]
                key = (int(name.split("layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1])
                self.counts[key] = self.counts.get(key, 0) + 1
            return real(packed, state, dtype)
        monkeypatch.setattr(lin, "_dequant", counting)

    def by_name(self) -> dict:
        out = {}
        for (_, name), n in self.counts.items():
            out[name] = out.get(name, 0) + n
        return out


def make_tokenizer(template=TEMPLATE):
    """WordLevel over WORDS, whitespace/punctuation split, <s> in front, a one-line chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    if template:
        tok.chat_template = template
    return tok


def make_model_dir(path, template=TEMPLATE, seed=0, hidden=64):
    """A tiny random Llama (fp32) with the test tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    make_tokenizer(template).save_pretrained(str(path))
    return path


def save_random_adapter(model_path, out, seed):
    """An adapter on q_proj and down_proj of the model at ``model_path`` with non-zero B (so it changes the
    model's outputs), saved in the PEFT format to ``out``; returns the adapter folder."""
    from qlora.adapters import save_adapter
    from qlora.model import LoraSettings, load_model
    m, _ = load_model(str(model_path), lora=LoraSettings(r=4, alpha=8, target="q_proj,down_proj"), dtype="fp32",
                      progress=False)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, QLoRALinear) and mod.r:
            mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 0.5
    return save_adapter(m, out)


def load(path, adapter=None):
    return load_for_inference(str(path), adapter, device="cpu", dtype="fp32", progress=False)


def reference_model(path, ours):
    """transformers' Llama with each block linear = nf4.dequantize_4bit(our packed weight)
    (+ scaling * B @ A where our layer carries an adapter)."""
    from transformers import LlamaForCausalLM
    ref = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, QLoRALinear):
            w = nf4.dequantize_4bit(m.weight_packed, m.state, torch.float32)
            if m.r:
                w = w + m.scaling * (m.lora_B.float() @ m.lora_A.float())
            ref.get_submodule(name).weight.data.copy_(w)
            n += 1
    assert n == 14
    return ref


def chat_ids(tok, msgs):
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


USER = [{"role": "user", "content": "what color is the sky ?"}]


# ------------------------------------------------------------------ training: data, settings, losses

CITIES = ["paris", "rome", "berlin"]


def make_train_dir(d):
    """A tiny model (d/model) and 40 instruction records (d/data.jsonl) for training tests."""
    make_tiny_model(d / "model")
    rows = [{"instruction": f"what is the capital of {c} ?", "output": f"the answer is {c} ."}
            for i in range(40) for c in [CITIES[i % 3]]]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def cfg(setup, out, **kw):
    base = dict(data=str(setup / "data.jsonl"), model=str(setup / "model"), output=str(out), rank=4, alpha=8,
                lr=3e-3, batch_size=4, grad_accum=2, max_steps=6, save_every=3, compute_dtype="fp32",
                progress=False, optim="adamw", warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ------------------------------------------------------------------ a Hugging Face cache, laid out as documented

def make_hub_cache(cache, repo_id, files_dir, repo_type="model", commit="0123456789abcdef0123456789abcdef01234567"):
    """Put the files of ``files_dir`` into the Hugging Face cache folder ``cache`` (HF_HOME/hub) as
    huggingface_hub lays out a download: blobs named by content hash, snapshots/<commit>/ of relative
    symlinks to them, refs/main = commit. Returns the snapshot folder (tests check the layout with
    huggingface_hub's own scan_cache_dir / try_to_load_from_cache)."""
    import hashlib
    import os
    from pathlib import Path
    root = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for f in sorted(Path(files_dir).rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(files_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs" / "main").write_text(commit)
    return snap
