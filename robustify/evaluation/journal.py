"""The evaluation journal and lock: what makes :func:`robustify.evaluation.engine.evaluate` resumable.

Every finished batch is appended to ``<out>/journal.jsonl`` (flushed and fsynced) after a
header that identifies the evaluation (config, meta, number of examples and the data
fingerprint). Replaying the journal restores the finished batches; a partially written last
line (``kill -9``) is ignored, a journal of another evaluation is refused
(:class:`JournalMismatchError`). ``<out>/.lock`` refuses a second evaluation writing the
same directory (:class:`EvaluationLockedError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from robustify.core.config import untagged
from robustify.core.errors import EvaluationLockedError, JournalMismatchError

logger = logging.getLogger(__name__)

__all__ = ["JOURNAL_FILE", "LOCK_FILE", "EvaluationLockedError", "Journal", "JournalMismatchError", "data_fingerprint",
           "locked"]

JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = ".lock"


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of images ``x`` and labels ``y`` (their bytes)."""
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Journal:
    """Append-only JSON-lines record of finished batches (or an in-memory one)."""

    def __init__(self, directory: Path | None, header: dict[str, Any], writer: bool = True) -> None:
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self.path = directory / JOURNAL_FILE if directory is not None else None
        self._file = None
        if self.path is None:
            return
        if self.path.exists():
            self._replay(header, rewrite=writer)
            if writer:
                self._open()
        elif writer:
            self._open()
            self.append({"kind": "header", **header})

    def _open(self) -> None:
        assert self.path is not None
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _replay(self, header: dict[str, Any], rewrite: bool = True) -> None:
        assert self.path is not None
        text = self.path.read_text(encoding="utf-8")
        lines, complete = text.split("\n"), text.endswith("\n")
        parsed = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1 or (i == len(lines) - 2 and not lines[-1]):
                    logger.warning("ignoring a partially written last journal line in %s", self.path)
                    break
                raise JournalMismatchError(f"{self.path} is corrupted at line {i + 1}") from None
        if not parsed or parsed[0].get("kind") != "header":
            raise JournalMismatchError(f"{self.path} has no header: not a robustify journal")
        saved, wanted = _identity({k: v for k, v in parsed[0].items() if k != "kind"}), _identity(header)
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise JournalMismatchError(
                f"{self.path.parent} holds a different evaluation (differs in {diff}); "
                "use another --out directory or delete it"
            )
        for rec in parsed[1:]:
            self.records[(rec["attack"], rec["batch"])] = rec
        if not complete and rewrite:  # rewrite without the torn line so appends start on a fresh line
            self.path.write_text("".join(json.dumps(r) + "\n" for r in parsed), encoding="utf-8")
        logger.info("resuming from %s: %d finished batch(es)", self.path, len(self.records))

    def get(self, attack: str, batch: int, indices: list[int]) -> dict[str, Any] | None:
        rec = self.records.get((attack, batch))
        if rec is None:
            return None
        if rec["idx"] != indices:
            raise JournalMismatchError(f"journal batch {attack}#{batch} covers other examples than this run")
        return rec

    def append(self, record: dict[str, Any]) -> None:
        if record.get("kind") != "header":
            self.records[(record["attack"], record["batch"])] = record
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _identity(header: dict[str, Any]) -> dict[str, Any]:
    """The header as compared on resume (JSON round-tripped; the config without its ``_type``/``_version``
    tags, which journals written before them lack)."""
    identity = json.loads(json.dumps(header))
    if isinstance(identity.get("config"), dict):
        identity["config"] = untagged(identity["config"])
    return identity


@contextlib.contextmanager
def locked(directory: Path | None) -> Iterator[None]:
    """Hold ``<directory>/.lock`` for the block (None: no lock); a second holder gets
    :class:`EvaluationLockedError` at once."""
    if directory is None:
        yield
        return
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EvaluationLockedError(f"another evaluation is writing {directory}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
