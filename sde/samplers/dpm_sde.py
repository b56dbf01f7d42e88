"""Stochastic DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095, sec. 5 and App. B): SDE-DPM-Solver++ 2M
and 3M with eta-controlled noise, and DPM-Solver++(2S) ancestral; any alpha/sigma (VP, sub-VP, VE).

In half-log-SNR l = log(alpha/sigma), with h = l_j - l_i and H = (1 + eta) h, a step from t_i to t_j
integrates the reverse SDE whose noise is eta times the probability-flow ODE's "missing" part exactly for
the data prediction held polynomial:
    x_j = (sigma_j/sigma_i) e^{-eta h} x_i + alpha_j [(1 - e^{-H}) m_0 + phi_2(H) D_1 - phi_3(H) D_2]
          + sigma_j sqrt(1 - e^{-2 eta h}) z,
phi_2(H) = (e^{-H} - 1 + H)/H, phi_3(H) = phi_2(H)/H - 1/2, D_1 ~ h m', D_2 ~ h^2 m'' from past outputs
(the 2M "midpoint" form uses (1 - e^{-H})/2 D_1 instead). eta = 0 is DPM-Solver++ 2M / 3M (the
multistep data-prediction solver of dpm_solver.py, same update, same coefficients); eta = 1 is the
SDE-DPM-Solver++ of the paper (and of diffusers' algorithm_type="sde-dpmsolver++").

DPM-Solver++(2S) ancestral (as k-diffusion's sample_dpmpp_2s_ancestral): in the scaled variable
x/alpha with noise level s = sigma/alpha, split the step s_i -> s_j into a deterministic
DPM-Solver++(2S) step to s_down and fresh noise of std s_up, s_up = min(s_j, eta s_j sqrt(1 - s_j^2/s_i^2)),
s_down = sqrt(s_j^2 - s_up^2): for eta = 1 this is DDPM's posterior variance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_choice
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
from ._expint import Coef, NoiseSampler, check_order, coef_at, model_output, schedule, step_order, t_of_l
from .grids import Grid, sampler_grid

SOLVER_TYPES = ("midpoint", "heun")  # 2M's first-derivative coefficient: (1 - e^{-H})/2 or phi_2(H)

__all__ = ["dpm_solver_sde", "dpm_2s_ancestral"]


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def _noise(noise_sampler: NoiseSampler | None, i: int, x: Tensor, generator) -> Tensor:
    if noise_sampler is None:
        return randn_like(x, generator)
    z = noise_sampler(i, x)
    if not isinstance(z, Tensor) or z.shape != x.shape:
        raise ValueError(f"noise_sampler must return a tensor shaped like x {tuple(x.shape)}, got "
                         f"{getattr(z, 'shape', type(z).__name__)}")
    return z


def _sde_step(x: Tensor, hist: list[tuple[Tensor, float]], c_i: Coef, c_j: Coef, p: int, eta: float,
              solver_type: str) -> Tensor:
    """The deterministic part of one SDE-DPM-Solver++ step of order p (hist newest last)."""
    (_, s_i, l_i), (a_j, s_j, l_j) = c_i, c_j
    h = l_j - l_i
    ratio, kh = s_j / s_i * math.exp(-eta * h), -(1.0 + eta) * h  # kh = -H
    phi1 = math.expm1(kh)
    phi2 = phi1 / kh - 1.0
    phi3 = phi2 / kh - 0.5
    m0 = hist[-1][0]
    if p == 1:
        return ratio * x - a_j * phi1 * m0
    (m1, l1), r0 = hist[-2], (l_i - hist[-2][1]) / h
    if p == 2:
        if solver_type == "midpoint":
            return ratio * x - a_j * phi1 * (m0 + 0.5 * (m0 - m1) / r0)
        return ratio * x - a_j * (phi1 * m0 + phi2 * (m0 - m1) / r0)
    m2, l2 = hist[-3]
    r1 = (l1 - l2) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m'' (k-diffusion's 3M SDE uses half this term)
    return ratio * x - a_j * (phi1 * m0 + phi2 * d1 + phi3 * d2)


def dpm_solver_sde(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    steps: int | None = None,  # solver steps, 1 score call each (default 20)
    order: int = 2,  # 2 (2M) or 3 (3M); 1 is DDIM with eta-scaled noise
    eta: float = 1.0,  # noise scale: 0 = DPM-Solver++ (ODE), 1 = SDE-DPM-Solver++ (the reverse SDE)
    solver_type: str = "midpoint",  # 2M only: "midpoint" (= the ODE 2M at eta 0) or "heun" (exact phi_2)
    noise_sampler: NoiseSampler | None = None,  # (step, x) -> N(0, I) noise; default: randn from generator
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "log_snr",  # name in GRIDS or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    lower_order_final: bool = False,  # as dpm_solver: lower the order of the final steps when steps < 10
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """SDE-DPM-Solver++ 2M / 3M (Lu et al. 2022b, Alg. 2 with eta; eta = 0: DPM-Solver++ 2M / 3M).

    Args:
        score_fn: score_fn(x, t) -> Tensor shaped like x.
        sde: the forward SDE.
        x_T: the starting point at t = T, batch first.
        generator: source of the noise (unless noise_sampler is given).
        callback: callback(info) after each step's score call, info = {"i", "t", "x", "x0_hat"}.
        progress: show a tqdm bar.
        steps: number of solver steps; default 20.
        order: 1, 2 or 3; the first steps use the history available (warm-up).
        eta: noise scale >= 0.
        solver_type: "midpoint" or "heun" (2M only).
        noise_sampler: noise_sampler(i, x) -> standard normal noise for step i (e.g. a Brownian tree, or the
            same noise as a reference run); None draws it from ``generator``.
        eps: end time of a named grid.
        grid: a name in GRIDS ("log_snr" default) or the decreasing times themselves.
        rho: exponent of the "edm" grid.
        lower_order_final: with steps < 10, cap the order of step i at steps - i (dpm_solver's rule).
        denoise_final: finish with Tweedie's formula at the end time (one extra score call).

    Returns:
        SampleResult with nfe = steps + denoise_final.

    Raises:
        ValueError: bad order / eta / solver_type / grid, steps < 1, eps outside (0, T), a noise_sampler
            returning the wrong shape.
    """
    eps, eta = _check_sde_solver(sde, x_T, steps, eps, order, eta, solver_type)
    ts, coef, score = _setup(score_fn, sde, steps, eps, grid, rho, default_steps=20)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, order=order, eta=eta, solver_type=solver_type, eps=eps, grid=grid,
                   lower_order_final=lower_order_final, denoise_final=denoise_final)
    x, hist = x_T, []  # hist: past (model output, l), newest last
    with torch.no_grad():
        for i in steps_iter(steps, progress, "dpm_solver_sde"):
            x, hist = _sde_solver_step(sde, score, x, hist, ts, coef, i, options, noise_sampler, generator, callback)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "dpm_solver_sde", options), score.calls, "dpm_solver_sde", options)


def _check_sde_solver(sde: SDE, x_T: Tensor, steps: int | None, eps: float | None, order: int, eta: float,
                      solver_type: str) -> tuple[float | None, float]:
    """Validate dpm_solver_sde's arguments (in the entry point's order); returns (eps, eta as a float)."""
    eps = check_common(sde, x_T, steps, eps)
    check_order(order)
    eta = _check_eta(eta)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    return eps, eta


def _setup(score_fn: ScoreFn, sde: SDE, steps: int | None, eps: float | None, grid: Grid, rho: float,
           default_steps: int) -> tuple[list[float], list[Coef], CountedScore]:
    """The time grid, its (alpha, sigma, l) schedule and the counted score, built in the entry points' order."""
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=default_steps)
    return ts, schedule(sde, ts), CountedScore(score_fn)


def _sde_solver_step(sde: SDE, score, x: Tensor, hist: list[tuple[Tensor, float]], ts: list[float],
                     coef: list[Coef], i: int, options: dict, noise_sampler: NoiseSampler | None, generator,
                     callback: Callback | None) -> tuple[Tensor, list[tuple[Tensor, float]]]:
    """Step i of dpm_solver_sde (one score call, then the step's noise when eta > 0): the new (x, hist)."""
    eta, steps = options["eta"], options["steps"]
    m = model_output(sde, score, x, ts[i], "data")
    emit(callback, i, times(ts[i], x), x, m)
    hist = (hist + [(m, coef[i][2])])[-3:]
    p = step_order(options["order"], i, steps, len(hist), options["lower_order_final"] and steps < 10, False)
    x = _sde_step(x, hist, coef[i], coef[i + 1], p, eta, options["solver_type"])
    if eta > 0:
        std = coef[i + 1][1] * math.sqrt(-math.expm1(-2.0 * eta * (coef[i + 1][2] - coef[i][2])))
        x = x + std * _noise(noise_sampler, i, x, generator)
    return x, hist


def _ancestral_split(s_i: float, s_j: float, eta: float) -> tuple[float, float]:
    """(s_down, s_up) of an ancestral step between scaled noise levels s_i > s_j."""
    s_up = min(s_j, eta * s_j * math.sqrt(max(1.0 - (s_j / s_i) ** 2, 0.0)))
    return math.sqrt(max(s_j**2 - s_up**2, 0.0)), s_up


def _2s_step(sde: SDE, score, x: Tensor, m0: Tensor, c_i: Coef, l_down: float) -> tuple[Tensor, Coef]:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) from t_i to the time of half-log-SNR l_down."""
    l_mid = 0.5 * (c_i[2] + l_down)
    t_mid, t_down = t_of_l(sde, l_mid), t_of_l(sde, l_down)
    c_m, c_d = coef_at(sde, t_mid), coef_at(sde, t_down)
    u = (c_m[1] / c_i[1]) * x - c_m[0] * math.expm1(-(l_mid - c_i[2])) * m0
    m1 = model_output(sde, score, u, t_mid, "data")
    return (c_d[1] / c_i[1]) * x - c_d[0] * math.expm1(-(l_down - c_i[2])) * m1, c_d


def dpm_2s_ancestral(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    steps: int | None = None,  # ancestral steps, 2 score calls each (default 10)
    eta: float = 1.0,  # ancestral noise scale in [0, 1]: 0 = DPM-Solver++(2S) (ODE), 1 = DDPM posterior noise
    noise_sampler: NoiseSampler | None = None,  # (step, x) -> N(0, I) noise; default: randn from generator
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "log_snr",  # name in GRIDS or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """DPM-Solver++(2S) ancestral sampler (Lu et al. 2022b, Alg. 1 with ancestral noise, as k-diffusion).

    Args:
        score_fn: score_fn(x, t) -> Tensor shaped like x.
        sde: the forward SDE.
        x_T: the starting point at t = T, batch first.
        generator: source of the noise (unless noise_sampler is given).
        callback: callback(info) after each step's first score call, info = {"i", "t", "x", "x0_hat"}.
        progress: show a tqdm bar.
        steps: number of ancestral steps (two score calls each); default 10.
        eta: ancestral noise scale in [0, 1].
        noise_sampler: noise_sampler(i, x) -> standard normal noise for step i; None draws from ``generator``.
        eps: end time of a named grid.
        grid: a name in GRIDS ("log_snr" default) or the decreasing times themselves.
        rho: exponent of the "edm" grid.
        denoise_final: finish with Tweedie's formula at the end time (one extra score call).

    Returns:
        SampleResult with nfe = 2 steps + denoise_final.

    Raises:
        ValueError: eta outside [0, 1], unknown grid, steps < 1, eps outside (0, T).
    """
    eps, eta = _check_2s_ancestral(sde, x_T, steps, eps, eta)
    ts, coef, score = _setup(score_fn, sde, steps, eps, grid, rho, default_steps=10)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, eta=eta, eps=eps, grid=grid, denoise_final=denoise_final)
    x = x_T
    with torch.no_grad():
        for i in steps_iter(steps, progress, "dpm_2s_ancestral"):
            x = _2s_ancestral_step(sde, score, x, ts, coef, i, eta, noise_sampler, generator, callback)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "dpm_2s_ancestral", options), score.calls, "dpm_2s_ancestral", options)


def _check_2s_ancestral(sde: SDE, x_T: Tensor, steps: int | None, eps: float | None,
                        eta: float) -> tuple[float | None, float]:
    """Validate dpm_2s_ancestral's arguments; returns (eps, eta as a float in [0, 1])."""
    eps = check_common(sde, x_T, steps, eps)
    eta = _check_eta(eta)
    if eta > 1:
        raise ValueError(f"eta must lie in [0, 1] for dpm_2s_ancestral, got {eta!r}")
    return eps, eta


def _2s_ancestral_step(sde: SDE, score, x: Tensor, ts: list[float], coef: list[Coef], i: int, eta: float,
                       noise_sampler: NoiseSampler | None, generator, callback: Callback | None) -> Tensor:
    """Step i of dpm_2s_ancestral (two score calls unless all of it is noise, then its noise)."""
    c_i, c_j = coef[i], coef[i + 1]
    m0 = model_output(sde, score, x, ts[i], "data")
    emit(callback, i, times(ts[i], x), x, m0)
    s_down, s_up = _ancestral_split(c_i[1] / c_i[0], c_j[1] / c_j[0], eta)
    if s_down > 0:
        x, c_d = _2s_step(sde, score, x, m0, c_i, -math.log(s_down))
        x = (c_j[0] / c_d[0]) * x  # to the target's scale alpha_j (x/alpha is the solved variable)
    else:  # all of the step is noise: the scaled variable lands on the denoiser's output
        x = c_j[0] * m0
    if s_up > 0:
        x = x + (c_j[0] * s_up) * _noise(noise_sampler, i, x, generator)
    return x
