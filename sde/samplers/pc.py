"""Predictor-corrector sampling (Song et al. 2021, Alg. 1): on a time grid T = t_0 > ... > t_N = eps,
each step runs the corrector at t_i, then the predictor from t_i to t_{i+1}.

``euler_maruyama``, ``reverse_diffusion`` and ``ancestral`` are the predictor-only samplers
(corrector "none"); ``pc`` combines any predictor with any corrector by name.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive
from ..flow import tweedie
from ..sdes import SDE, ReverseSDE, ScoreFn
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
from .correctors import CORRECTORS
from .grids import Grid, sampler_grid
from .predictors import PREDICTORS


def pc(
    score_fn: ScoreFn, sde: SDE, x_T: Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, progress: bool = False,
    predictor: str = "reverse_diffusion",  # name in PREDICTORS
    corrector: str = "langevin",  # name in CORRECTORS, or "none"
    steps: int | None = None,  # predictor steps; default sde.N (1000)
    eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
    grid: Grid = "uniform",  # name in GRIDS, or the decreasing times themselves (then steps/eps follow from it)
    rho: float = 7.0,  # exponent of the "edm" grid
    snr: float = 0.16,  # Langevin signal-to-noise ratio (0.16 for VE CIFAR-10, 0.01 for VP)
    n_steps: int = 1,  # corrector steps per predictor step
    step_lr: float = 2e-5,  # annealed Langevin base step size (Song & Ermon 2019)
    denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps] at the end
    _name: str = "pc",
) -> SampleResult:
    """Predictor-corrector sampler (Song et al. 2021, Alg. 1).

    Each step runs the corrector at t_i, then the predictor from t_i to t_{i+1}; the predictor
    takes its drift and diffusion from the reverse-time SDE ``sde.reverse(score_fn)``.

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``).
        callback: called after each predictor step with {"i", "t", "x", "x0_hat"} at t_i.
        predictor: the reverse-time step, a name in ``PREDICTORS``: "reverse_diffusion" (the
            forward chain run backwards, Song et al. 2021 eq. 46), "euler_maruyama" (Euler-Maruyama
            on the reverse SDE) or "ancestral" (the Gaussian posterior of the forward kernel).
        corrector: the MCMC step at each t_i, a name in ``CORRECTORS``: "langevin" (Song et al. 2021,
            Alg. 4), "annealed_langevin" (Song & Ermon 2019, Alg. 1) or "none".
        steps: number of predictor steps (grid intervals); default ``sde.N``.
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        grid: the time grid, a name in ``GRIDS`` ("uniform", "log_snr", "edm") or the decreasing
            times themselves (then steps and eps follow from it).
        rho: exponent of the "edm" grid (Karras et al. 2022 use 7).
        snr: signal-to-noise ratio of the "langevin" corrector's step size (0.16 for VE, 0.01 for VP
            in Song et al. 2021).
        n_steps: corrector steps per predictor step.
        step_lr: base step size of the "annealed_langevin" corrector.
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].

    Returns:
        SampleResult with nfe = steps (1 + n_steps if a corrector is used) + denoise_final.

    Raises:
        ValueError: unknown predictor/corrector/grid, steps < 1, eps outside (0, T), snr <= 0,
            n_steps < 1, step_lr <= 0.
    """
    eps = check_common(sde, x_T, steps, eps)
    ts = sampler_grid(sde, steps, eps, grid, rho=rho, default_steps=sde.N)
    options = _pc_options(sde, ts, x_T, predictor, corrector, grid, snr, n_steps, step_lr, denoise_final)
    score = CountedScore(score_fn)
    with torch.no_grad():
        x = _pc_loop(sde.reverse(score), x_T, ts, options, generator, callback, progress, _name)
        if denoise_final:
            x = denoise_step(sde, score, x, ts[-1])
    return SampleResult(check_finite(x, _name, options), score.calls, _name, options)


def _pc_options(sde: SDE, ts: list[float], x_T: Tensor, predictor: str, corrector: str, grid: Grid, snr: float,
                n_steps: int, step_lr: float, denoise_final: bool) -> dict:
    """Check pc's own options; returns the options it runs with (the corrector's only when it runs)."""
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    check_positive("snr", snr)
    check_int("n_steps", n_steps, 1)
    check_positive("step_lr", step_lr)
    if predictor == "reverse_diffusion":
        _check_discrete_chain(sde, ts, x_T)
    options = dict(predictor=predictor, corrector=corrector, steps=len(ts) - 1, eps=ts[-1], grid=grid)
    options["denoise_final"] = denoise_final
    if corrector != "none":
        options.update(n_steps=n_steps, **({"snr": snr} if corrector == "langevin" else {"step_lr": step_lr}))
    return options


def _pc_loop(rsde: ReverseSDE, x: Tensor, ts: list[float], options: dict, generator: torch.Generator | None,
             callback: Callback | None, progress: bool, name: str) -> Tensor:
    """The predictor-corrector steps on the grid ``ts``: corrector at t_i, predictor to t_{i+1}."""
    sde, score, eps = rsde.sde, rsde.score_fn, ts[-1]
    predict = PREDICTORS[options["predictor"]]
    kwargs = {k: options[k] for k in ("snr", "step_lr", "n_steps") if k in options}
    correct = partial(CORRECTORS[options["corrector"]], **kwargs)
    for i in steps_iter(len(ts) - 1, progress, name):
        t, s = ts[i], ts[i + 1]
        x = correct(sde, score, x, t, eps, generator)
        tt = times(t, x)
        sc = score(x, tt)
        x_prev = x
        x = predict(rsde, x, t, s, sc, generator)
        emit(callback, i, tt, x_prev, lambda x_prev=x_prev, tt=tt, sc=sc: tweedie(sde, x_prev, tt, sc))
    return x


def _check_discrete_chain(sde: SDE, ts: list[float], x_T: Tensor) -> None:
    """The reverse-diffusion predictor steps the forward chain's (f_i, G_i) backwards; the DDPM
    chain of VP needs beta(t) dt < 1 on every step. Checked once, on the CPU, before sampling."""
    probe = torch.zeros(1, 1, dtype=torch.float64)
    for t, s in zip(ts[:-1], ts[1:]):
        f, G = sde.discretize(probe, t, t - s)
        if not (torch.isfinite(G).all() and torch.isfinite(f).all()):
            raise ValueError(
                f"predictor='reverse_diffusion' with steps={len(ts) - 1} on {sde!r}: the discrete chain is undefined "
                f"at t={t:.4g}, dt={t - s:.4g} (DDPM needs beta(t) dt < 1); use more steps or another predictor"
            )


_PREDICTOR_ONLY_DOC = """
    ``pc`` with ``predictor`` set to this name and ``corrector="none"``.

    Args:
        score_fn, sde, x_T, generator, progress: the shared sampler arguments (see ``sample``).
        callback: called after each step with {"i", "t", "x", "x0_hat"} at t_i.
        steps: number of steps (grid intervals); default ``sde.N``.
        eps: end time of a named grid; default 1e-3 (VP, sub-VP) or 1e-5 (VE).
        grid: the time grid, a name in ``GRIDS`` ("uniform", "log_snr", "edm") or the decreasing
            times themselves (then steps and eps follow from it).
        rho: exponent of the "edm" grid.
        denoise_final: finish with one extra score call: Tweedie's E[x_0 | x_eps].

    Returns:
        SampleResult with nfe = steps + denoise_final.

    Raises:
        ValueError: unknown grid, steps < 1, eps outside (0, T).
    """


def _predictor_only(name: str):
    def sampler(
        score_fn: ScoreFn,
        sde: SDE,
        x_T: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        steps: int | None = None,  # default sde.N (1000)
        eps: float | None = None,  # end time; default 1e-3 (VP, sub-VP) or 1e-5 (VE)
        grid: Grid = "uniform",  # name in GRIDS, or the decreasing times themselves (then steps/eps follow from it)
        rho: float = 7.0,  # exponent of the "edm" grid
        denoise_final: bool = True,  # one extra score call: Tweedie's E[x_0 | x_eps]
    ) -> SampleResult:
        return pc(score_fn, sde, x_T, generator=generator, callback=callback, progress=progress, predictor=name,
                  corrector="none", steps=steps, eps=eps, grid=grid, rho=rho, denoise_final=denoise_final, _name=name)

    sampler.__name__ = sampler.__qualname__ = name
    sampler.__doc__ = (f"The {name} predictor alone (no corrector): "
                       f"{(PREDICTORS[name].__doc__ or '').splitlines()[0]}\n{_PREDICTOR_ONLY_DOC}")
    return sampler


euler_maruyama = _predictor_only("euler_maruyama")
reverse_diffusion = _predictor_only("reverse_diffusion")
ancestral = _predictor_only("ancestral")
