"""Dataclass configurations, validated on construction and serialisable to JSON."""

from __future__ import annotations
from robustify.core.errors import UserError

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["TAG_KEYS", "SerializableConfig", "format_eps", "parse_eps", "untagged"]


#: the keys :meth:`SerializableConfig.to_dict` adds to the fields; identities (settings ids,
#: journal headers, budgets compared between results) leave them out, as dicts written before them had none
TAG_KEYS = ("_type", "_version")


def untagged(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the ``_type``/``_version`` tags: the settings alone."""
    return {k: v for k, v in data.items() if k not in TAG_KEYS}


class SerializableConfig:
    """``to_dict``/``from_dict`` for dataclass configs (torchao-style ``_type``/``_version``).

    ``to_dict``: tuples become lists, mappings dicts and nested configs their own tagged dicts.
    ``from_dict`` refuses another ``VERSION``, ignores unknown keys, accepts a dict written
    without the tags (older files), and restores each field from its annotation: tuples from
    lists, nested configs from their dicts.
    """

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, SerializableConfig):
                d[f.name] = value.to_dict()
            elif isinstance(value, tuple):
                d[f.name] = list(d[f.name])
            elif isinstance(value, Mapping):
                d[f.name] = dict(d[f.name])
        return {"_type": type(self).__name__, "_version": self.VERSION, **d}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        version = data.get("_version", cls.VERSION)
        if version != cls.VERSION:
            raise UserError(f"{cls.__name__} version {version} is not supported (expected {cls.VERSION})")
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _restore(hints[f.name], data[f.name])
                      for f in fields(cls) if f.name in data})  # type: ignore[arg-type]


def _restore(annotation: Any, value: Any) -> Any:
    """``value`` read from JSON as the field type ``annotation`` wants it (tuple, nested config)."""
    if value is None:
        return None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _restore(options[0], value) if len(options) == 1 else value
    if isinstance(annotation, type) and issubclass(annotation, SerializableConfig) and isinstance(value, Mapping):
        return annotation.from_dict(value)
    if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def parse_eps(value: str | float) -> float:
    """Parse an epsilon given as a float (0.031) or a fraction ("8/255").

    Args:
        value: a float, or text: a number (``"0.031"``) or a fraction (``"8/255"``).

    Returns:
        The epsilon as a float.

    Raises:
        UserError: the text is neither a number nor a fraction.

    Examples:
        >>> rb.parse_eps("8/255")
        0.03137254901960784
        >>> rb.parse_eps(0.5)
        0.5
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"eps must be a number or a fraction like '8/255', got {value!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise UserError(f"eps must be a finite number > 0, got {value!r}")
    return eps


def format_eps(eps: float, norm: str = "Linf") -> str:
    """``eps`` as text that :func:`parse_eps` reads back: "8/255" for Linf multiples of 1/255, else
    the number ("0.5", "1.0", "12.0": an L2/L1 radius is never written in 255ths)."""
    k = eps * 255
    if norm == "Linf" and k >= 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    text = f"{eps:g}"
    return text if any(c in text for c in ".en") else f"{text}.0"
