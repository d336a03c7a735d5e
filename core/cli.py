"""Command-line options generated from a step's frozen config dataclass, so a default lives in one place.

``add_config_arguments(parser, DenseMatchConfig)`` adds ``--cell-size`` etc. with the dataclass's defaults,
types and choices (``Literal``), and the comment written after each field as its help;
``config_from_args(args, DenseMatchConfig)`` builds the config back. A test walks every CLI and checks that
each option's default equals the API's (``tests/test_cli_defaults.py``).

Rules, chosen to keep the generated options what users already type:

* a field ``cell_size`` is ``--cell-size`` (``prefix`` for nested configs: ``--align-window``);
* ``bool`` fields are ``--name / --no-name``; ``Literal`` fields list their choices;
* ``tuple[int, ...]`` fields take one or more values; ``X | None`` fields take an ``X`` (default None);
* nested dataclass fields and fields named in ``exclude`` are left to the caller.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

Config = TypeVar("Config")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment on its line}`` from the class source (empty where the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    source = inspect.cleandoc("\n" + source) if source.startswith((" ", "\t")) else source
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens}
    own_line = {t.start[0]: comments[t.start[0]] for t in tokens if t.line.strip().startswith("#:")}
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment = comments.get(node.end_lineno) or comments.get(node.lineno)
            if not comment:  # a block of "#:" lines right above the field
                above, line = [], node.lineno - 1
                while line in own_line:
                    above.insert(0, own_line[line].lstrip(":").strip())
                    line -= 1
                comment = " ".join(above)
            if comment:
                found[node.target.id] = comment
    return found


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (kind, False)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


def _parse_optional(kind: type) -> Any:
    """A converter for ``X | None`` options: the word ``none`` is None, anything else an ``X``."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def option_name(field: str, prefix: str = "") -> str:
    """The command-line spelling of a config field: ``cell_size`` -> ``--cell-size``."""
    return "--" + (prefix + field).replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    exclude: Iterable[str] = (),
    defaults: Any = None,
    helps: dict[str, str] | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """Add one option per field of the dataclass ``cls`` (see the module docstring for the rules).

    ``defaults`` is an instance whose values replace the class defaults (a recipe's own preset);
    ``helps`` adds or replaces help texts by field name; ``aliases`` gives a field a second spelling
    (one users already type, e.g. ``{"warmup_steps": "--warmup"}``).
    """
    hints = typing.get_type_hints(cls)
    comments = {**field_comments(cls), **(helps or {})}
    exclude, aliases = set(exclude), aliases or {}
    unknown = sorted(set(aliases) - {field.name for field in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)} to alias")
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.init:
            continue
        kind, optional = _unwrap_optional(hints[field.name])
        if dataclasses.is_dataclass(kind):
            continue
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        kwargs: dict[str, Any] = {"default": default, "dest": prefix + field.name}
        help_text = comments.get(field.name, field.metadata.get("help", ""))
        origin = typing.get_origin(kind)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = typing.get_args(kind)
            kwargs.update(choices=choices, type=type(choices[0]))
        elif origin is tuple:
            item, item_optional = _unwrap_optional(typing.get_args(kind)[0])
            kwargs.update(nargs="+", type=_parse_optional(item) if item_optional else item)
        elif kind in (int, float, str, Path):
            kwargs["type"] = _parse_optional(kind) if optional else kind
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no command-line form for {kind!r}")
        names = [option_name(field.name, prefix)] + ([aliases[field.name]] if field.name in aliases else [])
        action = parser.add_argument(*names, help=help_text or None, **kwargs)
        action.config_field = (cls, field.name)  # where the option came from, for tests and tools


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"config field {field.name} has no default; a CLI option needs one")


def config_from_args(
    args: argparse.Namespace, cls: type[Config], *, prefix: str = "", base: Any = None, **extra: Any
) -> Config:
    """The config of class ``cls`` that the parsed ``args`` describe (``base`` supplies nested/excluded fields)."""
    values = {}
    for field in dataclasses.fields(cls):
        dest = prefix + field.name
        if field.init and hasattr(args, dest):
            value = getattr(args, dest)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    values.update(extra)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def config_from_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type[Config], *, base: Any = None, **extra: Any
) -> Config:
    """Like :func:`config_from_args`, but read only the options generated for ``cls`` on ``parser``: a command line
    that composes several configs may hold another config's option under a field name of ``cls``."""
    values = {
        field: tuple(value) if isinstance(value, list) else value
        for dest, (owner, field) in generated_options(parser).items()
        if owner is cls
        for value in [getattr(args, dest)]
    }
    values.update(extra)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def generated_options(parser: argparse.ArgumentParser) -> dict[str, tuple[type, str]]:
    """``{dest: (config class, field)}`` for every option :func:`add_config_arguments` added to ``parser``."""
    return {a.dest: a.config_field for a in parser._actions if hasattr(a, "config_field")}
