"""Issue 18 item 3: attacks are registered, one module per family, and every table of attacks (names,
aliases, kinds, norms, budgets, run order, ``n/a`` reasons, the CLI's ``--attacks``) is a registry query."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import robustify.attacks as attacks
from robustify.attacks import (NOT_APPLICABLE, Attack, AttackConfig, AttackSpec, aliases, attack_names, attack_specs,
                               autoattack_suite, build_attack, expand_attacks, get_attack, not_applicable,
                               register_attack, run_order, unregister_attack)
from robustify.cli import main
from robustify.cli.flags import field_help
from robustify.core.errors import UserError
from robustify.defenses.registry import apply_defense, defense_config
from robustify.evaluation import engine
from robustify.evaluation.results import audit
from robustify.jobs.evaluate import _applicable
from tinynets import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
EPS = 2 / 255
BUILT_IN = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t",
            "bpda-fab-t", "soft-bpda", "adaptive", "pgd", "transfer")
#: each attack's file (the BPDA versions are made from their base attacks in one file; ``pgd`` is the
#: mask-penalty attack with lambda 0, its control)
HOMES = {"apgd-ce": "apgd_ce", "apgd-dlr": "apgd_dlr", "apgd-t": "apgd_t", "fab-t": "fab", "square": "square",
         "soft-bpda": "soft_bpda", "adaptive": "mask_penalty", "pgd": "mask_penalty", "transfer": "transfer",
         **{f"bpda-{a}": "bpda" for a in ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")}}


# ------------------------------------------------------------------------------------------
# toy attacks, registered by the tests that use them and removed afterwards
# ------------------------------------------------------------------------------------------
class SignNoise(Attack):
    """A corner of the eps ball per example, drawn from the seed: a black-box attack in five lines."""

    def __init__(self, name: str, config: AttackConfig):
        self.name, self.eps, self.seed = name, config.eps, config.seed

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return (x + self.eps * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)


def _toy_build(model: nn.Module, config: AttackConfig, device: Any, source_model: nn.Module | None,
               autoattack: Any) -> Attack:
    return SignNoise("toy-noise", config)


def _toy_spec(name: str = "toy-noise", **changes: Any) -> AttackSpec:
    spec = AttackSpec(name=name, kind="black-box", build=_toy_build, budget=lambda c: {"queries": c.square_queries},
                      budget_fields=("square_queries",))
    return dataclasses.replace(spec, **changes)


@pytest.fixture
def toy() -> Any:
    spec = register_attack(_toy_spec())
    yield spec
    unregister_attack(spec.name)


@pytest.fixture
def toy_hooks() -> Any:
    specs = [register_attack(_toy_spec("toy-through", kind="adaptive", requires="straight_through")),
             register_attack(_toy_spec("toy-hook", kind="adaptive", requires="toy_hook"))]
    yield specs
    for spec in specs:
        unregister_attack(spec.name)


def _defended(name: str) -> nn.Module:
    return apply_defense(tiny_cnn(), torch.rand(2, 3, 32, 32), defense_config(name))


# ------------------------------------------------------------------------------------------
# names, aliases, kinds and run order
# ------------------------------------------------------------------------------------------
def test_built_in_attacks_and_aliases_come_from_the_family_modules() -> None:
    assert attack_names()[: len(BUILT_IN)] == BUILT_IN
    assert aliases()["autoattack"] == ("apgd-ce", "apgd-t", "fab-t", "square") == autoattack_suite()
    assert aliases()["bpda"] == ("bpda-apgd-ce", "bpda-apgd-dlr")
    assert aliases()["bpda-autoattack"] == ("bpda-apgd-ce", "bpda-apgd-t", "bpda-fab-t", "square")
    import re
    from pathlib import Path

    package = Path(attacks.__file__).parent
    for name, home in HOMES.items():  # each attack registers in its own file, and only there
        registering = [f.stem for f in package.glob("*.py") if f.stem != "base"
                       and re.search(r"register_attack\(AttackSpec\(name=" + (r"PREFIX \+ _base" if home == "bpda"
                                                                              else re.escape(f'"{name}"')), f.read_text())]
        assert registering == [home], name
    assert set(HOMES) == set(BUILT_IN)


def test_kinds_are_one_set_everywhere() -> None:
    assert attack_names(kind="white-box") == ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "pgd")
    assert attack_names(gradient=False) == attack_names(kind="black-box") == ("square", "transfer")
    assert attack_names(kind="adaptive") == ("bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t",
                                             "soft-bpda", "adaptive")
    assert attack_names(surrogate_backward=True) == ("bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t",
                                                     "soft-bpda")
    assert attack_names(standard=True) == ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
    # the tables of earlier versions are the same queries
    assert attacks.WHITE_BOX == attack_names(kind="white-box") and attacks.BLACK_BOX == ("square", "transfer")
    assert attacks.ATTACKS == attack_names() and attacks.AUTOATTACK_SUITE == autoattack_suite()
    assert attacks.RUN_ORDER == ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr")
    assert attacks.NORMS["adaptive"] == attacks.NORMS["pgd"] == ("Linf", "L2")


def test_run_order_of_the_committed_leaderboard_lists_is_unchanged() -> None:
    assert run_order()[: len(BUILT_IN)] == ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr", "bpda-apgd-ce",
                                            "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t", "soft-bpda", "adaptive",
                                            "pgd", "transfer")
    lists = {tuple(json.loads(p.read_text())["config"]["attacks"])
             for p in sorted((REPO / "leaderboard" / "results").rglob("result.json"))}
    assert lists, "no committed results"
    for ran in lists:
        assert expand_attacks(ran) == ran and expand_attacks(ran[::-1]) == ran
        assert AttackConfig(attacks=ran[::-1]).attacks == ran
    assert expand_attacks("transfer,bpda,square,apgd-dlr,apgd-ce,adaptive") == (
        "apgd-ce", "square", "apgd-dlr", "bpda-apgd-ce", "bpda-apgd-dlr", "adaptive", "transfer")
    assert expand_attacks("bpda-autoattack,autoattack") == ("apgd-ce", "apgd-t", "fab-t", "square", "bpda-apgd-ce",
                                                            "bpda-apgd-t", "bpda-fab-t")
    assert expand_attacks(" Soft-BPDA , pgd,apgd-t,apgd-t") == ("apgd-t", "soft-bpda", "pgd")


# ------------------------------------------------------------------------------------------
# the CLI's --attacks and AttackConfig
# ------------------------------------------------------------------------------------------
def test_cli_unknown_attack_error_lists_the_registry(small_npz, tmp_path, capsys) -> None:
    argv = ["evaluate", "tinynets:tiny_cnn", "--data", str(small_npz), "--out", str(tmp_path / "never"),
            "--attacks", "apgd-ce,nope"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown attack 'nope'" in err
    assert f"choose from {list(attack_names()) + list(aliases())}" in err
    help_text = field_help(AttackConfig, "attacks")
    assert all(name in help_text for name in (*attack_names(), *aliases()))


def test_a_registered_attack_is_accepted_documented_and_removable(toy) -> None:
    config = AttackConfig(attacks=("toy-noise", "apgd-ce"), eps=EPS)
    assert config.attacks == ("apgd-ce", "toy-noise")  # after the standard attacks, in registration order
    assert config.budget_for("toy-noise") == {"queries": 5000}
    assert "toy-noise" in (AttackConfig.__doc__ or "") and "toy-noise" in attacks.ATTACKS
    with pytest.raises(UserError, match="already registered"):
        register_attack(_toy_spec())
    unregister_attack("toy-noise")
    try:
        assert "toy-noise" not in (AttackConfig.__doc__ or "")
        with pytest.raises(UserError, match="unknown attack 'toy-noise'"):
            AttackConfig(attacks=("toy-noise",))
    finally:
        register_attack(toy)  # the fixture removes it


@pytest.mark.parametrize("changes, message", [({"kind": "grey-box"}, "kind"), ({"norms": ("L3",)}, "norms"),
                                              ({"name": "Toy"}, "lower case"), ({"name": "bpda"}, "already")])
def test_bad_specs_are_refused(changes, message) -> None:
    with pytest.raises(UserError, match=message):
        register_attack(_toy_spec(**changes))
    assert "toy-noise" not in attack_names()


def test_a_registered_attack_runs_through_the_engine(toy) -> None:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = tiny_cnn()
    with torch.no_grad():
        y = model(x).argmax(1)
    config = AttackConfig(attacks=("toy-noise", "apgd-ce"), eps=EPS, apgd_iters=2, batch_size=8, individual=True)
    result = engine.evaluate(model, x, y, config, progress=False)
    assert list(result.attack_acc) == ["apgd-ce", "toy-noise"]
    assert all(v in (0, 1) for v in result.per_example["toy-noise"])
    assert result.config["attacks"] == ["apgd-ce", "toy-noise"]
    noise = SignNoise("toy-noise", config).perturb(x, y)
    with torch.no_grad():
        expected = (model(noise).argmax(1) != y).long().tolist()
    assert result.per_example["toy-noise"] == expected
    result.per_example["apgd-ce"] = [0] * 6  # a black-box attack breaking what white-box ones did not
    result.per_example["toy-noise"] = [1] * 6
    assert "black-box-beats-white-box" in audit(result)


# ------------------------------------------------------------------------------------------
# applicability: the hook a spec requires
# ------------------------------------------------------------------------------------------
def test_not_applicable_reasons_come_from_the_required_hook() -> None:
    plain, meansparse, smooth = tiny_cnn(), _defended("meansparse"), _defended("smoothrelu")
    for spec in attack_specs():
        if spec.requires is None:
            assert all(not_applicable(spec.name, m, defended=d) is None
                       for m in (plain, meansparse, smooth) for d in (True, False))
            continue
        absent, lacking = NOT_APPLICABLE[spec.requires]
        assert not_applicable(spec.name, plain, defended=True) == absent
        assert not_applicable(spec.name, meansparse, defended=True) is None
        if spec.surrogate_backward:  # SmoothReLU is differentiable (and can be switched off: transfer applies)
            assert not_applicable(spec.name, smooth, defended=True) == lacking
    assert get_attack("transfer").applied_only
    assert not_applicable("transfer", meansparse, defended=False) == NOT_APPLICABLE["disabled"][0]
    assert {s.name: s.requires for s in attack_specs() if s.requires} == {
        **dict.fromkeys(("bpda-apgd-ce", "bpda-apgd-dlr", "bpda-apgd-t", "bpda-fab-t"), "straight_through"),
        "soft-bpda": "soft_backward", "transfer": "disabled"}


def test_a_registered_attack_needing_a_missing_hook_is_not_applicable(toy_hooks) -> None:
    plain, meansparse = tiny_cnn(), _defended("meansparse")
    config = AttackConfig(attacks=("apgd-ce", "toy-through", "toy-hook"), eps=EPS)
    kept, skipped = _applicable(config, plain, "none")
    assert kept.attacks == ("apgd-ce",)
    assert skipped == {"toy-through": f"not applicable: {NOT_APPLICABLE['straight_through'][0]}",
                       "toy-hook": "not applicable: no defense in the model offers toy_hook"}
    kept, skipped = _applicable(config, meansparse, "meansparse")
    assert kept.attacks == ("apgd-ce", "toy-through") and set(skipped) == {"toy-hook"}
    assert "meansparse offers no toy_hook" in skipped["toy-hook"]


# ------------------------------------------------------------------------------------------
# budgets: budget_for is the spec's budget, reading only its budget fields
# ------------------------------------------------------------------------------------------
EXPECTED_BUDGETS = {  # as stored in results and shown in the committed leaderboard
    "apgd-ce": {"iters": 100, "restarts": 1}, "apgd-dlr": {"iters": 100, "restarts": 1},
    "apgd-t": {"iters": 100, "targets": 9}, "fab-t": {"iters": 100, "targets": 9}, "square": {"queries": 5000},
    "bpda-apgd-ce": {"iters": 100, "restarts": 1}, "bpda-apgd-dlr": {"iters": 100, "restarts": 1},
    "bpda-apgd-t": {"iters": 100, "targets": 9}, "bpda-fab-t": {"iters": 100, "targets": 9},
    "soft-bpda": {"iters": 100, "stages": 3, "temperatures": "1/0.3/0.1"},
    "adaptive": {"steps": 50, "lambda": 1.0, "step_size": None}, "pgd": {"steps": 50, "lambda": 0.0, "step_size": None},
    "transfer": {"iters": 100, "restarts": 1},
}
CHANGED = {"apgd_iters": 7, "apgd_restarts": 2, "apgd_t_iters": 3, "apgd_t_targets": 4, "fab_iters": 5,
           "fab_targets": 6, "square_queries": 8, "adaptive_steps": 9, "adaptive_lambda": 0.5,
           "adaptive_step_size": 0.01, "apgd_t_targeting": "malt"}


def test_budgets_are_the_specs_and_read_only_their_fields() -> None:
    base = AttackConfig(attacks=("apgd-ce",))
    assert {a: base.budget_for(a) for a in BUILT_IN} == EXPECTED_BUDGETS
    assert json.dumps({a: base.budget_for(a) for a in BUILT_IN}) == json.dumps(EXPECTED_BUDGETS)
    for spec in attack_specs():
        assert base.budget_for(spec.name) == spec.budget(base)
        for name, value in CHANGED.items():
            changed = dataclasses.replace(base, **{name: value})
            moved = spec.budget(changed) != spec.budget(base)
            assert moved == (name in spec.budget_fields), (spec.name, name)


# ------------------------------------------------------------------------------------------
# the package's shape: one module per family, no specific defense imported
# ------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return names


def test_attack_modules_import_no_defense_and_no_other_family() -> None:
    package = REPO / "robustify" / "attacks"
    for path in sorted(package.glob("*.py")):
        imported = _imports(path)
        for defense in ("meansparse", "sparta", "activations"):
            assert not any(f"robustify.defenses.{defense}" in m for m in imported), (path.name, defense)
        files = set(HOMES.values())
        if path.stem in files:
            others = {f"robustify.attacks.{f}" for f in files} - {f"robustify.attacks.{path.stem}"}
            assert not imported & others, path.name


def test_build_attack_uses_the_registered_factory(toy) -> None:
    config = AttackConfig(attacks=("toy-noise",), eps=EPS)
    assert isinstance(build_attack("toy-noise", tiny_cnn(), config), SignNoise)
    with pytest.raises(UserError, match="unknown attack 'nope'"):
        build_attack("nope", tiny_cnn(), config)
