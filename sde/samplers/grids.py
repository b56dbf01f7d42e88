"""Time grids T = t_0 > t_1 > ... > t_N = eps for the fixed-step samplers.

Every grid is built in float64 on the CPU at the entry point (never per step) and returned
as a list of Python floats; samplers turn each t_i into a (B,) tensor on the data's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._checks import check_choice, check_int, check_open_interval, check_positive
from ..sdes import SDE


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
