"""Lowering pass: functional layer calls on a submodule's own parameters become calls of
that submodule as a torch layer (``F.conv2d(x, conv1.weight, conv1.bias, ...)`` ->
``conv1(x)`` with ``conv1`` an ``nn.Conv2d``), on graphs of the export front end.

Why: ``ep.module()`` keeps the model's module tree but as plain containers of parameters
and buffers, and every layer as a functional call. Passes beyond the channel rules work
on layer *modules*: the OBS criterion and least-squares repair re-fit ``nn.Linear`` /
``nn.Conv*d`` modules, repair re-estimates ``nn.BatchNorm*d`` statistics, unstructured
pruning masks layer modules' weights, the rewrite resizes modules. With the layers back
as modules, an exported graph of a standard model is the graph symbolic tracing makes.

Which calls: ``F.linear``, ``F.conv1d/2d/3d`` (numeric or string padding),
``F.layer_norm``, ATen's ``batch_norm`` (inference statistics), ATen's ``addmm`` on an
``[in, out]`` weight (Hugging Face's ``Conv1D``: an ``nn.Linear`` over the transposed
view of the same tensor), and ``x @ w.t()`` on a bias-free weight (Falcon's
``FalconLinear``) whose tensors are exactly
the ``weight``/``bias`` (and running statistics) of one submodule that nothing else in
the graph reads. Anything else stays functional and is handled by its rule.

Contract: rewrites ``gm`` in place: the submodule objects at those paths are replaced by
torch layers holding the *same* parameter and buffer tensors (nothing is copied), the call
nodes become ``call_module`` nodes, unused ``get_attr`` nodes are erased; recompiles.
Invariant: every replaced call computes what it did (same tensors, same hyperparameters).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["restore_layer_modules"]

_CONVS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def restore_layer_modules(gm: torch.fx.GraphModule) -> int:
    """Turn eligible functional layer calls into module calls; return how many."""
    readers = _attr_readers(gm)
    count = 0
    for node in list(gm.graph.nodes):
        built = _layer_for(gm, node, readers)
        if built is None:
            continue
        path, layer, x = built
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, layer)
        old_args = node.args
        node.op, node.target, node.args, node.kwargs = "call_module", path, (x,), {}
        for arg in old_args:  # a weight's transpose that only this call read
            if isinstance(arg, torch.fx.Node) and (arg.op, arg.target) in _TRANSPOSES \
                    and not arg.users:
                gm.graph.erase_node(arg)
        count += 1
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return count


def _attr_readers(gm: torch.fx.GraphModule) -> Dict[str, set]:
    """Module path -> the call nodes that read any of its tensors (through get_attr)."""
    out: Dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner = node.target.rpartition(".")[0]
            out.setdefault(owner, set()).update(node.users)
    return out


def _owner_of(node, names: List[str], optional=()) -> Optional[str]:
    """The module path whose tensors ``node``'s arguments are (``names`` in order), else
    None. ``optional`` names may be absent (``None`` argument)."""
    owner = None
    for arg, name in zip(node, names):
        if arg is None and name in optional:
            continue
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
            return None
        path, _, attr = arg.target.rpartition(".")
        if attr != name or (owner is not None and path != owner):
            return None
        owner = path
    return owner or None


def _exclusive(gm, path: str, node, readers, allowed: set) -> bool:
    """``path``'s module is a plain container read only by ``node``, holding no tensors
    besides ``allowed`` and no submodules."""
    mod = gm.get_submodule(path)
    if type(mod) is not nn.Module or any(True for _ in mod.children()):
        return False
    tensors = set(mod._parameters) | set(mod._buffers)
    return readers.get(path) == {node} and tensors <= allowed


def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _layer_for(gm, node, readers):
    """(module path, torch layer, input node) for an eligible call, else None."""
    if node.op == "call_function" and node.target in _CONVS:
        return _conv(gm, node, readers)
    if node.op == "call_function" and node.target is F.linear:
        args = [_arg(node, 1, "weight"), _arg(node, 2, "bias")]
        path = _owner_of(args, ["weight", "bias"], optional=("bias",))
        if path is None or not _exclusive(gm, path, node, readers, {"weight", "bias"}):
            return None
        w, b = (None if a is None else _fetch(gm, a) for a in args)
        layer = _meta_layer(nn.Linear, w.shape[1], w.shape[0], bias=b is not None)
        return path, _adopt(layer, gm.get_submodule(path)), node.args[0]
    if node.op == "call_function" and node.target is F.layer_norm:
        return _layer_norm(gm, node, readers)
    if node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default:
        return _batch_norm(gm, node, readers)
    if node.op == "call_function" and node.target is torch.ops.aten.addmm.default:
        return _transposed_linear(gm, node, readers)
    if node.op == "call_method" and node.target == "matmul":
        return _matmul_linear(gm, node, readers)
    return None


#: ``w.t()`` / ``w.T`` of a 2-D weight as they reach this pass (ATen or lowered). Not
#: :func:`.weight_rules.is_2d_transpose`: this pass runs before shape propagation, so it
#: matches the node kinds and checks the fetched weight's dims itself.
_TRANSPOSES = {("call_function", torch.ops.aten.t.default),
               ("call_function", torch.ops.aten.numpy_T.default), ("call_method", "t")}


def _matmul_linear(gm, node, readers):
    """``x @ w.t()`` on the only tensor of one container (Falcon's ``FalconLinear``
    without bias): an ``nn.Linear`` holding that same weight. The transpose node, read
    only by this product, is erased by :func:`restore_layer_modules`."""
    if len(node.args) != 2 or node.kwargs:
        return None
    x, wt = node.args
    if not (isinstance(wt, torch.fx.Node) and (wt.op, wt.target) in _TRANSPOSES
            and len(wt.args) == 1 and len(wt.users) == 1):
        return None
    path = _owner_of([wt.args[0]], ["weight"])
    if path is None or not _exclusive(gm, path, wt, readers, {"weight"}):
        return None
    w = _fetch(gm, wt.args[0])
    if w.dim() != 2:
        return None
    layer = _meta_layer(nn.Linear, w.shape[1], w.shape[0], bias=False)
    return path, _adopt(layer, gm.get_submodule(path)), x


def _transposed_linear(gm, node, readers):
    """``addmm(bias, x, weight)`` on one container's ``[in, out]`` weight (Hugging Face's
    ``Conv1D``: GPT-2's layers): an ``nn.Linear`` whose weight is a transposed *view* of
    that tensor (same storage, nothing copied) and whose bias is the same tensor."""
    if len(node.args) != 3 or node.kwargs:  # beta / alpha other than 1
        return None
    bias, x, weight = node.args
    path = _owner_of([weight, bias], ["weight", "bias"])
    if path is None or not _exclusive(gm, path, node, readers, {"weight", "bias"}):
        return None
    w, b = _fetch(gm, weight), _fetch(gm, bias)
    if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]:
        return None
    layer = _meta_layer(nn.Linear, w.shape[0], w.shape[1])
    layer.weight = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad)
    layer.bias = b
    layer.train(gm.get_submodule(path).training)
    return path, layer, x


def _conv(gm, node, readers):
    args = [_arg(node, 1, "weight"), _arg(node, 2, "bias")]
    path = _owner_of(args, ["weight", "bias"], optional=("bias",))
    if path is None or not _exclusive(gm, path, node, readers, {"weight", "bias"}):
        return None
    w = _fetch(gm, args[0])
    nd = w.dim() - 2
    stride, padding, dilation = (_arg(node, i, n, d) for i, n, d in
                                 ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)))
    groups = _arg(node, 6, "groups", 1)
    layer = _meta_layer(_CONVS[node.target], w.shape[1] * groups, w.shape[0],
                        tuple(w.shape[2:]), stride=_tuple(stride, nd),
                        padding=padding if isinstance(padding, str) else _tuple(padding, nd),
                        dilation=_tuple(dilation, nd), groups=groups, bias=args[1] is not None)
    return path, _adopt(layer, gm.get_submodule(path)), node.args[0]


def _layer_norm(gm, node, readers):
    args = [_arg(node, 2, "weight"), _arg(node, 3, "bias")]
    path = _owner_of(args, ["weight", "bias"], optional=("bias",))
    if path is None or not _exclusive(gm, path, node, readers, {"weight", "bias"}):
        return None
    layer = _meta_layer(nn.LayerNorm, tuple(_arg(node, 1, "normalized_shape")),
                        eps=_arg(node, 4, "eps", 1e-5), bias=args[1] is not None)
    return path, _adopt(layer, gm.get_submodule(path)), node.args[0]


def _batch_norm(gm, node, readers):
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum,
    eps, cudnn)`` with inference statistics."""
    names = ["weight", "bias", "running_mean", "running_var"]
    args = [_arg(node, i + 1, n) for i, n in enumerate(names)]
    path = _owner_of(args, names)
    allowed = set(names) | {"num_batches_tracked"}
    if path is None or _arg(node, 5, "training") or \
            not _exclusive(gm, path, node, readers, allowed):
        return None
    ndim = len(node.args[0].meta["tensor_meta"].shape) if "tensor_meta" in node.args[0].meta \
        else None
    if ndim not in _BATCH_NORMS:
        return None
    w = _fetch(gm, args[0])
    layer = _meta_layer(_BATCH_NORMS[ndim], w.shape[0], eps=_arg(node, 7, "eps", 1e-5),
                        momentum=_arg(node, 6, "momentum", 0.1))
    layer.eval()
    return path, _adopt(layer, gm.get_submodule(path)), node.args[0]


def _meta_layer(cls, *args, **kwargs) -> nn.Module:
    """A layer built on the meta device: its own tensors are replaced at once."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def _adopt(layer: nn.Module, container: nn.Module) -> nn.Module:
    """Give ``layer`` the container's tensor objects (shared, not copied)."""
    for name in list(layer._parameters):
        layer._parameters[name] = container._parameters.get(name)
    for name in list(layer._buffers):
        layer._buffers[name] = container._buffers.get(name)
    layer.train(container.training)
    return layer


def _fetch(gm, node):
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _tuple(value, n: int):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
