"""The ``published`` placement preset: where the published MeanSparse models put MeanSparse.

Each rule reproduces, for one architecture family, the modules and positions of the MeanSparse
models that RobustBench ships (``robustbench/model_zoo/architectures/Meansparse_*.py`` and
``sparsified_model.py``), applied to the *base* architecture those models wrap:

========================  ==========================================  =====================================
family (detected class)   sites                                       published model (base entry)
========================  ==========================================  =====================================
``dm-wrn``                before each block activation (``relu_0``,   ``Amini2024MeanSparse_S-WRN-94-16``
RobustBench               ``relu_1``), each block's output after      (``Bartoldson2024Adversarial_WRN-94-16``),
``DMWideResNet``          the residual add, before the final          ``Amini2024MeanSparse_S-WRN-70-16``
                          activation (``Meansparse_wrn_70_16/94_16``) (``Wang2023Better_WRN-70-16``, C10 L2,
                                                                      C100 Linf)
``ra-wrn``                the same, never inside squeeze-and-         ``Amini2024MeanSparse_Ra_WRN_70_16``
RobustBench               excitation (``Meansparse_ra_wrn_70_16``)    (``Peng2023Robust``, CIFAR-10)
``NormalizedWideResNet``
``ra-wrn-imagenet``       before every ReLU/SiLU except each block's  RaWRN-101-2 of the paper (ImageNet
RobustBench               ``last_activation`` and SE paths (the       ``Peng2023Robust``); no RobustBench
``ConfigurableModel``     paper's ImageNet inserter; not in the       MeanSparse entry
                          wheel)
``swin``                  per block: fc1 output (before the GELU),    ``Amini2024MeanSparse_Swin-L``
timm ``SwinTransformer``  fc2 output, after the attention-residual    (``Liu2023Comprehensive_Swin-L``)
                          add, after the MLP-residual add
                          (``Meansparse_swin_L``)
``convnext``              before each GELU of the stages, after each  ``Amini2024MeanSparse_ConvNeXt-L``
timm ``ConvNeXt``         block's ``drop_path`` (``sparsified_model.  (``Liu2023Comprehensive_ConvNeXt-L``)
                          add_custom_layer_imagenet``)
========================  ==========================================  =====================================

Timm's Swin block has no module whose output is the attention-residual sum, so each
``SwinTransformerBlock`` is rewritten by ``torch.fx`` (all its children kept as leaves) with an
``nn.Identity`` named ``attn_residual`` applied to that sum, whose output is the site; the
block's parameters, buffers and state-dict keys are unchanged. The input model is not modified:
the planned model shares its modules except for the rewritten blocks and the containers above
them.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import fx, nn

from robustify.core.errors import InsertionError
from robustify.defenses.sites import _SE_CLASS, _owner_classes, _parameter_sharing_copy, is_activation

logger = logging.getLogger(__name__)

__all__ = ["FAMILIES", "Placement", "PublishedRule", "find_family", "published_placement"]

ATTN_RESIDUAL = "attn_residual"


@dataclass(frozen=True)
class Placement:
    """Module paths of a published placement, each with its channel axis."""

    activations: dict[str, int]  # MeanSparse on the input of these activation modules
    outputs: dict[str, int]  # MeanSparse on the output of these modules


@dataclass(frozen=True)
class PublishedRule:
    """One architecture family: the classes that identify it and where its sites are."""

    family: str
    classes: tuple[str, ...]  # "python.module.ClassName" of the family's network class
    reproduces: str
    place: Callable[[nn.Module, str], Placement]
    prepare: Callable[[nn.Module, str], nn.Module] | None = None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _under(model: nn.Module, root: str) -> Iterator[tuple[str, str, nn.Module]]:
    """(full path, path relative to ``root``, module) of every strict descendant of ``root``."""
    for name, module in model.get_submodule(root).named_modules():
        if name:
            yield _join(root, name), name, module


def _class_name(module: nn.Module) -> str:
    return type(module).__name__


# --- RobustBench WRNs (Meansparse_wrn_70_16.py / _94_16.py / _ra_wrn_70_16.py) -----------
def _wrn(model: nn.Module, root: str) -> Placement:
    """``meansparse_0/1`` before ``relu_0/1`` of each ``_Block``, ``meansparse_2`` on the block's
    output, ``meansparse_end`` before the final ``relu``."""
    activations: dict[str, int] = {}
    outputs: dict[str, int] = {}
    for path, _, module in _under(model, root):
        if _class_name(module) == "_Block":
            for child in ("relu_0", "relu_1"):
                activations[_join(path, child)] = 1
            outputs[path] = 1
    activations[_join(root, "relu")] = 1
    return Placement(activations, outputs)


# --- the paper's ImageNet RaWRN inserter ----------------------------------------------------
def _ra_wrn_imagenet(model: nn.Module, root: str) -> Placement:
    """Every ReLU/SiLU except each block's ``last_activation`` and those on SE paths."""
    activations = {}
    for path, rel, module in _under(model, root):
        parts = rel.split(".")
        if type(module) not in (nn.ReLU, nn.SiLU) or parts[-1] == "last_activation":
            continue
        if "se" in parts or any(_SE_CLASS.match(c) for c in _owner_classes(model, path)):
            continue
        activations[path] = 1
    return Placement(activations, {})


# --- timm Swin (Meansparse_swin_L.py) -----------------------------------------------------------
def _swin_blocks(model: nn.Module, root: str) -> list[str]:
    return [path for path, _, m in _under(model, root) if getattr(m, "_robustify_swin_block", False)
            or _class_name(m) == "SwinTransformerBlock"]


def _swin(model: nn.Module, root: str) -> Placement:
    """Per block: Mlp ``meansparse1`` (fc1 output = GELU input), ``meansparse2`` (fc2 output),
    block ``meansparse1`` (after the attention residual), ``meansparse2`` (after the MLP residual)."""
    activations, outputs = {}, {}
    for block in _swin_blocks(model, root):
        activations[_join(block, "mlp.act")] = -1
        outputs[_join(block, ATTN_RESIDUAL)] = -1
        outputs[_join(block, "mlp.fc2")] = -1
        outputs[block] = -1
    return Placement(activations, outputs)


class _LeafTracer(fx.Tracer):
    """Trace one block only: every child module stays a call, buffers become attributes."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _with_attn_residual(block: nn.Module, name: str) -> fx.GraphModule:
    """``block`` as a GraphModule applying an ``nn.Identity`` (``attn_residual``) to
    ``x + drop_path1(...)``, the attention-residual sum."""
    graph = _LeafTracer().trace(block)
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd)
            and any(getattr(a, "op", None) == "call_module" and a.target == "drop_path1" for a in n.args)]
    if len(adds) != 1:
        raise InsertionError(
            f"Swin block {name!r}: no single 'x + drop_path1(...)' in its forward; this timm version's "
            "SwinTransformerBlock is not the one the published rule was written for"
        )
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__)
    gm.add_submodule(ATTN_RESIDUAL, nn.Identity())
    with gm.graph.inserting_after(adds[0]):
        node = gm.graph.call_module(ATTN_RESIDUAL, (adds[0],))
    adds[0].replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    persistent = {k for k in block.state_dict(keep_vars=True) if "." not in k}
    for buffer in list(gm._buffers):  # keep the block's non-persistent buffers (attn_mask) so
        if buffer not in persistent:  # the state-dict keys stay those of the original
            gm._non_persistent_buffers_set.add(buffer)
    gm._robustify_swin_block = True
    gm.graph.lint()
    gm.recompile()
    return gm


def _prepare_swin(model: nn.Module, root: str) -> nn.Module:
    blocks = [b for b in _swin_blocks(model, root) if not getattr(model.get_submodule(b), "_robustify_swin_block", False)]
    return _replaced(model, {b: _with_attn_residual(model.get_submodule(b), b) for b in blocks})


def _replaced(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with the modules at the given paths replaced; only the containers on
    the way are copied (parameter-sharing), every other module is the original object."""
    if not replacements:
        return model

    def rebuild(module: nn.Module, prefix: str) -> nn.Module:
        if prefix in replacements:
            return replacements[prefix]
        if prefix and not any(p.startswith(prefix + ".") for p in replacements):
            return module
        clone = _parameter_sharing_copy(module)
        for name, child in list(clone._modules.items()):
            if child is not None:
                clone._modules[name] = rebuild(child, _join(prefix, name))
        return clone

    return rebuild(model, "")


# --- timm ConvNeXt (sparsified_model.add_custom_layer_imagenet) ---------------------------------
def _convnext(model: nn.Module, root: str) -> Placement:
    """``Sequential(MeanSparse, GELU)`` for each GELU and ``Sequential(drop_path, MeanSparse)``
    for each ``drop_path`` under ``stages.N``."""
    activations, outputs = {}, {}
    for path, rel, module in _under(model, root):
        if not rel.startswith("stages."):
            continue
        if is_activation(module) and _class_name(module) == "GELU":
            block = model.get_submodule(path.rsplit(".mlp.", 1)[0]) if ".mlp." in path else None
            activations[path] = 1 if getattr(block, "use_conv_mlp", False) else -1
        elif rel.rsplit(".", 1)[-1] == "drop_path":
            outputs[path] = 1
    return Placement(activations, outputs)


_DM = "robustbench.model_zoo.architectures.dm_wide_resnet"
_RA = "robustbench.model_zoo.architectures.robustarch_wide_resnet"

FAMILIES: tuple[PublishedRule, ...] = (
    PublishedRule("dm-wrn", (f"{_DM}.DMWideResNet",),
                  "Amini2024MeanSparse_S-WRN-94-16 (CIFAR-10 Linf), Amini2024MeanSparse_S-WRN-70-16 "
                  "(CIFAR-10 L2, CIFAR-100 Linf)", _wrn),
    PublishedRule("ra-wrn", (f"{_RA}.NormalizedWideResNet",),
                  "Amini2024MeanSparse_Ra_WRN_70_16 (CIFAR-10 Linf)", _wrn),
    PublishedRule("ra-wrn-imagenet", (f"{_RA}.ConfigurableModel", f"{_RA}.NormalizedConfigurableModel"),
                  "the paper's RaWRN-101-2 (ImageNet Linf; not a RobustBench entry)", _ra_wrn_imagenet),
    PublishedRule("swin", ("timm.models.swin_transformer.SwinTransformer",),
                  "Amini2024MeanSparse_Swin-L (ImageNet Linf)", _swin, _prepare_swin),
    PublishedRule("convnext", ("timm.models.convnext.ConvNeXt",),
                  "Amini2024MeanSparse_ConvNeXt-L (ImageNet Linf)", _convnext),
)


def _qualified(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _known() -> str:
    return ", ".join(f"{r.family} ({'/'.join(c.rsplit('.', 1)[-1] for c in r.classes)})" for r in FAMILIES)


def find_family(model: nn.Module) -> tuple[PublishedRule, str]:
    """The published rule covering ``model`` and the path of the network it applies to
    (the outermost module of a known class, e.g. ``model`` inside a normalisation wrapper)."""
    for path, module in model.named_modules():
        qualified = _qualified(module)
        for rule in FAMILIES:
            if qualified in rule.classes:
                return rule, path
    raise InsertionError(
        f"--preset published has no rule for {type(model).__name__}: it knows the families {_known()}; "
        "use --preset all or --include/--outputs patterns instead"
    )


def published_placement(model: nn.Module) -> tuple[nn.Module, Placement, PublishedRule]:
    """Detect the family of ``model``; return the model to insert into (rewritten only for Swin),
    the published placement in it and the rule."""
    rule, root = find_family(model)
    prepared = rule.prepare(model, root) if rule.prepare is not None else model
    placement = rule.place(prepared, root)
    logger.info("published MeanSparse placement of family %r at %r: %d activation input(s), %d module output(s)",
                rule.family, root or "<root>", len(placement.activations), len(placement.outputs))
    return prepared, placement, rule
