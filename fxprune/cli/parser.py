"""The ``fxprune`` command line.

::

    fxprune prune timm:resnet18 --checkpoint r18.pth --flops 0.5 --data imagenet/val \\
        --out slim.pt --plan plan.json --report report.png
    fxprune groups timm:resnet18 --graph groups.html
    fxprune report slim.pt            # or plan.json
    fxprune criteria

Errors the user can fix (bad options, unknown models, missing or mismatched
checkpoints, empty data) print one line to stderr and exit with status 2; any other
exception prints one line too, exits with status 1 and suggests ``--debug``, which
shows the traceback. Stage lines go to stderr, reports to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from typing import List, Optional

from .common import (criterion_option, input_size, positive_int, ratio_list, sparsity_ratio,
                     one_line)

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        """Print ``prog: error: message`` on one line and exit with status 2."""
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


class _Renamed(argparse.Action):
    """A flag that was renamed: an error naming the new flag (its ``metavar``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.metavar} (--latency R is now a "
                     "latency budget)")


def _common(defaults: bool) -> argparse.ArgumentParser:
    """--debug/--verbose/--quiet, accepted before and after the sub-command."""
    p = argparse.ArgumentParser(add_help=False)
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", default=d(False),
                   help="show tracebacks and debug logging")
    p.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="more detail (library info messages, full group tables)")
    p.add_argument("-q", "--quiet", action="store_true", default=d(False),
                   help="no stage lines or progress bars on stderr")
    p.add_argument("--threads", type=positive_int, metavar="N", default=d(None),
                   help="CPU threads for torch (default: torch's own choice); on a busy "
                        "machine fewer threads make latency measurements steadier")
    return p


def _model_command(sub, common, name: str, help: str, description: str
                   ) -> argparse.ArgumentParser:
    """A sub-command that builds a model: MODEL and the options every such command takes
    (:func:`_model_args`). Returns its parser."""
    p = sub.add_parser(name, parents=[common], help=help, description=description)
    _model_args(p)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and the options every command that builds a model takes."""
    p.add_argument("model", metavar="MODEL",
                   help="timm:NAME, torchvision:NAME, hf:FOLDER (a local Hugging Face model "
                        "folder), path/file.py:factory or a registered name")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="weights to load (.pth/.pt/.bin/.ckpt or .safetensors)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="let a --checkpoint that pickles Python objects be unpickled (this "
                        "runs code stored in the file: only for files you trust)")
    p.add_argument("--num-classes", type=positive_int, metavar="N",
                   help="classifier size, when the checkpoint's differs from the default")
    p.add_argument("--input-size", type=input_size, metavar="C,H,W",
                   help="one example's shape without the batch dim (default: the model's; "
                        "a text model's sequence length, default 32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to run (default: cpu)")


def _prune_parser(sub, common) -> None:
    """The ``prune`` sub-command and its options."""
    p = _model_command(sub, common, "prune", "prune a model to a budget",
                       "Prune MODEL to a FLOPs, parameter, latency or sparsity budget and "
                       "write the slim model, plan and report.")
    p.add_argument("--criterion", metavar="NAME",
                   help="saliency criterion (default: obs with --data, l2 on the synthetic "
                        "default data, as compile's criterion='auto'; see 'fxprune criteria')")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=ratio_list, metavar="R",
                        help="keep fraction R of the dense FLOPs (0.5 keeps half); a "
                             "decreasing list 0.6,0.5,0.4 prunes iteratively")
    budget.add_argument("--params", type=ratio_list, metavar="R",
                        help="keep fraction R of the dense parameters (list: iterative)")
    budget.add_argument("--latency", type=ratio_list, metavar="R",
                        help="keep fraction R of the dense latency on --device, predicted by "
                             "a per-layer latency table timed there (list: iterative)")
    budget.add_argument("--sparsity", type=sparsity_ratio, metavar="R",
                        help="remove fraction R of the channels of every group")
    p.add_argument("--data", metavar="DATA",
                   help="calibration data: an ImageFolder directory, 'fashion-mnist[:DIR]' "
                        "or 'synthetic' (default; real data prunes better)")
    p.add_argument("--batches", type=positive_int, default=8, metavar="N",
                   help="calibration batches (default: 8)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="B",
                   help="calibration batch size (default: 32)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader workers for image folders (default: 0)")
    p.add_argument("--out", metavar="SLIM.pt",
                   help="save the slim model: SLIM.safetensors writes its weights and the "
                        "plan (SLIM.plan.json, or --plan), reloaded without pickle by "
                        "fxprune.load_slim; SLIM.pt a torch.save pickle (plus SLIM.pt.json)")
    p.add_argument("--export", metavar="SLIM.pt2",
                   help="save torch.export.export(slim) with torch.export.save")
    p.add_argument("--plan", metavar="PLAN.json", help="write the pruning plan (JSON)")
    p.add_argument("--report", metavar="FILE",
                   help="write the report: .png/.svg keep-ratio plot, .html page or .json")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="keep the channels of this module whole: a module name, its prefix "
                        "or a glob (repeat, or comma-separate: --ignore layer4,fc)")
    p.add_argument("--round-to", type=positive_int, default=1, metavar="N",
                   help="keep every pruned layer's width a multiple of N (8/16/32 suit most "
                        "accelerators; a head of d dims counts d; default: 1)")
    p.add_argument("--uniform", action="store_true",
                   help="meet --flops/--params by removing the same fraction of every group, "
                        "so that every layer keeps the same number of heads and MLP units "
                        "(what a Hugging Face config can hold: hf:PATH --out DIR)")
    p.add_argument("--cost-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="rank channels by score per FLOP (or parameter, ms) their removal "
                        "saves, or (--no-cost-aware) by score alone; default: the "
                        "criterion's own ranking, else by score alone")
    p.add_argument("--fill", action="store_true",
                   help="once the budget holds, give back removed channels, most important "
                        "first, while it still holds (the last removal can be a whole head "
                        "that lands well below the target)")
    p.add_argument("--max-layer-sparsity", type=sparsity_ratio, default=0.95, metavar="R",
                   help="remove at most fraction R of any group's channels (default: 0.95)")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="prune gradually in N steps on an exponential schedule to the one "
                        "--flops/--params/--latency budget, re-scoring after each step (the OBA "
                        "paper's procedure uses 50); costs about N scoring passes, plus a "
                        "repair per step with data (--step-repair)")
    p.add_argument("--step-repair", choices=("auto", "none", "bn", "full"), default=None,
                   help="with --steps: score every step on the plan so far as the repair pass "
                        "leaves it ('bn': BN statistics re-estimated; 'full': also layers "
                        "re-fitted; one rewrite and repair per step), or on the masked dense "
                        "weights ('none', the OBA paper's procedure); default 'auto': as "
                        "--repair")
    p.add_argument("--normalize", choices=("auto", "mean", "max", "none"), default="auto",
                   help="global ranking: channel score / its group's mean |score|, / its "
                        "group's max, or raw scores ('none'); default 'auto': the "
                        "criterion's own ranking, else mean")
    p.add_argument("--repair", choices=("auto", "full", "bn", "none"), default="auto",
                   help="after pruning: 'full' re-estimates batch norms and re-fits layers "
                        "that lost inputs to the dense model's outputs, 'bn' only re-estimates "
                        "batch norms; 'auto' (default): full with --data, none on the "
                        "synthetic default data (noise inputs would mis-fit a real model)")
    p.add_argument("--frontend", choices=("auto", "fx", "export"), default="auto",
                   help="graph capture: 'fx' (symbolic tracing), 'export' (torch.export, "
                        "an ATen graph) or 'auto' (default: export only where symbolic "
                        "tracing fails)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the slim model against the masked dense model")
    p.add_argument("--no-measure-latency", dest="measure_latency", action="store_false",
                   help="skip timing the dense and slim model for the report")
    p.add_argument("--no-latency", nargs=0, action=_Renamed, help=argparse.SUPPRESS,
                   default=argparse.SUPPRESS, metavar="--no-measure-latency")
    p.add_argument("--option", action="append", type=criterion_option, default=[],
                   metavar="KEY=VALUE", dest="options",
                   help="an option of the criterion, as compile's keyword (repeat): e.g. "
                        "--option gram=kron --option damp=0.05 for obs, --option "
                        "perturb=consumer for oba; 'fxprune criteria' lists each "
                        "criterion's options")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=_lazy("prune", "run_prune"))


def build_parser() -> argparse.ArgumentParser:
    """The ``fxprune`` argument parser with its four sub-commands."""
    parser = _Parser(prog="fxprune", parents=[_common(True)],
                     description="Second-order structured pruning as a torch.fx pipeline.")
    parser.add_argument("--version", action="version", version=f"fxprune {_version()}")
    common = _common(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _prune_parser(sub, common)
    g = _model_command(sub, common, "groups", "show a model's coupled channel groups",
                       "Print the coupled-channel groups and the connectivity summary of "
                       "MODEL; optionally draw the group graph.")
    g.add_argument("--graph", metavar="FILE",
                   help="write the group graph: .dot (Graphviz text), .svg or .html "
                        "(a picture laid out by layer order)")
    g.add_argument("--json", metavar="FILE", help="write the groups as JSON")
    g.set_defaults(func=_lazy("graph", "run_groups"))
    r = sub.add_parser("report", parents=[common], help="print the report of a slim model or plan",
                       description="Print the report table of a slim model saved with "
                                   "'fxprune prune --out' (FLOPs/params recounted) or of a plan.")
    r.add_argument("path", metavar="SLIM_OR_PLAN", help="slim model (.pt) or plan/report (.json)")
    r.add_argument("--input-size", type=input_size, metavar="C,H,W",
                   help="input shape when the slim model has no .json sidecar")
    r.add_argument("--allow-pickle", action="store_true",
                   help="unpickle a SLIM.pt to recount it (runs code stored in the file: "
                        "only for files you trust); without it the recorded report is shown")
    r.set_defaults(func=_lazy("report", "run_report"))
    c = sub.add_parser("criteria", parents=[common], help="list the saliency criteria")
    c.set_defaults(func=_criteria)
    return parser


def _version() -> str:
    """The installed distribution's version (no import of the package's torch parts)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fxprune")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _lazy(module: str, name: str):
    """A command function imported on first use (keeps ``--help`` fast)."""
    def run(args):
        """Import the command module and run the command."""
        import importlib
        return getattr(importlib.import_module(f"fxprune.cli.{module}"), name)(args)
    return run


def _criteria(args) -> int:
    """``fxprune criteria``: one line per registered criterion."""
    from ..criteria import get_criterion, list_criteria
    found = list_criteria()
    width = max(map(len, found), default=0)
    for name, description in found.items():
        default = {"obs": " (default with --data)", "l2": " (default without --data)"}.get(name, "")
        print(f"{name:<{width}}  {description}{default}")
        options = [key for key in get_criterion(name).options or () if key != "seed"]
        if options:  # ``seed`` is --seed
            print(f"{'':<{width}}  options (--option KEY=VALUE): {', '.join(options)}")
    return 0


@contextlib.contextmanager
def _cli_logging(args):
    """Stage lines from ``fxprune.cli`` (INFO) and library messages from WARNING up to
    stderr; the previous logging and warning settings are restored on exit (so that
    ``main()`` can be called in-process, e.g. from tests)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fxprune: %(message)s"))
    root, cli = logging.getLogger("fxprune"), logging.getLogger("fxprune.cli")
    progress = logging.getLogger("fxprune.progress")  # scoring progress off a terminal
    saved = (root.handlers[:], root.propagate, root.level, cli.level, progress.level)
    lib_level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(lib_level)
    cli.setLevel(logging.WARNING if args.quiet else min(lib_level, logging.INFO))
    progress.setLevel(cli.level)
    with warnings.catch_warnings():
        if not (args.debug or args.verbose):
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            yield
        finally:
            root.handlers[:], root.propagate = saved[0], saved[1]
            root.setLevel(saved[2])
            cli.setLevel(saved[3])
            progress.setLevel(saved[4])


def _error_line(exc: BaseException) -> (str, int):
    """The one-line message and exit status for an exception."""
    from ..errors import FxpruneError
    if isinstance(exc, FxpruneError):
        return one_line(str(exc)), EXIT_USAGE
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}", EXIT_USAGE
    if type(exc).__name__ == "OutOfMemoryError":
        return ("out of memory; try a smaller --batch-size, fewer --batches or a smaller "
                "--input-size"), EXIT_INTERNAL
    detail = one_line(str(exc))[:300]
    return (f"internal error: {type(exc).__name__}: {detail} "
            "(re-run with --debug for the traceback)"), EXIT_INTERNAL


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``fxprune`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.threads is not None:
        import torch  # here, not at the top: --help and --version must not import torch
        torch.set_num_threads(args.threads)
    with _cli_logging(args):
        return _run(args)


def _run(args) -> int:
    """Run the sub-command; turn every exception into one line and an exit status."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("fxprune: interrupted\n")
        return 130
    except BrokenPipeError:  # stdout closed early (fxprune ... | head): not an error
        _silence_stdout()
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - the CLI's one-line error contract
        if args.debug:
            raise
        message, status = _error_line(exc)
        sys.stderr.write(f"fxprune {args.command}: error: {message}\n")
        return status


if __name__ == "__main__":
    sys.exit(main())
