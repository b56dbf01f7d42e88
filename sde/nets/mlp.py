"""Residual MLP score network for (B, D) vector data (toy 2-D sets, oracle mixtures)."""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import check_choice, check_int, shared_time
from .embeddings import EMBEDDINGS, ClassEmbedding, check_net_inputs

__all__ = ["MLP"]


class _ResidualBlock(nn.Module):
    """h + W2 dropout(SiLU(W1 SiLU(LayerNorm h) + E emb)): pre-norm, time injected mid-block."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        r = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.fc2(self.drop(nn.functional.silu(r)))


class MLP(nn.Module):
    """``net(x, noise_label, y=None)`` for (B, dim) inputs; output shaped like x.

    Args:
        dim: data dimension D.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        embedding: "fourier" (Gaussian Fourier features) or "positional" (sinusoids).
        emb_dim: width of the noise-label features before the embedding MLP.
        num_classes: classes for conditioning (0 = unconditional); index num_classes is the null class.
        dropout: dropout rate inside each block.

    Raises:
        ValueError / TypeError: bad sizes or embedding name; wrongly shaped inputs at call time.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        embedding: str = "fourier",
        emb_dim: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, 1)
        check_int("hidden", hidden, 1)
        check_int("depth", depth, 1)
        self.num_classes = check_int("num_classes", num_classes, 0)
        embed_cls = EMBEDDINGS[check_choice("embedding", embedding, EMBEDDINGS)]
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.embed = nn.Sequential(embed_cls(emb_dim), nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = ClassEmbedding(num_classes, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, noise_label: Tensor, y: Tensor | None = None) -> Tensor:
        noise_label = check_net_inputs(x, noise_label, y, self.num_classes)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.embed(shared_time(noise_label))  # (1, C) when the batch shares one time; broadcasts
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        emb = nn.functional.silu(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_classes={self.num_classes}"
