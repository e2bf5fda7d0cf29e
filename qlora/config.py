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


COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")  # --compute-dtype of every command that runs a model (qlora.hardware)


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
    except UnicodeDecodeError:
        raise QLoraError(f"{p}: not a text file (a YAML file of option: value lines was expected)") from None
    except yaml.YAMLError as e:
        raise QLoraError(f"{p}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise QLoraError(f"{p}: expected a mapping of option: value")
    return data


def build_config(cls, yaml_path=None, cli: argparse.Namespace | dict | None = None, **overrides):
    """defaults < YAML < CLI flags (those not None) < overrides; unknown YAML keys are errors."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    from_file: set = set()  # keys whose value the YAML file gave (errors name the file)
    if yaml_path:
        data = load_yaml(yaml_path)
        unknown = sorted(k for k in data if k.replace("-", "_") not in names)
        if unknown:
            raise QLoraError(f"{yaml_path}: unknown option(s) {', '.join(unknown)}")
        values.update({k.replace("-", "_"): v for k, v in data.items()})
        from_file = set(values)
    if cli is not None:
        items = vars(cli).items() if isinstance(cli, argparse.Namespace) else cli.items()
        given = {k: v for k, v in items if k in names and v is not None}
        values.update(given)
        from_file -= set(given)
    values.update(overrides)
    from_file -= set(overrides)
    out = {}
    for k, v in values.items():
        tp = _base_type(names[k].type)
        choices = names[k].metadata.get("choices")
        where = f"{yaml_path}: option {k}" if k in from_file else f"option {k}"
        try:
            if tp is int and isinstance(v, float) and not v.is_integer():
                raise ValueError  # int(2.9) would be 2: a flag refuses it, so does the file
            if v is not None and tp in (int, float) and not isinstance(v, bool):
                v = tp(v)
            elif v is not None and tp is bool and not isinstance(v, bool):
                v = _parse_bool(v)
            elif isinstance(v, bool) and tp is str and choices and str(v).lower() in choices:
                v = str(v).lower()  # `share_prompt: true` in YAML: the option's "true"
            elif v is not None and tp is str and not isinstance(v, str) \
                    and not (names[k].metadata.get("or_number") and is_number(v)):
                raise TypeError  # `data: {a: 1}`, `output: 123`: a path or a name is a string
        except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError):
            raise QLoraError(f"{where}: expected {tp.__name__}, got {v!r}") from None
        if choices and v is not None and v not in choices:
            raise QLoraError(f"option {k}: {v!r} is not one of {', '.join(map(str, choices))}")
        out[k] = v
    return cls(**out)


def to_yaml(cfg) -> str:
    import yaml
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
