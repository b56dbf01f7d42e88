"""Shared pieces of the exponential-integrator solvers (UniPC, DEIS, SDE-DPM-Solver++, the adaptive
DPM-Solver): the grid's alpha, sigma and half-log-SNR l = log(alpha/sigma) in float64, the model output
in data or noise prediction, and the option checks they share.

Only ``alpha``, ``sigma``, ``log_snr`` and ``t_from_log_snr`` of the SDE are used, so VP, sub-VP and VE
are handled alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._checks import bcast, check_choice
from ..flow import tweedie
from ..sdes import SDE
from ._base import times

Coef = tuple[float, float, float]  # (alpha, sigma, l) at one time
PREDICTIONS = ("data", "noise")  # data: x0_hat (the "++" / predict_x0 form); noise: eps_hat = -sigma score
NoiseSampler = Callable[[int, Tensor], Tensor]  # (step index, like) -> standard normal noise shaped like `like`


def coef_at(sde: SDE, t: float) -> Coef:
    """(alpha, sigma, l) at one Python-float time, in float64."""
    tt = torch.tensor([t], dtype=torch.float64)
    return float(sde.alpha(tt)), float(sde.sigma(tt)), 0.5 * float(sde.log_snr(tt))


def schedule(sde: SDE, ts: Sequence[float]) -> list[Coef]:
    """(alpha, sigma, l) at every time of a grid (entry point only)."""
    return [coef_at(sde, t) for t in ts]


def t_of_l(sde: SDE, lam_half: float) -> float:
    """The time whose half-log-SNR is ``lam_half`` (clipped to T)."""
    return min(float(sde.t_from_log_snr(torch.tensor([2.0 * lam_half], dtype=torch.float64))), sde.T)


def model_output(sde: SDE, score: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: float, prediction: str) -> Tensor:
    """One score call turned into the solver's model output: Tweedie's x0_hat ("data") or
    eps_hat = -sigma score ("noise")."""
    tt = times(t, x)
    sc = score(x, tt)
    if prediction == "data":
        return tweedie(sde, x, tt, sc)
    return -bcast(sde.sigma(tt), x) * sc


def x0_of(x: Tensor, m: Tensor, c: Coef, prediction: str) -> Tensor:
    """The x0 estimate behind a model output (for the callback)."""
    return m if prediction == "data" else (x - c[1] * m) / c[0]


def transfer(c_i: Coef, c_j: Coef, prediction: str) -> tuple[float, float, float]:
    """(ratio, scale, hh) of the exponential-integrator step t_i -> t_j: the first-order update is
    x_j = ratio x_i - scale expm1(hh) m_i, with h = l_j - l_i and hh = -h (data) or h (noise)."""
    (a_i, s_i, l_i), (a_j, s_j, l_j) = c_i, c_j
    if prediction == "data":
        return s_j / s_i, a_j, -(l_j - l_i)
    return a_j / a_i, s_j, l_j - l_i


def check_order(order: int, allowed: Sequence[int] = (1, 2, 3)) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"order must be one of {list(allowed)}, got {order!r}")
    return order


def check_prediction(prediction: str) -> str:
    return check_choice("prediction", prediction, PREDICTIONS)


def step_order(order: int, i: int, steps: int, n_hist: int, lower_order_final: bool, denoise_final: bool) -> int:
    """Order of multistep step i: at most the history available (warm-up) and, with
    ``lower_order_final``, at most the number of steps left, the final Tweedie step counting as one (it is
    diffusers' last step to sigma = 0, so both lower the same steps on the same grid)."""
    p = min(order, n_hist)
    return min(p, steps - i + bool(denoise_final)) if lower_order_final else p
