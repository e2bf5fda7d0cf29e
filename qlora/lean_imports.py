"""Start-up time of the ``qlora`` command: a cache for compiled modules, and fewer imports.

**Compiled modules** (:func:`cache_bytecode`). Where Python may not write ``.pyc`` files
(``PYTHONDONTWRITEBYTECODE=1``, which many container images set, or a read-only install), every
start compiles torch, sympy and transformers from source again: ``import torch, transformers`` took
10.0 s against 3.5 s with cached bytecode on a 2-core CPU, and 12.5 s on the H200 machine (whose image
sets the variable). There, the ``qlora`` command keeps the bytecode in its own folder instead
(``sys.pycache_prefix``: ``$XDG_CACHE_HOME/qlora/pycache``, else ``~/.cache/qlora/pycache``; the
installed packages are left untouched), and on machines with 4 or more cores a background process
compiles the packages a run imports in parallel, so that even the first run finds most of them
compiled. ``QLORA_PYCACHE=0`` turns this off; a prefix the user set (``PYTHONPYCACHEPREFIX``) is kept.

**Fewer imports** (:func:`hide_unused_packages`): keep ``import transformers`` from importing
packages a text fine-tune never uses.

transformers imports torchvision (its image and video utilities) and scikit-learn (assisted
generation, in some versions at import time) and SciPy (``scipy.optimize``, for its object-detection
losses) whenever they are installed. On the H100 machine torchvision alone cost 5.6 s of start-up,
since it imports ``torch._dynamo`` (bench/ttfs_profile.py), scikit-learn 1.5 s on the H200 one,
and SciPy 0.27 s of transformers' 0.83 s import on a 2-core CPU (``python -X importtime``).
Marking them absent (``sys.modules[name] = None``, which ``importlib.util.find_spec`` reports as
"not installed") takes them out of the start-up.

Both are applied only by the ``qlora`` command and our benchmark scripts, never on ``import qlora``: a
program that imports qlora as a library keeps its packages. ``QLORA_KEEP_IMPORTS=1`` turns it off."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .config import env_flag

UNUSED = ("torchvision", "sklearn", "scipy")
# compiled ahead by the background process, in the order a run imports them
PRECOMPILE = ("torch", "sympy", "mpmath", "triton", "transformers", "safetensors", "tokenizers",
              "huggingface_hub", "numpy", "jinja2", "networkx", "yaml", "filelock", "fsspec",
              "packaging", "regex", "tqdm", "typing_extensions", "qlora")
# of transformers' model folders, only these (the others compile when a run imports them)
MODEL_FOLDERS = ("auto", "llama", "mistral", "qwen2", "gemma", "phi3")

_WORKER = r"""
import compileall, fcntl, multiprocessing, os, sys
from concurrent.futures import ProcessPoolExecutor
stamp, workers, keep_models, dirs = sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split(",")), sys.argv[4:]
lock = open(os.path.join(os.path.dirname(stamp), "compiling.lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # one compiling process at a time
except OSError:
    sys.exit(0)
files = []
for d in dirs:
    for root, subs, names in os.walk(d):
        models = os.path.basename(root) == "models" and os.path.basename(os.path.dirname(root)) == "transformers"
        subs[:] = sorted(s for s in subs if s not in ("__pycache__", "tests", "test") and (not models or s in keep_models))
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
def one(path):
    try:
        compileall.compile_file(path, quiet=2)
    except Exception:
        pass
with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
    list(pool.map(one, files, chunksize=16))
open(stamp, "w").close()
"""


def bytecode_dir() -> Path:
    """Where :func:`cache_bytecode` keeps compiled modules."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora" / "pycache"


def _needs_cache() -> bool:
    """True when Python will not keep torch's compiled modules by itself."""
    if sys.dont_write_bytecode:
        return True
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    cached = importlib.util.cache_from_source(spec.origin)
    return not os.path.exists(cached) and not os.access(os.path.dirname(os.path.dirname(cached)), os.W_OK)


def cache_bytecode(precompile: bool | None = None) -> str | None:
    """Keep compiled modules in :func:`bytecode_dir` where Python would compile them on every start
    (see the module's doc); must run before torch is imported. ``precompile``: start the background
    compiler (default: on Linux machines with 4 or more cores). Returns the folder, or None where nothing
    was changed."""
    if not env_flag("QLORA_PYCACHE", True) or sys.pycache_prefix or "torch" in sys.modules:
        return None
    try:
        if not _needs_cache():
            return None
        folder = bytecode_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            return None
    except (OSError, ValueError, ImportError):
        return None
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    if precompile is None:
        precompile = sys.platform.startswith("linux") and (os.cpu_count() or 1) >= 4
    if precompile:
        _start_precompile(folder)
    return str(folder)


def _start_precompile(folder: Path) -> subprocess.Popen | None:
    """The background compiler, unless an earlier one finished for these package versions."""
    dirs, key = [], hashlib.sha256(sys.version.encode())
    for name in PRECOMPILE:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for d in spec.submodule_search_locations:
            if os.path.isdir(d):
                dirs.append(d)
                init = os.path.join(d, "__init__.py")
                key.update(f"{d}:{os.stat(init).st_mtime_ns if os.path.exists(init) else 0}".encode())
    stamp = folder / f"complete-{key.hexdigest()[:16]}"
    if not dirs or stamp.exists():
        return None
    workers = max(1, min(16, (os.cpu_count() or 2) - 1))
    try:
        return subprocess.Popen(
            [sys.executable, "-E", "-S", "-X", f"pycache_prefix={folder}", "-c", _WORKER, str(stamp), str(workers),
             ",".join(MODEL_FOLDERS), *dirs],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def fast_start() -> None:
    """What the ``qlora`` command (and our benchmark scripts) do first: :func:`cache_bytecode`, then
    :func:`hide_unused_packages`."""
    cache_bytecode()
    hide_unused_packages()


def hide_unused_packages() -> list[str]:
    """Hide the UNUSED packages from later imports, except those already imported, unless the
    user opted out or transformers is already imported; returns the names hidden."""
    if env_flag("QLORA_KEEP_IMPORTS", False):
        return []
    if "transformers" in sys.modules:  # too late: it may have decided they are available already, and a
        return []  # later lazy import of its model code would then fail on the hidden package
    hidden = [name for name in UNUSED if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None
    return hidden
