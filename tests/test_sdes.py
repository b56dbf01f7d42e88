"""The forward SDEs against exact answers: simulation, DDPM/SMLD chains, closed forms."""

import math
import re

import numpy as np
import pytest
import scipy.stats
import torch

from sde import VESDE, VPSDE, SubVPSDE
from sde.sdes import FlowSDE

F64 = torch.float64
ALL_SDES = {
    "vp": lambda: VPSDE(),
    "vp_cosine": lambda: VPSDE(schedule="cosine"),
    "subvp": lambda: SubVPSDE(),
    "ve": lambda: VESDE(),
    "flow": lambda: FlowSDE(),  # T = 0.99: times below that say sde.T
}


@pytest.fixture(params=sorted(ALL_SDES))
def sde(request):
    return ALL_SDES[request.param]()


def _simulate_forward(sde, x0, t_end, steps, generator):
    """Fine Euler-Maruyama simulation of the forward SDE from 0 to t_end.

    The grid t_i = t_end (1 - (1 - i/n)^2) is finest near the end, where the cosine
    schedule's beta(t) grows like 1/(1 - t) and a uniform grid would bias the variance.
    """
    x = x0.clone()
    grid = t_end * (1 - (1 - torch.linspace(0, 1, steps + 1, dtype=F64)) ** 2)
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        dt = t1 - t0
        t = torch.full((x.shape[0],), 0.5 * (t0 + t1), dtype=F64)  # midpoint: second order in g^2
        g = sde.diffusion(t)[:, None]
        x = x + sde.drift(x, t) * dt + g * math.sqrt(dt) * torch.randn(x.shape, generator=generator, dtype=F64)
    return x


@pytest.mark.parametrize("t_end", [0.1, 0.5, 1.0])
def test_marginal_prob_matches_simulation(sde, t_end):
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    x0 = torch.full((n, 1), 1.5, dtype=F64)
    t_end = min(t_end, sde.T)
    xt = _simulate_forward(sde, x0, t_end, steps=1000, generator=gen)
    mean, std = sde.marginal_prob(x0[:1], t_end)
    emp_mean, emp_var = xt.mean().item(), xt.var().item()
    var = std.item() ** 2
    se_mean = math.sqrt(var / n)
    assert abs(emp_mean - mean.item()) < 4 * se_mean + 1e-3 * abs(mean.item())
    # The variance has standard error var * sqrt(2/n); allow 5 of those plus 0.5% for the time grid.
    assert abs(emp_var - var) < 5 * var * math.sqrt(2 / n) + 5e-3 * var


def test_variance_obeys_its_ode(sde):
    """For affine drift -b(t)/2 x: d sigma^2/dt = 2 (d log alpha/dt) sigma^2 + g^2."""
    t = torch.linspace(0.02, sde.T, 17, dtype=F64, requires_grad=True)
    var = sde.sigma(t) ** 2
    (dvar,) = torch.autograd.grad(var.sum(), t)
    t2 = t.detach().clone().requires_grad_(True)
    log_alpha = torch.log(sde.alpha(t2))
    # VE has alpha = 1, a constant with no graph
    dlog = torch.autograd.grad(log_alpha.sum(), t2)[0] if log_alpha.requires_grad else torch.zeros_like(t2)
    resid = dvar - (2 * dlog * var.detach() + sde.diffusion(t.detach()) ** 2)
    assert resid.abs().max() < 1e-8 * (1 + var.detach().max())


def test_log_snr_inverse_roundtrip(sde):
    t = torch.linspace(1e-3, sde.T, 101, dtype=F64)
    lam = sde.log_snr(t)
    assert torch.all(lam[1:] < lam[:-1]), "log-SNR must decrease in t"
    torch.testing.assert_close(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-10)


def test_log_snr_definition(sde):
    t = torch.tensor([0.05, 0.5, 0.95], dtype=F64)
    expected = 2 * torch.log(sde.alpha(t) / sde.sigma(t))
    torch.testing.assert_close(sde.log_snr(t), expected)


def test_ddpm_betas_reproduced():
    N = 1000
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=N)
    ddpm_betas = torch.linspace(0.1 / N, 20.0 / N, N, dtype=F64)
    t = torch.arange(N, dtype=F64) / (N - 1)
    x = torch.ones(N, 3, dtype=F64)
    f, G = sde.discretize(x, t, dt=1.0 / N)
    torch.testing.assert_close(G**2, ddpm_betas)
    torch.testing.assert_close(f, (torch.sqrt(1 - ddpm_betas) - 1)[:, None] * x)


def test_smld_sigmas_reproduced():
    N = 100
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=N)
    smld = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), N, dtype=F64))
    t = torch.arange(N, dtype=F64) / (N - 1)
    x = torch.zeros(N, 2, dtype=F64)
    f, G = sde.discretize(x, t, dt=1.0 / (N - 1))
    assert torch.equal(f, torch.zeros_like(x))
    # The chain adds sqrt(sigma_i^2 - sigma_{i-1}^2) of noise at each level (Song et al. eq. 47).
    torch.testing.assert_close(G[1:] ** 2, smld[1:] ** 2 - smld[:-1] ** 2)


def test_subvp_discretize_is_euler():
    sde = SubVPSDE()
    x = torch.randn(4, 3, dtype=F64)
    t = torch.full((4,), 0.4, dtype=F64)
    f, G = sde.discretize(x, t, dt=0.01)
    torch.testing.assert_close(f, sde.drift(x, t) * 0.01)
    torch.testing.assert_close(G, sde.diffusion(t) * 0.1)


def test_prior_logp_matches_scipy_and_integrates_to_one(sde):
    z = sde.prior_sampling((5, 3), generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = scipy.stats.norm(scale=sde.prior_std).logpdf(z.numpy()).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z).numpy(), ref, rtol=1e-12)
    # one dimension: the density integrates to one on a fine grid
    s = sde.prior_std
    grid = torch.linspace(-10 * s, 10 * s, 20001, dtype=F64)[:, None]
    integral = torch.trapezoid(sde.prior_logp(grid).exp(), grid[:, 0])
    assert abs(integral.item() - 1.0) < 1e-8


def test_prior_sampling_follows_generator_and_dtype(sde):
    a = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(5), dtype=F64)
    b = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(5), dtype=F64)
    assert torch.equal(a, b) and a.dtype == F64


def test_any_batch_shape_and_float_time(sde):
    x = torch.randn(2, 3, 4, 4)
    mean, std = sde.marginal_prob(x, 0.3)
    assert mean.shape == x.shape and std.shape == (2,) and mean.dtype == torch.float32
    assert sde.drift(x, 0.3).shape == x.shape
    assert sde.diffusion(torch.tensor([0.3, 0.4])).shape == (2,)
    f, G = sde.discretize(x, 0.3)
    assert f.shape == x.shape and G.shape == (2,)


def test_reverse_sde_and_probability_flow(sde):
    x = torch.randn(3, 2, dtype=F64)
    t = torch.full((3,), 0.5, dtype=F64)

    def score(x, t):
        return -x

    rev = sde.reverse(score)
    g2 = sde.diffusion(t)[:, None] ** 2
    torch.testing.assert_close(rev.drift(x, t), sde.drift(x, t) + g2 * x)
    torch.testing.assert_close(rev.diffusion(t), sde.diffusion(t))
    ode = sde.reverse(score, probability_flow=True)
    torch.testing.assert_close(ode.drift(x, t), sde.drift(x, t) + 0.5 * g2 * x)
    assert torch.all(ode.diffusion(t) == 0)
    f, G = ode.discretize(x, t)
    f0, G0 = sde.discretize(x, t)
    torch.testing.assert_close(f, f0 + 0.5 * G0[:, None] ** 2 * x)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VPSDE(schedule="quadratic"), "schedule"),
        (lambda: VPSDE(beta_min=20.0, beta_max=0.1), "beta_min must be < beta_max"),
        (lambda: VPSDE(beta_min=-1.0), "beta_min"),
        (lambda: SubVPSDE(beta_min=5.0, beta_max=5.0), "beta_min must be < beta_max"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=10.0, sigma_max=1.0), "sigma_min must be < sigma_max"),
        (lambda: VPSDE(N=0), "N must be >= 1"),
        (lambda: FlowSDE(T=1.0), "T must lie in the open interval"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_time_and_shapes(sde):
    x = torch.randn(4, 2)
    in_range = re.escape(f"t must lie in [0, {sde.T}]")
    with pytest.raises(ValueError, match=in_range):
        sde.marginal_prob(x, 1.5)
    with pytest.raises(ValueError, match=in_range):
        sde.marginal_prob(x, torch.tensor([0.1, 0.2, -0.1, 0.3]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        sde.marginal_prob(x, torch.rand(3))
    with pytest.raises(TypeError, match="t must be a float or a Tensor"):
        sde.marginal_prob(x, "0.5")


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match=r"\['cosine', 'linear'\]"):
        VPSDE(schedule="sigmoid")
