"""A command's settings dataclass (:mod:`palr.core.settings`) as typer flags: one option per field, ``--config
FILE``, then the settings built by :func:`palr.core.options.build` and checked (``--param`` by the retriever's
types) before the command's body runs."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from palr.core.errors import ConfigError
from palr.core.options import MISSING, build, options, to_plain
from palr.retrieval.base import check_settings


# ---------------------------------------------------------------------------- typer glue
def _metavar(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        return _metavar(next(a for a in args if a is not type(None)))
    if origin is Literal:
        return "|".join(str(a) for a in args if a != "")
    if origin is dict:
        return "KEY=VALUE"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return ",".join(_metavar(a) for a in args)
    if origin in (list, tuple):
        return "A,B,..."
    return {int: "INT", float: "FLOAT", Path: "PATH", str: "TEXT"}.get(t, "TEXT")


def _shown(value: Any) -> str:
    v = to_plain(value)
    return ",".join(str(x) for x in v) if isinstance(v, list) else str(v)


def _is_bool(t: Any) -> bool:
    return t is bool or (typing.get_origin(t) in (types.UnionType, typing.Union) and bool in typing.get_args(t)
                         and len(typing.get_args(t)) == 2)


def _repeatable(t: Any) -> bool:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        return any(_repeatable(a) for a in args if a is not type(None))
    return origin is dict or origin is list or (origin is tuple and (not args or args[-1] is Ellipsis))


def typer_command(app: Any, name: str, cls: type, body: Callable[[Any], None], *, help: str | None = None) -> None:
    """Register ``palr NAME``: flags from ``cls``'s fields (+ ``--config FILE``); ``body(config)`` runs it."""
    import inspect

    import typer

    opts = [o for o in options(cls) if o.cli]
    params = []
    for o in opts:
        if o.also_positional:
            many = _repeatable(o.type)
            params.append(inspect.Parameter(
                f"{o.name}__arg", inspect.Parameter.KEYWORD_ONLY, annotation=list[str] | None if many else str | None,
                default=typer.Argument(None, metavar=f"[{o.name.upper()}]", show_default=False,
                                       help=f"The same as {o.flag}" + (" (repeatable)" if many else
                                                                        " (the form torchrun/accelerate launch pass "
                                                                        "through)") + ".")))
        shown = None if o.default in (MISSING, None, (), [], {}, "", False) else _shown(o.default)
        text = o.help + (f" (default: {shown})" if shown and o.default is not True else "")
        if o.argument:
            default = typer.Argument(... if o.default is MISSING else None, help=text, show_default=False,
                                     metavar=o.metavar or o.name.upper())
            ann: Any = list[str] if _repeatable(o.type) else str
            if o.default is not MISSING:
                ann = ann | None
        elif _is_bool(o.type):
            decls = o.flags
            if o.default is True and not any("/" in f for f in o.flags):  # an on-by-default switch: --no-X
                decls = (f"{o.flags[0]}/--no-{o.flags[0][2:]}", *o.flags[1:])
            default = typer.Option(None, *decls, help=text, show_default=False)
            ann = bool | None
        else:
            default = typer.Option(None, *o.flags, help=text, show_default=False,
                                   metavar=o.metavar or _metavar(o.type), envvar=o.envvar, show_envvar=bool(o.envvar))
            ann = list[str] | None if _repeatable(o.type) else str | None
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
    params.append(inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
        default=typer.Option(None, "--config", help="YAML, TOML or JSON file of option names to values "
                                                   "(flags override it).", metavar="FILE")))

    def command(**kwargs: Any) -> None:
        file = kwargs.pop("config_file")
        for o in opts:
            given = kwargs.pop(f"{o.name}__arg", None) if o.also_positional else None
            if given and _repeatable(o.type):  # positional values join the flag's: RUN RUN --run RUN
                kwargs[o.name] = [*given, *(kwargs.get(o.name) or [])]
            elif given is not None:
                if kwargs.get(o.name) is not None and Path(kwargs[o.name]) != Path(given):
                    raise ConfigError(f"two values for {o.flag}: {given} and {o.flag} {kwargs[o.name]}; give one")
                kwargs[o.name] = given
        body(check_settings(build(cls, kwargs, file, command=name)))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = help or body.__doc__ or cls.__doc__
    command.__name__ = body.__name__
    app.command(name)(command)
