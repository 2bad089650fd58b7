"""Loading the released SEED-Story weights (``release``, one ``release_*`` module per file); heavy imports happen
inside the loaders."""
from .files import CheckpointError

__all__ = ["CheckpointError"]
