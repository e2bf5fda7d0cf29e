"""Start-up time of the ``qlora`` command: a cache for compiled modules, fewer imports, and a warm-up
of CUDA in the background.

**Compiled modules** (:func:`cache_bytecode`). Where Python may not write ``.pyc`` files
(``PYTHONDONTWRITEBYTECODE=1``, which many container images set, or a read-only install), every
start compiles torch, sympy and transformers from source again: ``import torch, transformers`` took
10.0 s against 3.5 s with cached bytecode on a 2-core CPU, and 12.5 s on the H200 machine (whose image
sets the variable). There, the ``qlora`` command keeps the bytecode in its own folder instead
(``sys.pycache_prefix``: ``$XDG_CACHE_HOME/qlora/pycache``, else ``~/.cache/qlora/pycache``; the
installed packages are left untouched), and on machines with 4 or more cores a background process
compiles the packages a run imports in parallel, so that even the first run finds most of them
compiled. It takes first the ~2,300 modules a GPU training run imports, in the order it imports them
(``hot_modules.txt``, recorded by ``bench/ttfs_profile.py --write-hot-list``), so that its workers
stay ahead of the run's own imports; then the rest of the packages. ``QLORA_PYCACHE=0`` turns this
off; a prefix the user set (``PYTHONPYCACHEPREFIX``) is kept.

**Fewer imports** (:func:`hide_unused_packages`): keep ``import transformers`` from importing
packages a text fine-tune never uses.

transformers imports torchvision (its image and video utilities), torchaudio (its audio utilities, 74
modules on the H200 machine), and scikit-learn (assisted
generation, in some versions at import time) and SciPy (``scipy.optimize``, for its object-detection
losses) whenever they are installed. On the H100 machine torchvision alone cost 5.6 s of start-up,
since it imports ``torch._dynamo`` (bench/ttfs_profile.py), scikit-learn 1.5 s on the H200 one,
and SciPy 0.27 s of transformers' 0.83 s import on a 2-core CPU (``python -X importtime``).
Marking them absent (``sys.modules[name] = None``, which ``importlib.util.find_spec`` reports as
"not installed") takes them out of the start-up.

Both are applied only by the ``qlora`` command and our benchmark scripts, never on ``import qlora``: a
program that imports qlora as a library keeps its packages. ``QLORA_KEEP_IMPORTS=1`` turns it off.

**Warm-up** (:func:`warm_up_cuda`): ``qlora train`` on one GPU starts two threads that pay CUDA's and
Triton's first-use costs, and compile the step's Triton kernels, while the main thread imports
transformers and builds the model. ``QLORA_WARMUP=0`` turns them off."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from .settings import switches

UNUSED = ("torchvision", "torchaudio", "sklearn", "scipy")
# compiled by the background process after the hot list (HOT_LIST), package by package
PRECOMPILE = ("torch", "sympy", "mpmath", "triton", "transformers", "safetensors", "tokenizers",
              "huggingface_hub", "numpy", "jinja2", "networkx", "yaml", "filelock", "fsspec",
              "packaging", "regex", "tqdm", "typing_extensions", "qlora")
# of transformers' model folders, only these (the others compile when a run imports them)
MODEL_FOLDERS = ("auto", "llama", "mistral", "qwen2", "gemma", "phi3")

_WORKER = r"""
import compileall, fcntl, multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
stamp, workers, keep_models, hot = sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split(",")), sys.argv[4]
cut = sys.argv.index("--")
roots, dirs = sys.argv[5:cut], sys.argv[cut + 1:]
lock = open(os.path.join(os.path.dirname(stamp), "compiling.lock"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # one compiling process at a time
except OSError:
    sys.exit(0)
seen = set()
def new(paths):
    out = [p for p in paths if p not in seen]
    seen.update(out)
    return out
def one(path):
    try:
        compileall.compile_file(path, quiet=2)  # skips a file whose cached bytecode is up to date
    except Exception:
        pass
def walk():
    for d in dirs:
        for root, subs, names in os.walk(d):
            models = os.path.basename(root) == "models" and os.path.basename(os.path.dirname(root)) == "transformers"
            subs[:] = sorted(s for s in subs if s not in ("__pycache__", "tests", "test") and (not models or s in keep_models))
            yield from (os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
hot_files = []
try:  # the modules a run imports, in the order it imports them: the main process is importing them now
    for rel in open(hot).read().split():
        path = next((p for p in (os.path.join(r, rel) for r in roots) if os.path.isfile(p)), None)
        if path is not None:
            hot_files.append(path)
except OSError:
    pass
t0 = time.time()
with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
    hot_files = new(hot_files)
    first = pool.map(one, hot_files, chunksize=4)  # queued first
    rest = new(list(walk()))
    rest_done = pool.map(one, rest, chunksize=16)
    list(first)
    t1 = time.time()
    list(rest_done)
with open(os.path.join(os.path.dirname(stamp), "compile.log"), "a") as log:
    log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {workers} workers: {len(hot_files)} modules of the hot list "
              f"in {t1 - t0:.2f} s, then {len(rest)} more in {time.time() - t1:.2f} s\n")
open(stamp, "w").close()
"""
# the modules a training run on a GPU imports after fast_start(), relative to their sys.path entry, in import
# order: written by `python bench/ttfs_profile.py --write-hot-list qlora/hot_modules.txt` (see record_hot_modules)
HOT_LIST = Path(__file__).with_name("hot_modules.txt")
_BASELINE: set[str] = set()


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
    if not switches().pycache or sys.pycache_prefix or "torch" in sys.modules:
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
    workers = max(1, min(16, (os.cpu_count() or 2) - 2))  # the run and its warm-up thread keep two
    try:
        return subprocess.Popen(
            [sys.executable, "-E", "-S", "-X", f"pycache_prefix={folder}", "-c", _WORKER, str(stamp), str(workers),
             ",".join(MODEL_FOLDERS), str(HOT_LIST), *_search_path(), "--", *dirs],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None


def _search_path() -> list[str]:
    """sys.path's folders, in its order (where the import system will find each hot module)."""
    out: list[str] = []
    for p in sys.path:
        p = os.path.abspath(p or ".")
        if p not in out and os.path.isdir(p):
            out.append(p)
    return out


def record_hot_modules(path: str | os.PathLike) -> int:
    """Write the source files of the modules imported since :func:`fast_start` (or, without it, all
    of them) to ``path``, each relative to its folder on ``sys.path``, in import order: the list the
    background compiler takes first. Returns how many."""
    # longest first: a site-packages folder inside the standard library's folder must win
    roots, lines = sorted(_search_path(), key=len, reverse=True), []
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if name in _BASELINE or not f or not f.endswith(".py") or not os.path.isabs(f):
            continue
        root = next((r for r in roots if f.startswith(r + os.sep)), None)
        if root is not None:
            lines.append(os.path.relpath(f, root))
    tmp = Path(f"{path}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)
    return len(lines)


def fast_start() -> None:
    """What the ``qlora`` command (and our benchmark scripts) do first: :func:`cache_bytecode`, then
    :func:`hide_unused_packages`."""
    _BASELINE.update(sys.modules)
    cache_bytecode()
    hide_unused_packages()


def hide_unused_packages() -> list[str]:
    """Hide the UNUSED packages from later imports, except those already imported, unless the
    user opted out or transformers is already imported; returns the names hidden."""
    if switches().keep_imports:
        return []
    if "transformers" in sys.modules:  # too late: it may have decided they are available already, and a
        return []  # later lazy import of its model code would then fail on the hidden package
    from .compat import hide_packages
    return hide_packages(UNUSED)


class WarmUp:
    """The threads of :func:`warm_up_cuda`: ``done_at`` (name -> time.time() when it finished), ``ahead``
    (the kernels :func:`qlora.kernels.warm.compile_ahead_once` ran; None when it skipped them)."""

    def __init__(self):
        self.threads, self.done_at, self.ahead = [], {}, []

    def start(self, name, fn):
        import threading

        def run():
            try:
                fn()
            except Exception:  # a warm-up only: the run itself reports any real problem
                pass
            finally:
                self.done_at[name] = time.time()
        t = threading.Thread(target=run, name=f"qlora-warm-up-{name}", daemon=True)
        self.threads.append(t)
        t.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads; True when all finished."""
        for t in self.threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self.threads)


def warm_up_cuda(device, head_dim: int = 128, seq: int = 2048, shapes: dict | None = None) -> WarmUp | None:
    """Start background threads that pay the first-use costs of a training run on ``device`` while the
    main thread imports transformers and builds the model. One makes the CUDA context and runs cuBLAS
    and the attention kernels (forward and backward, bf16, causal, ``head_dim``, ``seq`` positions): on
    a freshly started GPU machine the first attention call alone took 1.15 s. The other does Triton's
    one-time work (hashing its compiler for the cache key, building its CUDA helper module, asking
    ptxas for its version) and, with ``shapes`` (keyword arguments of
    :func:`qlora.kernels.warm.compile_ahead` besides device, head_dim and seq: hidden, intermediate,
    vocab, tokens, ...), compiles the step's Triton kernels. Most of this runs in C++ or in child
    processes (ptxas, the C compiler), without the interpreter lock. The kernels are compiled ahead only
    once per set of sizes and versions (see :func:`qlora.kernels.warm.compile_ahead_once`). The run does
    not wait for the threads: a kernel the step needs before its thread got to it is compiled by the
    step, as without a warm-up. Uses no random numbers (the run's seeds stay as they were) and little
    GPU memory (a few MB, and the norm's backward on ``tokens`` rows). Returns the threads, or None
    where there is nothing to warm (no CUDA device, ``QLORA_WARMUP=0``)."""
    import torch
    if not switches().warmup or not torch.cuda.is_available():
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    warm = WarmUp()

    def cuda():
        with torch.cuda.device(device):
            a = torch.ones(256, 256, device=device, dtype=torch.bfloat16)
            (a @ a).sum().item()  # cuBLAS
            q = torch.ones(1, 2, max(16, seq), head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            torch.cuda.synchronize(device)

    def triton_kernels():
        with torch.cuda.device(device):
            try:
                from .compat import triton_first_use
                triton_first_use()
            except Exception:
                pass
            if shapes:  # once per set of sizes and versions (a stamp in Triton's cache)
                from .kernels.warm import compile_ahead_once
                warm.ahead = compile_ahead_once(device, head_dim=head_dim, seq=seq, **shapes)

    warm.start("cuda", cuda)
    warm.start("triton", triton_kernels)
    return warm
