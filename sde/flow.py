"""Reverse-time dynamics of a forward SDE and a score function: the one home.

For a forward SDE ``dx = f(x, t) dt + g(t) dw`` with Gaussian kernel N(alpha(t) x0, sigma(t)^2 I)
and a score ``s(x, t) ~ grad log p_t(x)``:

- the reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6):
  ``dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar``;
- the probability-flow ODE (Song et al. 2021, eq. 13): ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2``;
- Tweedie's denoiser (Efron 2011): ``E[x_0 | x_t] = (x_t + sigma(t)^2 s(x_t, t)) / alpha(t)``;
- the one ODE-integration helper (torchdiffeq's public ``odeint``): the ``ode`` sampler,
  ``encode``, ``decode`` and ``log_likelihood`` accept the same methods (:data:`ODE_METHODS`),
  validate them with :func:`check_ode` / :func:`ode_times`, and integrate with
  :func:`integrate_ode`, whose end-point rule is the same for all of them.

Samplers, ``encode`` / ``decode`` / ``log_likelihood``, the predictors (through
``SDE.reverse()``) and the denoisers call these functions; nothing else writes the formulas again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchdiffeq import odeint

from ._checks import bcast, check_choice, check_int, check_open_interval, check_positive

if TYPE_CHECKING:  # sdes.py imports this module (ReverseSDE is built on it)
    from .sdes import SDE, ScoreFn

__all__ = ["tweedie", "reverse_term", "reverse_drift", "pf_velocity"]
__all__ += ["ODE_METHODS", "ADAPTIVE_METHODS", "FIXED_GRID_METHODS", "check_ode", "ode_times", "integrate_ode"]


# -- the formulas ----------------------------------------------------------------------------------
def tweedie(sde: SDE, x: Tensor, t: Tensor, score: Tensor, *, alpha: Tensor | float | None = None,
            sigma: Tensor | float | None = None) -> Tensor:
    """Tweedie's formula (Efron 2011): E[x_0 | x_t = x] = (x + sigma(t)^2 score) / alpha(t).

    Args:
        sde: the forward SDE (gives alpha and sigma).
        x: the noisy state x_t, batch first.
        t: (B,) times.
        score: the score at (x, t), shaped like x.
        alpha: alpha(t) when the caller already has it (a float, or a tensor broadcasting
            against x); computed from ``sde`` when None.
        sigma: sigma(t) likewise.

    Returns:
        The x0 estimate, shaped like x.
    """
    a = bcast(sde.alpha(t), x) if alpha is None else alpha
    s = bcast(sde.sigma(t), x) if sigma is None else sigma
    return (x + s * s * score) / a


def reverse_term(f: Tensor, g: Tensor, x: Tensor, score: Tensor, *, probability_flow: bool = False) -> Tensor:
    """The reverse-time drift from its parts: f - g^2 score (SDE) or f - g^2 score / 2 (PF-ODE).

    The same expression gives the continuous drift (f = f(x, t), g = g(t)) and the discrete
    chain's reverse step (f = f_i, g = G_i of ``sde.discretize``; Song et al. 2021, eq. 46).

    Args:
        f: the forward drift, shaped like x.
        g: (B,) diffusion coefficients.
        x: the state (gives the broadcasting shape).
        score: the score at (x, t), shaped like x.
        probability_flow: half the score term (the ODE) instead of the full one (the SDE).

    Returns:
        The reverse drift, shaped like x.
    """
    coef = 0.5 if probability_flow else 1.0
    return f - coef * bcast(g**2, x) * score


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
    return reverse_term(sde.drift(x, t), sde.diffusion(t), x, score_fn(x, t), probability_flow=probability_flow)


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


# -- the ODE-integration helper ------------------------------------------------------------------
# torchdiffeq's methods by kind (scipy_solver is left out: it leaves the device and the dtype).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")  # embedded RK pairs, step control
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
ODE_METHODS = ADAPTIVE_METHODS + FIXED_GRID_METHODS

# The solver options torchdiffeq documents for each kind (its README, "Keyword arguments").
_ADAPTIVE_OPTIONS = ("first_step", "step_t", "jump_t", "min_step", "max_step", "safety", "ifactor", "dfactor",
                     "max_num_steps", "dtype", "norm")
_FIXED_OPTIONS = ("step_size", "grid_constructor", "interp", "perturb")
_ADAMS_OPTIONS = _FIXED_OPTIONS + ("max_iters", "max_order")


def _allowed_options(method: str) -> tuple[str, ...]:
    if method in ADAPTIVE_METHODS:
        return _ADAPTIVE_OPTIONS
    return _ADAMS_OPTIONS if method.endswith("_adams") else _FIXED_OPTIONS


def check_ode(method: str, rtol: float, atol: float, options: dict | None) -> dict:
    """The one validation of the ODE solver settings (``ode`` sampler, encode, decode, log_likelihood).

    Args:
        method: a name in :data:`ODE_METHODS`.
        rtol: relative tolerance of adaptive methods (and of implicit_adams' corrector), > 0.
        atol: absolute tolerance, > 0.
        options: torchdiffeq solver options for ``method``'s kind, or None.

    Returns:
        A copy of ``options`` (an empty dict for None).

    Raises:
        ValueError: unknown method, rtol/atol <= 0, an option the method's kind does not take.
        TypeError: options is not a dict.
    """
    check_choice("method", method, ODE_METHODS)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict of torchdiffeq solver options, got {type(options).__name__}")
    allowed = _allowed_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"options {unknown} are not options of method={method!r}; allowed: {list(allowed)}")
    return dict(options)


def ode_times(sde: SDE, method: str, steps: int | None, eps: float, grid: str | Sequence[float] | Tensor, *,
              rho: float = 7.0) -> list[float]:
    """The decreasing times T = t_0 > ... > t_N = eps an ODE solve visits, validated once.

    Without ``steps`` (and with a named grid) an adaptive method solves [eps, T] in one go;
    a fixed-grid method needs ``steps`` (or an explicit grid): one method step per interval.

    Args:
        sde: the forward SDE.
        method: a name in :data:`ODE_METHODS`.
        steps: number of grid intervals (None: one adaptive solve).
        eps: the end time near 0 (ignored in favour of the grid's last time for an explicit grid,
            which it must then equal when given).
        grid: a name in ``sde.samplers.GRIDS`` or the decreasing times themselves.
        rho: exponent of the "edm" grid.

    Returns:
        The times as Python floats (the callers traverse them backwards to run from eps to T).

    Raises:
        ValueError: a fixed-grid method without steps, steps < 1, eps outside (0, T), the grid's checks.
    """
    from .samplers.grids import sampler_grid  # samplers import sdes, which imports this module

    if steps is not None:
        check_int("steps", steps, 1)
    if isinstance(grid, str) and steps is None:
        if method in FIXED_GRID_METHODS:
            raise ValueError(f"method={method!r} is a fixed-grid method: give steps (an int >= 1), got steps=None")
        return [float(sde.T), check_open_interval("eps", eps, 0.0, sde.T)]
    return sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=1)


def _clamped(func: Callable[[Tensor, Tensor], Tensor], lo: float, hi: float) -> Callable[[Tensor, Tensor], Tensor]:
    """func with its scalar time clamped into [lo, hi]: torchdiffeq's initial step-size heuristic
    makes one trial evaluation that may fall outside the interval; accepted steps never do."""
    return lambda t, y: func(t.clamp(lo, hi), y)


def integrate_ode(
    func: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    ts: Sequence[float],
    *,
    method: str,
    rtol: float,
    atol: float,
    options: dict | None = None,
    first_step: float | None = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
    progress: str | None = None,
) -> Tensor:
    """Integrate dy/dt = func(t, y) through the times ``ts`` with torchdiffeq, one interval at a time.

    The end-point rule, the same for every caller: each interval [t_i, t_{i+1}] is one ``odeint``
    call whose adaptive steps land exactly on t_{i+1} (``step_t``; torchdiffeq otherwise steps past
    it and interpolates back, evaluating the score outside the SDE's time range), and ``func`` only
    ever sees times inside the interval (see :func:`_clamped`). A fixed-grid method takes one step
    per interval (or steps of ``options["step_size"]``).

    Args:
        func: ``func(t, y)`` with t a 0-d tensor.
        y: the state at ts[0].
        ts: the times, monotone (decreasing to sample / decode, increasing to encode).
        method: validated by :func:`check_ode`.
        rtol: relative tolerance.
        atol: absolute tolerance.
        options: validated torchdiffeq options (copied per interval; the caller's win).
        first_step: adaptive methods' first step as a fraction of each interval; None lets
            torchdiffeq's heuristic choose it.
        callback: ``callback(i, t_i, y_i)`` before interval i.
        progress: a tqdm bar over the intervals with this description; None for no bar.

    Returns:
        The state at ts[-1].
    """
    intervals = range(len(ts) - 1)
    if progress is not None:
        from tqdm.auto import tqdm

        intervals = tqdm(intervals, desc=progress, leave=False)
    with torch.no_grad():
        for i in intervals:
            t0, t1 = ts[i], ts[i + 1]
            if callback is not None:
                callback(i, t0, y)
            span = torch.tensor([t0, t1], dtype=y.dtype, device=y.device)
            opts = dict(options or {})
            if method in ADAPTIVE_METHODS:
                opts.setdefault("step_t", span[1:])
                if first_step is not None:
                    opts.setdefault("first_step", first_step * abs(t1 - t0))
            f = _clamped(func, min(t0, t1), max(t0, t1))
            y = odeint(f, y, span, method=method, rtol=rtol, atol=atol, options=opts)[-1]
    return y
