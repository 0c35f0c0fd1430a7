"""The per-result gradient-masking flags compare an attack only with the attacks that saw the same examples,
and know what an attack is from the attack registry (not from literal names)."""

from __future__ import annotations

from robustify.attacks import AttackConfig
from robustify.evaluation.results import EvalResult, audit

N = 100


def _flags(per_example: dict[str, list[int | None]], individual: bool = False) -> list[str]:
    correct = [1] * N
    acc = {a: sum(1 for i in range(N) if not any(v[i] == 1 for v in list(per_example.values())[: k + 1])) / N
           for k, a in enumerate(per_example)}
    result = EvalResult(meta={}, config=AttackConfig(attacks=tuple(per_example), individual=individual).to_dict(),
                        n_examples=N, clean_acc=1.0, attack_acc=acc, worst_case_acc=min(acc.values()), flags=[],
                        per_example={"clean_correct": correct, **per_example}, seconds={}, versions={})
    return audit(result)


def test_square_is_not_said_to_beat_white_box_attacks_that_never_saw_what_it_broke() -> None:
    # sequential run order: apgd-ce, square, apgd-dlr. Square breaks 5 examples after APGD-CE; APGD-DLR,
    # run after it, never sees them: nothing says APGD-DLR would have failed on them.
    apgd_ce = [1] * 10 + [0] * 90
    square = [None] * 10 + [1] * 5 + [0] * 85
    apgd_dlr = [None] * 15 + [0] * 85
    assert "black-box-beats-white-box" not in _flags({"apgd-ce": apgd_ce, "square": square, "apgd-dlr": apgd_dlr})


def test_a_black_box_attack_after_every_white_box_one_is_still_flagged() -> None:
    # transfer runs last: every white-box attack saw (and left robust) the 5 examples it breaks
    apgd_ce = [1] * 10 + [0] * 90
    apgd_dlr = [None] * 10 + [0] * 90
    transfer = [None] * 10 + [1] * 5 + [0] * 85
    assert "black-box-beats-white-box" in _flags({"apgd-ce": apgd_ce, "apgd-dlr": apgd_dlr, "transfer": transfer})
    # in individual mode every attack saw every example: Square's 5 extra breaks count
    square = [1] * 10 + [1] * 5 + [0] * 85
    both = {"apgd-ce": apgd_ce, "square": square, "apgd-dlr": [1] * 10 + [0] * 90}
    assert "black-box-beats-white-box" in _flags(both, individual=True)


def test_bpda_is_compared_with_the_standard_gradient_attacks_of_the_registry() -> None:
    # BPDA-APGD-T against APGD-T (no APGD-CE/DLR in the run): BPDA breaking 5 more is flagged
    apgd_t = [1] * 10 + [0] * 90
    bpda_t = [None] * 10 + [1] * 5 + [0] * 85
    assert "bpda-beats-standard" in _flags({"apgd-t": apgd_t, "bpda-apgd-t": bpda_t})
    # individual mode: what BPDA breaks beyond APGD-CE, FAB-T (a standard white-box attack) broke too
    apgd_ce = [1] * 10 + [0] * 90
    fab_t = [1] * 15 + [0] * 85
    bpda_ce = [1] * 15 + [0] * 85
    assert "bpda-beats-standard" not in _flags({"apgd-ce": apgd_ce, "fab-t": fab_t, "bpda-apgd-ce": bpda_ce},
                                               individual=True)
    # the baseline is the standard white-box attacks: PGD (white-box, not standard) runs after BPDA and never
    # sees what BPDA broke, which does not hide BPDA's 5 extra breaks
    pgd = [None] * 15 + [0] * 85
    assert "bpda-beats-standard" in _flags({"apgd-ce": apgd_ce, "bpda-apgd-ce": [None] * 10 + [1] * 5 + [0] * 85,
                                            "pgd": pgd})


def test_noise_is_tried_only_where_every_gradient_attack_tried() -> None:
    import torch
    from torch import nn

    from robustify.evaluation.audit import AuditConfig, check_noise

    # a linear model on 1x1x1 images: class 1 above 0.5. Example 0 sits on the boundary (any noise may flip
    # it), the others are far from it.
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        model[1].bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([0.5001] + [0.9] * 9).view(10, 1, 1, 1)
    y = torch.ones(10, dtype=torch.long)
    # sequential: APGD-CE left example 0, Square broke it, APGD-DLR (run after Square) never saw it
    per = {"apgd-ce": [0] * 10, "square": [1] + [0] * 9, "apgd-dlr": [None] + [0] * 9}
    result = EvalResult(meta={}, config=AttackConfig(attacks=tuple(per), eps=0.01).to_dict(), n_examples=10,
                        clean_acc=1.0, attack_acc={"apgd-ce": 1.0, "square": 0.9, "apgd-dlr": 0.9}, worst_case_acc=0.9,
                        flags=[], per_example={"clean_correct": [1] * 10, **per}, seconds={}, versions={})
    config = AttackConfig(attacks=tuple(per), eps=0.01)
    noise = check_noise(model, x, y, result, config, AuditConfig())
    assert noise["examples"] == 9 and noise["broken"] == 0 and not noise["flag"]
    # had APGD-DLR tried example 0 and left it, noise breaking it is what the flag is for
    result.per_example.update({"apgd-dlr": [0] * 10, "square": [0] * 10})
    noise = check_noise(model, x, y, result, config, AuditConfig())
    assert noise["examples"] == 10 and noise["broken"] == 1 and noise["flag"]
