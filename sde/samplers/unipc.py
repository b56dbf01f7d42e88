"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", Alg. 2-3, B(h) forms): a multistep exponential integrator in half-log-SNR
l = log(alpha/sigma) for VP, sub-VP and VE alike.

UniP-p (the predictor, order p) from t_i to t_j, with h = l_j - l_i, hh = -h (data prediction) or h
(noise prediction), the past model outputs m_{i-k} at r_k = (l_{i-k} - l_i)/h and D_k = (m_{i-k} - m_i)/r_k:
    x_j = ratio x_i - scale (expm1(hh) m_i + B(hh) sum_k rho_k D_k),
rho solving sum_k rho_k r_k^(n-1) = g_n for n < p, g_n = n! h phi_{n+1}(hh) / B(hh)
(h phi_1 = expm1(hh), h phi_{n+1} = h phi_n / hh - 1/n!). UniC-p (the corrector) redoes the step with
the model output at the predicted x_j as one more node (r = 1), solving the p x p system: order p + 1
without another score call, because m_j is needed by the next predictor anyway.
B(h) = hh ("bh1") or expm1(hh) ("bh2").
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
from ._expint import (
    Coef,
    check_order,
    check_prediction,
    model_output,
    schedule,
    step_order,
    transfer,
    x0_of,
)
from .grids import Grid, sampler_grid

B_H = {"bh1": lambda hh: hh, "bh2": math.expm1}  # the two B(h) of Zhao et al. 2023, sec. 3.3

__all__ = ["unipc", "B_H"]


def _g(hh: float, b_h: float, n: int) -> list[float]:
    """g_1..g_n: k! h phi_{k+1}(hh) / B(h)."""
    h_phi = math.expm1(hh) / hh - 1.0  # h phi_2 (divided by hh once more each round)
    fact, out = 1.0, []
    for k in range(1, n + 1):
        out.append(h_phi * fact / b_h)
        fact *= k + 1
        h_phi = h_phi / hh - 1.0 / fact
    return out


def _rhos(rks: list[float], g: list[float]) -> list[float]:
    """Solve the Vandermonde system sum_k rho_k r_k^(n-1) = g_n (n = 1..len(rks)) in float64."""
    r = torch.tensor(rks, dtype=torch.float64)
    vander = torch.stack([r**n for n in range(len(rks))])
    return torch.linalg.solve(vander, torch.tensor(g[: len(rks)], dtype=torch.float64)).tolist()


def _diffs(hist: list[tuple[Tensor, float]], p: int, h: float) -> tuple[list[float], list[Tensor]]:
    """r_k and D_k of the p - 1 outputs before the newest (hist newest last)."""
    m0, l0 = hist[-1]
    rks = [(hist[-1 - k][1] - l0) / h for k in range(1, p)]
    return rks, [(hist[-1 - k][0] - m0) / r for k, r in zip(range(1, p), rks)]


def _update(x: Tensor, hist, c_i: Coef, c_j: Coef, p: int, prediction: str, variant: str,
            m_new: Tensor | None) -> Tensor:
    """UniP-p (m_new None) or UniC-p (m_new: the model output at the predicted x_j) from x at t_i."""
    ratio, scale, hh = transfer(c_i, c_j, prediction)
    rks, ds = _diffs(hist, p, c_j[2] - c_i[2])
    b_h = B_H[variant](hh)
    out = ratio * x - scale * math.expm1(hh) * hist[-1][0]
    if m_new is None:  # predictor: p - 1 nodes; order 2 uses rho = 1/2 as the paper and diffusers do
        rho = [] if p == 1 else [0.5] if p == 2 else _rhos(rks, _g(hh, b_h, p - 1))
    else:  # corrector: one more node at r = 1; order 1 uses rho = 1/2
        ds = ds + [m_new - hist[-1][0]]
        rho = [0.5] if p == 1 else _rhos(rks + [1.0], _g(hh, b_h, p))
    if rho:
        out = out - (scale * b_h) * sum(r * d for r, d in zip(rho, ds))
    return out


def unipc(
    score_fn: ScoreFn,
    sde: SDE,
    x_T: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    steps: int | None = None,  # solver steps, 1 score call each (default 20)
    order: int = 2,  # predictor order p (1-3); with the corrector the order is p + 1
    variant: str = "bh2",  # B(h): "bh1" (B = h) or "bh2" (B = e^h - 1), see B_H
    prediction: str = "data",  # "data" (x0_hat, the default of the paper for guided / few-step use) or "noise"
    corrector: bool = True,  # UniC after every predictor step but the last (no extra score call)
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "log_snr",  # name in GRIDS or the decreasing times themselves
    rho: float = 7.0,  # exponent of the "edm" grid
    lower_order_final: bool = True,  # order <= steps left on the final steps (as diffusers)
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
) -> SampleResult:
    """UniPC multistep sampler (Zhao et al. 2023, Alg. 2-3, B(h) variants), orders 1-3.

    Args:
        score_fn: score_fn(x, t) -> Tensor shaped like x.
        sde: the forward SDE (VPSDE, SubVPSDE, VESDE, ...).
        x_T: the starting point at t = T, batch first.
        generator: unused (the solver is deterministic); accepted for the shared signature.
        callback: callback(info) after each score call, info = {"i", "t", "x", "x0_hat"} (x: the predicted,
            not yet corrected point the score was evaluated at).
        progress: show a tqdm bar.
        steps: number of solver steps (one score call each); default 20.
        order: predictor order p in {1, 2, 3}; the first steps use the history available.
        variant: "bh1" or "bh2" (the B(h) of Zhao et al. 2023, sec. 3.3).
        prediction: "data" (UniPC with x0 prediction) or "noise" (eps prediction).
        corrector: apply UniC-p after every step but the last (the corrected x is the next start point).
        eps: end time of a named grid.
        grid: a name in GRIDS ("log_snr" default) or the decreasing times themselves.
        rho: exponent of the "edm" grid.
        lower_order_final: cap the order of step i at the steps left (the Tweedie final step counts as one).
        denoise_final: finish with Tweedie's formula at the end time (one extra score call).

    Returns:
        SampleResult with nfe = steps + denoise_final.

    Raises:
        ValueError: order not in {1, 2, 3}, unknown variant / prediction / grid, steps < 1, eps outside (0, T).
    """
    eps = _check_unipc(sde, x_T, steps, eps, order, variant, prediction)
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=20)
    steps, eps = len(ts) - 1, ts[-1]
    options = dict(steps=steps, order=order, variant=variant, prediction=prediction, corrector=corrector,
                   eps=eps, grid=grid, lower_order_final=lower_order_final, denoise_final=denoise_final)
    coef, score = schedule(sde, ts), CountedScore(score_fn)
    # hist: past (model output, l), newest last; last: (x at the previous step's start, its order) for UniC
    x, hist, last = x_T, [], None
    with torch.no_grad():
        for i in steps_iter(steps, progress, "unipc"):
            x, hist, last = _unipc_step(sde, score, x, hist, last, ts, coef, i, options, callback)
        if denoise_final:
            x = denoise_step(sde, score, x, eps)
    return SampleResult(check_finite(x, "unipc", options), score.calls, "unipc", options)


def _check_unipc(sde: SDE, x_T: Tensor, steps: int | None, eps: float | None, order: int, variant: str,
                 prediction: str) -> float | None:
    """Validate unipc's arguments (in the entry point's order); returns eps as ``check_common`` does."""
    eps = check_common(sde, x_T, steps, eps)
    check_order(order)
    check_choice("variant", variant, B_H)
    check_prediction(prediction)
    return eps


def _unipc_step(sde: SDE, score, x: Tensor, hist: list[tuple[Tensor, float]], last, ts: list[float],
                coef: list[Coef], i: int, options: dict, callback: Callback | None):
    """Step i of unipc (one score call): UniC on the previous step (if any), then UniP; returns the new
    (x, hist, last)."""
    order, prediction, variant = options["order"], options["prediction"], options["variant"]
    m = model_output(sde, score, x, ts[i], prediction)
    # the callback sees the point the score was evaluated at (before UniC moves it)
    emit(callback, i, times(ts[i], x), x, lambda x=x, m=m, c=coef[i]: x0_of(x, m, c, prediction))
    if options["corrector"] and last is not None:
        x = _update(last[0], hist, coef[i - 1], coef[i], last[1], prediction, variant, m)
    hist = (hist + [(m, coef[i][2])])[-order:]
    p = step_order(order, i, options["steps"], len(hist), options["lower_order_final"], options["denoise_final"])
    return _update(x, hist, coef[i], coef[i + 1], p, prediction, variant, None), hist, (x, p)
