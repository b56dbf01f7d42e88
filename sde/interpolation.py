"""Latent interpolation through the probability-flow ODE (Song et al. 2021, sec. 4.3, fig. 3).

Encode both end points to latents z = x(T), blend the latents, decode every blend. The prior is
an isotropic Gaussian, whose mass concentrates on a thin shell; spherical interpolation (slerp,
Shoemake 1985; White 2016 "Sampling generative networks") keeps the blends on that shell,
while linear blends shrink toward the origin and decode to atypical, over-smooth samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_choice, check_int, check_tensor
from .likelihood import decode, encode
from .sdes import SDE, ScoreFn

__all__ = ["slerp", "lerp", "interpolate", "INTERPOLATIONS"]


def lerp(z0: Tensor, z1: Tensor, w: Tensor) -> Tensor:
    """Linear blend (1 - w) z0 + w z1 for each weight w (N,); returns (N, *z0.shape)."""
    w = w.to(z0)[:, None, None]
    return ((1 - w) * z0.flatten(1)[None] + w * z1.flatten(1)[None]).reshape(w.shape[0], *z0.shape)


def slerp(z0: Tensor, z1: Tensor, w: Tensor) -> Tensor:
    """Spherical blend of each pair (z0[b], z1[b]) along the great circle, weights w (N,).

    ``slerp = sin((1 - w) omega) / sin(omega) z0 + sin(w omega) / sin(omega) z1`` with omega the
    angle between the flattened vectors; norms are blended linearly so that end points are hit
    exactly. Falls back to lerp for (nearly) parallel pairs, where sin(omega) -> 0.

    Returns:
        (N, *z0.shape).
    """
    a, b = z0.flatten(1), z1.flatten(1)  # (B, D)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    cos = ((a / na) * (b / nb)).sum(1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)[None]  # (1, B, 1)
    w = w.to(z0)[:, None, None]  # (N, 1, 1)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    c0 = torch.where(parallel, 1 - w, torch.sin((1 - w) * omega) / safe)
    c1 = torch.where(parallel, w, torch.sin(w * omega) / safe)
    direction = c0 * (a / na)[None] + c1 * (b / nb)[None]
    direction = direction / direction.norm(dim=2, keepdim=True)
    norm = (1 - w) * na[None] + w * nb[None]
    return (direction * norm).reshape(w.shape[0], *z0.shape)


INTERPOLATIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {"slerp": slerp, "linear": lerp}


def interpolate(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    x1: Tensor,
    n: int,
    *,
    kind: str = "slerp",  # "slerp" (stays on the prior's shell) or "linear"
    **ode,
) -> Tensor:
    """Interpolate between data x0 and x1 in the PF-ODE latent space (Song et al. 2021, sec. 4.3).

    Args:
        score_fn, sde: the model.
        x0, x1: (B, ...) end points, same shape; pairs are interpolated row by row.
        n: number of points, end points included (weights linspace(0, 1, n)).
        kind: a key of INTERPOLATIONS.
        ode: options of :func:`encode` / :func:`decode` (method, rtol, atol, eps, batch_size, ...).

    Returns:
        (n, B, ...) decoded points; the first and last reproduce x0 and x1 up to solver error.

    Raises:
        ValueError: shapes differ, n < 2, or unknown kind.
    """
    check_tensor("x0", x0, 2)
    check_tensor("x1", x1, 2)
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    check_int("n", n, 2)
    blend = INTERPOLATIONS[check_choice("kind", kind, INTERPOLATIONS)]
    z = encode(score_fn, sde, torch.cat([x0, x1]), **ode)
    z0, z1 = z[: x0.shape[0]], z[x0.shape[0] :]
    w = torch.linspace(0.0, 1.0, n, dtype=x0.dtype, device=x0.device)
    zs = blend(z0, z1, w)  # (n, B, ...)
    x = decode(score_fn, sde, zs.reshape(n * x0.shape[0], *x0.shape[1:]), **ode)
    return x.reshape(n, *x0.shape)
