"""Forward SDEs of Song et al. 2021, "Score-Based Generative Modeling through SDEs".

Each SDE ``dx = f(x, t) dt + g(t) dw`` has a Gaussian perturbation kernel
``p_0t(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``. ``alpha``, ``sigma`` and ``log_snr``
(= 2 log(alpha / sigma)) are closed form, and so is the inverse of ``log_snr``; the fast
solvers (DDIM, DPM-Solver) work in that log-SNR time.

Deviations from score_sde_pytorch, on purpose (docs/math.md):
- VE: the marginal std is the exact ``sqrt(sigma_min^2 (r^2t - 1))``, r = sigma_max/sigma_min,
  of the SDE started at x_0 (the reference uses ``sigma_min r^t``, i.e. assumes x_0
  already carries sigma_min noise).
- VP cosine: the cosine schedule of Nichol & Dhariwal 2021 with t in [0, 1] mapped onto
  [0, 0.9946] of their time, so beta(T) stays finite (as in DPM-Solver).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import (
    as_time,
    bcast,
    check_callable,
    check_choice,
    check_int,
    check_open_interval,
    check_positive,
    check_tensor,
)
from .flow import reverse_term

ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "FlowSDE", "InterpolantSDE", "ReverseSDE", "ScoreFn",
    "VPSchedule", "LinearSchedule", "CosineSchedule", "VP_SCHEDULES", "DiscreteVPSDE", "ddpm_betas", "BETA_SCHEDULES",
]


class SDE(abc.ABC):
    """A forward SDE with a Gaussian perturbation kernel.

    Subclasses implement ``drift``, ``diffusion``, ``alpha``, ``sigma``, ``t_from_log_snr``
    and ``prior_std``; everything else follows from those.
    """

    T: float = 1.0  # end time of the forward process
    N: int = 1000  # default number of discretization steps (DDPM / SMLD)

    def __init__(self, N: int = 1000) -> None:
        self.N = check_int("N", N, 1)

    # -- to be implemented -------------------------------------------------------------
    @abc.abstractmethod
    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        """f(x, t), shaped like x."""

    @abc.abstractmethod
    def diffusion(self, t: float | Tensor) -> Tensor:
        """g(t), shape (B,)."""

    @abc.abstractmethod
    def alpha(self, t: float | Tensor) -> Tensor:
        """Mean scale of the perturbation kernel: E[x_t | x_0] = alpha(t) x_0."""

    @abc.abstractmethod
    def sigma(self, t: float | Tensor) -> Tensor:
        """Std of the perturbation kernel."""

    @abc.abstractmethod
    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        """Inverse of ``log_snr``: the time at which 2 log(alpha/sigma) equals ``log_snr``."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Std of the Gaussian prior p_T used for sampling and likelihoods."""

    # -- derived -----------------------------------------------------------------------
    def log_snr(self, t: float | Tensor) -> Tensor:
        """lambda(t) = 2 log(alpha(t) / sigma(t)), decreasing in t."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def drift_coef(self, t: float | Tensor) -> Tensor:
        """f(t) of the linear drift f(x, t) = f(t) x (every SDE with a Gaussian kernel has one), shape (B,).

        It is d/dt log alpha(t). Subclasses override this generic evaluation with their closed form.
        """
        t = self._t(t)
        return self.drift(torch.ones(t.shape[0], 1, dtype=t.dtype, device=t.device), t)[:, 0]

    def marginal_prob(self, x0: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """Mean (like x0) and std (B,) of p_0t(x_t | x_0).

        Raises:
            ValueError: t has the wrong shape or lies outside [0, T].
        """
        t = as_time(t, check_tensor("x0", x0), self.T)
        return bcast(self.alpha(t), x0) * x0, self.sigma(t)

    def perturb(
        self, x0: Tensor, t: float | Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw x_t ~ p_0t(. | x0); returns (x_t, the standard normal noise used)."""
        mean, std = self.marginal_prob(x0, t)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return mean + bcast(std, x0) * noise, noise

    def prior_sampling(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw from the prior N(0, prior_std^2 I); ``shape`` is batch-first, every size >= 1."""
        dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else ()
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"shape must be a non-empty tuple of ints >= 1 (batch first), got {shape!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * self.prior_std

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) summed over all but the batch dim, shape (B,)."""
        d = z[0].numel()
        s2 = self.prior_std**2
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * sq / s2

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        """One step of the discrete forward chain: x_{i+1} = x_i + f_i + G_i z.

        The default is Euler-Maruyama: f_i = f(x, t) dt, G_i = g(t) sqrt(dt).
        ``dt`` defaults to T / N; it must be > 0 (the chain steps forward).
        """
        dt = self.T / self.N if dt is None else check_positive("dt", dt)
        t = as_time(t, x, self.T)
        return self.drift(x, t) * dt, self.diffusion(t) * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (Anderson 1982), or the probability-flow ODE if asked."""
        return ReverseSDE(self, score_fn, probability_flow)

    # -- helpers for subclasses --------------------------------------------------------
    def _t(self, t: float | Tensor, like: Tensor | None = None) -> Tensor:
        if isinstance(t, Tensor):
            return t if like is None else as_time(t, like, self.T)
        ref = like if like is not None else torch.empty(1, dtype=torch.get_default_dtype())
        return as_time(t, ref, self.T, batch=ref.shape[0] if like is not None else 1)


class ReverseSDE:
    """Reverse-time SDE ``dx = [f - g^2 score] dt + g dw_bar`` (or the PF-ODE, half the score
    term and no noise), built on ``sde.flow``. Time still runs from T down to 0; a step of size
    dt > 0 moves x from t to t - dt as ``x - drift * dt + diffusion * sqrt(dt) z``.

    The predictors of the ``pc`` sampler take their drift and diffusion from this object. Its
    methods take an optional ``score``: the score at (x, t) when the caller has already spent
    the evaluation (the predictor-corrector loop shares one call between predictor and callback).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)``.
        probability_flow: the probability-flow ODE instead of the reverse SDE.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        self.sde = sde
        self.score_fn = check_callable("score_fn", score_fn, "score_fn(x, t) -> Tensor shaped like x")
        self.probability_flow = probability_flow
        self.T = sde.T

    def _score(self, x: Tensor, t: Tensor, score: Tensor | None) -> Tensor:
        return self.score_fn(x, t) if score is None else score

    def drift(self, x: Tensor, t: float | Tensor, score: Tensor | None = None) -> Tensor:
        """f(x, t) - g(t)^2 score (halved for the PF-ODE), shaped like x."""
        t = as_time(t, x, self.T)
        return reverse_term(self.sde.drift(x, t), self.sde.diffusion(t), x, self._score(x, t, score),
                            probability_flow=self.probability_flow)

    def diffusion(self, t: float | Tensor) -> Tensor:
        """g(t), shape (B,); zero for the PF-ODE."""
        g = self.sde.diffusion(t)
        return torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None,
                   score: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reverse of the forward chain's step (Song et al. 2021, eq. 46): (f_i - G_i^2 score, G_i)."""
        t = as_time(t, x, self.T)
        f, G = self.sde.discretize(x, t, dt)
        rev_f = reverse_term(f, G, x, self._score(x, t, score), probability_flow=self.probability_flow)
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class VPSchedule(abc.ABC):
    """A noise schedule of the VP family: beta(t) and log alpha(t) = -1/2 int_0^t beta, with the inverse.

    ``VPSDE`` and ``SubVPSDE`` take everything time-dependent from one of these objects
    (``VP_SCHEDULES``); a tabulated discrete (DDPM) schedule is one more subclass.
    """

    @abc.abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = -d/dt log alpha(t)^2."""

    @abc.abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t) = -1/2 int_0^t beta(s) ds."""

    @abc.abstractmethod
    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        """Inverse of ``log_alpha``."""


class LinearSchedule(VPSchedule):
    """beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021; DDPM's linear betas in the limit).

    Raises:
        ValueError: not beta_min < beta_max.
    """

    def __init__(self, beta_min: float, beta_max: float) -> None:
        if not beta_min < beta_max:
            raise ValueError(f"beta_min must be < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # Root of 1/4 (bmax - bmin) t^2 + 1/2 bmin t + log_alpha = 0, in the form that
        # does not cancel when beta_max - beta_min is small.
        c = -2.0 * log_alpha
        return 2.0 * c / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * (self.beta_max - self.beta_min) * c))


class CosineSchedule(VPSchedule):
    """alpha(t)^2 = f(t) / f(0), f(t) = cos((t t_max + s) / (1 + s) pi / 2)^2 (Nichol & Dhariwal 2021).

    t in [0, 1] is mapped onto [0, t_max] of their time so beta(T) stays finite (as in
    DPM-Solver). beta_min / beta_max are not used.
    """

    S = 0.008  # offset of the cosine schedule (Nichol & Dhariwal 2021)
    T_MAX = 0.9946  # cosine time reached at t = T, keeps beta(T) finite

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self._cos_f0 = math.cos(self.S / (1 + self.S) * math.pi / 2) ** 2

    def _angle(self, t: Tensor) -> Tensor:
        return (t * self.T_MAX + self.S) / (1 + self.S) * (math.pi / 2)

    def beta(self, t: Tensor) -> Tensor:
        return self.T_MAX * math.pi / (1 + self.S) * torch.tan(self._angle(t))

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log(torch.cos(self._angle(t))) - 0.5 * math.log(self._cos_f0)

    def t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        cos = torch.exp(log_alpha + 0.5 * math.log(self._cos_f0))
        return (torch.arccos(cos) * (2 * (1 + self.S) / math.pi) - self.S) / self.T_MAX


# name -> schedule class, built as cls(beta_min, beta_max)
VP_SCHEDULES: dict[str, type[VPSchedule]] = {"linear": LinearSchedule, "cosine": CosineSchedule}


class _ScheduledSDE(SDE):
    """The VP family: drift -beta(t)/2 x and alpha(t) from a ``VPSchedule``; the prior is N(0, I).

    Subclasses choose sigma(t) (and with it g(t) and the log-SNR).
    """

    def __init__(self, beta_min: float, beta_max: float, schedule: str, N: int) -> None:
        super().__init__(N)
        self.schedule = check_choice("schedule", schedule, VP_SCHEDULES)
        self.beta_min = check_positive("beta_min", beta_min)
        self.beta_max = check_positive("beta_max", beta_max)
        self._schedule = VP_SCHEDULES[schedule](self.beta_min, self.beta_max)

    def beta(self, t: float | Tensor) -> Tensor:
        """beta(t) = -d/dt log alpha(t)^2."""
        return self._schedule.beta(self._t(t))

    def log_alpha(self, t: float | Tensor) -> Tensor:
        """log alpha(t) = -1/2 int_0^t beta(s) ds."""
        return self._schedule.log_alpha(self._t(t))

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        return self._schedule.t_from_log_alpha(log_alpha)

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0

    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        t = as_time(t, x, self.T)
        return -0.5 * bcast(self.beta(t), x) * x


class VPSDE(_ScheduledSDE):
    """Variance-preserving SDE: dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (DDPM in the limit).

    Args:
        beta_min: beta(0) of the linear schedule.
        beta_max: beta(1) of the linear schedule.
        schedule: a name in ``VP_SCHEDULES``: "linear" (Song et al. 2021) or "cosine"
            (Nichol & Dhariwal 2021).
        N: number of steps of the discrete DDPM chain used by ``discretize``.

    Raises:
        ValueError: unknown schedule, or not 0 < beta_min < beta_max.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, schedule: str = "linear", N: int = 1000) -> None:
        super().__init__(beta_min, beta_max, schedule, N)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(beta_min={self.beta_min}, beta_max={self.beta_max}, schedule={self.schedule!r}, N={self.N})"

    def sigma(self, t: float | Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def log_snr(self, t: float | Tensor) -> Tensor:
        la2 = 2.0 * self.log_alpha(t)
        return la2 - torch.log(-torch.expm1(la2))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # alpha^2 = sigmoid(lambda)  =>  log alpha = -softplus(-lambda) / 2
        return self._t_from_log_alpha(-0.5 * torch.nn.functional.softplus(-log_snr))

    def diffusion(self, t: float | Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        """DDPM step (Ho et al. 2020): beta_i = beta(t) dt, f = (sqrt(1 - beta_i) - 1) x,
        G = sqrt(beta_i). With dt = 1/N at t_i = i/(N-1) this is DDPM's linear beta list."""
        dt = self.T / self.N if dt is None else check_positive("dt", dt)
        t = as_time(t, x, self.T)
        beta_i = self.beta(t) * dt
        return bcast(torch.sqrt(1.0 - beta_i) - 1.0, x) * x, torch.sqrt(beta_i)


class SubVPSDE(_ScheduledSDE):
    """Sub-VP SDE: dx = -beta/2 x dt + sqrt(beta (1 - e^{-2 int beta})) dw.

    Its marginal std is 1 - alpha^2, always below the VP one (Song et al. 2021, eq. 29);
    the prior is N(0, I). Linear schedule only. ``discretize`` is the Euler-Maruyama step
    of ``SDE`` (sub-VP has no classical discrete chain).

    Args:
        beta_min: beta(0) of the linear schedule.
        beta_max: beta(1) of the linear schedule.
        N: number of Euler-Maruyama steps used by ``discretize``.

    Raises:
        ValueError: not 0 < beta_min < beta_max.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000) -> None:
        super().__init__(beta_min, beta_max, "linear", N)

    def __repr__(self) -> str:
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N})"

    def sigma(self, t: float | Tensor) -> Tensor:
        return -torch.expm1(2.0 * self.log_alpha(t))

    def log_snr(self, t: float | Tensor) -> Tensor:
        la2 = 2.0 * self.log_alpha(t)
        return la2 - 2.0 * torch.log(-torch.expm1(la2))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        # u = alpha^2 solves e^lam (1 - u)^2 = u; the root in (0, 1), without cancellation:
        e = torch.exp(log_snr)
        u = 2.0 * e / (2.0 * e + 1.0 + torch.sqrt(4.0 * e + 1.0))
        return self._t_from_log_alpha(0.5 * torch.log(u))

    def diffusion(self, t: float | Tensor) -> Tensor:
        discount = -torch.expm1(4.0 * self.log_alpha(t))  # 1 - exp(-2 int_0^t beta)
        return torch.sqrt(self.beta(t) * discount)


class InterpolantSDE(SDE):
    """The SDE of an affine interpolant x_t = alpha(t) x_0 + sigma(t) eps (flow matching's Gaussian paths).

    Given differentiable alpha(t) (decreasing from 1) and sigma(t) (increasing from 0), the
    forward SDE with these marginals has the linear drift f(t) = alpha'(t) / alpha(t) and
    g(t)^2 = d sigma^2 / dt - 2 f sigma^2 = -sigma^2 d log_snr / dt (docs/math.md). Subclasses
    give ``alpha``, ``sigma``, their derivatives ``d_alpha`` / ``d_sigma`` and ``t_from_log_snr``;
    the prior is N(0, I).
    """

    @abc.abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t)."""

    @abc.abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor:
        """sigma'(t)."""

    @property
    def prior_std(self) -> float:
        return 1.0

    def drift_coef(self, t: float | Tensor) -> Tensor:
        t = self._t(t)
        return self.d_alpha(t) / self.alpha(t)

    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        t = as_time(t, x, self.T)
        return bcast(self.drift_coef(t), x) * x

    def diffusion(self, t: float | Tensor) -> Tensor:
        t = self._t(t)
        s = self.sigma(t)
        return torch.sqrt(2.0 * s * (self.d_sigma(t) - self.drift_coef(t) * s))

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        """The exact Gaussian transition from t - dt to t: f = (alpha_t / alpha_s - 1) x,
        G = sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2), s = max(t - dt, 0); ``dt`` defaults to T / N.
        Unlike Euler-Maruyama it stays accurate where g(t)^2 is large (near alpha = 0)."""
        dt = self.T / self.N if dt is None else dt
        t = as_time(t, x, self.T)
        s = torch.clamp(t - dt, min=0.0)
        ratio = self.alpha(t) / self.alpha(s)
        var = self.sigma(t) ** 2 - (ratio * self.sigma(s)) ** 2
        return bcast(ratio - 1.0, x) * x, torch.sqrt(torch.clamp(var, min=0.0))


class FlowSDE(InterpolantSDE):
    """Flow matching / rectified flow as an SDE: x_t = (1 - t) x_0 + t eps (Lipman et al. 2023, Liu et al. 2023).

    alpha(t) = 1 - t, sigma(t) = t, so f(t) = -1 / (1 - t), g(t)^2 = 2 t / (1 - t),
    log_snr(t) = 2 log((1 - t) / t) and t = sigmoid(-log_snr / 2). The PF-ODE velocity is the
    flow-matching velocity E[eps - x_0 | x_t] (docs/math.md).

    End point: alpha(1) = 0 makes f and g infinite at t = 1, so the process stops at
    ``T = 1 - 1e-2`` by default (alpha(T) = 0.01, log_snr(T) = -9.19, close to the linear
    VP's -10.0 at its T = 1), where every sampler's drift is finite; the prior is N(0, I)
    as for VP, whose p_T differs from it by the same order (alpha(T) x_0 mean, sigma(T) = T std).

    Args:
        T: end time, in (0, 1).
        N: number of steps of the discrete chain used by ``discretize``.

    Raises:
        ValueError: T not in (0, 1).
    """

    def __init__(self, T: float = 0.99, N: int = 1000) -> None:
        super().__init__(N)
        self.T = check_open_interval("T", T, 0.0, 1.0)

    def __repr__(self) -> str:
        return f"FlowSDE(T={self.T}, N={self.N})"

    def alpha(self, t: float | Tensor) -> Tensor:
        return 1.0 - self._t(t)

    def sigma(self, t: float | Tensor) -> Tensor:
        return self._t(t).clone()

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return -1.0 / (1.0 - self._t(t))

    def diffusion(self, t: float | Tensor) -> Tensor:
        t = self._t(t)
        return torch.sqrt(2.0 * t / (1.0 - t))

    def log_snr(self, t: float | Tensor) -> Tensor:
        t = self._t(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        return torch.sigmoid(-0.5 * log_snr)


class VESDE(SDE):
    """Variance-exploding SDE: dx = sqrt(d sigma_ve(t)^2 / dt) dw, sigma_ve(t) = sigma_min r^t,
    r = sigma_max / sigma_min (SMLD / NCSN in the limit).

    Args:
        sigma_min: noise scale at t = 0.
        sigma_max: noise scale at t = T; the prior is N(0, sigma_max^2 I).
        N: number of noise levels of the discrete SMLD chain used by ``discretize``.

    Raises:
        ValueError: not 0 < sigma_min < sigma_max.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000) -> None:
        super().__init__(N)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self._log_ratio = math.log(sigma_max / sigma_min)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"

    def noise_scale(self, t: float | Tensor) -> Tensor:
        """sigma_ve(t) = sigma_min (sigma_max / sigma_min)^t: the SMLD noise level."""
        return self.sigma_min * torch.exp(self._t(t) * self._log_ratio)

    def alpha(self, t: float | Tensor) -> Tensor:
        return torch.ones_like(self._t(t))

    def sigma(self, t: float | Tensor) -> Tensor:
        # Var = sigma_ve(t)^2 - sigma_ve(0)^2 = sigma_min^2 expm1(2 t log r)
        return self.sigma_min * torch.sqrt(torch.expm1(2.0 * self._t(t) * self._log_ratio))

    def log_snr(self, t: float | Tensor) -> Tensor:
        return -2.0 * torch.log(self.sigma(t))

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        var = torch.exp(-log_snr)
        return 0.5 * torch.log1p(var / self.sigma_min**2) / self._log_ratio

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def drift(self, x: Tensor, t: float | Tensor) -> Tensor:
        as_time(t, x, self.T)
        return torch.zeros_like(x)

    def drift_coef(self, t: float | Tensor) -> Tensor:
        return torch.zeros_like(self._t(t))

    def diffusion(self, t: float | Tensor) -> Tensor:
        return self.noise_scale(t) * math.sqrt(2.0 * self._log_ratio)

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        """SMLD step (Song & Ermon 2019): G = sqrt(var(t) - var(t - dt)), f = 0. With
        dt = 1/(N-1) at t_i = i/(N-1) this is the geometric sigma list of NCSN."""
        dt = self.T / self.N if dt is None else check_positive("dt", dt)
        t = as_time(t, x, self.T)
        var_now = self.sigma(t) ** 2
        var_prev = self.sigma(torch.clamp(t - dt, min=0.0)) ** 2
        return torch.zeros_like(x), torch.sqrt(var_now - var_prev)


# -- discrete DDPM schedules (diffusers' beta_schedule names) --------------------------------------
def _linear_betas(n: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def _scaled_linear_betas(n: int, beta_start: float, beta_end: float) -> Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def _cosine_betas(n: int, beta_start: float, beta_end: float) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: 1 - abar(t_{i+1}) / abar(t_i), capped at 0.999."""
    s = torch.arange(n + 1, dtype=torch.float64) / n
    abar = torch.cos((s + 0.008) / 1.008 * (math.pi / 2)) ** 2
    return torch.clamp(1.0 - abar[1:] / abar[:-1], max=0.999)


def _sigmoid_betas(n: int, beta_start: float, beta_end: float) -> Tensor:
    """GeoDiff (Xu et al. 2022): beta_start + (beta_end - beta_start) sigmoid(linspace(-6, 6))."""
    return beta_start + (beta_end - beta_start) * torch.sigmoid(torch.linspace(-6.0, 6.0, n, dtype=torch.float64))


# name -> (N, beta_start, beta_end) -> betas (N,) float64; the names are diffusers' ``beta_schedule``
BETA_SCHEDULES: dict[str, Callable[[int, float, float], Tensor]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "squaredcos_cap_v2": _cosine_betas,
    "sigmoid": _sigmoid_betas,
}


def ddpm_betas(schedule: str = "linear", N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The beta list of a discrete DDPM schedule, in float64.

    Args:
        schedule: "linear" (Ho et al. 2020), "scaled_linear" (latent diffusion: linear in sqrt(beta)),
            "squaredcos_cap_v2" (Nichol & Dhariwal 2021 cosine, betas capped at 0.999) or "sigmoid" (GeoDiff).
        N: number of diffusion steps.
        beta_start: first beta (unused by "squaredcos_cap_v2").
        beta_end: last beta (unused by "squaredcos_cap_v2").

    Returns:
        betas, shape (N,), float64.

    Raises:
        ValueError: unknown schedule, N < 2, or not 0 < beta_start < beta_end < 1.
    """
    check_choice("schedule", schedule, BETA_SCHEDULES)
    check_int("N", N, 2)
    check_positive("beta_start", beta_start)
    check_positive("beta_end", beta_end)
    if not beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    return BETA_SCHEDULES[schedule](N, beta_start, beta_end)


class DiscreteVPSDE(SDE):
    """The VP SDE of a discrete DDPM schedule (as DPM-Solver's ``NoiseScheduleVP("discrete")``).

    The tabulated ``alphas_cumprod[n]`` is the marginal alpha(t_n)^2 at t_n = (n + 1) / N, and
    log alpha(t) is piecewise linear between those points, with the extra node log alpha(0) = 0
    (DPM-Solver extrapolates below t_0 = 1/N instead; the node keeps alpha <= 1 on all of [0, T]).
    Hence beta(t) = -2 d log alpha / dt is piecewise constant, -N log(1 - beta_n) on
    (n/N, (n+1)/N], and drift -beta/2 x, diffusion sqrt(beta) make the kernel exactly
    N(alpha(t) x0, (1 - alpha(t)^2) I). ``discretize`` is the exact transition of that kernel,
    which on the tabulated points is the DDPM chain x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) z.
    The linear schedule 1e-4..0.02 over N = 1000 is VPSDE(0.1, 20) up to O(1/N) (docs/pretrained.md).

    Args:
        betas: (N,) the DDPM betas, each in (0, 1), N >= 2 (see ``ddpm_betas``); or use
            ``DiscreteVPSDE.from_alphas_cumprod``.

    Raises:
        ValueError: betas not 1-D, fewer than 2, not finite, or outside (0, 1).
    """

    def __init__(self, betas: Tensor | list[float]) -> None:
        b = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if b.dim() != 1 or b.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(b.shape)}")
        if not bool(torch.isfinite(b).all()) or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError(f"betas must be finite and lie in (0, 1), got values in [{b.min():.4g}, {b.max():.4g}]")
        super().__init__(b.numel())
        self.betas = b
        log_a = 0.5 * torch.cumsum(torch.log1p(-b), 0)
        self._log_alpha_nodes = torch.cat([torch.zeros(1, dtype=torch.float64), log_a])  # at k/N, k = 0..N
        self._beta_segments = -float(self.N) * torch.log1p(-b)  # beta(t) on (k/N, (k+1)/N]
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, dtype) -> (nodes, beta) copies

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor | list[float]) -> DiscreteVPSDE:
        """Build from a tabulated alphas_cumprod (N,) (decreasing, in (0, 1)), e.g. a diffusers scheduler's.

        Args:
            alphas_cumprod: (N,) the cumulative products of 1 - beta_n; betas are recovered as 1 - ac_n / ac_{n-1}.

        Returns:
            The DiscreteVPSDE of that table.

        Raises:
            ValueError: not 1-D, not strictly decreasing inside (0, 1) (zero terminal SNR is not supported:
                the prior would not be N(0, I) at a finite log-SNR).
        """
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.dim() != 1 or ac.numel() < 2 or not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D sequence (N >= 2) in the open interval (0, 1) (a zero "
                             "terminal SNR, alphas_cumprod[-1] = 0, is not supported); "
                             f"got shape {tuple(ac.shape)}, values in [{ac.min():.4g}, {ac.max():.4g}]")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        return cls(1.0 - ac / prev)

    @property
    def alphas_cumprod(self) -> Tensor:
        """alpha(t_n)^2 at t_n = (n + 1) / N, float64 (N,)."""
        return torch.exp(2.0 * self._log_alpha_nodes[1:])

    def __repr__(self) -> str:
        return f"DiscreteVPSDE(N={self.N}, betas=[{float(self.betas[0]):.4g} .. {float(self.betas[-1]):.4g}])"

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = (self._log_alpha_nodes.to(like.device, like.dtype),
                                 self._beta_segments.to(like.device, like.dtype))
        return self._tables[key]

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(k, frac): t N = k + frac, k in [0, N-1], t in (k/N, (k+1)/N]; a node (up to the rounding of t's
        dtype) belongs to the segment below it, the one a reverse-time step from it crosses first."""
        u = t * self.N
        tol = 4.0 * self.N * torch.finfo(t.dtype).eps
        k = torch.clamp(torch.ceil(u - tol) - 1.0, 0, self.N - 1)
        return k.long(), u - k

    def log_alpha(self, t: float | Tensor) -> Tensor:
        """log alpha(t), piecewise linear through (k/N, log sqrt(alphas_cumprod[k-1])), log alpha(0) = 0."""
        t = self._t(t)
        nodes, _ = self._table(t)
        k, frac = self._segment(t)
        return nodes[k] + frac * (nodes[k + 1] - nodes[k])

    def beta(self, t: float | Tensor) -> Tensor:
        """beta(t) = -2 d log alpha / dt, piecewise constant: -N log(1 - beta_n) on (n/N, (n+1)/N]."""
        t = self._t(t)
        _, beta = self._table(t)
        return beta[self._segment(t)[0]]

    # The VP marginals and dynamics in terms of log_alpha and beta: VPSDE's own methods, shared
    # (alpha = exp(log_alpha), sigma = sqrt(1 - alpha^2), drift -beta/2 x, diffusion sqrt(beta), prior N(0, I)).
    alpha, sigma, log_snr = VPSDE.alpha, VPSDE.sigma, VPSDE.log_snr
    drift, diffusion, prior_std = VPSDE.drift, VPSDE.diffusion, VPSDE.prior_std

    def t_from_log_snr(self, log_snr: Tensor) -> Tensor:
        la = -0.5 * torch.nn.functional.softplus(-log_snr)  # alpha^2 = sigmoid(lambda)
        nodes, _ = self._table(la)
        # nodes decrease in k: find k with nodes[k] >= la > nodes[k+1]; beyond the ends, extrapolate
        k = torch.clamp(torch.searchsorted(-nodes, -la.contiguous(), right=True) - 1, 0, self.N - 1)
        lo, hi = nodes[k], nodes[k + 1]
        return (k + (la - lo) / (hi - lo)) / self.N

    def discretize(self, x: Tensor, t: float | Tensor, dt: float | None = None) -> tuple[Tensor, Tensor]:
        """Exact transition from t - dt to t: beta_i = 1 - alpha(t)^2 / alpha(t - dt)^2,
        f = (sqrt(1 - beta_i) - 1) x, G = sqrt(beta_i); with dt = 1/N at t_n it is DDPM's step n."""
        dt = self.T / self.N if dt is None else dt
        t = as_time(t, x, self.T)
        beta_i = -torch.expm1(2.0 * (self.log_alpha(t) - self.log_alpha(torch.clamp(t - dt, min=0.0))))
        return bcast(torch.sqrt(1.0 - beta_i) - 1.0, x) * x, torch.sqrt(beta_i)
