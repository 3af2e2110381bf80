"""Front end: the example inputs a plan was made on, recorded and rebuilt.

Contract: :func:`input_spec` reads the example inputs of a compile (a tuple of tensors, or
:class:`~.keyword_inputs.KeywordInputs`) and returns JSON-safe data that
``compile`` stores in ``plan.meta["inputs"]``: per tensor its shape and dtype, and for
an integer (or bool) tensor the smallest and largest value it holds; for keyword inputs
their names and the non-tensor values bound at capture (``output_hidden_states=True``).
:func:`inputs_from_spec` rebuilds inputs of the same kind (positional, or keyword inputs
with the same names and constants), shapes and dtypes from it, so that
``fxprune.apply_plan(model, plan)`` needs no ``example_inputs`` for token models either:

* a floating tensor is zeros in the model's floating dtype (as plans without a spec
  were replayed: their ``input_shapes``);
* an integer tensor whose values were all 0 or 1 (an attention mask) is ones: nothing
  masked;
* any other integer tensor (token ids, type ids) holds seeded random values between the
  recorded smallest and largest, so every id is one the model took (an embedding row).

Neither function mutates its inputs. A constant JSON cannot hold is recorded by name
only, and rebuilding then raises :class:`~fxprune.errors.FxpruneError` saying to pass
``example_inputs``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..criteria.scoring import module_device_dtype
from ..errors import FxpruneError
from .keyword_inputs import KeywordInputs

__all__ = ["input_spec", "inputs_from_spec"]

_JSON_SCALARS = (bool, int, float, str, type(None))
_SEED = 0


def input_spec(inputs: Any) -> Dict[str, Any]:
    """JSON-safe description of ``inputs`` (module docstring)."""
    tensors = [_tensor_spec(x) for x in inputs if torch.is_tensor(x)]
    spec: Dict[str, Any] = {"tensors": tensors}
    if isinstance(inputs, KeywordInputs):
        spec["names"] = list(inputs.names)
        spec["constants"] = {k: v for k, v in inputs.constants.items()
                             if isinstance(v, _JSON_SCALARS)}
        spec["unrecorded"] = sorted(k for k in inputs.constants if k not in spec["constants"])
    return spec


def _tensor_spec(x: torch.Tensor) -> Dict[str, Any]:
    out: Dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    if not (x.is_floating_point() or x.is_complex()) and x.numel():
        out["low"], out["high"] = int(x.min()), int(x.max())
    return out


def inputs_from_spec(model: torch.nn.Module, spec: Dict[str, Any]) -> Any:
    """Inputs like the recorded ones (module docstring), on the model's device: a tuple
    of tensors, or :class:`KeywordInputs` when the spec names keyword inputs."""
    unrecorded = spec.get("unrecorded") or []
    if unrecorded:
        raise FxpruneError(f"the plan could not record the keyword input(s) "
                           f"{', '.join(map(repr, unrecorded))} (not JSON values): pass "
                           "example_inputs=<the dict the plan was compiled with> to apply_plan")
    device, dtype = module_device_dtype(model)
    gen = torch.Generator().manual_seed(_SEED)
    tensors = [_rebuild(t, dtype, gen).to(device) for t in spec.get("tensors", [])]
    names: Optional[List[str]] = spec.get("names")
    if names is None:
        return tuple(tensors)
    if len(names) != len(tensors):
        raise FxpruneError(f"the plan's input record names {len(names)} keyword inputs and "
                           f"holds {len(tensors)} tensors: pass example_inputs to apply_plan")
    return KeywordInputs(tensors, names, spec.get("constants") or {})


def _rebuild(t: Dict[str, Any], float_dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    dtype = getattr(torch, str(t.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise FxpruneError(f"the plan records an input of dtype {t.get('dtype')!r}, which this "
                           "torch does not know: pass example_inputs to apply_plan")
    shape = [int(s) for s in t["shape"]]
    if dtype.is_floating_point or dtype.is_complex:
        return torch.zeros(shape, dtype=float_dtype if dtype.is_floating_point else dtype)
    low, high = int(t.get("low", 0)), int(t.get("high", 0))
    if (low, high) in ((0, 1), (1, 1)):
        return torch.ones(shape, dtype=dtype)  # a mask: nothing masked
    return torch.randint(low, high + 1, shape, generator=gen).to(dtype)
