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
from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_choice
from ..flow import tweedie
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
WARMUPS = ("singlestep", "lower_order")  # how multistep order 3 starts (see dpm_solver's warmup)
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


def _check_options(order: int, method: str, prediction: str, warmup: str) -> None:
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    check_choice("method", method, METHODS)
    check_choice("prediction", prediction, PREDICTIONS)
    check_choice("warmup", warmup, WARMUPS)


def dpm_solver(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
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
    """DPM-Solver / DPM-Solver++ of order 1-3, singlestep or multistep (Lu et al. 2022, Alg. 1-2; 2211.01095 Alg. 1-2).

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``); the
            solver draws no noise, so ``generator`` is unused.
        callback: called at each step with {"i", "t", "x", "x0_hat"} at t_i.
        steps: number of solver steps (grid intervals); default 20. Multistep spends one score call per
            step, singlestep ``order`` calls per step.
        order: the solver's order, 1 (= DDIM), 2 or 3.
        method: "multistep" (Adams-like: reuses the previous steps' model outputs) or "singlestep"
            (intermediate points inside each step).
        prediction: what the model output is expanded in: "data" (x0_hat, DPM-Solver++) or "noise"
            (eps_hat = -sigma score, DPM-Solver).
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        grid: the time grid, a name in ``GRIDS`` ("log_snr", uniform in log-SNR, is DPM-Solver's
            default; "uniform", "edm") or the decreasing times themselves (then steps and eps follow).
        rho: exponent of the "edm" grid.
        lower_order_final: multistep with steps < 10: lower the order of the final steps (order
            min(order, steps left)), as the reference does for stability with few steps.
        warmup: how multistep order 3 starts: "singlestep" (the first step is a singlestep order-2
            update, one extra score call, which keeps the global order 3) or "lower_order" (orders
            1, 2, then 3, no extra call).
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].

    Returns:
        SampleResult with nfe = steps (multistep; + 1 for order 3 with warmup="singlestep") or
        order * steps (singlestep), + denoise_final.

    Raises:
        ValueError: order not in {1, 2, 3}, unknown method/prediction/grid, steps < 1, eps outside (0, T).
    """
    eps = check_common(sde, x_T, steps, eps)
    _check_options(order, method, prediction, warmup)
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=20)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, order=order, method=method, prediction=prediction, eps=eps, grid=grid,
                   lower_order_final=lower_order_final, warmup=warmup, denoise_final=denoise_final)
    score = CountedScore(score_fn)
    solver = _Solver(sde, score, PREDICTIONS[prediction], _Schedule(sde))
    with torch.no_grad():
        x = solver.run(x_T, ts, options, callback, progress)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "dpm_solver", options), score.calls, "dpm_solver", options)


Coef = tuple[float, float, float]  # (alpha, sigma, l = log(alpha / sigma)) at one time


@dataclass(frozen=True)
class _Step:
    """The coefficients of one step from t_i to t_j: x_j = ratio x_i - scale (phi_1 m_i + ...)."""

    c_i: Coef
    h: float  # l_j - l_i
    ratio: float  # alpha_j / alpha_i (noise) or sigma_j / sigma_i (data)
    scale: float  # sigma_j (noise) or alpha_j (data)
    phis: tuple[float, float, float]  # phi_1, phi_2, phi_3 at k h


@dataclass(frozen=True)
class _Solver:
    """One DPM-Solver run: the SDE's schedule, the counted score and the prediction sign k."""

    sde: SDE
    score: ScoreFn
    k: float  # +1: noise prediction, -1: data prediction
    sched: _Schedule

    def model(self, x: Tensor, t: float, c: Coef) -> Tensor:
        """The model output m: eps_hat = -sigma score (k = +1) or x0_hat by Tweedie (k = -1)."""
        a, s, _ = c
        tt = times(t, x)
        sc = self.score(x, tt)
        return -s * sc if self.k > 0 else tweedie(self.sde, x, tt, sc, alpha=a, sigma=s)

    def x0_of(self, x: Tensor, m: Tensor, c: Coef) -> Tensor:
        return m if self.k < 0 else (x - c[1] * m) / c[0]

    def step(self, c_i: Coef, c_j: Coef) -> _Step:
        """The coefficients of a step between two schedule points."""
        (a_i, s_i, l_i), (a_j, s_j, l_j) = c_i, c_j
        ratio, scale, kh = (a_j / a_i, s_j, l_j - l_i) if self.k > 0 else (s_j / s_i, a_j, -(l_j - l_i))
        return _Step(c_i, l_j - l_i, ratio, scale, _phis(kh))

    def run(self, x: Tensor, ts: list[float], options: dict, callback: Callback | None, progress: bool) -> Tensor:
        """All the steps on the grid ``ts``, singlestep or multistep."""
        coef = [self.sched.at(t) for t in ts]
        steps, history = len(ts) - 1, []  # multistep: past (model output, l), newest last
        for i in steps_iter(steps, progress, "dpm_solver"):
            m0 = self.model(x, ts[i], coef[i])
            emit(callback, i, times(ts[i], x), x, lambda x=x, m0=m0, c_i=coef[i]: self.x0_of(x, m0, c_i))
            st = self.step(coef[i], coef[i + 1])
            if options["method"] == "singlestep":
                x = self.singlestep(x, m0, st, options["order"])
                continue
            history = (history + [(m0, coef[i][2])])[-3:]
            x = self.multistep(x, history, st, _multistep_order(options, i, steps, len(history)))
        return x

    def singlestep(self, x_i: Tensor, m0: Tensor, st: _Step, order: int) -> Tensor:
        """One singlestep update of the given order (Lu et al. 2022, Alg. 1-2; DPM-Solver++ Alg. 1)."""
        if order == 1:
            return st.ratio * x_i - st.scale * st.phis[0] * m0
        return self.embedded_pair(x_i, m0, st, order)[1]

    def embedded_pair(self, x_i: Tensor, m0: Tensor, st: _Step, order: int) -> tuple[Tensor, Tensor]:
        """The singlestep update of order 2 or 3 and the one of order - 1 that shares its score calls:
        (DPM-Solver-1, DPM-Solver-2 with r = 1/2) or (DPM-Solver-2 with r_1 = 1/3, DPM-Solver-3), the
        embedded pairs of DPM-Solver-12 / -23 (Lu et al. 2022, sec. 4.2); ``order - 1`` score calls."""
        base = st.ratio * x_i - st.scale * st.phis[0] * m0
        rs = R_SINGLESTEP[order]
        mids = [self.sched.t_at(st.c_i[2] + r * st.h) for r in rs]
        c_1 = self.sched.at(mids[0])
        s1 = self.step(st.c_i, c_1)
        m1 = self.model(s1.ratio * x_i - s1.scale * s1.phis[0] * m0, mids[0], c_1)
        second = base - (0.5 / rs[0]) * st.scale * st.phis[0] * (m1 - m0)
        if order == 2:
            return base, second
        r1, r2 = rs
        c_2 = self.sched.at(mids[1])
        s2 = self.step(st.c_i, c_2)
        u2 = s2.ratio * x_i - s2.scale * s2.phis[0] * m0 - (r2 / r1) * s2.scale * s2.phis[1] * (m1 - m0)
        return second, base - (1.0 / r2) * st.scale * st.phis[1] * (self.model(u2, mids[1], c_2) - m0)

    def multistep(self, x: Tensor, history: list[tuple[Tensor, float]], st: _Step, order: int) -> Tensor:
        """One multistep update (DPM-Solver++ Alg. 2) of the given order; 0 is the singlestep warm-up."""
        m0, l0 = history[-1]
        phi1, phi2, phi3 = st.phis
        if order == 0:
            return self.singlestep(x, m0, st, 2)
        if order == 1:
            return st.ratio * x - st.scale * phi1 * m0
        if order == 2:
            m1, l1 = history[-2]
            r0 = (l0 - l1) / st.h
            return st.ratio * x - st.scale * phi1 * (m0 + 0.5 * (m0 - m1) / r0)
        (m1, l1), (m2, l2) = history[-2], history[-3]
        r0, r1 = (l0 - l1) / st.h, (l1 - l2) / st.h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m'': the Taylor term is phi_3 h^2 m''
        return st.ratio * x - st.scale * (phi1 * m0 + phi2 * d1 + phi3 * d2)


def _multistep_order(options: dict, i: int, steps: int, n_history: int) -> int:
    """The order of multistep step i: limited by the history, lowered at the end with few steps;
    0 for the singlestep order-2 warm-up of order 3.

    An order-1 first step has local error O(h^2), which would cap the global order of a 3rd-order
    method at 2; one singlestep order-2 step (local O(h^3)) keeps it at 3.
    """
    order = options["order"]
    if order == 3 and i == 0 and steps > 1 and options["warmup"] == "singlestep":
        return 0
    step_order = min(order, n_history)
    if options["lower_order_final"] and steps < 10:
        step_order = min(step_order, steps - i)
    return step_order
