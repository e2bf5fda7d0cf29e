"""A converted copy of a small GGUF file (the embedded model), so only its first use pays for the conversion.

transformers reads a GGUF by parsing its metadata (the config and the tokenizer each walk the whole
vocabulary) and dequantizing every tensor to float32: ~18 s for the embedded SmolLM2-135M on a
2-core CPU, on every run. The first run writes what it converted — config.json, the float32 tensors
as safetensors, the tokenizer files — to a cache folder named by a hash of the GGUF's bytes and the
versions of the code that converted it (qlora, transformers, gguf); later runs read that folder instead (about a second).

* where: ``$XDG_CACHE_HOME/qlora/gguf`` (default ``~/.cache/qlora/gguf``);
* what: files up to CACHE_MAX_BYTES on disk (float32 takes up to ~8x a 4-bit file's size, so big
  GGUFs are converted in memory every time, as before);
* the copy holds exactly the tensors the conversion gave (float32, bit for bit) and is written
  atomically (a temporary folder renamed into place); a failed write costs only the cache.
Delete the folder to drop the copies; nothing else refers to them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

CACHE_MAX_BYTES = 1 << 30
FORMAT = 1  # bump when what is stored changes


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora" / "gguf"


def _file_hash(path: Path) -> str:
    st = path.stat()
    return _hash(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(dist: str) -> str:
    """A distribution's version; for a source tree on PYTHONPATH (no metadata) the module's own, else "source"
    (a cache made so is keyed apart from any installed version's)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        import importlib
        return "source-" + str(getattr(importlib.import_module(dist), "__version__", "unknown"))


def cache_dir(path: Path) -> Path | None:
    """The folder that holds (or will hold) ``path``'s converted copy; None for files too big to cache."""
    if path.stat().st_size > CACHE_MAX_BYTES:
        return None
    # the conversion is transformers' (with the gguf package's reader); ours only stores it
    key = f"{FORMAT}|{_version('qlora')}|{_version('transformers')}|{_version('gguf')}|{_file_hash(path)}"
    return cache_root() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def find(path: Path) -> Path | None:
    """The finished converted copy of ``path``, if one exists."""
    d = cache_dir(path)
    return d if d is not None and (d / "config.json").is_file() else None


def store(path: Path, config, tensors: dict, tokenizer, log=None) -> Path | None:
    """Write the converted ``tensors`` (+ config, tokenizer) of ``path`` to its cache folder; returns the
    folder, or None where the file is too big or the write failed (the run goes on without a cache)."""
    from .checkpoint import CheckpointWriter
    from .errors import QLoraError
    d = cache_dir(path)
    if d is None or d.exists():
        return None
    cfg = json.loads(config.to_json_string(use_diff=True))
    # use_cache is a run-time switch (model.skeleton turns it off for training on this very config); stored, a
    # false would become the cached model's generation default: generation without the KV cache, ~10x slower
    for key in ("_name_or_path", "use_cache"):
        cfg.pop(key, None)
    try:
        with CheckpointWriter(d, "4GB") as w:
            for name, t in tensors.items():
                w.add(name, t)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(w.tmp_dir))
            w.finish(cfg)
    except (OSError, QLoraError) as e:  # a full or read-only cache: run on without it
        if log is not None:
            log(f"note: could not cache the converted {path.name} in {d.parent} ({e})")
        return None
    return d
