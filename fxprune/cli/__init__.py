"""The ``fxprune`` command line (the ``fxprune`` script, ``python -m fxprune``).

Modules: :mod:`.parser` (argument parser, logging and the one-line error contract;
:func:`main`), one module per command (:mod:`.prune`, :mod:`.graph` for ``groups``,
:mod:`.report`), :mod:`.data` (calibration data) and :mod:`.common` (model and
checkpoint loading, option types, output checks). Command modules are imported only
when their command runs, so ``--help`` stays fast.
"""
from .parser import main

__all__ = ["main"]
