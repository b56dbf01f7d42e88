"""The flow-matching SDE (FlowSDE: x_t = (1 - t) x0 + t eps) against closed forms and the exact oracle:
its coefficients, its exact discrete chain, every sampler, the PF-ODE likelihood, and flow matching's
velocity convention (facebookresearch/flow_matching: x_t = t' x1 + (1 - t') x0, x1 data, x0 noise)."""

import math

import pytest
import torch

from sde import VPSDE, GaussianMixture
from sde.flow import pf_velocity
from sde.likelihood import log_likelihood
from sde.losses import dsm_loss
from sde.models import ScoreModel
from sde.samplers import SAMPLERS, sample
from sde.sdes import SDE, VESDE, FlowSDE, SubVPSDE

F64 = torch.float64


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-0.6, 0.2], [0.5, -0.4], [0.3, 0.7]], dtype=F64)
    covs = torch.tensor([[[0.04, 0.01], [0.01, 0.02]], [[0.03, -0.01], [-0.01, 0.05]], [[0.02, 0.0], [0.0, 0.02]]],
                        dtype=F64)
    return GaussianMixture(means, covs, weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def _moments(gm):
    w = gm.weights[:, None]
    mean = (w * gm.means).sum(0)
    second = (gm.weights[:, None, None] * (gm.covs + gm.means[:, :, None] * gm.means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def test_closed_forms():
    sde = FlowSDE()
    t = torch.linspace(0.01, sde.T, 50, dtype=F64, requires_grad=True)
    torch.testing.assert_close(sde.alpha(t), 1 - t)
    torch.testing.assert_close(sde.sigma(t), t)
    (d_log_alpha,) = torch.autograd.grad(torch.log(sde.alpha(t)).sum(), t)
    (d_var,) = torch.autograd.grad((sde.sigma(t) ** 2).sum(), t)
    t = t.detach()
    f = sde.drift_coef(t)
    torch.testing.assert_close(f, d_log_alpha)  # f = alpha' / alpha
    torch.testing.assert_close(sde.diffusion(t) ** 2, d_var - 2 * f * t**2)  # g^2 = (sigma^2)' - 2 f sigma^2
    torch.testing.assert_close(sde.diffusion(t) ** 2, 2 * t / (1 - t))
    x = torch.randn(50, 3, dtype=F64)
    torch.testing.assert_close(sde.drift(x, t), -x / (1 - t)[:, None])
    torch.testing.assert_close(sde.log_snr(t), 2 * torch.log((1 - t) / t))
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-12, atol=1e-12)
    assert sde.prior_std == 1.0 and repr(sde) == "FlowSDE(T=0.99, N=1000)"


@pytest.mark.parametrize("sde", [VPSDE(), VPSDE(schedule="cosine"), SubVPSDE(), VESDE(), FlowSDE()], ids=repr)
def test_drift_coef_is_the_linear_drift(sde):
    t = torch.linspace(0.01, sde.T, 9, dtype=F64)
    torch.testing.assert_close(sde.drift_coef(t), SDE.drift_coef(sde, t))  # closed form vs generic evaluation


def test_discretize_is_the_exact_transition():
    """One step from s = t - dt to t maps N(alpha_s x0, sigma_s^2) onto N(alpha_t x0, sigma_t^2) exactly."""
    sde = FlowSDE()
    t = torch.tensor([0.05, 0.5, 0.9, sde.T], dtype=F64)
    dt = 0.04
    s = t - dt
    x0 = torch.ones(4, 1, dtype=F64)
    mean_s = sde.alpha(s)[:, None] * x0
    f, G = sde.discretize(mean_s, t, dt)
    torch.testing.assert_close(mean_s + f, sde.alpha(t)[:, None] * x0)
    torch.testing.assert_close(((1 + f / mean_s)[:, 0] * sde.sigma(s)) ** 2 + G**2, sde.sigma(t) ** 2)


def test_oracle_score_is_the_gradient_of_its_density():
    sde, gm = FlowSDE(), _mixture()
    x = torch.randn(16, 2, dtype=F64, requires_grad=True)
    for t in (0.05, 0.5, sde.T):
        (grad,) = torch.autograd.grad(gm.log_prob(x, sde, t).sum(), x)
        torch.testing.assert_close(gm.score(x.detach(), sde, t), grad)


# sampler -> options (with these, the linear VP SDE meets the same thresholds)
SAMPLER_OPTIONS = {
    "euler_maruyama": dict(steps=300),
    "reverse_diffusion": dict(steps=300),
    "ancestral": dict(steps=300),
    "pc": dict(steps=200, snr=0.05),
    "ode": dict(rtol=1e-5, atol=1e-5),
    "ddim": dict(steps=50),
    "heun": dict(steps=40),  # 18 steps leave a covariance error of 0.025 on VP as on flow
    "dpm_solver": dict(steps=20),
    "unipc": dict(steps=20),
    "deis": dict(steps=20),
    "dpm_solver_sde": dict(steps=100),
    "dpm_2s_ancestral": dict(steps=100),
    "dpm_adaptive": dict(rtol=1e-3, atol=1e-3),
    # 2-D: the per-sample norm's noise selection biases the law (mean 0.035, cov 0.055 here); see its docs
    "gotta_go_fast": dict(rtol=0.01, atol=0.005, norm="batch"),
}


def _sample_error(sde, name):
    gm = _mixture()
    res = sample(gm.score_fn(sde), sde, (4000, 2), name, generator=torch.Generator().manual_seed(0), dtype=F64,
                 **SAMPLER_OPTIONS[name])
    mean, cov = _moments(gm)
    x = res.x
    return (x.mean(0) - mean).abs().max().item(), (torch.cov(x.T) - cov).abs().max().item(), res


def test_sampler_table_is_complete():
    assert set(SAMPLER_OPTIONS) == set(SAMPLERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_draws_the_mixture_on_the_flow_sde(name):
    mean_err, cov_err, res = _sample_error(FlowSDE(), name)
    # 4000 samples: the standard error of the mean is ~0.008, of a covariance entry ~0.004
    assert mean_err < 0.03 and cov_err < 0.02, (name, mean_err, cov_err)
    assert torch.isfinite(res.x).all() and res.nfe > 0


def test_pf_ode_likelihood_matches_the_closed_form():
    """log p from the PF-ODE with the exact score = log p_eps(x) + log prior(z) - log p_T(z) (z = ODE end)."""
    sde, gm, eps = FlowSDE(), _mixture(), 1e-3
    x = gm.marginal(sde, eps).sample(64, torch.Generator().manual_seed(1))
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", eps=eps, rtol=1e-8, atol=1e-8)
    expected = gm.log_prob(x, sde, eps) + sde.prior_logp(res.z) - gm.log_prob(res.z, sde, sde.T)
    torch.testing.assert_close(res.logp, expected, rtol=0, atol=2e-4)


def test_hutchinson_likelihood_is_unbiased_on_the_flow_sde():
    sde, gm, eps = FlowSDE(), _mixture(), 1e-3
    x = gm.marginal(sde, eps).sample(8, torch.Generator().manual_seed(1)).repeat(200, 1)
    res = log_likelihood(gm.score_fn(sde), sde, x, eps=eps, rtol=1e-6, atol=1e-6,
                         generator=torch.Generator().manual_seed(0))
    exact = log_likelihood(gm.score_fn(sde), sde, x[:8], divergence="exact", eps=eps, rtol=1e-6, atol=1e-6)
    est = res.logp.reshape(200, 8)
    se = est.std(0) / math.sqrt(200)
    assert ((est.mean(0) - exact.logp).abs() < 4 * se + 1e-4).all()


# -- flow matching's convention ----------------------------------------------------------------------
def _fm_velocity_gaussian(x, t_fm, mu, c2):
    """u(x, t') = E[x1 - x0 | x_t' = x] for x1 ~ N(mu, diag c2) (data), x0 ~ N(0, I) (noise),
    x_t' = t' x1 + (1 - t') x0: flow matching's marginal velocity, by Gaussian conditioning."""
    var = t_fm**2 * c2 + (1 - t_fm) ** 2
    e_x1 = mu + t_fm * c2 / var * (x - t_fm * mu)
    e_x0 = (x - t_fm * e_x1) / (1 - t_fm)
    return e_x1 - e_x0


def test_pf_velocity_is_flow_matchings_velocity_reversed():
    """Our t runs data -> noise, flow matching's t' = 1 - t runs noise -> data: v_pf(x, t) = -u(x, 1 - t)."""
    sde = FlowSDE()
    mu, std = torch.tensor([0.3, -0.5], dtype=F64), torch.tensor([0.4, 0.9], dtype=F64)
    gm = GaussianMixture(mu[None], stds=std[None])
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (0.02, 0.3, 0.7, sde.T):
        tt = torch.full((32,), t, dtype=F64)
        expected = -_fm_velocity_gaussian(x, 1 - t, mu, std**2)
        torch.testing.assert_close(pf_velocity(sde, gm.score_fn(sde), x, tt), expected)


def test_flow_matching_package_agrees():
    """Test-only reference: flow_matching's CondOT path converts our eps-prediction to the same velocity."""
    fm = pytest.importorskip("flow_matching.path")
    sde, gm = FlowSDE(), _mixture()
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.full((32,), 0.4, dtype=F64)
    eps_hat = -sde.sigma(t)[:, None] * gm.score(x, sde, t)
    u = fm.CondOTProbPath().epsilon_to_velocity(epsilon=eps_hat, x_t=x, t=1 - t[:, None])
    torch.testing.assert_close(pf_velocity(sde, gm.score_fn(sde), x, t), -u)


def test_velocity_parametrization_trains_on_the_flow_matching_target():
    """dsm_loss(weighting="flow") with a velocity-parametrized model is || F - (z - x0) ||^2 exactly."""

    class Net(torch.nn.Module):
        def forward(self, x, label):
            return torch.sin(3 * x) + label[:, None]

    sde = FlowSDE()
    model = ScoreModel(Net(), sde, "velocity").double()
    x0 = _mixture().sample(256, torch.Generator().manual_seed(2))
    loss = dsm_loss(model, sde, x0, weighting="flow", eps=1e-3, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = 1e-3 + torch.rand(256, generator=g, dtype=F64) * (sde.T - 1e-3)
    z = torch.randn(x0.shape, generator=g, dtype=F64)
    x = (1 - t)[:, None] * x0 + t[:, None] * z
    out = model.net(model.input_scale(t, x)[:, None] * x, model.noise_label(t, x))
    torch.testing.assert_close(loss, ((out - (z - x0)) ** 2).mean(), rtol=1e-10, atol=0)
