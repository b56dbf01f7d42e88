"""Correctors of the predictor-corrector sampler: MCMC steps that leave p_t invariant.

Every corrector has the signature
``(sde, score_fn, x, t, t_end, generator, **options) -> x`` (t, t_end Python floats) and
calls score_fn exactly ``n_steps`` times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import bcast
from ..sdes import SDE, ScoreFn
from ._base import randn_like, times

Corrector = Callable[..., Tensor]


def _per_sample_norm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1)


def langevin(
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: float,
    t_end: float,
    generator=None,
    *,
    snr: float = 0.16,
    n_steps: int = 1,
) -> Tensor:
    """Langevin corrector with the signal-to-noise step-size rule (Song et al. 2021, Alg. 4):
    step = 2 a (snr ||z|| / ||score||)^2,  x <- x + step score + sqrt(2 step) z.

    ``a`` is derived from the SDE for every kind: a = (alpha(t) / alpha(t - T/N))^2, which is
    DDPM's 1 - beta_i for VP (to first order), 1 for VE, and well defined for sub-VP.
    As in the reference, the norms are per-sample norms averaged over the batch: a single
    sample's ratio is far too noisy in low dimension (the score vanishes at a mode).

    Args:
        sde: the forward SDE.
        score_fn: score_fn(x, t); called ``n_steps`` times.
        x: the state at time t.
        t: the current time.
        t_end: the sampler's end time (unused here; part of the corrector signature).
        generator: draws the Langevin noise.
        snr: the signal-to-noise ratio ||step score|| / ||noise|| that sets the step size.
        n_steps: Langevin steps.

    Returns:
        x after the corrector steps.
    """
    tt = times(t, x)
    t_prev = times(max(t - sde.T / sde.N, 0.0), x)
    a = bcast((sde.alpha(tt) / sde.alpha(t_prev)) ** 2, x)
    for _ in range(n_steps):
        score = score_fn(x, tt)
        z = randn_like(x, generator)
        ratio = _per_sample_norm(z).mean() / _per_sample_norm(score).mean().clamp_min(torch.finfo(x.dtype).tiny)
        step = 2.0 * a * (snr * ratio) ** 2
        x = x + step * score + torch.sqrt(2.0 * step) * z
    return x


def annealed_langevin(
    sde: SDE,
    score_fn: ScoreFn,
    x: Tensor,
    t: float,
    t_end: float,
    generator=None,
    *,
    step_lr: float = 2e-5,
    n_steps: int = 1,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) at noise level sigma(t):
    step = step_lr sigma(t)^2 / sigma(t_end)^2,  x <- x + step/2 score + sqrt(step) z.

    Args:
        sde: the forward SDE.
        score_fn: score_fn(x, t); called ``n_steps`` times.
        x: the state at time t.
        t: the current time.
        t_end: the sampler's end time: the step size is relative to sigma(t_end).
        generator: draws the Langevin noise.
        step_lr: the base step size at the end time (Song & Ermon 2019 use 2e-5).
        n_steps: Langevin steps.

    Returns:
        x after the corrector steps.
    """
    tt = times(t, x)
    sig_end = sde.sigma(times(t_end, x))
    step = bcast(step_lr * (sde.sigma(tt) / sig_end) ** 2, x)
    for _ in range(n_steps):
        x = x + 0.5 * step * score_fn(x, tt) + torch.sqrt(step) * randn_like(x, generator)
    return x


def none(sde: SDE, score_fn: ScoreFn, x: Tensor, t: float, t_end: float, generator=None, **_: object) -> Tensor:
    """No corrector: the predictor alone."""
    return x


CORRECTORS: dict[str, Corrector] = {"none": none, "langevin": langevin, "annealed_langevin": annealed_langevin}
