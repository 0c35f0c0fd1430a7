"""MeanSparse's config: where to insert it and how to calibrate it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from robustify.core.config import SerializableConfig
from robustify.core.errors import UserError

__all__ = ["MeanSparseConfig", "check_alpha", "parse_site_alpha"]


def check_alpha(value: Any, what: str = "alpha") -> float:
    """``value`` as a float if it is a finite number >= 0, else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_site_alpha(text: str) -> dict[str, float]:
    """Parse per-site thresholds written ``"site=0.1,other.site=0.25"``."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.rpartition("=")
        if not sep or not name.strip():
            raise UserError(f"per-site alpha must look like 'site=0.1', got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"alpha of site {name.strip()!r} is not a number: {value!r}") from None
        result[name.strip()] = check_alpha(number, f"alpha of site {name.strip()!r}")
    return result



@dataclass(frozen=True)
class MeanSparseConfig(SerializableConfig):
    """Where to insert MeanSparse and how to calibrate it.

    Attributes:
        alpha: threshold in standard deviations; 0 is the identity. Changing it later
            (:func:`robustify.defenses.meansparse.set_alpha`) never needs recalibration.
        include: glob patterns of site names to use (default: all).
        exclude: glob patterns of site names to skip.
        outputs: glob patterns (``fnmatch``, ``*`` crosses dots) of module names whose *output*
            gets a MeanSparse site (e.g. ``layer.*.block.?`` for residual blocks), in addition
            to the activation sites; a pattern that matches no module is an error.
        skip_se: skip activations inside squeeze-and-excitation blocks (as the paper does).
        site_alpha: per-site thresholds overriding ``alpha`` (site name -> alpha); naming a
            site the plan does not select is an error at insertion.
        preset: placement preset, see :data:`robustify.defenses.sites.PRESETS`; ``"published"``
            reproduces the published MeanSparse models' placement (see :mod:`robustify.defenses.meansparse.published`).
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
            raise UserError(f"stats_mode must be 'exact' or 'official', got {self.stats_mode!r}")
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
                raise UserError(f"the calibration batch size must be a positive integer, got {requested!r}")
            return requested
        return self.OFFICIAL_CALIB_BATCH_SIZE if self.stats_mode == "official" else self.CALIB_BATCH_SIZE

    def alpha_of(self, site: str) -> float:
        """The threshold of ``site``: its ``site_alpha`` entry, else ``alpha``."""
        return self.site_alpha.get(site, self.alpha)
