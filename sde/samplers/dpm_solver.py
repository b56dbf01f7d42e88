"""DPM-Solver (Lu et al. 2022, NeurIPS) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095):
exponential integrators of the probability-flow ODE in half-log-SNR time l = log(alpha/sigma),
for VP, sub-VP and VE alike (only alpha, sigma and the inverse of log_snr are used).

Write k = +1 for noise prediction m = eps_hat = -sigma score (DPM-Solver) and k = -1 for data
prediction m = x0_hat = (x + sigma^2 score)/alpha (DPM-Solver++). A step from t_i to t_j with
h = l_j - l_i uses ratio = alpha_j/alpha_i, scale = sigma_j (k = +1) or ratio = sigma_j/sigma_i,
scale = alpha_j (k = -1), and phi_1 = expm1(k h), phi_2 = phi_1/(k h) - 1, phi_3 = phi_2/(k h) - 1/2:
    order 1 (= DDIM):  x_j = ratio x_i - scale phi_1 m_i
and the higher orders add finite-difference corrections (see docs/samplers.md).
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
    steps_iter,
    times,
)
from .grids import Grid, sampler_grid

PREDICTIONS = {"noise": 1.0, "data": -1.0}  # k in the module docstring
METHODS = ("multistep", "singlestep")
R_SINGLESTEP = {2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}  # intermediate points r h (Lu et al. 2022, Alg. 1-2)


def _phis(kh: float) -> tuple[float, float, float]:
    phi1 = math.expm1(kh)
    phi2 = phi1 / kh - 1.0
    return phi1, phi2, phi2 / kh - 0.5


class _Schedule:
    """alpha, sigma and l = log(alpha/sigma) at Python-float times, in float64 (entry-point only)."""

    def __init__(self, sde: SDE) -> None:
        self.sde = sde

    def at(self, t: float) -> tuple[float, float, float]:
        tt = torch.tensor([t], dtype=torch.float64)
        return float(self.sde.alpha(tt)), float(self.sde.sigma(tt)), 0.5 * float(self.sde.log_snr(tt))

    def t_at(self, lam_half: float) -> float:
        return min(float(self.sde.t_from_log_snr(torch.tensor([2.0 * lam_half], dtype=torch.float64))), self.sde.T)


def dpm_solver(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    steps: int | None = None,  # solver steps (default 20); multistep: 1 score call each, singlestep: `order` calls each
    order: int = 2,  # 1, 2 or 3
    method: str = "multistep",  # "multistep" (Adams-like, reuses past calls) or "singlestep" (intermediate points)
    prediction: str = "data",  # "data": DPM-Solver++ ; "noise": DPM-Solver
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "log_snr",  # name in GRIDS ("log_snr" is DPM-Solver's default) or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    lower_order_final: bool = False,  # multistep, steps < 10: lower the final orders (the reference's rule; worse here)
    warmup: str = "singlestep",  # multistep order 3: first step singlestep order 2 (+1 call); or "lower_order"
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """DPM-Solver / DPM-Solver++ of order 1-3, singlestep or multistep.

    Returns:
        SampleResult with nfe = steps (multistep; + 1 for order 3 with warmup="singlestep") or
        order * steps (singlestep), + denoise_final.

    Raises:
        ValueError: order not in {1, 2, 3}, unknown method/prediction/grid, steps < 1, eps outside (0, T).
    """
    eps = check_common(sde, x_T, steps, eps)
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    check_choice("method", method, METHODS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("warmup", warmup, ("singlestep", "lower_order"))
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=20)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, order=order, method=method, prediction=prediction, eps=eps, grid=grid,
                   lower_order_final=lower_order_final, warmup=warmup, denoise_final=denoise_final)
    k = PREDICTIONS[prediction]
    sched = _Schedule(sde)
    coef = [sched.at(t) for t in ts]
    score = CountedScore(score_fn)

    def model(x: Tensor, t: float, c: tuple[float, float, float]) -> Tensor:
        a, s, _ = c
        sc = score(x, times(t, x))
        return -s * sc if k > 0 else (x + s * s * sc) / a

    def x0_of(x: Tensor, m: Tensor, c: tuple[float, float, float]) -> Tensor:
        return m if k < 0 else (x - c[1] * m) / c[0]

    def transfer(c_i, c_j) -> tuple[float, float, float]:
        """(ratio, scale, k h) of a step between two schedule points."""
        (a_i, s_i, l_i), (a_j, s_j, l_j) = c_i, c_j
        return (a_j / a_i, s_j, l_j - l_i) if k > 0 else (s_j / s_i, a_j, -(l_j - l_i))

    def single(x_i: Tensor, m0: Tensor, c_i, h: float, ratio, scale, phi1, phi2, step_order: int) -> Tensor:
        """One singlestep update of the given order (Lu et al. 2022, Alg. 1-2; DPM-Solver++ Alg. 1)."""
        base = ratio * x_i - scale * phi1 * m0
        if step_order == 1:
            return base
        rs = R_SINGLESTEP[step_order]
        mids = [sched.t_at(c_i[2] + r * h) for r in rs]
        c_1 = sched.at(mids[0])
        rat1, sc1, kh1 = transfer(c_i, c_1)
        m1 = model(rat1 * x_i - sc1 * math.expm1(kh1) * m0, mids[0], c_1)
        if step_order == 2:
            return base - (0.5 / rs[0]) * scale * phi1 * (m1 - m0)
        r1, r2 = rs
        c_2 = sched.at(mids[1])
        rat2, sc2, kh2 = transfer(c_i, c_2)
        p1, p2, _ = _phis(kh2)
        u2 = rat2 * x_i - sc2 * p1 * m0 - (r2 / r1) * sc2 * p2 * (m1 - m0)
        return base - (1.0 / r2) * scale * phi2 * (model(u2, mids[1], c_2) - m0)

    history: list[tuple[Tensor, float]] = []  # multistep: past (model output, l), newest last
    x = x_T
    with torch.no_grad():
        for i in steps_iter(steps, progress, "dpm_solver"):
            c_i, c_j = coef[i], coef[i + 1]
            m0 = model(x, ts[i], c_i)
            emit(callback, i, times(ts[i], x), x, lambda x=x, m0=m0, c_i=c_i: x0_of(x, m0, c_i))
            ratio, scale, kh = transfer(c_i, c_j)
            h = c_j[2] - c_i[2]
            phi1, phi2, phi3 = _phis(kh)
            if method == "multistep":
                history = (history + [(m0, c_i[2])])[-3:]
                step_order = min(order, len(history))
                if lower_order_final and steps < 10:
                    step_order = min(step_order, steps - i)
                # An order-1 first step has local error O(h^2), which would cap the global order of a
                # 3rd-order method at 2; one singlestep order-2 step (local O(h^3)) keeps it at 3.
                single_start = order == 3 and i == 0 and steps > 1 and warmup == "singlestep"
                if single_start:
                    x = single(x, m0, c_i, h, ratio, scale, phi1, phi2, 2)
                elif step_order == 1:
                    x = ratio * x - scale * phi1 * m0
                elif step_order == 2:
                    (m1, l1), r0 = history[-2], (c_i[2] - history[-2][1]) / h
                    x = ratio * x - scale * phi1 * (m0 + 0.5 * (m0 - m1) / r0)
                else:
                    (m1, l1), (m2, l2) = history[-2], history[-3]
                    r0, r1 = (c_i[2] - l1) / h, (l1 - l2) / h
                    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m'': the Taylor term is phi_3 h^2 m''
                    x = ratio * x - scale * (phi1 * m0 + phi2 * d1 + phi3 * d2)
            else:
                x = single(x, m0, c_i, h, ratio, scale, phi1, phi2, order)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "dpm_solver", options), score.calls, "dpm_solver", options)
