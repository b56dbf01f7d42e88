"""Adaptive step-size samplers: DPM-Solver-12 / -23 on the probability-flow ODE (Lu et al. 2022, sec. 4.2
and App. Alg. 4-5) and "Gotta Go Fast" on the reverse SDE (Jolicoeur-Martineau et al. 2021, Alg. 1).

Both take an embedded pair of solutions per step, a lower-order x_low and a higher-order x_high from the
same score calls, and measure the local error with the mixed tolerance of each element,
    delta = max(atol, rtol max(|x_low|, |x_prev|))      (x_prev: the previous accepted x_low),
    E = sqrt(mean(((x_high - x_low) / delta)^2))        (the RMS over the elements of one sample);
the step is accepted if E <= 1 (the state moves to x_high), and either way the next step is
h <- min(what is left, theta h E^(-r)). ``atol`` is in the units of x, so 0.0078 (about 1/128) is
"within a quantization level" for images in [-1, 1], as in both papers.

``dpm_adaptive`` steps in half-log-SNR l = log(alpha / sigma) with one step size for the batch
(E is the largest per-sample error, as the paper's code); r = 1/order. ``gotta_go_fast`` steps in t
with one step size per sample (each sample's own E decides its step), r = 0.9 as the paper: with
b(x, t) = f(x, t) - g(t)^2 score(x, t) the reverse drift (``sde.flow``) and z ~ N(0, I),
    x'  = x - h b(x, t) + sqrt(h) g(t) z                            (Euler-Maruyama: x_low)
    x'' = (x' + x - h b(x', t - h) + sqrt(h) g(t - h) z) / 2          (improved Euler, the SAME z: x_high)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._checks import bcast, check_choice, check_int, check_positive
from ..flow import reverse_drift, reverse_term, tweedie
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
    randn_like,
    times,
)
from ._expint import check_order, check_prediction
from .defaults import DPM_ADAPTIVE_RTOL, DPM_ADAPTIVE_RTOL_FALLBACK, per_sde
from .dpm_solver import PREDICTIONS, _Schedule, _Solver

__all__ = ["dpm_adaptive", "gotta_go_fast"]

NORMS = ("sample", "batch")  # gotta_go_fast: whose RMS error decides a step


# -- shared: the error norm, the step update, the checks ------------------------------------------
def scaled_error(x_low: Tensor, x_high: Tensor, x_prev: Tensor, rtol: float, atol: float) -> Tensor:
    """(B,) RMS over each sample of (x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|))."""
    delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
    return ((x_high - x_low) / delta).square().flatten(1).mean(1).sqrt()


def _check_run(sde: SDE, x_T: Tensor, eps: float | None, rtol: float, atol: float, h_init: float, theta: float,
               max_nfe: int) -> float:
    """The shared checks; returns the end time (default_eps when None)."""
    eps = check_common(sde, x_T, None, eps)
    _check_control(rtol, atol, h_init, theta, max_nfe)
    return default_eps(sde) if eps is None else eps


def _check_control(rtol: float, atol: float, h_init: float, theta: float, max_nfe: int) -> None:
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_positive("h_init", h_init)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must lie in (0, 1] (the safety factor of the step update), got {theta!r}")
    check_int("max_nfe", max_nfe, 1)


def _guard(name: str, calls: int, per_attempt: int, max_nfe: int, where: str) -> None:
    """Stop before an attempt that would spend more than ``max_nfe`` score calls."""
    if calls + per_attempt > max_nfe:
        raise RuntimeError(f"sampler {name!r} reached max_nfe={max_nfe} score calls at {where} before reaching "
                           "the end time; loosen rtol/atol or raise max_nfe")


def _denoise(name: str, sde: SDE, score: CountedScore, x: Tensor, opts: dict[str, Any]) -> Tensor:
    """The optional final Tweedie step (guarded by max_nfe)."""
    if not opts["denoise_final"]:
        return x
    _guard(name, score.calls, 1, opts["max_nfe"], f"t = {opts['eps']}")
    return denoise_step(sde, score, x, opts["eps"])


def _bar(progress: bool, name: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=name, unit="step", leave=False)


# -- DPM-Solver-12 / -23 --------------------------------------------------------------------------
def dpm_adaptive(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    order: int = 3,  # 3: DPM-Solver-23 (errors of the 2nd- vs 3rd-order step), 2: DPM-Solver-12
    rtol: float | None = None,  # relative tolerance; None: 0.05 (the paper's), 0.01 on VE (defaults.py)
    atol: float = 0.0078,  # absolute tolerance in the units of x (0.0078 ~ 1/128 for images in [-1, 1])
    h_init: float = 0.05,  # first step in half-log-SNR l = log(alpha / sigma) (the paper's default)
    theta: float = 0.9,  # safety factor of the step update h <- theta h E^(-1/order)
    prediction: str = "noise",  # "noise": DPM-Solver (the paper's adaptive solver); "data": DPM-Solver++
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
    max_nfe: int = 10_000,  # guard: stop with an error rather than spend more score calls
) -> SampleResult:
    """DPM-Solver-12 / -23, adaptive steps in log-SNR (Lu et al. 2022, sec. 4.2, App. Alg. 4-5).

    Each attempt from s with step h (in l) computes the singlestep pair (DPM-Solver-1, -2) or
    (DPM-Solver-2 with r_1 = 1/3, -3) sharing ``order - 1`` score calls after the one at s; it is
    accepted if E <= 1, where E is the largest per-sample RMS error of the module docstring (one step
    size for the whole batch), and then h <- min(theta h E^(-1/order), l_eps - l_s). The score at s
    is reused after a rejection, so a rejected attempt costs ``order - 1`` calls (the reference
    implementations spend ``order``).

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``); no
            noise is drawn, so ``generator`` is unused; the bar counts attempts.
        callback: called once per accepted step with {"i", "t", "x", "x0_hat"} at the step's start.
        order: 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
        rtol: relative tolerance, > 0; None picks the per-SDE default ``defaults.DPM_ADAPTIVE_RTOL``
            (0.01 on VE, else the paper's 0.05).
        atol: absolute tolerance in the units of x, > 0.
        h_init: the first attempted step in half-log-SNR, > 0 (clipped to the whole interval).
        theta: safety factor in (0, 1].
        prediction: "noise" (DPM-Solver, as the paper) or "data" (DPM-Solver++ updates).
        eps: end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].
        max_nfe: the most score calls the run may spend; reaching it raises RuntimeError.

    Returns:
        SampleResult with nfe = accepted + (order - 1) (accepted + rejected) + denoise_final, and
        info = {"accepted", "rejected"} (numbers of steps).

    Raises:
        ValueError: order not in {2, 3}, rtol/atol/h_init not finite and > 0, theta outside (0, 1],
            max_nfe < 1, unknown prediction, eps outside (0, T).
        RuntimeError: the run would spend more than max_nfe score calls.
        FloatingPointError: the error estimate or the samples came out non-finite.
    """
    check_order(order, (2, 3))
    check_prediction(prediction)
    rtol = per_sde(DPM_ADAPTIVE_RTOL, sde, DPM_ADAPTIVE_RTOL_FALLBACK) if rtol is None else rtol
    eps = _check_run(sde, x_T, eps, rtol, atol, h_init, theta, max_nfe)
    options = dict(order=order, rtol=rtol, atol=atol, h_init=h_init, theta=theta, prediction=prediction, eps=eps,
                   denoise_final=denoise_final, max_nfe=max_nfe)
    score = CountedScore(score_fn)
    solver = _Solver(sde, score, PREDICTIONS[prediction], _Schedule(sde))
    with torch.no_grad():
        x, info = _dpm_run(solver, x_T, options, callback, progress)
        x = _denoise("dpm_adaptive", sde, score, x, options)
    return SampleResult(check_finite(x, "dpm_adaptive", options), score.calls, "dpm_adaptive", options, info=info)


def _dpm_run(solver: _Solver, x: Tensor, opts: dict[str, Any], callback: Callback | None,
             progress: bool) -> tuple[Tensor, dict[str, int]]:
    """The accept / reject loop of DPM-Solver-12 / -23 from T down to eps."""
    sched, order, eps = solver.sched, opts["order"], opts["eps"]
    s, c_s, c_end = float(solver.sde.T), sched.at(float(solver.sde.T)), sched.at(eps)
    h = min(opts["h_init"], c_end[2] - c_s[2])
    x_prev, m0, accepted, rejected, bar = x, None, 0, 0, _bar(progress, "dpm_adaptive")
    while s > eps:  # the final accepted step sets s = eps exactly
        _guard("dpm_adaptive", solver.score.calls, order if m0 is None else order - 1, opts["max_nfe"], f"t = {s:.6g}")
        if m0 is None:
            m0 = solver.model(x, s, c_s)
        t = eps if h >= c_end[2] - c_s[2] else max(sched.t_at(c_s[2] + h), eps)
        c_t = c_end if t == eps else sched.at(t)
        x_low, x_high = solver.embedded_pair(x, m0, solver.step(c_s, c_t), order)
        err = float(scaled_error(x_low, x_high, x_prev, opts["rtol"], opts["atol"]).max())
        if not math.isfinite(err):
            check_finite(x_high, "dpm_adaptive", opts)
            raise FloatingPointError(f"sampler 'dpm_adaptive': the error estimate overflowed at t = {s:.6g} "
                                     f"with options {opts}; try float64 or check the score function")
        if err <= 1.0:
            emit(callback, accepted, times(s, x), x, lambda x=x, m0=m0, c=c_s: solver.x0_of(x, m0, c))
            x, x_prev, s, c_s, m0, accepted = x_high, x_low, t, c_t, None, accepted + 1
        else:
            rejected += 1
        grow = math.inf if err == 0.0 else opts["theta"] * err ** (-1.0 / order)
        h = min(h * grow, c_end[2] - c_s[2])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x, {"accepted": accepted, "rejected": rejected}


# -- Gotta Go Fast ----------------------------------------------------------------------------------
def gotta_go_fast(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    rtol: float = 0.01,  # relative tolerance eps_rel (the paper's 0.01; 0.02 is faster)
    atol: float = 0.0078,  # absolute tolerance eps_abs in the units of x (0.0078 ~ 1/128 for images in [-1, 1])
    h_init: float = 0.01,  # first step in t (the paper's default)
    theta: float = 0.9,  # safety factor of the step update h <- theta h E^(-exponent)
    exponent: float = 0.9,  # the paper's r: a larger value grows the step faster after small errors
    norm: str = "sample",  # "sample": each sample its own E and step (the paper); "batch": one RMS over the batch
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps] (the paper denoises too)
    max_nfe: int = 100_000,  # guard: stop with an error rather than spend more score calls
) -> SampleResult:
    """Gotta Go Fast: adaptive EM / improved Euler on the reverse SDE (Jolicoeur-Martineau et al. 2021, Alg. 1).

    The pair (x', x'') of the module docstring; if E <= 1 the sample moves to (x'', t - h); then
    h <- min(t - eps, theta h E^(-exponent)). Each iteration calls the score on the whole batch at the
    samples' own times (finished ones ride along with h = 0, as the paper's code): nfe = 2 per iteration.

    Args:
        score_fn, sde, x_T, progress: the shared sampler arguments (see ``sample``); the bar counts
            iterations.
        generator: source of the noise z (one draw of x's shape per iteration).
        callback: called once per iteration with {"i", "t" (each sample's time), "x", "x0_hat"} at
            the iteration's start (Tweedie from its first score call, so x0_hat is exact for all).
        rtol: relative tolerance eps_rel, > 0.
        atol: absolute tolerance eps_abs in the units of x, > 0.
        h_init: the first attempted step in t, > 0 (clipped to T - eps).
        theta: safety factor in (0, 1].
        exponent: the exponent r of the step update, > 0.
        norm: "sample" (each sample its own E, t and h, as the paper) or "batch" (one RMS over the batch,
            one step for all: use it with few coordinates per sample, see docs/fast-solvers.md).
        eps: end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].
        max_nfe: the most score calls the run may spend; reaching it raises RuntimeError.

    Returns:
        SampleResult with nfe = 2 iterations + denoise_final and info = {"iterations", "accepted",
        "rejected" (summed over the samples), "sample_accepted", "sample_rejected", "sample_nfe"
        ((B,) tensors; sample_nfe = 2 (accepted + rejected) + denoise_final: what the sample alone
        would have spent)}.

    Raises:
        ValueError: rtol/atol/h_init/exponent not finite and > 0, theta outside (0, 1], max_nfe < 1,
            unknown norm, eps outside (0, T).
        RuntimeError: the run would spend more than max_nfe score calls.
        FloatingPointError: the error estimate or the samples came out non-finite.
    """
    eps = _check_run(sde, x_T, eps, rtol, atol, h_init, theta, max_nfe)
    check_positive("exponent", exponent)
    check_choice("norm", norm, NORMS)
    options = dict(rtol=rtol, atol=atol, h_init=h_init, theta=theta, exponent=exponent, norm=norm, eps=eps,
                   denoise_final=denoise_final, max_nfe=max_nfe)
    score = CountedScore(score_fn)
    with torch.no_grad():
        x, info = _ggf_run(sde, score, x_T, options, generator, callback, progress)
        x = _denoise("gotta_go_fast", sde, score, x, options)
    info["sample_nfe"] = 2 * (info["sample_accepted"] + info["sample_rejected"]) + int(denoise_final)
    return SampleResult(check_finite(x, "gotta_go_fast", options), score.calls, "gotta_go_fast", options, info=info)


def _ggf_pair(sde: SDE, score: ScoreFn, x: Tensor, t: Tensor, h: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x', x'', score at (x, t)) of one Gotta Go Fast attempt; t and h are (B,) float64."""
    tt, t2 = t.to(x.dtype), (t - h).to(x.dtype)
    hb, root = bcast(h.to(x.dtype), x), bcast(h.sqrt().to(x.dtype), x)
    sc = score(x, tt)
    x1 = x - hb * reverse_term(sde.drift(x, tt), sde.diffusion(tt), x, sc) + root * bcast(sde.diffusion(tt), x) * z
    x2 = x - hb * reverse_drift(sde, score, x1, t2) + root * bcast(sde.diffusion(t2), x) * z
    return x1, 0.5 * (x1 + x2), sc


def _ggf_run(sde: SDE, score: CountedScore, x: Tensor, opts: dict[str, Any], generator: torch.Generator | None,
             callback: Callback | None, progress: bool) -> tuple[Tensor, dict[str, Any]]:
    """The per-sample accept / reject loop of Gotta Go Fast from T down to eps."""
    eps, batch = opts["eps"], x.shape[0]
    t = torch.full((batch,), float(sde.T), dtype=torch.float64, device=x.device)  # float64: t accumulates steps
    h = torch.full_like(t, min(opts["h_init"], float(sde.T) - eps))
    acc, rej = (torch.zeros(batch, dtype=torch.long, device=x.device) for _ in range(2))
    x_prev, i, bar = x, 0, _bar(progress, "gotta_go_fast")
    while bool((active := t > eps).any()):
        _guard("gotta_go_fast", score.calls, 2, opts["max_nfe"], f"t = {float(t.max()):.6g}")
        x1, x2, sc = _ggf_pair(sde, score, x, t, h, randn_like(x, generator))
        tt = t.to(x.dtype)
        emit(callback, i, tt, x, lambda x=x, sc=sc, tt=tt: tweedie(sde, x, tt, sc))
        err = scaled_error(x1, x2, x_prev, opts["rtol"], opts["atol"]).double()
        if opts["norm"] == "batch":  # all samples share t and h: one RMS over every element
            err = err.square().mean().sqrt().expand(batch)
        if not bool(torch.isfinite(err[active]).all()):
            check_finite(x2, "gotta_go_fast", opts)
            raise FloatingPointError(f"sampler 'gotta_go_fast': the error estimate overflowed with options {opts}")
        ok = active & (err <= 1.0)
        x, x_prev = torch.where(bcast(ok, x), x2, x), torch.where(bcast(ok, x), x1, x_prev)
        t = torch.where(ok, torch.where(h >= t - eps, torch.full_like(t, eps), t - h), t)
        acc, rej = acc + ok.long(), rej + (active & ~ok).long()
        grow = opts["theta"] * err.pow(-opts["exponent"])  # inf where err = 0: the step is then what is left
        h = torch.where(t > eps, torch.minimum(h * grow, t - eps), torch.zeros_like(h))
        i += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return x, {"iterations": i, "accepted": int(acc.sum()), "rejected": int(rej.sum()),
               "sample_accepted": acc, "sample_rejected": rej}
