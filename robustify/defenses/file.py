"""One save format for every defense: the inserted state only, plus a JSON sidecar.

A defense file is a safetensors file holding only what the defense inserted (MeanSparse's
per-channel statistics, Sparta's parameters, a parametric activation's scalars; keys
``<site>.<tensor>``) and a sidecar ``<file>.json``::

    {"format": "robustify-defense", "format_version": 2, "robustify_version": "...",
     "defense": "meansparse", "config": {"_type": ..., "_version": ..., ...},
     "content_sha256": "...", "model": {...}, "sites": [{"name": ..., "channels": ...}, ...], ...}

``defense`` is the registered name (:mod:`robustify.defenses`), ``config`` the versioned
config dict (:class:`robustify.core.config.SerializableConfig`), ``content_sha256`` the digest of the
tensors (:func:`content_digest`), checked on every read so that a tensors file and a sidecar
from two different writes, or damaged tensors, are refused. Both files are written
atomically, the tensors first; the same state gives byte-identical files.

The formats written before this one still load: a defense registers its own earlier format
(:func:`register_legacy_format`; MeanSparse's calibrations, ``"robustify-meansparse"`` version 1, had the
digest but no ``defense``) and Sparta /
activation-swap files (``"robustify-defense"`` version 1, without a digest). :func:`read_sidecar`
returns their sidecars in today's shape.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from robustify._version import __version__
from robustify.core.errors import StateMismatchError, first_line
from robustify.core.io import atomic_path, write_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LEGACY_FORMATS",
    "register_legacy_format",
    "content_digest",
    "read_defense_file",
    "read_sidecar",
    "saved_defense",
    "sidecar_path",
    "write_defense_file",
]

FORMAT = "robustify-defense"
FORMAT_VERSION = 2
#: (format, version) pairs written by earlier robustify versions, read through :func:`_upgrade`
#: formats written before this one, (format, version) -> the defense they hold (a defense registers its own
#: with :func:`register_legacy_format`)
LEGACY_FORMATS: dict[tuple[str, int], str] = {}
LEGACY_DEFENSE = (FORMAT, 1)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of the defense file ``path``: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes and bytes), in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def write_defense_file(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    defense: str,
    config: Any,
    sites: list[dict[str, Any]],
    model_info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` and their sidecar (``config``: a :class:`SerializableConfig`).

    The tensors are copied (shared parameters become separate tensors, as safetensors
    requires); ``extra`` entries are added to the sidecar (e.g. ``training``, ``backbone``).
    """
    path = Path(path)
    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "robustify_version": __version__,
        "defense": defense,
        "config": config.to_dict(),
        "content_sha256": content_digest(data),
        "model": model_info or {},
        "sites": sites,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        # one metadata key only: safetensors writes its metadata map in no fixed order
        save_file(data, str(tmp), metadata={"format": FORMAT})
    write_json(sidecar_path(path), sidecar)
    return path


def register_legacy_format(name: str, version: int, defense: str) -> None:
    """Files of format ``name`` version ``version`` (written before the one format) hold ``defense``'s state."""
    LEGACY_FORMATS[(name, version)] = defense


def _upgrade(meta: dict[str, Any], side: Path) -> dict[str, Any]:
    """A sidecar of any readable format in today's shape (a one-line error for others)."""
    key = (meta.get("format"), meta.get("format_version"))
    if key in ((FORMAT, FORMAT_VERSION), LEGACY_DEFENSE):  # v1 defense files already name their defense
        return meta
    if key in LEGACY_FORMATS:
        return {**meta, "defense": LEGACY_FORMATS[key]}
    if meta.get("format") in (FORMAT, *(name for name, _ in LEGACY_FORMATS)):
        raise StateMismatchError(
            f"{str(side)!r} has format version {meta.get('format_version')}, expected {FORMAT_VERSION} "
            f"(or an earlier robustify format)"
        )
    raise StateMismatchError(f"{str(side)!r} is not a robustify defense sidecar")


def _check_entries(meta: dict[str, Any], side: Path) -> None:
    sites = meta.get("sites")
    if (
        not isinstance(meta.get("defense"), str)
        or not isinstance(meta.get("config"), dict)
        or not isinstance(sites, list)
        or not all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("channels"), int)
                   for s in sites)
    ):
        raise StateMismatchError(
            f"{str(side)!r} is damaged: its 'defense', 'config' or 'sites' entries are missing or malformed"
        )


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The checked sidecar of the defense file ``path`` (earlier formats upgraded)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise StateMismatchError(f"defense sidecar {str(side)!r} does not exist (it is written next to the tensors)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StateMismatchError(f"{str(side)!r} is not valid JSON (truncated or corrupted): {exc}") from exc
    if not isinstance(meta, dict):
        raise StateMismatchError(f"{str(side)!r} is not a robustify defense sidecar")
    meta = _upgrade(meta, side)
    _check_entries(meta, side)
    return meta


def saved_defense(path: str | Path | None) -> str | None:
    """The defense name recorded next to ``path``, or None when it has no readable sidecar."""
    if not path:
        return None
    try:
        return str(read_sidecar(path)["defense"])
    except StateMismatchError:
        return None


def read_defense_file(
    path: str | Path, defense: str | tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and checked sidecar of ``path``; with ``defense`` (a name or names), refuse a
    file of another defense.

    Raises :class:`StateMismatchError` (one line) for a missing, damaged or mismatched pair.
    """
    path = Path(path)
    if not path.is_file():
        raise StateMismatchError(f"defense file {str(path)!r} does not exist")
    meta = read_sidecar(path)
    wanted = (defense,) if isinstance(defense, str) else defense
    if wanted is not None and meta["defense"] not in wanted:
        expected = wanted[0] if len(wanted) == 1 else f"one of {list(wanted)}"
        raise StateMismatchError(f"{str(path)!r} holds a {meta['defense']!r} defense, not {expected}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateMismatchError(
            f"cannot read {str(path)!r} (truncated or corrupted safetensors file): {first_line(exc)}"
        ) from exc
    if meta.get("content_sha256") not in (None, content_digest(tensors)):
        raise StateMismatchError(
            f"{str(path)!r} and its sidecar {sidecar_path(path).name!r} do not belong together or the tensors are "
            "damaged (content digest mismatch; was a write interrupted?): write the file again"
        )
    return tensors, meta
