"""Typed configuration: one dataclass field = one CLI flag (``--field-name``) = one YAML key
(``field_name``). Precedence: defaults < ``--config FILE.yaml`` < flags given on the command line.
Help text lives in each field's metadata, so ``--help`` lists every option with its default."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from .errors import QLoraError


def opt(default, help: str, choices=None, **kw):
    """A config field with help text (and optional choices)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, **kw))


def is_int(v) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, never a count or a size here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (it may be nan or infinite: callers check ranges)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, vars(typing))  # annotations are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(s: str) -> bool:
    v = str(s).lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None) -> None:
    """Add one flag per field of ``cls``; defaults are left as None so that we can tell which
    flags were given (they override the YAML file)."""
    made = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        group_name = f.metadata.get("group", "options")
        if group_name not in made:
            made[group_name] = parser.add_argument_group(group_name)
        g = made[group_name]
        tp = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            g.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, type=_parse_bool,
                           metavar="BOOL", help=help_)
            if f.name not in ("force",):
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                               help=argparse.SUPPRESS)
        else:
            g.add_argument(flag, dest=f.name, default=None, type=tp if tp in (int, float) else str,
                           choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"), help=help_)


def load_yaml(path) -> dict:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise QLoraError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise QLoraError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise QLoraError(f"{p}: expected a mapping of option: value")
    return data


def build_config(cls, yaml_path=None, cli: argparse.Namespace | dict | None = None, **overrides):
    """defaults < YAML < CLI flags (those not None) < overrides; unknown YAML keys are errors."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if yaml_path:
        data = load_yaml(yaml_path)
        unknown = sorted(k for k in data if k.replace("-", "_") not in names)
        if unknown:
            raise QLoraError(f"{yaml_path}: unknown option(s) {', '.join(unknown)}")
        values.update({k.replace("-", "_"): v for k, v in data.items()})
    if cli is not None:
        items = vars(cli).items() if isinstance(cli, argparse.Namespace) else cli.items()
        values.update({k: v for k, v in items if k in names and v is not None})
    values.update(overrides)
    out = {}
    for k, v in values.items():
        tp = _base_type(names[k].type)
        choices = names[k].metadata.get("choices")
        try:
            if v is not None and tp in (int, float) and not isinstance(v, bool):
                v = tp(v)
            elif v is not None and tp is bool and not isinstance(v, bool):
                v = _parse_bool(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise QLoraError(f"option {k}: expected {tp.__name__}, got {v!r}") from None
        if choices and v is not None and v not in choices:
            raise QLoraError(f"option {k}: {v!r} is not one of {', '.join(map(str, choices))}")
        out[k] = v
    return cls(**out)


def to_yaml(cfg) -> str:
    import yaml
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
