"""A command line built from a config dataclass's fields, one option per field (EDM's ``generate.py``;
nanoGPT's configurator), so a new field is one line in its dataclass: ``add_config_arguments`` adds the
options, ``config_from_args`` builds the config back from the parsed arguments. ``model.train``,
``model.distill``, ``model.evaluate`` and ``model.cas`` build theirs this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the source of ``cls`` and its bases (``name: type = default  # comment``)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        found = re.finditer(r"^ {4}(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE)
        comments.update({m.group(1): m.group(2).strip() for m in found})
    return comments


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def option(name: str, tp: Any, default: Any, help: str, choices: Iterable[str] | None) -> dict[str, Any]:
    """argparse's keywords for a field annotated ``tp``: ``X | None`` parses as X; ``tuple[X, ...]``
    takes any number of X (none: the empty tuple); ``bool`` is a ``--flag`` / ``--no-flag`` pair."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    kwargs: dict[str, Any] = {"default": default, "help": help.replace("%", "%%"), "metavar": tp.__name__.upper()}
    if tp is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction, "metavar": None}
    if typing.get_origin(tp) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{name}: only tuple[X, ...] fields have an option, not {tp}")
        return {**kwargs, "type": args[0], "nargs": "*", "default": list(default), "metavar": args[0].__name__.upper()}
    if tp not in (int, float, str):
        raise TypeError(f"{name}: no option for a field of type {tp}; pass it in skip")
    if choices:
        return {**kwargs, "type": tp, "choices": tuple(choices), "metavar": None}
    return {**kwargs, "type": tp}


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    choices: Mapping[str, Iterable[str]] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """One option per field of the dataclass ``cls`` (``--batch-size`` for ``batch_size``), its type
    from the annotation, its default the field's, its help the field's trailing comment. A field that
    is itself a config dataclass adds its own fields' options in a group. ``choices``: the names
    allowed for some str fields; ``skip``: fields (of ``cls`` or a nested config) with no option."""
    hints, comments, skip = typing.get_type_hints(cls), field_comments(cls), set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if is_config(tp):
            group = parser.add_argument_group(f"{f.name} ({tp.__name__})", comments.get(f.name))
            add_config_arguments(group, tp, choices, skip)
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        kwargs = option(f.name, tp, default, comments.get(f.name, ""), (choices or {}).get(f.name))
        parser.add_argument(flag(f.name), dest=f.name, required=required, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, skip: Iterable[str] = ()) -> Any:
    """The ``cls`` that ``add_config_arguments(parser, cls, ...)``'s options in ``args`` describe
    (a skipped field keeps its default; lists become the fields' tuples). ``skip``: fields that keep
    their defaults although ``args`` holds a value of that name (an option the caller reads itself)."""
    hints, values, skip = typing.get_type_hints(cls), {}, set(skip)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip:
            continue
        if is_config(tp):
            values[f.name] = config_from_args(tp, args, skip)
        elif hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
