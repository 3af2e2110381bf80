"""``fxprune prune``: load a model, calibrate, prune to a budget, write the results.

Stages are announced on stderr (loading, analysing, scoring and pruning, verifying,
writing); the report table goes to stdout. Every output file is written atomically
(temporary file + ``os.replace``), so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from .common import (CliError, check_checkpoint, check_output, check_output_folder, is_hf,
                     load_model, log, public_mode, resolve_criterion, resolve_device,
                     resolve_input_size, seed_everything)
from ..errors import did_you_mean
from ..plan import atomic_path
from .data import calibration, parse_source
from .hf import write_hf_out
from .report import recount, save_module_atomic, write_report, write_sidecar

REPORT_SUFFIXES = (".png", ".svg", ".html", ".htm", ".json")
OUT_SUFFIXES = (".pt", ".pth", ".safetensors")


def run_prune(args) -> int:
    """Entry point of ``fxprune prune`` (see ``fxprune prune --help``)."""
    _check_args(args)
    device = resolve_device(args.device)
    crit = resolve_criterion(args.criterion, real_data=bool(args.data))
    options = criterion_options(crit, args)
    source = parse_source(args.data)
    seed_everything(args.seed)
    model = load_model(args.model, args.checkpoint, args.num_classes, device, args.input_size,
                       allow_pickle=args.allow_pickle)
    size = resolve_input_size(args.model, model, args.input_size)
    log.info("calibration data: %s, %s", source.describe(),
             f"up to {args.batches} batch(es) of {args.batch_size}"
             if crit.needs_data or _wants_repair(args) else
             f"criterion {crit.name!r} is data-free: the data only gives the input shape")
    calib = calibration(source, model, size, device, batches=args.batches,
                        batch_size=args.batch_size, seed=args.seed,
                        labels=crit.needs_data or _wants_repair(args),
                        workers=args.workers, spec=args.model)
    _analyse(model, calib.example, args.frontend)
    result = _compile(model, crit.name, calib, args, options)
    summary = _write_outputs(args, result, calib.example, crit.name, size, model)
    print(result.report.table())
    print(summary)
    return 0


def _check_args(args) -> None:
    """Everything that can be checked before the (slow) model is built."""
    if _out_is_hf_folder(args):
        check_output_folder(args.out, "--out")
    else:
        check_output(args.out, "--out", OUT_SUFFIXES)
    check_output(args.export, "--export", (".pt2",))
    check_output(args.plan, "--plan", (".json",))
    check_output(args.report, "--report", REPORT_SUFFIXES)
    check_checkpoint(args.checkpoint)
    if args.export and os.path.abspath(args.export) == os.path.abspath(args.out or ""):
        raise CliError("--out and --export must be different files")
    if args.step_repair and not args.steps:
        raise CliError("--step-repair repairs between gradual steps: add --steps N")


def _out_is_hf_folder(args) -> bool:
    """``--out DIR`` of an ``hf:`` model: a Hugging Face folder, not a file."""
    return bool(args.out) and is_hf(args.model) and not args.out.lower().endswith(OUT_SUFFIXES)


def budget_kwargs(args) -> Dict[str, Any]:
    """``{"flops": r}``, ``{"params": [r1, r2]}``, ``{"latency": r}``... : the one
    budget flag given, one per kind of :data:`fxprune.passes.budget.BUDGETS`."""
    from ..passes.budget import BUDGETS
    for kind in BUDGETS:
        value = getattr(args, kind, None)
        if value is not None:
            return {kind: value}
    raise CliError("give one budget: " + ", ".join(f"--{kind} R" for kind in BUDGETS))


def _budget_text(budget: Dict[str, Any]) -> str:
    """``flops 0.5`` or ``flops 0.6 -> 0.5 (iterative)``."""
    (kind, value), = budget.items()
    if isinstance(value, list):
        return f"{kind} " + " -> ".join(f"{v:g}" for v in value) + " (iterative)"
    return f"{kind} {value:g}"


def _analyse(model, example, frontend: str = "auto") -> None:
    """The "analysing" stage: trace and group the model, report the group counts."""
    from .. import groups
    log.info("analysing: tracing the model on an input of shape %s", list(example.shape))
    found = groups(model, example, frontend=frontend)
    fixed = [g for g in found if not g.prunable]
    log.info("analysing: %d coupled channel groups, %d prunable, %d fixed",
             len(found), len(found) - len(fixed), len(fixed))


def _compile(model, criterion: str, calib, args, options: Dict[str, Any]):
    """Run :func:`fxprune.compile` with stage messages between the steps; ``options``
    are the criterion's (:func:`criterion_options`)."""
    from .. import Gradual, compile as fx_compile
    budget = budget_kwargs(args)
    values = next(iter(budget.values()))
    steps = len(values) if isinstance(values, list) else 1
    verify = not args.no_verify

    def between_steps(module, step: int) -> None:
        """Called by compile after each rewrite: announce the next stages."""
        log.info("pruning: step %d/%d done", step + 1, steps)
        if step + 1 == steps:
            if verify:
                log.info("verifying: slim model against the masked dense model")
            if args.measure_latency:
                log.info("measuring latency (dense and slim interleaved, 7 rounds of 5 "
                         "forward passes, batch 1)")

    repair = _repair_mode(args, calib)
    gradual = args.steps if not args.step_repair else \
        Gradual(args.steps, repair=None if args.step_repair == "none" else args.step_repair)
    n_batches = len(calib.batches) if calib.batches is not None else 0
    log.info("scoring with %r%s, then pruning to %s", criterion,
             f" on {n_batches} calibration batch(es)" if n_batches else "", _budget_text(budget))
    return fx_compile(model, criterion, example_inputs=calib.example, data=calib.batches,
                      batches=args.batches if calib.batches is not None else None,
                      progress=not args.quiet, measure_latency=args.measure_latency,
                      verify=verify,
                      between_steps=None if args.steps else between_steps, repair=repair,
                      steps=gradual,
                      normalize=None if args.normalize == "none" else args.normalize,
                      ignore=ignore_names(args.ignore),
                      max_layer_sparsity=args.max_layer_sparsity, round_to=args.round_to,
                      frontend=args.frontend, uniform=args.uniform,
                      cost_aware="auto" if args.cost_aware is None else args.cost_aware,
                      fill=args.fill,
                      **options, **budget)


def ignore_names(values: List[str]) -> List[str]:
    """``--ignore a --ignore b,c`` as ``["a", "b", "c"]``."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def criterion_options(crit, args) -> Dict[str, Any]:
    """The criterion's options from ``--option KEY=VALUE`` (and ``--seed`` where the
    criterion declares ``seed``, as ``random`` does). Checked before the model is built:
    a key given twice, a key the criterion does not declare, or ``seed`` beside
    ``--seed`` is a :class:`CliError` naming the criterion's options."""
    declared = crit.options
    options: Dict[str, Any] = {}
    for key, value in args.options:
        if key in options:
            raise CliError(f"--option {key}= is given twice ({options[key]!r} and {value!r})")
        if key == "seed":
            raise CliError("--option seed=: use --seed N (it also seeds the data and the "
                           "model)")
        if declared is not None and key not in declared:
            hint = did_you_mean(key, declared)
            valid = ", ".join(k for k in declared if k != "seed") or "none"
            raise CliError(f"--option {key}=: criterion {crit.name!r} has no option "
                           f"{key!r}{hint}; its options: {valid} (see 'fxprune criteria')")
        options[key] = value
    if declared and "seed" in declared:
        options["seed"] = args.seed
    return options


def _wants_repair(args) -> bool:
    """``--repair full|bn``, or ``auto`` with real data (noise inputs would mis-fit a
    real model, so the synthetic default data is not used for repair)."""
    return args.repair in ("full", "bn") or (args.repair == "auto" and bool(args.data))


def _repair_mode(args, calib):
    """``--repair`` as compile's ``repair=``."""
    if not _wants_repair(args) or calib.batches is None:
        if args.repair == "auto":
            log.info("repair: off on the synthetic default data (pass --data for a repaired "
                     "model, or --repair full to force it)")
        return None
    return "full" if args.repair == "auto" else args.repair


def _write_outputs(args, result, example, criterion: str, size, model) -> str:
    """Write the plan, report, slim model (+ sidecar, or a Hugging Face folder for an
    ``hf:`` model) and torch.export program; return the one-line input -> output summary
    of the slim model."""
    report, slim = result.report, result.module.cpu().eval()
    example = example.cpu()
    meta = {"model": args.model, "checkpoint": args.checkpoint, "criterion": criterion,
            "input_size": list(size), "budget": result.plan.meta.get("budget"),
            "seed": args.seed, "data": args.data or "synthetic"}
    flops, params, out_shape = recount(slim, list(example.shape), example.dtype)
    written: List[str] = []
    if args.plan:
        result.plan.meta.update(model=args.model, report=report.to_dict())
        result.plan.to_json(args.plan)
        written.append(f"plan {args.plan}")
    if args.report:
        write_report(report, args.report)
        written.append(f"report {args.report}")
    if _out_is_hf_folder(args):
        written.append(write_hf_out(result, model, args.out))
    elif args.out and args.out.lower().endswith(".safetensors"):
        written.append(write_safetensors(result, args, report, list(example.shape)))
    elif args.out:
        save_module_atomic(slim, args.out)
        sidecar = write_sidecar(args.out, report, example.shape, out_shape, meta)
        written.append(f"slim model {args.out} (+ {os.path.basename(sidecar)})")
    if args.export:
        export_program(slim, example, args.export)
        write_sidecar(args.export, report, example.shape, out_shape, meta)
        written.append(f"torch.export program {args.export} (+ .json)")
    public_mode(args.plan, args.report, args.out, args.out and args.out + ".json", args.export,
                args.export and args.export + ".json")
    for item in written:
        log.info("wrote %s", item)
    if (flops, params) != (report.flops_after, report.params_after):
        log.warning("recount of the slim model (%d FLOPs, %d params) differs from the "
                    "report (%d, %d)", flops, params, report.flops_after, report.params_after)
    return f"slim model: input {list(example.shape)} -> output {out_shape}"


def write_safetensors(result, args, report, input_shape) -> str:
    """``--out SLIM.safetensors``: the slim weights plus the plan (``--plan`` or
    ``SLIM.plan.json``), reloaded with ``fxprune.load_slim`` without unpickling."""
    from ..slim_io import default_plan_path, save_slim
    result.plan.meta.update(model=args.model, report=report.to_dict(), input_shape=input_shape)
    weights, plan = save_slim(result, args.out, args.plan or default_plan_path(args.out))
    return f"slim weights {weights} and plan {plan} (reload: fxprune.load_slim)"


def export_program(module, example, path: str) -> None:
    """``torch.export`` the slim model with a free batch dimension
    (:func:`fxprune.passes.export_capture.export_dynamic`) and ``torch.export.save`` it
    atomically."""
    import torch
    from ..passes.export_capture import export_dynamic
    log.info("exporting with torch.export")
    try:
        program = export_dynamic(module, (example,)).program
    except Exception as exc:  # noqa: BLE001 - report it as one line, the rest is saved
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CliError(f"torch.export failed ({type(exc).__name__}: {first}); the other "
                       "outputs were written; drop --export or pass --debug") from exc
    with atomic_path(path, ".pt2") as tmp:
        torch.export.save(program, tmp)
