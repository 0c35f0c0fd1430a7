"""The evaluation engine: the "attack" step, with per-example bookkeeping and resume.

:func:`evaluate` runs clean accuracy and then each attack of an
:class:`~robustify.attacks.AttackConfig`, batch by batch. By default (as AutoAttack does)
an attack only sees the examples no earlier attack broke; with ``individual=True`` every
attack sees every correctly classified example. Per example it records who broke it; the
worst-case robust accuracy is the share of examples that nothing broke.

Every finished batch is appended to ``<out>/journal.jsonl`` (flushed and fsynced) before the
next starts. Rerunning the same evaluation on the same directory replays the journal and
runs only what is missing, so a run killed at any point (even ``kill -9``) resumes with
the same final numbers: each batch reseeds its attack, and batches are formed from the
journal alone. A partially written last line is ignored. ``<out>/result.json`` is written
atomically at the end. A lock file refuses a second evaluation writing the same directory.

A model whose forward is random (two forwards of one small batch differ:
:func:`~robustify.attacks.eot.forward_is_random`, once per evaluation, recorded as ``random_forward`` in
the result's ``meta``) is attacked with EoT (:func:`~robustify.attacks.eot.resolve_eot`: the config's
``eot_iter`` in the result is the one used). Its numbers are then one draw, as AutoAttack's: clean accuracy
is one forward per example, and an example counts as robust when the one forward that checks each attack's
output classifies it correctly. Each batch of such a model runs under its own seed (from the config's seed,
the phase and the batch), so a resumed run still gives the same numbers.

The journal and lock are :mod:`robustify.evaluation.journal`; the result schema and its flags
:mod:`robustify.evaluation.results`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import platform
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustify.core import distributed
from robustify._version import __version__
from robustify.attacks import AttackConfig, build_attack, make_autoattack
from robustify.attacks.eot import DETECTION_BATCH, forward_is_random, resolve_eot
from robustify.core.config import format_eps
from robustify.evaluation.cost import CHECKS, PassCounter, summarise
from robustify.load.data import validate_batch
from robustify.core.errors import DataError, EvaluationLockedError, JournalMismatchError, UserError
from robustify.core.io import atomic_path, write_json
from robustify.evaluation.journal import JOURNAL_FILE, LOCK_FILE, Journal, data_fingerprint, locked
from robustify.core.memory import split_on_oom
from robustify.evaluation.results import AUDIT_MARGIN, RESULT_FILE, EvalResult, audit, load_result

logger = logging.getLogger(__name__)

# The schema (EvalResult, load_result, audit) lives in robustify.evaluation.results and the journal and lock in
# robustify.evaluation.journal; they are re-exported here, where they were first defined.
__all__ = ["AUDIT_MARGIN", "JOURNAL_FILE", "LOCK_FILE", "RESULT_FILE", "EvalResult", "EvaluationLockedError", "Journal",
           "JournalMismatchError", "audit", "evaluate", "load_result"]

_locked = locked


# ------------------------------------------------------------------------------------------
# AutoAttack's own checks
# ------------------------------------------------------------------------------------------
class _CaptureWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _autoattack_warnings() -> Iterator[_CaptureWarnings]:
    handler = _CaptureWarnings()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(handler)
    try:
        yield handler
    finally:
        aa_logger.removeHandler(handler)


def _run_autoattack_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig) -> None:
    from pyautoattack import checks

    aa_logger = logging.getLogger("auto-attack")
    if (config.eot_iter or 1) == 1:  # a random forward attacked with EoT: skipped, as by AutoAttack's rand version
        checks.check_randomized(model, x, y, bs=x.shape[0], logger=aa_logger)
    n_cls = checks.check_range_output(model, x, logger=aa_logger)
    checks.check_dynamic(model, x, False, logger=aa_logger)
    aa = make_autoattack(model, config, x.device)
    checks.check_n_classes(n_cls, list(config.attacks), aa.apgd_targeted.n_target_classes,
                           aa.fab.n_target_classes, logger=aa_logger)


# ------------------------------------------------------------------------------------------
# engine
# ------------------------------------------------------------------------------------------
def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _logit_width(model: nn.Module, x: torch.Tensor, num_classes: int | None) -> int:
    """The model's number of classes, from one forward of the batch ``x``; checked against ``num_classes``
    (the dataset's) when given, before anything is attacked."""
    with torch.no_grad():
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model must return logits of shape (N, classes); for {x.shape[0]} image(s) it returned "
                        f"{shape}")
    width = int(logits.shape[1])
    if num_classes is not None and width != num_classes:
        raise UserError(f"the model has {width} logits but num_classes is {num_classes} (the dataset's classes): "
                        "evaluate it with its own dataset")
    return width


def _check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, config: AttackConfig, attack: str) -> None:
    d = (x_adv - x).flatten(1)
    size = {"Linf": d.abs().amax(1), "L2": d.norm(dim=1), "L1": d.abs().sum(1)}[config.norm]
    if (size > config.eps * (1 + 1e-4) + 1e-6).any() or x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        raise RuntimeError(f"attack {attack} returned points outside the {config.norm} ball of radius {config.eps:g} or [0,1]")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"robustify": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("pyautoattack", "timm", "robustbench"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AttackConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    source_model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    input_size: tuple[int, ...] | None = None,
    progress: bool = True,
    keep_adversarial: bool = False,
) -> EvalResult:
    """Attack ``model`` on ``(x, y)`` and return per-example and aggregate results.

    Args:
        model: the model to evaluate (inputs in [0, 1]); a calibrated defense in it, if any, must be
            calibrated.
        x: test images ``(N, C, H, W)`` in [0, 1].
        y: their labels ``(N,)``.
        config: attacks, threat model and budgets (None: :class:`AttackConfig`'s defaults).
        out_dir: where to keep the journal and ``result.json`` (resumable); None keeps
            everything in memory.
        meta: identifies the row in the leaderboard (model, defense, alpha, dataset...).
        source_model: the transfer attack's source (default: ``model`` with its defenses disabled, their
            ``disabled`` hook).
        device: the torch device to attack on.
        num_classes: the dataset's classes: the model's logits must have as many, and labels must be below.
            The targeted attacks' target counts are capped at the model's classes - 1 (as recorded in the
            result's config).
        input_size: ``(C,)`` or ``(C, H, W)`` the model expects, to validate images.
        progress: show progress bars.
        keep_adversarial: keep the worst-case adversarial examples: per example, the input of the first attack
            (in the config's order) that broke it, else the clean input (``(N, C, H, W)``, what RobustBench's
            external evaluations ask for). In ``out_dir``: ``adversarial.pt`` (each attacked batch's broken
            rows are kept under ``adversarial/`` as it finishes, so a resumed run has them); always
            ``result.adversarial_examples``.

    A model whose forward is random is attacked with EoT (see the module's documentation); the result's
    config holds the ``eot_iter`` used and its ``meta`` ``random_forward``.

    Returns:
        The :class:`EvalResult` (also written to ``out_dir/result.json`` when ``out_dir`` is given).

    Raises:
        DataError: no examples, or images and labels that do not fit the model.
        UserError: logits of another width than ``num_classes``.

    Examples:
        >>> from robustify.attacks import AttackConfig
        >>> model, info = rb.load_model("aa-resnet18", weights="../shared/models/resnet18_at_relu.pt")
        >>> x, y = rb.to_tensors(rb.load_data("../shared/data/cifar10_subset.npz", "test", n=4))
        >>> result = rb.evaluate(model, x, y, AttackConfig(attacks=("apgd-ce",), apgd_iters=1), progress=False)
        >>> result.clean_acc, sorted(result.attack_acc)
        (0.75, ['apgd-ce'])
    """
    config = config or AttackConfig()
    meta = dict(meta or {})
    if x.shape[0] == 0:
        raise DataError("there are no examples to evaluate")
    validate_batch(x, y, num_classes, input_size=input_size)
    model.eval()
    start = time.perf_counter()
    with _parameters_frozen(model), PassCounter(model) as width_passes:
        config = config.for_classes(_logit_width(model, x[: config.batch_size].to(device), num_classes))
        random_forward = forward_is_random(model, x[:DETECTION_BATCH].to(device))
    config = resolve_eot(config, random_forward)
    meta["random_forward"] = random_forward
    checked = (width_passes.forward, width_passes.backward, time.perf_counter() - start)
    n = x.shape[0]
    directory = Path(out_dir) if out_dir is not None else None
    header = {
        "config": config.to_dict(),
        "meta": meta,
        "n_examples": n,
        "data_fingerprint": data_fingerprint(x, y),
        **({"keep_adversarial": True} if keep_adversarial else {}),  # a journal without them cannot resume this
    }
    logger.info("attacking %d example(s) at %s eps %s with %s", n, config.norm, format_eps(config.eps, config.norm),
                ", ".join(config.attacks))
    main = distributed.is_main()
    with locked(directory if main else None), _autoattack_warnings() as aa_warnings, \
            _parameters_frozen(model, source_model):
        journal = Journal(directory, header, writer=main)
        try:
            store = _AdversarialStore(directory, main) if keep_adversarial else None
            result = _run(model, x, y, config, journal, device, source_model, progress, random_forward, checked, store)
        finally:
            journal.close()
    result.meta = meta
    result.data_fingerprint = header["data_fingerprint"]
    result.aa_checks = aa_warnings.messages
    result.flags = audit(result)
    result.finished = datetime.datetime.now(datetime.timezone.utc).isoformat()
    if store is not None:
        result.adversarial_examples = store.worst
        if directory is not None and main:
            with atomic_path(directory / ADVERSARIAL_FILE) as tmp:
                torch.save(store.worst, tmp)
            result.adversarial = ADVERSARIAL_FILE
    if directory is not None and main:
        write_json(directory / RESULT_FILE, result.to_dict())
        logger.info("wrote %s", directory / RESULT_FILE)
    return result


@contextlib.contextmanager
def _batch_seed(seeded: bool, seed: int, phase: str, k: int, device: torch.device | str) -> Iterator[None]:
    """With ``seeded``, run the block under torch's global generators seeded from (``seed``, ``phase``, batch
    ``k``), restored afterwards: a random model's draws for a batch do not depend on the batches before it."""
    if not seeded:
        yield
        return
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(zlib.crc32(f"{seed}:{phase}:{k}".encode()))
        yield


@contextlib.contextmanager
def _parameters_frozen(*models: nn.Module | None) -> Iterator[None]:
    """Attacks need input gradients only: no parameter gradient is computed (FAB calls
    ``backward()``; a compiled model's backward would include them) or accumulated."""
    params = {id(p): p for m in models if m is not None for p in m.parameters() if p.requires_grad}
    for p in params.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params.values():
            p.requires_grad_(True)


def _run_phase(
    name: str,
    chunks: list[list[int]],
    compute: Any,
    journal: Journal,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run (or replay) every batch of one phase; under torchrun, ranks share the batches.

    Rank ``r`` of ``w`` runs batches ``k`` with ``k % w == r``, in rounds of one batch per
    rank; after each round the ranks exchange their new records and rank 0 journals them at
    once, so a crash loses at most the round in progress, whichever rank ran it. A batch's
    result does not depend on which rank ran it (attacks reseed per batch).
    """
    world, me = distributed.world_size(), distributed.rank()
    rounds = -(-len(chunks) // world)
    for r in tqdm(range(rounds), desc=name, disable=not progress or not distributed.is_main()):
        k = r * world + me
        fresh = None
        if k < len(chunks) and journal.get(name, k, chunks[k]) is None:
            fresh = compute(k, chunks[k])
            journal.append(fresh)
        if world > 1:
            everyone: list[Any] = [None] * world
            torch.distributed.all_gather_object(everyone, fresh)
            for other, rec in enumerate(everyone):
                if other != me and rec is not None:
                    journal.append(rec)
    return [journal.get(name, k, idx) for k, idx in enumerate(chunks)]  # type: ignore[misc]


def _run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AttackConfig,
    journal: Journal,
    device: torch.device | str,
    source_model: nn.Module | None,
    progress: bool,
    random_forward: bool = False,
    checked: tuple[int, int, float] = (0, 0, 0.0),
    store: "_AdversarialStore | None" = None,
) -> EvalResult:
    """``checked``: forward and backward example-passes and seconds of the checks run before (the logit width,
    the randomness detection), added to the ``checks`` phase with AutoAttack's own checks."""
    n = x.shape[0]
    seconds: dict[str, float] = {}

    def clean_batch(k: int, idx: list[int]) -> dict[str, Any]:
        start = time.perf_counter()
        with PassCounter(model) as passes, _batch_seed(random_forward, config.seed, "clean", k, device):
            pred = _predict(model, x[idx].to(device)).cpu()
        return {"attack": "clean", "batch": k, "idx": idx, "broken": (pred != y[idx]).long().tolist(),
                "seconds": time.perf_counter() - start, "forward": passes.forward, "backward": passes.backward}

    cost: dict[str, dict[str, Any]] = {}

    def add_cost(name: str, records: list[dict[str, Any]]) -> None:
        cost[name] = summarise(sum(r.get("forward", 0) for r in records), sum(r.get("backward", 0) for r in records),
                               sum(r["seconds"] for r in records), sum(len(r["idx"]) for r in records))

    correct = torch.zeros(n, dtype=torch.bool)
    records = _run_phase("clean", _chunks(list(range(n)), config.batch_size), clean_batch, journal, progress)
    for rec in records:
        correct[rec["idx"]] = ~torch.tensor(rec["broken"], dtype=torch.bool)
        seconds["clean"] = seconds.get("clean", 0.0) + rec["seconds"]
    add_cost("clean", records)

    first = correct.nonzero().flatten()[: config.batch_size]
    start = time.perf_counter()
    with PassCounter(model) as passes:
        if len(first):  # AutoAttack's checks on the first batch (7 forwards, as run_standard_evaluation does)
            _run_autoattack_checks(model, x[first].to(device), y[first].to(device), config)
    cost[CHECKS] = summarise(checked[0] + passes.forward, checked[1] + passes.backward,
                             checked[2] + time.perf_counter() - start, len(first))

    robust = correct.clone()
    if store is not None:
        store.start(x, correct)
    per_attack: dict[str, torch.Tensor] = {}
    acc: dict[str, float] = {}
    shared_aa = make_autoattack(model, config, device)
    for name in config.attacks:
        attack = build_attack(name, model, config, device=device, source_model=source_model, autoattack=shared_aa)
        pool = correct if config.individual else robust
        chunks = _chunks(pool.nonzero().flatten().tolist(), config.batch_size)
        broken = torch.zeros(n, dtype=torch.bool)
        attacked = torch.zeros(n, dtype=torch.bool)

        def attack_batch(k: int, idx: list[int], attack: Any = attack, name: str = name) -> dict[str, Any]:
            kept: list[torch.Tensor] | None = [] if store is not None else None
            with _batch_seed(random_forward, config.seed, name, k, device):
                rec = _attack_batch(model, attack, x, y, idx, k, config, device, counted=(source_model,),
                                    keep=kept)
            if store is not None and kept:
                rows = [i for i, b in enumerate(rec["broken"]) if b]
                store.save(name, k, [idx[i] for i in rows], kept[0][rows])
            return rec

        records = _run_phase(name, chunks, attack_batch, journal, progress)
        for rec in records:
            if store is not None:
                store.merge(name, rec["batch"], rec["idx"], rec["broken"])
            broken[rec["idx"]] = torch.tensor(rec["broken"], dtype=torch.bool)
            attacked[rec["idx"]] = True
            seconds[name] = seconds.get(name, 0.0) + rec["seconds"]
        add_cost(name, records)
        per_attack[name] = torch.where(attacked, broken.long(), torch.full((n,), -1))
        robust &= ~broken
        acc[name] = float((correct & ~broken).float().mean()) if config.individual else float(robust.float().mean())
        logger.info("%s: robust accuracy %.2f%%", name, 100 * acc[name])

    per_example: dict[str, list[int | None]] = {"clean_correct": correct.long().tolist()}
    for name, flags in per_attack.items():
        per_example[name] = [None if v < 0 else int(v) for v in flags.tolist()]
    return EvalResult(
        meta={},
        config=config.to_dict(),
        n_examples=n,
        clean_acc=float(correct.float().mean()),
        attack_acc=acc,
        worst_case_acc=float(robust.float().mean()),
        flags=[],
        per_example=per_example,
        seconds=seconds,
        versions=_versions(),
        cost=cost,
    )


_oom_state: dict[str, dict[str, int]] = {}

#: in an evaluation's directory: the worst-case adversarial examples (``keep_adversarial``), and each batch's
ADVERSARIAL_FILE = "adversarial.pt"
ADVERSARIAL_DIR = "adversarial"


class _AdversarialStore:
    """The worst-case adversarial examples of one evaluation, assembled batch by batch.

    Each attacked batch's broken rows are written to ``adversarial/<attack>-<batch>.pt`` before the batch's
    journal record (so a resumed run finds them; in memory without a directory); :meth:`merge` puts them into
    :attr:`worst`, which starts as the clean inputs, for the examples no earlier attack broke.
    """

    def __init__(self, directory: Path | None, writer: bool) -> None:
        self.directory = directory / ADVERSARIAL_DIR if directory is not None else None
        self.writer = writer
        self.memory: dict[tuple[str, int], tuple[list[int], torch.Tensor]] = {}
        self.worst = torch.empty(0)
        self.assigned = torch.empty(0, dtype=torch.bool)

    def start(self, x: torch.Tensor, correct: torch.Tensor) -> None:
        self.worst = x.detach().cpu().clone()
        self.assigned = ~correct  # misclassified clean inputs are their own worst case

    def _path(self, attack: str, batch: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{attack}-{batch}.pt"

    def save(self, attack: str, batch: int, idx: list[int], x_adv: torch.Tensor) -> None:
        if self.directory is None:
            self.memory[(attack, batch)] = (idx, x_adv)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(attack, batch)) as tmp:
            torch.save({"idx": idx, "x": x_adv}, tmp)

    def _load(self, attack: str, batch: int) -> tuple[list[int], torch.Tensor]:
        if self.directory is None:
            return self.memory.pop((attack, batch), ([], self.worst[:0]))
        path = self._path(attack, batch)
        if not path.is_file():
            raise JournalMismatchError(f"{path} is missing: the adversarial examples of a finished batch are gone; "
                                       "evaluate into a fresh directory")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["idx"], saved["x"]

    def merge(self, attack: str, batch: int, idx: list[int], broken: list[int]) -> None:
        if not any(broken):
            return
        rows, x_adv = self._load(attack, batch)
        if sorted(rows) != sorted(i for i, b in zip(idx, broken) if b):
            raise JournalMismatchError(f"the adversarial examples kept for batch {batch} of {attack} do not match its "
                                       "journal record; evaluate into a fresh directory")
        for j, row in enumerate(rows):
            if not self.assigned[row]:
                self.worst[row] = x_adv[j]
                self.assigned[row] = True


def _attack_batch(
    model: nn.Module,
    attack: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: list[int],
    k: int,
    config: AttackConfig,
    device: torch.device | str,
    counted: tuple[nn.Module | None, ...] = (),
    keep: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Attack one batch; the record counts the forward/backward example-passes it took. ``keep``: a list that
    receives the batch's adversarial inputs (on the CPU)."""
    start = time.perf_counter()
    xb, yb = x[idx].to(device), y[idx].to(device)

    def perturb(rows: torch.Tensor) -> torch.Tensor:
        out = attack.perturb(xb[rows], yb[rows]).detach()
        return out.unsqueeze(0) if out.dim() == 3 else out

    # On out-of-memory the batch is split in halves (logged); the split is remembered per attack.
    with PassCounter(model, *counted) as passes:
        pieces = split_on_oom(perturb, torch.arange(len(idx), device=xb.device), what=f"attack {attack.name}",
                              state=_oom_state.setdefault(attack.name, {}))
        x_adv = torch.cat(pieces)
        _check_perturbation(x_adv, xb, config, attack.name)
        broken = (_predict(model, x_adv) != yb).cpu()
    if keep is not None:
        keep.append(x_adv.detach().cpu())
    return {"attack": attack.name, "batch": k, "idx": idx, "broken": broken.long().tolist(),
            "seconds": time.perf_counter() - start, "forward": passes.forward, "backward": passes.backward}
