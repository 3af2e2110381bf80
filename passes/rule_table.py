"""The channel-rule registry: one table keyed by module type, function, or method name.

A rule is ``rule(ctx: RuleContext) -> label`` where the label describes the node's
output (a :class:`~.labels.TLabel`, a list of them for tuple outputs, or ``None``
for non-tensors). Rules read input labels through ``ctx`` and write coupling
(``ctx.space.union``), unsoundness (``ctx.space.block``) and member roles
(``ctx.space.set_role``). Rules come in families (passthrough, elementwise,
reduce, reshape, ...) registered for many targets at once, JAX-batching-rule style.
Nodes with no rule fail closed (:func:`unknown_rule`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx

from ..registry import Registry
from .labels import ChannelSpace, TLabel
from .trace import LEAF_REASON

Rule = Callable[["RuleContext"], Any]


class RuleTable:
    """Entries keyed by op: module type (looked up along the MRO), function, method
    name, or a function's / class's qualified name. One table per per-op fact: channel
    rules (:data:`RULES`), module resizing and literal patching (:mod:`.rewrite_rules`),
    FLOPs' contracted dims (:mod:`.count`)."""

    def __init__(self, what: str = "channel rule") -> None:
        self.modules = Registry(f"{what} for module type")
        self.functions = Registry(f"{what} for function")
        self.methods = Registry(f"{what} for method")
        # by qualified name ("torchvision.ops.stochastic_depth.stochastic_depth"): rules
        # for other libraries' ops without importing those libraries
        self.named = Registry(f"{what} for qualified name")

    def module(self, *types: type, overwrite: bool = False) -> Callable[[Rule], Rule]:
        return self.modules.register(*types, overwrite=overwrite)

    def function(self, *targets: Any, overwrite: bool = False) -> Callable[[Rule], Rule]:
        return self.functions.register(*targets, overwrite=overwrite)

    def method(self, *names: str, overwrite: bool = False) -> Callable[[Rule], Rule]:
        return self.methods.register(*names, overwrite=overwrite)

    def by_name(self, *names: str, overwrite: bool = False) -> Callable[[Rule], Rule]:
        """Register for functions or module classes named ``module.qualname``."""
        return self.named.register(*names, overwrite=overwrite)

    @staticmethod
    def alias(like: Any, *targets: Any) -> None:
        """``targets`` (ATen overloads) take the arguments of ``like`` (a torch function
        or a method name) and share its entry in every table (channel rule, rewrite,
        FLOPs): :data:`ALIASES`."""
        for t in targets:
            ALIASES.add(t, like)

    def lookup(self, node: torch.fx.Node, gm: torch.fx.GraphModule,
               modules: Optional[Dict[str, torch.nn.Module]] = None) -> Optional[Rule]:
        if node.op == "call_module":
            mod = modules[node.target] if modules is not None else gm.get_submodule(node.target)
            return self.for_module(mod)
        if node.op == "call_function":
            rule = self.functions.get(node.target)
            like = canonical(node.target)
            if rule is None and like is not node.target:
                rule = self.methods.get(like) if isinstance(like, str) else self.functions.get(like)
            if rule is None and self.named:
                rule = self.named.get(_qualname(node.target))
            return rule
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None

    def for_module(self, mod: torch.nn.Module) -> Optional[Rule]:
        """The entry of ``mod``'s class or its nearest registered base class."""
        for cls in type(mod).__mro__:
            if cls in self.modules:
                return self.modules[cls]
            if self.named and _qualname(cls) in self.named:
                return self.named[_qualname(cls)]
        return None


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


#: ATen overloads (torch.export graphs) that take the arguments of a torch function or a
#: tensor method: ``aten.layer_norm.default`` -> ``F.layer_norm``, ``aten.view.default``
#: -> ``"view"``. One fact per op, shared by every table's lookup (channel rules, rewrite,
#: FLOPs) and read by the verify pass through :func:`canonical`.
ALIASES = Registry("ATen alias")

RULES = RuleTable()


def canonical(target: Any) -> Any:
    """The torch function or method name an ATen overload stands for (itself otherwise)."""
    try:
        return ALIASES.get(target, target)
    except TypeError:  # an unhashable target
        return target


def target_name(node: torch.fx.Node) -> str:
    """The op's name as the rules and the rewrite know it: a method's name, a function's
    ``__name__``, an ATen overload's torch-level name (``aten.view.default`` -> ``view``)."""
    if node.op == "call_method":
        return node.target
    target = canonical(node.target)
    return target if isinstance(target, str) else getattr(target, "__name__", "")


class LazyText:
    """A string computed on first use (``str()``/f-strings). Rules pass ``ctx.where`` to
    every ``union`` but it is only spelled out when something is blocked."""

    __slots__ = ("_make", "_text")

    def __init__(self, make: Callable[[], str]):
        self._make, self._text = make, None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._make()
        return self._text

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    __repr__ = __str__


@dataclass
class RuleContext:
    node: torch.fx.Node
    space: ChannelSpace
    gm: torch.fx.GraphModule
    labels: Dict[torch.fx.Node, Any]
    modules: Optional[Dict[str, torch.nn.Module]] = None  # gm.named_modules(), if cached

    @property
    def where(self) -> LazyText:
        """``node `name` (op)``: where a block happened (formatted only when used)."""
        return LazyText(lambda: f"node `{self.node.name}` ({describe_target(self.node, self.gm)})")

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def label(self, value: Any) -> Any:
        """Label of an argument: nodes map to their label, containers map elementwise."""
        if isinstance(value, torch.fx.Node):
            return self.labels.get(value)
        if isinstance(value, (list, tuple)):
            return [self.label(v) for v in value]
        return None

    def module(self) -> torch.nn.Module:
        if self.modules is not None:
            return self.modules[self.node.target]
        return self.gm.get_submodule(self.node.target)

    @property
    def out_shape(self) -> Optional[Tuple[int, ...]]:
        return shape_of(self.node)

    def tensor_args(self):
        """(label, shape) of every tensor argument, positional then keyword."""
        out = []
        for a in list(self.node.args) + list(self.node.kwargs.values()):
            for item in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(item, torch.fx.Node) and shape_of(item) is not None:
                    out.append((self.labels.get(item), shape_of(item)))
        return out


def shape_of(node: Any) -> Optional[Tuple[int, ...]]:
    """Concrete shape of a tensor-valued node, else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(map(int, meta.shape))


def describe_target(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} `{node.target}`"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = node.target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))


def as_tlabel(label: Any, shape: Optional[Tuple[int, ...]]) -> Optional[TLabel]:
    """A tensor argument's label, or an untracked one if it has none."""
    if isinstance(label, TLabel):
        return label
    if shape is None:
        return None
    return TLabel.untracked(len(shape))


def unknown_rule(ctx: RuleContext) -> Any:
    """Fail closed: every channel touching an op we have no rule for is unprunable,
    and the op's tensor outputs carry no channels."""
    reason = (ctx.node.meta.get(LEAF_REASON)  # a leaf kept by trace's retry
              or f"unknown op {describe_target(ctx.node, ctx.gm)} at node `{ctx.node.name}`")
    for a in list(ctx.node.args) + list(ctx.node.kwargs.values()):
        ctx.space.block_label(ctx.label(a), reason)
    if ctx.node.op == "call_module":
        for name, p in list(ctx.module().named_parameters()) + list(ctx.module().named_buffers()):
            target = f"{ctx.node.target}.{name}"
            ctx.space.block_label(ctx.space.param_label(target, p.shape), reason)
    return untracked_output(ctx.node)


def untracked_output(node: torch.fx.Node) -> Any:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return TLabel.untracked(len(meta.shape))
    if isinstance(meta, (list, tuple)):
        return [TLabel.untracked(len(m.shape)) if hasattr(m, "shape") else None for m in meta]
    return None
