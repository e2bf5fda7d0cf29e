"""Open a base model and read it tensor by tensor, whatever it is stored as.

Three kinds of source, told apart by what is on disk:

* ``"hf"``: a transformers directory, ``config.json`` + ``model.safetensors`` (or shards with
  ``model.safetensors.index.json``). Tensors are read lazily, one at a time, in their stored dtype.
* ``"gguf"``: a llama.cpp ``.gguf`` file (or a directory holding exactly one). transformers'
  GGUF reader gives the config and the tensors under their transformers names, dequantized to
  float32; it reads the whole file at once, so the model is held in memory as float32
  (4 bytes per parameter) for as long as the source is used.
* ``"bnb4"``: a 4-bit checkpoint written by :mod:`qlora.checkpoint` or by
  transformers+bitsandbytes (``config.json`` has a bitsandbytes ``quantization_config``);
  :meth:`Source.quantized` gives the packed weight and its state, :meth:`Source.get` the
  dequantized weight.

Pickle checkpoints (``*.bin``, ``*.pt``, ...) are refused, never unpickled: loading one can
run arbitrary code. Every bad input raises :class:`QLoraError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import CONFIG, CheckpointReader
from .errors import QLoraError
from .nf4 import QuantState, dequantize_4bit

PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
GGUF_MAGIC = b"GGUF"


class Source:
    """A model on disk. ``names()`` are the parameter names of the model's state_dict as stored
    (tied weights appear once), in storage order so that reading them in turn is sequential."""

    kind: str

    def __init__(self, path: Path, config):
        self.path = path
        self.config = config

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def quantized(self, name: str) -> tuple[torch.Tensor, QuantState] | None:
        return None

    def nbytes(self) -> int:
        """Bytes of the tensor files on disk."""
        raise NotImplementedError

    def load_tokenizer(self):
        return None

    def save_tokenizer(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the tokenizer (and generation_config.json) into ``out_dir``; the files written."""
        return []

    def __repr__(self) -> str:
        return f"<Source {self.kind} {self.path}>"


class _DirSource(Source):
    """Shared by ``hf`` and ``bnb4``: safetensors shards read through :class:`CheckpointReader`."""

    def __init__(self, path: Path, config, reader: CheckpointReader):
        super().__init__(path, config)
        self.reader = reader

    def names(self) -> list[str]:
        return [n for n in self.reader.names() if not self.reader.is_aux(n)]

    def get(self, name: str) -> torch.Tensor:
        q = self.reader.read_quantized(name)
        if q is not None:
            return dequantize_4bit(*q)
        return self.reader.read(name)

    def quantized(self, name: str):
        return self.reader.read_quantized(name)

    def nbytes(self) -> int:
        return self.reader.nbytes()

    def load_tokenizer(self):
        if not any((self.path / f).is_file() for f in TOKENIZER_FILES[:-1]):
            return None
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer file
            raise QLoraError(f"cannot load the tokenizer in {self.path}: {type(e).__name__}: {e}") from None

    def save_tokenizer(self, out_dir):
        out, written = Path(out_dir), []
        for f in TOKENIZER_FILES:
            if (self.path / f).is_file():
                shutil.copyfile(self.path / f, out / f)
                written.append(out / f)
        if (self.path / "additional_chat_templates").is_dir():
            shutil.copytree(self.path / "additional_chat_templates", out / "additional_chat_templates")
            written.append(out / "additional_chat_templates")
        return written


class HFSource(_DirSource):
    kind = "hf"


class Bnb4Source(_DirSource):
    kind = "bnb4"


_READER: dict = {}  # the last GGUF file parsed: key -> gguf.GGUFReader


@contextlib.contextmanager
def _shared_gguf_reader():
    """transformers parses a GGUF file's metadata afresh for the config, the tensors and the
    tokenizer (each parse walks every vocabulary string: seconds). Inside this context the three
    share one parsed reader of the same unchanged file."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    orig = gguf.GGUFReader

    def reader(path, *args, **kwargs):
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in _READER:
            _READER.clear()
            _READER[key] = orig(path, *args, **kwargs)
        return _READER[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = orig


class GGUFSource(Source):
    """A GGUF file. The tensors are dequantized to float32 and kept in memory on first use; a small file's
    conversion is stored once and read from there afterwards (qlora.gguf_cache)."""

    kind = "gguf"

    def __init__(self, path: Path, config, cached: Path | None = None):
        super().__init__(path, config)
        self._tensors: dict[str, torch.Tensor] | None = None
        self.progress = True  # transformers' own "Converting and de-quantizing" bar (False: silent)
        self.cached = cached  # the converted copy (qlora.gguf_cache), read instead of converting again
        self._reader = CheckpointReader(cached) if cached is not None else None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None and self._reader is not None:
            self._tensors = {n: self._reader.read(n) for n in self._reader.names()}
        elif self._tensors is None:
            self._tensors = self._convert()
            self._store()
        return self._tensors

    def _convert(self) -> dict[str, torch.Tensor]:
        """transformers' conversion: every tensor dequantized to float32, under its transformers name."""
        import functools

        import transformers.modeling_gguf_pytorch_utils as hf_gguf
        from transformers import AutoModelForCausalLM

        from . import gguf_cache
        where = gguf_cache.cache_dir(self.path)
        if where is not None and self.progress:
            print(f"first use of {self.path.name}: converting it once; the result is kept in {where} for later runs",
                  file=sys.stderr)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        bar = hf_gguf.tqdm
        hf_gguf.tqdm = functools.partial(bar, disable=not self.progress)
        try:
            with _shared_gguf_reader():
                parsed = hf_gguf.load_gguf_checkpoint(str(self.path), return_tensors=True, model_to_load=model)
        except Exception as e:  # noqa: BLE001 - gguf raises many types on a bad file
            raise QLoraError(f"cannot read the tensors of {self.path}: {type(e).__name__}: {e}") from None
        finally:
            hf_gguf.tqdm = bar
        if not parsed["tensors"]:
            raise QLoraError(f"{self.path}: no tensor matches the {self.config.model_type} architecture")
        return parsed["tensors"]

    def _store(self) -> None:
        """Keep this conversion for later runs (small files only: qlora.gguf_cache)."""
        from . import gguf_cache
        if gguf_cache.cache_dir(self.path) is None:
            return
        log = (lambda m: print(m, file=sys.stderr)) if self.progress else None
        self.cached = gguf_cache.store(self.path, self.config, self._tensors, self.load_tokenizer(), log=log)

    def names(self):
        return list(self._load())

    def get(self, name):
        t = self._load().get(name)
        if t is None:
            raise QLoraError(f"no tensor {name!r} in {self.path}")
        return t

    def nbytes(self):
        return self.path.stat().st_size

    def load_tokenizer(self):
        from transformers import AutoTokenizer
        if self.cached is not None:
            return AutoTokenizer.from_pretrained(str(self.cached), trust_remote_code=False)
        try:
            with _shared_gguf_reader():
                return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # noqa: BLE001
            raise QLoraError(f"cannot load the tokenizer of {self.path}: {type(e).__name__}: {e}") from None

    def save_tokenizer(self, out_dir):
        tok = self.load_tokenizer()
        if tok is None:
            return []
        return [Path(p) for p in tok.save_pretrained(str(out_dir))]


# ---------------------------------------------------------------------------------------------


def open_source(path: str | os.PathLike) -> Source:
    """Open ``path`` (a model directory or a ``.gguf`` file) and check it, without loading tensors
    (except that a GGUF's are read on first use). A Hub id (``org/name[@rev]``) opens its cached snapshot."""
    from .hub import local
    p = Path(local(path)).expanduser()
    if not p.exists():
        raise QLoraError(f"{p}: no such file or directory")
    if p.is_dir():
        if not (p / CONFIG).is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return _open_gguf(ggufs[0])
            what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json"
            raise QLoraError(f"{p} is not a model directory: it has {what}")
        if not any(p.glob("*.safetensors")):
            pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_EXTS)
            if pickles:
                raise QLoraError(f"{p} holds only pickle checkpoints ({pickles[0]}), which qlora never loads "
                                 f"because unpickling can run code: convert it to safetensors first")
            raise QLoraError(f"no *.safetensors file in {p}")
        return _open_dir(p)
    suffix = p.suffix.lower()
    if suffix == ".gguf":
        return _open_gguf(p)
    if suffix in PICKLE_EXTS:
        raise QLoraError(f"{p} is a pickle checkpoint, which qlora never loads because unpickling can run "
                         f"code: convert it to safetensors first")
    if suffix == ".safetensors":
        raise QLoraError(f"{p} is a bare safetensors file: pass the directory that holds it and its config.json")
    raise QLoraError(f"{p}: unknown model file type (expected a model directory or a .gguf file)")


def _open_dir(p: Path) -> Source:
    try:
        raw = json.loads((p / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise QLoraError(f"{p / CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise QLoraError(f"{p / CONFIG} is not a JSON object")
    config = _load_config(p, raw.get("model_type"))
    reader = CheckpointReader(p)  # validates every shard's header and size
    qc = raw.get("quantization_config")
    if qc is None:
        if reader.quantized:
            raise QLoraError(f"{p} holds bitsandbytes 4-bit tensors but its config.json has no quantization_config")
        return HFSource(p, config, reader)
    method, four_bit = qc.get("quant_method"), qc.get("load_in_4bit") or qc.get("_load_in_4bit")
    if method != "bitsandbytes" or not four_bit:
        what = f"{method} 8-bit" if method == "bitsandbytes" else str(method)
        raise QLoraError(f"{p} is quantized with {what}: qlora reads 16/32-bit or bitsandbytes 4-bit checkpoints")
    if not reader.quantized:
        raise QLoraError(f"{p}: config.json says 4-bit but no tensor carries a bitsandbytes quant_state")
    return Bnb4Source(p, config, reader)


def _load_config(p: Path, model_type):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError here
        if model_type is None:
            raise QLoraError(f"{p / CONFIG} has no model_type: cannot tell the architecture") from None
        raise QLoraError(f"unsupported architecture {model_type!r} in {p / CONFIG}: transformers cannot "
                         f"build it without remote code ({type(e).__name__})") from None


def _open_gguf(p: Path) -> Source:
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise QLoraError(f"{p} is not a GGUF file (bad magic bytes)")
    from transformers import AutoConfig

    from .gguf_cache import find
    cached = find(p)
    if cached is not None:
        return GGUFSource(p, AutoConfig.from_pretrained(str(cached), trust_remote_code=False), cached)
    try:
        with _shared_gguf_reader():
            config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # noqa: BLE001 - unsupported architecture, truncated metadata...
        raise QLoraError(f"cannot read {p}: {type(e).__name__}: {e}") from None
    return GGUFSource(p, config)


def quantizable_linear_names(config) -> list[str]:
    """Weight names of every ``nn.Linear`` inside the transformer blocks (the ``nn.ModuleList``
    of layers), excluding the output head and embeddings, MoE routers and vision towers, found by
    building the model on the meta device (no memory, no weights); routed experts one per expert."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - ValueError for unknown configs, others for broken ones
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QLoraError(f"unsupported architecture {getattr(config, 'model_type', None)!r}: "
                         f"transformers cannot build a causal LM for it ({first})") from None
    from . import moe
    moe.split_experts(model)  # routed experts: one weight per expert, named as qlora.moe.ExpertSource reads them
    head = model.get_output_embeddings()
    names = []
    for block_list_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList):
            continue
        for sub_name, sub in mod.named_modules(prefix=block_list_name):
            if (isinstance(sub, torch.nn.Linear) and sub is not head and not moe.is_router(sub_name, sub)
                    and not moe.outside_language_model(sub_name)):
                names.append(f"{sub_name}.weight")
    return list(dict.fromkeys(names))
