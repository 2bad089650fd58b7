"""Loading the released SEED-Story weights (``release``); heavy imports happen inside the loaders."""
from .release import CheckpointError

__all__ = ["CheckpointError"]
