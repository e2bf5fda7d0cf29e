"""qlora.lean_imports: the qlora command hides torchvision, sklearn and scipy from transformers (start-up time)."""
import os
import subprocess
import sys
from pathlib import Path

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
