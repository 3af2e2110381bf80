"""fxprune: second-order structured pruning as a torch.fx pipeline."""
from .errors import FxpruneError

