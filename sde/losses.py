"""Continuous-time denoising score matching (Song et al. 2021, eq. 7; Vincent 2011).

    L(theta) = E_t E_{x0} E_{z} [ lambda(t) || s_theta(alpha x0 + sigma z, t) + z / sigma ||^2 ]

with t ~ U(eps, T) and
- lambda(t) = sigma(t)^2 (default, Song et al. 2021): the loss is || sigma s + z ||^2;
- lambda(t) = g(t)^2 ("likelihood weighting", Song et al. 2021b, "Maximum Likelihood Training
  of Score-Based Diffusion Models"): the score-matching part of the bound on -log p_0.

Importance sampling for the likelihood weighting draws t with density q(t) proportional to
g(t)^2 / sigma(t)^2. For every SDE with a Gaussian kernel, g^2 / sigma^2 = -d log_snr / dt
(from alpha' = f alpha and (sigma^2)' = 2 f sigma^2 + g^2), so q is uniform in log-SNR: its
inverse CDF is closed form, t = t_from_log_snr(l_eps + u (l_T - l_eps)) with u ~ U(0, 1), and
the per-sample loss becomes Z / (T - eps) * || sigma s + z ||^2 with Z = l_eps - l_T. The
expectation equals the uniform-time likelihood-weighted loss exactly (unbiased), with far
lower variance near t = eps where g^2 / sigma^2 ~ 1 / t.
"""

from __future__ import annotations

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
    check_sde,
    check_tensor,
)
from .data import dequantize  # the dataset's dequantization (one home: sde/data.py)
from .sdes import SDE

__all__ = ["dsm_loss", "sample_time", "dequantize", "dequantized", "REDUCTIONS"]

REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda v: v.mean(dim=1),  # mean over data dims
    "sum": lambda v: v.sum(dim=1),  # sum over data dims
}


def sample_time(
    sde: SDE,
    batch: int,
    *,
    importance_sampling: bool = False,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Training times t (B,) and their importance weights w (B,), E_q[w f(t)] = E_U(eps,T)[f(t)].

    Uniform: w = 1. Importance sampling: t uniform in log-SNR (density g^2/sigma^2 / Z) and
    w = Z / ((T - eps) g^2/sigma^2), computed in float64.
    """
    check_int("batch", batch, 1)
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    if not importance_sampling:
        return (eps + u * (sde.T - eps)).to(dtype), torch.ones(batch, device=device, dtype=dtype)
    ends = torch.tensor([eps, sde.T], device=device, dtype=torch.float64)
    l_eps, l_T = sde.log_snr(ends).unbind()
    t = sde.t_from_log_snr(l_eps + u * (l_T - l_eps)).clamp(eps, sde.T)
    density = sde.diffusion(t) ** 2 / sde.sigma(t) ** 2  # g^2 / sigma^2 = -d log_snr / dt
    w = (l_eps - l_T) / ((sde.T - eps) * density)
    return t.to(dtype), w.to(dtype)


def dsm_loss(
    model: Callable[..., Tensor],
    sde: SDE,
    x0: Tensor,
    *,
    likelihood_weighting: bool = False,
    importance_sampling: bool = False,
    reduce: str = "mean",
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    y: Tensor | None = None,
) -> Tensor:
    """Denoising score matching loss of ``model`` on the batch ``x0`` (Song et al. 2021, eq. 7).

    Args:
        model: a score_fn ``model(x, t)`` (a ScoreModel, or any callable); called as
            ``model(x, t, y)`` when labels ``y`` are given.
        sde: the forward SDE.
        x0: clean data, batch first.
        likelihood_weighting: lambda = g^2 instead of sigma^2.
        importance_sampling: draw t proportional to g^2 / sigma^2 (needs likelihood_weighting).
        reduce: "mean" or "sum" of the squared error over data dims; the batch is always averaged.
        eps: smallest training time (t ~ U(eps, T)).
        generator: for t and the noise.
        y: class labels (B,) passed to the model.

    Returns:
        The scalar loss.

    Raises:
        ValueError: bad reduce / eps, importance_sampling without likelihood_weighting, NaN/inf in a
            CPU x0 (device tensors are not inspected: that would sync every step; the Trainer checks
            its data once), or a model output not shaped like x.
        TypeError: model not callable, sde not an SDE, x0 not a floating tensor.
    """
    check_sde(sde)
    check_callable("model", model, "model(x, t) -> Tensor shaped like x")
    check_all_finite("x0", check_tensor("x0", x0, 2), sync=False)  # on CPU only: no per-step device sync
    check_choice("reduce", reduce, REDUCTIONS)
    check_open_interval("eps", eps, 0.0, sde.T)
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling=True needs likelihood_weighting=True (it samples t prop. to g^2/sigma^2)")
    t, w = sample_time(
        sde,
        x0.shape[0],
        importance_sampling=importance_sampling,
        eps=eps,
        generator=generator,
        device=x0.device,
        dtype=x0.dtype,
    )
    x_t, z = sde.perturb(x0, t, generator=generator)
    score = check_output_shape("model", model(x_t, t) if y is None else model(x_t, t, y), x_t)
    sigma = sde.sigma(t)
    err = REDUCTIONS[reduce]((bcast(sigma, x0) * score + z).flatten(1) ** 2)  # sigma^2 || s + z/sigma ||^2
    if likelihood_weighting:  # g^2 || s + z/sigma ||^2; times the IS weight this is Z/(T-eps) ||sigma s + z||^2
        w = w * sde.diffusion(t) ** 2 / sigma**2
    return (w * err).mean()


def dequantized(loss_fn: Callable[..., Tensor], levels: int) -> Callable[..., Tensor]:
    """Wrap ``loss_fn(model, sde, x0, *, generator=None, **kw)`` to train on dequantized x0."""
    check_int("levels", levels, 2)

    def loss(model, sde, x0, *, generator=None, **kwargs):
        return loss_fn(model, sde, dequantize(x0, levels, generator=generator), generator=generator, **kwargs)

    return loss
