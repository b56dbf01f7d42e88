"""Heun's 2nd-order sampler of Karras et al. 2022 (EDM), Alg. 2, for VP, sub-VP and VE.

It runs in the scaled variable y = x / alpha(t), whose probability-flow ODE is
dy/dsigma = (y - D(y; sigma)) / sigma with sigma = sigma(t)/alpha(t) (EDM's noise level) and
D the Tweedie denoiser; for VE alpha = 1 and this is EDM exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import bcast
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
    t_of_sigma_karras,
    times,
)
from .grids import Grid, sampler_grid


def _check_nonneg(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_churn(S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> None:
    for name, v in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_noise", S_noise)):
        _check_nonneg(name, v)
    if not S_tmax >= S_tmin:
        raise ValueError(f"S_tmax must be >= S_tmin, got S_tmin={S_tmin}, S_tmax={S_tmax}")


def heun(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    steps: int | None = None,  # Heun steps, 2 score calls each; default 18 (EDM: 18 steps, 35 NFE on CIFAR-10)
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "edm",  # name in GRIDS, or the decreasing times themselves (then steps/eps follow from it)
    rho: float = 7.0,  # exponent of the "edm" grid
    S_churn: float = 0.0,  # total stochasticity; gamma_i = min(S_churn / steps, sqrt(2) - 1)
    S_tmin: float = 0.0,  # churn only for sigma (= sigma/alpha) in [S_tmin, S_tmax]
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,  # std multiplier of the added churn noise
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps] (EDM's Euler step to sigma 0)
) -> SampleResult:
    """EDM Heun sampler (Karras et al. 2022, Alg. 2), deterministic when S_churn = 0.

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``);
            ``generator`` draws the churn noise.
        callback: called at each step with {"i", "t", "x", "x0_hat"} at the (churned) time t_hat.
        steps: number of Heun steps (2 score calls each); default 18.
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        grid: the time grid, a name in ``GRIDS`` ("edm" is Karras et al.'s rho schedule, "uniform",
            "log_snr") or the decreasing times themselves (then steps and eps follow from it).
        rho: exponent of the "edm" grid (7 in Karras et al. 2022).
        S_churn: total stochasticity: each step raises the noise level by gamma_i = min(S_churn / steps,
            sqrt(2) - 1) before its Heun step (0: the deterministic sampler).
        S_tmin: churn only where the EDM noise level sigma/alpha lies in [S_tmin, S_tmax].
        S_tmax: upper end of that range.
        S_noise: std multiplier of the added churn noise (slightly above 1 offsets the denoiser's
            loss of detail, Karras et al. 2022, sec. 4).
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps] (EDM's final
            Euler step to sigma = 0).

    Returns:
        SampleResult with nfe = 2 steps + denoise_final.

    Raises:
        ValueError: steps < 1, eps outside (0, T), unknown grid, negative churn parameters.
    """
    eps = check_common(sde, x_T, steps, eps)
    _check_churn(S_churn, S_tmin, S_tmax, S_noise)
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=18)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, eps=eps, grid=grid, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise,
                   denoise_final=denoise_final)
    score = CountedScore(score_fn)
    churn = _Churn(min(S_churn / steps, math.sqrt(2.0) - 1.0), S_tmin, S_tmax, S_noise, generator)
    with torch.no_grad():
        x = _heun_loop(sde, score, x_T, ts, churn, callback, progress)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "heun", options), score.calls, "heun", options)


@dataclass(frozen=True)
class _Churn:
    """EDM's stochastic churn settings (Karras et al. 2022, Alg. 2)."""

    gamma_max: float  # min(S_churn / steps, sqrt(2) - 1)
    S_tmin: float
    S_tmax: float
    S_noise: float
    generator: torch.Generator | None

    def apply(self, sde: SDE, y: Tensor, t: float, s_cur: float, s_max: float) -> tuple[Tensor, float, float]:
        """Raise the noise level of y from s_cur (at time t) to s_hat, clamped to sigma(T): (y, t_hat, s_hat)."""
        gamma = self.gamma_max if self.S_tmin <= s_cur <= self.S_tmax else 0.0
        if gamma <= 0:
            return y, t, s_cur
        s_hat = min(s_cur * (1.0 + gamma), s_max)
        y = y + math.sqrt(max(s_hat**2 - s_cur**2, 0.0)) * self.S_noise * randn_like(y, self.generator)
        return y, t_of_sigma_karras(sde, s_hat, y), s_hat


def _denoise_scaled(sde: SDE, score: ScoreFn, y: Tensor, t: float) -> Tensor:
    """EDM's denoiser D(y; sigma) of the scaled variable y = x / alpha: Tweedie's estimate at x = alpha y."""
    tt = times(t, y)
    x = bcast(sde.alpha(tt), y) * y
    return tweedie(sde, x, tt, score(x, tt))


def _heun_loop(sde: SDE, score: ScoreFn, x_T: Tensor, ts: list[float], churn: _Churn, callback: Callback | None,
               progress: bool) -> Tensor:
    """The Heun steps in the scaled variable y = x / alpha, dy/dsigma = (y - D(y; sigma)) / sigma."""
    sk = torch.exp(-0.5 * sde.log_snr(torch.tensor(ts, dtype=torch.float64))).tolist()  # sigma/alpha on the grid
    y = x_T / bcast(sde.alpha(times(ts[0], x_T)), x_T)
    for i in steps_iter(len(ts) - 1, progress, "heun"):
        s_next = sk[i + 1]
        y, t_hat, s_cur = churn.apply(sde, y, ts[i], sk[i], sk[0])
        d0 = _denoise_scaled(sde, score, y, t_hat)
        emit(callback, i, times(t_hat, y), y * bcast(sde.alpha(times(t_hat, y)), y), d0)
        slope = (y - d0) / s_cur
        y_euler = y + (s_next - s_cur) * slope
        slope_next = (y_euler - _denoise_scaled(sde, score, y_euler, ts[i + 1])) / s_next
        y = y + (s_next - s_cur) * 0.5 * (slope + slope_next)
    return y * bcast(sde.alpha(times(ts[-1], y)), y)
