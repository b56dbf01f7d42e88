"""Samplers of score-based models: one registry, one call.

```python
result = sample(score_fn, sde, (64, 2), sampler="dpm_solver", generator=g, steps=20)
result.x, result.nfe
```
Every entry of ``SAMPLERS`` has the leading signature
``(score_fn, sde, x_T, *, generator=None, callback=None, progress=False, **options)``
and returns a ``SampleResult``. See docs/samplers.md for the math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_callable, check_choice, check_int, check_sde, check_tensor
from ..sdes import SDE, ScoreFn
from ._base import Callback, SampleResult, default_eps, merge_info
from .adaptive import dpm_adaptive, gotta_go_fast
from .correctors import CORRECTORS, annealed_langevin, langevin
from .cuda_graph import CudaGraphScore
from .ddim import ddim
from .deis import deis
from .dpm_sde import dpm_2s_ancestral, dpm_solver_sde
from .dpm_solver import dpm_solver
from .grids import GRIDS, time_grid
from .heun import heun
from .ode import ode
from .pc import ancestral, euler_maruyama, pc, reverse_diffusion
from .predictors import PREDICTORS
from .unipc import unipc

SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "pc": pc,
    "ode": ode,
    "ddim": ddim,
    "heun": heun,
    "dpm_solver": dpm_solver,
    "unipc": unipc,
    "deis": deis,
    "dpm_solver_sde": dpm_solver_sde,
    "dpm_2s_ancestral": dpm_2s_ancestral,
    "dpm_adaptive": dpm_adaptive,
    "gotta_go_fast": gotta_go_fast,
}

# Samplers that read the device every step by design (docs/scale.md, "Host syncs"): adaptive step-size
# control decides accept / reject on the host. Every other entry of SAMPLERS reads the device only at
# entry (x_T finite) and at the end (the samples finite), whatever the number of steps
# (tests/test_host_syncs.py).
SYNCS_PER_STEP: dict[str, str] = {  # name -> why; names not (yet) registered are ignored
    "ode": "torchdiffeq's odeint (public API) keeps its times on the device and compares them in Python at "
           "every interval, fixed-grid methods included; heun / ddim / dpm_solver / unipc are sync-free ODE solvers",
    "dpm_adaptive": "adaptive step size (DPM-Solver-12 / -23, Lu et al. 2022): accept / reject reads the error",
    "gotta_go_fast": "adaptive step size (Jolicoeur-Martineau et al. 2021): accept / reject reads the error",
}


def sample(
    score_fn: ScoreFn, sde: SDE, shape_or_x_T: tuple[int, ...] | torch.Size | Tensor, sampler: str = "pc", *,
    generator: torch.Generator | None = None, callback: Callback | None = None, progress: bool = False,
    batch_size: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    **options,
) -> SampleResult:
    """Draw samples with the named sampler.

    Args:
        score_fn: score_fn(x, t) -> Tensor shaped like x, t of shape (B,).
        sde: the forward SDE (VPSDE, SubVPSDE, VESDE).
        shape_or_x_T: a shape (x_T is drawn from ``sde.prior_sampling`` with ``generator``), or
            the starting tensor x_T itself (deterministic samplers are then deterministic).
        sampler: a name in ``SAMPLERS``.
        generator: source of all randomness (prior draw and sampler noise).
        callback: callback(info) after each step, info = {"i", "t", "x", "x0_hat"}.
        progress: show a tqdm bar.
        batch_size: run at most this many samples at a time (each chunk's x_T is drawn just
            before it runs); only the final samples are kept.
        device, dtype: of the drawn x_T when a shape is given (default: torch's defaults).
        **options: the sampler's own options, each documented in the Args of its function in
            ``SAMPLERS`` (docs/api.md): ``pc`` (predictor, corrector, snr, ...; ``euler_maruyama``,
            ``reverse_diffusion`` and ``ancestral`` are its predictor-only forms), ``ode`` (method,
            rtol, atol, options: the ``sde.flow`` ODE helper), ``ddim`` (eta), ``heun`` (S_churn, ...),
            ``dpm_solver`` (order, method, prediction, warmup, ...), the adaptive ``dpm_adaptive`` and
            ``gotta_go_fast`` (rtol, atol, h_init, ...; no steps). All fixed-step samplers share
            steps, eps, grid and rho (docs/samplers.md, "Time grids").

    Returns:
        SampleResult(x, nfe, sampler, options, callback_nfe, info); with batching nfe and
        callback_nfe sum over chunks (info: see ``SampleResult``).

    Raises:
        ValueError: unknown sampler, bad shape or batch_size, a non-finite x_T, a score output not
            shaped like x (checked on its first call), or the sampler's own checks.
        TypeError: sde is not an SDE instance, score_fn or callback is not callable.
        FloatingPointError: the samples came out non-finite.
    """
    x_T, n, shape, chunk = _check_sample(sde, shape_or_x_T, sampler, callback, batch_size)
    fn = SAMPLERS[sampler]
    outs, nfe, extra, infos, result = [], 0, 0, [], None
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        if shape is None:
            x_T_chunk = x_T[start : start + size]
        else:
            x_T_chunk = sde.prior_sampling((size,) + shape[1:], generator=generator, device=device, dtype=dtype)
        result = fn(score_fn, sde, x_T_chunk, generator=generator, callback=callback, progress=progress, **options)
        outs.append(result.x)
        nfe += result.nfe
        extra += result.callback_nfe
        infos.append(result.info)
    x = outs[0] if len(outs) == 1 else torch.cat(outs)
    return SampleResult(x, nfe, result.sampler, result.options, callback_nfe=extra, info=merge_info(infos))


def _check_sample(sde: SDE, shape_or_x_T, sampler: str, callback: Callback | None, batch_size: int | None):
    """Validate sample's arguments (in its order); returns (x_T or None, n, shape or None, chunk size)."""
    check_choice("sampler", sampler, SAMPLERS)
    check_sde(sde)  # before x_T is drawn from it
    if callback is not None:
        check_callable("callback", callback, "callback(info: dict)")
    if isinstance(shape_or_x_T, Tensor):
        x_T = check_tensor("shape_or_x_T", shape_or_x_T, 1)
        n, shape = x_T.shape[0], None
    else:
        x_T, shape = None, tuple(shape_or_x_T)
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ValueError(f"shape_or_x_T must be a tensor or a shape of positive ints, got {shape_or_x_T!r}")
        n = shape[0]
    return x_T, n, shape, n if batch_size is None else check_int("batch_size", batch_size, 1)


__all__ = [
    "sample",
    "SAMPLERS",
    "SYNCS_PER_STEP",
    "CudaGraphScore",
    "SampleResult",
    "PREDICTORS",
    "CORRECTORS",
    "GRIDS",
    "time_grid",
    "default_eps",
    "pc",
    "ode",
    "ddim",
    "heun",
    "dpm_solver",
    "unipc",
    "deis",
    "dpm_solver_sde",
    "dpm_2s_ancestral",
    "dpm_adaptive",
    "gotta_go_fast",
    "euler_maruyama",
    "reverse_diffusion",
    "ancestral",
    "langevin",
    "annealed_langevin",
]
