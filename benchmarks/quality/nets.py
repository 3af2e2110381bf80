"""Models, the training recipes, evaluation and the shared fine-tuning recipe."""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fxprune.models as zoo
from fxprune.models.fixtures_transformer import TinyViT

VIT_KW = dict(img_size=28, patch=4, dim=64, depth=4, heads=4, mlp_ratio=2.0)


def log(msg: str) -> None:
    """Timestamped progress line, flushed so a long run can be watched."""
    worker = os.environ.get("QUALITY_WORKER")
    tag = f" w{worker}" if worker else ""
    print(f"[{time.strftime('%H:%M:%S')}{tag}] {msg}", flush=True)


def build_model(name: str) -> torch.nn.Module:
    """``resnet``: cifar_resnet20(in_chans=1); ``vit``: fxprune's TinyViT (timm-style
    blocks) at 28x28, patch 4 (49 tokens + cls), dim 64, depth 4, 4 heads, MLP x2,
    with a 1-channel patch embedding."""
    if name == "resnet":
        return zoo.create_model("cifar_resnet20", in_chans=1, num_classes=10)
    if name == "vit":
        model = TinyViT(num_classes=10, **VIT_KW)
        model.patch_embed = torch.nn.Conv2d(1, VIT_KW["dim"], VIT_KW["patch"], VIT_KW["patch"])
        model.input_size = (1, 28, 28)
        return model
    raise ValueError(f"unknown model {name!r} (resnet, vit)")


@dataclass
class Recipe:
    """An optimisation recipe: linear warm-up then cosine decay to 0, per step."""
    optimizer: str  # "sgd" (momentum 0.9, nesterov) or "adamw"
    lr: float
    weight_decay: float
    batch: int
    steps: int
    warmup: int = 0
    aug: bool = True

    def key(self) -> str:
        return "-".join(f"{k}{v}" for k, v in asdict(self).items())


def make_optimizer(model: torch.nn.Module, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=r.lr, momentum=0.9, nesterov=True,
                               weight_decay=r.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return 0.5 * r.lr * (1 + math.cos(math.pi * t))


def train(model: torch.nn.Module, r: Recipe, batches, label: str = "",
          log_every: int = 100) -> torch.nn.Module:
    """Run recipe ``r`` over ``batches`` (an iterator of ``r.steps`` batches) in place."""
    model.train()
    opt = make_optimizer(model, r)
    start, run_loss = time.time(), 0.0
    for step, (x, y) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run_loss += loss.item()
        if label and ((step + 1) % log_every == 0 or step + 1 == r.steps):
            n = (step % log_every) + 1
            log(f"  {label} step {step + 1}/{r.steps} loss {run_loss / n:.4f} "
                f"({time.time() - start:.0f}s)")
            run_loss = 0.0
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (%) in eval mode; restores the module's train/eval flag."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(x)


@torch.no_grad()
def accuracy_after_bn_recalibration(model: torch.nn.Module, calib, test_data) -> float:
    """Test accuracy after re-estimating BatchNorm running statistics on the calibration
    inputs (no gradient step), on a copy. Separates what a criterion keeps from the stale
    BN statistics that pruning leaves; equals the plain accuracy for a model without BN."""
    probe = copy.deepcopy(model)
    norms = [m for m in probe.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    probe.train()
    for x, _ in calib:
        probe(x)
    return evaluate(probe, *test_data)


def trained_model(name: str, r: Recipe, data, cache_dir: str, seed: int = 0,
                  eval_fn: Optional[Callable] = None) -> torch.nn.Module:
    """Train ``name`` with recipe ``r`` (seeded) or load it from the checkpoint cache."""
    from .data import train_batches
    path = os.path.join(cache_dir, f"{name}-seed{seed}-{r.key()}.pt")
    torch.manual_seed(seed)
    model = build_model(name)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        log(f"loaded {name} from {path}")
        return model.eval()
    log(f"training {name}: {r}")
    start = time.time()
    xtr, ytr = data
    train(model, r, train_batches(xtr, ytr, r.batch, r.steps, seed, r.aug), label=name)
    torch.save(model.state_dict(), path)
    log(f"trained {name} in {time.time() - start:.0f}s -> {path}")
    return model
