"""The study file: models x defenses (with settings grids) x attacks, read with :mod:`tomllib`.

A study file (TOML)::

    [study]
    data = "../shared/data/cifar10_subset.npz"   # the default of every model
    n_examples = 200
    seed = 0                                      # every attack's seed unless it sets one
    cell_dir = "{model}/{defense}/{attack}"       # a cell's results directory below <out>/results

    [[models]]
    name = "rn18"                                 # the {model} of cell names (default: from `model`)
    model = "aa-resnet18"                         # as `robustify evaluate MODEL`
    weights = "../shared/models/resnet18_at_relu.pt"

    [[defenses]]
    defense = "none"                              # the base row ({defense}: "base")

    [[defenses]]
    defense = "meansparse"
    grid = { alpha = [0.1, 0.2, 0.3] }            # any config fields; one cell per combination
    options = { preset = "all" }                  # fixed config fields

    [[attacks]]
    name = "suite"
    attacks = ["apgd-ce", "bpda"]                 # and any AttackConfig field (eps, apgd_iters, ...)

    [resources.evaluate]                          # per step kind (calibrate, evaluate): Slurm resources
    time = 60                                     # minutes
    mem_gb = 8
    gpus = 2                                      # one task per GPU, joined by torch.distributed
    cpus = 4
    partition = "debug"

A defense's settings are its registered config's fields (:attr:`robustify.defenses.Defense.config_type`,
defaults from :meth:`~robustify.defenses.Defense.default_config`); the ones that are not its registered
``setting`` (MeanSparse's alpha) are its placement: cells that differ only in the setting share one
calibration. Every error names the key it is about, on one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustify import defenses
from robustify.attacks import AttackConfig, threat_norm
from robustify.core.errors import UserError

__all__ = ["AttackSpec", "DefenseSpec", "ModelSpec", "Resources", "Study", "StudyFileError", "load_study",
           "parse_study"]


class StudyFileError(UserError):
    """An invalid study file (the message names the key)."""


#: ``[study]`` keys passed to every evaluation job as they are (:class:`robustify.jobs.evaluate.EvaluationJob` fields)
JOB_KEYS = ("data", "n_examples", "split", "holdout", "n_calib", "calib_batch_size", "workers", "device", "cache_dir",
            "compile", "precision")
STUDY_KEYS = (*JOB_KEYS, "name", "seed", "cell_dir", "note")
MODEL_KEYS = ("name", "model", "weights", "dataset", "threat_model", "data", "pretrained")
DEFENSE_KEYS = ("defense", "name", "grid", "options", "weights", "calibration")
RESOURCE_KEYS = ("time", "mem_gb", "gpus", "cpus", "partition", "nodes", "tasks")
STEP_KINDS = ("calibrate", "evaluate")
DEFAULT_CELL_DIR = "{model}/{defense}/{attack}"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: as ``robustify evaluate MODEL`` takes it, with its leaderboard."""

    name: str
    model: str
    weights: str | None = None
    dataset: str = "cifar10"
    threat_model: str = "Linf"
    data: str | None = None
    pretrained: bool = True


@dataclass(frozen=True)
class DefenseSpec:
    """One ``[[defenses]]`` entry: a registered defense (or none), fixed options and a grid of settings."""

    defense: str
    name: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    weights: str | None = None
    calibration: str | None = None

    def settings(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values (one empty dict without a grid)."""
        keys = [k for k, _ in self.grid]
        return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in self.grid))]


@dataclass(frozen=True)
class AttackSpec:
    """One ``[[attacks]]`` entry: the AttackConfig fields it sets (threat model and dataset come from the model)."""

    name: str
    fields: tuple[tuple[str, Any], ...]

    def config(self, model: ModelSpec, seed: int | None) -> AttackConfig:
        values = dict(self.fields)
        if seed is not None:
            values.setdefault("seed", seed)
        values.setdefault("norm", threat_norm(model.threat_model))
        if isinstance(values.get("attacks"), list):
            values["attacks"] = tuple(values["attacks"])
        return AttackConfig(dataset=model.dataset, **values)


@dataclass(frozen=True)
class Resources:
    """What one step asks a Slurm cluster for (``time`` in minutes; ``cpus`` per task; ``tasks``: processes joined
    by torch.distributed on the node, default one per GPU)."""

    time: int = 60
    mem_gb: float = 4
    gpus: int = 0
    cpus: int = 1
    partition: str | None = None
    nodes: int = 1
    tasks: int | None = None


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    path: str
    name: str
    models: tuple[ModelSpec, ...]
    defenses: tuple[DefenseSpec, ...]
    attacks: tuple[AttackSpec, ...]
    job: tuple[tuple[str, Any], ...] = ()
    seed: int | None = None
    cell_dir: str = DEFAULT_CELL_DIR
    resources: tuple[tuple[str, Resources], ...] = field(default_factory=tuple)
    note: str = ""  # appended to the REPRODUCE.md the run writes beside the results

    def resources_for(self, kind: str) -> Resources:
        return dict(self.resources).get(kind, Resources())

    def with_resources(self, **overrides: Any) -> Study:
        """The study with ``overrides`` (Resources fields; None: keep) applied to every step kind's resources."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        return dataclasses.replace(self, resources=tuple(
            (kind, dataclasses.replace(self.resources_for(kind), **changes)) for kind in STEP_KINDS))


def load_study(path: str | Path) -> Study:
    """Read and check the study file ``path``: models x defenses (with settings grids) x attacks.

    Every key and its meaning: the study file reference of the documentation (``docs/reference/study-file.md``).

    Args:
        path: the study file (TOML).

    Returns:
        The parsed :class:`Study`, to plan (:func:`robustify.jobs.study.plan_study`) or run
        (:func:`robustify.run_study`).

    Raises:
        StudyFileError: the file cannot be read, is not valid TOML, or a key is unknown or invalid (one line
            naming the key; a :class:`~robustify.core.errors.UserError`).

    Examples:
        >>> from pathlib import Path
        >>> _ = Path("tiny.toml").write_text('''
        ... [study]
        ... data = "../shared/data/cifar10_subset.npz"
        ... n_examples = 4
        ...
        ... [[models]]
        ... model = "aa-resnet18"
        ... weights = "../shared/models/resnet18_at_relu.pt"
        ...
        ... [[defenses]]
        ... defense = "none"
        ...
        ... [[defenses]]
        ... defense = "meansparse"
        ... grid = { alpha = [0.1, 0.2] }
        ...
        ... [[attacks]]
        ... name = "quick"
        ... attacks = ["apgd-ce"]
        ... apgd_iters = 1
        ... ''')
        >>> study = rb.load_study("tiny.toml")
        >>> study.name, [m.name for m in study.models], study.defenses[1].settings()
        ('tiny', ['aa-resnet18'], [{'alpha': 0.1}, {'alpha': 0.2}])
        >>> from robustify.jobs.study import plan_study
        >>> [cell.id for cell in plan_study(study, "runs/tiny").cells]
        ['aa-resnet18/base/quick', 'aa-resnet18/meansparse_0.1/quick', 'aa-resnet18/meansparse_0.2/quick']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyFileError(f"cannot read study file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyFileError(f"study file {str(path)!r} is not valid TOML: {exc}") from None
    return parse_study(data, str(path))


def _fail(path: str, key: str, message: str) -> StudyFileError:
    return StudyFileError(f"study file {path!r}: {key}: {message}")


def _table(data: Any, path: str, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise _fail(path, key, f"must be a table, got {type(data).__name__}")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise _fail(path, f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    return dict(data)


def _typed(value: Any, types: type | tuple[type, ...], path: str, key: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(path, key, f"must be {_type_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise _fail(path, key, f"must be {_type_names(types)}, got {type(value).__name__} {value!r}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "list": "a list", "dict": "a table"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in (types if isinstance(types, tuple) else (types,)))


def _array(data: Any, path: str, key: str) -> list[Any]:
    if data is None:
        raise _fail(path, key, f"missing: the study needs at least one [[{key}]] entry")
    if not isinstance(data, list) or not data:
        raise _fail(path, key, f"must be a non-empty array of tables ([[{key}]])")
    return data


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _model(entry: Any, path: str, key: str) -> ModelSpec:
    t = _table(entry, path, key, MODEL_KEYS)
    if "model" not in t:
        raise _fail(path, f"{key}.model",
                    "missing (robustbench:NAME, timm:NAME, aa-resnet18 or package.module:function)")
    for k in ("name", "model", "weights", "dataset", "threat_model", "data"):
        if k in t:
            _typed(t[k], str, path, f"{key}.{k}")
    if "pretrained" in t:
        _typed(t["pretrained"], bool, path, f"{key}.pretrained")
    if t.get("threat_model", "Linf") not in ("Linf", "L2", "corruptions"):
        raise _fail(path, f"{key}.threat_model", f"must be Linf, L2 or corruptions, got {t['threat_model']!r}")
    t.setdefault("name", _slug(t["model"].split(":")[-1]))
    return ModelSpec(**t)


def _config_fields(defense: defenses.Defense, name: str) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(defense.default_config(name))}


def _check_config(name: str, values: Mapping[str, Any], path: str, key: str) -> None:
    """``values`` make a valid config of defense ``name`` (each field known, the config accepts them)."""
    defense = defenses.get_defense(name)
    known = _config_fields(defense, name)
    for k in values:
        if k not in known:
            raise _fail(path, f"{key}.{k}", f"defense {name!r} has no setting {k!r}; its settings: {', '.join(known)}")
    config = defense.default_config(name)
    try:
        type(config).from_dict({**config.to_dict(), **values})
    except (TypeError, ValueError) as exc:
        raise _fail(path, key, f"invalid settings for defense {name!r}: {str(exc).splitlines()[0]}") from None


def _defense(entry: Any, path: str, key: str) -> DefenseSpec:
    t = _table(entry, path, key, DEFENSE_KEYS)
    name = _typed(t.get("defense", None) or "", str, path, f"{key}.defense")
    if not name:
        raise _fail(path, f"{key}.defense", "missing (none, or a registered defense)")
    if name != "none" and name not in defenses.defense_names():
        raise _fail(path, f"{key}.defense", f"unknown defense {name!r}; choose from "
                                            f"{['none', *defenses.defense_names()]}")
    grid_t = _table(t.get("grid", {}), path, f"{key}.grid", tuple(t.get("grid", {}) or ()))
    options = _table(t.get("options", {}), path, f"{key}.options", tuple(t.get("options", {}) or ()))
    if name == "none" and (grid_t or options or "weights" in t or "calibration" in t):
        raise _fail(path, key, "defense 'none' takes no grid, options, weights or calibration")
    grid = []
    for k, values in grid_t.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{key}.grid.{k}", "must be a non-empty list of values")
        grid.append((k, tuple(values)))
    if name != "none":
        overlap = sorted(set(grid_t) & set(options))
        if overlap:
            raise _fail(path, f"{key}.options.{overlap[0]}", "is also in the grid")
        _check_config(name, options, path, f"{key}.options")
        for k, values in grid:
            for v in values:
                _check_config(name, {**options, k: v}, path, f"{key}.grid")
    for k in ("name", "weights", "calibration"):
        if k in t:
            _typed(t[k], str, path, f"{key}.{k}")
    if t.get("calibration") and defenses.get_defense(name).calibrate is None:
        raise _fail(path, f"{key}.calibration", f"defense {name!r} has no statistics pass to calibrate")
    label = t.get("name") or ("base" if name == "none" else name)
    return DefenseSpec(defense=name, name=label, grid=tuple(grid), options=tuple(options.items()),
                       weights=t.get("weights"), calibration=t.get("calibration"))


def _attack(entry: Any, path: str, key: str, models: tuple[ModelSpec, ...], seed: int | None) -> AttackSpec:
    allowed = tuple(f.name for f in dataclasses.fields(AttackConfig) if f.name != "dataset")
    t = _table(entry, path, key, ("name", *allowed))
    name = _typed(t.pop("name", "") or "", str, path, f"{key}.name")
    if "attacks" in t:
        _typed(t["attacks"], list, path, f"{key}.attacks")
    spec = AttackSpec(name=name or "attacks", fields=tuple((k, v) for k, v in t.items()))
    for model in models:
        try:
            spec.config(model, seed)
        except (TypeError, ValueError) as exc:
            raise _fail(path, key, str(exc).splitlines()[0]) from None
    return spec


def _resources(data: Any, path: str) -> tuple[tuple[str, Resources], ...]:
    t = _table(data, path, "resources", STEP_KINDS)
    out = []
    for kind, entry in t.items():
        r = _table(entry, path, f"resources.{kind}", RESOURCE_KEYS)
        for k, v in r.items():
            _typed(v, str if k == "partition" else ((int, float) if k == "mem_gb" else int), path,
                   f"resources.{kind}.{k}")
        out.append((kind, Resources(**r)))
    return tuple(out)


def parse_study(data: Mapping[str, Any], path: str = "<study>") -> Study:
    """A :class:`Study` from the parsed TOML ``data`` (``path`` names the file in errors)."""
    _table(data, path, "<top level>", ("study", "models", "defenses", "attacks", "resources"))
    head = _table(data.get("study", {}), path, "study", STUDY_KEYS)
    for k, types in (("name", str), ("data", str), ("n_examples", int), ("split", str), ("holdout", int),
                     ("n_calib", int), ("calib_batch_size", int), ("workers", int), ("device", str),
                     ("cache_dir", str), ("compile", bool), ("precision", str), ("seed", int), ("cell_dir", str),
                     ("note", str)):
        if k in head:
            _typed(head[k], types, path, f"study.{k}")
    if head.get("n_examples", 1) < 1:
        raise _fail(path, "study.n_examples", f"must be positive, got {head['n_examples']}")
    seed = head.pop("seed", None)
    note = head.pop("note", "")
    cell_dir = head.pop("cell_dir", DEFAULT_CELL_DIR)
    bad = set(re.findall(r"{([^}]*)}", cell_dir)) - {"model", "defense", "attack"}
    if bad:
        raise _fail(path, "study.cell_dir", f"unknown placeholder {{{sorted(bad)[0]}}}; use {{model}}, {{defense}}, "
                                            "{attack}")
    name = head.pop("name", Path(path).stem)
    models = tuple(_model(e, path, f"models[{i}]") for i, e in enumerate(_array(data.get("models"), path, "models")))
    _unique([m.name for m in models], path, "models", "name")
    specs = tuple(_defense(e, path, f"defenses[{i}]")
                  for i, e in enumerate(_array(data.get("defenses"), path, "defenses")))
    attacks = tuple(_attack(e, path, f"attacks[{i}]", models, seed)
                    for i, e in enumerate(_array(data.get("attacks"), path, "attacks")))
    _unique([a.name for a in attacks], path, "attacks", "name")
    resources = _resources(data.get("resources", {}), path)
    return Study(path=path, name=name, models=models, defenses=specs, attacks=attacks, job=tuple(head.items()),
                 seed=seed, cell_dir=cell_dir, resources=resources, note=note)


def _unique(names: list[str], path: str, array: str, key: str) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            raise _fail(path, f"{array}[{i}].{key}", f"{n!r} is used twice")
        seen.add(n)
