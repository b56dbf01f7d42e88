"""Pictures: sample grids, denoising strips, 2-D scatter plots and likelihood histograms.

Grids are plain PIL (exact pixels, nearest-neighbour upscaling for 8x8 digits); plots use
matplotlib's Agg backend so nothing needs a display.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sde._io import atomic_write

__all__ = ["image_grid", "save_grid", "save_strip", "save_scatter", "save_histogram"]


def _to_uint8(x: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(x: Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile a batch of images (B, C, H, W) in [-1, 1] into one (rows*H, cols*W, C) uint8 array."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    ncol = int(math.ceil(b / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(_to_uint8(x)):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def _save_array(arr: np.ndarray, path: str | os.PathLike, scale: int) -> Path:
    path = Path(path)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def _scale_for(h: int) -> int:
    return max(1, 64 // h)  # 8x8 digits become 64x64 tiles; 32x32 images stay twice as large


def save_grid(x: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save a PNG grid of images in [-1, 1]."""
    return _save_array(image_grid(x, nrow), path, _scale_for(x.shape[-2]))


def save_strip(frames: list[Tensor], path: str | os.PathLike) -> Path:
    """Save a denoising strip: one row per sample, one column per recorded time step.

    Args:
        frames: list over time of (B, C, H, W) tensors (x_t, or x0_hat rows interleaved by the caller).
    """
    stacked = torch.stack(frames, dim=1)  # (B, T, C, H, W): row = sample, column = time
    b, t = stacked.shape[:2]
    return _save_array(image_grid(stacked.flatten(0, 1), nrow=t), path, _scale_for(stacked.shape[-2]))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def save_scatter(samples: Tensor, path: str | os.PathLike, reference: Tensor | None = None, title: str = "") -> Path:
    """Scatter plot of 2-D samples, over a 2-D histogram (density) of reference data when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    s = samples.detach().float().cpu().numpy()
    if reference is not None:
        r = reference.detach().float().cpu().numpy()
        lim = np.abs(np.concatenate([r, s])).max() * 1.05
        ax.hist2d(r[:, 0], r[:, 1], bins=60, range=[[-lim, lim], [-lim, lim]], cmap="Greys")
    ax.scatter(s[:, 0], s[:, 1], s=3, alpha=0.6, color="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    try:
        return _savefig(fig, path)
    finally:
        plt.close(fig)


def save_histogram(values: Tensor, path: str | os.PathLike, xlabel: str, reference: Tensor | None = None) -> Path:
    """Histogram of per-sample values (e.g. bits/dim), overlaid on reference values when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    v = values.detach().double().cpu().numpy()
    ax.hist(v, bins=40, alpha=0.7, label="model")
    if reference is not None:
        ax.hist(reference.detach().double().cpu().numpy(), bins=40, alpha=0.5, label="exact")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    try:
        return _savefig(fig, path)
    finally:
        plt.close(fig)
