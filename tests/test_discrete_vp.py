"""DiscreteVPSDE: the VP SDE of a tabulated DDPM schedule, against VPSDE and the exact oracle."""

from __future__ import annotations

import math

import pytest
import torch

from sde import VPSDE, GaussianMixture
from sde.likelihood import log_likelihood
from sde.samplers import SAMPLERS, sample
from sde.sdes import DiscreteVPSDE, ddpm_betas

F64 = torch.float64
SCHEDULES = {"linear": lambda: DiscreteVPSDE(ddpm_betas("linear")),
             "cosine": lambda: DiscreteVPSDE(ddpm_betas("squaredcos_cap_v2"))}


def _linear(n: int) -> DiscreteVPSDE:
    """DDPM's linear schedule with N steps, betas beta(t)/N of VPSDE(0.1, 20) (1e-4..0.02 at N = 1000)."""
    return DiscreteVPSDE(ddpm_betas("linear", n, 0.1 / n, 20.0 / n))


def test_linear_schedule_is_vpsde_to_first_order():
    """|log alpha_discrete - log alpha_VPSDE| is O(1/N): measured 0.034 at N = 1000 (at t = T), halving with N."""
    t = torch.linspace(0.0, 1.0, 2001, dtype=F64)
    vp = VPSDE(0.1, 20.0)
    errs = [(_linear(n).log_alpha(t) - vp.log_alpha(t)).abs().max().item() for n in (1000, 2000, 4000)]
    assert errs[0] < 0.035, errs  # measured 0.0339: sum of beta_i^2 / 4 from log(1 - beta) = -beta - beta^2/2
    for a, b in zip(errs, errs[1:]):
        assert 1.8 < a / b < 2.2, errs  # first order in 1/N
    sig = (_linear(1000).sigma(t) - vp.sigma(t)).abs().max().item()
    assert sig < 5e-3, sig
    beta = (_linear(1000).beta(t[1:-1]) - vp.beta(t[1:-1])).abs().max().item()
    assert beta < 0.25, beta  # -N log(1 - beta_n) vs beta(t): grid offset 1/N and the beta^2 term


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_tabulated_points_inverse_and_chain(name):
    sde = SCHEDULES[name]()
    n = torch.arange(sde.N, dtype=F64)
    t_n = (n + 1) / sde.N
    torch.testing.assert_close(sde.alpha(t_n) ** 2, sde.alphas_cumprod, rtol=1e-12, atol=0)
    ac = torch.cumprod(1 - sde.betas, 0)
    torch.testing.assert_close(sde.alphas_cumprod, ac, rtol=1e-10, atol=0)
    t = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.998 + 1e-3
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    # discretize is the DDPM chain at the tabulated points: x_n = sqrt(1 - beta_n) x_{n-1} + sqrt(beta_n) z
    x = torch.ones(sde.N, 1, dtype=F64)
    f, G = sde.discretize(x, t_n, 1.0 / sde.N)
    torch.testing.assert_close(G**2, sde.betas, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(f[:, 0], torch.sqrt(1 - sde.betas) - 1, rtol=1e-9, atol=1e-15)
    # beta(t) is -2 d log alpha / dt: the slope of the interpolant between nodes
    mid = (n + 0.5) / sde.N
    torch.testing.assert_close(sde.beta(mid), -sde.N * torch.log1p(-sde.betas))


def test_ddpm_betas_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
        ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=1e-4, beta_end=0.02).betas.double()
        torch.testing.assert_close(ddpm_betas(name), ref, rtol=1e-6, atol=1e-9)


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        DiscreteVPSDE([0.1])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiscreteVPSDE([0.1, 1.0])
    with pytest.raises(ValueError, match="schedule"):
        ddpm_betas("quadratic")
    with pytest.raises(ValueError, match="zero terminal"):
        DiscreteVPSDE.from_alphas_cumprod([0.9, 0.5, 0.0])


# -- the oracle on DiscreteVPSDE ---------------------------------------------------------------------
MIX_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=F64)
    return GaussianMixture(means, stds=torch.tensor([0.2, 0.3, 0.15], dtype=F64), weights=MIX_WEIGHTS)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("sampler,opts", [("ddim", dict(steps=50)), ("dpm_solver", dict(steps=20)),
                                          ("ancestral", dict(steps=200)), ("ode", dict(rtol=1e-5, atol=1e-5))])
def test_samplers_recover_mixture_weights(name, sampler, opts):
    sde, gm, n = SCHEDULES[name](), _mixture(), 400
    x = sample(gm.score_fn(sde), sde, (n, 2), sampler, generator=torch.Generator().manual_seed(0), dtype=F64,
               **opts).x
    w_hat = gm.posterior(x).mean(0)
    se = torch.sqrt(MIX_WEIGHTS * (1 - MIX_WEIGHTS) / n)
    assert ((w_hat - MIX_WEIGHTS).abs() < 3 * se).all(), (w_hat, MIX_WEIGHTS)
    # each point sits in a component: its log density is that of the data, not of the spread-out prior
    assert gm.log_prob(x).mean() > gm.log_prob(gm.sample(n, torch.Generator().manual_seed(1))).mean() - 0.3


def _exact_flow(sde, mu, std, x_T, t0, t1):
    """PF-ODE map of N(mu, diag(std^2)) data from t0 to t1: (x - alpha mu) / sqrt(v) is conserved."""
    t = torch.tensor([t0, t1], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    v = a[:, None] ** 2 * std**2 + s[:, None] ** 2
    return a[1] * mu + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * mu)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_solvers_follow_the_exact_flow(name):
    """The PF-ODE map of Gaussian data is known in closed form. beta(t) is piecewise constant, so an
    adaptive solver in t meets N kinks: measured 3e-4 (linear) / 1e-3 (cosine) at rtol 1e-5. DPM-Solver
    works in log-SNR, where the schedule is invisible: it keeps its order."""
    sde = SCHEDULES[name]()
    mu, std = torch.tensor([0.5, -1.0, 0.0], dtype=F64), torch.tensor([0.1, 0.3, 1.0], dtype=F64)
    gm = GaussianMixture(mu[None], stds=std[None])
    x_T = sde.prior_sampling((8, 3), generator=torch.Generator().manual_seed(3), dtype=F64)
    eps = 1e-2
    exact = _exact_flow(sde, mu, std, x_T, sde.T, eps)
    x = SAMPLERS["ode"](gm.score_fn(sde), sde, x_T, eps=eps, rtol=1e-5, atol=1e-5).x
    assert (x - exact).abs().max() < 2e-3, (x - exact).abs().max()
    errs = [(SAMPLERS["dpm_solver"](gm.score_fn(sde), sde, x_T, eps=eps, steps=n, order=2, denoise_final=False).x
             - exact).abs().max().item() for n in (12, 24, 48)]
    assert math.log2(errs[1] / errs[2]) > 2 - 0.35, errs


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_likelihood_matches_closed_form(name):
    sde = SCHEDULES[name]()
    mu, std = torch.tensor([0.3, -0.5], dtype=F64), torch.tensor([0.4, 0.8], dtype=F64)
    gm = GaussianMixture(mu[None], stds=std[None])
    x = gm.sample(6, torch.Generator().manual_seed(1))
    eps = 1e-3
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", eps=eps, rtol=1e-6, atol=1e-6)
    z = _exact_flow(sde, mu, std, x, eps, sde.T)
    want = gm.log_prob(x, sde, eps) + sde.prior_logp(z) - gm.log_prob(z, sde, sde.T)
    assert (res.logp - want).abs().max() < 1e-3 * 2, (res.logp - want).abs().max()  # the per-dim budget of VPSDE
    assert (res.z - z).abs().max() < 2e-3
    assert math.isfinite(float(res.logp.sum()))
