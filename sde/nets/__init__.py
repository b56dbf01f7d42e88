"""Score networks: every net is called as ``net(x, noise_label, y=None)`` and returns a tensor
shaped like x (the parametrization's target; see ``sde.models.ScoreModel``)."""

from .embeddings import EMBEDDINGS, GaussianFourierEmbedding, PositionalEmbedding
from .mlp import MLP
from .unet import UNet

NETS = {"mlp": MLP, "unet": UNet}

__all__ = ["MLP", "UNet", "NETS", "EMBEDDINGS", "GaussianFourierEmbedding", "PositionalEmbedding"]
