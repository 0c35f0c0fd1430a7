"""The evaluation engine: agreement with pyautoattack, per-example worst case, resume, audit."""

from __future__ import annotations

import json

import pytest
import torch

from robustify.defenses import meansparse as ms
import robustify as rb
from robustify.attacks import AttackConfig, build_attack, expand_attacks
from robustify.evaluation.engine import EvaluationLockedError, JournalMismatchError, evaluate, _locked
from tinynets import tiny_cnn

EPS = 2 / 255  # the tiny model is partly robust at this radius, so tests are not vacuous


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(24, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def defended(images):
    """Tiny CNN with calibrated MeanSparse; labels = its own clean predictions (100% clean accuracy)."""
    base = tiny_cnn()
    model = ms.insert_meansparse(tiny_cnn(), images[:2], ms.MeanSparseConfig(alpha=0.3))
    rb.calibrate(model, [images], progress=False)
    with torch.no_grad():
        y = model(images).argmax(1)
    return base, model, y


def test_apgd_ce_equals_pyautoattack_direct(defended, images):
    from pyautoattack import AutoAttack

    _, model, y = defended
    config = AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=10, batch_size=10, seed=0)
    ours = evaluate(model, images, y, config, progress=False)

    aa = AutoAttack(model, attacks=["apgd-ce"], version="custom", eps=EPS, seed=0)
    aa.apgd.n_iter = 10
    aa.apgd.n_restarts = 1  # the 'custom' version keeps the constructor's 5 restarts; the standard one uses 1
    aa.apgd.n_iter_2, aa.apgd.n_iter_min, aa.apgd.size_decr = max(int(0.22 * 10), 1), max(int(0.06 * 10), 1), 1
    _, y_adv = aa.run_standard_evaluation(images, y, batch_size=10)
    direct = (y_adv == y).float().mean().item()
    assert ours.attack_acc["apgd-ce"] == pytest.approx(direct)
    assert ours.per_example["apgd-ce"] == [int(b) for b in (y_adv != y).tolist()]
    assert 0 < ours.attack_acc["apgd-ce"] < 1  # the test is not vacuous


def test_worst_case_is_per_example_and_over_attacks(defended, images):
    _, model, y = defended
    config = AttackConfig(eps=EPS, attacks=("apgd-ce", "pgd", "square"), apgd_iters=3, adaptive_steps=3,
                          square_queries=30, batch_size=8, individual=True)
    result = evaluate(model, images, y, config, progress=False)
    per = result.per_example
    robust = [c == 1 and all(per[a][i] != 1 for a in config.attacks) for i, c in enumerate(per["clean_correct"])]
    assert result.worst_case_acc == pytest.approx(sum(robust) / len(robust))
    for attack in config.attacks:  # individual mode: every attack saw every correct example
        assert all(v is not None for v in per[attack])
        assert result.attack_acc[attack] == pytest.approx(1 - sum(per[attack]) / len(robust))
    assert result.worst_case_acc <= min(result.attack_acc.values())


def test_sequential_mode_attacks_only_unbroken(defended, images):
    _, model, y = defended
    config = AttackConfig(eps=EPS, attacks=("apgd-ce", "apgd-dlr"), apgd_iters=5, batch_size=8)
    result = evaluate(model, images, y, config, progress=False)
    first, second = result.per_example["apgd-ce"], result.per_example["apgd-dlr"]
    assert all((a == 1) == (b is None) for a, b in zip(first, second))
    assert result.attack_acc["apgd-dlr"] == pytest.approx(result.worst_case_acc)


def test_bpda_on_undefended_model_equals_plain_apgd(defended, images):
    base, _, y = defended
    plain = evaluate(base, images, y, AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=8, batch_size=8),
                     progress=False)
    through = evaluate(base, images, y, AttackConfig(eps=EPS, attacks=("bpda-apgd-ce",), apgd_iters=8, batch_size=8),
                       progress=False)
    assert plain.per_example["apgd-ce"] == through.per_example["bpda-apgd-ce"]


def test_bpda_attack_differs_from_standard_on_meansparse(defended, images):
    _, model, y = defended
    x, yb = images[:8], y[:8]
    config = AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=4)
    standard = build_attack("apgd-ce", model, config).perturb(x, yb)
    through = build_attack("bpda-apgd-ce", model, config).perturb(x, yb)
    assert not torch.equal(standard, through)
    assert all(not m.straight_through for m in ms.meansparse_modules(model).values())  # the mode did not leak


def test_adaptive_lambda_zero_is_pgd(defended, images):
    _, model, y = defended
    config = AttackConfig(eps=EPS, attacks=("adaptive",), adaptive_steps=4, adaptive_lambda=0.0)
    a = build_attack("adaptive", model, config).perturb(images[:8], y[:8])
    b = build_attack("pgd", model, config).perturb(images[:8], y[:8])
    assert torch.equal(a, b)
    penalised = build_attack("adaptive", model, AttackConfig(eps=EPS, adaptive_steps=4, adaptive_lambda=10.0)).perturb(
        images[:8], y[:8])
    assert not torch.equal(a, penalised)
    assert (penalised - images[:8]).abs().max() <= EPS + 1e-6


def test_transfer_uses_the_base_model(defended, images):
    base, model, y = defended
    config = AttackConfig(eps=EPS, attacks=("transfer",), apgd_iters=5)
    from_view = build_attack("transfer", model, config).perturb(images[:8], y[:8])
    from_base = build_attack("transfer", model, config, source_model=base).perturb(images[:8], y[:8])
    assert torch.allclose(from_view, from_base, atol=1e-6)


def test_resume_after_interruption_equals_uninterrupted(defended, images, tmp_path, monkeypatch):
    _, model, y = defended
    config = AttackConfig(attacks=("apgd-ce", "square"), apgd_iters=4, square_queries=20, batch_size=6,
                          eps=EPS)
    full = evaluate(model, images, y, config, out_dir=tmp_path / "full", progress=False)

    import robustify.evaluation.engine as engine

    real = engine._attack_batch
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_attack_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, images, y, config, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(engine, "_attack_batch", real)
    journal = (tmp_path / "cut" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 4 + 2  # header, 4 clean batches, 2 attack batches
    with open(tmp_path / "cut" / "journal.jsonl", "a") as f:  # a torn write, as after kill -9
        f.write('{"attack": "apgd-ce", "bat')
    resumed = evaluate(model, images, y, config, out_dir=tmp_path / "cut", progress=False)
    assert resumed.per_example == full.per_example
    assert resumed.attack_acc == full.attack_acc
    records = [json.loads(line) for line in (tmp_path / "cut" / "journal.jsonl").read_text().splitlines()]
    keys = [(r.get("attack"), r.get("batch")) for r in records[1:]]
    assert len(keys) == len(set(keys))  # nothing duplicated


def test_journal_refuses_a_different_evaluation(defended, images, tmp_path):
    _, model, y = defended
    evaluate(model, images, y, AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=2), out_dir=tmp_path, progress=False)
    with pytest.raises(JournalMismatchError, match="different evaluation"):
        evaluate(model, images, y, AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=3), out_dir=tmp_path,
                 progress=False)


def test_second_writer_is_refused(tmp_path):
    with _locked(tmp_path):
        with pytest.raises(EvaluationLockedError):
            with _locked(tmp_path):
                pass


def test_result_json_holds_per_example_flags(defended, images, tmp_path):
    _, model, y = defended
    result = evaluate(model, images, y, AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=2), out_dir=tmp_path,
                      meta={"model": "tiny"}, progress=False)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["per_example"] == result.per_example
    assert saved["meta"]["model"] == "tiny"
    assert len(saved["per_example"]["clean_correct"]) == images.shape[0]


def test_attack_config_validation():
    assert expand_attacks("autoattack,bpda") == ("apgd-ce", "apgd-t", "fab-t", "square", "bpda-apgd-ce",
                                                 "bpda-apgd-dlr")
    with pytest.raises(ValueError, match="unknown attack"):
        AttackConfig(attacks=("nope",))
    with pytest.raises(ValueError, match="does not support"):
        AttackConfig(attacks=("adaptive",), norm="L1")
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps="8/0")
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps="-1")
    with pytest.raises(ValueError, match="positive integer"):
        AttackConfig(apgd_iters=0)
    assert AttackConfig(eps="8/255").eps == pytest.approx(8 / 255)


def test_l2_threat_model_runs(defended, images):
    _, model, y = defended
    result = evaluate(model, images[:8], y[:8], AttackConfig(attacks=("apgd-ce", "pgd"), norm="L2", eps=0.5,
                                                              apgd_iters=3, adaptive_steps=3), progress=False)
    assert 0 <= result.worst_case_acc <= result.clean_acc


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, y: (x * 255, y), "must be in \\[0, 1\\]"),
        (lambda x, y: (x.masked_fill(x > 0.99, float("nan")), y), "NaN"),
        (lambda x, y: (x, y + 10), "labels must be in"),
        (lambda x, y: (x[:0], y[:0]), "no examples"),
        (lambda x, y: (x[:, :1], y), "channel"),
    ],
)
def test_bad_inputs_are_refused(defended, images, mutate, message):
    _, model, y = defended
    x_bad, y_bad = mutate(images, y)
    with pytest.raises(ValueError, match=message):
        evaluate(model, x_bad, y_bad, AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=1), num_classes=10,
                 input_size=(3, 32, 32), progress=False)


def test_uncalibrated_meansparse_is_refused(images):
    model = ms.insert_meansparse(tiny_cnn(), images[:2], ms.MeanSparseConfig(alpha=0.2))
    with pytest.raises(rb.NotCalibratedError, match="no statistics"):
        evaluate(model, images, torch.zeros(len(images), dtype=torch.long),
                 AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=1), progress=False)


def test_out_of_memory_during_an_attack_backs_off(defended, images, monkeypatch, caplog):
    """A simulated OOM on batches larger than 3: the batch is split, the evaluation completes."""
    _, model, y = defended
    import robustify.evaluation.engine as engine

    monkeypatch.setattr(engine, "_oom_state", {})
    config = AttackConfig(eps=EPS, attacks=("apgd-ce",), apgd_iters=2, batch_size=8)
    from robustify.attacks import PyAutoAttack

    real = PyAutoAttack.perturb

    def small_batches_only(self, x, y):  # noqa: ANN001
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(self, x, y)

    monkeypatch.setattr(PyAutoAttack, "perturb", small_batches_only)
    with caplog.at_level("WARNING"):
        result = evaluate(model, images, y, config, progress=False)
    assert "retrying with batch size" in caplog.text
    assert all(v is not None for v in result.per_example["apgd-ce"])  # every example was attacked


def test_attacks_leave_no_parameter_gradients(defended, images):
    """FAB calls backward(): with the parameters frozen for the evaluation nothing accumulates,
    and requires_grad is restored afterwards."""
    _, model, y = defended
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(before.values())
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda m, a: seen.append(any(p.requires_grad for p in m.parameters())))
    try:
        evaluate(model, images[:6], y[:6], AttackConfig(attacks=("fab-t",), fab_iters=2, fab_targets=1, eps=EPS),
                 progress=False)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_adaptive_mask_marks_exactly_the_entries_the_forward_replaced(defended, images, dtype):
    """The mask-penalty attack penalises the entries MeanSparse replaced, in the dtype the
    forward ran in (float32, or bfloat16 under autocast)."""
    from robustify.attacks import MaskPenaltyPGD
    from robustify.evaluation.fast import autocast

    _, model, _ = defended
    attack = MaskPenaltyPGD(model, AttackConfig(eps=EPS), lam=1.0, name="adaptive")
    context = autocast("cpu", dtype) if dtype is not None else torch.no_grad()
    with context:
        masks = attack._masks(images[:8])
    modules = ms.meansparse_modules(model)
    assert masks and set(masks) <= set(modules)
    for site, (z, mask) in masks.items():
        m = modules[site]
        assert z.dtype == (dtype or torch.float32)
        mean, crop = m.thresholds_like(z)  # in the band's dtype (float32: RobustBench's promotion)
        mean_z = mean.to(z.dtype)
        with torch.no_grad():
            out = m(z)
        replaced = (out != z) | ((z == mean_z) & ((mean_z - mean).abs() < crop))
        assert torch.equal(mask, replaced) and mask.any(), site


@pytest.mark.parametrize("individual", [False, True])
def test_kept_adversarial_examples_are_the_worst_case_per_example(defended, images, tmp_path, individual):
    _, model, y = defended
    y = y.clone()
    y[:2] = (y[:2] + 1) % 10  # two examples misclassified clean: their own worst case
    config = AttackConfig(eps=EPS, attacks=("apgd-ce", "apgd-dlr"), apgd_iters=4, batch_size=8, individual=individual)
    result = evaluate(model, images, y, config, out_dir=tmp_path, progress=False, keep_adversarial=True)
    adv = result.adversarial_examples
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert (adv - images).abs().amax() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    assert robust.float().mean().item() == pytest.approx(result.worst_case_acc)  # RobustBench's check
    assert 0 < result.worst_case_acc < result.clean_acc  # some broken, some not: not vacuous
    broken_by = [next((a for a in config.attacks if result.per_example[a][i] == 1), None) for i in range(len(y))]
    unchanged = [torch.equal(adv[i], images[i]) for i in range(len(y))]
    assert all(unchanged[i] for i, a in enumerate(broken_by) if a is None)  # not broken: the clean input
    assert not any(unchanged[i] for i, a in enumerate(broken_by) if a is not None)
    saved = torch.load(tmp_path / result.adversarial, weights_only=True)
    assert json.loads((tmp_path / "result.json").read_text())["adversarial"] == "adversarial.pt"
    assert torch.equal(saved, adv)
    again = evaluate(model, images, y, config, out_dir=tmp_path, progress=False, keep_adversarial=True)  # replayed
    assert torch.equal(again.adversarial_examples, adv)
