"""DDIM (Song, Meng & Ermon 2021, eq. 12) for any alpha/sigma: VP, sub-VP and VE alike.

From t to s: x0 = Tweedie estimate, e = -sigma_t score (the noise estimate),
c = eta sigma_s sqrt(1 - exp(lambda_t - lambda_s)) (the posterior std times eta),
x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) e + c z.
eta = 0 is the deterministic DDIM (first-order solver of the probability-flow ODE);
eta = 1 is ancestral sampling.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..flow import tweedie
from ..sdes import SDE, ScoreFn
from ._base import (
    Callback,
    CountedScore,
    SampleResult,
    check_common,
    check_finite,
    denoise_step,
    emit,
    randn_like,
    steps_iter,
    times,
)
from .defaults import DDIM_GRID, per_sde
from .grids import Grid, sampler_grid


def ddim(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    steps: int | None = None,  # number of steps (= score calls before the final denoise); default 50
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    eta: float = 0.0,  # 0: deterministic DDIM, 1: ancestral; in [0, 1]
    grid: Grid | None = None,  # name in GRIDS or the times themselves; None: per SDE (defaults.DDIM_GRID)
    rho: float = 7.0,  # exponent of the "edm" grid
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """DDIM sampler (Song, Meng & Ermon 2021, eq. 12), generalised to any Gaussian-kernel SDE.

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``);
            ``generator`` draws the noise when eta > 0.
        callback: called at each step with {"i", "t", "x", "x0_hat"} at t_i.
        steps: number of steps (grid intervals, one score call each); default 50.
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        eta: the noise of each step as a fraction of the posterior std: 0 is the deterministic DDIM
            (a first-order solver of the probability-flow ODE), 1 is ancestral sampling.
        grid: the time grid, a name in ``GRIDS`` ("uniform", "log_snr", "edm") or the decreasing
            times themselves (then steps and eps follow from it).
        rho: exponent of the "edm" grid.
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].

    Returns:
        SampleResult with nfe = steps + denoise_final.

    Raises:
        ValueError: steps < 1, eps outside (0, T), eta outside [0, 1], unknown grid.
    """
    eps = check_common(sde, x_T, steps, eps)
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    grid = per_sde(DDIM_GRID, sde, "log_snr") if grid is None else grid
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=50)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, eps=eps, eta=eta, grid=grid, denoise_final=denoise_final)
    score = CountedScore(score_fn)
    al, sg, ls = _schedule(sde, ts, eta > 0)
    x = x_T
    with torch.no_grad():
        for i in steps_iter(steps, progress, "ddim"):
            tt = times(ts[i], x)
            sc = score(x, tt)
            noise = -sg[i] * sc
            x0 = tweedie(sde, x, tt, sc, alpha=al[i], sigma=sg[i])
            emit(callback, i, tt, x, x0)
            x = al[i + 1] * x0
            if eta > 0:
                c = eta * sg[i + 1] * math.sqrt(-math.expm1(ls[i] - ls[i + 1]))
                x = x + math.sqrt(max(sg[i + 1] ** 2 - c**2, 0.0)) * noise + c * randn_like(x, generator)
            else:
                x = x + sg[i + 1] * noise
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "ddim", options), score.calls, "ddim", options)


def _schedule(sde: SDE, ts: list[float], with_log_snr: bool) -> tuple[list[float], list[float], list[float]]:
    """alpha, sigma (and log-SNR, for eta > 0) at every grid time, once, in float64 Python floats: the
    steps then do no schedule arithmetic on tensors."""
    tt = torch.tensor(ts, dtype=torch.float64)
    log_snr = sde.log_snr(tt).tolist() if with_log_snr else []
    return sde.alpha(tt).tolist(), sde.sigma(tt).tolist(), log_snr
