"""`robustify inspect` and `robustify calibrate`: results, files, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from robustify import load_model
from robustify.defenses.meansparse import load_calibration
from robustify.defenses.meansparse import meansparse_modules
from robustify.cli import main
from robustify.defenses.meansparse.state import sidecar_path

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI expecting a failure; return its single stderr line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("robustify: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_inspect_json_prints_the_plan_and_writes_nothing(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "aa-resnet18", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    sites = out["sites"]
    assert len(sites) == 17 and out["model"]["spec"] == "aa-resnet18"
    assert {k for k in sites[0]} >= {"name", "activation", "channel_dim", "channels"}
    assert sites[0] == {**sites[0], "name": "relu_0", "activation": "ReLU", "channel_dim": 1, "channels": 64}
    assert not list(tmp_path.iterdir())
    assert main(["inspect", "aa-resnet18", "--json", "--exclude", "layer4.*", "--include", "layer*"]) == 0
    names = [s["name"] for s in json.loads(capsys.readouterr().out)["sites"]]
    assert len(names) == 12 and all(n.startswith(("layer1", "layer2", "layer3")) for n in names)


def test_calibrate_writes_documented_files_and_is_deterministic(capsys, small_npz: Path, tmp_path: Path) -> None:
    argv = ["calibrate", "aa-resnet18", "--data", str(small_npz), "--n-calib", "12", "--batch-size", "6", "--alpha", "0.3"]
    assert main([*argv, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b.safetensors"), "--batch-size", "5"]) == 0
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = load_file(str(a))
    meta = json.loads(sidecar_path(a).read_text())
    assert meta["model"]["spec"] == "aa-resnet18" and meta["config"]["alpha"] == 0.3 and meta["n_calib"] == 12
    names = [s["name"] for s in meta["sites"]]
    assert len(names) == 17 and set(tensors) == {f"{n}.{k}" for n in names for k in ("mean", "var")}
    # another batch size gives the same statistics (float32 forward noise aside)
    other = load_file(str(b))
    for key, value in tensors.items():
        torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5)
    # same command twice: byte-identical files
    assert main([*argv, "--out", str(tmp_path / "c.safetensors")]) == 0
    assert (tmp_path / "c.safetensors").read_bytes() == a.read_bytes()
    assert sidecar_path(tmp_path / "c.safetensors").read_text() == sidecar_path(a).read_text()
    # the file restores a working, calibrated model
    model, info = load_model("aa-resnet18")
    model = load_calibration(model, a, info.example_input())
    assert all(m.calibrated and m.alpha == 0.3 for m in meansparse_modules(model).values())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["inspect", "resnet18"], "unknown model spec 'resnet18'"),
        (["inspect", "timm:no_such_net", "--no-pretrained"], "unknown timm model"),
        (["inspect", "aa-resnet18", "--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["inspect", "aa-resnet18", "--alpha", "-0.5"], "alpha must be a finite number >= 0"),
        (["inspect", "aa-resnet18", "--alpha", "nan"], "alpha must be a finite number >= 0"),
        (["inspect", "aa-resnet18", "--exclude", "*"], r"the insertion plan changes nothing: 17 activation site\(s\)"),
        (["inspect", "aa-resnet18", "--preset", "everywhere"], "unknown placement preset 'everywhere'"),
        (["inspect", "aa-resnet18", "--weights", "/nonexistent/w.pt"], "does not exist"),
    ],
)
def test_inspect_errors_are_one_line(capsys, argv: list[str], message: str) -> None:
    assert re.search(message, _error_line(capsys, argv))


def test_calibrate_errors_are_one_line_and_write_nothing(capsys, small_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "c.safetensors"
    base = ["calibrate", "aa-resnet18", "--out", str(out)]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.full((4, 3, 32, 32), 255.0, np.float32), y_train=np.zeros(4, np.int64),
             x_test=np.zeros((1, 3, 32, 32), np.uint8), y_test=np.zeros(1, np.int64))
    truncated = tmp_path / "w.pt"
    torch.save(load_model("aa-resnet18")[0].state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    cases = [
        ([*base, "--data", str(tmp_path / "none.npz")], "does not exist"),
        ([*base, "--data", str(bad)], r"must be in \[0, 1\]"),
        ([*base, "--data", "svhn"], "unknown dataset 'svhn'"),
        ([*base, "--data", str(small_npz), "--n-calib", "1000"], r"--n-calib must be in \[1, 64\]"),
        ([*base, "--data", str(small_npz), "--holdout", "64"], r"holdout must be in \[0, 64\)"),
        ([*base, "--data", str(small_npz), "--weights", str(truncated)], "truncated or corrupted"),
    ]
    for argv, message in cases:
        line = _error_line(capsys, argv)
        assert re.search(message, line), line
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_unwritable_output(capsys, small_npz: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _error_line(capsys, ["calibrate", "aa-resnet18", "--data", str(small_npz), "--n-calib", "4",
                                "--out", str(blocker / "c.safetensors")])
    assert "a_file" in line
    assert blocker.read_text() == "not a directory"


def test_non_numeric_alpha_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "aa-resnet18", "--alpha", "abc"])
    assert exc.value.code == 2
    assert "invalid float value: 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--debug", "inspect", "resnet18"], ["inspect", "resnet18", "--debug"]])
def test_debug_shows_the_traceback(capsys, argv: list[str]) -> None:
    """Before or after the command, as the error hint types it."""
    from robustify.load.models import ModelLoadError

    message = _error_line(capsys, ["inspect", "resnet18"])
    assert message == ("robustify: error: unknown model spec 'resnet18': use robustbench:NAME, timm:NAME, "
                       "small-resnet-at, aa-resnet18 or package.module:function")  # a user error: one line, no traceback hint
    with pytest.raises(ModelLoadError):
        main(argv)


def test_a_bug_is_reported_as_a_bug_with_its_own_exit_code(capsys, monkeypatch) -> None:
    """Issue 18 item 6: a user error is one line and exit 2; anything else is a bug: exit 1, the exception's
    type, and the hint to rerun with --debug (which raises it)."""
    from robustify.cli import common

    def broken(args):
        return {}["missing"]  # a KeyError: no user input can cause it

    help_text, add_arguments, _ = common.COMMANDS["inspect"]
    monkeypatch.setitem(common.COMMANDS, "inspect", (help_text, add_arguments, broken))
    assert main(["inspect", "aa-resnet18"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error (KeyError" in err and "this is a bug" in err
    assert "rerun with --debug" in err
    with pytest.raises(KeyError):
        main(["inspect", "aa-resnet18", "--debug"])
    assert main(["calibrate", "resnet18", "--out", "never.safetensors"]) == 2  # a user's mistake keeps exit 2


def test_every_command_takes_debug_after_it(capsys) -> None:
    from robustify.cli import COMMANDS, build_parser

    build_parser()  # registers the commands of the other CLI modules
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "--debug" in capsys.readouterr().out, name


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robustify", *args]


def test_kill_during_calibration_then_rerun(small_npz: Path, tmp_path: Path) -> None:
    """kill -9 mid-pass leaves no calibration file (never a partial one); the rerun equals a clean run."""
    out = tmp_path / "c.safetensors"
    argv = ["calibrate", "aa-resnet18", "--data", str(small_npz), "--n-calib", "16", "--batch-size", "2", "--out", str(out)]
    proc = subprocess.Popen(_cli(*argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while "calibrate:" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")  # tqdm's progress bar
        assert proc.poll() is None, f"finished before it could be killed: {seen}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and not sidecar_path(out).exists()
    assert main([*argv[:-1], str(out)]) == 0
    assert main([*argv[:-1], str(tmp_path / "clean.safetensors")]) == 0
    assert out.read_bytes() == (tmp_path / "clean.safetensors").read_bytes()
    assert sidecar_path(out).read_text() == sidecar_path(tmp_path / "clean.safetensors").read_text()
