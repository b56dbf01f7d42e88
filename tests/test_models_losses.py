"""ScoreModel parametrizations and the DSM loss, checked against the exact mixture oracle."""

import math

import pytest
import torch
from torch import nn

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.losses import dsm_loss, sample_time
from sde.models import PARAMETRIZATIONS, ScoreModel, drop_labels
from sde.nets import MLP
from sde.sdes import FlowSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=10.0), "vp_cos": VPSDE(schedule="cosine"),
        "flow": FlowSDE()}


def _oracle() -> GaussianMixture:
    means = torch.tensor([[-0.6, 0.2], [0.5, -0.4], [0.3, 0.7]], dtype=F64)
    covs = torch.tensor(
        [[[0.04, 0.01], [0.01, 0.02]], [[0.03, -0.01], [-0.01, 0.05]], [[0.02, 0.0], [0.0, 0.02]]], dtype=F64
    )
    return GaussianMixture(means, covs, weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def _posterior_mean(gm, sde, x, t):
    """E[x0 | x_t] of a mixture, from its components' Gaussian posteriors (no score involved)."""
    a, s = sde.alpha(t), sde.sigma(t)
    eye = torch.eye(gm.D, dtype=x.dtype)
    C = a[:, None, None, None] ** 2 * gm.covs[None] + (s**2)[:, None, None, None] * eye  # (B, K, D, D)
    resid = x[:, None, :] - a[:, None, None] * gm.means[None]
    gain = a[:, None, None, None] * gm.covs[None] @ torch.linalg.inv(C)
    m = gm.means[None] + (gain @ resid[..., None])[..., 0]
    return torch.einsum("bk,bkd->bd", gm.posterior(x, sde, t), m)


class OracleNet(nn.Module):
    """A "net" that outputs the exact target of a parametrization: it inverts the noise label
    to t and the input scaling to x, so it also checks that both conventions are consistent."""

    def __init__(self, gm, sde, parametrization, sigma_data):
        super().__init__()
        self.gm, self.sde, self.p, self.sd = gm, sde, parametrization, sigma_data

    def forward(self, x_in, label):
        t = self.sde.t_from_log_snr(-8.0 * label)
        a, s = self.sde.alpha(t)[:, None], self.sde.sigma(t)[:, None]
        x = x_in * torch.sqrt(s**2 + a**2 * self.sd**2)
        x0 = _posterior_mean(self.gm, self.sde, x, t)
        if self.p == "x0":
            return x0
        if self.p == "edm":
            sk = s / a
            c_skip, c_out = self.sd**2 / (sk**2 + self.sd**2), sk * self.sd / torch.sqrt(sk**2 + self.sd**2)
            return (x0 - c_skip * x / a) / c_out
        score = self.gm.score(x, self.sde, t)
        if self.p == "velocity":  # E[alpha' x0 + sigma' eps | x_t], from the posterior mean (no score)
            d_alpha = self.sde.drift_coef(t)[:, None] * a
            d_sigma = (self.sde.diffusion(t)[:, None] ** 2 / 2 + self.sde.drift_coef(t)[:, None] * s**2) / s
            return d_alpha * x0 + d_sigma * (x - a * x0) / s
        return score if self.p == "score" else -s * score


def _noisy(gm, sde, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.02 + (sde.T - 0.02) * torch.rand(n, generator=g, dtype=F64)
    x, _ = sde.perturb(gm.sample(n, g), t, generator=g)
    return x, t


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("parametrization", sorted(PARAMETRIZATIONS))
def test_every_parametrization_recovers_the_exact_score(sde_name, parametrization):
    sde, gm = SDES[sde_name], _oracle()
    model = ScoreModel(OracleNet(gm, sde, parametrization, 0.7), sde, parametrization, sigma_data=0.7)
    x, t = _noisy(gm, sde)
    torch.testing.assert_close(model(x, t), gm.score(x, sde, t), rtol=1e-7, atol=1e-7)
    # denoise is Tweedie's posterior mean, computed here without the score
    torch.testing.assert_close(model.denoise(x, t), _posterior_mean(gm, sde, x, t), rtol=1e-7, atol=1e-7)


def test_noise_label_and_input_scale():
    sde = VPSDE()
    model = ScoreModel(MLP(2), sde)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=F64)
    x = torch.zeros(3, 2, dtype=F64)
    torch.testing.assert_close(model.noise_label(t, x), torch.log(sde.sigma(t) / sde.alpha(t)) / 4)
    torch.testing.assert_close(model.input_scale(t, x), 1 / torch.sqrt(sde.sigma(t) ** 2 + 0.25 * sde.alpha(t) ** 2))


class LabelNet(nn.Module):
    num_classes = 3

    def forward(self, x, label, y=None):
        y = torch.full((x.shape[0],), 3) if y is None else y
        return x * 0 + y[:, None].to(x)


def test_conditional_binds_labels():
    model = ScoreModel(LabelNet(), VESDE(), "score")
    x, t = torch.randn(4, 2, dtype=F64), torch.full((4,), 0.5, dtype=F64)
    assert torch.all(model.conditional(2)(x, t) == 2)
    assert torch.all(model(x, t) == 3)  # y=None is the null class
    y = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(model.conditional(y).denoise(x, t), model.denoise(x, t, y))
    with pytest.raises(ValueError, match="y must lie"):
        model.conditional(7)
    with pytest.raises(ValueError, match="batch size 4"):
        model.conditional(torch.tensor([0, 1]))(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        ScoreModel(MLP(2), VESDE()).conditional(1)
    with pytest.raises(ValueError, match="parametrization='v'"):
        ScoreModel(MLP(2), VESDE(), "v")


def test_drop_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (20000,), generator=g)
    out = drop_labels(y, 10, 0.2, generator=g)
    frac = (out == 10).double().mean().item()
    assert abs(frac - 0.2) < 0.01 and torch.equal(out[out != 10], y[out != 10])


# -- DSM loss --------------------------------------------------------------------------------
class Recorder:
    """A score_fn that records what dsm_loss fed it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append((x, t))
        return self.fn(x, t)


def test_exact_score_minimizes_the_loss():
    sde, gm = VPSDE(), _oracle()
    x0 = gm.sample(40000, torch.Generator().manual_seed(1))
    exact = Recorder(gm.score_fn(sde))
    base = dsm_loss(exact, sde, x0, generator=torch.Generator().manual_seed(2))
    x_t, t = exact.calls[0]
    s2 = sde.sigma(t)[:, None] ** 2
    for delta in (lambda x, t, s: 0.1 * s, lambda x, t, s: -0.1 * s, lambda x, t, s: 0.2 + 0 * s):

        def perturbed(x, t, delta=delta):
            s = gm.score(x, sde, t)
            return s + delta(x, t, s)

        loss = dsm_loss(perturbed, sde, x0, generator=torch.Generator().manual_seed(2))
        gap = (s2 * delta(x_t, t, gm.score(x_t, sde, t)) ** 2).mean()  # E[sigma^2 |delta|^2] / D
        assert loss > base
        assert abs((loss - base) / gap - 1) < 0.15


def _uniform_time_g2_loss(score, sde, x0, eps, g):
    """Song's g^2-weighted DSM loss with t ~ U(eps, T), written out here (no recipe code)."""
    t = eps + torch.rand(x0.shape[0], generator=g, dtype=F64) * (sde.T - eps)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    z = torch.randn(x0.shape, generator=g, dtype=F64)
    x = a * x0 + s * z
    return (sde.diffusion(t) ** 2 * ((score(x, t) + z / s) ** 2).mean(1)).mean()


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "flow"])
def test_importance_sampling_is_unbiased(sde_name):
    sde, gm = SDES[sde_name], _oracle()
    g = torch.Generator().manual_seed(3)

    def score(x, t):  # not the exact score, so the loss depends on the weighting
        return 0.8 * gm.score(x, sde, t)

    def estimates(loss):
        vals = torch.stack([loss(gm.sample(2000, g)) for _ in range(40)])
        return vals.mean(), vals.std() / math.sqrt(len(vals))

    m_u, se_u = estimates(lambda x0: _uniform_time_g2_loss(score, sde, x0, 1e-3, g))
    m_is, se_is = estimates(lambda x0: dsm_loss(score, sde, x0, weighting="likelihood", eps=1e-3, generator=g))
    assert abs(m_u - m_is) < 4 * math.hypot(se_u, se_is)
    assert se_is < se_u  # and it is the lower-variance estimator
    assert abs(m_u - m_is) / m_u < 0.05


def test_importance_sampling_time_density():
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    t, r = sample_time(sde, 200000, weighting="likelihood", eps=1e-3, generator=g, dtype=F64)
    w = r * sde.sigma(t) ** 2 / sde.diffusion(t) ** 2  # the importance weight: r = w g^2 / sigma^2
    # E_q[w f] = E_U[f] for f = t and f = t^2
    for k in (1, 2):
        exact = (1 - 1e-3 ** (k + 1)) / ((k + 1) * (1 - 1e-3))
        assert abs((w * t**k).mean().item() - exact) < 0.01 * exact
    lam = sde.log_snr(t)  # uniform in log-SNR: quartiles at equal log-SNR spacing
    lo, hi = sde.log_snr(torch.tensor([1e-3, 1.0], dtype=F64))
    q = torch.quantile(lam, torch.tensor([0.25, 0.5, 0.75], dtype=F64))
    torch.testing.assert_close(q, hi + (lo - hi) * torch.tensor([0.25, 0.5, 0.75], dtype=F64), atol=0.05, rtol=0)


def test_reduce_and_bad_arguments():
    sde, gm = VESDE(), _oracle()
    x0 = gm.sample(100, torch.Generator().manual_seed(0))
    fn = gm.score_fn(sde)
    mean = dsm_loss(fn, sde, x0, generator=torch.Generator().manual_seed(1))
    total = dsm_loss(fn, sde, x0, reduce="sum", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(total, 2 * mean)
    with pytest.raises(ValueError, match="reduce='max'"):
        dsm_loss(fn, sde, x0, reduce="max")
    with pytest.raises(ValueError, match="weighting='g2'"):
        dsm_loss(fn, sde, x0, weighting="g2")
    with pytest.raises(TypeError, match="weighting must be"):
        dsm_loss(fn, sde, x0, weighting=2.0)
    with pytest.raises(TypeError, match="importance_sampling"):
        dsm_loss(fn, sde, x0, importance_sampling=True)  # the old booleans are gone
    with pytest.raises(ValueError, match="eps"):
        dsm_loss(fn, sde, x0, eps=0.0)
    with pytest.raises(TypeError, match="x0"):
        dsm_loss(fn, sde, x0.long())


def _relative_error(model, gm, sde, n=4000, seed=7):
    """E[sigma^2 |s_model - s|^2] / E[sigma^2 |s|^2] over t ~ U(0.01, 1), x_t ~ p_t."""
    x, t = _noisy(gm, sde, n, seed)
    x, t = x.float(), t.float()
    exact = gm.score(x.double(), sde, t.double()).float()
    with torch.no_grad():
        err = (sde.sigma(t)[:, None] ** 2 * (model(x, t) - exact) ** 2).sum()
    return (err / (sde.sigma(t)[:, None] ** 2 * exact**2).sum()).item()


@pytest.mark.slow
def test_training_with_dsm_learns_the_oracle_score():
    torch.manual_seed(0)  # MLP initialization (the data and times use local generators)
    sde, gm = VPSDE(), _oracle().to(dtype=torch.float32)
    model = ScoreModel(MLP(2, hidden=64, depth=2), sde, "eps")
    before = _relative_error(model, gm, sde)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = dsm_loss(model, sde, gm.sample(128, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _relative_error(model, gm, sde)
    assert after < 0.1 * before and after < 0.05, (before, after)  # measured: 1.22 -> 0.019


def test_float64_end_to_end():
    sde = VPSDE()
    model = ScoreModel(MLP(2, hidden=16, depth=1), sde).double()
    x0 = torch.randn(8, 2, dtype=F64)
    loss = dsm_loss(model, sde, x0, generator=torch.Generator().manual_seed(0), weighting="likelihood")
    assert loss.dtype == F64 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("parametrization", ["eps", "edm"])
def test_unet_score_model_on_digits_batch(parametrization):
    from sde.data import load_dataset
    from sde.nets import UNet

    ds = load_dataset("digits", split="test")
    x0, y = ds.data[:8], ds.labels[:8]
    model = ScoreModel(UNet(base_channels=16, num_classes=10), VPSDE(), parametrization)
    g = torch.Generator().manual_seed(0)
    loss = dsm_loss(model, model.sde, x0, y=drop_labels(y, 10, 0.5, generator=g), generator=g)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    t = torch.full((8,), 0.3)
    assert model.conditional(3)(x0, t).shape == x0.shape and model.denoise(x0, t).shape == x0.shape
