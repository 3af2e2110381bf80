"""Quick / full settings. Full mode is the benchmark; quick mode is a smoke test that runs
every code path in minutes (its accuracies are meaningless)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from fxprune import Gradual

from .nets import Recipe

EPOCH = 60_000
#: Benchmark methods: fxprune criteria, ``<criterion>+<suffix>`` for a criterion run
#: with the options :data:`SUFFIX_OPTIONS` names (``+fisher``: obs' loss-weighted scale;
#: ``+raw``: ``normalize=None``, channels ranked by raw score across groups; ``+cost``:
#: ``cost_aware=True``, ranked by score ÷ the FLOPs one channel of the group saves;
#: ``+kron``: obs' ``gram="kron"``, every conv on its channel ⊗ kernel factored Gram;
#: ``+fill``: ``fill=True``, the slack below the budget given back (off unless named);
#: ``+bntrain``, ``+rbn``, ``+rfull`` (with ``@N`` only: :data:`GRADUAL_SUFFIXES`): gradual
#: steps scored with batch-statistics BN (the OBA reference code's train-mode scoring), or
#: on the plan so far as ``repair="bn"`` / ``"full"`` leaves it (``Gradual(N, repair=...)``);
#: any other suffix is option ``perturb=``, e.g. ``+consumer``, issue 12's consumer-cut
#: δθ of the second-order criteria), and a ``@N`` suffix for ``compile(steps=N)`` (the
#: OBA paper's gradual procedure, e.g. ``obs@50``, ``oba+consumer@50``); the default
#: list is the one-shot methods.
CRITERIA = ["obs+raw+cost", "obs", "obs+fisher", "oba", "oba+consumer", "oba-exact", "oba-exact+consumer",
            "sosp-h", "sosp-h+consumer", "sosp-i", "sosp-i+consumer", "taylor", "obd", "l2",
            "random"]
#: ``+suffix`` parts of method names that are not a ``perturb=`` value (several may
#: follow each other: ``obs+fisher+raw``).
SUFFIX_OPTIONS = {"fisher": {"scale": "fisher"}, "raw": {"normalize": None},
                  "cost": {"cost_aware": True}, "kron": {"gram": "kron"},
                  "dense": {"target": "dense"}, "fill": {"fill": True}}
#: ``+suffix`` parts that set a :class:`fxprune.Gradual` field (``@N`` methods only).
GRADUAL_SUFFIXES = {"bntrain": {"bn_train": True}, "rbn": {"repair": "bn"},
                    "rfull": {"repair": "full"}}
ITERATIVE = [0.6, 0.5, 0.4, 0.3, 0.2, 0.14]
FULL_FT_STEPS = 200


def method_options(method: str, seed: int) -> Tuple[str, Dict]:
    """``(fxprune criterion, its options)`` of a benchmark method name: ``"oba+consumer"``
    is ``("oba", {"perturb": "consumer"})``, ``"obs+fisher"`` is ``("obs", {"scale":
    "fisher"})``, ``"obs@50"`` is ``("obs", {"steps": 50})``;
    ``"obs+fisher+raw"`` adds ``{"normalize": None}``; ``obs@N`` scores toward the
    masked model's outputs (``target="masked"``) and ``obs+dense@N`` toward the dense
    model's (compile's default in gradual steps); ``"random"`` is seeded by the
    prune seed. Every method states its ranking (``normalize="mean"``, ``cost_aware=False``
    unless ``+raw`` / ``+cost``), so that a change of compile's defaults leaves the rows'
    meaning alone."""
    method, at, steps = method.partition("@")
    criterion, *suffixes = method.split("+")
    # a method name means one ranking, whatever compile's default: the plain one unless
    # a suffix says otherwise (the committed rows were measured so)
    opts: Dict = {"normalize": "mean", "cost_aware": False, "fill": False}
    # steps on the masked dense weights unless a suffix says otherwise (the committed
    # @N rows were measured so; compile's default follows its repair= mode)
    gradual: Dict = {"repair": None}
    for suffix in suffixes:
        if suffix in GRADUAL_SUFFIXES:
            gradual.update(GRADUAL_SUFFIXES[suffix])
        else:
            opts.update(SUFFIX_OPTIONS.get(suffix, {"perturb": suffix}))
    if len(gradual) > 1 and not at:
        raise ValueError(f"{method!r}: {', '.join(GRADUAL_SUFFIXES)} are gradual-step "
                         "options; add @N")
    if at:
        opts["steps"] = Gradual(int(steps), **gradual)
        if criterion == "obs":  # rows before obs' dense targets were measured so
            opts.setdefault("target", "masked")
    if criterion == "random":
        opts["seed"] = seed
    return criterion, opts


@dataclass
class Config:
    mode: str
    train: Dict[str, Recipe]
    ft: Dict[str, Recipe]
    budgets: List[float]
    seeds: int
    calib_batches: int
    calib_batch: int
    test_size: int
    hessian_samples: int
    bisect_iters: int
    iterative: List[float]
    iter_ft_steps: int
    criteria: List[str] = field(default_factory=lambda: list(CRITERIA))
    models: List[str] = field(default_factory=lambda: ["resnet", "vit"])

    def tag(self) -> str:
        """Hash of everything that changes the numbers (not the job selection)."""
        keys = {k: v for k, v in asdict(self).items()
                if k not in ("budgets", "seeds", "criteria", "models")}
        return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:8]


def _train_recipes(epochs_resnet: float, epochs_vit: float) -> Dict[str, Recipe]:
    sr, sv = int(epochs_resnet * EPOCH / 128), int(epochs_vit * EPOCH / 128)
    return {"resnet": Recipe("sgd", 0.1, 5e-4, 128, sr, warmup=min(469, sr // 10)),
            "vit": Recipe("adamw", 1e-3, 0.05, 128, sv, warmup=min(938, sv // 10))}


def _ft_recipes(steps: int, batch: int) -> Dict[str, Recipe]:
    return {"resnet": Recipe("sgd", 0.01, 5e-4, batch, steps),
            "vit": Recipe("adamw", 1e-4, 0.05, batch, steps)}


def full(train_epochs=None, ft_steps=None) -> Config:
    """The benchmark, sized to finish from scratch in about 2.5 hours on 2 CPU cores with
    ``--workers 2``: ResNet-20 8 epochs (93 % test accuracy, above the 92 % target), ViT
    30 epochs, fine-tuning 200 steps of 128 (0.43 epoch), calibration 32 x 64."""
    er, ev = (8, 30) if train_epochs is None else (train_epochs, train_epochs)
    return Config("full", _train_recipes(er, ev), _ft_recipes(ft_steps or FULL_FT_STEPS, 128),
                  budgets=[0.5, 0.3, 0.14], seeds=2, calib_batches=32, calib_batch=64,
                  test_size=10_000, hessian_samples=256, bisect_iters=10,
                  iterative=list(ITERATIVE), iter_ft_steps=100)


def quick(train_epochs=None, ft_steps=None) -> Config:
    """Smoke test: 200 training steps of 64, 4x32 calibration, 10 FT steps, 1k test images."""
    steps = 200 if train_epochs is None else int(train_epochs * EPOCH / 64)
    train = {"resnet": Recipe("sgd", 0.05, 5e-4, 64, steps, warmup=20),
             "vit": Recipe("adamw", 2e-3, 0.05, 64, steps, warmup=20)}
    return Config("quick", train, _ft_recipes(ft_steps or 10, 64), budgets=[0.3], seeds=1,
                  calib_batches=4, calib_batch=32, test_size=1000, hessian_samples=16,
                  bisect_iters=6, iterative=[0.5, 0.3], iter_ft_steps=10)
