"""Noise-level embeddings: Gaussian Fourier features (Tancik et al. 2020, as in NCSN++) and
sinusoidal positional features (Vaswani et al. 2017, as in DDPM++), plus the shared helpers
that validate a net's ``(x, noise_label, y)`` call.

Both embeddings expect the noise label ``c_noise = log(sigma / alpha) / 4`` that
``ScoreModel`` feeds (values roughly in [-3, 2]); ``scale`` stretches it so that the
sinusoids cover several periods over that range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive

__all__ = ["GaussianFourierEmbedding", "PositionalEmbedding", "EMBEDDINGS", "ClassEmbedding"]


class GaussianFourierEmbedding(nn.Module):
    """[sin(2 pi w c), cos(2 pi w c)] with fixed random frequencies w ~ N(0, scale^2).

    Args:
        dim: output width (even).
        scale: std of the random frequencies.
        seed: seed of the frequency draw, so two nets built alike embed alike.
    """

    def __init__(self, dim: int, scale: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        check_positive("scale", scale)
        gen = torch.Generator().manual_seed(seed)
        # a buffer, not a parameter: NCSN++ keeps the frequencies fixed
        self.register_buffer("freqs", torch.randn(dim // 2, generator=gen) * scale)

    def forward(self, noise_label: Tensor) -> Tensor:
        arg = 2 * math.pi * noise_label[:, None] * self.freqs.to(noise_label)[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of ``scale * c`` at frequencies max_positions^(-i / (dim/2)).

    Args:
        dim: output width (even).
        max_positions: ratio of the highest to the lowest frequency.
        scale: multiplies the label first (1000 maps c_noise in [-3, 2] to DDPM's ~1000-step range).
    """

    def __init__(self, dim: int, max_positions: float = 10000.0, scale: float = 1000.0) -> None:
        super().__init__()
        check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        half = dim // 2
        self.scale = check_positive("scale", scale)
        freqs = torch.exp(-math.log(check_positive("max_positions", max_positions)) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, noise_label: Tensor) -> Tensor:
        arg = (self.scale * noise_label)[:, None] * self.freqs.to(noise_label)[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


EMBEDDINGS: dict[str, type[nn.Module]] = {"fourier": GaussianFourierEmbedding, "positional": PositionalEmbedding}


class ClassEmbedding(nn.Module):
    """Learned class vectors with one extra "null" class (index ``num_classes``) for
    classifier-free guidance (Ho & Salimans 2022); ``y=None`` means the null class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor | None) -> Tensor:
        """(B, dim) class vectors for labels y, or one (1, dim) null-class row that broadcasts for y=None."""
        if y is None:
            return self.table.weight[self.num_classes :]
        return self.table(y)


def check_net_inputs(x: Tensor, noise_label: Tensor, y: Tensor | None, num_classes: int) -> Tensor:
    """Validate a net call; returns ``noise_label`` as a (B,) tensor of x's dtype.

    Raises:
        TypeError: x or y of the wrong type.
        ValueError: shapes disagree, or class labels outside [0, num_classes].
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    batch = x.shape[0]
    noise_label = torch.as_tensor(noise_label, device=x.device, dtype=x.dtype)
    if noise_label.dim() == 0:
        noise_label = noise_label.expand(batch)
    if noise_label.shape != (batch,):
        raise ValueError(f"noise_label must have shape ({batch},), got {tuple(noise_label.shape)}")
    if y is not None:
        if num_classes == 0:
            raise ValueError("y was given but the net is unconditional (num_classes=0)")
        if not isinstance(y, Tensor) or y.dtype != torch.long or y.shape != (batch,):
            got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(f"y must be a long tensor of shape ({batch},), got {got}")
        if y.device.type == "cpu" and y.numel() and (y.min() < 0 or y.max() > num_classes):
            raise ValueError(
                f"y must lie in [0, {num_classes}] ({num_classes} = null class), "
                f"got [{y.min().item()}, {y.max().item()}]"
            )
    return noise_label
