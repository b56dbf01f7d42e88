"""Time grids T = t_0 > t_1 > ... > t_N = eps for the fixed-step samplers.

Every grid is built in float64 on the CPU at the entry point (never per step) and returned
as a list of Python floats; samplers turn each t_i into a (B,) tensor on the data's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_open_interval, check_positive
from ..sdes import SDE
from ._base import default_eps

Grid = str | Sequence[float] | Tensor  # a name in GRIDS, or the times themselves (T >= t_0 > ... > t_N > 0)


def _uniform(sde: SDE, steps: int, eps: float, rho: float) -> torch.Tensor:
    """Uniform in t (Song et al. 2021)."""
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)


def _log_snr_bounds(sde: SDE, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    ends = torch.tensor([sde.T, eps], dtype=torch.float64)
    lam = sde.log_snr(ends)
    return lam[0], lam[1]


def _log_snr(sde: SDE, steps: int, eps: float, rho: float) -> torch.Tensor:
    """Uniform in log-SNR lambda = 2 log(alpha / sigma) (DPM-Solver's "logSNR" skip type)."""
    lam_T, lam_eps = _log_snr_bounds(sde, eps)
    return sde.t_from_log_snr(torch.linspace(float(lam_T), float(lam_eps), steps + 1, dtype=torch.float64))


def _edm(sde: SDE, steps: int, eps: float, rho: float) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/N (s_min^(1/rho) - s_max^(1/rho)))^rho
    on the scaled noise level sigma / alpha = exp(-lambda / 2), mapped back to t."""
    lam_T, lam_eps = _log_snr_bounds(sde, eps)
    s_max, s_min = math.exp(-0.5 * float(lam_T)), math.exp(-0.5 * float(lam_eps))
    ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return sde.t_from_log_snr(-2.0 * torch.log(sig))


GRIDS: dict[str, Callable[[SDE, int, float, float], torch.Tensor]] = {
    "uniform": _uniform,
    "log_snr": _log_snr,
    "edm": _edm,
}


def time_grid(sde: SDE, steps: int, eps: float, grid: str = "uniform", *, rho: float = 7.0) -> list[float]:
    """The ``steps + 1`` decreasing times from T to eps of the named grid.

    Args:
        sde: the forward SDE (its log_snr / t_from_log_snr define the non-uniform grids).
        steps: number of intervals, >= 1.
        eps: end time in (0, T).
        grid: one of ``GRIDS``: "uniform" (in t), "log_snr" (uniform in lambda), "edm" (rho schedule).
        rho: exponent of the "edm" grid (7 in Karras et al. 2022); ignored by the others.

    Returns:
        A list of floats, first exactly T, last exactly eps, strictly decreasing.

    Raises:
        ValueError: unknown grid, steps < 1, eps outside (0, T), rho <= 0.
    """
    check_choice("grid", grid, GRIDS)
    check_int("steps", steps, 1)
    check_open_interval("eps", eps, 0.0, sde.T)
    check_positive("rho", rho)
    ts = GRIDS[grid](sde, steps, eps, rho).tolist()
    ts[0], ts[-1] = float(sde.T), float(eps)  # exact ends despite round trips through log-SNR
    ts[1:-1] = [min(max(t, eps), sde.T) for t in ts[1:-1]]
    return ts


def explicit_grid(sde: SDE, grid: Sequence[float] | Tensor) -> list[float]:
    """Validate a user-given time grid t_0 > t_1 > ... > t_N (N >= 1) inside (0, T].

    Args:
        sde: the forward SDE (its T bounds the grid).
        grid: the decreasing times, e.g. a learned grid or a DDPM timestep list mapped to t.

    Returns:
        The times as Python floats.

    Raises:
        TypeError: grid is not a sequence of numbers or a 1-D tensor.
        ValueError: fewer than 2 points, non-finite, not strictly decreasing, or outside (0, T].
    """
    if isinstance(grid, Tensor):
        if grid.dim() != 1:
            raise ValueError(f"grid given as a tensor must be 1-D, got shape {tuple(grid.shape)}")
        ts = grid.detach().to("cpu", torch.float64).tolist()
    elif isinstance(grid, Sequence) and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in grid):
        ts = [float(t) for t in grid]
    else:
        raise TypeError(f"grid must be a name in {sorted(GRIDS)} or a sequence of times, got {type(grid).__name__}")
    if len(ts) < 2:
        raise ValueError(f"grid must hold at least 2 times (1 step), got {len(ts)}")
    if not all(math.isfinite(t) for t in ts) or not all(a > b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"grid must be finite and strictly decreasing, got {ts[:6]}{' ...' if len(ts) > 6 else ''}")
    if not (0.0 < ts[-1] and ts[0] <= sde.T * (1 + 1e-12)):
        raise ValueError(f"grid must lie in (0, {sde.T}], got times from {ts[0]!r} to {ts[-1]!r}")
    return ts


def sampler_grid(sde: SDE, steps: int | None, eps: float | None, grid: Grid, *, rho: float,
                 default_steps: int) -> list[float]:
    """The time grid a fixed-step sampler runs on: a named grid or an explicit one.

    Args:
        sde: the forward SDE.
        steps: number of intervals of a named grid (None: ``default_steps``); with an explicit grid it
            must be None or equal ``len(grid) - 1``.
        eps: end time of a named grid (None: ``default_eps(sde)``); with an explicit grid it must be
            None or equal ``grid[-1]``.
        grid: a name in ``GRIDS`` or the decreasing times themselves (see :func:`explicit_grid`).
        rho: exponent of the "edm" grid.
        default_steps: the sampler's default number of steps.

    Returns:
        The decreasing times as Python floats; ``len - 1`` is the number of steps, the last the end time.

    Raises:
        ValueError: the named grid's checks (see :func:`time_grid`), or steps / eps contradicting an
            explicit grid.
    """
    if isinstance(grid, str):
        steps = default_steps if steps is None else steps
        return time_grid(sde, steps, default_eps(sde) if eps is None else eps, grid, rho=rho)
    ts = explicit_grid(sde, grid)
    if steps is not None and steps != len(ts) - 1:
        raise ValueError(f"steps={steps!r} contradicts the explicit grid of {len(ts) - 1} steps; leave steps=None")
    if eps is not None and eps != ts[-1]:
        raise ValueError(f"eps={eps!r} contradicts the explicit grid ending at {ts[-1]!r}; leave eps=None")
    return ts
