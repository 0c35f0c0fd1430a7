"""Atomic writes: a failed write (disk full, crash) never leaves a half-written file."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from robustify.core.io import atomic_path, write_json, write_text


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "leaderboard.csv"
    write_text(target, "old,complete\n")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("new,half")
            raise OSError(errno.ENOSPC, "No space left on device")  # simulated disk full mid-write
    assert target.read_text() == "old,complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


def test_disk_full_on_write_json(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_json(target, {"a": 1})
    import pathlib

    def disk_full(self, data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json(target, {"a": 2})
    monkeypatch.undo()
    assert target.read_text().strip() == '{\n  "a": 1\n}'
    assert len(list(tmp_path.iterdir())) == 1


def test_files_get_ordinary_permissions(tmp_path):
    target = tmp_path / "x.txt"
    write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_results_directory_not_writable_is_a_one_line_cli_error(tmp_path, capsys, monkeypatch):
    """As root nothing is read-only, so the unwritable directory is simulated: mkstemp refuses."""
    import tempfile

    from robustify.cli import main

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "lb"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (tmp_path / "results").mkdir()
    assert main(["leaderboard", str(tmp_path / "results"), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Permission denied" in err and len(err.splitlines()) == 1 and "Traceback" not in err
