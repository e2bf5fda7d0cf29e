"""Hugging Face Hub model ids (``org/name[@revision]``) turned into local snapshot folders.

``local(src)`` is what every command calls before it opens a model (:func:`qlora.sources.open_source`
and the checks that run before it): a path on disk always wins; an id is resolved by
``huggingface_hub.snapshot_download``, which keeps the user's cache, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE=1`` and tokens (``HF_TOKEN`` or ``hf auth login``) exactly as transformers does.
Only safetensors weights, the config and tokenizer files are fetched: never a pickle checkpoint
(``*.bin``, ``*.pt``...), which qlora refuses to load anyway because unpickling can run code.
Every failure is one line (:class:`QLoraError`), raised before any output is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import QLoraError

# org/name, optionally @revision (a branch, tag or commit); the Hub's own naming rules, roughly
_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "config.json")
_RESOLVED: dict = {}  # (repo, revision, cache folder, offline) -> snapshot folder, once per process


def split_id(src) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``src`` is written as a Hub model id, else None."""
    m = _ID.match(str(src))
    return (m.group(1), m.group(2)) if m else None


def local(src):
    """``src`` as a local path: unchanged when it is None, a path that exists, ``shape:NAME`` or
    ``embedded:...``, or not shaped like an id (the caller reports the missing path); a Hub id is
    resolved to its snapshot folder in the Hugging Face cache (downloading it unless offline)."""
    if src is None:
        return None
    s = str(src)
    if s.startswith(("shape:", "embedded:")) or Path(s).expanduser().exists():
        return src
    parsed = split_id(s)
    if parsed is None:
        return src
    from huggingface_hub import constants
    key = (*parsed, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    if key not in _RESOLVED:
        _RESOLVED[key] = _weights(s, *parsed)
    return _RESOLVED[key]


def _patterns() -> list[str]:
    from .sources import TOKENIZER_FILES
    return [*WEIGHTS, *TOKENIZER_FILES, "additional_chat_templates/*"]


def _weights(src: str, repo: str, revision: str | None) -> str:
    folder = Path(snapshot(repo, revision, _patterns(), "model", f"--model {src}: no such local path, and"))
    if not any(folder.glob("*.safetensors")):
        raise QLoraError(f"--model {src}: the Hub repository has no safetensors weights (pickle checkpoints are "
                         "never loaded because unpickling can run code): pick a repository with *.safetensors")
    return str(folder)


def snapshot(repo: str, revision: str | None, patterns, repo_type: str, what: str) -> str:
    """The local folder of ``repo``'s files matching ``patterns`` (downloaded unless cached); ``what``
    (the flag and value, a colon or a clause) starts every error message."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    where = what
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=list(patterns), repo_type=repo_type)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise QLoraError(f"{where} the Hugging Face cache ({constants.HF_HUB_CACHE}) has no snapshot of it while "
                             "HF_HUB_OFFLINE=1 forbids downloading: run once online or pass a local copy") from None
        raise QLoraError(f"{where} the Hugging Face Hub cannot be reached and the cache ({constants.HF_HUB_CACHE}) "
                         "has no snapshot of it: check the network (or HF_ENDPOINT) or pass a local copy") from None
    except GatedRepoError:
        raise QLoraError(f"{where} {repo} is gated on the Hub: accept its terms on its page, then log in "
                         "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise QLoraError(f"{where} the Hub has no {repo_type} {repo} (or it is private: log in with "
                         "`hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise QLoraError(f"{where} {repo} has no revision {revision!r} on the Hub") from None
    except IncompleteSnapshotError:
        raise QLoraError(f"{where} its cached snapshot is incomplete and the Hub cannot be reached: "
                         "download it again online") from None
    except HfHubHTTPError as e:
        raise QLoraError(f"{where} the Hub answered {type(e).__name__}: {str(e).splitlines()[0]}") from None


def recorded_base(adapter_dir) -> str | None:
    """The base model an adapter was trained on, as its ``adapter_config.json`` records it (PEFT's
    ``base_model_name_or_path``): a Hub id or a path that still exists; None for the embedded model
    or when nothing usable is recorded (the caller's default applies)."""
    try:
        base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # the adapter checks report an unreadable file with their own message
    if not isinstance(base, str) or not base or base.startswith("embedded:"):
        return None
    if Path(base).expanduser().exists() or split_id(base) is not None:
        return base
    return None


def base_for(model_src, adapter_dir):
    """``--model`` when given; else the base the adapter records (see :func:`recorded_base`)."""
    if model_src is not None or adapter_dir is None:
        return model_src
    return recorded_base(adapter_dir)
