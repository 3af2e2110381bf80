"""Run modules in eval mode for a while and give every submodule its own flag back.

``module.train(was)`` restores one flag for the whole tree, which is wrong for a model
whose submodules differ (a frozen BN inside a training model); the passes that evaluate
a model they do not own for good (verification, repair, scoring) use :func:`eval_mode`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block; afterwards each
    submodule's ``training`` flag is what it was before, whatever the block raised."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag
