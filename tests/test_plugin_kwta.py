"""Issue 18, item 4: a third-party defense plugin (``plugins/robustify-kwta``, k-winners-take-all, Xiao et al.
ICLR 2020) is one module and one entry point, and gets the CLI choice, the BPDA attacks, the census, save/load
and a leaderboard row from robustify's hooks, with nothing inside ``robustify/`` naming it.

Needs the plugin installed from its folder (``pip install -e plugins/robustify-kwta``, as ``.ci/run`` does).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

kwta = pytest.importorskip("robustify_kwta", reason="the k-WTA plugin is not installed: "
                                                    "pip install -e plugins/robustify-kwta")

import robustify as rb  # noqa: E402
from robustify import defenses  # noqa: E402
from robustify.attacks import not_applicable  # noqa: E402
from robustify.cli import build_parser, main  # noqa: E402
from robustify.evaluation.audit import AuditConfig, gradient_census  # noqa: E402
from robustify.jobs.audit import audit_job  # noqa: E402
from robustify.jobs.evaluate import EvaluationJob, run_evaluation  # noqa: E402
from robustify.reporting.leaderboard import write_leaderboard  # noqa: E402
from tinynets import tiny_cnn, write_labelled_npz  # noqa: E402

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = torch.zeros(2, 3, 32, 32)
#: the default suite at small budgets (16 examples, eps 1/255: the tiny CNN is not robust at 8/255)
ATTACK = dict(eps="1/255", apgd_iters=5, apgd_t_iters=5, square_queries=20, adaptive_steps=5, batch_size=16)
#: units of the tiny CNN's two ReLU sites: act1 (8x32x32) and the functional relu (16x8x8)
UNITS = {"act1": 8 * 32 * 32, "relu_0": 16 * 8 * 8}


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base model and its k-WTA version evaluated on the same 16 examples (the default suite,
    small budgets), and the k-WTA evaluation audited; results under one root for the leaderboard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("kwta")
        npz = root / "labelled.npz"
        write_labelled_npz(str(npz), n_train=8, n_test=16)
        jobs = {name: EvaluationJob(model="tinynets:tiny_cnn", defense=name, data=str(npz), n_examples=16,
                                    progress=False, out=str(root / "results" / name),
                                    attack=rb.AttackConfig(**ATTACK))
                for name in ("none", "kwta")}
        results = {name: run_evaluation(job) for name, job in jobs.items()}
        audit = audit_job(jobs["kwta"], AuditConfig(unbounded_examples=8, unbounded_iters=3, census_examples=8,
                                                    noise_draws=2))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "npz": npz, "jobs": jobs, "results": results, "audit": audit}


# ------------------------------------------------------------------------------------------
# one module, one entry point, nothing in robustify/
# ------------------------------------------------------------------------------------------
def test_the_plugin_registers_through_its_entry_point() -> None:
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=defenses.ENTRY_POINT_GROUP)}
    assert points.get("kwta") == "robustify_kwta"
    assert "kwta" in defenses.load_plugins()  # loaded when robustify was imported
    handler = defenses.get_defense("kwta")
    assert handler is kwta.KWTA_DEFENSE and not handler.trainable and handler.calibrate is None
    assert handler.options is not None and "ratio" in handler.options.fields
    assert not handler.differentiable  # it offers a straight-through backward


def test_nothing_inside_robustify_names_it() -> None:
    """What ``grep -ril kwta robustify/`` checks: no file of the package mentions the plugin."""
    package = REPO / "robustify"
    hits = [str(p.relative_to(REPO)) for p in sorted(package.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and b"kwta" in p.read_bytes().lower()]
    assert hits == []


def test_evaluate_help_lists_it_among_the_defense_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "--help"])
    assert stop.value.code == 0
    listed = re.search(r"--defense \{([^}]*)\}", capsys.readouterr().out)
    assert listed is not None and {"none", "kwta"} <= set(listed.group(1).split(","))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    args = sub.choices["evaluate"].parse_args(["tinynets:tiny_cnn", "--defense", "kwta", "--out", "x"])
    assert args.defense == "kwta"


# ------------------------------------------------------------------------------------------
# the operator and its modes
# ------------------------------------------------------------------------------------------
def test_kwta_keeps_the_top_k_of_each_example_over_the_whole_layer() -> None:
    z = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    module = kwta.KWTA(0.1, torch.nn.ReLU())
    out = module(z)
    k = kwta.winners(100, 0.1)
    assert k == 10 and kwta.winners(95, 0.1) == 10 and kwta.winners(3, 0.01) == 1  # ceil, at least one
    for zi, oi in zip(z, out):
        top = zi.flatten().topk(k).indices
        expected = torch.zeros(100)
        expected[top] = zi.flatten()[top]
        assert torch.equal(oi.flatten(), expected)  # over C*H*W, not per channel
    with pytest.raises(ValueError, match="ratio must be in"):
        kwta.KWTAConfig(ratio=0)


def test_its_gradient_passes_the_winners_and_bpda_the_replaced_activation() -> None:
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    module = kwta.KWTA(0.25, torch.nn.ReLU())
    model = torch.nn.Sequential(module)
    winners = kwta.kwta_mask(z, 0.25)
    grad, = torch.autograd.grad(module(z).sum(), z)
    assert torch.equal(grad, winners.float())  # masked: zero for the losers
    with kwta.straight_through(model):
        out = module(z)
        grad, = torch.autograd.grad(out.sum(), z)
    assert torch.equal(out, module(z))  # forward unchanged
    assert torch.equal(grad, (z > 0).float())  # ReLU's gradient, winner or not
    identity = kwta.KWTA(0.25, torch.nn.ReLU(), backward="identity")
    with kwta.straight_through(torch.nn.Sequential(identity)):
        grad, = torch.autograd.grad(identity(z).sum(), z)
    assert torch.equal(grad, torch.ones_like(z))
    assert not module.straight_through  # the mode is restored on exit


def test_the_hooks_apply_to_a_kwta_model() -> None:
    base = tiny_cnn()
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, kwta.KWTAConfig())
    assert set(kwta.kwta_modules(model)) == set(UNITS)  # the module ReLU and the functional one
    assert [h.name for h in defenses.defenses_in(model)] == ["kwta"]  # no other defense claims its sites
    for attack in ("bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t", "adaptive", "transfer"):
        assert not_applicable(attack, model, defended=True) is None, attack
    assert not_applicable("bpda-apgd-ce", base, defended=False) is not None  # the base model: n/a
    x = _images()
    with torch.no_grad():
        defended, plain = model(x), base(x)
        with defenses.disabled(model):
            assert torch.equal(model(x), plain)  # the transfer source: the base model
    assert not torch.equal(defended, plain)
    assert torch.equal(rb.remove_defense(model)(x), plain)


# ------------------------------------------------------------------------------------------
# evaluation, audit, save/load, leaderboard
# ------------------------------------------------------------------------------------------
def test_the_default_suite_runs_bpda_through_the_hook_and_finds_no_less_than_apgd(evaluated: dict[str, Any]) -> None:
    result = evaluated["results"]["kwta"]
    assert result.meta["defense"] == "kwta" and result.meta["not_applicable"] == {}
    assert result.meta["defense_config"] == kwta.KWTAConfig().to_dict()  # the default meta: its config
    assert {"bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "adaptive", "transfer"} <= set(result.attack_acc)
    apgd, worst = result.attack_acc["apgd-ce"], result.worst_case_acc
    logger.info("k-WTA 0.1, tiny CNN, 16 examples, eps 1/255: clean %.4f, APGD-CE %.4f, worst case %.4f "
                "(base: worst case %.4f)", result.clean_acc, apgd, worst, evaluated["results"]["none"].worst_case_acc)
    assert worst <= apgd
    base = evaluated["results"]["none"].meta["not_applicable"]
    assert set(base) == {"bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "transfer"}  # the base row: n/a, with the reason


def test_the_census_counts_the_losers_and_the_audit_flags_masked_gradients(evaluated: dict[str, Any]) -> None:
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, kwta.KWTAConfig(ratio=0.1))
    x = _images(4, seed=3)
    with torch.no_grad():
        y = model(x).argmax(1)
    census = gradient_census(model, x, y)
    for site, units in UNITS.items():
        blocked = 1 - kwta.winners(units, 0.1) / units  # ~ 1 - ratio
        assert census["sites"][site]["clean"] == pytest.approx(blocked, abs=1e-6)
    assert census["flag"] and census["max_share"] > AuditConfig().masked_share
    assert census["grad_norm_bpda"] > 0 and census["grad_norm"] > 0
    audit = evaluated["audit"]
    assert "masked-gradients" in audit["flags"]
    assert audit["census"]["max_share"] == pytest.approx(0.9, abs=0.01)
    assert set(audit["census"]["sites"]) == set(UNITS)


def test_save_and_load_round_trip_through_the_one_defense_file(tmp_path: Path) -> None:
    config = kwta.KWTAConfig(ratio=0.2, exclude=("act1",))
    model = rb.apply_defense(tiny_cnn(), EXAMPLE, config)
    path = rb.save_defense(model, tmp_path / "kwta.safetensors", model_info={"spec": "tinynets:tiny_cnn"})
    sidecar = json.loads((tmp_path / "kwta.safetensors.json").read_text())
    assert sidecar["defense"] == "kwta" and sidecar["config"] == config.to_dict()
    assert [s["name"] for s in sidecar["sites"]] == ["relu_0"] and sidecar["sites"][0]["channels"] == 16
    assert defenses.defense_kind(path) == "kwta"
    loaded = rb.load_defense(tiny_cnn(), path, EXAMPLE)
    assert loaded.robustify_defense == config
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    (tmp_path / "kwta.safetensors.json").write_text(json.dumps(
        {**sidecar, "sites": [{**sidecar["sites"][0], "channels": 32}]}))
    with pytest.raises(ValueError, match="does not fit this model"):
        rb.load_defense(tiny_cnn(), path, EXAMPLE)


def test_the_leaderboard_shows_a_paired_verdict_for_the_kwta_row(evaluated: dict[str, Any], tmp_path: Path) -> None:
    table = write_leaderboard(evaluated["root"] / "results", tmp_path / "board", plots=False)
    row = table[table["defense"] == "kwta"].iloc[0]
    assert row["verdict"] in ("gain", "loss", "no significant gain")
    assert row["delta_worst_case"] == pytest.approx(
        100 * (evaluated["results"]["kwta"].worst_case_acc - evaluated["results"]["none"].worst_case_acc), abs=0.01)
    assert "masked-gradients" in row["flags"].split(";")
    assert table[table["defense"] == "none"].iloc[0]["verdict"] is None  # the base row has no comparison
    assert "kwta" in (tmp_path / "board" / "leaderboard.md").read_text()


def test_robustify_evaluate_applies_it_with_its_config(evaluated: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["evaluate", "tinynets:tiny_cnn", "--data", str(evaluated["npz"]), "--n-examples", "4",
                 "--defense", "kwta", "--attacks", "apgd-ce,bpda", "--apgd-iters", "2", "--no-progress",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "result.json").read_text())["meta"]
    assert meta["defense"] == "kwta" and meta["defense_config"]["ratio"] == 0.1 and meta["not_applicable"] == {}


def test_soft_bpda_is_not_applicable_with_the_right_reason() -> None:
    """k-WTA offers a straight-through backward but no smooth surrogate: soft-BPDA is n/a because of that, not
    because the defense is differentiable (it is not)."""

    model = rb.apply_defense(tiny_cnn(), torch.rand(1, 3, 32, 32), kwta.KWTAConfig())
    assert not_applicable("bpda-apgd-ce", model, defended=True) is None
    assert not_applicable("soft-bpda", model, defended=True) == "kwta offers no smooth-surrogate backward"
