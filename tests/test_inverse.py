"""Inverse problems (inpainting, colorization, super-resolution, DPS) against closed forms."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from sde import VESDE, VPSDE, GaussianMixture
from sde.inverse import (
    COLOR_TRANSFORM,
    colorization_constraint,
    colorize,
    dps_score,
    inpaint,
    inpainting_constraint,
    project,
    replacement_score,
    solve_inverse,
    super_resolution_constraint,
    super_resolve,
)
from sde.samplers import SAMPLERS

F64 = torch.float64
K_IDX, U_IDX = [0, 1], [2, 3]  # known and unknown coordinates of the 4-D Gaussian


def _gaussian(correlated: bool) -> tuple[GaussianMixture, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    cov = a @ a.T / 4 + 0.1 * torch.eye(4, dtype=F64)
    if not correlated:  # known and unknown blocks independent
        cov[:2, 2:] = 0.0
        cov[2:, :2] = 0.0
    mu = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=F64)
    return GaussianMixture(mu[None], cov[None]), mu, cov


def _conditional(mu, cov, y_known):
    """Closed-form p(x_U | x_K = y): mean and covariance."""
    s_uk, s_kk = cov[U_IDX][:, K_IDX], cov[K_IDX][:, K_IDX]
    mean = mu[U_IDX] + s_uk @ torch.linalg.solve(s_kk, y_known - mu[K_IDX])
    return mean, cov[U_IDX][:, U_IDX] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)


def _image_mixture(shape) -> GaussianMixture:
    d = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(1)
    means = torch.rand(2, d, generator=g, dtype=F64) - 0.5
    return GaussianMixture(means, stds=0.2 + 0.3 * torch.rand(2, d, generator=g, dtype=F64))


def _image_score(gm, sde):
    return lambda x, t: gm.score(x.flatten(1), sde, t).reshape(x.shape)


def test_replacement_score_is_exact_on_known_part_and_model_score_elsewhere():
    sde = VPSDE()
    gm, _, _ = _gaussian(True)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(5, 4, generator=g, dtype=F64)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    s = replacement_score(gm.score_fn(sde), sde, inpainting_constraint(y, mask))(x, t)
    a, s2 = sde.alpha(t)[:, None], sde.sigma(t)[:, None] ** 2
    torch.testing.assert_close(s[:, K_IDX], -(x[:, K_IDX] - a * y[:, K_IDX]) / s2, rtol=1e-13, atol=0)
    torch.testing.assert_close(s[:, U_IDX], gm.score(x, sde, t)[:, U_IDX], rtol=1e-13, atol=0)


def test_projectors_are_the_orthogonal_decompositions():
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=F64)
    # Colorization: P = W^T diag(1, 0, 0) W with W the decoupled colour transform.
    W = COLOR_TRANSFORM
    torch.testing.assert_close(W @ W.T, torch.eye(3, dtype=F64))
    P = colorization_constraint(torch.zeros(2, 1, 4, 4, dtype=F64)).project
    expected = torch.einsum("ji,jk,bkhw->bihw", W, torch.diag(torch.tensor([1.0, 0, 0], dtype=F64)) @ W, x)
    torch.testing.assert_close(P(x), expected)
    # Super-resolution: idempotent, symmetric, and preserves the pooled image.
    P = super_resolution_constraint(torch.zeros(2, 3, 2, 2, dtype=F64), 2).project
    torch.testing.assert_close(P(P(x)), P(x))
    torch.testing.assert_close((P(x) * z).sum(), (x * P(z)).sum())
    torch.testing.assert_close(F.avg_pool2d(P(x), 2), F.avg_pool2d(x, 2))
    torch.testing.assert_close(F.avg_pool2d(x - P(x), 2), torch.zeros(2, 3, 2, 2, dtype=F64))


def _inpaint_gaussian(gm, sde, y_known, n, method, generator, zeta=1.0, callback=None):
    y = torch.zeros(n, 4, dtype=F64)
    y[:, K_IDX] = y_known
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    opts = {"zeta": zeta} if method == "dps" else {}
    out = inpaint(gm.score_fn(sde), sde, y, mask, method=method, **opts, sampler="euler_maruyama",
                  steps=200, generator=generator, callback=callback)
    assert torch.equal(out.x[:, K_IDX], y[:, K_IDX])  # known pixels kept exactly
    return out.x[:, U_IDX]


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=10.0)], ids=["vp", "ve"])
def test_replacement_follows_exact_marginals_when_blocks_are_independent(sde):
    gm, mu, cov = _gaussian(False)
    y_known = torch.tensor([0.8, 0.2], dtype=F64)
    mean, c = _conditional(mu, cov, y_known)
    seen = {}
    keep = lambda info: seen.setdefault("mid", info) if info["i"] == 100 else None  # noqa: E731
    xu = _inpaint_gaussian(gm, sde, y_known, 2000, "replacement", torch.Generator().manual_seed(4), callback=keep)
    # Halfway, the known coordinates follow p_t(x_K | y) = N(alpha y, sigma^2) and, the blocks being
    # independent, the unknown ones the unconditional marginal N(alpha mu_U, alpha^2 Sigma_UU + sigma^2).
    x_mid, t_mid = seen["mid"]["x"], seen["mid"]["t"][:1]
    a, s2 = sde.alpha(t_mid), sde.sigma(t_mid) ** 2
    torch.testing.assert_close(x_mid[:, K_IDX].mean(0), a * y_known, atol=0.1, rtol=0)
    torch.testing.assert_close(x_mid[:, K_IDX].var(0), s2.expand(2), atol=0.1 * s2.item(), rtol=0)
    cov_t = a**2 * cov[U_IDX][:, U_IDX] + s2 * torch.eye(2, dtype=F64)
    torch.testing.assert_close(torch.cov(x_mid[:, U_IDX].T), cov_t, atol=0.15, rtol=0)
    # 2000 samples: standard errors <= 0.03 (mean) and <= 0.05 (cov entries).
    torch.testing.assert_close(xu.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(xu.T), c, atol=0.15, rtol=0)


def test_replacement_and_dps_bias_on_correlated_gaussian():
    """Replacement conditions the unknown part on the noisy known part, not on y: on this
    strongly correlated Gaussian its mean misses the exact conditional mean by ~0.55 (docs/
    controllable.md); DPS (zeta = 1) cuts the mean error several-fold but stays biased."""
    sde = VPSDE()
    gm, mu, cov = _gaussian(True)
    y_known = torch.tensor([0.8, 0.2], dtype=F64)
    mean, c = _conditional(mu, cov, y_known)
    g = torch.Generator().manual_seed(5)
    rep = _inpaint_gaussian(gm, sde, y_known, 2000, "replacement", g)
    dps = _inpaint_gaussian(gm, sde, y_known, 2000, "dps", g, zeta=1.0)
    err_rep, err_dps = (rep.mean(0) - mean).norm().item(), (dps.mean(0) - mean).norm().item()
    err_prior = (mu[U_IDX] - mean).norm().item()  # ignoring y altogether
    assert 0.35 < err_rep < 0.75 < err_prior, (err_rep, err_prior)  # biased, but uses y
    assert err_dps < 0.5 * err_rep, (err_dps, err_rep)
    # Replacement over-disperses the unknown coordinates (towards the unconditional covariance).
    assert (torch.cov(rep.T).diagonal() > c.diagonal()).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_keeps_measurements(name):
    sde = VPSDE()
    gm = _image_mixture((3, 4, 4))
    score = _image_score(gm, sde)
    g = torch.Generator().manual_seed(6)
    opts = {"steps": 30} | ({"sampler_options": {"method": "rk4"}} if name == "ode" else {})
    opts = {} if name in ("dpm_adaptive", "gotta_go_fast") else opts  # adaptive: no steps
    truth = gm.sample(2, g).reshape(2, 3, 4, 4)
    mask = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).to(F64)
    x = inpaint(score, sde, truth, mask, sampler=name, generator=g, **opts).x
    assert x.shape == truth.shape and torch.isfinite(x).all()
    known = mask.expand_as(x).bool()
    assert torch.equal(x[known], truth[known])
    gray = truth.mean(1, keepdim=True)
    x = colorize(score, sde, gray, sampler=name, generator=g, **opts).x
    assert x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x.mean(1, keepdim=True), gray, rtol=0, atol=1e-12)
    low = F.avg_pool2d(truth, 2)
    res = super_resolve(score, sde, low, 2, sampler=name, generator=g, method="dps", zeta=0.5, **opts)
    assert res.nfe > 0 and res.x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(F.avg_pool2d(res.x, 2), low, rtol=0, atol=1e-12)


def test_bad_inputs_error_clearly():
    sde = VPSDE()
    score = _image_score(_image_mixture((3, 4, 4)), sde)
    y = torch.zeros(2, 3, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 5, 4\) does not broadcast.*\(2, 3, 4, 4\)"):
        inpainting_constraint(y, torch.ones(2, 3, 5, 4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        inpainting_constraint(y, torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        inpainting_constraint(y, [1, 0])
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        inpainting_constraint(y.numpy(), torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"gray must have shape \(B, 1, H, W\)"):
        colorization_constraint(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="factor must be >= 1"):
        super_resolution_constraint(torch.zeros(2, 3, 2, 2), 0)
    with pytest.raises(TypeError, match="factor must be an int"):
        super_resolution_constraint(torch.zeros(2, 3, 2, 2), 2.0)
    with pytest.raises(ValueError, match="not divisible by factor=3"):
        super_resolution_constraint(torch.zeros(2, 3, 2, 2), 3).project(torch.zeros(2, 3, 4, 4))
    con = inpainting_constraint(y, torch.ones(1, 1, 4, 4))
    t = torch.full((3,), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"x has shape \(3, 3, 4, 4\).*\(2, 3, 4, 4\)"):
        replacement_score(score, sde, con)(torch.zeros(3, 3, 4, 4, dtype=F64), t)
    with pytest.raises(ValueError, match="x has shape"):
        project(torch.zeros(2, 3, 8, 8, dtype=F64), con)
    with pytest.raises(ValueError, match="zeta must be a finite number > 0"):
        dps_score(score, sde, con, zeta=0.0)
    with pytest.raises(ValueError, match="method='exact' is not supported.*'repaint', 'replacement', 'smc'"):
        solve_inverse(score, sde, con, method="exact")
    with pytest.raises(ValueError, match="sampler"):
        solve_inverse(score, sde, con, sampler="nope")
