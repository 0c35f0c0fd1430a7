"""Activation swaps: parametric activations (PSSiLU, PSiLU, PSoftplus; :mod:`.swaps`) and SAT's SmoothReLU
(:mod:`.smoothrelu`), each registered as a defense."""

from robustify.defenses.activations.swaps import (ACTIVATION_SWAPS, ActivationConfig, PSiLU, PSoftplus, PSSiLU,
                                                  swap_activations)
from robustify.defenses.activations.smoothrelu import SmoothReLU, SmoothReLUConfig  # noqa: I001 - registers second

__all__ = ["ACTIVATION_SWAPS", "ActivationConfig", "PSSiLU", "PSiLU", "PSoftplus", "SmoothReLU", "SmoothReLUConfig",
           "swap_activations"]
