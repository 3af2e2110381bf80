"""Front-end choice: symbolic tracing (``torch.fx``) or ``torch.export`` (design §7c).

Contract: :func:`capture` reads the user's model and example inputs and returns a
GraphModule with ``tensor_meta`` on every node, like :func:`.trace.trace`, never mutating
the model. ``frontend="fx"`` traces symbolically (:mod:`.trace`); ``"export"`` captures
with ``torch.export`` (:func:`export_graph`): an ATen-level graph whose ``get_attr``
nodes read the parameters and buffers under the model's own qualified names
(``layer1.0.conv1.weight``), so groups, plans and reports name the same tensors as on the
FX front end; its channel rules are the ATen entries of the one rule table
(:mod:`.aten_rules`). ``"auto"`` (the default) traces symbolically and switches to
``torch.export`` when symbolic tracing fails (a shape check in ``forward``:
``if x.shape[-1] % 2``; Python iteration or item assignment on a traced value; a
``**kwargs`` forward), where export sees concrete example shapes; when the traced graph
fails shape propagation on the example inputs (a ``None`` default argument that tracing
turned into an input: ``~patch_valid``); and when tracing succeeded only by keeping
submodules whole as leaves (:mod:`.trace`'s retry: a shape check inside a block, as in
timm's TinyViT, would otherwise fix the channels of every such block). When both fail,
the FX error (with its advice) is raised with export's reason appended; when export
fails after a leaf retry, the FX graph with its leaves is kept. Why FX was not used is
``gm.meta["fxprune_fx_failure"]``, and :func:`frontend_notes` makes it a report note. With FX-only options
(``leaf_modules``, ``concrete_args``) there is no switch. Which front end made a graph is
recorded in ``gm.meta["fxprune_frontend"]`` (:func:`frontend_of`); ``compile``'s report
says it. Dict example inputs become :class:`.keyword_inputs.KeywordInputs`: export
captures them as keyword inputs (``"auto"`` goes straight to export when they are not the
forward's leading parameters), with ``use_cache=False`` bound where ``forward`` takes it.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx

from ..errors import FxpruneError, TraceError
from . import aten_rules  # noqa: F401  (register the ATen rules)
from .aten_lowering import lower_to_torch
from .export_capture import export_dynamic
from .keyword_inputs import (check_fx_inputs, drop_keyword_check, export_call, fits_fx,
                             keyword_inputs)
from .layer_modules import restore_layer_modules
from .shape_prop import propagate_shapes
from .trace import LEAF_RETRIES, _note_dropped_hooks, as_input_tuple, gc_paused, trace
from .twin import drop_user_hooks, module_twin, own_tensors

__all__ = ["FRONTENDS", "capture", "export_graph", "frontend_of", "frontend_notes"]

log = logging.getLogger(__name__)

FRONTENDS = ("auto", "fx", "export")
META_KEY = "fxprune_frontend"
FX_FAILURE = "fxprune_fx_failure"

def frontend_of(gm: torch.nn.Module) -> str:
    """``"fx"`` or ``"export"``: which front end made ``gm`` (``"fx"`` if unknown)."""
    return getattr(gm, "meta", {}).get(META_KEY, "fx")


def check_model(model: Any) -> None:
    """The public entry points take a ``torch.nn.Module`` (an instance, not its class or
    a model name); anything else raises :class:`TraceError` saying so, before any
    attribute of it is read."""
    if isinstance(model, torch.nn.Module):
        return
    hint = (" (a model name: build the model first, e.g. timm.create_model(name) or "
            "fxprune.models.create_model(name))" if isinstance(model, str) else
            " (a class: instantiate it)" if isinstance(model, type) else "")
    raise TraceError(f"expected a torch.nn.Module instance, got {type(model).__name__} "
                     f"{model!r:.60}{hint}")


def _check_leaf_modules(leaf_modules) -> None:
    """A list (tuple, set) of module classes or names; one class or a string alone is
    refused (not iterated), and so is an instance inside (it would match nothing)."""
    if not isinstance(leaf_modules, (list, tuple, set, frozenset)) \
            or any(not isinstance(m, (str, type)) for m in leaf_modules):
        raise TraceError(f"leaf_modules={leaf_modules!r}: give a list of module classes or "
                         "qualified module names, e.g. leaf_modules=[timm.layers.Mlp, 'head']")


def capture(model: torch.nn.Module, example_inputs: Any = None, *, frontend: str = "auto",
            concrete_args: Optional[Dict[str, Any]] = None, leaf_modules: Sequence[Any] = (),
            share_params: bool = False, lazy: Optional[bool] = None) -> torch.fx.GraphModule:
    """The model's graph from the chosen front end (module docstring); ``share_params``
    and ``lazy`` as in :func:`.trace.trace`."""
    check_model(model)
    _check_leaf_modules(leaf_modules)
    if frontend not in FRONTENDS:
        raise FxpruneError(f"frontend={frontend!r}: choose one of {', '.join(FRONTENDS)}")
    example_inputs = keyword_inputs(model, example_inputs)  # a dict: .keyword_inputs
    if frontend == "auto" and not fits_fx(model, example_inputs):
        frontend = "export"  # keyword inputs symbolic tracing cannot pass positionally
    if frontend == "fx":
        check_fx_inputs(model, example_inputs)
    if frontend == "export" or (frontend == "auto" and _made_by_export(model)):
        return _export(model, example_inputs, leaf_modules, concrete_args, share_params)
    may_switch = frontend == "auto" and example_inputs is not None and not (
        leaf_modules or concrete_args)  # (FX-only options: the user steers symbolic tracing)
    try:
        gm = trace(model, example_inputs, concrete_args=concrete_args,
                   leaf_modules=leaf_modules, share_params=share_params, lazy=lazy)
    except TraceError as exc:
        if not may_switch:
            raise
        log.info("%s: symbolic tracing failed (%s); trying the torch.export front end",
                 type(model).__name__, _cause(exc))
        try:
            gm = _export(model, example_inputs, leaf_modules, concrete_args, share_params)
        except FxpruneError as export_exc:  # both failed: the FX advice, export's reason
            raise TraceError(f"{exc} (The torch.export front end failed too: "
                             f"{_cause(export_exc)})") from exc
        gm.meta[FX_FAILURE] = _cause(exc)
        return gm
    gm.meta.setdefault(META_KEY, "fx")
    if may_switch and gm.meta.get(LEAF_RETRIES):
        return _export_over_leaves(model, example_inputs, share_params, gm)
    return gm


def _export_over_leaves(model, example_inputs, share_params, fx_gm):
    """The export graph of a model that symbolic tracing took only with leaves kept
    whole, or the FX graph with its leaves when export fails too (module docstring)."""
    leaves = ", ".join(f"`{path}` ({type_name})" for path, type_name, *_ in
                       fx_gm.meta[LEAF_RETRIES])
    try:
        gm = export_graph(model, example_inputs, share_params=share_params)
    except FxpruneError as exc:
        log.info("%s: torch.export failed too (%s); keeping the FX graph with %s as leaves",
                 type(model).__name__, _cause(exc), leaves)
        return fx_gm
    log.info("%s: symbolic tracing kept %s whole; the torch.export graph prunes inside them",
             type(model).__name__, leaves)
    gm.meta[FX_FAILURE] = (f"symbolic tracing would keep {leaves} whole as leaves "
                           f"({fx_gm.meta[LEAF_RETRIES][0][2]})")
    return gm


def frontend_notes(gm: torch.nn.Module) -> list:
    """A report note saying why the export front end was used in place of FX, if so."""
    why = getattr(gm, "meta", {}).get(FX_FAILURE)
    return [f"frontend: torch.export, because {why}"] if why else []


def _made_by_export(model: torch.nn.Module) -> bool:
    """A GraphModule the export front end made (a slim model between iterative steps)."""
    return isinstance(model, torch.fx.GraphModule) and frontend_of(model) == "export"


def _export(model, example_inputs, leaf_modules, concrete_args, share_params):
    if leaf_modules or concrete_args:
        raise FxpruneError("leaf_modules= and concrete_args= are options of the FX front end; "
                           "drop them with frontend='export' (torch.export needs neither)")
    if example_inputs is None:
        raise FxpruneError("the torch.export front end needs example_inputs")
    return export_graph(model, example_inputs, share_params=share_params)


def export_graph(model: torch.nn.Module, example_inputs: Any, *,
                 share_params: bool = False) -> torch.fx.GraphModule:
    """``torch.export`` an eval-mode twin of ``model`` (dynamic batch, and sequence for
    token inputs) and return the unlifted ATen GraphModule with shapes propagated on
    ``example_inputs``. ``share_params`` as in :func:`.trace.trace`."""
    with gc_paused():
        if isinstance(model, torch.fx.GraphModule) and frontend_of(model) == "export":
            gm = copy.deepcopy(model).eval()  # a graph of this front end: no re-capture
        else:
            twin = module_twin(model).eval()  # own flags and hooks, shared tensors
            _note_dropped_hooks(drop_user_hooks(twin), model)
            args, kwargs = export_call(twin, example_inputs)  # use_cache=False bound
            gm = _unlifted(export_dynamic(twin, args, kwargs).program)
            # ep.module() refuses train()/eval(); its graph has the eval branches baked
            # in, and restored layer modules (norms) follow the flag like FX's do
            gm.__dict__.pop("train", None)
            gm.__dict__.pop("eval", None)
            _drop_fake_values(gm)
            _plain_calling_convention(gm)
            drop_keyword_check(gm, example_inputs)
            lower_to_torch(gm)
            restore_layer_modules(gm)
            gm.eval()
            if not share_params:
                own_tensors(gm)
        gm.meta[META_KEY] = "export"
        propagate_shapes(gm, as_input_tuple(example_inputs))
    return gm


def _unlifted(program) -> torch.fx.GraphModule:
    """``program.module()`` made picklable, so that slim models ``torch.save`` and
    ``torch.load`` (design §7): without the ``_guards_fn`` submodule torch >= 2.9 calls
    after the placeholders (its ``forward`` is a function made at run time; the input
    checks stay, as the module's pre-hook on the range constraints, torch's own
    alternative), and with the plain FX tracer for unpickling (export's
    ``_ModuleStackTracer`` cannot be rebuilt without its root module)."""
    try:
        gm = program.module(check_guards=False)
    except TypeError:  # an older torch: no guards submodule, the pre-hook checks
        gm = program.module()
    for owner in (gm, gm.graph):
        owner._tracer_cls, owner._tracer_extras = None, {}
    return gm


def _drop_fake_values(gm: torch.fx.GraphModule) -> None:
    """Forget export's fake tensors (``node.meta["val"]``): they hold export's shape
    environment (deep copies of the graph would copy it) and are stale after a rewrite;
    the passes read ``tensor_meta`` from :mod:`.shape_prop`."""
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        node.meta.pop("from_node", None)


def _plain_calling_convention(gm: torch.fx.GraphModule) -> None:
    """Make the graph itself take the flat inputs and return the model's output structure.

    ``ep.module()`` flattens inputs and unflattens outputs in its generated code (pytree
    specs), so its graph returns a flat tuple: passes that run the graph node by node (an
    ``Interpreter``, as scoring does) would see ``(logits,)`` where the model returns
    ``logits``. The output node gets the structure back (tensors, tuples, lists, dicts)
    and the graph plain code generation; the placeholders stay the flat inputs, which are
    the model's positional inputs (then keyword inputs, in order)."""
    from torch.utils import _pytree as pytree
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    structure = pytree.tree_unflatten(flat, info.out_spec)
    if not isinstance(structure, (torch.fx.Node, tuple, list, dict)):
        return  # e.g. a dataclass output: keep the pytree code generation
    output.args = (structure,)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()


def _cause(exc: BaseException) -> str:
    inner = exc.__cause__ or exc
    return f"{type(inner).__name__}: {str(inner).strip().splitlines()[0] if str(inner).strip() else ''}"
