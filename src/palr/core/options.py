"""How a command's dataclass (:mod:`palr.core.settings`) becomes its ``--config FILE`` keys, its checked values and
its saved copy (the flags themselves: :mod:`palr.cli.flags`).

A dataclass field is one option. Its flat name (the field name; nested dataclasses are flattened, their
fields keep their own names, with the parent's ``prefix``) is the Python parameter, the config-file key and,
with ``-`` for ``_``, the flag. Values come, in order of precedence, from the flags the user typed, then the
config file, then the field default. Every conversion error is a :class:`ConfigError` naming the option and
what it expected; an unknown config key names the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from palr.core.errors import ConfigError

MISSING = dataclasses.MISSING


def opt(help: str, *flags: str, argument: bool = False, cli: bool = True, prefix: str = "",
        metavar: str | None = None, internal: bool = False, envvar: str | None = None,
        also_positional: bool = False) -> dict[str, Any]:
    """Field metadata: ``help`` text; ``flags`` replace the default ``--field-name`` (e.g. ``"-o", "--out"``);
    ``argument``: positional; ``cli=False``: config file only; ``prefix``: for a nested dataclass, put
    before its fields' flags and names (``mini_`` -> ``--mini-layers``); ``internal``: set by code, not an option;
    ``envvar``: an environment variable that gives the value when the flag is not typed; ``also_positional``: the
    value may also be given as the command's first argument (the form launchers such as torchrun pass through)."""
    return {"help": help, "flags": flags, "argument": argument, "cli": cli, "prefix": prefix, "metavar": metavar,
            "internal": internal, "envvar": envvar, "also_positional": also_positional}


@dataclasses.dataclass(frozen=True)
class Option:
    """One leaf field of a command's dataclass."""

    path: tuple[str, ...]  # attribute path from the command dataclass, e.g. ("data", "user_col")
    name: str  # flat name: config-file key and Python parameter, e.g. "user_col"
    flags: tuple[str, ...]
    type: Any
    default: Any  # MISSING when required
    help: str
    argument: bool
    cli: bool
    metavar: str | None
    envvar: str | None = None
    also_positional: bool = False

    @property
    def flag(self) -> str:
        long = [f for f in self.flags if f.startswith("--")]
        return (long or list(self.flags) or [self.name])[0].split("/")[0]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def options(cls: type, path: tuple[str, ...] = (), prefix: str = "") -> list[Option]:
    """The leaf options of a dataclass, nested dataclasses flattened (their ``prefix`` added)."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        t = hints[f.name]
        if meta.get("internal"):
            continue
        if dataclasses.is_dataclass(t):
            out += options(t, (*path, f.name), prefix + meta.get("prefix", ""))  # type: ignore[arg-type]
            continue
        name = prefix + f.name
        flags = tuple(meta.get("flags") or ())
        if prefix and flags:
            flags = tuple("--" + prefix.replace("_", "-") + x[2:] if x.startswith("--") else x for x in flags)
        if not flags:
            flags = ("--" + name.replace("_", "-"),)
        out.append(Option((*path, f.name), name, flags, t, _default(f), meta.get("help", ""),
                          bool(meta.get("argument")), meta.get("cli", True), meta.get("metavar"), meta.get("envvar"),
                          bool(meta.get("also_positional"))))
    names = [o.name for o in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TypeError(f"{cls.__name__}: option names used twice: {dup}")
    return out


# ---------------------------------------------------------------------------- values
def _describe(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " (or empty)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} comma-separated values ({', '.join(_describe(a) for a in args)})"
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "key=value pairs"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", Path: "a path"}.get(
        t, getattr(t, "__name__", str(t)))


def parse_params(pairs: list[str] | None) -> dict[str, object]:
    """``key=value`` strings -> dict with JSON-typed values (numbers, booleans, lists) where they parse."""
    out: dict[str, object] = {}
    for pair in pairs or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--param expects key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def convert(t: Any, value: Any, where: str) -> Any:
    """``value`` (a flag's text or a config file's typed value) as type ``t``; ConfigError otherwise."""
    origin, args = typing.get_origin(t), typing.get_args(t)

    def bad() -> ConfigError:
        shown = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
        return ConfigError(f"{where}: expected {_describe(t)}, got {shown!r}")

    if origin in (types.UnionType, typing.Union):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")
                             and str not in args):
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return convert(a, value, where)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if value in args:
            return value
        raise bad()
    if t is Any:
        return value
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise bad()
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad()
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad()
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if t is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value).expanduser()
        raise bad()
    if origin is dict:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            try:
                return parse_params(list(value))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        raise bad()
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        items: list[Any] = []
        for v in value:  # flags may be repeated and each may hold a comma-separated list
            items += [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else [v]
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(items) != len(args):
            raise bad()
        elem = list(args) if fixed else [args[0] if args else Any] * len(items)
        try:
            conv = [convert(a, v, where) for a, v in zip(elem, items)]
        except ConfigError:
            raise bad() from None
        return tuple(conv) if origin is tuple else conv
    if isinstance(t, type) and isinstance(value, t):
        return value
    raise bad()


def to_plain(value: Any) -> Any:
    """A value as JSON/YAML/TOML-friendly data (paths as text, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- files
def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json) mapping of option names to values."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix == ".toml":
            import tomllib

            doc: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            doc = json.loads(text) if text.strip() else {}
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: config files are .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - each parser has its own error type
        raise ConfigError(f"{path}: cannot parse ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(doc).__name__}")
    return doc


def unknown_key_error(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(valid))}")


# ---------------------------------------------------------------------------- building a config
def build(cls: type, flags: Mapping[str, Any] | None = None, file: Path | Mapping[str, Any] | None = None,
          command: str = "") -> Any:
    """The command's config: field defaults < ``file`` values < ``flags`` (only those given, i.e. not None)."""
    opts = options(cls)
    by_name = {o.name: o for o in opts}
    values: dict[str, Any] = {o.name: o.default for o in opts}
    if file is not None:
        where = str(file) if isinstance(file, Path) else "config"
        doc = read_config_file(file) if isinstance(file, Path) else dict(file)
        for key, value in doc.items():
            if str(key).startswith("_"):  # notes saved with a run (input fingerprints), not options
                continue
            name = str(key).replace("-", "_")
            if name not in by_name:
                raise unknown_key_error(str(key), list(by_name), f"{where}" + (f" (palr {command})" if command else ""))
            values[name] = convert(by_name[name].type, value, f"{where}: {key}")
    for name, value in (flags or {}).items():
        if value is None or (isinstance(value, (list, tuple)) and not value and by_name[name].default is not MISSING):
            continue
        o = by_name[name]
        values[name] = convert(o.type, value, o.flag)
    missing = [o for o in opts if values[o.name] is MISSING]
    if missing:
        o = missing[0]
        what = o.name.upper() if o.argument else o.flag
        raise ConfigError(f"missing {what} (a flag, or {o.name!r} in --config FILE)")
    return _instantiate(cls, (), values, opts)


def _instantiate(cls: type, path: tuple[str, ...], values: dict[str, Any], opts: list[Option]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        sub = (*path, f.name)
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _instantiate(hints[f.name], sub, values, opts)
        else:
            kwargs[f.name] = next(values[o.name] for o in opts if o.path == sub)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def flat(config: Any) -> dict[str, Any]:
    """The config as ``{option name: value}``: what ``--config`` reads back (saved in run directories)."""
    out: dict[str, Any] = {}
    for o in options(type(config)):
        v: Any = config
        for p in o.path:
            v = getattr(v, p)
        out[o.name] = to_plain(v)
    return out
