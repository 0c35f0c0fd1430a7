"""Command-line flags made from config dataclass fields, so that each setting has one default and one help text.

A :class:`ConfigFlags` names the fields of a config class that a command exposes. :meth:`ConfigFlags.add`
adds one ``--field-name`` flag per field: its kind from the field's annotation (``bool``:
``--x/--no-x``; ``tuple[str, ...]``: repeatable; ``tuple[int, ...]``: several values; ``int``,
``float``, ``str`` and their ``| None``), its default from the dataclass (or from a default instance or
mapping the command passes), its help from the class docstring's ``Attributes:`` section.
:meth:`ConfigFlags.values` reads the parsed values back as keyword arguments of the config.

Fields whose text needs the library's own parser (``8/255``, ``site=0.1,...``, comma lists) name it
in ``parse``: the text is converted after parsing, so a bad value gets the library's one-line error.
"""

from __future__ import annotations
from robustify.core.errors import UserError

import argparse
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["ConfigFlags", "comma_list", "field_default", "field_help", "field_names"]

#: set on every generated action: ``(config class, field name)``
CONFIG_FIELD = "config_field"


def comma_list(text: str) -> tuple[str, ...]:
    """``"a,b, c"`` as ``("a", "b", "c")`` (empty items dropped)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


@functools.lru_cache(maxsize=None)
def _docstring_helps(cls: type) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` section of ``cls``'s docstring (``a, b: text`` sets both)."""
    helps: dict[str, str] = {}
    lines = (cls.__doc__ or "").expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return helps
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            if names:
                break
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        entry = re.match(r"([\w, ]+):\s(.*)", line.strip()) if depth == indent else None
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for name in names:
                helps[name] = entry.group(2).strip()
        else:
            for name in names:
                helps[name] += " " + line.strip()
    return helps


def _plain(text: str) -> str:
    """reST markup as plain text for ``--help`` (``x``, :func:`x`, `x` -> x), ``%`` escaped for argparse."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"`([^`]*)`", r"\1", text).replace("%", "%%")


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name``: its entry in the docstring of ``cls`` (empty if it has none)."""
    return _plain(_docstring_helps(cls).get(name, ""))


def field_names(cls: type, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The fields of the dataclass ``cls``, less ``exclude``."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def field_default(cls: type, name: str) -> Any:
    """The dataclass default of field ``name`` of ``cls`` (``dataclasses.MISSING`` if it has none)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else str
    return annotation


class _Repeatable(argparse.Action):
    """``append`` whose first use replaces the default instead of adding to it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or current is None else list(current)
        setattr(namespace, self.dest, [*items, values])


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
    """The flags of ``fields`` of the dataclass ``config``.

    Attributes:
        config: the config class.
        fields: its fields that get a flag.
        prefix: prepended to the flag names and their ``args`` attributes (``"audit-"``).
        names: flag names (without ``--``) of fields not called ``prefix + field``.
        parse: field -> converter of the flag's text (applied by :meth:`values`).
        choices: field -> allowed values.
    """

    config: type
    fields: tuple[str, ...]
    prefix: str = ""
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    parse: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)
    choices: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(self.fields) - known)
        if unknown:
            raise UserError(f"{self.config.__name__} has no field(s) {unknown}")

    def flag(self, name: str) -> str:
        return "--" + self.names.get(name, self.prefix + name.replace("_", "-"))

    def dest(self, name: str) -> str:
        return self.flag(name)[2:].replace("-", "_")

    def default(self, name: str, defaults: Any = None) -> Any:
        """The default of ``name``: from ``defaults`` (a mapping or a config instance) if it has it,
        else the dataclass's."""
        if isinstance(defaults, Mapping) and name in defaults:
            return defaults[name]
        if dataclasses.is_dataclass(defaults) and not isinstance(defaults, Mapping):
            return getattr(defaults, name)
        return field_default(self.config, name)

    def add(self, parser: Any, defaults: Any = None, *, required: Sequence[str] = ()) -> None:
        """Add the flags to ``parser`` (or an argument group); ``required`` fields get no default."""
        hints = typing.get_type_hints(self.config)
        for name in self.fields:
            kwargs = self._kind(name, _without_none(hints[name]))
            text = field_help(self.config, name)
            if name in required:
                kwargs.update(required=True)
            else:
                default = self.default(name, defaults)
                kwargs.update(default=default)
                if "default" not in text and default not in (None, (), {}):
                    text += " (default: %(default)s)"
            if kwargs.get("action") is _Repeatable:
                text += " (repeatable)"
            if name in self.choices:
                kwargs.update(choices=list(self.choices[name]))
            action = parser.add_argument(self.flag(name), dest=self.dest(name), help=text, **kwargs)
            setattr(action, CONFIG_FIELD, (self.config, name))

    def _kind(self, name: str, annotation: Any) -> dict[str, Any]:
        if name in self.parse:
            return {"type": str}
        if annotation is bool:
            return {"action": argparse.BooleanOptionalAction}
        if typing.get_origin(annotation) is tuple:
            element = typing.get_args(annotation)[0]
            if element is str:
                return {"action": _Repeatable}
            return {"nargs": "*", "type": element}
        if annotation in (int, float, str):
            return {"type": annotation}
        raise TypeError(f"{self.config.__name__}.{name}: no flag kind for {annotation!r}; give a parser in 'parse'")

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The parsed flags as keyword arguments of the config (texts converted by ``parse``)."""
        values = {}
        for name in self.fields:
            value = getattr(args, self.dest(name))
            if isinstance(value, str) and name in self.parse:
                value = self.parse[name](value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return values
