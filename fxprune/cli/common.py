"""Helpers shared by the ``fxprune`` commands: messages, argument types, model loading.

Every problem the user can fix (a bad option, a missing file, no CUDA device) is
raised as :class:`CliError`, an :class:`~fxprune.errors.FxpruneError`, so that
:func:`fxprune.cli.main` prints it as one line and exits with status 2.
Stage lines ("analysing", "scoring", ...) go to stderr through the ``fxprune.cli``
logger; the report itself goes to stdout.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

from ..errors import CheckpointError, FxpruneError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fxprune.cli")

#: Criteria tried, in order, when ``--criterion`` is not given.


class CliError(FxpruneError):
    """A command-line problem the user can fix (exit status 2)."""


# ----------------------------------------------------------------------------- argument types

def ratio_list(text: str) -> Union[float, List[float]]:
    """``--flops``/``--params``: a kept fraction in (0, 1], or a decreasing comma list."""
    values = _floats(text)
    for v in values:
        if not 0.0 < v <= 1.0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a kept fraction must be in (0, 1] (0.5 keeps half)")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(
            f"{text!r}: iterative budgets must be strictly decreasing, e.g. 0.6,0.5,0.4")
    return values[0] if len(values) == 1 else values


def sparsity_ratio(text: str) -> float:
    """``--sparsity``: the fraction of every group's channels removed, in [0, 1)."""
    values = _floats(text)
    if len(values) != 1 or not 0.0 <= values[0] < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: sparsity is one number in [0, 1), the fraction of channels removed")
    return values[0]


def _floats(text: str) -> List[float]:
    """Parse ``0.5`` or ``0.6,0.5`` into finite floats."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma list of numbers")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets must be finite numbers")
    return values


def criterion_option(text: str) -> Tuple[str, Union[bool, int, float, str]]:
    """``--option KEY=VALUE``: one criterion option as ``(key, value)``. The value is
    ``true``/``false`` as a bool, an integer or a float where it reads as one (``1e-2``),
    else the text itself (``gram=kron``)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip().replace("-", "_"), raw.strip()
    if not sep or not key.isidentifier() or not raw:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE, e.g. damp=0.05 or perturb=consumer")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    for number in (int, float):
        try:
            value = number(raw)
        except ValueError:
            continue
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r}: option values must be finite")
        return key, value
    return key, raw


def input_size(text: str) -> Tuple[int, ...]:
    """``--input-size 3,224,224``: one example's shape without the batch dimension."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated positive integers like 3,224,224")
    return dims


def positive_int(text: str) -> int:
    """A strictly positive integer (batch counts, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


# ----------------------------------------------------------------------------- checks

def check_output(path: Optional[str], option: str, suffixes: Sequence[str]) -> None:
    """Fail before any work when an output path has a wrong suffix or no directory."""
    if path is None:
        return
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        raise CliError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CliError(f"{option} {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a directory, expected a file name")
    _check_writable(path, option, directory)


def check_output_folder(path: str, option: str) -> None:
    """An output folder (``hf:`` models' ``--out DIR``): new or empty, in a writable
    parent directory; checked before any work."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path):
        raise CliError(f"{option} {path}: is a file; a Hugging Face model is written as a "
                       "folder (or give a .pt / .safetensors file name)")
    if os.path.isdir(path) and os.listdir(path):
        raise CliError(f"{option} {path}: the folder is not empty; choose a new folder")
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path}: directory {parent} does not exist")
    _check_writable(path, option, parent)


def _check_writable(path: str, option: str, directory: str) -> None:
    """Create and remove a file next to ``path``, as the atomic write will (so that a
    read-only directory is found now, not after minutes of scoring)."""
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".fxprune-", suffix=".probe")
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot write in {directory} "
                       f"({exc.strerror or exc}); choose a writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_checkpoint(path: Optional[str]) -> None:
    """Fail fast on a missing checkpoint (before the model is built)."""
    if path is not None and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")


def resolve_device(name: str) -> "torch.device":
    """``cpu`` or ``cuda``; ``cuda`` without a CUDA device is a :class:`CliError`."""
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is present "
                       "(torch.cuda.is_available() is False); use --device cpu")
    return torch.device(name)


def resolve_criterion(name: Optional[str], real_data: bool = False):
    """The :class:`~fxprune.criteria.Criterion` to use. The default is ``compile``'s
    ``"auto"`` (:data:`fxprune.api_prune.AUTO_CRITERION`): obs with real calibration
    data (``--data``), l2 on the synthetic default data, whose labels carry no signal."""
    from ..api_prune import resolve_criterion as auto_criterion
    from ..criteria import get_criterion
    chosen = auto_criterion(name or "auto", real_data)
    return get_criterion(chosen)  # CriterionError lists the valid names


# ----------------------------------------------------------------------------- models

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model(spec: str, checkpoint: Optional[str], num_classes: Optional[int], device,
               input_size: Optional[Tuple[int, ...]] = None, allow_pickle: bool = False):
    """Build ``spec`` with :func:`fxprune.models.create_model`, load ``checkpoint``,
    switch to eval mode and move it to ``device``. A timm model is built for
    ``input_size`` (``in_chans``, and ``img_size`` where the architecture takes one:
    a ViT's position embedding is sized by it). A checkpoint that pickles Python objects
    is refused unless ``allow_pickle`` (``--allow-pickle``)."""
    from ..models import create_model
    if is_hf(spec):
        return _load_hf(spec, checkpoint).to(device)
    check_checkpoint(checkpoint)
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    log.info("loading %s%s", spec, f" with weights from {checkpoint}" if checkpoint else
             " (random weights: pass --checkpoint to prune trained weights)")
    size_kwargs = _timm_size_kwargs(spec, input_size)
    try:
        model = create_model(spec, checkpoint=checkpoint, allow_pickle=allow_pickle, **kwargs,
                             **size_kwargs)
    except TypeError as exc:  # architectures without an img_size argument (CNNs)
        if "img_size" not in str(exc):
            raise
        size_kwargs.pop("img_size")
        model = create_model(spec, checkpoint=checkpoint, allow_pickle=allow_pickle, **kwargs,
                             **size_kwargs)
    return model.eval().to(device)


def _timm_size_kwargs(spec: str, input_size: Optional[Tuple[int, ...]]) -> dict:
    if not spec.startswith("timm:") or input_size is None or len(input_size) != 3:
        return {}
    kwargs = {"img_size": tuple(input_size[1:])}
    if input_size[0] != 3:
        kwargs["in_chans"] = input_size[0]
    return kwargs


def resolve_input_size(spec: str, model, given: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    """``--input-size`` if given, else the model's default input size."""
    if is_hf(spec):
        return _hf_input_size(model, given)
    if given is not None:
        return tuple(given)
    if spec.startswith("timm:"):
        from timm.data import resolve_data_config
        return tuple(resolve_data_config({}, model=model)["input_size"])
    size = getattr(model, "input_size", None)
    if isinstance(size, (tuple, list)) and size and all(isinstance(d, int) for d in size):
        return tuple(size)
    from ..models import model_input_size
    try:
        return tuple(model_input_size(spec))
    except FxpruneError:
        raise CliError(f"cannot tell the input size of {spec}: pass --input-size, "
                       "e.g. --input-size 3,224,224") from None


def public_mode(*paths: str) -> None:
    """Give written files the usual permissions (0666 minus the umask): atomic writes
    go through ``mkstemp``, whose files are private (0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        if path and os.path.isfile(path):
            os.chmod(path, 0o666 & ~mask)


def one_line(message: str) -> str:
    """Collapse a multi-line message into one line."""
    parts = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " ".join(parts) if parts else ""


# --------------------------------------------------------------------------- hf:FOLDER
HF_PREFIX = "hf:"
#: token ids per calibration sequence when ``--input-size`` is not given
DEFAULT_SEQ_LEN = 32


def is_hf(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def _load_hf(spec: str, checkpoint: Optional[str]):
    """The model in the local folder ``spec[3:]``, in eval mode."""
    path = spec[len(HF_PREFIX):]
    if checkpoint:
        raise CliError("--checkpoint does not apply to hf:PATH: the folder holds the weights")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{spec}: no config.json in {path!r}; hf:PATH takes a local Hugging "
                       "Face model folder (one written by save_pretrained); the hub is not "
                       "reached")
    try:
        import transformers
    except ImportError:
        raise CliError("hf:PATH needs transformers: pip install 'fxprune[hf]' "
                       "(or pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    log.info("loading %s from %s", getattr(cls, "__name__", cls), path)
    return cls.from_pretrained(path, local_files_only=True).eval()


def is_text_model(model) -> bool:
    """A Hugging Face model that takes token ids (its config has a vocabulary and no
    image size)."""
    config = getattr(model, "config", None)
    return (config is not None and getattr(config, "vocab_size", None) is not None
            and getattr(config, "image_size", None) is None)


def _hf_input_size(model, given: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    if given is not None:
        return tuple(given)
    config = model.config
    if is_text_model(model):
        return (DEFAULT_SEQ_LEN,)
    size = getattr(config, "image_size", None)
    if size is None:
        raise CliError("cannot tell this Hugging Face model's input size: pass --input-size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (getattr(config, "num_channels", 3), h, w)
