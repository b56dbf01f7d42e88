"""Metrics against closed forms: Frechet/W2 and KL of Gaussians, IS of one-hot predictions, KID/MMD/energy/SW2."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats
import torch

from sde.metrics import (
    FeatureStats,
    RunningStats,
    compute_feature_stats,
    energy_distance,
    frechet_distance,
    gaussian_kl,
    gaussian_w2,
    inception_score,
    kernel_inception_distance,
    mmd,
    sliced_wasserstein,
)

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_spd(d, seed):
    a = torch.randn(d, d, generator=gen(seed), dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


def test_frechet_of_a_set_with_itself_is_zero():
    x = torch.randn(400, 16, generator=gen(), dtype=F64) * 3 + 5
    stats = FeatureStats.from_features(x)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(stats, stats, method=method) == pytest.approx(0.0, abs=1e-8)


def test_frechet_matches_the_2x2_closed_form():
    # For 2x2 SPD products, tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) (Cayley-Hamilton).
    s1, s2 = random_spd(2, 1), random_spd(2, 2)
    m1, m2 = torch.tensor([0.3, -1.0], dtype=F64), torch.tensor([1.5, 0.2], dtype=F64)
    prod = s1 @ s2
    tr_sqrt = math.sqrt(prod.trace() + 2 * math.sqrt(torch.linalg.det(prod)))
    exact = float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)
    for method in ("eigh", "sqrtm"):
        fd = frechet_distance(FeatureStats(m1, s1, 10), FeatureStats(m2, s2, 10), method=method)
        assert fd == pytest.approx(exact, rel=1e-10)
        assert gaussian_w2(m1, s1, m2, s2, method=method) == pytest.approx(math.sqrt(exact), rel=1e-10)


def test_frechet_high_dim_methods_agree_and_diagonal_closed_form():
    s1, s2 = random_spd(32, 3), random_spd(32, 4)
    m = torch.zeros(32, dtype=F64)
    a = frechet_distance(FeatureStats(m, s1, 2), FeatureStats(m + 1, s2, 2), method="eigh")
    b = frechet_distance(FeatureStats(m, s1, 2), FeatureStats(m + 1, s2, 2), method="sqrtm")
    assert a == pytest.approx(b, rel=1e-8)
    v1, v2 = torch.rand(32, generator=gen(5), dtype=F64) + 0.1, torch.rand(32, generator=gen(6), dtype=F64) + 0.1
    exact = 32.0 + float((v1.sqrt() - v2.sqrt()).pow(2).sum())  # commuting covariances
    assert frechet_distance(FeatureStats(m, v1.diag(), 2), FeatureStats(m + 1, v2.diag(), 2)) == pytest.approx(exact)


def test_frechet_from_samples_converges_to_closed_form():
    s1, s2 = random_spd(3, 7), random_spd(3, 8)
    m1, m2 = torch.zeros(3, dtype=F64), torch.tensor([1.0, 0.0, -0.5], dtype=F64)
    exact = frechet_distance(FeatureStats(m1, s1, 2), FeatureStats(m2, s2, 2))
    x = torch.randn(40000, 3, generator=gen(1), dtype=F64) @ torch.linalg.cholesky(s1).T + m1
    y = torch.randn(40000, 3, generator=gen(2), dtype=F64) @ torch.linalg.cholesky(s2).T + m2
    fd = frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(y))
    assert fd == pytest.approx(exact, rel=0.05)


def test_singular_covariances_stay_finite():
    x = torch.randn(50, 4, generator=gen(), dtype=F64) @ torch.randn(4, 20, generator=gen(1), dtype=F64)  # rank 4
    stats = FeatureStats.from_features(x)
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(stats, stats, method=method) == pytest.approx(0.0, abs=1e-6)


def test_streaming_stats_equal_batch_stats():
    x = torch.randn(1003, 12, generator=gen(), dtype=F64) * 2 + 1e4  # large mean: naive sums would cancel
    running = RunningStats()
    for chunk in x.split(97):
        running.update(chunk)
    stats = running.finalize()
    assert stats.n == 1003
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(stats.cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)), rtol=1e-10, atol=1e-9)
    via_extractor = compute_feature_stats(lambda b: b * 2, x.split(200))
    torch.testing.assert_close(via_extractor.cov, stats.cov * 4, rtol=1e-10, atol=1e-8)


def test_stats_save_load_roundtrip_and_bad_file(tmp_path):
    stats = FeatureStats.from_features(torch.randn(30, 5, generator=gen(), dtype=F64))
    path = tmp_path / "sub" / "ref.npz"
    stats.save(path)
    back = FeatureStats.load(path)
    assert back.n == 30 and torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temp file left behind
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="missing arrays"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_kid_is_unbiased_and_detects_shift():
    x = torch.randn(600, 8, generator=gen(1), dtype=F64)
    y = torch.randn(600, 8, generator=gen(2), dtype=F64)
    mean, std = kernel_inception_distance(x, y, num_subsets=30, subset_size=150, generator=gen(3))
    assert abs(mean) < 3 * std / math.sqrt(30) + 1e-4  # an unbiased estimate centres on 0
    shifted, shifted_std = kernel_inception_distance(x, y + 1.0, num_subsets=30, subset_size=150, generator=gen(3))
    assert shifted > 10 * shifted_std / math.sqrt(30) and shifted > 50 * abs(mean)


def test_inception_score_one_hot_uniform_equals_number_of_classes():
    c = 7
    probs = torch.eye(c, dtype=F64).repeat(30, 1)  # each split still holds every class equally often
    mean, std = inception_score(probs, splits=3)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    constant = torch.full((60, c), 1.0 / c, dtype=F64)
    assert inception_score(constant, splits=2)[0] == pytest.approx(1.0)


@pytest.mark.parametrize("distance", ["mmd", "energy", "sw2"])
def test_sample_distances_zero_for_same_positive_for_shifted(distance):
    x = torch.randn(500, 3, generator=gen(1), dtype=F64)
    y = torch.randn(500, 3, generator=gen(2), dtype=F64)
    fn = {"mmd": mmd, "energy": energy_distance,
          "sw2": lambda a, b: sliced_wasserstein(a, b, num_projections=64, generator=gen(9)) ** 2}[distance]
    same, shifted = fn(x, y), fn(x, y + torch.tensor([1.0, 0.0, 0.0], dtype=F64))  # squared-distance scale
    assert abs(same) < 0.1 * shifted
    assert shifted > 0


def test_sliced_wasserstein_exact_for_a_translation_and_unequal_sizes():
    x = torch.randn(200, 4, generator=gen(1), dtype=F64)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    sw = sliced_wasserstein(x, x + v, num_projections=32, generator=gen(4))
    theta = torch.randn(4, 32, generator=gen(4), dtype=F64)
    theta = theta / theta.norm(dim=0)
    assert sw == pytest.approx(float((v @ theta).pow(2).mean().sqrt()), rel=1e-10)
    # The empirical law of x repeated twice is the law of x: distance exactly 0.
    assert sliced_wasserstein(x, torch.cat([x, x]), generator=gen(0)) == pytest.approx(0.0, abs=1e-12)
    a, b = torch.tensor([[0.0], [1.0]], dtype=F64), torch.tensor([[0.0], [0.5], [1.0]], dtype=F64)
    # Quantiles: a = 0 on (0, 1/2), 1 after; b = 0, 0.5, 1 on thirds. W2^2 = (1/6)(0.5^2) + (1/6)(0.5^2) = 1/12.
    assert sliced_wasserstein(a, b, num_projections=1, generator=gen(0)) == pytest.approx(math.sqrt(1 / 12))


def test_gaussian_kl_matches_scipy():
    mp, mq = torch.tensor([0.3], dtype=F64), torch.tensor([-0.4], dtype=F64)
    vp, vq = torch.tensor([0.7], dtype=F64), torch.tensor([1.9], dtype=F64)
    p, q = scipy.stats.norm(0.3, math.sqrt(0.7)), scipy.stats.norm(-0.4, math.sqrt(1.9))
    numeric, _ = scipy.integrate.quad(lambda z: p.pdf(z) * (p.logpdf(z) - q.logpdf(z)), -30, 30)
    assert float(gaussian_kl(mp, vp, mq, vq, diagonal=True)) == pytest.approx(numeric, rel=1e-8)
    assert float(gaussian_kl(mp, vp.diag(), mq, vq.diag())) == pytest.approx(numeric, rel=1e-8)
    # Full covariances: the Monte Carlo estimate of E_p[log p - log q] with scipy's densities.
    sp, sq = random_spd(3, 11), random_spd(3, 12)
    m = torch.tensor([0.5, -0.2, 1.0], dtype=F64)
    z = scipy.stats.multivariate_normal(m.numpy(), sp.numpy()).rvs(200000, random_state=0)
    log_ratio = (scipy.stats.multivariate_normal(m.numpy(), sp.numpy()).logpdf(z)
                 - scipy.stats.multivariate_normal(np.zeros(3), sq.numpy()).logpdf(z))
    kl = float(gaussian_kl(m, sp, torch.zeros(3, dtype=F64), sq))
    assert kl == pytest.approx(log_ratio.mean(), abs=4 * log_ratio.std() / math.sqrt(len(z)))
    # Diagonal and full agree on diagonal matrices; batched inputs broadcast.
    v1, v2 = torch.rand(2, 3, generator=gen(1), dtype=F64) + 0.2, torch.rand(2, 3, generator=gen(2), dtype=F64) + 0.2
    mm = torch.randn(2, 3, generator=gen(3), dtype=F64)
    full = gaussian_kl(mm, torch.diag_embed(v1), 0 * mm, torch.diag_embed(v2))
    torch.testing.assert_close(gaussian_kl(mm, v1, 0 * mm, v2, diagonal=True), full)
    assert full.shape == (2,)


def test_bad_input_errors_are_clear():
    x = torch.randn(10, 4, generator=gen(), dtype=F64)
    with pytest.raises(ValueError, match="needs at least 2"):
        FeatureStats.from_features(x[:1])
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(x[:, :3]))
    with pytest.raises(ValueError, match="feature sizes differ"):
        RunningStats().update(x).update(x[:, :3])
    for fn in (kernel_inception_distance, mmd, energy_distance, sliced_wasserstein):
        with pytest.raises(ValueError, match="feature sizes differ"):
            fn(x, x[:, :2])
    with pytest.raises(ValueError, match="needs at least 2"):
        mmd(x[:1], x)
    with pytest.raises(ValueError, match="at least 2 dims"):
        kernel_inception_distance(x[0], x)
    with pytest.raises(TypeError, match="floating-point"):
        energy_distance(x.long(), x)
    with pytest.raises(ValueError, match="rows summing to 1"):
        inception_score(x)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(FeatureStats.from_features(x), FeatureStats.from_features(x), method="svd")
