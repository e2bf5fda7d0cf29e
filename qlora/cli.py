"""`qlora` command line. Each subcommand lives in the module that does the work, which
exposes ``add_cli(subparsers)`` (registering its parser with ``set_defaults(func=...)``);
this file only dispatches, turns :class:`QLoraError` into a one-line message, and keeps
start-up fast by importing torch/transformers only inside the chosen command."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import QLoraError
from .settings import switches

# subcommand -> module that implements it (in help order)
COMMANDS = {
    "demo": "qlora.demo",
    "quantize": "qlora.quantize",
    "train": "qlora.train",
    "eval": "qlora.evaluate",
    "generate": "qlora.generate",
    "chat": "qlora.generate",
    "merge": "qlora.adapters",
    "export": "qlora.gguf_export",
    "plan": "qlora.plan",
    "report": "qlora.report",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora",
        description="Fine-tune LLMs with QLoRA: a frozen 4-bit NF4 base with double quantization, "
                    "trainable LoRA adapters, paged optimizers.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name, mod in COMMANDS.items():
        if mod in seen:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # command not built yet
                continue
            raise
        seen.add(mod)
        module.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from .lean_imports import fast_start
    fast_start()  # cached bytecode where Python keeps none; packages a text fine-tune never uses hidden
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except QLoraError as e:
        print(f"qlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"qlora {args.command}: error: out of CPU memory", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: keep the traceback when asked
        from .outdir import SPACE_ERRORS, write_error
        err = write_error(e, getattr(e, "filename", None) or "a file", codes=SPACE_ERRORS)
        if err is not None:  # a full disk or read-only folder where no command-specific check caught it
            print(f"qlora {args.command}: error: {err}", file=sys.stderr)
            return 2
        if switches().debug:
            raise
        print(f"qlora {args.command}: internal error: {type(e).__name__}: {e}\n"
              f"(set QLORA_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
