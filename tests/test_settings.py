"""qlora.settings: the QLORA_* switches read once from the environment into one object."""
import re
from pathlib import Path

import pytest

from qlora import settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_spellings():
    s = settings.read({})
    assert (s.kernels, s.warmup, s.keep_imports, s.debug) == (True, True, False, False)
    for off in ("0", "false", "No", " OFF "):
        assert settings.read({"QLORA_KERNELS": off}).kernels is False
    for on in ("1", "true", "Yes", "on"):
        assert settings.read({"QLORA_KEEP_IMPORTS": on}).keep_imports is True
    assert settings.read({"QLORA_KERNELS": "maybe"}).kernels is True  # anything else: the default
    assert settings.read({"QLORA_DEBUG": "anything"}).debug is True  # any value turns the traceback on


def test_read_once_until_refresh(monkeypatch):
    monkeypatch.setenv("QLORA_WARMUP", "0")
    assert settings.refresh().warmup is False
    monkeypatch.setenv("QLORA_WARMUP", "1")
    assert settings.switches().warmup is False  # not read again
    assert settings.refresh().warmup is True and settings.switches().warmup is True


def test_switches_are_frozen():
    with pytest.raises(AttributeError):
        settings.switches().kernels = False


def test_every_variable_the_code_names_is_a_switch():
    """Each QLORA_* name in qlora/ is one of the switches, and each switch is documented in the docs or README."""
    named = set()
    for p in (ROOT / "qlora").rglob("*.py"):
        named |= set(re.findall(r"QLORA_[A-Z_]+[A-Z]", p.read_text()))
    known = settings.variables()
    assert named <= set(known), named - set(known)
    docs = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert not [v for v in known if v not in docs], [v for v in known if v not in docs]
