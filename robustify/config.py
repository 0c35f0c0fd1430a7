"""Dataclass configurations, validated on construction and serialisable to JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

__all__ = ["MeanSparseConfig", "parse_eps"]


@dataclass(frozen=True)
class MeanSparseConfig:
    """Where to insert MeanSparse and how to calibrate it.

    Attributes:
        alpha: threshold in standard deviations; 0 is the identity. Changing it later
            (:func:`robustify.set_alpha`) never needs recalibration.
        include: glob patterns of site names to use (default: all).
        exclude: glob patterns of site names to skip.
        skip_se: skip activations inside squeeze-and-excitation blocks (as the paper does).
        preset: placement preset, see :data:`robustify.sites.PRESETS`.
        channel_dim: force the channel axis of every site (default: inferred per site).
        stats_mode: "exact" (merged float64 moments) or "official" (the published code's
            average of per-batch statistics, for reproduction only).
    """

    VERSION: ClassVar[int] = 1
    alpha: float = 0.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    skip_se: bool = True
    preset: str = "all"
    channel_dim: int | None = None
    stats_mode: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.stats_mode not in ("exact", "official"):
            raise ValueError(f"stats_mode must be 'exact' or 'official', got {self.stats_mode!r}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return {"_type": type(self).__name__, "_version": self.VERSION, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MeanSparseConfig":
        version = data.get("_version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version} is not supported (expected {cls.VERSION})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


