"""Model registry (installed as ``fxprune.models``).

Tiny topology fixtures (:mod:`.fixtures`, :mod:`.fixtures_transformer`), the papers'
CIFAR nets (:mod:`.cifar`), ``timm:NAME`` / ``torchvision:NAME`` loaders, user
``path/to/file.py:factory`` specs, and checkpoint loading (:mod:`.checkpoint`)::

    from fxprune.models import create_model, list_models, model_input_size
    model = create_model("cifar_resnet32_w4", num_classes=100, checkpoint="w.pth")
    x = torch.randn(8, *model_input_size("cifar_resnet32_w4"))
"""
from . import cifar, fixtures, fixtures_transformer  # noqa: F401  (registers the models)
from .checkpoint import load_checkpoint, read_state_dict
from .registry import (
    ModelEntry,
    UnknownModelError,
    create_model,
    list_models,
    model_info,
    model_input_size,
    register_model,
)

__all__ = [
    "ModelEntry",
    "UnknownModelError",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_info",
    "model_input_size",
    "read_state_dict",
    "register_model",
]
