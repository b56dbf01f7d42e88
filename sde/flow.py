"""Reverse-time dynamics of a forward SDE and a score function: the one home.

For a forward SDE ``dx = f(x, t) dt + g(t) dw`` with Gaussian kernel N(alpha(t) x0, sigma(t)^2 I)
and a score ``s(x, t) ~ grad log p_t(x)``:

- the reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6):
  ``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar``;
- the probability-flow ODE (Song et al. 2021, eq. 13): ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2``;
- Tweedie's denoiser (Efron 2011): ``E[x_0 | x_t] = (x_t + sigma(t)^2 s(x_t, t)) / alpha(t)``.

Samplers, ``encode`` / ``decode`` / ``log_likelihood`` and the predictors call these functions;
nothing else writes the formulas again.
"""

from __future__ import annotations

from torch import Tensor

from ._checks import bcast
from .sdes import SDE, ScoreFn

__all__ = ["tweedie", "reverse_drift", "pf_velocity"]


def tweedie(sde: SDE, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
    """Tweedie's formula (Efron 2011): E[x_0 | x_t = x] = (x + sigma(t)^2 score) / alpha(t).

    Args:
        sde: the forward SDE (gives alpha and sigma).
        x: the noisy state x_t, batch first.
        t: (B,) times.
        score: the score at (x, t), shaped like x.

    Returns:
        The x0 estimate, shaped like x.
    """
    return (x + bcast(sde.sigma(t) ** 2, x) * score) / bcast(sde.alpha(t), x)


def reverse_drift(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor, *, probability_flow: bool = False) -> Tensor:
    """Drift of the reverse-time SDE, f - g^2 score, or of the probability-flow ODE, f - g^2 score / 2.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``.
        x: the state, batch first.
        t: (B,) times.
        probability_flow: the ODE's drift (half the score term) instead of the SDE's.

    Returns:
        The drift, shaped like x (time runs forward: a reverse step of size dt > 0 moves by -drift dt).
    """
    coef = 0.5 if probability_flow else 1.0
    return sde.drift(x, t) - coef * bcast(sde.diffusion(t) ** 2, x) * score_fn(x, t)


def pf_velocity(sde: SDE, score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    """The probability-flow ODE velocity v(x, t) = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``.
        x: the state, batch first.
        t: (B,) times.

    Returns:
        dx/dt, shaped like x.
    """
    return reverse_drift(sde, score_fn, x, t, probability_flow=True)
