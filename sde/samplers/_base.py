"""Shared pieces of every sampler: the result type, an exact score-call counter, Tweedie's
denoiser, entry-point validation, the progress bar and the single final finiteness check."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import (
    check_all_finite,
    check_callable,
    check_int,
    check_open_interval,
    check_output_shape,
    check_sde,
    check_tensor,
)
from ..flow import tweedie
from ..sdes import SDE, VESDE, ScoreFn

Callback = Callable[[dict], None]

DEFAULT_EPS_VP = 1e-3  # end time for VP / sub-VP (Song et al. 2021)
DEFAULT_EPS_VE = 1e-5  # end time for VE (Song et al. 2021)


@dataclass
class SampleResult:
    """What a sampler returns.

    Attributes:
        x: the samples, shaped like x_T.
        nfe: the exact number of score evaluations the sampler itself spent (each call counts once,
            whatever the batch); the same with or without a callback.
        sampler: the sampler's name.
        options: the options it ran with (after defaults were filled in).
        callback_nfe: score evaluations spent only to give the callback its ``x0_hat``, not part of
            ``nfe`` (total calls = nfe + callback_nfe). Only ``ode`` spends any (one per grid point,
            since its solver evaluates between the points); 0 without a callback.
        info: what the sampler measured on its run, beyond nfe; empty for the fixed-step samplers. The
            adaptive ones report their accepted and rejected steps (ints) and, with per-sample step
            sizes, per-sample counts as (B,) tensors. ``sample`` with ``batch_size`` sums the numbers
            and concatenates the tensors over the chunks.
    """

    x: Tensor
    nfe: int
    sampler: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    callback_nfe: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def merge_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``info`` of chunked runs as one: numbers summed, (B,) tensors concatenated."""
    if len(infos) == 1:
        return infos[0]
    return {k: torch.cat([i[k] for i in infos]) if isinstance(v, Tensor) else sum(i[k] for i in infos)
            for k, v in infos[0].items()}


class CountedScore:
    """Wraps a score_fn and counts its calls in a Python int (no device sync).

    The first output is checked once to be a tensor shaped like x (metadata only: no sync), so a
    score of the wrong shape fails at the first call, naming ``name``, instead of broadcasting.
    """

    def __init__(self, score_fn: ScoreFn, name: str = "score_fn") -> None:
        self.score_fn = check_callable(name, score_fn, f"{name}(x, t) -> Tensor shaped like x")
        self.name = name
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        out = self.score_fn(x, t)
        if self.calls == 1:
            check_output_shape(self.name, out, x)
        return out


def default_eps(sde: SDE) -> float:
    """The customary end time: 1e-5 for VE, 1e-3 otherwise."""
    return DEFAULT_EPS_VE if isinstance(sde, VESDE) else DEFAULT_EPS_VP


def check_common(sde: SDE, x_T: Tensor, steps: int | None, eps: float | None) -> float | None:
    """Validate the shared arguments; returns eps (None stays None: the grid decides it)."""
    check_sde(sde)
    check_all_finite("x_T", check_tensor("x_T", x_T, 1))  # one sync per call, at entry: a NaN start is named here
    if steps is not None:
        check_int("steps", steps, 1)
    return None if eps is None else check_open_interval("eps", eps, 0.0, sde.T)


def times(t: float, x: Tensor) -> Tensor:
    """A (B,) time tensor on x's device and dtype: one element viewed B times, so score models
    compute time-only terms once per call (see ``sde._checks.shared_time``)."""
    return x.new_full((1,), t).expand(x.shape[0])


def denoise_step(sde: SDE, score_fn: ScoreFn, x: Tensor, t: float) -> Tensor:
    """The optional final step: one score call and Tweedie's formula at the end time."""
    tt = times(t, x)
    return tweedie(sde, x, tt, score_fn(x, tt))


def emit(callback: Callback | None, i: int, t: Tensor, x: Tensor, x0_hat: Tensor | Callable[[], Tensor]) -> None:
    """Call ``callback`` with the step's info; ``x0_hat`` may be a thunk, built only if needed."""
    if callback is not None:
        check_callable("callback", callback, "callback(info: dict)")
        callback({"i": i, "t": t, "x": x, "x0_hat": x0_hat() if callable(x0_hat) else x0_hat})


def steps_iter(n: int, progress: bool, name: str) -> Iterable[int]:
    """range(n), wrapped in a tqdm bar when ``progress`` is true."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=name, leave=False)


def check_finite(x: Tensor, name: str, options: dict[str, Any]) -> Tensor:
    """The one finiteness check, at the end: raises FloatingPointError naming the settings."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"sampler {name!r} produced {bad} non-finite values with options {options}; "
            "try more steps, a larger eps, float64, or check the score function"
        )
    return x


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sigma_karras(sde: SDE, t: Tensor) -> Tensor:
    """EDM noise level of the scaled variable x / alpha: sigma / alpha = exp(-log_snr / 2)."""
    return torch.exp(-0.5 * sde.log_snr(t))


def t_of_sigma_karras(sde: SDE, s: float, like: Tensor) -> float:
    """Inverse of ``sigma_karras`` for one Python float (entry point / grid use only)."""
    lam = torch.tensor(-2.0 * math.log(s), dtype=torch.float64)
    return min(float(sde.t_from_log_snr(lam)), sde.T)


__all__ = ["SampleResult", "CountedScore", "Callback"]
