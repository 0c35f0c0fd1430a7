"""Issue 12 item 3: the engine, the journal/lock and the result schema in modules of their own, one
PGD (attacks.pgd) for the attacks and for training, and ``rb.evaluate`` callable as the function."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import robustify as rb
import robustify.evaluation.engine as engine
from robustify import attacks
from robustify.evaluation import journal
from robustify.evaluation import results
from robustify.jobs import train
from robustify.attacks import AttackConfig, build_attack
from tinynets import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 2 / 255


@pytest.fixture(scope="module")
def data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = tiny_cnn()
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_rb_evaluate_is_the_engine_function(data, tmp_path) -> None:
    model, x, y = data
    config = AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=2, batch_size=4)
    called = rb.evaluate(model, x, y, config, out_dir=tmp_path, progress=False)
    direct = engine.evaluate(model, x, y, config, progress=False)
    assert isinstance(called, rb.EvalResult)
    assert called.per_example == direct.per_example and called.attack_acc == direct.attack_acc
    assert rb.load_result(tmp_path).per_example == called.per_example
    assert rb.evaluate is engine.evaluate and "out_dir" in inspect.signature(rb.evaluate).parameters


def test_schema_and_journal_live_in_their_own_modules_and_are_re_exported() -> None:
    assert engine.EvalResult is results.EvalResult is rb.EvalResult
    assert engine.load_result is results.load_result and engine.audit is results.audit
    assert engine.Journal is journal.Journal and engine._locked is journal.locked
    assert engine.EvaluationLockedError is journal.EvaluationLockedError
    assert results.EvalResult.__module__ == "robustify.evaluation.results" and journal.Journal.__module__ == "robustify.evaluation.journal"


def test_training_and_the_pgd_attack_share_attacks_pgd(data) -> None:
    model, x, y = data
    assert train.pgd is attacks.pgd and train.evaluate_pgd is attacks.evaluate_pgd
    config = AttackConfig(eps=EPS, attacks=("pgd",), adaptive_steps=3, seed=4)
    by_attack = build_attack("pgd", model, config).perturb(x, y)
    direct = attacks.pgd(model, x, y, eps=EPS, steps=3, step_size=2.5 * EPS / 3,
                         loss=lambda logits, t: F.cross_entropy(logits, t, reduction="sum"),
                         generator=torch.Generator().manual_seed(4), first_adversarial=True)
    assert torch.equal(by_attack, direct)


def test_pgd_in_the_l2_ball(data) -> None:
    model, x, y = data
    adv = attacks.pgd(model, x, y, eps=0.5, steps=4, step_size=0.2, norm="L2",
                      generator=torch.Generator().manual_seed(0))
    assert float((adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
