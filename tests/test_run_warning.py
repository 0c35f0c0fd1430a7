"""`robustify run` says in one plain line when the base model is not adversarially trained."""

from __future__ import annotations

import logging

from robustify.cli import main
from test_cli_evaluate import npz  # noqa: F401  (the tiny data set, labelled by the tiny model)

RUN = ["run", "--model", "tinynets:tiny_cnn", "--n-examples", "8", "--n-calib", "32", "--apgd-iters", "3"]


def _warnings(caplog) -> list[str]:  # type: ignore[no-untyped-def]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [m for m in messages if "adversarially" in m]


def test_run_on_a_standard_model_says_so(npz, tmp_path, caplog):  # noqa: F811
    with caplog.at_level("INFO"):
        assert main([*RUN, "--data", str(npz), "--eps", "64/255", "--out", str(tmp_path)]) == 0
    [line] = _warnings(caplog)
    assert "0.0% robust accuracy" in line and "\n" not in line
    assert "post-training method for adversarially trained models" in line
    assert "--model robustbench:NAME" in line and "--weights FILE" in line


def test_run_on_a_robust_model_does_not_warn(npz, tmp_path, caplog):  # noqa: F811
    with caplog.at_level("INFO"):
        assert main([*RUN, "--data", str(npz), "--eps", "0.0001", "--out", str(tmp_path)]) == 0
    assert _warnings(caplog) == []
