"""``fxprune report`` and the report files written by ``fxprune prune --report``.

A slim model saved with ``--out slim.pt`` gets a JSON sidecar ``slim.pt.json``
(:func:`write_sidecar`) with the input shape, output shape and the report dict, so
that ``fxprune report slim.pt`` can reload the model, recount its FLOPs / params on a
zero input of the recorded shape with ``torch.utils.flop_counter`` and print the same
table. A plan JSON written by the CLI carries the report in ``meta["report"]``; a plan
written by the Python API shows kept counts per group.

Nothing is unpickled unless the user says so: a ``.pt`` slim model is a pickle, so
without ``--allow-pickle`` its sidecar's recorded report is shown (not recounted); a
``.safetensors`` slim model (weights + plan) shows the plan embedded in it.
"""
from __future__ import annotations

import html
import io
import json
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

from .common import CliError, log
from ..plan import Plan, write_atomic
from ..repair_report import RepairSummary
from ..report import GroupRow, Report

SIDECAR_FORMAT = 1


def report_from_dict(data: Dict[str, Any]) -> Report:
    """Rebuild a :class:`~fxprune.report.Report` from ``Report.to_dict()``."""
    try:
        report = Report(int(data["flops_before"]), int(data["flops_after"]),
                        int(data["params_before"]), int(data["params_after"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CliError(f"not a fxprune report: missing or bad field {exc}") from None
    fields = GroupRow.__dataclass_fields__
    report.groups = [GroupRow(**{k: v for k, v in g.items() if k in fields})
                     for g in data.get("groups", [])]
    for key in ("latency_before_ms", "latency_after_ms", "latency_speedup_range",
                "predicted_latency_before_ms", "predicted_latency_after_ms", "max_rel_error"):
        setattr(report, key, data.get(key))
    report.notes = list(data.get("notes", []))
    if data.get("repair"):
        report.repair = RepairSummary.from_dict(data["repair"])
    return report


def write_report(report: Report, path: str) -> None:
    """Write ``report`` as PNG/SVG (keep-ratio plot), JSON (dict) or HTML (table + plot)."""
    lower = path.lower()
    if lower.endswith((".png", ".svg")):
        report.plot(path)
    elif lower.endswith(".json"):
        write_atomic(path, json.dumps(report.to_dict(), indent=1) + "\n")
    elif lower.endswith((".html", ".htm")):
        write_atomic(path, report_html(report))
    else:
        raise CliError(f"--report {path}: use a .png, .svg, .html or .json file name")


def report_html(report: Report, title: str = "fxprune report") -> str:
    """A self-contained HTML page: the report table and the keep-ratio plot (inline SVG)."""
    with tempfile.TemporaryDirectory() as tmp:
        svg_path = os.path.join(tmp, "plot.svg")
        report.plot(svg_path)
        with open(svg_path) as fh:
            svg = fh.read()
    svg = svg[svg.find("<svg"):]
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
            "margin:2em}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
            "svg{max-width:100%;height:auto}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><pre>{html.escape(report.table())}</pre>"
            f"<h2>Kept fraction per group</h2>{svg}</body></html>\n")


def write_sidecar(out_path: str, report: Report, input_shape, output_shape, meta) -> str:
    """Write ``OUT.json`` next to a saved slim model and return its path."""
    path = out_path + ".json"
    data = {"format": SIDECAR_FORMAT, "input_shape": list(input_shape),
            "output_shape": list(output_shape) if output_shape is not None else None,
            "meta": meta, "report": report.to_dict()}
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------- the command

def run_report(args) -> int:
    """``fxprune report SLIM_OR_PLAN``: print the report table of a slim model or plan."""
    path = args.path
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file (expected a slim model .pt or a plan .json)")
    if path.lower().endswith(".safetensors"):
        print(_safetensors_report(path))
        return 0
    data = _read_json(path)
    if data is None:
        print(_slim_report(path, args.input_size, getattr(args, "allow_pickle", False)))
    elif "kept" in data:
        print(plan_text(Plan.from_json(path)))
    elif "report" in data:
        print(report_from_dict(data["report"]).table())
    elif "flops_before" in data:
        print(report_from_dict(data).table())
    else:
        raise CliError(f"{path}: a JSON file, but neither a fxprune plan nor a report")
    return 0


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or ``None`` when the file is not JSON text."""
    with open(path, "rb") as fh:
        head = fh.read(1).lstrip()
        if head != b"{" and not path.lower().endswith(".json"):
            return None
        fh.seek(0)
        text = fh.read()
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object")
    return data


def plan_text(plan: Plan) -> str:
    """The report table stored in a CLI plan, else the plan's kept counts per group."""
    meta = plan.meta or {}
    head = [f"plan: criterion {meta.get('criterion', '?')}, budget "
            f"{_budget_text(meta.get('budget'))}, {plan.removed_count()} channels removed"
            + (f", model {meta['model']}" if meta.get("model") else "")]
    if isinstance(meta.get("report"), dict):
        return "\n".join(head + [report_from_dict(meta["report"]).table()])
    rows = [f"{'group':<44}{'kept':>7}{'size':>7}{'keep':>7}"]
    for gid in sorted(plan.kept):
        size = plan.sizes.get(gid, len(plan.kept[gid]))
        kept = len(plan.kept[gid])
        rows.append(f"{gid:<44}{kept:>7}{size:>7}{kept / max(size, 1):>7.2f}")
    return "\n".join(head + ["(FLOPs and params are not recorded in this plan)", ""] + rows)


def _budget_text(budget) -> str:
    """A plan's recorded budget steps as ``flops=0.5, flops=0.4``."""
    if not budget:
        return "?"
    return ", ".join(f"{b.get('kind')}={b.get('ratio')}" for b in budget if isinstance(b, dict))


def _safetensors_report(path: str) -> str:
    """The plan embedded in a ``.safetensors`` slim model (read without unpickling)."""
    from ..errors import FxpruneError
    from ..slim_io import read_slim_metadata
    meta = read_slim_metadata(path)
    if "fxprune.plan" not in meta:
        raise CliError(f"{path}: a safetensors file without a fxprune plan (not written by "
                       "fxprune prune --out SLIM.safetensors)")
    try:
        plan = Plan.from_json(meta["fxprune.plan"])
    except FxpruneError as exc:
        raise CliError(f"{path}: the embedded plan is not readable: {exc}") from None
    return f"slim weights {path} (plan embedded; reload with fxprune.load_slim)\n" + \
        plan_text(plan)


def _recorded_report(path: str, sidecar: Optional[Dict[str, Any]]) -> str:
    """A pickled slim model's sidecar report, without loading (unpickling) the model."""
    if sidecar is None:
        raise CliError(f"{path}: a torch.save pickle, and loading it would run code stored in "
                       "the file; pass --allow-pickle if you trust it (or ship the slim model "
                       "as --out SLIM.safetensors + plan, or --export SLIM.pt2)")
    report = report_from_dict(sidecar["report"])
    report.notes.append(f"recorded report, not recounted: pass --allow-pickle to load {path} "
                        "(a pickle: only for files you trust) and recount it")
    return "\n".join([f"slim model {path}: input {sidecar['input_shape']} -> output "
                      f"{sidecar.get('output_shape')}", report.table()])


def _slim_report(path: str, given_size: Optional[Tuple[int, ...]],
                 allow_pickle: bool = False) -> str:
    """Reload a slim model, recount its FLOPs / params and print the saved report. A
    pickled ``.pt`` is only loaded with ``allow_pickle``; else the sidecar is shown."""
    sidecar = _read_sidecar(path + ".json")
    if not allow_pickle and not path.lower().endswith(".pt2"):
        return _recorded_report(path, sidecar)
    module, recorded = load_slim(path)
    if given_size is not None:
        shape = [1, *given_size]
    elif sidecar is not None:
        shape = sidecar["input_shape"]
    elif recorded is not None:
        shape = recorded
    else:
        raise CliError(f"{path}: no {path}.json sidecar records the input shape; "
                       "pass --input-size C,H,W")
    flops, params, out_shape = recount(module, shape)
    lines = [f"slim model {path}: input {list(shape)} -> output {out_shape}"]
    if sidecar is None:
        return "\n".join(lines + [f"FLOPs {flops:,}  params {params:,}  (no {path}.json "
                                  "sidecar: the dense counts are unknown)"])
    report = report_from_dict(sidecar["report"])
    if (flops, params) != (report.flops_after, report.params_after) and given_size is None:
        report.notes.append(f"note: recounted FLOPs {flops:,} / params {params:,} differ "
                            f"from the recorded {report.flops_after:,} / {report.params_after:,}")
    report.flops_after, report.params_after = flops, params
    lines.append(f"recounted FLOPs and params on a zero input of shape {list(shape)}")
    return "\n".join(lines + [report.table()])


def _read_sidecar(path: str) -> Optional[Dict[str, Any]]:
    """The ``OUT.json`` sidecar written by ``prune --out``, or ``None``."""
    if not os.path.isfile(path):
        return None
    data = _read_json(path)
    if not isinstance(data.get("input_shape"), list) or not isinstance(data.get("report"), dict):
        raise CliError(f"{path}: not a fxprune sidecar (needs input_shape and report)")
    return data


def load_slim(path: str):
    """``(module, recorded input shape or None)`` from a ``torch.save``d module (this
    unpickles: only load files you trust) or a ``torch.export`` program (``.pt2``)."""
    import torch
    recorded = None
    try:
        if path.lower().endswith(".pt2"):
            program = torch.export.load(path)
            example = getattr(program, "example_inputs", None)
            if example and example[0] and torch.is_tensor(example[0][0]):
                recorded = list(example[0][0].shape)
            module = program.module()
        else:
            module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CliError(f"{path}: cannot load the slim model: {type(exc).__name__}: {first}") \
            from exc
    if not isinstance(module, torch.nn.Module):
        raise CliError(f"{path}: holds a {type(module).__name__}, not a model saved by "
                       "fxprune prune --out")
    if not path.lower().endswith(".pt2"):
        module = module.eval()
    return module, recorded


def recount(module, shape, dtype=None) -> Tuple[int, int, Any]:
    """FLOPs (fxprune's counter: FlopCounterMode + CPU attention), parameter count and output shape on zeros of ``shape``
    (of ``dtype`` when it is an integer type, token ids; else the module's float type)."""
    import torch
    from ..passes.shape_flops import flop_counter
    if dtype is None or dtype.is_floating_point:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()),
                     torch.float32)
    counter = flop_counter()
    with torch.no_grad(), counter:
        out = module(torch.zeros(*shape, dtype=dtype))
    if not torch.is_tensor(out) and isinstance(out, dict) and "logits" in out:
        out = out["logits"]
    out_shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
    log.debug("recounted %s", counter.get_total_flops())
    return int(counter.get_total_flops()), sum(p.numel() for p in module.parameters()), out_shape


def save_module_atomic(module, path: str) -> None:
    """``torch.save`` a whole module through a temporary file and ``os.replace``."""
    import torch
    buffer = io.BytesIO()
    torch.save(module, buffer)
    write_atomic(path, buffer.getvalue())
