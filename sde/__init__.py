"""score-sde: score-based generative modeling with SDEs, in plain PyTorch.

The library never imports hydra, omegaconf or wandb; experiments/ does the gluing.
"""

from .oracle import GaussianMixture
from .sdes import SDE, VESDE, VPSDE, ReverseSDE, ScoreFn, SubVPSDE

__version__ = "0.1.0"

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE", "ReverseSDE", "ScoreFn", "GaussianMixture", "__version__"]
