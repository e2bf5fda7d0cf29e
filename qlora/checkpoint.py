"""Safetensors checkpoint directories, read and written one tensor at a time, and the 4-bit
format that transformers+bitsandbytes uses for a ``load_in_4bit`` model.

**Safetensors file**: ``u64 little-endian N``, then ``N`` bytes of JSON
``{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``
(padded with spaces), then the tensors' raw little-endian bytes, contiguous, offsets relative
to the end of the header. We read a tensor with one positioned ``read`` into fresh memory instead
of memory-mapping the file: a memory map keeps every page it touched resident, so walking a
2 GB shard through ``safe_open`` grows the process by 2 GB, while ours holds one tensor.

**Directory**: ``config.json`` + ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json`` = ``{"metadata": {"total_parameters", "total_size"},
"weight_map": {name: shard file}}``.

**bitsandbytes 4-bit**: each quantized linear ``X.weight`` is stored as the packed uint8 codes
``X.weight`` ``[(n + 1) // 2, 1]`` plus the :meth:`qlora.nf4.QuantState.to_state_dict` tensors
(``.absmax``, ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map``,
``.quant_state.bitsandbytes__nf4`` = JSON bytes), all in one shard; every other tensor keeps its
16/32-bit dtype; ``config.json`` carries :func:`quantization_config`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import QLoraError
from .nf4 import QuantState

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
QS_MARK = ".quant_state.bitsandbytes__"
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_size(size: int | str) -> int:
    """``2GB`` / ``500MB`` / ``64KiB`` / ``1000`` -> bytes (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
        if not m:
            raise QLoraError(f"cannot read size {size!r}: write it like 2GB, 500MB or 1000000")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if n <= 0:
        raise QLoraError(f"size must be positive, got {size!r}")
    return n


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """The ``quantization_config`` transformers writes for ``BitsAndBytesConfig(load_in_4bit=True, ...)``."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).split(".")[-1],
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


# ---------------------------------------------------------------------------------------------
# Reading


class TensorInfo(NamedTuple):
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file: the header must be JSON, every tensor's byte range
    must match its dtype and shape, and the ranges must tile the data exactly up to the end of
    the file (a truncated or padded file fails here, with its name)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} does not fit in the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        infos, ranges = {}, []
        for name, h in header.items():
            dtype = DTYPES.get(h.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {name}: unsupported dtype {h.get('dtype')!r}")
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize:
                raise ValueError(f"tensor {name}: {end - begin} bytes for shape {list(shape)} {h['dtype']}")
            infos[name] = TensorInfo(path, dtype, shape, 8 + n + begin, end - begin)
            ranges.append((begin, end))
        pos = 0
        for begin, end in sorted(ranges):
            if begin != pos:
                raise ValueError("tensor data has holes or overlaps")
            pos = end
        if 8 + n + pos != size:
            raise ValueError(f"file is {size} bytes, its header describes {8 + n + pos} (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise QLoraError(f"{path} is not a valid safetensors file: {e}") from None
    return infos


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read with a positioned read into its own memory (no memory map)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise QLoraError(f"{info.file} ended early (truncated?)")
            got += k
    return buf.view(info.dtype).reshape(info.shape)


class CheckpointReader:
    """Every tensor of a safetensors directory (single file or sharded with an index), by name.

    ``names()`` lists the stored keys in file order; for a bitsandbytes 4-bit checkpoint,
    ``quantized_names()`` are the ``X.weight`` keys that hold packed codes and
    :meth:`read_quantized` returns them with their :class:`QuantState`.
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise QLoraError(f"{index} is not a valid safetensors index ({e})") from None
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise QLoraError(f"{index} lists {missing[0]}, which is not in {self.dir}")
        elif (self.dir / SINGLE).is_file():
            files = [SINGLE]
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise QLoraError(f"no *.safetensors file in {self.dir}")
        self.files = [self.dir / f for f in files]
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in sorted(read_header(f).items(), key=lambda kv: kv[1].start):
                self.infos.setdefault(name, info)
        if index.is_file():
            absent = [k for k in weight_map if k not in self.infos]
            if absent:
                raise QLoraError(f"{index} lists tensor {absent[0]}, which no shard holds")
        self.quantized = {k.split(QS_MARK)[0]: k.split(QS_MARK)[1] for k in self.infos if QS_MARK in k}

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise QLoraError(f"no tensor {name!r} in {self.dir}")
        return read_tensor(info)

    def is_aux(self, name: str) -> bool:
        """True for the bitsandbytes side tensors (absmax, maps, quant_state) of a quantized weight."""
        for suffix in AUX_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in self.quantized:
                return True
        return QS_MARK in name

    def read_quantized(self, name: str) -> tuple[torch.Tensor, QuantState] | None:
        """``(packed uint8 [(n+1)//2, 1], QuantState)`` for a quantized weight, else None."""
        if name not in self.quantized:
            return None
        keys = [name + s for s in AUX_SUFFIXES] + [name + QS_MARK + self.quantized[name]]
        tensors = {k: self.read(k) for k in keys if k in self.infos}
        try:
            state = QuantState.from_state_dict(tensors, name)
        except (ValueError, KeyError, AttributeError) as e:
            raise QLoraError(f"{self.dir}: bad 4-bit state for {name}: {e}") from None
        return self.read(name), state

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


# ---------------------------------------------------------------------------------------------
# Writing


class CheckpointWriter:
    """Write a checkpoint directory tensor by tensor, with bounded memory and atomically.

    Tensors go to a spool file as they arrive (memory: the tensor being written); when a shard
    reaches ``max_shard_size`` its header is written and the spooled bytes are copied behind it,
    ordered by element size (so every tensor is aligned, as safetensors itself does). Everything
    lives in a temporary sibling directory (``tmp_dir``; put other files such as the tokenizer
    there too) that :meth:`finish` renames to ``out_dir``; on error :meth:`abort` removes it.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB", force: bool = False):
        self.out = Path(out_dir)
        self.max_shard = parse_size(max_shard_size)
        if self.out.exists() and not force:
            raise QLoraError(f"{self.out} already exists: choose another output or pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(self.tmp_dir, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        self.shards: list[Path] = []
        self.weight_map: dict[str, int] = {}  # name -> shard number
        self.total_size = 0
        self.total_params = 0
        self._entries: list[tuple[str, torch.dtype, tuple, int, int]] = []
        self._spool = None
        self._spool_size = 0

    # -- public -------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor stored as it is (dtype and shape kept)."""
        self._add_group({name: tensor})
        self.total_params += tensor.numel()

    def add_quantized(self, name: str, packed: torch.Tensor, state: QuantState) -> int:
        """A 4-bit weight in the bitsandbytes layout; returns the bytes it takes."""
        group = {name: packed.reshape(-1, 1), **state.to_state_dict(name)}
        self._add_group(group)
        self.total_params += state.numel
        return sum(t.numel() * t.element_size() for t in group.values())

    def finish(self, config: dict) -> list[Path]:
        """Close the last shard, write config.json (and the index when sharded), move into place."""
        self._close_shard()
        if not self.shards:
            raise QLoraError("nothing to write: the model has no tensors")
        n = len(self.shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, name in zip(self.shards, names):
            shard.rename(self.tmp_dir / name)
        if n > 1:
            index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_size},
                     "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
            _write_json(self.tmp_dir / INDEX, index)
        _write_json(self.tmp_dir / CONFIG, config)
        trash = None
        if self.out.exists():  # --force: swap directories, then drop the old one
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            self.out.rename(trash / "old")
        self.tmp_dir.rename(self.out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return [self.out / name for name in names]

    def abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    # -- shards -------------------------------------------------------------------------------

    def _add_group(self, group: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in group.values())
        if self._spool is not None and self._spool_size + size > self.max_shard:
            self._close_shard()
        if self._spool is None:
            self._spool = open(self.tmp_dir / f"spool-{len(self.shards)}.bin", "w+b")
            self._spool_size = 0
            self._entries = []
        for name, t in group.items():
            if name in self.weight_map:
                raise QLoraError(f"tensor {name} written twice")
            if t.dtype not in DTYPE_CODES:
                raise QLoraError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._spool.write(memoryview(data))
            self._entries.append((name, t.dtype, tuple(t.shape), self._spool_size, data.nbytes))
            self._spool_size += data.nbytes
            self.weight_map[name] = len(self.shards)
        self.total_size += size

    def _close_shard(self) -> None:
        if self._spool is None:
            return
        spool, entries = self._spool, sorted(self._entries, key=lambda e: (-e[1].itemsize, e[0]))
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, _, nbytes in entries:
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        path = self.tmp_dir / f"shard-{len(self.shards)}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, _, _, offset, nbytes in entries:
                spool.seek(offset)
                left = nbytes
                while left:
                    chunk = spool.read(min(left, 8 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        spool.close()
        os.unlink(spool.name)
        self._spool = None
        self.shards.append(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
