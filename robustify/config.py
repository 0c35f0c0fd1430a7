"""Dataclass configurations, validated on construction and serialisable to JSON."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["TAG_KEYS", "MeanSparseConfig", "SerializableConfig", "check_alpha", "format_eps", "parse_eps",
           "parse_site_alpha", "untagged"]


def check_alpha(value: Any, what: str = "alpha") -> float:
    """``value`` as a float if it is a finite number >= 0, else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_site_alpha(text: str) -> dict[str, float]:
    """Parse per-site thresholds written ``"site=0.1,other.site=0.25"``."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"per-site alpha must look like 'site=0.1', got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"alpha of site {name.strip()!r} is not a number: {value!r}") from None
        result[name.strip()] = check_alpha(number, f"alpha of site {name.strip()!r}")
    return result


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
            raise ValueError(f"{cls.__name__} version {version} is not supported (expected {cls.VERSION})")
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


@dataclass(frozen=True)
class MeanSparseConfig(SerializableConfig):
    """Where to insert MeanSparse and how to calibrate it.

    Attributes:
        alpha: threshold in standard deviations; 0 is the identity. Changing it later
            (:func:`robustify.set_alpha`) never needs recalibration.
        include: glob patterns of site names to use (default: all).
        exclude: glob patterns of site names to skip.
        outputs: glob patterns (``fnmatch``, ``*`` crosses dots) of module names whose *output*
            gets a MeanSparse site (e.g. ``layer.*.block.?`` for residual blocks), in addition
            to the activation sites; a pattern that matches no module is an error.
        skip_se: skip activations inside squeeze-and-excitation blocks (as the paper does).
        site_alpha: per-site thresholds overriding ``alpha`` (site name -> alpha); naming a
            site the plan does not select is an error at insertion.
        preset: placement preset, see :data:`robustify.sites.PRESETS`; ``"published"``
            reproduces the published MeanSparse models' placement (see :mod:`robustify.published`).
        channel_dim: force the channel axis of every site (default: inferred per site).
        stats_mode: "exact" (merged float64 moments) or "official" (the published code's
            average of per-batch statistics, for reproduction only; they depend on the batch
            size, by default the published 512: see :meth:`calibration_batch_size`).
    """

    VERSION: ClassVar[int] = 1
    #: calibration batch size by default; "exact" statistics do not depend on it
    CALIB_BATCH_SIZE: ClassVar[int] = 256
    #: the published calibration's ``DataLoader(batch_size=512)``, the default of "official" statistics
    OFFICIAL_CALIB_BATCH_SIZE: ClassVar[int] = 512
    alpha: float = 0.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    skip_se: bool = True
    preset: str = "all"
    channel_dim: int | None = None
    stats_mode: str = "exact"
    site_alpha: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.stats_mode not in ("exact", "official"):
            raise ValueError(f"stats_mode must be 'exact' or 'official', got {self.stats_mode!r}")
        for name in ("include", "exclude", "outputs"):
            patterns = getattr(self, name)
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(f"{name} must be a sequence of glob patterns, got {patterns!r}")
            object.__setattr__(self, name, tuple(patterns))
        if self.channel_dim is not None and (isinstance(self.channel_dim, bool) or not isinstance(self.channel_dim, int)):
            raise TypeError(f"channel_dim must be an integer or None, got {self.channel_dim!r}")
        if not isinstance(self.site_alpha, Mapping):
            raise TypeError(f"site_alpha must map site names to alphas, got {self.site_alpha!r}")
        object.__setattr__(
            self, "site_alpha", {str(k): check_alpha(v, f"alpha of site {k!r}") for k, v in self.site_alpha.items()}
        )

    def calibration_batch_size(self, requested: int | None = None) -> int:
        """The calibration batch size: ``requested`` if given, else the default of the stats mode."""
        if requested is not None:
            if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
                raise ValueError(f"the calibration batch size must be a positive integer, got {requested!r}")
            return requested
        return self.OFFICIAL_CALIB_BATCH_SIZE if self.stats_mode == "official" else self.CALIB_BATCH_SIZE

    def alpha_of(self, site: str) -> float:
        """The threshold of ``site``: its ``site_alpha`` entry, else ``alpha``."""
        return self.site_alpha.get(site, self.alpha)



def parse_eps(value: str | float) -> float:
    """Parse an epsilon given as a float (0.031) or a fraction ("8/255")."""
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
            raise ValueError(f"eps must be a number or a fraction like '8/255', got {value!r}") from None
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {value!r}")
    return eps


def format_eps(eps: float, norm: str = "Linf") -> str:
    """``eps`` as text that :func:`parse_eps` reads back: "8/255" for Linf multiples of 1/255, else
    the number ("0.5", "1.0", "12.0": an L2/L1 radius is never written in 255ths)."""
    k = eps * 255
    if norm == "Linf" and k >= 1 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    text = f"{eps:g}"
    return text if any(c in text for c in ".en") else f"{text}.0"
