"""Probability-flow ODE sampler (Song et al. 2021, eq. 13): dx/dt = f(x, t) - g(t)^2/2 score(x, t),
integrated from T to eps with torchdiffeq.odeint (Chen et al. 2018). The state stays on its
device and in its dtype (no numpy round trips, unlike score_sde's scipy solve_ivp)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS

from .._checks import bcast, check_choice, check_positive
from ..sdes import SDE, ScoreFn
from ._base import (
    Callback,
    CountedScore,
    SampleResult,
    check_common,
    check_finite,
    default_eps,
    denoise_step,
    emit,
    steps_iter,
    times,
)
from .grids import Grid, sampler_grid

ODE_METHODS = sorted(m for m in SOLVERS if m != "scipy_solver")  # scipy would leave the device
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def ode(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    method: str = "dopri5",  # any torchdiffeq method except scipy_solver
    rtol: float = 1e-5,  # relative tolerance of adaptive methods
    atol: float = 1e-5,  # absolute tolerance of adaptive methods
    steps: int | None = None,  # grid intervals: required by fixed-grid methods, optional output grid for adaptive ones
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "uniform",  # name in GRIDS (used when steps is given), or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    denoise_final: bool = False,  # one extra score call: Tweedie's E[x_0 | x_eps]
    options: dict | None = None,  # passed to torchdiffeq (e.g. {"first_step": ...})
) -> SampleResult:
    """Integrate the probability-flow ODE from T to eps (Song et al. 2021, Sec. 4.3).

    With ``steps`` the integration runs one grid interval at a time (one fixed-method step per
    interval); without it, one adaptive solve over [T, eps]. ``callback`` fires at each grid
    point and costs one extra (counted) score call there for x0_hat.

    Returns:
        SampleResult with nfe the exact number of score calls.

    Raises:
        ValueError: unknown method or grid, a fixed-grid method without ``steps``, steps < 1,
            eps outside (0, T), rtol/atol <= 0.
    """
    check_choice("method", method, ODE_METHODS)
    eps = check_common(sde, x_T, steps, eps)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if method in FIXED_GRID_METHODS and steps is None and isinstance(grid, str):
        raise ValueError(f"method={method!r} is a fixed-grid method: give steps (an int >= 1), got steps=None")
    if steps is None and isinstance(grid, str):  # one adaptive solve over [T, eps]
        ts = [float(sde.T), default_eps(sde) if eps is None else eps]
    else:
        ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=1)
        steps = len(ts) - 1
    eps = ts[-1]
    opts = dict(method=method, rtol=rtol, atol=atol, steps=steps, eps=eps, grid=grid, denoise_final=denoise_final)
    score = CountedScore(score_fn)
    batch = x_T.shape[0]

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(1).expand(batch).to(x)
        return sde.drift(x, tt) - 0.5 * bcast(sde.diffusion(tt) ** 2, x) * score(x, tt)

    x = x_T
    with torch.no_grad():
        for i in steps_iter(len(ts) - 1, progress, "ode"):
            if callback is not None:
                tt = times(ts[i], x)
                sc = score(x, tt)
                x0 = (x + bcast(sde.sigma(tt) ** 2, x) * sc) / bcast(sde.alpha(tt), x)
                emit(callback, i, tt, x, x0)
            span = torch.tensor(ts[i : i + 2], dtype=x.dtype, device=x.device)
            opts_i = dict(options or {})
            if method not in FIXED_GRID_METHODS:
                opts_i.setdefault("step_t", span)  # land exactly on eps: torchdiffeq otherwise steps past it
                # torchdiffeq's initial-step heuristic can probe far outside [eps, T] (t < 0)
                opts_i.setdefault("first_step", 1e-2 * (ts[i] - ts[i + 1]))
            x = odeint(velocity, x, span, method=method, rtol=rtol, atol=atol, options=opts_i)[-1]
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "ode", opts), score.calls, "ode", opts)
