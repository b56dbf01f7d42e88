"""The Gaussian-mixture oracle against scipy and autograd."""

import numpy as np
import pytest
import scipy.stats
import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE

F64 = torch.float64
SDES = [VPSDE(), VPSDE(schedule="cosine"), SubVPSDE(), VESDE()]


def _random_full_mixture(K=3, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, D, generator=g, dtype=F64)
    A = torch.randn(K, D, D, generator=g, dtype=F64)
    covs = A @ A.transpose(-1, -2) / D + 0.1 * torch.eye(D, dtype=F64)
    w = torch.rand(K, generator=g, dtype=F64) + 0.2
    return GaussianMixture(means, covs, weights=w / w.sum())


def _scipy_logpdf(gm, x):
    comps = [
        np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x)
        for w, m, c in zip(gm.weights.numpy(), gm.means.numpy(), gm.covs.numpy())
    ]
    return scipy.special.logsumexp(np.stack(comps, 1), axis=1)


def test_log_prob_matches_scipy_full_covariance():
    gm = _random_full_mixture()
    x = gm.sample(50, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(gm.log_prob(x).numpy(), _scipy_logpdf(gm, x.numpy()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("t", [0.05, 0.5, 1.0])
def test_marginal_log_prob_matches_scipy(sde, t):
    gm = _random_full_mixture(seed=2)
    x = 2 * torch.randn(20, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    marg = gm.marginal(sde, t)
    a, s = sde.alpha(torch.tensor([t], dtype=F64))[0], sde.sigma(torch.tensor([t], dtype=F64))[0]
    ref = GaussianMixture(a * gm.means, a**2 * gm.covs + s**2 * torch.eye(4, dtype=F64), weights=gm.weights)
    np.testing.assert_allclose(gm.log_prob(x, sde, t).numpy(), _scipy_logpdf(ref, x.numpy()), rtol=1e-9)
    np.testing.assert_allclose(marg.log_prob(x).numpy(), _scipy_logpdf(ref, x.numpy()), rtol=1e-9)


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("diagonal", [False, True])
def test_score_is_gradient_of_log_density(sde, diagonal):
    if diagonal:
        gm = GaussianMixture(torch.randn(3, 5, dtype=F64), stds=torch.rand(3, 5, dtype=F64) + 0.1)
    else:
        gm = _random_full_mixture(D=5, seed=4)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    t = torch.linspace(0.01, 1.0, 8, dtype=F64)  # a different time per sample
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(xr, sde, t).sum(), xr)
    torch.testing.assert_close(gm.score_fn(sde)(x, t), grad, rtol=1e-9, atol=1e-9)


def test_score_keeps_trailing_shape_and_dtype():
    gm = GaussianMixture(torch.zeros(2, 12), stds=torch.tensor([0.5, 1.0]))
    x = torch.randn(3, 3, 2, 2)
    s = gm.score(x, VPSDE(), 0.5)
    assert s.shape == x.shape and s.dtype == torch.float32


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VPSDE(schedule="cosine")], ids=repr)
def test_marginal_at_T_is_close_to_prior(sde):
    gm = _random_full_mixture(seed=6)
    z = sde.prior_sampling((2000, 4), generator=torch.Generator().manual_seed(7), dtype=F64)
    gap = (sde.prior_logp(z) - gm.log_prob(z, sde, 1.0)).mean()  # a Monte-Carlo KL(prior || p_T)
    assert 0 <= gap.item() < 1e-2


def test_sample_moments_and_labels():
    gm = _random_full_mixture(seed=8)
    x, labels = gm.sample(40_000, torch.Generator().manual_seed(9), return_labels=True)
    counts = torch.bincount(labels, minlength=gm.K).double() / len(labels)
    se = torch.sqrt(gm.weights * (1 - gm.weights) / len(labels))
    assert torch.all((counts - gm.weights).abs() < 4 * se)
    torch.testing.assert_close(x.mean(0), gm.mean(), atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), atol=0.15, rtol=0.03)


def test_posterior_sums_to_one_and_component():
    gm = _random_full_mixture(seed=10)
    x = gm.sample(10, torch.Generator().manual_seed(11))
    post = gm.posterior(x, VPSDE(), 0.2)
    torch.testing.assert_close(post.sum(1), torch.ones(10, dtype=F64))
    comp = gm.component(1)
    assert comp.K == 1
    torch.testing.assert_close(comp.log_prob(x), gm.component_log_prob(x)[:, 1] - torch.log(gm.weights[1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=torch.zeros(2, 3), stds=torch.ones(2), weights=torch.tensor([0.5, 0.6])), "sum to one"),
        (dict(means=torch.zeros(2, 3), stds=torch.ones(2), weights=torch.tensor([1.5, -0.5])), "positive"),
        (dict(means=torch.zeros(2, 3), stds=-torch.ones(2)), "stds must be positive"),
        (dict(means=torch.zeros(2, 3), covs=torch.eye(2).expand(2, 2, 2)), r"covs must have shape \(K, D, D\)"),
        (dict(means=torch.zeros(1, 2), covs=-torch.eye(2)[None]), "positive definite"),
        (dict(means=torch.zeros(3)), r"means must have"),
        (dict(means=torch.zeros(2, 3)), "exactly one of covs"),
    ],
)
def test_bad_mixture_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_wrong_feature_count():
    gm = GaussianMixture(torch.zeros(2, 3), stds=torch.ones(2))
    with pytest.raises(ValueError, match="x must have 3 features"):
        gm.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="k must be in"):
        gm.component(5)
