"""Training records from the Hugging Face ``datasets`` library: ``--data hf:org/name[:split]`` (a data
set repository on the Hub) and folders written by ``Dataset.save_to_disk`` (``FOLDER`` or
``FOLDER:split`` for a ``DatasetDict``); plus ``--data-field`` renaming of columns.

The repository's data files (JSONL, JSON, CSV, Parquet, Arrow, text; never a loading script) come
through ``huggingface_hub.snapshot_download`` (the user's cache, ``HF_HOME``, ``HF_HUB_OFFLINE=1``
and tokens, as for model ids: :mod:`qlora.hub`) and ``datasets`` reads them, splits named by file as
the library does. ``datasets`` is an optional extra (``pip install 'qlora[datasets]'``), imported
only here and only when such data is asked for. Every failure is one line (:class:`QLoraError`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import QLoraError

PREFIX = "hf:"
DATA_FILES = ("*.jsonl", "*.json", "*.jsonl.gz", "*.csv", "*.tsv", "*.parquet", "*.arrow", "*.txt", "README.md",
              "**/*.jsonl", "**/*.json", "**/*.jsonl.gz", "**/*.csv", "**/*.tsv", "**/*.parquet", "**/*.arrow",
              "**/*.txt")


def is_dataset(spec) -> bool:
    """``spec`` names an ``hf:`` data set or a ``save_to_disk`` folder (optionally ``:split``)."""
    s = str(spec)
    return s.startswith(PREFIX) or _saved(s) is not None


def _saved(s: str) -> tuple[Path, str | None] | None:
    """(folder, split) when ``s`` is a save_to_disk folder, or such a folder + ``:split``."""
    for folder, split in ((s, None), tuple(s.rsplit(":", 1)) if ":" in s else (None, None)):
        p = Path(folder).expanduser() if folder else None
        if p is not None and p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
            return p, split
    return None


def read(spec) -> list[dict]:
    """Every row of the data set ``spec`` as a dict (``hf:org/name[:split]`` or a save_to_disk folder)."""
    s = str(spec)
    datasets = _import(s)
    if s.startswith(PREFIX):
        repo, _, split = s[len(PREFIX):].partition(":")
        ds = _load_hub(datasets, s, repo, split or "train")
    else:
        folder, split = _saved(s)
        ds = _pick(s, datasets.load_from_disk(str(folder)), split)
    return ds.to_list()


def _import(s: str):
    try:
        import datasets
    except ImportError:
        raise QLoraError(f"--data {s}: reading Hugging Face data sets needs the datasets package: "
                         "pip install 'qlora[datasets]'") from None
    datasets.disable_progress_bars()
    return datasets


def _load_hub(datasets, s: str, repo: str, split: str):
    from .hub import split_id, snapshot
    if split_id(repo) is None or "@" in repo:
        raise QLoraError(f"--data {s}: expected hf:org/name or hf:org/name:split")
    folder = snapshot(repo, None, DATA_FILES, "dataset", f"--data {s}:")
    try:
        return _pick(s, datasets.load_dataset(folder), split)
    except QLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds on files it cannot read
        raise QLoraError(f"--data {s}: datasets cannot read the files of {repo}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _pick(s: str, ds, split: str | None):
    """One split of a DatasetDict (``train`` when none is named and it has one); a Dataset as is."""
    if not hasattr(ds, "keys"):
        if split:
            raise QLoraError(f"--data {s}: the folder holds one data set without splits: leave out :{split}")
        return ds
    names = list(ds.keys())
    split = split or ("train" if "train" in names or len(names) != 1 else names[0])
    if split not in names:
        raise QLoraError(f"--data {s}: no split {split!r} (the data set has {', '.join(names)})")
    return ds[split]


# ------------------------------------------------------------------------------- --data-field
def parse_fields(text: str | None) -> dict[str, str]:
    """``question=instruction,answer=output`` -> {"question": "instruction", "answer": "output"}."""
    if not text:
        return {}
    out = {}
    for part in str(text).split(","):
        src, eq, dst = (x.strip() for x in part.partition("="))
        if not eq or not src or not dst:
            raise QLoraError(f"--data-field {text}: expected COLUMN=FIELD pairs separated by commas "
                             "(e.g. question=instruction,answer=output)")
        out[src] = dst
    return out


def rename(records: list, fields: dict[str, str], where: str) -> list:
    """Each record with its columns renamed (records keep their class and ``where``)."""
    if not fields:
        return records
    seen = set().union(*(r.keys() for r in records))
    missing = sorted(set(fields) - seen)
    if missing:
        raise QLoraError(f"--data-field: {where} has no column {missing[0]!r} (its columns: "
                         f"{', '.join(sorted(map(str, seen)))})")
    for r in records:
        for src, dst in fields.items():
            if src in r:
                r[dst] = r.pop(src)
    return records

