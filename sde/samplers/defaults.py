"""Per-SDE defaults of the samplers, chosen from measurements (docs/fast-solvers.md, "Defaults"):
small tables keyed on the SDE class, looked up along the class hierarchy."""

from __future__ import annotations

from typing import TypeVar

from ..sdes import SDE, VESDE, VPSDE, SubVPSDE

T = TypeVar("T")

# ddim's grid: log-SNR is 6.5x (VP) / 3.3x (sub-VP) lower KL than uniform-in-t at 10 NFE, uniform
# is 1.4x lower than log-SNR on VE (64-D Gaussian, exact score: bench_samplers.py --only defaults).
DDIM_GRID: dict[type, str] = {VPSDE: "log_snr", SubVPSDE: "log_snr", VESDE: "uniform"}


def per_sde(table: dict[type, T], sde: SDE, fallback: T) -> T:
    """The entry of the nearest class of ``sde`` in ``table`` (sub-VP is looked up before VP), else fallback."""
    for cls in type(sde).__mro__:
        if cls in table:
            return table[cls]
    return fallback


__all__ = ["DDIM_GRID", "per_sde"]
