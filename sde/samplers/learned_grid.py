"""A learned time grid in the spirit of "Align Your Steps" (Sabour et al. 2024): for a given score
function, SDE, sampler and step budget, choose the steps' times to minimise an estimate of the sampler's
discretisation error made with the model itself, no data.

The estimate: draw a few x_T from the prior, solve once with many steps (the reference: the same sampler,
log-SNR grid), and measure the difference between the sampler's output on the candidate grid and the
reference, for the same x_T. ``objective="whitened"`` (the default) divides each coordinate's squared error
by that coordinate's variance over the reference outputs (plus a floor): for Gaussian-like outputs this is,
to second order, twice KL(output || reference), so small-variance coordinates count as much as they do in
a KL; ``"mse"`` is the plain mean squared error. The grid is parametrised in half-log-SNR l between its
fixed ends, l_k = l_T + (l_eps - l_T) cumsum(softmax(w))_k (always strictly increasing), starting from the
named grid ``init`` (w = 0 is the log-SNR grid), and w is improved by a derivative-free pattern search (the
samplers run without autograd). The result is a plain decreasing list of times every sampler accepts as
``grid=``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from ..sdes import SDE, ScoreFn
from ._base import default_eps
from .grids import GRIDS, time_grid

__all__ = ["LearnedGrid", "learn_grid", "OBJECTIVES"]


def _mse(out: Tensor, ref: Tensor, var_floor: float) -> float:
    """Mean squared difference to the reference."""
    return float(((out - ref) ** 2).mean())


def _whitened(out: Tensor, ref: Tensor, var_floor: float) -> float:
    """Mean squared difference per coordinate over (the reference's variance of that coordinate across the
    draws + var_floor times its mean variance): about 2 KL(output || reference) for Gaussian-like outputs."""
    var = ref.var(0, keepdim=True)
    return float((((out - ref) ** 2) / (var + var_floor * var.mean())).mean())


# objective name -> error(out, ref, var_floor) of the candidate grid's outputs against the reference's
OBJECTIVES: dict[str, Callable[[Tensor, Tensor, float], float]] = {"whitened": _whitened, "mse": _mse}


@dataclass
class LearnedGrid:
    """What ``learn_grid`` returns.

    Attributes:
        grid: the decreasing times t_0 = T > ... > t_N = eps; pass as ``grid=`` to the sampler.
        loss: the error estimate (the objective against the reference) on that grid.
        initial_loss: the same on the grid it started from (``init``).
        nfe: score evaluations spent learning it (reference included).
    """

    grid: list[float]
    loss: float
    initial_loss: float
    nfe: int


def _times(sde: SDE, w: torch.Tensor, l_ends: tuple[float, float]) -> list[float]:
    frac = torch.cumsum(torch.softmax(w, 0), 0)
    lam = l_ends[0] + (l_ends[1] - l_ends[0]) * frac[:-1]
    ts = sde.t_from_log_snr(2.0 * lam).tolist()
    out = [float(sde.T)] + [min(t, sde.T) for t in ts]
    return out


def _initial_logits(sde: SDE, steps: int, eps: float, init: str, rho: float) -> torch.Tensor:
    """The logits w of the named grid: log of its half-log-SNR increments (0 for the log-SNR grid)."""
    if init == "log_snr":
        return torch.zeros(steps, dtype=torch.float64)
    lam = sde.log_snr(torch.tensor(time_grid(sde, steps, eps, init, rho=rho), dtype=torch.float64))
    inc = torch.diff(lam).clamp_min(1e-12)
    return torch.log(inc / inc.sum())


def learn_grid(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    sampler: str = "unipc",
    steps: int = 10,
    *,
    eps: float | None = None,
    n_samples: int = 16,  # prior draws the error is averaged over
    reference_steps: int = 200,  # steps of the reference solve (same sampler, log-SNR grid)
    sweeps: int = 8,  # pattern-search sweeps over the step sizes; each costs <= 2 steps sampler runs
    init_step: float = 0.5,  # initial change of each softmax logit; halved when a sweep finds nothing
    objective: str = "whitened",  # error against the reference: "whitened" (per-coordinate variance) or "mse"
    var_floor: float = 1e-2,  # whitened: variance floor, a fraction of the mean variance (constant pixels)
    init: str = "log_snr",  # the named grid the search starts from (a name in GRIDS)
    rho: float = 7.0,  # exponent of the "edm" starting grid
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    **sampler_options,
) -> LearnedGrid:
    """Optimise the time grid of ``sampler`` with ``steps`` steps for this model (no data needed).

    Args:
        score_fn: score_fn(x, t).
        sde: the forward SDE.
        shape: one sample's shape (no batch dimension), e.g. (64,) or (1, 8, 8).
        sampler: a name in SAMPLERS with a ``grid`` option (a deterministic one: unipc, dpm_solver, deis, ...).
        steps: the sampler's number of steps (its NFE budget follows from it).
        eps: end time (default ``default_eps(sde)``).
        n_samples: number of prior draws in the error estimate (>= 2 for ``objective="whitened"``).
        reference_steps: steps of the reference solve.
        sweeps: pattern-search sweeps.
        init_step: initial pattern-search step on the logits.
        objective: a name in ``OBJECTIVES``: "whitened" (squared error over each coordinate's variance across
            the reference outputs: about 2 KL to the reference for Gaussian-like outputs) or "mse".
        var_floor: "whitened": added to each variance, as a fraction of the mean variance, so that (nearly)
            constant coordinates do not dominate; >= 0.
        init: the grid the search starts from, a name in ``GRIDS`` ("log_snr", "edm", "uniform").
        rho: exponent of the "edm" starting grid.
        generator: for the prior draws.
        dtype, device: of the prior draws.
        **sampler_options: passed to the sampler (order, variant, ...; not steps / eps / grid).

    Returns:
        LearnedGrid(grid, loss, initial_loss, nfe).

    Raises:
        ValueError: unknown sampler/objective/init, steps < 2, bad counts, var_floor < 0, steps/eps/grid options.
    """
    fn = _check_learn_grid(sampler, steps, n_samples, reference_steps, sweeps, init_step, objective, var_floor,
                           init, sampler_options)
    x_T, ref, l_ends, eps = _reference(score_fn, sde, fn, shape, eps, n_samples, reference_steps, generator, dtype,
                                       device, sampler_options)
    nfe, error = [ref.nfe], partial(OBJECTIVES[objective], ref=ref.x, var_floor=var_floor)
    loss = _grid_loss(score_fn, sde, fn, x_T, error, l_ends, eps, sampler_options, nfe)
    w = _initial_logits(sde, steps, eps, init, rho)
    best = initial = loss(w)
    w, best = _pattern_search(loss, w, best, sweeps, init_step)
    return LearnedGrid(_times(sde, w, l_ends) + [eps], best, initial, nfe[0])


def _check_learn_grid(sampler: str, steps: int, n_samples: int, reference_steps: int, sweeps: int,
                      init_step: float, objective: str, var_floor: float, init: str, sampler_options: dict):
    """Validate learn_grid's arguments (in its order); returns the sampler's function."""
    from . import SAMPLERS

    check_choice("sampler", sampler, SAMPLERS)
    check_int("steps", steps, 2)
    check_choice("objective", objective, OBJECTIVES)
    check_int("n_samples", n_samples, 2 if objective == "whitened" else 1)
    check_int("reference_steps", reference_steps, 1)
    check_int("sweeps", sweeps, 0)
    check_positive("init_step", init_step)
    check_nonnegative("var_floor", var_floor)
    check_choice("init", init, GRIDS)
    for key in ("steps", "eps", "grid"):
        if key in sampler_options:
            raise ValueError(f"sampler_options must not hold {key!r}: learn_grid sets it")
    return SAMPLERS[sampler]


def _reference(score_fn: ScoreFn, sde: SDE, fn, shape: tuple[int, ...], eps: float | None, n_samples: int,
               reference_steps: int, generator, dtype, device, sampler_options: dict):
    """The prior draws x_T, the reference solve on them (log-SNR grid), the half-log-SNR ends (l_T, l_eps)
    and the end time eps (default ``default_eps(sde)``)."""
    eps = default_eps(sde) if eps is None else eps
    x_T = sde.prior_sampling((n_samples, *shape), generator=generator, device=device, dtype=dtype)
    ref = fn(score_fn, sde, x_T, steps=reference_steps, eps=eps, grid="log_snr", **sampler_options)
    lam = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64))
    return x_T, ref, (0.5 * float(lam[0]), 0.5 * float(lam[1])), eps


def _grid_loss(score_fn: ScoreFn, sde: SDE, fn, x_T: torch.Tensor, error, l_ends: tuple[float, float], eps: float,
               sampler_options: dict, nfe: list[int]):
    """The error estimate of the logits w (``error`` of the sampler's output; inf when not finite or when the
    sampler fails on that grid), adding each run's score calls to nfe[0]."""

    def loss(w: torch.Tensor) -> float:
        res = fn(score_fn, sde, x_T, grid=_times(sde, w, l_ends) + [eps], **sampler_options)
        nfe[0] += res.nfe
        err = error(res.x)
        return err if math.isfinite(err) else math.inf

    return loss


def _pattern_search(loss, w: torch.Tensor, best: float, sweeps: int, step: float) -> tuple[torch.Tensor, float]:
    """Coordinate pattern search: try w_k +- step for every k, keep improvements, halve step when stuck."""
    for _ in range(sweeps):
        improved = False
        for k in range(w.shape[0]):
            for sign in (1.0, -1.0):
                cand = w.clone()
                cand[k] += sign * step
                value = loss(cand)
                if value < best:
                    w, best, improved = cand, value, True
                    break
        if not improved:
            step *= 0.5
    return w, best
