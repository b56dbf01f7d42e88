"""Continuous-time denoising score matching with named training recipes (Song et al. 2021, eq. 7; Vincent 2011).

Every recipe is one estimator of

    L = int_{lambda(T)}^{lambda(eps)} w(lambda) e(lambda) d lambda,
    e(lambda) = E_{x0, z} || eps_hat(x_t, t) - z ||^2,   eps_hat = -sigma(t) s_theta(x_t, t),

the view of Kingma & Gao 2023 ("Understanding Diffusion Objectives as the ELBO with Simple Data
Augmentation"): a weighting w(lambda) over log-SNR lambda = log(alpha^2 / sigma^2) and a sampling
density p(lambda) of the training noise level. ``dsm_loss`` draws t through lambda ~ p, and
multiplies the eps-error by r(lambda) = w(lambda) / p(lambda); so w = p r. The recipes
(``WEIGHTINGS``, docs/recipes.md):

    name        p(lambda)                                  r = w / p                 reference
    sigma2      uniform t on [eps, T]                      1                         Song et al. 2021
    likelihood  uniform lambda on [lambda_T, lambda_eps]   Z / (T - eps)             Song et al. 2021b
    edm         N(lambda; -2 P_mean, (2 P_std)^2)          1 + e^-lambda / sd^2      Karras et al. 2022
    eps         sech(lambda / 2) / (2 pi)  (cosine)        1                         Ho 2020; Nichol & Dhariwal 2021
    v           sech(lambda / 2) / (2 pi)  (cosine)        1 + e^-lambda             Salimans & Ho 2022
    min_snr     uniform t                                  min(1, gamma e^-lambda)   Hang et al. 2023
    flow        uniform t                                  (g^2 / (2 sigma))^2       Lipman et al. 2023

(every density is truncated to [lambda(T), lambda(eps)]; Z = lambda(eps) - lambda(T).)

sigma2 is Song's lambda(t) = sigma^2: E_t sigma^2 || s + z / sigma ||^2 = E_t || sigma s + z ||^2.
likelihood is Song's lambda(t) = g(t)^2 ("Maximum Likelihood Training of Score-Based Diffusion
Models"), the score-matching part of the bound on -log p_0, importance-sampled: for every SDE with a
Gaussian kernel g^2 / sigma^2 = -d lambda / dt, so drawing t with density prop. to g^2 / sigma^2 is
drawing lambda uniformly, t = t_from_log_snr(l_eps + u (l_T - l_eps)), and the weight becomes the
constant Z / (T - eps): w(lambda) = 1 / (T - eps), the ELBO's flat weighting. Its expectation equals
the uniform-time g^2-weighted loss (unbiased), with far lower variance near t = eps.
edm is the x0-error || D - x0 ||^2 weighted by (sigma_k^2 + sd^2) / (sigma_k sd)^2 with
ln sigma_k ~ N(P_mean, P_std^2), sigma_k = sigma / alpha = e^{-lambda / 2}; since
|| D - x0 || = sigma_k || eps_hat - z ||, r = 1 + sigma_k^2 / sd^2. v is || v_hat - v ||^2 of
v = alpha z - sigma x0 on the variance-preserving scaling of x_t, = (1 + e^-lambda) || eps_hat - z ||^2.
min_snr is the eps-MSE times min(SNR, gamma) / SNR. flow is the flow-matching loss
|| v_hat - (alpha' x0 + sigma' z) ||^2 of the SDE's own interpolant, = (sigma' - sigma alpha' / alpha)^2
times the eps-error, and sigma' - sigma alpha' / alpha = g^2 / (2 sigma); for ``FlowSDE`` it is
|| v_hat - (z - x0) ||^2 = || eps_hat - z ||^2 / (1 - t)^2.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import (
    bcast,
    check_all_finite,
    check_callable,
    check_choice,
    check_int,
    check_open_interval,
    check_output_shape,
    check_positive,
    check_sde,
    check_tensor,
)
from .data import dequantize  # the dataset's dequantization (one home: sde/data.py)
from .sdes import SDE

__all__ = [
    "dsm_loss", "sample_time", "get_weighting", "dequantize", "dequantized", "REDUCTIONS", "WEIGHTINGS",
    "TIME_DENSITIES", "TIME_UNIFORMS", "Weighting", "TimeDensity",
]

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda v: v.mean(dim=1),  # mean over data dims
    "sum": lambda v: v.sum(dim=1),  # sum over data dims
}


def _log_snr_range(sde: SDE, eps: float, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """(lambda(eps), lambda(T)) in float64: the largest and the smallest training log-SNR."""
    ends = torch.tensor([eps, sde.T], device=device, dtype=torch.float64)
    l_eps, l_T = sde.log_snr(ends).unbind()
    return l_eps, l_T


def _t_of(sde: SDE, lam: Tensor, eps: float) -> Tensor:
    return sde.t_from_log_snr(lam).clamp(eps, sde.T)


# -- sampling densities p(lambda) --------------------------------------------------------------------
class TimeDensity(abc.ABC):
    """A density p(lambda) of the training log-SNR on [lambda(T), lambda(eps)], drawn by inverse CDF."""

    @abc.abstractmethod
    def sample(self, sde: SDE, u: Tensor, eps: float) -> Tensor:
        """Times t (float64, in [eps, T]) whose log-SNR has density p, from uniforms ``u`` in [0, 1)."""

    @abc.abstractmethod
    def pdf(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        """p(lambda) (float64) for lambda in [lambda(T), lambda(eps)]."""


class UniformTime(TimeDensity):
    """t ~ U(eps, T): p(lambda) = 1 / ((T - eps) |d lambda / dt|) = sigma^2 / ((T - eps) g^2) (the SDE's own)."""

    def sample(self, sde: SDE, u: Tensor, eps: float) -> Tensor:
        return eps + u * (sde.T - eps)

    def pdf(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        t = _t_of(sde, lam, eps)
        return sde.sigma(t) ** 2 / ((sde.T - eps) * sde.diffusion(t) ** 2)


class UniformLogSNR(TimeDensity):
    """lambda ~ U(lambda(T), lambda(eps)): t prop. to g^2 / sigma^2 (the likelihood weighting's importance sampling)."""

    def sample(self, sde: SDE, u: Tensor, eps: float) -> Tensor:
        l_eps, l_T = _log_snr_range(sde, eps, u.device)
        return _t_of(sde, l_eps + u * (l_T - l_eps), eps)

    def pdf(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        l_eps, l_T = _log_snr_range(sde, eps, lam.device)
        return torch.ones_like(lam) / (l_eps - l_T)


@dataclasses.dataclass(frozen=True)
class LogNormalSigma(TimeDensity):
    """ln sigma_k ~ N(p_mean, p_std^2), sigma_k = e^{-lambda / 2}: lambda ~ N(-2 p_mean, (2 p_std)^2), truncated."""

    p_mean: float = -1.2  # mean of ln sigma (Karras et al. 2022, P_mean)
    p_std: float = 1.2  # std of ln sigma (P_std)

    def _normal(self, sde: SDE, eps: float, device) -> tuple[float, float, Tensor, Tensor]:
        m, s = -2.0 * self.p_mean, 2.0 * self.p_std
        l_eps, l_T = _log_snr_range(sde, eps, device)
        return m, s, torch.special.ndtr((l_T - m) / s), torch.special.ndtr((l_eps - m) / s)

    def sample(self, sde: SDE, u: Tensor, eps: float) -> Tensor:
        m, s, lo, hi = self._normal(sde, eps, u.device)
        return _t_of(sde, m + s * torch.special.ndtri(lo + u * (hi - lo)), eps)

    def pdf(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        m, s, lo, hi = self._normal(sde, eps, lam.device)
        return torch.exp(-0.5 * ((lam - m) / s) ** 2) / (s * math.sqrt(2 * math.pi) * (hi - lo))


@dataclasses.dataclass(frozen=True)
class CosineLogSNR(TimeDensity):
    """p(lambda) = sech((lambda - shift) / 2) / (2 pi), the log-SNR density of the cosine schedule under uniform
    time (Nichol & Dhariwal 2021) moved by ``shift`` (Hoogeboom et al. 2023, "simple diffusion": shift =
    2 log(64 / resolution)), truncated: phi = arctan(e^{-(lambda - shift) / 2}) is uniform."""

    shift: float = 0.0  # log-SNR offset s: > 0 trains more at high SNR (little noise), < 0 at low SNR

    def _phi_range(self, sde: SDE, eps: float, device) -> tuple[Tensor, Tensor]:
        l_eps, l_T = _log_snr_range(sde, eps, device)
        return torch.atan(torch.exp(-0.5 * (l_eps - self.shift))), torch.atan(torch.exp(-0.5 * (l_T - self.shift)))

    def sample(self, sde: SDE, u: Tensor, eps: float) -> Tensor:
        lo, hi = self._phi_range(sde, eps, u.device)
        return _t_of(sde, self.shift - 2.0 * torch.log(torch.tan(lo + u * (hi - lo))), eps)

    def pdf(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        lo, hi = self._phi_range(sde, eps, lam.device)
        return 0.25 / (torch.cosh(0.5 * (lam - self.shift)) * (hi - lo))


TIME_DENSITIES: dict[str, type[TimeDensity]] = {
    "uniform_time": UniformTime, "uniform_log_snr": UniformLogSNR, "lognormal": LogNormalSigma, "cosine": CosineLogSNR,
}


def _iid_uniforms(batch: int, generator: torch.Generator | None, device) -> Tensor:
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float64)


def _low_discrepancy_uniforms(batch: int, generator: torch.Generator | None, device) -> Tensor:
    """u_i = (u_0 + i / B) mod 1 with one u_0 ~ U(0, 1) (Kingma et al. 2021, VDM, sec. 5.2): each u_i is
    still U(0, 1), so the loss stays unbiased, but the batch covers [0, 1) evenly, which lowers its variance."""
    u0 = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    return torch.remainder(u0 + torch.arange(batch, device=device, dtype=torch.float64) / batch, 1.0)


# how a batch's uniforms are drawn before the density's inverse CDF maps them to times (dsm_loss's time_sampling)
TIME_UNIFORMS: dict[str, Callable[[int, torch.Generator | None, torch.device | str | None], Tensor]] = {
    "iid": _iid_uniforms,  # independent uniforms (Song et al. 2021)
    "low_discrepancy": _low_discrepancy_uniforms,  # one shared random shift of an even grid (VDM)
}


# -- recipes: p(lambda) and the weight r(lambda) = w(lambda) / p(lambda) on the eps-error -----------------
@dataclasses.dataclass(frozen=True)
class Weighting(abc.ABC):
    """A training recipe: a sampling density p(lambda) and the weight r = w / p on || eps_hat - z ||^2."""

    @property
    @abc.abstractmethod
    def density(self) -> TimeDensity:
        """The sampling density p(lambda)."""

    @abc.abstractmethod
    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        """r(lambda(t)) = w / p at the float64 times ``t``, shape (B,)."""

    def weight(self, sde: SDE, lam: Tensor, eps: float) -> Tensor:
        """w(lambda) = p(lambda) r(lambda) (float64): the loss is int w(lambda) e(lambda) d lambda."""
        return self.density.pdf(sde, lam, eps) * self.ratio(sde, _t_of(sde, lam, eps), eps)

    def sample(
        self, sde: SDE, batch: int, *, eps: float, generator: torch.Generator | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, uniforms: str = "iid",
    ) -> tuple[Tensor, Tensor]:
        """Times t (B,) with log-SNR ~ p and the weights r (B,), computed in float64 and cast to ``dtype``;
        ``uniforms`` names the rule in ``TIME_UNIFORMS`` that draws the uniforms the inverse CDF maps."""
        u = TIME_UNIFORMS[uniforms](batch, generator, device)
        t = self.density.sample(sde, u, eps)
        return t.to(dtype), self.ratio(sde, t, eps).to(dtype)


@dataclasses.dataclass(frozen=True)
class _PlainEpsMSE(Weighting):
    """The eps-MSE itself (r = 1, w = p): the weighting is all in the noise density."""

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        return torch.ones_like(t)


@dataclasses.dataclass(frozen=True)
class Sigma2(_PlainEpsMSE):
    """lambda(t) = sigma^2 with t ~ U(eps, T) (Song et al. 2021): w = p = the SDE's own log-SNR density."""

    density = UniformTime()


@dataclasses.dataclass(frozen=True)
class Likelihood(Weighting):
    """lambda(t) = g^2 (Song et al. 2021b), importance-sampled: w = 1 / (T - eps), p uniform in lambda."""

    density = UniformLogSNR()

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        l_eps, l_T = _log_snr_range(sde, eps, t.device)
        return torch.full_like(t, float((l_eps - l_T) / (sde.T - eps)))


@dataclasses.dataclass(frozen=True)
class EDM(Weighting):
    """Karras et al. 2022: ln sigma_k ~ N(p_mean, p_std^2), x0-error weight (sigma_k^2 + sd^2) / (sigma_k sd)^2."""

    sigma_data: float = 0.5  # data std sd of the EDM weighting
    p_mean: float = -1.2  # mean of ln sigma_k
    p_std: float = 1.2  # std of ln sigma_k

    @property
    def density(self) -> TimeDensity:
        return LogNormalSigma(self.p_mean, self.p_std)

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        return 1.0 + torch.exp(-sde.log_snr(t)) / self.sigma_data**2


@dataclasses.dataclass(frozen=True)
class _ShiftedCosine(Weighting):
    """A recipe whose density is the cosine log-SNR density moved by ``shift`` (eps and v)."""

    shift: float = 0.0  # log-SNR shift of the cosine density (CosineLogSNR.shift; 0 = Nichol & Dhariwal's)

    @property
    def density(self) -> TimeDensity:
        return CosineLogSNR(self.shift)


@dataclasses.dataclass(frozen=True)
class EpsMSE(_PlainEpsMSE, _ShiftedCosine):
    """|| eps_hat - z ||^2 with the cosine schedule's log-SNR density (Ho et al. 2020; Nichol & Dhariwal 2021)."""


@dataclasses.dataclass(frozen=True)
class VPrediction(_ShiftedCosine):
    """|| v_hat - v ||^2, v = alpha z - sigma x0 (VP scaling), cosine density (Salimans & Ho 2022)."""

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        return 1.0 + torch.exp(-sde.log_snr(t))


@dataclasses.dataclass(frozen=True)
class MinSNR(Weighting):
    """Min-SNR-gamma (Hang et al. 2023): eps-MSE times min(SNR, gamma) / SNR, t ~ U(eps, T)."""

    gamma: float = 5.0  # SNR above which the weight is capped (the paper's gamma)
    density = UniformTime()

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        return torch.clamp(self.gamma * torch.exp(-sde.log_snr(t)), max=1.0)


@dataclasses.dataclass(frozen=True)
class FlowMatching(Weighting):
    """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023): || v_hat - (alpha' x0 + sigma' z) ||^2,
    t ~ U(eps, T); r = (g^2 / (2 sigma))^2."""

    density = UniformTime()

    def ratio(self, sde: SDE, t: Tensor, eps: float) -> Tensor:
        return (sde.diffusion(t) ** 2 / (2.0 * sde.sigma(t))) ** 2


# name -> the recipe with its published hyperparameters (docs/recipes.md)
WEIGHTINGS: dict[str, Weighting] = {
    "sigma2": Sigma2(), "likelihood": Likelihood(), "edm": EDM(), "eps": EpsMSE(), "v": VPrediction(),
    "min_snr": MinSNR(), "flow": FlowMatching(),
}


_SIGNED_PARAMETERS = {"p_mean", "shift"}  # recipe fields that may be zero or negative; every other one is > 0


def get_weighting(weighting: str | Weighting, **params: float) -> Weighting:
    """The recipe ``weighting`` (a name in ``WEIGHTINGS`` or a ``Weighting``), with hyperparameters replaced.

    Args:
        weighting: a key of ``WEIGHTINGS`` or a ``Weighting`` instance.
        **params: fields of the recipe to change, e.g. ``gamma=1.0`` for min_snr, ``p_mean`` for edm, ``shift``
            (the cosine density's log-SNR shift) for eps and v; ``p_mean`` and ``shift`` may be <= 0, the rest
            must be > 0.

    Returns:
        The recipe.

    Raises:
        ValueError: unknown name, or a parameter the recipe does not have / a non-positive one.
        TypeError: weighting is neither a string nor a Weighting.
    """
    if isinstance(weighting, str):
        weighting = WEIGHTINGS[check_choice("weighting", weighting, WEIGHTINGS)]
    if not isinstance(weighting, Weighting):
        raise TypeError(f"weighting must be a name in WEIGHTINGS or a Weighting, got {type(weighting).__name__}")
    if not params:
        return weighting
    fields = {f.name for f in dataclasses.fields(weighting)}
    for key, value in params.items():
        check_choice(f"parameter of weighting {type(weighting).__name__}", key, fields)
        if key not in _SIGNED_PARAMETERS:
            check_positive(key, value)
    return dataclasses.replace(weighting, **params)


def sample_time(
    sde: SDE,
    batch: int,
    *,
    weighting: str | Weighting = "sigma2",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    time_sampling: str = "iid",
) -> tuple[Tensor, Tensor]:
    """Training times t (B,) and weights r (B,) of a recipe: E_t[r(t) e(t)] = int w(lambda) e(lambda) d lambda.

    Args:
        sde: the forward SDE.
        batch: number of times.
        weighting: a recipe name in ``WEIGHTINGS`` or a ``Weighting``.
        eps: smallest time; t lies in [eps, T].
        generator: for the uniforms that the inverse CDF maps to t.
        device: device of the results.
        dtype: dtype of the results (computed in float64).
        time_sampling: "iid" (independent uniforms) or "low_discrepancy" (one random shift of the even
            grid i / B, Kingma et al. 2021): how the uniforms behind t are drawn (``TIME_UNIFORMS``).

    Returns:
        (t, r): the times and the weights on the eps-error || sigma s + z ||^2.

    Raises:
        ValueError: unknown weighting or time_sampling, or eps outside (0, T).
    """
    check_sde(sde)
    check_open_interval("eps", eps, 0.0, sde.T)
    check_int("batch", batch, 1)
    check_choice("time_sampling", time_sampling, TIME_UNIFORMS)
    return get_weighting(weighting).sample(sde, batch, eps=eps, generator=generator, device=device, dtype=dtype,
                                           uniforms=time_sampling)


def dsm_loss(
    model: Callable[..., Tensor],
    sde: SDE,
    x0: Tensor,
    *,
    weighting: str | Weighting = "sigma2",
    reduce: str = "mean",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    y: Tensor | None = None,
    time_sampling: str = "iid",
) -> Tensor:
    """Denoising score matching loss of ``model`` on the batch ``x0`` under a training recipe.

    The per-example loss is r(lambda) || sigma s_theta(x_t, t) + z ||^2 with t drawn from the
    recipe's density (module docstring, docs/recipes.md).

    Args:
        model: a score_fn ``model(x, t)`` (a ScoreModel, or any callable); called as
            ``model(x, t, y)`` when labels ``y`` are given.
        sde: the forward SDE.
        x0: clean data, batch first.
        weighting: the recipe, a name in ``WEIGHTINGS`` ("sigma2", "likelihood", "edm", "eps", "v",
            "min_snr", "flow") or a ``Weighting`` (``get_weighting(name, **params)``).
        reduce: "mean" or "sum" of the squared error over data dims; the batch is always averaged.
        eps: smallest training time (t in [eps, T]).
        generator: for t and the noise.
        y: class labels (B,) passed to the model.
        time_sampling: "iid" or "low_discrepancy" (``TIME_UNIFORMS``): independent times, or one random
            shift of an even grid over the batch (VDM, Kingma et al. 2021; unbiased, lower variance).

    Returns:
        The scalar loss.

    Raises:
        ValueError: unknown weighting / reduce / time_sampling, eps outside (0, T), NaN/inf in a CPU x0 (device tensors
            are not inspected: that would sync every step; the Trainer checks its data once), or a model
            output not shaped like x.
        TypeError: model not callable, sde not an SDE, x0 not a floating tensor, or weighting is not a
            name or a Weighting.
    """
    check_sde(sde)
    check_callable("model", model, "model(x, t) -> Tensor shaped like x")
    check_all_finite("x0", check_tensor("x0", x0, 2), sync=False)  # on CPU only: no per-step device sync
    check_choice("reduce", reduce, REDUCTIONS)
    check_open_interval("eps", eps, 0.0, sde.T)
    check_choice("time_sampling", time_sampling, TIME_UNIFORMS)
    recipe = get_weighting(weighting)
    t, w = recipe.sample(sde, x0.shape[0], eps=eps, generator=generator, device=x0.device, dtype=x0.dtype,
                         uniforms=time_sampling)
    x_t, z = sde.perturb(x0, t, generator=generator)
    score = check_output_shape("model", model(x_t, t) if y is None else model(x_t, t, y), x_t)
    err = REDUCTIONS[reduce]((bcast(sde.sigma(t), x0) * score + z).flatten(1) ** 2)  # || eps_hat - z ||^2
    return (w * err).mean()


def dequantized(loss_fn: Callable[..., Tensor], levels: int) -> Callable[..., Tensor]:
    """Wrap ``loss_fn(model, sde, x0, *, generator=None, **kw)`` to train on dequantized x0."""
    check_int("levels", levels, 2)

    def loss(model, sde, x0, *, generator=None, **kwargs):
        return loss_fn(model, sde, dequantize(x0, levels, generator=generator), generator=generator, **kwargs)

    return loss
