"""DDPM++ / NCSN++-style U-Net (Ho et al. 2020; Song et al. 2021, appendix H).

Residual blocks of GroupNorm -> SiLU -> conv, with the noise (and class) embedding added
between the two convolutions; self-attention at chosen resolutions; every residual sum
rescaled by 1/sqrt(2) (DDPM++'s ``skip_rescale``) so activations keep unit scale with depth;
output convolutions of each branch initialised to zero so every block starts as identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int, shared_time
from .embeddings import EMBEDDINGS, ClassEmbedding, check_net_inputs

__all__ = ["UNet"]

_SKIP_SCALE = 1.0 / math.sqrt(2.0)  # keeps Var(h + skip) ~ Var(h) for independent unit branches


def _groups(channels: int) -> int:
    """Largest group count <= 32 dividing ``channels`` with >= 4 channels a group when possible."""
    for g in range(min(32, max(1, channels // 4)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return (self.skip(x) + h) * _SKIP_SCALE


class _Attention(nn.Module):
    """Multi-head self-attention over the H*W positions."""

    def __init__(self, channels: int, head_dim: int = 32) -> None:
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = nn.functional.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return (x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))) * _SKIP_SCALE


class UNet(nn.Module):
    """``net(x, noise_label, y=None)`` for (B, C, H, W) images; output (B, out_channels, H, W).

    Defaults are sized for 8x8 digits on a 2-core CPU (1.62M parameters).

    Args:
        in_channels: image channels C.
        out_channels: output channels (default: in_channels).
        base_channels: channels at full resolution.
        channel_mults: channel multiplier per resolution level; each level after the first halves H, W.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions (min(H, W) at a level) that get self-attention.
        dropout: dropout inside residual blocks.
        embedding: "positional" (DDPM++) or "fourier" (NCSN++) noise-label features.
        num_classes: classes for conditioning (0 = unconditional); index num_classes is the null class.
        image_size: H = W, or (H, W); each must be divisible by 2^(len(channel_mults) - 1).

    Raises:
        ValueError / TypeError: bad sizes; at call time, an input not shaped (B, in_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.1,
        embedding: str = "positional",
        num_classes: int = 0,
        image_size: int | tuple[int, int] = 8,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels, 1)
        self.num_classes = check_int("num_classes", num_classes, 0)
        mults, self.image_size = _check_unet(base_channels, num_res_blocks, dropout, channel_mults, image_size)
        embed_cls = EMBEDDINGS[check_choice("embedding", embedding, EMBEDDINGS)]
        emb_dim = 4 * base_channels
        self.embed = nn.Sequential(
            embed_cls(base_channels), nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = ClassEmbedding(num_classes, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        block = partial(_level_blocks, emb_dim=emb_dim, dropout=dropout, attn_resolutions=tuple(attn_resolutions))
        self.down, skips, ch, res = _down_path(block, base_channels, mults, num_res_blocks, min(self.image_size))
        self.mid = nn.ModuleList(
            [_ResBlock(ch, ch, emb_dim, dropout), _Attention(ch), _ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.up, ch = _up_path(block, base_channels, mults, num_res_blocks, skips, ch, res)
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, (_ResBlock, _Attention)) else layer(h)
        return h

    def forward(self, x: Tensor, noise_label: Tensor, y: Tensor | None = None) -> Tensor:
        noise_label = check_net_inputs(x, noise_label, y, self.num_classes)
        expected = (self.in_channels, *self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        emb = self.embed(shared_time(noise_label))  # (1, C) when the batch shares one time; broadcasts
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        emb = nn.functional.silu(emb)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            if isinstance(layers[0], _ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(layers, h, emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, num_classes={self.num_classes}"


def _check_unet(base_channels: int, num_res_blocks: int, dropout: float, channel_mults: Sequence[int],
                image_size: int | tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, int]]:
    """Validate the U-Net's sizes; returns (channel multipliers, (H, W))."""
    check_int("base_channels", base_channels, 1)
    check_int("num_res_blocks", num_res_blocks, 1)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    mults = tuple(channel_mults)
    if not mults or any(not isinstance(m, int) or m < 1 for m in mults):
        raise ValueError(f"channel_mults must be a non-empty sequence of ints >= 1, got {channel_mults!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    factor = 2 ** (len(mults) - 1)
    if len(size) != 2 or any(not isinstance(s, int) or s < 1 or s % factor for s in size):
        raise ValueError(
            f"image_size must be positive and divisible by 2^(len(channel_mults) - 1) = {factor} "
            f"for channel_mults={mults}, got {image_size!r}"
        )
    return mults, size


def _level_blocks(cin: int, cout: int, res: int, *, emb_dim: int, dropout: float,
                  attn_resolutions: tuple[int, ...]) -> nn.ModuleList:
    """One residual block, followed by self-attention at the attention resolutions."""
    layers = [_ResBlock(cin, cout, emb_dim, dropout)]
    if res in attn_resolutions:
        layers.append(_Attention(cout))
    return nn.ModuleList(layers)


def _down_path(block, base: int, mults: tuple[int, ...], num_res_blocks: int,
               res: int) -> tuple[nn.ModuleList, list[int], int, int]:
    """The encoder: (its layers, the skip channels, the final channels, the final resolution)."""
    down, skips, ch = nn.ModuleList(), [base], base
    for level, mult in enumerate(mults):
        for _ in range(num_res_blocks):
            down.append(block(ch, base * mult, res))
            ch = base * mult
            skips.append(ch)
        if level < len(mults) - 1:
            down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
            skips.append(ch)
            res //= 2
    return down, skips, ch, res


def _up_path(block, base: int, mults: tuple[int, ...], num_res_blocks: int, skips: list[int], ch: int,
             res: int) -> tuple[nn.ModuleList, int]:
    """The decoder, consuming the skip channels: (its layers, the final channels)."""
    up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(mults))):
        for _ in range(num_res_blocks + 1):
            up.append(block(ch + skips.pop(), base * mult, res))
            ch = base * mult
        if level > 0:
            up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]))
            res *= 2
    return up, ch
