"""SDEdit (Meng et al. 2022): edit a guide image by diffusing it to t0 and denoising it back.

``sdedit`` draws x_t0 ~ N(alpha(t0) guide, sigma(t0)^2 I) and runs ANY registered sampler from t0
to eps. The samplers integrate from their SDE's T, so instead of changing them the reverse run
uses ``TimeWindow(sde, t0)``: the same process on [0, t0] with time rescaled to [0, 1]
(u = t / t0: drift t0 f(x, u t0), diffusion sqrt(t0) g(u t0), alpha(u t0), sigma(u t0)), and the
score read at t = u t0. Its reverse SDE and PF-ODE are exactly those of ``sde`` on [eps, t0], so
every sampler, grid and solver works unchanged. t0 trades realism (large t0: the law of the
output tends to the unconditional one) against faithfulness (t0 -> 0: the output is the guide).
With ``mask`` the pixels where mask == 1 are kept: their part of the score is the replacement
score of the noised guide (``sde.inverse.replacement_score``) and the result is projected.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._checks import check_tensor
from .inverse import inpainting_constraint, project, replacement_score
from .samplers import default_eps
from .sdes import SDE, ScoreFn

__all__ = ["TimeWindow", "sdedit"]


class TimeWindow(SDE):
    """The forward SDE ``sde`` restricted to [0, t0], with time u = t / t0 in [0, 1].

    Args:
        sde: the SDE to restrict.
        t0: the end of the window, in (0, sde.T].
    """

    T = 1.0

    def __init__(self, sde: SDE, t0: float) -> None:
        super().__init__(max(1, round(sde.N * t0 / sde.T)))
        self.base, self.t0 = sde, float(t0)

    def _u(self, u: float | Tensor) -> float | Tensor:
        return u * self.t0

    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.t0 * self.base.drift(x, self._u(t))

    def diffusion(self, t: float | Tensor) -> Tensor:
        return math.sqrt(self.t0) * self.base.diffusion(self._u(t))

    def alpha(self, t: float | Tensor) -> Tensor:
        return self.base.alpha(self._u(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        return self.base.sigma(self._u(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return (self.base.t_from_log_snr(log_snr) / self.t0).clamp(0.0, 1.0)

    @property
    def prior_std(self) -> float:
        """Std of the marginal at t0 for data of unit scale: sqrt(alpha(t0)^2 + sigma(t0)^2)."""
        t = torch.tensor([self.t0], dtype=torch.float64)
        return float(torch.sqrt(self.base.alpha(t) ** 2 + self.base.sigma(t) ** 2))

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        dt = self.T / self.N if dt is None else dt
        return self.base.discretize(x, self._u(t), dt * self.t0)

    def window_score(self, score_fn: ScoreFn) -> ScoreFn:
        """``score_fn`` read in window time: s_window(x, u) = score_fn(x, u t0)."""
        return lambda x, u: score_fn(x, u * self.t0)

    def __repr__(self) -> str:
        return f"TimeWindow({self.base!r}, t0={self.t0})"


def _check_guide(guide: Tensor, data_range: tuple[float, float] | None) -> None:
    check_tensor("guide", guide, 2)
    if not bool(torch.isfinite(guide).all()):
        raise ValueError("guide holds non-finite values")
    if data_range is not None:
        low, high = data_range
        lo, hi = float(guide.min()), float(guide.max())
        if lo < low or hi > high:
            raise ValueError(f"guide values lie in [{lo:.4g}, {hi:.4g}], outside data_range=({low}, {high}); "
                             f"scale the guide to the data range (or pass data_range=None)")


def sdedit(
    score_fn: ScoreFn,
    sde: SDE,
    guide: Tensor,
    t0: float,
    *,
    mask: Tensor | None = None,
    sampler: str = "euler_maruyama",
    data_range: tuple[float, float] | None = (-1.0, 1.0),
    eps: float | None = None,
    generator: torch.Generator | None = None,
    **sampler_options: Any,
):
    """SDEdit (Meng et al. 2022, Alg. 1): perturb ``guide`` to t0, then sample back with any sampler.

    Args:
        score_fn: unconditional score ``(x, t)`` of ``sde``.
        sde: the forward SDE.
        guide: (B, ...) images to edit (a stroke painting, a corrupted image), in ``data_range``.
        t0: edit strength in (0, T]: the time the guide is diffused to (must exceed eps).
        mask: optional 0/1 tensor broadcastable to guide (1 = keep this pixel of the guide).
        sampler: any name in ``sde.samplers.SAMPLERS``; it runs on ``TimeWindow(sde, t0)``.
        data_range: (low, high) the guide must lie in; None skips the check.
        eps: end time in the original time (default 1e-3; 1e-5 for VE).
        generator: drives the perturbation and the sampler's noise.
        **sampler_options: the sampler's options; ``steps`` counts steps on [eps, t0] (default
            round(sde.N t0 / T)).

    Returns:
        The sampler's SampleResult (x shaped like guide; with a mask the kept pixels equal the guide).

    Raises:
        ValueError / TypeError: t0 outside (0, T] or not above eps, a guide outside data_range or
            not a float tensor, a mask not matching the guide, or the sampler's own checks.
    """
    from .samplers import sample  # imported here: the sampler registry imports nothing from us

    eps = default_eps(sde) if eps is None else eps
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not (0.0 < t0 <= sde.T):
        raise ValueError(f"t0 must lie in (0, {sde.T}] (the SDE's T), got {t0!r}")
    if not 0.0 < eps < t0:
        raise ValueError(f"t0={t0!r} must exceed the end time eps={eps!r} (or pass a smaller eps)")
    _check_guide(guide, data_range)
    window = TimeWindow(sde, t0)
    score = score_fn
    constraint = None
    if mask is not None:
        constraint = inpainting_constraint(guide, mask)
        score = replacement_score(score_fn, sde, constraint)
    x_t0, _ = sde.perturb(guide, float(t0), generator=generator)
    result = sample(window.window_score(score), window, x_t0, sampler=sampler, generator=generator,
                    eps=eps / t0, **sampler_options)
    if constraint is not None:
        result.x = project(result.x, constraint)
    result.options = {**result.options, "t0": float(t0), "eps": eps, "masked": mask is not None}
    return result
