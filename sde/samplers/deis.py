"""DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator", sec. 4,
the tAB-DEIS multistep variant) for any alpha/sigma: VP, sub-VP and VE alike.

The probability-flow ODE is exact in the scaled variable: with noise prediction eps_hat,
d(x/alpha) = eps_hat d(sigma/alpha); with data prediction x0_hat, d(x/sigma) = x0_hat d(alpha/sigma).
With rho = sigma/alpha (noise) or alpha/sigma (data) and scale = alpha or sigma, one step is
    x_{i+1} = scale_{i+1} (x_i / scale_i + sum_j C_ij m_{i-j}),
    C_ij = int_{t_i}^{t_{i+1}} L_j(tau) d rho(tau),
where L_j is the Lagrange basis through the last p times (tAB: polynomial in t, Zhang & Chen's
choice; basis="log_snr" gives the log-rho variant that diffusers ships). The integrals are done once
at the entry point by Gauss-Legendre quadrature in l = log(alpha/sigma) (rho = e^{-l} or e^{l}, smooth
in l), exact to float64 rounding for these integrands.
"""

from __future__ import annotations

import math

import numpy as np
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
    steps_iter,
    times,
)
from ._expint import (
    Coef,
    check_order,
    check_prediction,
    coef_at,
    model_output,
    schedule,
    step_order,
    t_of_l,
    transfer,
    x0_of,
)
from .grids import Grid, sampler_grid

BASES = ("t", "log_snr")  # the variable the Lagrange polynomial lives in: t (tAB) or log-SNR (log-rho AB)
WARMUPS = ("lower_order", "singlestep")  # first step: order 1, or DPM-Solver-2 with a midpoint (+1 score call)
_GL_NODES = 24  # Gauss-Legendre nodes per step: the integrands are analytic in l, 24 reach float64 rounding

__all__ = ["deis", "deis_coefficients"]


def _lagrange(u: np.ndarray, nodes: list[float], j: int) -> np.ndarray:
    out = np.ones_like(u)
    for k, v in enumerate(nodes):
        if k != j:
            out = out * (u - v) / (nodes[j] - v)
    return out


def deis_coefficients(sde: SDE, ts: list[float], i: int, p: int, prediction: str, basis: str) -> list[float]:
    """C_ij (j = 0..p-1, newest node first) of the step t_i -> t_{i+1} through t_i, ..., t_{i-p+1}.

    Args:
        sde: the forward SDE.
        ts: the decreasing time grid.
        i: the step index (p <= i + 1).
        p: the number of nodes (the step's order).
        prediction: "noise" (rho = sigma/alpha) or "data" (rho = alpha/sigma).
        basis: "t" (tAB-DEIS) or "log_snr".

    Returns:
        The p coefficients, float64 Python floats.
    """
    k = 1.0 if prediction == "noise" else -1.0
    l_i, l_j = coef_at(sde, ts[i])[2], coef_at(sde, ts[i + 1])[2]
    x, w = np.polynomial.legendre.leggauss(_GL_NODES)
    ls = 0.5 * (l_j - l_i) * x + 0.5 * (l_j + l_i)
    dens = -k * np.exp(-k * ls) * 0.5 * (l_j - l_i) * w  # d rho = -k e^{-k l} dl, mapped to [-1, 1]
    if basis == "t":
        u = sde.t_from_log_snr(torch.tensor(2.0 * ls, dtype=torch.float64)).numpy()
        nodes = [ts[i - j] for j in range(p)]
    else:
        u, nodes = ls, [coef_at(sde, ts[i - j])[2] for j in range(p)]
    return [float(np.sum(_lagrange(u, nodes, j) * dens)) for j in range(p)]


def _midpoint_step(sde: SDE, score, x: Tensor, m0: Tensor, c_i: Coef, c_j: Coef, prediction: str) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r = 1/2) from t_i to t_j: local error O(h^3), the warm start."""
    t_mid = t_of_l(sde, 0.5 * (c_i[2] + c_j[2]))
    c_m = coef_at(sde, t_mid)
    ratio, scale, hh = transfer(c_i, c_m, prediction)
    m1 = model_output(sde, score, ratio * x - scale * math.expm1(hh) * m0, t_mid, prediction)
    ratio, scale, hh = transfer(c_i, c_j, prediction)
    return ratio * x - scale * math.expm1(hh) * m1


def deis(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    steps: int | None = None,  # solver steps, 1 score call each (default 20)
    order: int = 3,  # 1-3: the number of past outputs the polynomial goes through (Zhang & Chen: 3)
    prediction: str = "noise",  # "noise" (DEIS as published, eps_hat) or "data" (x0_hat)
    basis: str = "t",  # "t" (tAB-DEIS) or "log_snr" (polynomial in log-SNR, as diffusers' DEIS)
    warmup: str = "singlestep",  # "singlestep" (first step DPM-Solver-2, +1 call) or "lower_order" (order 1, 2, ...)
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "log_snr",  # name in GRIDS or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    lower_order_final: bool = False,  # order <= steps left on the final steps
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """tAB-DEIS multistep sampler (Zhang & Chen 2022, sec. 4, eq. 14-15), orders 1-3.

    Args:
        score_fn: score_fn(x, t) -> Tensor shaped like x.
        sde: the forward SDE.
        x_T: the starting point at t = T, batch first.
        generator: unused (deterministic); accepted for the shared signature.
        callback: callback(info) after each step's score call, info = {"i", "t", "x", "x0_hat"}.
        progress: show a tqdm bar.
        steps: number of solver steps; default 20.
        order: polynomial order + 1 (1 is DDIM).
        prediction: "noise" or "data".
        basis: "t" or "log_snr".
        warmup: "lower_order", or "singlestep": the first step is DPM-Solver-2 (one extra score call), so
            that the first step's local error does not cap order 3 at 2.
        eps: end time of a named grid.
        grid: a name in GRIDS ("log_snr" default) or the decreasing times themselves.
        rho: exponent of the "edm" grid.
        lower_order_final: cap the order of step i at the steps left (the Tweedie final step counts as one).
        denoise_final: finish with Tweedie's formula at the end time (one extra score call).

    Returns:
        SampleResult with nfe = steps + (warmup == "singlestep" and order > 1 and steps > 1) + denoise_final.

    Raises:
        ValueError: bad order / prediction / basis / warmup / grid, steps < 1, eps outside (0, T).
    """
    eps = _check_deis(sde, x_T, steps, eps, order, prediction, basis, warmup)
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=20)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, order=order, prediction=prediction, basis=basis, warmup=warmup, eps=eps, grid=grid,
                   lower_order_final=lower_order_final, denoise_final=denoise_final)
    coef, score = schedule(sde, ts), CountedScore(score_fn)
    x, hist = x_T, []  # hist: past model outputs, newest first
    with torch.no_grad():
        for i in steps_iter(steps, progress, "deis"):
            x, hist = _deis_step(sde, score, x, hist, ts, coef, i, options, callback)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "deis", options), score.calls, "deis", options)


def _check_deis(sde: SDE, x_T: Tensor, steps: int | None, eps: float | None, order: int, prediction: str,
                basis: str, warmup: str) -> float | None:
    """Validate deis's arguments (in the entry point's order); returns eps as ``check_common`` does."""
    eps = check_common(sde, x_T, steps, eps)
    check_order(order)
    check_prediction(prediction)
    check_choice("basis", basis, BASES)
    check_choice("warmup", warmup, WARMUPS)
    return eps


def _deis_step(sde: SDE, score, x: Tensor, hist: list[Tensor], ts: list[float], coef: list[Coef], i: int,
               options: dict, callback: Callback | None) -> tuple[Tensor, list[Tensor]]:
    """Step i of deis (one score call, two for the singlestep warm-up): the new x and history (newest first)."""
    order, prediction, steps = options["order"], options["prediction"], options["steps"]
    m = model_output(sde, score, x, ts[i], prediction)
    hist = [m] + hist[: order - 1]
    emit(callback, i, times(ts[i], x), x, lambda x=x, m=m, c=coef[i]: x0_of(x, m, c, prediction))
    if i == 0 and options["warmup"] == "singlestep" and order > 1 and steps > 1:
        return _midpoint_step(sde, score, x, m, coef[0], coef[1], prediction), hist
    p = step_order(order, i, steps, len(hist), options["lower_order_final"], options["denoise_final"])
    cs = deis_coefficients(sde, ts, i, p, prediction, options["basis"])
    scale_i, scale_j = (coef[i][0], coef[i + 1][0]) if prediction == "noise" else (coef[i][1], coef[i + 1][1])
    return scale_j * (x / scale_i + sum(c * mj for c, mj in zip(cs, hist))), hist
