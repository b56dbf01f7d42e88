"""Predictors of the predictor-corrector sampler (Song et al. 2021, Alg. 2-3): one step of a
reverse-time solver from t to s < t, given the score already evaluated at (x, t).

Every predictor has the signature ``(rsde, x, t, s, score, generator) -> x_s`` with ``rsde``
the reverse-time SDE ``sde.reverse(score_fn)`` (it gives the drift and diffusion, built on
``sde.flow``), t, s Python floats and ``score`` = score_fn(x, t).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .._checks import bcast
from ..flow import tweedie
from ..sdes import ReverseSDE
from ._base import randn_like, times

Predictor = Callable[[ReverseSDE, Tensor, float, float, Tensor, "torch.Generator | None"], Tensor]


def euler_maruyama(rsde: ReverseSDE, x: Tensor, t: float, s: float, score: Tensor, generator=None) -> Tensor:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dw_bar (Song et al. 2021)."""
    dt = t - s
    tt = times(t, x)
    x_mean = x - rsde.drift(x, tt, score) * dt
    return x_mean + bcast(rsde.diffusion(tt), x) * math.sqrt(dt) * randn_like(x, generator)


def reverse_diffusion(rsde: ReverseSDE, x: Tensor, t: float, s: float, score: Tensor, generator=None) -> Tensor:
    """Reverse of the forward discretization x_{i+1} = x_i + f_i + G_i z (Song et al. 2021, eq. 46):
    x_s = x - (f_i - G_i^2 score) + G_i z, with (f_i, G_i) = sde.discretize(x, t, t - s)."""
    rev_f, G = rsde.discretize(x, times(t, x), t - s, score)
    return x - rev_f + bcast(G, x) * randn_like(x, generator)


ANCESTRAL_VARIANCES = ("beta", "posterior")  # the two variances of Ho et al. 2020, sec. 3.2


def ancestral(rsde: ReverseSDE, x: Tensor, t: float, s: float, score: Tensor, generator=None, *,
              variance: str = "beta") -> Tensor:
    """Ancestral sampling (Ho et al. 2020; Song & Ermon 2019): draw x_s around the mean of the Gaussian
    posterior q(x_s | x_t, x_0 = x0_hat) of the forward kernel, for any alpha/sigma.

    With a_ts = alpha_t/alpha_s and v_ts = sigma_t^2 - a_ts^2 sigma_s^2 (the transition variance):
    mean = a_ts sigma_s^2/sigma_t^2 x + alpha_s v_ts/sigma_t^2 x0_hat; the variance is v_ts ("beta", DDPM's
    sigma_t^2 = beta_t, the default: it measures better, see docs/fast-solvers.md) or the posterior's
    v_ts sigma_s^2/sigma_t^2 ("posterior", DDPM's beta-tilde; for VE exactly SMLD's ancestral step).
    """
    sde = rsde.sde
    tt, ss = times(t, x), times(s, x)
    a_t, a_s, sig_t, sig_s = sde.alpha(tt), sde.alpha(ss), sde.sigma(tt), sde.sigma(ss)
    a_ts = a_t / a_s
    v_ts = sig_t**2 - a_ts**2 * sig_s**2
    x0_hat = tweedie(sde, x, tt, score, alpha=bcast(a_t, x), sigma=bcast(sig_t, x))
    mean = bcast(a_ts * sig_s**2 / sig_t**2, x) * x + bcast(a_s * v_ts / sig_t**2, x) * x0_hat
    var = torch.clamp(v_ts, min=0.0)
    std = torch.sqrt(var if variance == "beta" else var * sig_s**2 / sig_t**2)
    return mean + bcast(std, x) * randn_like(x, generator)


PREDICTORS: dict[str, Predictor] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,  # variance="beta"
    "ancestral_posterior": partial(ancestral, variance="posterior"),
}
