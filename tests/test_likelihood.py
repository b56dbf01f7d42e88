"""Likelihoods, bits/dim, encode/decode and interpolation, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.interpolation import interpolate, lerp, slerp
from sde.likelihood import (
    bits_per_dim,
    dataset_bits_per_dim,
    decode,
    encode,
    joint_rms_norm,
    log_likelihood,
    mixed_rms_norm,
)

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=50.0)}


def _gaussian(D: int, seed: int, mean_scale: float = 1.0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    cov = A @ A.T / D + 0.2 * torch.eye(D, dtype=F64)
    mu = mean_scale * torch.randn(1, D, generator=g, dtype=F64)
    return GaussianMixture(mu, cov[None])


def _model_logp_closed_form(gm: GaussianMixture, sde, x, eps: float):
    """Exact density of 'prior pushed back through the PF-ODE' for Gaussian data N(mu, Sigma).

    The PF-ODE of Gaussian data is linear and diagonal in Sigma's eigenbasis U, so its flow from
    eps to T is the affine map Phi(x) = a_T mu + U diag(sqrt(c_T / c_eps)) U^T (x - a_eps mu),
    c_t = a_t^2 lambda + s_t^2, which carries p_eps onto p_T. Hence
    log p_model(x) = log p_eps(x) + log prior(Phi(x)) - log p_T(Phi(x)).
    """
    mu, lam, U = gm.means[0], gm.eigvals[0], gm.eigvecs[0]
    t = torch.tensor([eps, sde.T], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    c_eps, c_T = a[0] ** 2 * lam + s[0] ** 2, a[1] ** 2 * lam + s[1] ** 2
    z = a[1] * mu + ((x - a[0] * mu) @ U * torch.sqrt(c_T / c_eps)) @ U.T
    logp = gm.log_prob(x, sde, eps) + sde.prior_logp(z) - gm.log_prob(z, sde, sde.T)
    return logp, z


@pytest.mark.parametrize("name", SDES)
def test_gaussian_exact_divergence_matches_closed_form(name):
    sde, gm, D = SDES[name](), _gaussian(3, 0), 3
    x = gm.sample(6, torch.Generator().manual_seed(1))
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    want, z = _model_logp_closed_form(gm, sde, x, 1e-5)
    assert res.logp.dtype == F64 and res.logp.shape == (6,)
    assert (res.logp - want).abs().max() < 1e-3 * D
    assert (res.logp - want).abs().max() < 3e-4  # well inside the per-dimension budget
    assert ((res.z - z).abs().max() / sde.prior_std) < 1e-4  # the latent is the exact flow map's
    # With a centred mean and VE's sigma_max >> data, the prior mismatch is negligible and the
    # model density is the data density itself (sub-VP/VP: p_T = N(a_T^2 Sigma + s_T^2 I) ~ N(0, I)).
    gm0 = _gaussian(3, 0, mean_scale=0.0)
    res0 = log_likelihood(gm0.score_fn(sde), sde, x, divergence="exact")
    assert (res0.logp - gm0.log_prob(x)).abs().max() < 1e-3 * D


def test_error_norms_default_is_the_joint_rms_and_both_are_exact():
    """The default step control is scipy's one RMS over (x, delta); the mixed norm takes more steps."""
    sde, gm, D = VPSDE(), _gaussian(8, 3), 8
    x = gm.sample(16, torch.Generator().manual_seed(4))
    want, _ = _model_logp_closed_form(gm, sde, x, 1e-5)
    default = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    joint = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", options={"norm": joint_rms_norm})
    mixed = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", options={"norm": mixed_rms_norm})
    assert default.nfe == joint.nfe and torch.allclose(default.logp, joint.logp, rtol=0, atol=1e-9)
    assert mixed.nfe > default.nfe  # delta controlled on its own costs steps
    for res in (default, mixed):
        assert (res.logp - want).abs().max() < 1e-3 * D
    # the norms themselves: one RMS over all entries vs the max of the two parts' RMS
    xs, ds = torch.full((2, 3), 2.0, dtype=F64), torch.zeros(2, dtype=F64)
    assert joint_rms_norm((xs, ds)).item() == pytest.approx(math.sqrt(4 * 6 / 8))
    assert mixed_rms_norm((xs, ds)).item() == pytest.approx(2.0)


def test_prior_mismatch_is_real_and_corrected():
    """VE with sigma_max = 3 leaves p_T far from the prior: the naive answer is off, ours is not."""
    sde, gm = VESDE(sigma_max=3.0), _gaussian(3, 2)
    x = gm.sample(5, torch.Generator().manual_seed(3))
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    want, _ = _model_logp_closed_form(gm, sde, x, 1e-5)
    assert (res.logp - want).abs().max() < 3e-4
    assert (res.logp - gm.log_prob(x)).abs().max() > 0.05


@pytest.mark.parametrize("name", SDES)
def test_mixture_2d_matches_oracle(name):
    sde = SDES[name]()
    means = torch.tensor([[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]], dtype=F64)
    stds, weights = torch.tensor([0.3, 0.5, 0.4], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    gm = GaussianMixture(means, stds=stds, weights=weights)
    x = gm.sample(8, torch.Generator().manual_seed(4))
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    # Replace the prior by the true p_T at the returned latent: what remains is the divergence
    # integral, which must reproduce log p_0 exactly (up to solver error and p_eps ~ p_0).
    corrected = res.logp - sde.prior_logp(res.z) + gm.log_prob(res.z, sde, sde.T)
    assert (corrected - gm.log_prob(x)).abs().max() < 1e-3 * 2
    assert res.nfe > 0 and res.n_vjp == 2 * res.nfe


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_and_spread_shrinks(probe):
    sde, gm, R = VPSDE(), _gaussian(4, 5, mean_scale=0.0), 400
    x = gm.sample(1, torch.Generator().manual_seed(6)).expand(R, 4).contiguous()  # R independent probe draws
    exact = log_likelihood(gm.score_fn(sde), sde, x[:1], divergence="exact").logp[0]
    g = torch.Generator().manual_seed(7)
    one = log_likelihood(gm.score_fn(sde), sde, x, probe=probe, n_probes=1, generator=g).logp
    four = log_likelihood(gm.score_fn(sde), sde, x, probe=probe, n_probes=4, generator=g).logp
    assert one.std() > 1e-3  # the estimator is noisy, so the checks below mean something
    for est in (one, four):
        assert (est.mean() - exact).abs() < 4 * est.std() / math.sqrt(R)
    assert 0.4 < (four.std() / one.std()).item() < 0.6  # 1 / sqrt(4), within sampling error


def test_nfe_counts_score_calls_exactly_and_batching_agrees():
    sde, gm = VPSDE(), _gaussian(2, 8)
    calls = []

    def score_fn(x, t):
        calls.append(x.shape[0])
        return gm.score(x, sde, t)

    x = gm.sample(6, torch.Generator().manual_seed(9))
    full = log_likelihood(score_fn, sde, x, divergence="exact")
    assert full.nfe == len(calls) and full.n_vjp == 2 * full.nfe
    calls.clear()
    chunked = log_likelihood(score_fn, sde, x, divergence="exact", batch_size=4)
    assert chunked.nfe == len(calls) and calls.count(4) > 0 and calls.count(2) > 0 and max(calls) == 4
    assert (chunked.logp - full.logp).abs().max() < 3e-4
    hutch = log_likelihood(score_fn, sde, x[:2], n_probes=3, generator=torch.Generator().manual_seed(0))
    assert hutch.n_vjp == 3 * hutch.nfe


def test_float32_follows_input_and_generator_reproducible():
    sde, gm = VPSDE(), _gaussian(3, 10).to(dtype=torch.float32)
    x = gm.sample(4, torch.Generator().manual_seed(11))
    a = log_likelihood(gm.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(0))
    b = log_likelihood(gm.score_fn(sde), sde, x, generator=torch.Generator().manual_seed(0))
    assert a.logp.dtype == torch.float32 and a.z.dtype == torch.float32
    assert torch.equal(a.logp, b.logp)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_encode_decode_round_trip(name):
    sde = SDES[name]()
    gm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64), stds=0.4)
    x = gm.sample(6, torch.Generator().manual_seed(12))
    ode = dict(rtol=1e-7, atol=1e-7)
    z = encode(gm.score_fn(sde), sde, x, **ode)
    assert (z - x).abs().max() > 0.1  # the map is not the identity
    assert (decode(gm.score_fn(sde), sde, z, **ode) - x).abs().max() < 1e-5


def test_bits_per_dim_uniform_model_is_log2_levels():
    g = torch.Generator().manual_seed(13)
    k = torch.randint(0, 256, (5, 3, 4, 4), generator=g)
    y = 2.0 * (k + torch.rand(k.shape, generator=g, dtype=F64)) / 256 - 1.0
    D = y[0].numel()
    logp_uniform = torch.full((5,), -D * math.log(2.0), dtype=F64)  # U([-1, 1]^D)
    assert torch.allclose(bits_per_dim(logp_uniform, D), torch.full((5,), 8.0, dtype=F64), atol=1e-12)
    assert torch.allclose(bits_per_dim(logp_uniform, y), torch.full((5,), 8.0, dtype=F64), atol=1e-12)
    zero = torch.zeros(5, dtype=F64)  # U([0, 1]^D) in data space, 16 levels
    assert torch.allclose(bits_per_dim(zero, D, levels=16, scale=1.0), torch.full((5,), 4.0, dtype=F64))


def test_dataset_bits_per_dim_matches_dequantized_oracle():
    sde = VPSDE()
    gm = GaussianMixture(torch.zeros(1, 2, dtype=F64), stds=0.5)
    k = torch.randint(0, 256, (6, 2), generator=torch.Generator().manual_seed(14))
    mean, stderr = dataset_bits_per_dim(
        gm.score_fn(sde), sde, k, repeats=2, divergence="exact", dtype=F64, generator=torch.Generator().manual_seed(15)
    )
    g = torch.Generator().manual_seed(15)  # replay the dequantization noise
    per = []
    for _ in range(2):
        y = 2.0 * (k + torch.rand(k.shape, generator=g, dtype=F64)) / 256 - 1.0
        per.append(bits_per_dim(gm.log_prob(y), 2))
    per = torch.stack(per).mean(0)
    assert abs(mean - per.mean().item()) < 1e-3
    assert abs(stderr - (per.std() / math.sqrt(6)).item()) < 1e-3
    # The same data given as floats k / 255 in [0, 1] is read identically.
    g = torch.Generator().manual_seed(15)
    mean_f, _ = dataset_bits_per_dim(gm.score_fn(sde), sde, k.to(F64) / 255, repeats=2, divergence="exact", generator=g)
    assert abs(mean_f - mean) < 1e-6


def test_slerp_and_lerp_blends():
    z0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    z1 = torch.tensor([[0.0, 2.0]], dtype=F64)
    w = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    s = slerp(z0, z1, w)
    assert torch.allclose(s[0], z0) and torch.allclose(s[2], z1)
    assert torch.allclose(s[1], torch.tensor([[1.5 / math.sqrt(2), 1.5 / math.sqrt(2)]], dtype=F64))
    assert torch.allclose(lerp(z0, z1, w)[1], torch.tensor([[0.5, 1.0]], dtype=F64))
    same = slerp(z0, 3 * z0, w)  # parallel: no division by sin(0)
    assert torch.isfinite(same).all() and torch.allclose(same[1], 2 * z0)


@pytest.mark.parametrize("kind", ["slerp", "linear"])
def test_interpolate_hits_end_points(kind):
    sde = VPSDE()
    gm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64), stds=0.4)
    x = gm.sample(4, torch.Generator().manual_seed(16))
    path = interpolate(gm.score_fn(sde), sde, x[:2], x[2:], 5, kind=kind, rtol=1e-7, atol=1e-7)
    assert path.shape == (5, 2, 2)
    assert (path[0] - x[:2]).abs().max() < 1e-5 and (path[-1] - x[2:]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergence="trace"), "divergence='trace'.*exact.*hutchinson"),
        (dict(probe="uniform"), "probe='uniform'.*gaussian.*rademacher"),
        (dict(n_probes=0), "n_probes"),
        (dict(rtol=0.0), "rtol"),
        (dict(atol=-1e-5), "atol"),
        (dict(eps=0.0), "eps"),
        (dict(eps=1.0), "eps"),
        (dict(method="rk45"), "method"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_fail_early(kwargs, match):
    sde, gm = VPSDE(), _gaussian(2, 0)
    calls = []
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=match):
        log_likelihood(lambda x, t: calls.append(1) or gm.score(x, sde, t), sde, x, **kwargs)
    assert not calls


def test_bad_bits_per_dim_and_data_inputs():
    logp = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(logp, 0)
    with pytest.raises(ValueError, match="num_dims.*batch 3"):
        bits_per_dim(logp, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="num_dims"):
        bits_per_dim(logp, 2.5)
    sde, gm = VPSDE(), _gaussian(2, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dataset_bits_per_dim(gm.score_fn(sde), sde, torch.full((2, 2), -0.5, dtype=F64))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        dataset_bits_per_dim(gm.score_fn(sde), sde, torch.full((2, 2), 256))
    with pytest.raises(ValueError, match="same shape"):
        interpolate(gm.score_fn(sde), sde, torch.zeros(2, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), 3)
    with pytest.raises(ValueError, match="kind"):
        interpolate(gm.score_fn(sde), sde, torch.zeros(2, 2, dtype=F64), torch.zeros(2, 2, dtype=F64), 3, kind="x")
