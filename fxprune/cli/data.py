"""Calibration data sources of ``fxprune prune --data``.

- ``synthetic`` (default): seeded random inputs labelled by the dense model's own
  predictions (argmax over dim 1). Real data gives better pruning.
- an ImageFolder directory (``DIR/class_a/*.png``, ...): read with
  ``torchvision.datasets.ImageFolder`` and the model's eval transform (timm's
  ``resolve_data_config`` + ``create_transform`` for ``timm:`` models, a weights-free
  Resize / CenterCrop / ImageNet normalisation otherwise).
- ``fashion-mnist`` or ``fashion-mnist:DIR``: the idx files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), parsed here,
  resized to the model's input size and replicated over its channels.

Batches are materialised as a list of ``(inputs, targets)`` on the target device
(calibration uses a handful of batches).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from .common import CliError, is_text_model, log
from .hf import synthetic_tokens
from ..errors import DataError

if TYPE_CHECKING:
    import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataSource:
    """What ``--data`` names: ``kind`` is synthetic, folder or fashion-mnist."""

    kind: str
    path: Optional[str] = None

    def describe(self) -> str:
        """How the data source is named in stage lines."""
        return {"synthetic": "synthetic (random inputs labelled by the dense model)",
                "folder": f"ImageFolder {self.path}",
                "fashion-mnist": f"Fashion-MNIST from {self.path}"}[self.kind]


@dataclass
class Calibration:
    """Calibration batches (``None`` for data-free criteria) and a one-sample example."""

    batches: Optional[List[Tuple["torch.Tensor", "torch.Tensor"]]]
    example: "torch.Tensor"


def parse_source(data: Optional[str]) -> DataSource:
    """Check ``--data`` before any model is built; raise :class:`DataError` when the
    directory is missing, empty or holds no class folder with images."""
    if data is None or data == "synthetic":
        return DataSource("synthetic")
    if data == "fashion-mnist" or data.startswith("fashion-mnist:"):
        path = data.partition(":")[2] or FASHION_MNIST_DIR
        _fashion_files(path)
        return DataSource("fashion-mnist", path)
    if not os.path.isdir(data):
        raise DataError(f"--data {data}: no such directory; pass an ImageFolder directory "
                        "(DIR/CLASS/IMAGE.png), 'fashion-mnist' or 'synthetic'")
    try:
        classes = [e for e in os.scandir(data) if e.is_dir()]
        images = any(f.name.lower().endswith(_IMAGE_SUFFIXES)
                     for c in classes for f in os.scandir(c.path) if f.is_file())
    except OSError as exc:
        raise DataError(f"--data {data}: cannot read the directory: {exc.strerror}") from None
    if not images:
        raise DataError(f"--data {data}: no images found; an ImageFolder directory holds one "
                        "sub-directory per class with images in it (DIR/CLASS/IMAGE.png)")
    return DataSource("folder", data)


def calibration(source: DataSource, model, size: Tuple[int, ...], device, *, batches: int,
                batch_size: int, seed: int, labels: bool, workers: int = 0,
                spec: str = "") -> Calibration:
    """Load the calibration batches. ``labels=False`` (data-free criteria) loads a
    single batch, only for its example input."""
    count = batches if labels else 1
    if is_text_model(model) and source.kind != "synthetic":
        raise CliError(f"--data: {source.describe()} holds images; a text model is calibrated "
                       "on synthetic token ids here (drop --data), or through the API with "
                       "your own tokenised batches")
    if source.kind == "synthetic" and is_text_model(model):
        data = synthetic_tokens(model, size, device, count, batch_size, seed, labels)
    elif source.kind == "synthetic":
        data = _synthetic(model, size, device, count, batch_size, seed, labels)
    elif source.kind == "folder":
        data = _folder(source.path, model, size, count, batch_size, seed, workers, spec)
    else:
        data = _fashion_mnist(source.path, size, count, batch_size, seed)
    data = [(x.to(device), y.to(device)) for x, y in data]
    if labels and source.kind != "synthetic":
        _check_classes(model, data)
    example = data[0][0][:1].clone()
    if source.kind == "synthetic" and labels:
        log.warning("calibrating on synthetic data; real data (--data DIR or --data "
                    "fashion-mnist) gives better pruning")
    return Calibration(data if labels else None, example)


def _synthetic(model, size, device, count, batch_size, seed, labels):
    """Seeded ``randn`` inputs; targets are the dense model's argmax (zeros when unused)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(batch_size, *size, generator=gen)
        y = torch.zeros(batch_size, dtype=torch.long)
        if labels:
            with torch.no_grad():
                logits = model(x.to(device))
            if not torch.is_tensor(logits) or logits.dim() < 2:
                raise DataError("synthetic labels need a model that returns [batch, classes] "
                                "logits; pass real data with --data")
            y = logits.argmax(dim=1).cpu()
        out.append((x, y))
    return out


def _check_classes(model, data) -> None:
    """Labels must index the model's outputs (else cross-entropy fails obscurely)."""
    import torch
    with torch.no_grad():
        out = model(data[0][0][:1])
    if torch.is_tensor(out) and out.dim() >= 2:
        top = max(int(y.max()) for _, y in data)
        if top >= out.shape[1]:
            raise DataError(f"the data has labels up to {top} but the model outputs "
                            f"{out.shape[1]} classes; pass --num-classes")


# ----------------------------------------------------------------------------- image folder

def _load_rgb(path: str):
    """ImageFolder loader that turns an unreadable image into a :class:`DataError`."""
    from PIL import Image
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def eval_transform(spec: str, model, size: Tuple[int, ...]):
    """The model's evaluation transform for images of ``size`` (C, H, W)."""
    if len(size) != 3:
        raise DataError(f"image data needs a (C, H, W) input size, got {size}; "
                        "pass --input-size or use --data synthetic")
    if spec.startswith("timm:"):
        from timm.data import create_transform, resolve_data_config
        cfg = resolve_data_config({"input_size": tuple(size)}, model=model)
        return create_transform(**cfg)
    from torchvision import transforms as T
    steps = [T.Resize(int(round(max(size[1:]) / 0.875))), T.CenterCrop(size[1:])]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if size[0] == 1:
        steps.append(T.Grayscale(1))
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif size[0] != 3:
        raise DataError(f"image folders give RGB images; the model takes {size[0]} channels")
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _folder(path, model, size, count, batch_size, seed, workers, spec):
    """The first ``count`` shuffled (seeded) batches of an ImageFolder."""
    import torch
    from torchvision.datasets import ImageFolder
    try:
        dataset = ImageFolder(path, transform=eval_transform(spec, model, size), loader=_load_rgb)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"--data {path}: {exc}") from None
    log.info("ImageFolder %s: %d images in %d classes", path, len(dataset), len(dataset.classes))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    out = []
    for x, y in loader:
        out.append((x, y))
        if len(out) >= count:
            break
    return out


# ----------------------------------------------------------------------------- fashion-mnist

def _fashion_files(path: str) -> Tuple[str, str]:
    """(images, labels) idx files in ``path``: the train split, else t10k; gz or raw."""
    names = [("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    for images, labels in names:
        for suffix in (".gz", ""):
            pair = (os.path.join(path, images + suffix), os.path.join(path, labels + suffix))
            if all(os.path.isfile(p) for p in pair):
                return pair
    raise DataError(f"Fashion-MNIST not found in {path}: install it with "
                    "`apt-get install dataset-fashion-mnist` or pass --data fashion-mnist:DIR")


def read_idx(path: str) -> "torch.Tensor":
    """Read an idx file (optionally gzipped) of unsigned bytes into a uint8 tensor."""
    import torch
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, code, ndim = struct.unpack(">HBB", raw[:4])
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{path}: not a readable idx file ({exc})") from None
    body = raw[4 + 4 * ndim:]
    expected = 1
    for d in dims:
        expected *= d
    if zero != 0 or code != 0x08 or len(body) != expected:
        raise DataError(f"{path}: not an idx file of unsigned bytes with shape {list(dims)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def _fashion_mnist(path, size, count, batch_size, seed):
    """A seeded random subset, normalised, resized to (H, W) and repeated over C."""
    import torch
    import torch.nn.functional as F
    if len(size) != 3:
        raise DataError(f"Fashion-MNIST images need a (C, H, W) input size, got {size}")
    images, labels = (read_idx(p) for p in _fashion_files(path))
    if images.dim() != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: images {list(images.shape)} and labels "
                        f"{list(labels.shape)} do not match")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=gen)[:count * batch_size]
    out = []
    for chunk in order.split(batch_size):
        x = (images[chunk].float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        x = F.interpolate(x[:, None], size=tuple(size[1:]), mode="bilinear",
                          align_corners=False)
        out.append((x.expand(-1, size[0], -1, -1).contiguous(), labels[chunk].long()))
    return out
