"""qlora.lean_imports: the qlora command hides torchvision, sklearn and scipy from transformers (start-up time)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys
from qlora.lean_imports import hide_unused_packages
print("skipped" if "torchvision" in hide_unused_packages() else "kept")
print("found" if importlib.util.find_spec("torchvision") is not None else "absent")
from transformers.utils import import_utils
print("tv-available" if import_utils.is_torchvision_available() else "tv-unavailable")
"""


def _run(tmp_path, **env):
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    marker = tmp_path / "imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n__version__ = '0.0.1'\n")
    e = {k: v for k, v in os.environ.items() if k != "QLORA_KEEP_IMPORTS"}
    e.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), **env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(), marker.exists()


def test_torchvision_hidden_from_transformers(tmp_path):
    words, imported = _run(tmp_path)
    assert words[:2] == ["skipped", "absent"]
    assert not imported  # nothing imported the (fake) torchvision


def test_opt_out_keeps_torchvision(tmp_path):
    words, _ = _run(tmp_path, QLORA_KEEP_IMPORTS="1")
    assert words[:2] == ["kept", "found"]


def test_nothing_hidden_once_transformers_is_imported(tmp_path):
    """transformers caches which packages exist: hiding one afterwards would break its lazy imports
    (a model class importing scipy through its loss utilities)."""
    probe = ("import transformers, sys\nfrom qlora.lean_imports import hide_unused_packages\n"
             "print(hide_unused_packages())\nfrom transformers import LlamaForCausalLM\nprint('ok')")
    e = {k: v for k, v in os.environ.items() if k != "QLORA_KEEP_IMPORTS"}
    e["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "ok"]


CACHE_PROBE = """
import sys
from qlora import lean_imports
print(lean_imports.cache_bytecode(precompile=False))
import fakepkg.mod
print(fakepkg.mod.__cached__)
"""


def _fake_package(tmp_path):
    pkg = tmp_path / "site" / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tests").mkdir()
    for f in ("__init__.py", "mod.py", "sub/__init__.py", "sub/deep.py", "tests/test_x.py"):
        (pkg / f).write_text(f"VALUE = {f!r}\n")
    return pkg


def _cache_env(tmp_path, **extra):
    e = {k: v for k, v in os.environ.items() if k not in ("QLORA_PYCACHE", "PYTHONPYCACHEPREFIX")}
    e.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), PYTHONDONTWRITEBYTECODE="1",
             XDG_CACHE_HOME=str(tmp_path / "cache"), **extra)
    return e


def test_bytecode_cached_where_python_writes_none(tmp_path):
    """With PYTHONDONTWRITEBYTECODE=1 (as on the GPU machines' image) the qlora command keeps compiled
    modules in its own folder, reuses them on the next start, and writes nothing beside the sources."""
    pkg = _fake_package(tmp_path)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=_cache_env(tmp_path),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.split())
    folder = tmp_path / "cache" / "qlora" / "pycache"
    assert runs[0][0] == runs[1][0] == str(folder)
    cached = Path(runs[0][1])
    assert cached.is_file() and folder in cached.parents and runs[1][1] == runs[0][1]
    assert cached.stat().st_mtime_ns == os.stat(runs[1][1]).st_mtime_ns  # read back, not written again
    assert not list(pkg.rglob("__pycache__"))


def test_bytecode_cache_opt_out(tmp_path):
    _fake_package(tmp_path)
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=_cache_env(tmp_path, QLORA_PYCACHE="0"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "None"
    assert not (tmp_path / "cache").exists()


def test_background_compile_fills_the_cache_once(tmp_path, monkeypatch):
    """The background compiler compiles every module of the listed packages (tests folders left out),
    the way the import system will look for them, and marks the set done so later starts skip it."""
    import importlib.util

    from qlora import lean_imports
    pkg = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(lean_imports, "PRECOMPILE", ("fakepkg",))
    monkeypatch.setattr(lean_imports, "HOT_LIST", tmp_path / "no-hot-list.txt")  # not torch's 2,300 modules
    folder = tmp_path / "cache"
    proc = lean_imports._start_precompile(folder)
    assert proc is not None and proc.wait(timeout=120) == 0
    monkeypatch.setattr(sys, "pycache_prefix", str(folder))
    for f in ("__init__.py", "mod.py", "sub/__init__.py", "sub/deep.py"):
        assert Path(importlib.util.cache_from_source(str(pkg / f))).is_file(), f
    assert not Path(importlib.util.cache_from_source(str(pkg / "tests" / "test_x.py"))).exists()
    assert len(list(folder.glob("complete-*"))) == 1
    assert lean_imports._start_precompile(folder) is None  # done already


def test_background_compile_takes_the_hot_list_first(tmp_path, monkeypatch):
    """The modules a run imports (recorded by record_hot_modules, relative to their sys.path folder) are
    compiled too, even outside the listed packages, and a name in the list that is not installed is skipped."""
    import importlib.util

    from qlora import lean_imports
    _fake_package(tmp_path)
    (tmp_path / "site" / "loose.py").write_text("X = 1\n")
    hot = tmp_path / "hot.txt"
    hot.write_text("loose.py\nnot_installed/mod.py\nfakepkg/mod.py\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(lean_imports, "PRECOMPILE", ("fakepkg",))
    monkeypatch.setattr(lean_imports, "HOT_LIST", hot)
    folder = tmp_path / "cache"
    proc = lean_imports._start_precompile(folder)
    assert proc is not None and proc.wait(timeout=120) == 0
    monkeypatch.setattr(sys, "pycache_prefix", str(folder))
    for f in ("loose.py", "fakepkg/mod.py", "fakepkg/sub/deep.py"):  # loose.py: only in the hot list
        assert Path(importlib.util.cache_from_source(str(tmp_path / "site" / f))).is_file(), f


def test_record_hot_modules_lists_new_imports_relative_to_sys_path(tmp_path):
    probe = ("import sys\nfrom qlora import lean_imports\nlean_imports.fast_start()\n"
             "import fakepkg.sub.deep, loose\n"
             f"print(lean_imports.record_hot_modules({str(tmp_path / 'hot.txt')!r}))")
    _fake_package(tmp_path)
    (tmp_path / "site" / "loose.py").write_text("X = 1\n")
    out = subprocess.run([sys.executable, "-c", probe], env=_cache_env(tmp_path, QLORA_PYCACHE="0"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "hot.txt").read_text().split()
    assert int(out.stdout.split()[-1]) == len(lines)
    want = ["fakepkg/__init__.py", "fakepkg/sub/__init__.py", "fakepkg/sub/deep.py", "loose.py"]
    assert [x for x in lines if x in want] == want  # in import order, relative to the site folder
    assert not any(x.startswith("qlora/") and x.endswith(("lean_imports.py", "config.py")) for x in lines)  # imported before


def test_warm_up_needs_cuda(switch):
    from qlora.lean_imports import warm_up_cuda
    assert warm_up_cuda("cpu") is None
    switch("QLORA_WARMUP", "0")
    assert warm_up_cuda("cuda") is None


@pytest.mark.gpu
def test_warm_up_cuda_touches_no_random_state(tmp_path, monkeypatch):
    """The warm-up threads run cuBLAS, attention forward/backward, Triton's set-up and the kernels
    compiled ahead, leave the CPU and CUDA random states as they were, and leave Triton's cache key
    computed."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from qlora.lean_imports import warm_up_cuda
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # no stamp of an earlier compile-ahead
    torch.manual_seed(1)
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    warm = warm_up_cuda("cuda", 64, 256, dict(hidden=256, intermediate=688, vocab=1000, tokens=512))
    assert warm is not None
    assert warm.join(timeout=300)
    assert sorted(warm.done_at) == ["cuda", "triton"]
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), gpu)
    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        return
    assert triton_key.cache_info().currsize == 1
    assert warm.ahead == ["rms_norm", "swiglu", "rope", "dequantize_4bit", "xent_grad"]
