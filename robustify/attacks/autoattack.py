"""pyautoattack glue: an ``AutoAttack`` with a config's budgets, and :class:`PyAutoAttack`, one of its attacks.

The attacks built on pyautoattack (:mod:`~robustify.attacks.apgd_ce`, :mod:`~robustify.attacks.apgd_dlr`,
:mod:`~robustify.attacks.apgd_t`, :mod:`~robustify.attacks.fab`, :mod:`~robustify.attacks.square`, and their
straight-through versions in :mod:`~robustify.attacks.bpda`) each give :class:`PyAutoAttack` the function that
runs their attack object, exactly as ``AutoAttack.run_standard_evaluation`` calls it; the APGD ones share
:func:`untargeted_apgd`, :func:`pyautoattack_factory` and the budgets here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from robustify.attacks.base import Attack, autoattack_suite, register_alias

if TYPE_CHECKING:
    from robustify.attacks.config import AttackConfig

__all__ = ["PyAutoAttack", "RunAttack", "apgd_budget", "make_autoattack", "pyautoattack_factory", "untargeted_apgd"]

#: runs one of a pyautoattack ``AutoAttack``'s attack objects on a batch: ``run(aa, x, y) -> x_adv``
RunAttack = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def _set_apgd_iters(apgd: Any, n_iter: int) -> None:
    """Change an APGD budget the way its constructor derives the checkpoint schedule."""
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def make_autoattack(model: Callable[[torch.Tensor], torch.Tensor], config: AttackConfig, device: Any) -> Any:
    """A pyautoattack ``AutoAttack`` (standard version settings) with the config's budgets; its APGDs average
    their gradients over ``config.eot_iter`` forwards (EoT, as the ``rand`` version's; None: 1)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=config.norm, eps=config.eps, seed=config.seed, device=device, version="standard")
    _set_apgd_iters(aa.apgd, config.apgd_iters)
    aa.apgd.n_restarts = config.apgd_restarts
    _set_apgd_iters(aa.apgd_targeted, config.apgd_t_iters)
    aa.apgd_targeted.n_target_classes = config.apgd_t_targets
    aa.fab.n_iter = config.fab_iters
    aa.fab.n_target_classes = config.fab_targets
    aa.square.n_queries = config.square_queries
    aa.apgd.eot_iter = aa.apgd_targeted.eot_iter = config.eot_iter or 1
    return aa


class PyAutoAttack(Attack):
    """One of pyautoattack's attacks: ``run(aa, x, y)`` inside ``context()`` (e.g. a straight-through backward)."""

    def __init__(self, name: str, aa: Any, run: RunAttack,
                 context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None):
        self.name = name
        self.aa = aa
        self.run = run
        self.context = context or contextlib.nullcontext

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.context():
            return self.run(self.aa, x, y)


def shared_autoattack(model: Callable[[torch.Tensor], torch.Tensor], config: AttackConfig, device: Any,
                      autoattack: Any) -> Any:
    """``autoattack`` if given (several attacks share one), else a new one for ``model``."""
    return autoattack or make_autoattack(model, config, device)


register_alias("autoattack", autoattack_suite)  # AutoAttack's standard version: its suite, in its order


def untargeted_apgd(loss: str) -> RunAttack:
    """Run ``AutoAttack.apgd`` with ``loss`` (``"ce"`` or ``"dlr"``), reseeded as AutoAttack reseeds it."""
    def run(aa: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        aa.apgd.loss = loss
        aa.apgd.seed = aa.get_seed()
        return aa.apgd.perturb(x, y)

    return run


def apgd_budget(config: AttackConfig) -> dict[str, Any]:
    """The budget of the untargeted APGD attacks (and their BPDA versions and the transfer attack)."""
    return {"iters": config.apgd_iters, "restarts": config.apgd_restarts}


def pyautoattack_factory(name: str, run: RunAttack) -> Any:
    """An attack factory (:attr:`~robustify.attacks.base.AttackSpec.build`) for one of pyautoattack's attacks."""
    def build(model: Any, config: AttackConfig, device: Any, source_model: Any, autoattack: Any) -> Attack:
        return PyAutoAttack(name, shared_autoattack(model, config, device, autoattack), run)

    return build
