"""Score-model parametrizations: turn a network's raw output into a score and an x0 estimate.

Every parametrization feeds the net the same preconditioned input (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", table 1), written in
terms of the SDE's alpha(t) and sigma(t) with sigma_k = sigma / alpha the noise level of the
scaled variable x / alpha:

    c_in    = 1 / sqrt(sigma^2 + alpha^2 sigma_data^2)     (net input has unit variance)
    c_noise = log(sigma_k) / 4                             (the noise label, for every SDE)

and reads the output F as:

    eps:    score = -F / sigma                   (Ho et al. 2020; NCSN++ "scale_by_sigma")
    score:  score = F                            (the net outputs the score itself)
    x0:     score = (alpha F - x) / sigma^2      (Tweedie)
    edm:    D = c_skip x/alpha + c_out F,  score = (alpha D - x) / sigma^2,
            c_skip = sd^2 / (sigma_k^2 + sd^2),  c_out = sigma_k sd / sqrt(sigma_k^2 + sd^2)
    velocity: F = alpha' x0 + sigma' eps (flow matching; for FlowSDE F = eps - x0), which is the
            probability-flow velocity f x - g^2 score / 2, so score = 2 (f x - F) / g^2

``denoise`` is Tweedie's formula x0_hat = (x + sigma^2 score) / alpha for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import as_time, bcast, check_choice, check_positive, shared_time
from .flow import tweedie
from .sdes import SDE

__all__ = ["ScoreModel", "PARAMETRIZATIONS", "ConditionalScore", "drop_labels"]


def _coefs(sde: SDE, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    return bcast(sde.alpha(t), x), bcast(sde.sigma(t), x)


def _eps(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    return -out / bcast(sde.sigma(t), x)


def _score(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    return out


def _x0(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    a, s = _coefs(sde, t, x)
    return (a * out - x) / s**2


def _edm(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    a, s = _coefs(sde, t, x)
    sk2 = (s / a) ** 2  # sigma_karras^2 of the scaled variable x / alpha
    c_skip = sigma_data**2 / (sk2 + sigma_data**2)
    c_out = (s / a) * sigma_data / torch.sqrt(sk2 + sigma_data**2)
    d = c_skip * x / a + c_out * out
    return (a * d - x) / s**2


def _velocity(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    # F = E[alpha' x0 + sigma' eps | x_t] is the PF-ODE velocity f x - g^2 score / 2, solved for the score
    return 2.0 * (bcast(sde.drift_coef(t), x) * x - out) / bcast(sde.diffusion(t) ** 2, x)


# name -> (net output F, x_t, sde, t (B,) or (1,), sigma_data) -> score
PARAMETRIZATIONS: dict[str, Callable[[Tensor, Tensor, SDE, Tensor, float], Tensor]] = {
    "eps": _eps,
    "score": _score,
    "x0": _x0,
    "edm": _edm,
    "velocity": _velocity,
}


class ScoreModel(nn.Module):
    """A network read as a score function ``model(x, t) -> score`` (a ``score_fn``).

    Args:
        net: module called as ``net(c_in * x, c_noise, y)`` returning a tensor shaped like x.
        sde: the forward SDE, which gives alpha(t) and sigma(t).
        parametrization: what the net predicts: "eps", "score", "x0", "edm" or "velocity"
            (module docstring; a key of ``PARAMETRIZATIONS``).
        sigma_data: data std assumed by the input scaling and the EDM preconditioning.

    Raises:
        ValueError: unknown parametrization or non-positive sigma_data.
        TypeError: net is not an nn.Module or sde not an SDE.
    """

    def __init__(self, net: nn.Module, sde: SDE, parametrization: str = "eps", *, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sde.SDE, got {type(sde).__name__}")
        self.net = net
        self.sde = sde
        self.parametrization = check_choice("parametrization", parametrization, PARAMETRIZATIONS)
        self.sigma_data = check_positive("sigma_data", sigma_data)

    @property
    def num_classes(self) -> int:
        return getattr(self.net, "num_classes", 0)

    def noise_label(self, t: float | Tensor, like: Tensor) -> Tensor:
        """c_noise(t) = log(sigma(t) / alpha(t)) / 4 = -log_snr(t) / 8, shape (B,)."""
        return -self.sde.log_snr(as_time(t, like, self.sde.T)) / 8.0

    def input_scale(self, t: float | Tensor, like: Tensor) -> Tensor:
        """c_in(t) = 1 / sqrt(sigma^2 + alpha^2 sigma_data^2), shape (B,)."""
        t = as_time(t, like, self.sde.T)
        return torch.rsqrt(self.sde.sigma(t) ** 2 + (self.sde.alpha(t) * self.sigma_data) ** 2)

    def forward(self, x: Tensor, t: float | Tensor, y: Tensor | None = None) -> Tensor:
        """The score grad_x log p_t(x | y) (unconditional, i.e. the null class, when y is None)."""
        t = as_time(t, x, self.sde.T)
        tc = shared_time(t)  # (1,) when the whole batch shares one time: coefficients computed once
        a, s = bcast(self.sde.alpha(tc), x), bcast(self.sde.sigma(tc), x)
        c_in = torch.rsqrt(s**2 + (a * self.sigma_data) ** 2)
        label = (-self.sde.log_snr(tc) / 8.0).expand(t.shape)  # = noise_label(t), still a shared view
        out = self.net(c_in * x, label) if y is None else self.net(c_in * x, label, y)
        return PARAMETRIZATIONS[self.parametrization](out, x, self.sde, tc, self.sigma_data)

    def denoise(self, x: Tensor, t: float | Tensor, y: Tensor | None = None) -> Tensor:
        """E[x_0 | x_t = x] by Tweedie's formula: (x + sigma^2 score) / alpha."""
        t = as_time(t, x, self.sde.T)
        score = self(x, t, y)
        return tweedie(self.sde, x, t, score)

    def conditional(self, y: int | Tensor | None) -> ConditionalScore:
        """A score_fn(x, t) with the class label(s) ``y`` bound (an int is used for the whole batch)."""
        return ConditionalScore(self, y)


class ConditionalScore:
    """``score_fn(x, t)`` of a ScoreModel with labels bound; also has ``denoise(x, t)``."""

    def __init__(self, model: ScoreModel, y: int | Tensor | None) -> None:
        if y is not None and model.num_classes == 0:
            raise ValueError(f"y={y!r} was given but the model's net is unconditional (num_classes=0)")
        if isinstance(y, int) and not 0 <= y <= model.num_classes:
            raise ValueError(f"y must lie in [0, {model.num_classes}] ({model.num_classes} = null class), got {y}")
        self.model, self.y = model, y

    def _labels(self, x: Tensor) -> Tensor | None:
        if self.y is None:
            return None
        y = torch.as_tensor(self.y, dtype=torch.long, device=x.device)
        if y.numel() == 1:
            return y.reshape(()).expand(x.shape[0])
        if y.shape != (x.shape[0],):
            raise ValueError(f"bound labels y have shape {tuple(y.shape)}, but x has batch size {x.shape[0]}")
        return y

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.model(x, t, self._labels(x))

    def denoise(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.model.denoise(x, t, self._labels(x))


def drop_labels(y: Tensor, num_classes: int, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class ``num_classes`` with probability p, for
    classifier-free guidance training (Ho & Salimans 2022)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, num_classes), y)
