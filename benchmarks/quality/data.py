"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``: idx(.gz) reader,
normalisation, tensor augmentation and seeded batch iterators (no torchvision needed)."""
from __future__ import annotations

import gzip
import os
import struct
from typing import Iterator, List, Tuple

import numpy as np
import torch

DATA_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic ``00 00 <dtype> <ndim>``, big-endian dims."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _DTYPES:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_DTYPES[dtype_code], offset=4 + 4 * ndim)
    return data.reshape(dims)


def _find(stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(DATA_DIR, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{stem}(.gz) not found in {DATA_DIR}: `apt-get install -y "
                            "dataset-fashion-mnist` or set FMNIST_DIR")


def load_split(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return normalised images ``[N, 1, 28, 28]`` float32 and int64 labels."""
    img_stem, lbl_stem = FILES[split]
    images = torch.from_numpy(read_idx(_find(img_stem)).copy()).float().div_(255.0)
    labels = torch.from_numpy(read_idx(_find(lbl_stem)).astype(np.int64))
    images = images.sub_(MEAN).div_(STD).unsqueeze(1)
    return images, labels


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop (zero-padding ``pad`` px, in normalised units: the background value)
    plus random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, 1, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, 1, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_batches(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, seed: int,
                  aug: bool = True) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` shuffled (augmented) training batches, epochs reshuffled, fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(x), generator=gen), 0
    for _ in range(steps):
        if pos + batch > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos:pos + batch]
        pos += batch
        xb = x[idx]
        yield (augment(xb, gen) if aug else xb), y[idx]


def calibration_batches(x: torch.Tensor, y: torch.Tensor, n_batches: int, batch: int,
                        seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, un-augmented calibration batches drawn from the training set (same for every
    criterion and Torch-Pruning importance at a given seed)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(x), generator=gen)[:n_batches * batch]
    return [(x[idx[i:i + batch]], y[idx[i:i + batch]]) for i in range(0, len(idx), batch)]
