"""Front end, after tracing: where the ``_tensor_constantN`` tensors come from.

Contract: :func:`name_constants` reads a traced graph and its root module (the traced
twin, whose tensors the forward ran on) and writes ``node.meta["fxprune_origin"]`` on
the ``get_attr`` node of every constant that tracing stored; nothing else changes.
The groups show the origin next to such a member (``Member.source``), since the
constant's name does not exist in the user's model.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.fx

__all__ = ["name_constants", "CONSTANT_PREFIX"]

CONSTANT_PREFIX = "_tensor_constant"


def name_constants(graph: torch.fx.Graph, root: torch.nn.Module) -> None:
    """Say where each ``_tensor_constantN`` that tracing made comes from, in
    ``node.meta["fxprune_origin"]`` of its ``get_attr`` node (groups show it): a tensor
    that the forward computed without a Proxy (a buffer sliced by fixed indices,
    ``self.pos[:, :8]``; a tensor kept in a list attribute; ``torch.linspace(...)``) is
    stored as a constant under a name that the user's model does not have. It is mapped
    back by tensor identity to the buffer, parameter or tensor attribute of ``root``
    (the traced twin: the same qualified names as the user's model) it is, or is a view
    of; else it is named a constant created by the forward."""
    sources = _named_tensors(root)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target.startswith(CONSTANT_PREFIX):
            tensor = getattr(root, node.target, None)
            if isinstance(tensor, torch.Tensor):
                node.meta["fxprune_origin"] = _origin(tensor, sources)


def _named_tensors(root: torch.nn.Module) -> Dict[int, Tuple[str, torch.Tensor]]:
    """``id(tensor) -> (description, tensor)`` for every buffer, parameter and tensor
    attribute (also inside list/tuple/dict attributes) of ``root``'s modules."""
    out: Dict[int, Tuple[str, torch.Tensor]] = {}
    for mod_name, mod in root.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for kind, items in (("parameter", mod._parameters.items()),
                            ("buffer", mod._buffers.items()), ("attribute", mod.__dict__.items())):
            for key, value in items:
                if key.startswith(CONSTANT_PREFIX):
                    continue
                if isinstance(value, torch.Tensor):
                    out.setdefault(id(value), (f"{kind} `{prefix}{key}`", value))
                elif kind == "attribute" and isinstance(value, (list, tuple, dict)):
                    pairs = value.items() if isinstance(value, dict) else enumerate(value)
                    for k, v in pairs:
                        if isinstance(v, torch.Tensor):
                            out.setdefault(id(v), (f"tensor `{prefix}{key}[{k!r}]`", v))
    return out


def _origin(tensor: torch.Tensor, sources: Dict[int, Tuple[str, torch.Tensor]]) -> str:
    """A readable origin of a traced constant (see :func:`name_constants`)."""
    if id(tensor) in sources:
        return f"{sources[id(tensor)][0]}, stored by tracing as a constant"
    base = tensor._base
    if base is not None and id(base) in sources:
        what, _ = sources[id(base)]
        index = _slice_text(tensor, base)
        view = f"the view {what.split('`')[1]}{index}" if index else "a view"
        return f"{view} of {what}, which tracing stored as a constant"
    return ("a constant created by the model's forward (a tensor computed without the "
            "traced input, e.g. torch.tensor/linspace, or from a buffer by a Python-level "
            "op); it is not in the model's state_dict")


def _slice_text(view: torch.Tensor, base: torch.Tensor) -> str:
    """``"[:, 0:8]"`` when ``view`` is ``base`` indexed by basic slices, else ``""``."""
    if view.dim() != base.dim():
        return ""
    offset, slices = view.storage_offset() - base.storage_offset(), []
    order = sorted(range(base.dim()), key=lambda d: -base.stride(d))
    starts = [0] * base.dim()
    for d in order:
        if base.stride(d) > 0:
            starts[d], offset = divmod(offset, base.stride(d))
    for d in range(base.dim()):
        step, rem = divmod(view.stride(d), base.stride(d)) if base.stride(d) else (1, 0)
        if rem or step < 1:
            return ""
        slices.append(slice(starts[d], starts[d] + view.shape[d] * step, step))
    try:
        again = base[tuple(slices)]
    except IndexError:
        return ""
    if (again.shape, again.stride(), again.storage_offset()) != (
            view.shape, view.stride(), view.storage_offset()):
        return ""
    text = [":" if (s.start, s.stop, s.step) == (0, base.shape[d], 1) else
            f"{s.start}:{s.stop}" + (f":{s.step}" if s.step != 1 else "")
            for d, s in enumerate(slices)]
    while text and text[-1] == ":":
        text.pop()
    return "[" + ", ".join(text) + "]" if text else ""
