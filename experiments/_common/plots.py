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


def _to_image(arr: np.ndarray, scale: int) -> Image.Image:
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def _save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(Path(path), buf.getvalue())


def _save_array(arr: np.ndarray, path: str | os.PathLike, scale: int) -> Path:
    return _save_image(_to_image(arr, scale), path)


_HEADER = 18  # pixels of the label band above a strip's columns


def _label_font():
    """matplotlib's DejaVu Sans (it has the Greek sigma), else PIL's default font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 11)
    except (ImportError, OSError):
        return ImageFont.load_default(size=11)


def _with_column_labels(img: Image.Image, labels: list[str], column: int, offset: int) -> Image.Image:
    """``img`` under a white band holding ``labels[j]`` centred over column j (``column`` px wide from ``offset``)."""
    from PIL import ImageDraw

    out = Image.new(img.mode, (img.width, img.height + _HEADER), 255 if img.mode == "L" else (255, 255, 255))
    out.paste(img, (0, _HEADER))
    draw, font = ImageDraw.Draw(out), _label_font()
    for j, text in enumerate(labels):
        width = draw.textlength(text, font=font)
        draw.text((offset + j * column + (column - width) / 2, 3), text, fill=0 if img.mode == "L" else (0, 0, 0),
                  font=font)
    return out


def _scale_for(h: int) -> int:
    return max(1, 64 // h)  # 8x8 digits become 64x64 tiles; 32x32 images stay twice as large


def save_grid(x: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save a PNG grid of images in [-1, 1]."""
    return _save_array(image_grid(x, nrow), path, _scale_for(x.shape[-2]))


def save_strip(frames: list[Tensor], path: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Save a denoising strip: one row per sample, one column per recorded time step, each column labelled.

    Args:
        frames: list over time of (B, C, H, W) tensors (x_t, or x0_hat rows interleaved by the caller).
        path: the PNG to write.
        labels: one label per column (``t=0.5``, ``sigma=3.2``, ``final``); default ``frames.labels``
            (what :func:`_common.sampling.draw` records), none when neither is given.

    Raises:
        ValueError: ``labels`` does not have one entry per frame.
    """
    labels = getattr(frames, "labels", None) if labels is None else list(labels)
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"labels must have one entry per frame ({len(frames)}), got {len(labels)}")
    stacked = torch.stack(list(frames), dim=1)  # (B, T, C, H, W): row = sample, column = time
    b, t = stacked.shape[:2]
    scale, pad = _scale_for(stacked.shape[-2]), 1
    img = _to_image(image_grid(stacked.flatten(0, 1), nrow=t, pad=pad), scale)
    if labels:
        img = _with_column_labels(img, labels, (stacked.shape[-1] + pad) * scale, pad * scale)
    return _save_image(img, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def scatter_figure(samples: Tensor, reference: Tensor | None = None, log_density=None, title: str = "",
                   reference_label: str = "data"):
    """The figure of :func:`save_scatter` (callers close it).

    Args:
        samples: (N, 2) generated points (red dots).
        reference: (M, 2) reference points, drawn as a grey 2-D histogram (their density).
        log_density: a callable (K, 2) float64 -> (K,) log-density (e.g. the oracle's ``log_prob``), drawn as
            contour lines of the density.
        title: the axes title.
        reference_label: the legend's name for the reference (``data``, ``oracle samples``).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    s = samples.detach().float().cpu().numpy()
    r = None if reference is None else reference.detach().float().cpu().numpy()
    lim = float(np.abs(s if r is None else np.concatenate([r, s])).max()) * 1.05
    handles = []
    if r is not None:
        ax.hist2d(r[:, 0], r[:, 1], bins=60, range=[[-lim, lim], [-lim, lim]], cmap="Greys")
        handles.append(Patch(color="0.45", label=f"{reference_label} (2-D histogram)"))
    if log_density is not None:
        g = torch.linspace(-lim, lim, 120, dtype=torch.float64)
        gx, gy = torch.meshgrid(g, g, indexing="xy")
        dens = log_density(torch.stack([gx.flatten(), gy.flatten()], 1)).exp().reshape(gx.shape).cpu().numpy()
        ax.contour(gx.numpy(), gy.numpy(), dens, levels=6, colors="tab:blue", linewidths=0.8)
        handles.append(Line2D([], [], color="tab:blue", linewidth=0.8, label="exact density (contours)"))
    ax.scatter(s[:, 0], s[:, 1], s=3, alpha=0.6, color="tab:red")
    handles.append(Line2D([], [], marker="o", linestyle="", markersize=3, color="tab:red", label="samples"))
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    return fig


def save_scatter(samples: Tensor, path: str | os.PathLike, reference: Tensor | None = None, title: str = "",
                 log_density=None, reference_label: str = "data") -> Path:
    """Scatter plot of 2-D samples over the reference density, with a legend (:func:`scatter_figure`)."""
    plt = _pyplot()
    fig = scatter_figure(samples, reference, log_density, title, reference_label)
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
