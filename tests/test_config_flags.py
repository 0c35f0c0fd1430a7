"""Issue 12, item 4: one config base for every config, and CLI flags made from the config fields
(one default and one help text per setting)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from robustify.defenses import meansparse as ms
from robustify.defenses.activations.swaps import ActivationConfig
from robustify.attacks import AttackConfig
from robustify.evaluation.audit import AuditConfig
from robustify.cli import build_parser
from robustify.cli import evaluate as evaluate_cli
from robustify import defenses
from robustify.cli.flags import CONFIG_FIELD, ConfigFlags, field_default, field_help
from robustify.core.config import SerializableConfig, untagged
from robustify.defenses.meansparse.config import MeanSparseConfig
from robustify.reporting.leaderboard import settings_id
from robustify.jobs.evaluate import EvaluationJob
from robustify.defenses.activations.smoothrelu import SmoothReLUConfig
from robustify.defenses.sparta.module import SpartaConfig
from robustify.jobs.train import TrainConfig

CONFIGS = [
    MeanSparseConfig(alpha=0.3, include=("layer*",), outputs=("layer.*",), site_alpha={"a.b": 0.1}, channel_dim=1),
    SpartaConfig(neighborhood=2, sites=("layer1",)),
    ActivationConfig(name="pssilu"),
    SmoothReLUConfig(),
    AttackConfig(attacks=("apgd-ce", "square"), norm="L2", eps="0.5", apgd_restarts=2),
    TrainConfig(milestones=(3, 5), epochs=2),
    AuditConfig(noise_draws=3),
    EvaluationJob(model="tinynets:tiny_cnn", defense="meansparse", defense_config=MeanSparseConfig(exclude=("x",)),
                  attack=AttackConfig(attacks=("apgd-ce",), apgd_iters=5)),
]


DEFENSE_DEFAULTS = {h.config_type: h.options.defaults if h.options.defaults is not None else h.config()
                    for h in defenses.handlers() if h.options is not None}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _generated(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if hasattr(a, CONFIG_FIELD)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_with_and_without_its_tags(config: SerializableConfig) -> None:
    assert isinstance(config, SerializableConfig)
    data = config.to_dict()
    assert data["_type"] == type(config).__name__ and data["_version"] == type(config).VERSION
    assert type(config).from_dict(data) == config
    assert type(config).from_dict(untagged(data)) == config  # a dict written before the tags
    with pytest.raises(ValueError, match="version 99 is not supported"):
        type(config).from_dict({**data, "_version": 99})


def test_from_dict_restores_tuples_and_nested_configs_from_the_field_types() -> None:
    job = CONFIGS[-1]
    data = untagged(job.to_dict())
    data["defense_config"], data["attack"] = untagged(data["defense_config"]), untagged(data["attack"])
    restored = EvaluationJob.from_dict(data)
    assert isinstance(restored.defense_config, MeanSparseConfig) and restored.defense_config.exclude == ("x",)
    assert restored.attack.attacks == ("apgd-ce",)
    assert TrainConfig.from_dict({"milestones": [1, 2]}).milestones == (1, 2)


def test_the_settings_id_of_a_result_does_not_depend_on_the_tags() -> None:
    """Results written before AttackConfig's dict was tagged keep their row identity."""
    config = AttackConfig(attacks=("apgd-ce",)).to_dict()
    result = {"meta": {"model": "m"}, "config": config, "n_examples": 4}
    assert settings_id(result) == settings_id({**result, "config": untagged(config)})


def test_every_flag_of_a_config_field_has_one_default_and_a_help_text() -> None:
    """The flag's default is the config's (or the command's declared default), its help the docstring's."""
    declared = {"sweep": evaluate_cli.SWEEP_DEFAULTS, "run": evaluate_cli.RUN_DEFAULTS}
    commands = _subparsers(build_parser())
    seen = set()
    for command, parser in commands.items():
        for action in _generated(parser):
            cls, name = getattr(action, CONFIG_FIELD)
            seen.add((cls, name))
            assert field_help(cls, name), f"{command} {action.option_strings}: no help text"
            if action.required:
                continue
            if cls in DEFENSE_DEFAULTS:  # a defense's flag: its registered options' default
                if action.default is None and "the defense's own" in action.help:
                    continue  # shared by defenses with different defaults: each config keeps its own
                expected = getattr(DEFENSE_DEFAULTS[cls], name)
            elif name in declared.get(command, {}):
                expected = declared[command][name]
                assert expected != field_default(cls, name), f"{command}: {name} declares the config's own default"
            elif cls is AttackConfig and name == "attacks":  # None: the command's list less those without the norm
                assert evaluate_cli.DEFAULT_ATTACKS in action.help and "without a version for the norm" in action.help
                expected = None
            else:
                expected = field_default(cls, name)
            assert action.default == expected, f"{command} {action.option_strings}"
    for cls in (AttackConfig, TrainConfig, AuditConfig, MeanSparseConfig):
        assert any(c is cls for c, _ in seen), cls


def test_the_meansparse_alpha_default_lives_in_its_registration() -> None:
    """One default: MeanSparse's registered options give every command's --alpha and a job's config."""
    default = defenses.get_defense("meansparse").options.defaults.alpha
    commands = _subparsers(build_parser())
    for command in ("inspect", "calibrate", "evaluate", "audit", "sweep", "run"):
        alpha = next(a for a in commands[command]._actions if "--alpha" in a.option_strings)
        assert alpha.default == default == 0.2, command
    assert EvaluationJob(model="m", defense="meansparse").defense_config.alpha == default


def test_a_job_from_default_flags_is_the_default_job() -> None:
    args = build_parser().parse_args(["evaluate", "tinynets:tiny_cnn", "--out", "o"])
    attacks = tuple(evaluate_cli.DEFAULT_ATTACKS.split(","))
    assert evaluate_cli.job_from_args(args) == EvaluationJob(model="tinynets:tiny_cnn", out="o",
                                                             attack=AttackConfig(attacks=attacks))
    assert evaluate_cli.audit_config(args) == AuditConfig()


def test_flags_read_back_as_config_values() -> None:
    parser = argparse.ArgumentParser()
    flags = ConfigFlags(MeanSparseConfig, ("alpha", "include", "skip_se", "channel_dim"))
    flags.add(parser)
    values = flags.values(parser.parse_args(["--alpha", "0.5", "--include", "a", "--include", "b", "--no-skip-se"]))
    assert values == {"alpha": 0.5, "include": ("a", "b"), "skip_se": False, "channel_dim": None}
    assert flags.values(parser.parse_args([]))["include"] == ("*",)  # a repeatable flag's default is replaced


def test_help_comes_from_the_docstring_attributes() -> None:
    assert field_help(TrainConfig, "epochs") == "passes over the training data."
    assert "robustify.defenses.meansparse.set_alpha" in field_help(MeanSparseConfig, "alpha")  # reST roles as plain text
    assert all(field_help(AuditConfig, f.name) for f in dataclasses.fields(AuditConfig))


def test_a_journal_written_before_the_tags_resumes(tmp_path) -> None:
    from robustify.evaluation.journal import Journal

    config = AttackConfig(attacks=("apgd-ce",)).to_dict()
    old = Journal(tmp_path, {"config": untagged(config), "meta": {}, "n_examples": 2})
    old.append({"attack": "apgd-ce", "batch": 0, "idx": [0, 1]})
    old.close()
    resumed = Journal(tmp_path, {"config": config, "meta": {}, "n_examples": 2}, writer=False)
    assert resumed.get("apgd-ce", 0, [0, 1]) is not None


#: hand-written flags spelled like a generated one, and why
HAND_WRITTEN = {
    "--norm": "default derived from --threat-model",
    "--freeze-backbone": "default derived from the defense",
    "--include": "train: Sparta / activation-swap placement (their configs' flags)",
    "--exclude": "train: Sparta / activation-swap placement (their configs' flags)",
    "--defense": "inspect, train: a choice among the registered defenses",
    "--out": "calibrate, train, leaderboard: a file or directory to write",
    "--progress": "train: tqdm bars of the training loop",
}


def test_no_config_setting_is_copied_by_a_hand_written_flag() -> None:
    commands = _subparsers(build_parser())
    generated = {flag for parser in commands.values() for a in _generated(parser) for flag in a.option_strings[:1]}
    for command, parser in commands.items():
        for action in parser._actions:
            if hasattr(action, CONFIG_FIELD):
                continue
            copied = set(action.option_strings[:1]) & generated
            assert copied <= set(HAND_WRITTEN), f"{command}: {sorted(copied)} written by hand"
