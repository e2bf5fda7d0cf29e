"""The README stays true: its set-up targets exist, every `qlora ...` command it shows parses with
the real CLI, and the demo it describes runs (a short version of it)."""
import re
import shlex
from pathlib import Path

import pytest

from qlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_setup_commands_are_make_targets():
    block = README.split("## Set up and run", 1)[1].split("```")[1]
    cmds = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert cmds == ["make demo", "make test"]
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_shown_command_parses():
    parser = build_parser()
    shown = re.findall(r"^\.venv/bin/qlora (.+?)(?:\s+#.*)?$", README, re.M)
    assert len(shown) >= 7
    for line in shown:
        args = parser.parse_args(shlex.split(line))
        assert callable(args.func), line


@pytest.mark.slow
def test_demo_runs_end_to_end_short(tmp_path):
    from qlora.demo import run_demo
    lines = []
    r = run_demo(tmp_path / "demo", epochs=0.25, progress=False, log=lines.append)
    text = "\n".join(lines)
    for part in ("[1/4] loading", "accuracy before", "[3/4] fine-tuning", "held-out accuracy:", "try it: qlora generate"):
        assert part in text
    assert 0.0 <= r["accuracy_before"] <= 0.1  # the base model cannot know the made-up facts
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
