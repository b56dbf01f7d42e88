"""Probability-flow ODE sampler (Song et al. 2021, eq. 13): dx/dt = f(x, t) - g(t)^2/2 score(x, t),
integrated from T to eps with torchdiffeq.odeint (Chen et al. 2018) through ``sde.flow.integrate_ode``,
the helper ``encode``, ``decode`` and ``log_likelihood`` use too (same methods, same checks, same
end-point rule). The state stays on its device and in its dtype (no numpy round trips, unlike
score_sde's scipy solve_ivp)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..flow import FIXED_GRID_METHODS, ODE_METHODS, check_ode, integrate_ode, ode_times, pf_velocity, tweedie
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
    times,
)
from .grids import Grid

FIRST_STEP = 1e-2  # adaptive methods' first step, as a fraction of each interval (skips torchdiffeq's heuristic)

__all__ = ["ode", "ODE_METHODS", "FIXED_GRID_METHODS"]


def ode(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    method: str = "dopri5",  # a name in sde.flow.ODE_METHODS
    rtol: float = 1e-5, atol: float = 1e-5,  # relative / absolute tolerance of adaptive methods
    steps: int | None = None,  # grid intervals: required by fixed-grid methods, optional output grid for adaptive ones
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "uniform",  # name in GRIDS (used when steps is given), or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    denoise_final: bool = False,  # one extra score call: Tweedie's E[x_0 | x_eps]
    options: dict | None = None,  # passed to torchdiffeq (e.g. {"first_step": ...})
) -> SampleResult:
    """Integrate the probability-flow ODE from T to eps (Song et al. 2021, Sec. 4.3) with torchdiffeq.

    With ``steps`` the integration runs one grid interval at a time (one fixed-method step per
    interval); without it, one adaptive solve over [T, eps]. Solver settings are checked and run by
    ``sde.flow`` exactly as ``encode`` / ``decode`` / ``log_likelihood`` do.

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (``sample``); no noise is drawn.
        callback: called at each grid point before its interval with {"i", "t", "x", "x0_hat"}; costs
            one extra score call there for x0_hat, counted in ``callback_nfe``, not in ``nfe``.
        method: the torchdiffeq method, a name in ``sde.flow.ODE_METHODS``: adaptive ("dopri5", "dopri8",
            "bosh3", "fehlberg2", "adaptive_heun") or fixed-grid ("euler", "midpoint", "heun2", "heun3",
            "rk4", "explicit_adams", "implicit_adams", "fixed_adams").
        rtol: relative tolerance of adaptive methods (and of implicit_adams' corrector).
        atol: absolute tolerance of adaptive methods.
        steps: number of grid intervals; required by fixed-grid methods (one step each), an optional
            output grid for adaptive ones (one adaptive solve per interval).
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        grid: the time grid used with ``steps``, a name in ``GRIDS`` ("uniform", "log_snr", "edm") or
            the decreasing times themselves (then steps and eps follow from it).
        rho: exponent of the "edm" grid.
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].
        options: torchdiffeq solver options of the method's kind (adaptive: first_step, step_t,
            max_num_steps, norm, ...; fixed: step_size, interp, ...); adaptive methods default to
            ``first_step`` = 1% of each interval.

    Returns:
        SampleResult with nfe the exact number of the solver's score calls (+1 with denoise_final)
        and callback_nfe the callback's extra calls (one per grid point it was called at).

    Raises:
        ValueError: unknown method or grid, a fixed-grid method without ``steps``, steps < 1,
            eps outside (0, T), rtol/atol <= 0, an option the method does not take.
        TypeError: options is not a dict.
    """
    options = check_ode(method, rtol, atol, options)
    eps = check_common(sde, x_T, steps, eps)
    named = isinstance(grid, str)
    ts = ode_times(sde, method, steps, default_eps(sde) if eps is None and named else eps, grid, rho=rho)
    opts = dict(method=method, rtol=rtol, atol=atol, steps=None if steps is None and named else len(ts) - 1,
                eps=ts[-1], grid=grid, denoise_final=denoise_final)
    score, extra = CountedScore(score_fn), CountedScore(score_fn)  # the solver's calls; the callback's x0_hat calls
    with torch.no_grad():
        x = _solve(sde, score, extra, x_T, ts, opts, options, callback, progress)
        if denoise_final:
            x = denoise_step(sde, score, x, ts[-1])
    return SampleResult(check_finite(x, "ode", opts), score.calls, "ode", opts, callback_nfe=extra.calls)


def _solve(sde: SDE, score: ScoreFn, extra: ScoreFn, x_T: Tensor, ts: list[float], opts: dict, options: dict,
           callback: Callback | None, progress: bool) -> Tensor:
    """The PF-ODE from ts[0] down to ts[-1] through ``sde.flow.integrate_ode``; ``extra`` gives x0_hat."""
    batch = x_T.shape[0]

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        return pf_velocity(sde, score, x, t.reshape(1).expand(batch).to(x))

    def at_point(i: int, t: float, x: Tensor) -> None:
        tt = times(t, x)
        emit(callback, i, tt, x, tweedie(sde, x, tt, extra(x, tt)))

    return integrate_ode(velocity, x_T, ts, method=opts["method"], rtol=opts["rtol"], atol=opts["atol"],
                         options=options, first_step=FIRST_STEP, callback=None if callback is None else at_point,
                         progress="ode" if progress else None)
