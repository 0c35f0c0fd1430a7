"""Find the activation sites of any model: modules and functional calls, one site per call.

Three steps, all without per-model code:

1. :func:`modularize` traces the model with ``torch.fx`` (activation modules kept as leaves)
   and turns every functional activation (``F.relu``, ``torch.relu``, ``x.relu()``,
   ``F.gelu``...) into an activation module at ``<owner>.<fn>_<k>``; an activation module
   called more than once per forward (RobustBench's PAF networks share one PSSiLU) gets one
   parameter-sharing copy per call. Models that need neither are returned unchanged. A module
   whose own forward FX cannot trace (data-dependent control flow) is kept as it is and its
   submodules are traced one by one (a warning says so); an activation module that such a forward
   calls several times gets one copy per call, chosen by call order (:class:`PerCall`).
2. :func:`probe` runs one forward pass on zeros and records, per activation module, the
   input shape and the module that produced that input.
3. :func:`plan_sites` turns that into :class:`Site` records with the channel axis (dim 1 for
   conv feature maps, the last dim for token/channels-last tensors fed by a ``Linear``)
   and applies the include/exclude patterns.

Besides activation inputs, a site can be the *output* of any named module (a residual block's
sum, a ``Linear``): :func:`plan_output_sites` describes those, in the same forward order.
"""

from __future__ import annotations
from robustify.core.errors import UserError

import copy
import fnmatch
import functools
import itertools
import logging
import operator
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIVATION_CLASS_NAMES",
    "PerCall",
    "Site",
    "is_activation",
    "modularize",
    "plan_output_sites",
    "plan_sites",
    "forward_once",
    "probe",
    "register_activation",
    "select_sites",
    "set_submodule",
]

# Activation module classes, matched exactly by class (timm's GELU is not an nn.GELU) or by
# class name for classes that live in optional packages (timm, robustbench).
ACTIVATION_CLASSES: set[type[nn.Module]] = {
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish,
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardswish,
}
ACTIVATION_CLASS_NAMES: set[str] = {
    # timm.layers.activations / activations_me
    "Swish", "SwishMe", "Mish", "MishMe", "GELU", "GELUTanh", "QuickGELU", "HardSwish",
    "HardSwishMe", "HardMish", "HardMishMe", "PReLU",
    # robustbench parametric / custom activations
    "PSSiLU", "PSiLU", "PSoftplus", "SmoothReLU",
}

# Functional spellings -> factory building the equivalent module from the call's extra args.
_FUNCTIONAL: dict[Any, tuple[str, Callable[..., nn.Module]]] = {
    F.relu: ("relu", lambda inplace=False: nn.ReLU(inplace=inplace)),
    torch.relu: ("relu", lambda: nn.ReLU()),
    torch.relu_: ("relu", lambda: nn.ReLU(inplace=True)),
    F.relu_: ("relu", lambda: nn.ReLU(inplace=True)),
    F.relu6: ("relu6", lambda inplace=False: nn.ReLU6(inplace=inplace)),
    F.gelu: ("gelu", lambda approximate="none": nn.GELU(approximate=approximate)),
    F.silu: ("silu", lambda inplace=False: nn.SiLU(inplace=inplace)),
    F.elu: ("elu", lambda alpha=1.0, inplace=False: nn.ELU(alpha=alpha, inplace=inplace)),
    F.elu_: ("elu", lambda alpha=1.0: nn.ELU(alpha=alpha, inplace=True)),
    F.leaky_relu: ("leaky_relu", lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope, inplace)),
    F.leaky_relu_: ("leaky_relu", lambda negative_slope=0.01: nn.LeakyReLU(negative_slope, inplace=True)),
    F.softplus: ("softplus", lambda beta=1.0, threshold=20.0: nn.Softplus(beta=beta, threshold=threshold)),
    F.mish: ("mish", lambda inplace=False: nn.Mish(inplace=inplace)),
    F.hardswish: ("hardswish", lambda inplace=False: nn.Hardswish(inplace=inplace)),
    F.selu: ("selu", lambda inplace=False: nn.SELU(inplace=inplace)),
}
_METHODS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "relu": ("relu", lambda: nn.ReLU()),
    "relu_": ("relu", lambda: nn.ReLU(inplace=True)),
}

# Squeeze-and-excitation *modules* (not the residual blocks or networks that contain one, such
# as timm's SEResNetBlock or SENet, whose other activations are ordinary sites).
_SE_CLASS = re.compile(r"^(SE|SEModule|SELayer|SEBlock|EffectiveSEModule|SqueezeExcit\w*|SqueezeAndExcit\w*)$")
_LAST_DIM_PRODUCERS = (nn.Linear, nn.LayerNorm)


def register_activation(cls_or_name: type[nn.Module] | str) -> None:
    """Declare an extra activation class (or class name) as an insertion site.

    Args:
        cls_or_name: the activation class, or its class name (matched on any module of that name).

    Examples:
        >>> import torch
        >>> class Swish2(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(2 * x)
        >>> rb.register_activation(Swish2)
    """
    if isinstance(cls_or_name, str):
        ACTIVATION_CLASS_NAMES.add(cls_or_name)
    else:
        ACTIVATION_CLASSES.add(cls_or_name)


def is_activation(module: nn.Module) -> bool:
    return type(module) in ACTIVATION_CLASSES or type(module).__name__ in ACTIVATION_CLASS_NAMES


@dataclass(frozen=True)
class Site:
    """One activation call, or one module's output: where it is, what it is and its channel layout.

    ``position`` is ``"input"`` for the input of activation ``name`` (``activation`` is its
    class) and ``"output"`` for the output of module ``name`` (``activation`` is that
    module's class).

    Examples:
        >>> from robustify.defenses import defense_config, plan_defense
        >>> model, info = rb.load_model("aa-resnet18")
        >>> sites = plan_defense(model, info.example_input(), defense_config("meansparse"))
        >>> sites[0].name, sites[0].position, sites[0].channels
        ('relu_0', 'input', 64)
    """

    name: str
    activation: str
    channel_dim: int
    channels: int
    input_shape: tuple[int, ...]
    order: int
    owner_class: str = ""
    position: str = "input"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


# --------------------------------------------------------------------------------------
# 1. functional calls and shared modules -> one activation module per call (torch.fx)
# --------------------------------------------------------------------------------------
def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted path ``name`` (``nn.Module.set_submodule`` needs torch 2.5)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


class _InPlaceProxy(fx.Proxy):
    """A proxy that records ``a += b`` (and ``-=``, ``*=``, ``/=``) as in-place operations.

    ``fx.Proxy`` has no in-place operators, so Python falls back to ``a = a + b``: the
    rewritten model would allocate a new tensor at every residual connection (``out +=
    shortcut``), about 5% slower on a ResNet-18 on CPU, where large allocations are
    page-faulted in afresh. Recording ``operator.iadd`` keeps the original semantics.
    """

    def __iadd__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


class _ActivationLeafTracer(fx.Tracer):
    """Keeps activation modules, and the modules in ``opaque`` (ids of modules whose own forward FX
    cannot trace), as leaves."""

    def __init__(self, opaque: set[int] | frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_activation(m) or id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)


def _owner(node: fx.Node, exclude: str | None = None) -> str:
    stack = node.meta.get("nn_module_stack") or OrderedDict()
    paths = [path for path, _ in stack.values() if path != exclude]
    return paths[-1] if paths else ""


def _free_name(root: nn.Module, owner: str, base: str, taken: Counter) -> str:
    while True:
        k = taken[(owner, base)]
        taken[(owner, base)] += 1
        name = f"{owner}.{base}_{k}" if owner else f"{base}_{k}"
        try:
            root.get_submodule(name)
        except AttributeError:
            parent = root.get_submodule(owner) if owner else root
            if not hasattr(parent, f"{base}_{k}"):
                return name


def _module_from_call(node: fx.Node) -> tuple[str, nn.Module] | None:
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        base, factory = _FUNCTIONAL[node.target]
    elif node.op == "call_method" and node.target in _METHODS:
        base, factory = _METHODS[node.target]
    else:
        return None
    extra = list(node.args[1:])
    kwargs = {k: v for k, v in node.kwargs.items() if k != "input"}
    if any(isinstance(a, fx.Node) for a in [*extra, *kwargs.values()]):
        logger.warning("activation call %s has non-constant arguments; left as is", node.format_node())
        return None
    try:
        return base, factory(*extra, **kwargs)
    except TypeError:
        logger.warning("activation call %s has unsupported arguments; left as is", node.format_node())
        return None


def _parameter_sharing_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters (same tensors) and no hooks."""
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(clone, attr, OrderedDict(getattr(module, attr)))
    for attr in list(clone.__dict__):
        if attr.endswith("_hooks") or attr.endswith("_hooks_with_kwargs") or attr.endswith("_always_called"):
            if isinstance(clone.__dict__[attr], dict):
                clone.__dict__[attr] = OrderedDict()
    return clone


def _redirect_later_uses(x: fx.Node, activated: fx.Node) -> None:
    """After an in-place activation ``x.relu_()``, the code goes on using ``x``: make every later
    use of ``x`` read the activation's output (whose result may be unused), so that the
    activation, and the MeanSparse module run in front of it, are not lost from the graph."""
    later: set[fx.Node] = set()
    node = activated.next
    while node.op != "root":
        later.add(node)
        node = node.next
    x.replace_all_uses_with(activated, delete_user_cb=lambda user: user in later)


def _trace_leaving_attributes(tracer: fx.Tracer, model: nn.Module) -> fx.Graph:
    """``tracer.trace(model)``, then every module's attributes as they were before: a forward that
    assigns one (``self.t = self.t.type_as(x)``, as RobustBench's SODEF layers do) would leave an
    fx Proxy there, and the next real forward would fail. Attributes the tracer adds (tensor
    constants) stay: the graph refers to them."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        return tracer.trace(model)
    finally:
        for module, before in saved:
            now = vars(module)
            for key in [k for k, v in now.items() if k not in before and isinstance(v, fx.Proxy)]:
                del now[key]
            now.update(before)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _traceable_parts(model: nn.Module) -> tuple[set[int], dict[int, tuple[fx.Tracer, fx.Graph]]]:
    """Which modules FX cannot trace, and the graphs of the largest ones it can.

    Top down: a module that traces (with the untraceable modules found so far as leaves) is done;
    one that does not has its children visited first and is then traced once more with the
    untraceable ones among them as leaves; if it still fails, its own forward is untraceable
    (data-dependent control flow, iteration over a tensor...) and it becomes *opaque*: a leaf of
    the graph of its parent, whose children are rewritten one by one (see :func:`_rewrite`).
    Returns the ids of the opaque modules and, per traced module, its tracer and graph.
    """
    opaque: set[int] = set()
    graphs: dict[int, tuple[fx.Tracer, fx.Graph]] = {}

    def trace(module: nn.Module) -> Exception | None:
        tracer = _ActivationLeafTracer(opaque)
        try:
            graphs[id(module)] = (tracer, _trace_leaving_attributes(tracer, module))
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "look inside"
            return exc
        return None

    def searchable(child: nn.Module) -> bool:
        """Whether ``child`` may hold activation calls of its own: not an activation, not known opaque, and a
        container or a class of its own (torch.nn's leaf layers have none)."""
        return not is_activation(child) and id(child) not in opaque and (
            bool(child._modules) or not type(child).__module__.startswith("torch.nn."))

    def visit(module: nn.Module, path: str) -> None:
        if trace(module) is None:
            return
        for name, child in module.named_children():
            if searchable(child):
                visit(child, f"{path}.{name}" if path else name)
        error = trace(module)
        if error is not None:
            opaque.add(id(module))
            open_containers(module)
            if type(module).forward is not nn.Module.forward:  # a ModuleList/ModuleDict has no forward to search
                failures.setdefault(type(module).__name__, (path or "<model>", _first_line(error), []))[2].append(path)

    def open_containers(module: nn.Module) -> None:
        """An untraceable forward may index its ``nn.Sequential`` children: they stay Sequentials (their
        elements are rewritten one by one) rather than becoming a graph module."""
        for child in module.children():
            if isinstance(child, nn.Sequential) and id(child) not in opaque:
                opaque.add(id(child))
                graphs.pop(id(child), None)
                for grandchild in child.children():
                    if searchable(grandchild):
                        visit(grandchild, "")
                open_containers(child)

    failures: dict[str, tuple[str, str, list[str]]] = {}
    visit(model, "")
    for cls, (first, reason, paths) in failures.items():
        logger.warning(
            "torch.fx could not trace the forward of %s (%d module(s), first at %r: %s): functional activation "
            "calls (F.relu, ...) in it are not searched; its submodules are traced one by one",
            cls, len(paths), first, reason,
        )
    return opaque, graphs


def _structural_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same parameters, buffers, children and hooks (its own dicts of them), so
    that children can be replaced without touching ``module``."""
    clone = object.__new__(type(module))  # not copy.copy: a GraphModule's __reduce__ would rebuild it
    clone.__dict__ = dict(module.__dict__)
    for attr, value in list(clone.__dict__.items()):
        if isinstance(value, dict) and (attr in ("_parameters", "_buffers", "_modules") or "hooks" in attr):
            clone.__dict__[attr] = type(value)(value)
    return clone


def _rewrite_graph(model: nn.Module, tracer: fx.Tracer, graph: fx.Graph) -> nn.Module:
    """One activation module per activation call in the traced ``graph`` of ``model`` (``model`` if none is needed)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    todo = []
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if is_activation(module) and calls[node.target] > 1:
                todo.append(node)
        elif _module_from_call(node) is not None:
            todo.append(node)
    if not todo:
        return model

    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    taken: Counter = Counter()
    n_functional = n_shared = 0
    for node in todo:
        if node.op == "call_module":
            source = gm.get_submodule(node.target)
            owner = _owner(node, exclude=node.target)
            name = _free_name(gm, owner, node.target.rsplit(".", 1)[-1], taken)
            gm.add_submodule(name, _parameter_sharing_copy(source))
            node.target = name
            n_shared += 1
            continue
        made = _module_from_call(node)
        assert made is not None
        base, module = made
        name = _free_name(gm, _owner(node), base, taken)
        gm.add_submodule(name, module)
        x = node.args[0] if node.args else node.kwargs["input"]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        if getattr(module, "inplace", False) and isinstance(x, fx.Node):
            _redirect_later_uses(x, new)
        gm.graph.erase_node(node)
        n_functional += 1
    gm.delete_all_unused_submodules()
    for key, value in vars(model).items():  # plain attributes, for a caller (an untraceable forward) that reads them
        if not key.startswith("_") and key not in vars(gm) and not isinstance(value, (nn.Module, torch.Tensor)):
            setattr(gm, key, value)
    gm.graph.lint()
    gm.recompile()
    logger.info(
        "torch.fx: %d functional activation call(s) made modules, %d shared-module call(s) separated in %s",
        n_functional, n_shared, type(model).__name__,
    )
    return gm


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The entries of ``named`` (``named_modules`` order) not inside an earlier one."""
    kept: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if not any(name.startswith(f"{k}.") for k, _ in kept):
            kept.append((name, module))
    return kept


def _rewrite(module: nn.Module, opaque: set[int], graphs: dict[int, tuple[fx.Tracer, fx.Graph]]) -> nn.Module:
    """``module`` rewritten: from its graph if FX traced it, else child by child; itself if nothing changed."""
    if id(module) not in opaque:
        result = _rewrite_graph(module, *graphs[id(module)])
        inner = _outermost([(name, m) for name, m in result.named_modules() if name and id(m) in opaque])
    else:
        result, inner = module, [(name, child) for name, child in module.named_children()
                                 if id(child) in opaque or id(child) in graphs]
    replaced = {name: new for name, child in inner if (new := _rewrite(child, opaque, graphs)) is not child}
    if not replaced:
        return result
    if result is module:
        result = _structural_copy(module)
    for name, new in replaced.items():  # copy the containers on the way, so that ``module`` is not modified
        parent = result
        for part in name.split(".")[:-1]:
            parent._modules[part] = _structural_copy(parent._modules[part])
            parent = parent._modules[part]
        parent._modules[name.rsplit(".", 1)[-1]] = new
    return result


class PerCall(nn.Module):
    """Stands in for an activation module that a forward FX could not trace calls several times: the
    ``k``-th call in one forward of its owner (the module holding it, whose forward pre-hook resets the
    count and hands itself over) runs the owner's child ``calls[k]``, a parameter-sharing copy named
    ``<name>_<k>``, so that each call is its own site (a defense may replace that child). More calls than
    copies in one forward of the owner is an error."""

    def __init__(self, name: str, calls: Sequence[str]) -> None:
        super().__init__()
        self.name = name
        self.calls = list(calls)  # names of the owner's children, looked up at each call
        self.next = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        k = self.next
        if k >= len(self.calls):
            raise RuntimeError(f"activation {self.name!r} was called more than the {len(self.calls)} times per "
                               "forward of its owner seen when its calls were separated")
        owner = self.__dict__.get("_owner")  # a plain attribute (not a submodule), set by the owner's pre-hook
        if owner is None:
            raise RuntimeError(f"activation {self.name!r} was called outside its owner's forward")
        self.next = k + 1
        return owner._modules[self.calls[k]](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.name!r}, calls {self.calls}"


def _reset_calls(dispatchers: list[PerCall], module: nn.Module, args: Any) -> None:
    for d in dispatchers:
        d.next = 0
        d.__dict__["_owner"] = module


def _calls_per_owner_forward(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Per activation module called more than once in one forward of the module holding it: that count (max)."""
    counts: Counter = Counter()
    most: Counter = Counter()
    handles = []

    def count(name: str, module: nn.Module, args: Any) -> None:
        counts[name] += 1
        most[name] = max(most[name], counts[name])

    def reset(names: list[str], module: nn.Module, args: Any) -> None:
        for name in names:
            counts[name] = 0

    children: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if is_activation(module) and name:
            children.setdefault(name.rpartition(".")[0], []).append(name)
            handles.append(module.register_forward_pre_hook(functools.partial(count, name)))
    for owner, names in children.items():
        handles.append(model.get_submodule(owner).register_forward_pre_hook(functools.partial(reset, names)))
    forward_once(model, example, handles)
    return {name: k for name, k in most.items() if k > 1}


def _separate_shared_calls(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Give every activation module that an untraceable forward calls several times one copy per call (:class:`PerCall`)."""
    shared = _calls_per_owner_forward(model, example)
    if not shared:
        return model
    result = _structural_copy(model)
    owners: dict[str, list[PerCall]] = {}
    for name, k in shared.items():
        owner_path, _, attr = name.rpartition(".")
        parent = result
        for part in owner_path.split(".") if owner_path else []:  # copies on the way: the input is not modified
            if parent._modules[part] is not None and not getattr(parent._modules[part], "_robustify_copy", False):
                parent._modules[part] = _structural_copy(parent._modules[part])
                parent._modules[part]._robustify_copy = True
            parent = parent._modules[part]
        source = parent._modules[attr]
        calls: list[str] = []
        for i in itertools.count():
            if len(calls) == k:
                break
            if f"{attr}_{i}" not in parent._modules and not hasattr(parent, f"{attr}_{i}"):
                calls.append(f"{attr}_{i}")
                parent._modules[calls[-1]] = _parameter_sharing_copy(source)
        parent._modules[attr] = PerCall(name, calls)
        owners.setdefault(owner_path, []).append(parent._modules[attr])
    for owner_path, dispatchers in owners.items():
        owner = result.get_submodule(owner_path) if owner_path else result
        owner.register_forward_pre_hook(functools.partial(_reset_calls, dispatchers))
    for module in result.modules():
        module.__dict__.pop("_robustify_copy", None)
    logger.info("%d activation module(s) called several times by a forward torch.fx could not trace: one copy per "
                "call (%d calls)", len(shared), sum(shared.values()))
    return result


def modularize(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Return ``model`` with one activation module per activation call (see module doc).

    When FX cannot trace a module's own forward (data-dependent control flow, a top-level wrapper
    that picks a branch at run time), that module stays as it is and each of its submodules is
    traced on its own (recursively), so the traceable parts are still searched. An activation
    module that such a forward calls more than once is separated by call order (:class:`PerCall`)
    when an ``example`` input is given (one forward counts the calls); without one it stays shared
    and :func:`plan_sites` reports it.

    The input model is not modified. If nothing needs rewriting, it is returned as is.
    """
    opaque, graphs = _traceable_parts(model)
    result = _rewrite(model, opaque, graphs)
    if example is not None and opaque:
        result = _separate_shared_calls(result, example)
    if result is not model:
        result._robustify_classes = {path: type(m).__name__ for path, m in model.named_modules()}
    return result


# --------------------------------------------------------------------------------------
# 2. probe: one forward pass to learn shapes and producers
# --------------------------------------------------------------------------------------
@dataclass
class _Observation:
    shape: tuple[int, ...]
    producer: nn.Module | None
    order: int
    calls: int = 1


def probe(model: nn.Module, example: torch.Tensor) -> dict[str, _Observation]:
    """Run ``model(example)`` once and record every activation module's input."""
    observations: dict[str, _Observation] = {}
    last_leaf: list[nn.Module | None] = [None]

    def leaf_hook(module: nn.Module, args: Any, output: Any) -> None:
        last_leaf[0] = module

    def make_pre_hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in observations:
                observations[name].calls += 1
                return
            x = args[0]
            observations[name] = _Observation(tuple(x.shape), last_leaf[0], len(observations))

        return pre_hook

    handles = _hook_activations_and_leaves(model, make_pre_hook, leaf_hook)
    forward_once(model, example, handles)
    return observations


def _hook_activations_and_leaves(
    model: nn.Module, make_pre_hook: Callable[[str], Callable[..., None]], leaf_hook: Callable[..., None]
) -> list[Any]:
    """A forward pre-hook on every activation module, a forward hook on every other leaf."""
    handles = []
    for name, module in model.named_modules():
        if is_activation(module):
            handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
        elif not list(module.children()) and not isinstance(module, PerCall):
            handles.append(module.register_forward_hook(leaf_hook))
    return handles


def forward_once(model: nn.Module, example: torch.Tensor, handles: Sequence[Any] = ()) -> None:
    """One no-grad eval-mode forward pass, then remove ``handles`` and restore the train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _producer_width(module: nn.Module | None) -> int | None:
    """The number of output features/channels of the module that produced a site's input."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


def _channel_dim(obs: _Observation) -> int:
    """Dim 1 for NCHW maps, the last dim for tokens and channels-last tensors.

    The producer decides: ``Linear``/``LayerNorm`` write their features last, convolutions and
    batch norms write channels on dim 1; when the input was permuted in between (e.g. a conv
    followed by ``permute(0, 2, 3, 1)``), the axis whose size is the producer's width wins.
    """
    if len(obs.shape) <= 2:
        return 1
    last_first = isinstance(obs.producer, _LAST_DIM_PRODUCERS)
    width = _producer_width(obs.producer)
    if width is not None and obs.shape[-1] == width and obs.shape[1] != width:
        return -1
    if width is not None and obs.shape[1] == width and obs.shape[-1] != width:
        return 1
    return -1 if last_first else 1


def _owner_classes(model: nn.Module, name: str) -> list[str]:
    """Class names of the modules enclosing site ``name``, outermost first.

    ``fx.GraphModule`` keeps the hierarchy but not the classes, so a traced model carries
    the class names of the model it was traced from (``_robustify_classes``).
    """
    known: dict[str, str] = getattr(model, "_robustify_classes", {})
    parts = name.split(".")[:-1]
    classes = []
    for i in range(1, len(parts) + 1):
        path = ".".join(parts[:i])
        if path in known:
            classes.append(known[path])
        else:
            try:
                classes.append(type(model.get_submodule(path)).__name__)
            except AttributeError:
                break
    return classes


# --------------------------------------------------------------------------------------
# 3. plan: select and describe the sites
# --------------------------------------------------------------------------------------
PRESETS: dict[str, str] = {
    "all": "every activation call (MeanSparse's 'before every activation')",
    "no-final": "every activation call except the last one in forward order (the final pre-pooling activation)",
}
#: presets a defense plans itself from the model's architecture (their :func:`select_sites` is the defense's)
FAMILY_PRESETS: dict[str, str] = {}


def register_preset(name: str, description: str, *, by_family: str = "") -> None:
    """Add a placement preset; ``by_family``: the function of the defense that plans it from the model's
    architecture (the preset then needs the model, not the site list alone)."""
    PRESETS[name] = description
    if by_family:
        FAMILY_PRESETS[name] = by_family


def _site(model: nn.Module, module: nn.Module, name: str, obs: _Observation, channel_dim: int | None,
          position: str) -> Site:
    """The :class:`Site` at the ``position`` ("input"/"output") of ``module`` observed as ``obs``."""
    cdim = _channel_dim(obs) if channel_dim is None else channel_dim
    if not -len(obs.shape) <= cdim < len(obs.shape):
        raise UserError(f"channel_dim {cdim} is out of range for site {name!r}, whose {position} has shape {obs.shape}")
    owners = _owner_classes(model, name)
    return Site(name=name, activation=type(module).__name__, channel_dim=cdim, channels=int(obs.shape[cdim]),
                input_shape=obs.shape, order=obs.order, owner_class=owners[-1] if owners else "", position=position)


def plan_sites(model: nn.Module, example: torch.Tensor, channel_dim: int | None = None) -> list[Site]:
    """Describe every activation site of an already :func:`modularize`-d model.

    ``channel_dim`` forces the channel axis of every site (default: inferred per site).
    """
    observations = probe(model, example)
    modules = dict(model.named_modules())
    sites = []
    for name, obs in sorted(observations.items(), key=lambda kv: kv[1].order):
        if obs.calls > 1:
            raise RuntimeError(
                f"activation module {name!r} is called {obs.calls} times per forward; separating the "
                "call sites needs torch.fx, which could not trace this model (see the warning above)"
            )
        sites.append(_site(model, modules[name], name, obs, channel_dim, "input"))
    return sites


def select_sites(
    model: nn.Module,
    sites: Sequence[Site],
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    skip_se: bool = True,
    preset: str = "all",
) -> list[Site]:
    """Apply a placement preset and glob patterns (``fnmatch``) on site names.

    ``skip_se`` drops sites inside squeeze-and-excitation blocks (the MeanSparse paper
    skips them).
    """
    if preset not in PRESETS:
        raise UserError(f"unknown placement preset {preset!r}; choose from {sorted(PRESETS)}")
    if preset in FAMILY_PRESETS:
        raise UserError(f"the {preset!r} preset needs the model's architecture family: use {FAMILY_PRESETS[preset]}")
    candidates = list(sites)
    if preset == "no-final" and candidates:
        candidates = candidates[:-1]
    selected = []
    for site in candidates:
        if not any(fnmatch.fnmatchcase(site.name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(site.name, p) for p in exclude):
            continue
        if skip_se and any(_SE_CLASS.match(c) for c in _owner_classes(model, site.name)):
            continue
        selected.append(site)
    return selected


def _output_probe(model: nn.Module, example: torch.Tensor, names: Sequence[str]) -> dict[str, tuple[_Observation, int]]:
    """One forward pass: per module of ``names``, its output's observation and the number of
    distinct activation modules that had received an input before that output was produced."""
    observations: dict[str, tuple[_Observation, int]] = {}
    activations_seen: set[str] = set()
    last_leaf: list[nn.Module | None] = [None]

    def leaf_hook(module: nn.Module, args: Any, output: Any) -> None:
        if _producer_width(module) is not None:  # Identity/Dropout/DropPath keep the layout
            last_leaf[0] = module

    def make_activation_hook(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            activations_seen.add(name)

        return pre_hook

    def make_output_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in observations:
                observations[name][0].calls += 1
                return
            if not isinstance(output, torch.Tensor):
                raise UserError(
                    f"module {name!r} ({type(module).__name__}) returns {type(output).__name__}, not a tensor: "
                    "its output cannot be a defense site"
                )
            producer = module if _producer_width(module) is not None else last_leaf[0]
            observations[name] = (_Observation(tuple(output.shape), producer, len(observations)), len(activations_seen))

        return hook

    handles = _hook_activations_and_leaves(model, make_activation_hook, leaf_hook)
    modules = dict(model.named_modules())
    handles += [modules[name].register_forward_hook(make_output_hook(name)) for name in names]
    forward_once(model, example, handles)
    return observations


def plan_output_sites(
    model: nn.Module,
    example: torch.Tensor,
    names: Sequence[str],
    activation_sites: Sequence[Site] = (),
    channel_dim: int | None = None,
) -> list[Site]:
    """Describe the output sites of modules ``names`` and merge them with ``activation_sites``.

    Returns every site (activation inputs and module outputs) in forward order, ``order``
    renumbered from 0. A module that does not run exactly once per forward, or does not
    return a tensor, is an error.
    """
    observations = _output_probe(model, example, names)
    modules = dict(model.named_modules())
    keyed: list[tuple[float, int, Site]] = [(float(s.order), 0, s) for s in activation_sites]
    for name in names:
        if name not in observations:
            raise UserError(
                f"module {name!r} ({type(modules[name]).__name__}) did not run in the forward pass "
                "(a container whose forward torch.fx inlined, or an unused module): its output cannot be a site"
            )
        obs, after = observations[name]
        if obs.calls > 1:
            raise UserError(f"module {name!r} runs {obs.calls} times per forward: its output is not one site")
        keyed.append((after - 0.5, 1 + obs.order, _site(model, modules[name], name, obs, channel_dim, "output")))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [replace(site, order=i) for i, (_, _, site) in enumerate(keyed)]
