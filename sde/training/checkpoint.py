"""Alias of :mod:`sde.checkpoint`, the one checkpoint module (kept so ``sde.training.checkpoint`` imports work)."""

from ..checkpoint import *  # noqa: F403
from ..checkpoint import __all__  # noqa: F401
