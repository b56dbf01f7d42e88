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


@pytest.mark.parametrize("diagonal", [False, True])
def test_shared_time_and_row_blocks_give_the_per_row_result(diagonal, monkeypatch):
    """The fast paths (one time for the batch: variances once; rows in cache-sized blocks) against
    the per-row path (a materialized (B,) time, one block)."""
    import sde.oracle as oracle

    if diagonal:
        gm = GaussianMixture(torch.randn(3, 5, dtype=F64), stds=torch.rand(3, 5, dtype=F64) + 0.1)
    else:
        gm = _random_full_mixture(D=5, seed=6)
    x = 2 * torch.randn(200, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    sde = VPSDE()
    shared = torch.full((1,), 0.3, dtype=F64).expand(200)  # stride 0: what samplers pass
    ref_score, ref_logp = gm.score(x, sde, shared.clone()), gm.log_prob(x, sde, shared.clone())
    monkeypatch.setattr(oracle, "_BLOCK", 7 * gm.K * gm.D)  # blocks of 7 rows (the last one shorter)
    for t in (0.3, shared, shared.clone()):
        torch.testing.assert_close(gm.score(x, sde, t), ref_score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gm.log_prob(x, sde, t), ref_logp, rtol=1e-12, atol=1e-12)
    per_row = torch.linspace(0.01, 1.0, 200, dtype=F64)  # blocks with per-row times, and autograd through them
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(xr, sde, per_row).sum(), xr)
    torch.testing.assert_close(gm.score(x, sde, per_row), grad, rtol=1e-9, atol=1e-9)


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

def _mixture2d() -> GaussianMixture:
    means = torch.tensor([[-2.0, -1.0], [1.5, 1.0], [0.5, -2.5]], dtype=F64)
    covs = torch.tensor([[[0.5, 0.3], [0.3, 0.4]], [[0.4, -0.2], [-0.2, 0.5]], [[0.3, 0.0], [0.0, 0.2]]], dtype=F64)
    return GaussianMixture(means, covs, weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))


# -- the oracle's exact posteriors -------------------------------------------------------------------
def test_condition_on_coordinates_matches_numerical_integration():
    gm = _mixture2d()
    post = gm.condition(mask=torch.tensor([1, 0]), values=torch.tensor([0.7, 0.0], dtype=F64))
    grid = torch.linspace(-8, 8, 4001, dtype=F64)
    joint = gm.log_prob(torch.stack([torch.full_like(grid, 0.7), grid], 1)).exp()
    dens = joint / torch.trapezoid(joint, grid)  # p(x1 | x0 = 0.7) by quadrature
    torch.testing.assert_close(post.log_prob(grid[:, None]).exp(), dens, atol=1e-8, rtol=1e-6)
    # The weights are the components' posteriors given x0 = 0.7 (marginal of coordinate 0 only).
    marg = GaussianMixture(gm.means[:, :1], gm.covs[:, :1, :1], weights=gm.weights)
    torch.testing.assert_close(post.weights, marg.posterior(torch.tensor([[0.7]], dtype=F64))[0])


def test_condition_on_linear_gaussian_observation_matches_quadrature():
    gm = _mixture2d()
    A, y, s = torch.tensor([[1.0, -0.6]], dtype=F64), torch.tensor([0.4], dtype=F64), 0.3
    post = gm.condition(A=A, y=y, noise_std=s)
    u = torch.linspace(-7, 7, 561, dtype=F64)
    pts = torch.cartesian_prod(u, u)
    w = (gm.log_prob(pts) - 0.5 * ((pts @ A.T)[:, 0] - y) ** 2 / s**2).exp()
    w = w / w.sum()
    mean = w @ pts
    cov = (pts - mean).T @ ((pts - mean) * w[:, None])
    torch.testing.assert_close(post.mean(), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(post.covariance(), cov, atol=1e-6, rtol=0)
    # Noisy observed coordinates are the same as A = rows of the identity.
    a = gm.condition(mask=torch.tensor([0, 1]), values=torch.tensor([0.0, 0.4], dtype=F64), noise_std=s)
    b = gm.condition(A=torch.tensor([[0.0, 1.0]], dtype=F64), y=torch.tensor([0.4], dtype=F64), noise_std=s)
    torch.testing.assert_close(a.means, b.means)
    torch.testing.assert_close(a.weights, b.weights)


def test_class_posterior_and_class_conditional_law():
    gm, classes = _mixture2d(), torch.tensor([0, 0, 1])
    x = torch.randn(7, 2, dtype=F64)
    sde = VPSDE()
    post = gm.posterior(x, sde, 0.3)
    expected = torch.stack([post[:, :2].sum(1), post[:, 2]], 1)
    torch.testing.assert_close(gm.class_log_posterior(x, classes, sde, 0.3).exp(), expected)
    given = gm.given_class(0, classes)
    torch.testing.assert_close(given.weights, torch.tensor([0.625, 0.375], dtype=F64))


def test_condition_bad_inputs():
    gm = _mixture2d()
    with pytest.raises(ValueError, match="exactly one observation"):
        gm.condition()
    with pytest.raises(ValueError, match=r"mask must have shape \(D,\) = \(2,\)"):
        gm.condition(mask=torch.ones(3), values=torch.zeros(3))
    with pytest.raises(ValueError, match="observes 2 of 2"):
        gm.condition(mask=torch.ones(2), values=torch.zeros(2))
    with pytest.raises(ValueError, match="noise_std must be > 0 for a general A"):
        gm.condition(A=torch.ones(1, 2), y=torch.zeros(1))
    with pytest.raises(ValueError, match=r"A must have shape \(M, D\)"):
        gm.condition(A=torch.ones(1, 3), y=torch.zeros(1), noise_std=0.1)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        gm.condition(A=torch.ones(1, 2), y=torch.zeros(1), noise_std=-1.0)
