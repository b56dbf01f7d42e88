"""Per-SDE defaults of the samplers, chosen from measurements (docs/fast-solvers.md, "Defaults"):
small tables keyed on the SDE class, looked up along the class hierarchy."""

from __future__ import annotations

from typing import TypeVar

from ..sdes import SDE, VESDE, VPSDE, SubVPSDE

T = TypeVar("T")

# ddim's grid: log-SNR is 6.5x (VP) / 3.3x (sub-VP) lower KL than uniform-in-t at 10 NFE, uniform
# is 1.4x lower than log-SNR on VE (64-D Gaussian, exact score: bench_samplers.py --only defaults).
DDIM_GRID: dict[type, str] = {VPSDE: "log_snr", SubVPSDE: "log_snr", VESDE: "uniform"}

# dpm_adaptive's rtol: the paper's 0.05 except on VE, where x_T ~ N(0, sigma_max^2) lets rtol |x| allow
# errors of order 1 early on: DPM-Solver-23 at 0.05 gives 809 nats at 27 NFE, at 0.01 0.67 nats at 39 NFE
# (3072-D Gaussian, exact score: bench_adaptive.py --only ode); on VP 0.05 is at the eps floor already.
DPM_ADAPTIVE_RTOL: dict[type, float] = {VESDE: 0.01}
DPM_ADAPTIVE_RTOL_FALLBACK = 0.05


def per_sde(table: dict[type, T], sde: SDE, fallback: T) -> T:
    """The entry of the nearest class of ``sde`` in ``table`` (sub-VP is looked up before VP), else fallback."""
    for cls in type(sde).__mro__:
        if cls in table:
            return table[cls]
    return fallback


__all__ = ["DDIM_GRID", "DPM_ADAPTIVE_RTOL", "per_sde"]
