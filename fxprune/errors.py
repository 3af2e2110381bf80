"""Error types. Every error fxprune raises is an :class:`FxpruneError` whose message
names the module / FX node involved and says what the user can do about it."""
import difflib
from typing import Iterable


def did_you_mean(word: str, candidates: Iterable[str], n: int = 2) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the up to ``n`` close matches of ``word``
    among ``candidates`` (:func:`difflib.get_close_matches`), or ``""`` when none is
    close: the hint of every "unknown name" message."""
    close = difflib.get_close_matches(str(word), list(candidates), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""



class FxpruneError(Exception):
    """Base class of all fxprune errors."""


class TraceError(FxpruneError):
    """The model could not be turned into an FX graph."""


class AnalysisError(FxpruneError):
    """Channel analysis met something it cannot reason about."""


class BudgetError(FxpruneError):
    """A budget is malformed or cannot be met."""


class DataError(FxpruneError):
    """Calibration data is missing, empty, or produced a non-finite loss."""


class CheckpointError(FxpruneError):
    """A checkpoint file does not match the model."""


class CriterionError(FxpruneError):
    """Unknown criterion or bad criterion options."""


class PlanError(FxpruneError):
    """A pruning plan is malformed (e.g. duplicated kept indices) or was made on a
    different model than the one it is applied to."""


class UnknownOptionError(FxpruneError, TypeError):
    """A keyword argument that neither the function nor the criterion takes (a typo such
    as ``ignored=`` or ``flop=``). Also a ``TypeError``, as Python raises for an
    unexpected keyword."""


class UnknownNameError(FxpruneError, LookupError):
    """An argument names a module or parameter that the model does not have (e.g. an
    ``ignore=`` entry that matches nothing)."""


class DegenerateScoresError(FxpruneError):
    """A criterion's channel scores cannot rank any channel (all zero or all equal in
    every prunable group), so a plan would be arbitrary."""


class DuplicateNameError(FxpruneError, ValueError):
    """A registry key (criterion name, model name, op of a channel rule, leaf type) is
    registered a second time with a different entry, without ``overwrite=True``."""
