"""A learned time grid in the spirit of "Align Your Steps" (Sabour et al. 2024): for a given score
function, SDE, sampler and step budget, choose the steps' times to minimise an estimate of the sampler's
discretisation error made with the model itself, no data.

The estimate: draw a few x_T from the prior, solve once with many steps (the reference), and measure
the mean squared difference between the sampler's output on the candidate grid and the reference, for the
same x_T. The grid is parametrised in half-log-SNR l between its fixed ends, l_k = l_T + (l_eps - l_T)
cumsum(softmax(w))_k (always strictly increasing), w = 0 being the log-SNR grid, and w is improved by a
derivative-free pattern search (the samplers run without autograd). The result is a plain decreasing list
of times that every sampler accepts as ``grid=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_choice, check_int, check_positive
from ..sdes import SDE, ScoreFn
from ._base import default_eps

__all__ = ["LearnedGrid", "learn_grid"]


@dataclass
class LearnedGrid:
    """What ``learn_grid`` returns.

    Attributes:
        grid: the decreasing times t_0 = T > ... > t_N = eps; pass as ``grid=`` to the sampler.
        loss: the error estimate (mean squared difference to the reference) on that grid.
        initial_loss: the same on the log-SNR grid it started from.
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
        n_samples: number of prior draws in the error estimate.
        reference_steps: steps of the reference solve.
        sweeps: pattern-search sweeps.
        init_step: initial pattern-search step on the logits.
        generator: for the prior draws.
        dtype, device: of the prior draws.
        **sampler_options: passed to the sampler (order, variant, ...; not steps / eps / grid).

    Returns:
        LearnedGrid(grid, loss, initial_loss, nfe).

    Raises:
        ValueError: unknown sampler, steps < 2, bad counts, or sampler_options holding steps / eps / grid.
    """
    fn = _check_learn_grid(sampler, steps, n_samples, reference_steps, sweeps, init_step, sampler_options)
    eps = default_eps(sde) if eps is None else eps
    x_T, ref, l_ends = _reference(score_fn, sde, fn, shape, eps, n_samples, reference_steps, generator, dtype,
                                  device, sampler_options)
    nfe = [ref.nfe]
    loss = _grid_loss(score_fn, sde, fn, x_T, ref, l_ends, eps, sampler_options, nfe)
    w = torch.zeros(steps, dtype=torch.float64)
    best = initial = loss(w)
    w, best = _pattern_search(loss, w, best, sweeps, init_step)
    return LearnedGrid(_times(sde, w, l_ends) + [eps], best, initial, nfe[0])


def _check_learn_grid(sampler: str, steps: int, n_samples: int, reference_steps: int, sweeps: int,
                      init_step: float, sampler_options: dict):
    """Validate learn_grid's arguments (in its order); returns the sampler's function."""
    from . import SAMPLERS

    check_choice("sampler", sampler, SAMPLERS)
    check_int("steps", steps, 2)
    check_int("n_samples", n_samples, 1)
    check_int("reference_steps", reference_steps, 1)
    check_int("sweeps", sweeps, 0)
    check_positive("init_step", init_step)
    for key in ("steps", "eps", "grid"):
        if key in sampler_options:
            raise ValueError(f"sampler_options must not hold {key!r}: learn_grid sets it")
    return SAMPLERS[sampler]


def _reference(score_fn: ScoreFn, sde: SDE, fn, shape: tuple[int, ...], eps: float, n_samples: int,
               reference_steps: int, generator, dtype, device, sampler_options: dict):
    """The prior draws x_T, the reference solve on them (log-SNR grid) and the half-log-SNR ends (l_T, l_eps)."""
    x_T = sde.prior_sampling((n_samples, *shape), generator=generator, device=device, dtype=dtype)
    ref = fn(score_fn, sde, x_T, steps=reference_steps, eps=eps, grid="log_snr", **sampler_options)
    lam = sde.log_snr(torch.tensor([sde.T, eps], dtype=torch.float64))
    return x_T, ref, (0.5 * float(lam[0]), 0.5 * float(lam[1]))


def _grid_loss(score_fn: ScoreFn, sde: SDE, fn, x_T: torch.Tensor, ref, l_ends: tuple[float, float], eps: float,
               sampler_options: dict, nfe: list[int]):
    """The error estimate of the logits w (mean squared difference to the reference; inf when not finite),
    adding each run's score calls to nfe[0]."""

    def loss(w: torch.Tensor) -> float:
        res = fn(score_fn, sde, x_T, grid=_times(sde, w, l_ends) + [eps], **sampler_options)
        nfe[0] += res.nfe
        err = float(((res.x - ref.x) ** 2).mean())
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
