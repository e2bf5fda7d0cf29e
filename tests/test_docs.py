"""The docs match the parsers: every `--flag` a page mentions is accepted by the command it belongs to,
and every flag of every command is described on that command's page(s).

Rules (the parsers are the real ones, from qlora.cli.build_parser):

* Pages and their commands: docs/train.md, data.md, optim.md, preference.md, multi-gpu.md -> train; docs/report.md -> report (and train); docs/generate.md -> generate,
  chat, eval; docs/merge.md -> merge; docs/export.md -> export; docs/quantize.md -> quantize;
  docs/memory.md -> plan (and train, whose memory options it explains); README.md -> every command.
* A flag written after ``qlora CMD`` on the same line (a command line, in a code block or inline) must
  be accepted by CMD's parser.
* Any other ``--flag`` on a page must be accepted by one of the page's commands, or by a benchmark
  script the page names (``bench/X.py``: its ``add_argument("--flag"`` calls), or be torchrun's
  ``--nproc-per-node``.
* Every flag a command's ``--help`` shows (hidden ``--no-X`` aliases of boolean options excepted) appears
  on one of its pages; the ``demo`` command is documented in README.md.
"""
import argparse
import re
from pathlib import Path

import pytest

from qlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"docs/train.md": ["train"], "docs/data.md": ["train"], "docs/optim.md": ["train"],
         "docs/preference.md": ["train"],
         "docs/generate.md": ["generate", "chat", "eval"], "docs/merge.md": ["merge"],
         "docs/export.md": ["export"], "docs/quantize.md": ["quantize"], "docs/memory.md": ["plan", "train"],
         "docs/report.md": ["report", "train"],
         "docs/hub.md": ["train", "generate", "chat", "eval", "merge", "export", "quantize", "plan"],
         "docs/multi-gpu.md": ["train"],
         "README.md": None}  # None: every command
# torchrun's, named where `qlora train --gpus` is explained; Slurm's sbatch options and torchrun's
# rendezvous backend, in docs/multi-gpu.md's cluster examples; llama.cpp's --lora in docs/export.md
OTHER_TOOLS = {"--nproc-per-node", "--rdzv-backend", "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node",
               "--cpus-per-task", "--lora"}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _subparsers()
ACCEPTED = {c: {o for a in sp._actions for o in a.option_strings} for c, sp in COMMANDS.items()}
SHOWN = {c: sorted(o for a in sp._actions if a.help != argparse.SUPPRESS for o in a.option_strings
                   if o.startswith("--") and o != "--help") for c, sp in COMMANDS.items()}
COMMAND_LINE = re.compile(r"qlora (%s)\b([^`\n]*)" % "|".join(sorted(COMMANDS, key=len, reverse=True)))


def _bench_flags(text: str) -> set[str]:
    flags = set()
    for script in set(re.findall(r"bench/(\w+)\.py", text)):
        path = ROOT / "bench" / f"{script}.py"
        if path.is_file():
            flags |= set(re.findall(r"""add_argument\(\s*["'](--[a-z0-9-]+)""", path.read_text()))
    return flags


def _pages_of(command: str) -> list[str]:
    own = [p for p, cmds in PAGES.items() if cmds and command in cmds]
    return own or ["README.md"]


def test_every_page_exists_and_every_command_has_one():
    assert all((ROOT / p).is_file() for p in PAGES)
    assert set(COMMANDS) == {"demo", "quantize", "train", "eval", "generate", "chat", "merge", "export", "plan", "report"}


@pytest.mark.parametrize("page", list(PAGES))
def test_flags_a_page_mentions_are_accepted(page):
    text = (ROOT / page).read_text()
    commands = PAGES[page] or list(COMMANDS)
    bad = []
    for m in COMMAND_LINE.finditer(text):
        bad += [f"`qlora {m.group(1)} ... {f}`" for f in FLAG.findall(m.group(2)) if f not in ACCEPTED[m.group(1)]]
    allowed = set().union(*(ACCEPTED[c] for c in commands)) | _bench_flags(text) | OTHER_TOOLS
    prose = COMMAND_LINE.sub("", text)
    bad += sorted({f for f in FLAG.findall(prose) if f not in allowed})
    assert not bad, f"{page} mentions flags that {', '.join(commands)} do not accept: {bad}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_of_a_command_is_documented(command):
    pages = _pages_of(command)
    text = "".join((ROOT / p).read_text() for p in pages)
    missing = [f for f in SHOWN[command] if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", text)]
    assert not missing, f"`qlora {command}` flags not described in {', '.join(pages)}: {missing}"


def test_the_rules_catch_drift():
    """The check itself: a flag no parser has is reported, on a command line and in prose."""
    fake = "Run `qlora train --data x --no-such-flag` or pass --another-missing-one."
    cmd_flags = [f for m in COMMAND_LINE.finditer(fake) for f in FLAG.findall(m.group(2))]
    assert "--no-such-flag" in cmd_flags and "--no-such-flag" not in ACCEPTED["train"]
    assert "--another-missing-one" in FLAG.findall(COMMAND_LINE.sub("", fake))
