"""Training recipes of dsm_loss (sde.losses.WEIGHTINGS) against closed forms on a Gaussian oracle.

Each recipe claims L = int w(lambda) e(lambda) d lambda (docs/recipes.md). For Gaussian data
N(mu, diag c^2) and the score k * s_exact, the eps-error per dimension is closed form:
e_d(lambda) = (1 - k sigma^2 / v_d)^2 + k^2 sigma^2 alpha^2 c_d^2 / v_d^2, v_d = alpha^2 c_d^2 + sigma^2;
k = 1 is the irreducible DSM error of the exact oracle score. The weights w(lambda) are written
here from the table in the docs, not taken from the recipe code.
"""

import math

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.likelihood import log_likelihood
from sde.losses import TIME_UNIFORMS, WEIGHTINGS, dsm_loss, get_weighting, sample_time
from sde.sdes import FlowSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=10.0), "vp_cos": VPSDE(schedule="cosine"),
        "flow": FlowSDE()}
MU = torch.tensor([0.3, -0.5], dtype=F64)
STD = torch.tensor([0.4, 0.9], dtype=F64)
EPS = 1e-3


def _gaussian() -> GaussianMixture:
    return GaussianMixture(MU[None], stds=STD[None])


def _lam_range(sde, eps=EPS):
    l_eps, l_T = sde.log_snr(torch.tensor([eps, sde.T], dtype=F64)).unbind()
    return float(l_T), float(l_eps)


def _stated_weight(name, sde, lam, eps=EPS, shift=0.0):
    """w(lambda) of docs/recipes.md, written out independently of sde/losses.py (``shift``: the cosine density's
    log-SNR shift s of eps and v, p = sech((lambda - s) / 2) / (2 pi) truncated)."""
    lo, hi = _lam_range(sde, eps)
    t = sde.t_from_log_snr(lam).clamp(eps, sde.T)
    s, g2 = sde.sigma(t), sde.diffusion(t) ** 2
    uniform_t = s**2 / (g2 * (sde.T - eps))  # p(lambda) of t ~ U(eps, T): dt/dlambda = -sigma^2 / g^2
    normal = torch.distributions.Normal(2.4, 2.4)
    edm_p = normal.log_prob(lam).exp() / (normal.cdf(torch.tensor(hi)) - normal.cdf(torch.tensor(lo)))
    sech = 1 / torch.cosh((lam - shift) / 2)
    cos_mass = (math.atan(math.exp(-(lo - shift) / 2)) - math.atan(math.exp(-(hi - shift) / 2))) * 4
    snr = torch.exp(lam)
    return {
        "sigma2": uniform_t,
        "likelihood": torch.full_like(lam, 1 / (sde.T - eps)),
        "edm": edm_p * (1 + 1 / (snr * 0.25)),
        "eps": sech / cos_mass,
        "v": sech / cos_mass * (1 + 1 / snr),
        "min_snr": uniform_t * torch.clamp(5.0 / snr, max=1.0),
        "flow": uniform_t * (g2 / (2 * s)) ** 2,  # || v_hat - (alpha' x0 + sigma' eps) ||^2
    }[name]


def _eps_error(sde, lam, k):
    """E || eps_hat - eps ||^2 / D for the score k * exact of N(MU, diag STD^2) (reduce="mean")."""
    t = sde.t_from_log_snr(lam)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    v = a**2 * STD**2 + s**2
    return ((1 - k * s**2 / v) ** 2 + k**2 * s**2 * a**2 * STD**2 / v**2).mean(1)


def _quadrature(name, sde, k, n=200001, shift=0.0):
    lo, hi = _lam_range(sde)
    lam = torch.linspace(lo, hi, n, dtype=F64)
    return torch.trapezoid(_stated_weight(name, sde, lam, shift=shift) * _eps_error(sde, lam, k), lam).item()


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_stated_weight_matches_the_recipe(name, sde_name):
    sde = SDES[sde_name]
    lo, hi = _lam_range(sde)
    lam = torch.linspace(lo + 1e-6, hi - 1e-6, 257, dtype=F64)
    got = WEIGHTINGS[name].weight(sde, lam, EPS)
    torch.testing.assert_close(got, _stated_weight(name, sde, lam), rtol=1e-5, atol=0)  # t(lambda) round trip
    # p(lambda) is a density on [lambda(T), lambda(eps)]
    dense = torch.linspace(lo, hi, 200001, dtype=F64)
    mass = torch.trapezoid(WEIGHTINGS[name].density.pdf(sde, dense, EPS), dense).item()
    assert abs(mass - 1) < 1e-4, mass


def _monte_carlo_loss(sde, weighting, k):
    """Mean and standard error of dsm_loss over 8 batches of 20000 Gaussian points, score k * exact."""
    gm = _gaussian()
    exact = gm.score_fn(sde)
    g = torch.Generator().manual_seed(11)
    vals = torch.stack([dsm_loss(lambda x, t: k * exact(x, t), sde, gm.sample(20000, g), weighting=weighting,
                                 eps=EPS, generator=g) for _ in range(8)])
    return vals.mean().item(), vals.std().item() / math.sqrt(len(vals))


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
@pytest.mark.parametrize("k", [1.0, 0.8])
def test_expected_loss_is_the_stated_integral(name, sde_name, k):
    """Monte Carlo of dsm_loss (its sampler, its weights, the oracle score) vs quadrature of w e."""
    sde = SDES[sde_name]
    mc, se = _monte_carlo_loss(sde, name, k)
    quad = _quadrature(name, sde, k)
    assert abs(mc - quad) < 4 * se + 1e-4 * abs(quad), (mc, se, quad)


@pytest.mark.parametrize("sde_name", ["vp", "flow"])
@pytest.mark.parametrize("name", ["eps", "v"])
@pytest.mark.parametrize("shift", [-1.5, 3.0])
def test_shifted_cosine_density(name, sde_name, shift):
    """The cosine density moved by ``shift`` in log-SNR (Hoogeboom et al. 2023): the stated w, a unit mass, draws
    whose mean log-SNR is the density's, and the Monte Carlo loss equal to the quadrature of w e."""
    sde = SDES[sde_name]
    recipe = get_weighting(name, shift=shift)
    lo, hi = _lam_range(sde)
    lam = torch.linspace(lo + 1e-6, hi - 1e-6, 257, dtype=F64)
    torch.testing.assert_close(recipe.weight(sde, lam, EPS), _stated_weight(name, sde, lam, shift=shift),
                               rtol=1e-5, atol=0)
    dense = torch.linspace(lo, hi, 200001, dtype=F64)
    p = recipe.density.pdf(sde, dense, EPS)
    assert abs(torch.trapezoid(p, dense).item() - 1) < 1e-4
    t, _ = recipe.sample(sde, 100000, eps=EPS, generator=torch.Generator().manual_seed(1), dtype=F64)
    drawn = sde.log_snr(t)
    assert abs(drawn.mean().item() - torch.trapezoid(p * dense, dense).item()) < 4 * drawn.std().item() / 100000**0.5
    mc, se = _monte_carlo_loss(sde, recipe, 0.8)
    quad = _quadrature(name, sde, 0.8, shift=shift)
    assert abs(mc - quad) < 4 * se + 1e-4 * abs(quad), (mc, se, quad)
    assert abs(quad - _quadrature(name, sde, 0.8)) > 8 * se  # the shift changes the loss (it is not ignored)


def test_the_recipes_differ():
    """The same model scores differently under different recipes (the weighting is not ignored)."""
    sde = VPSDE()
    values = {name: _quadrature(name, sde, 0.8, n=20001) for name in WEIGHTINGS}
    assert len({round(v, 6) for v in values.values()}) == len(values), values


# -- the two recipes that existed before: the same numbers as the old formulas --------------------------------
def _old_sigma2(score, sde, x0, eps, g):
    t = (eps + torch.rand(x0.shape[0], generator=g, dtype=F64) * (sde.T - eps)).to(x0.dtype)
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s = sde.sigma(t)[:, None]
    x = sde.alpha(t)[:, None] * x0 + s * z
    return ((s * score(x, t) + z) ** 2).mean(1).mean()


def _old_likelihood(score, sde, x0, eps, g):
    """Song's g^2 weighting with t uniform in log-SNR and weight Z / ((T - eps) g^2 / sigma^2)."""
    u = torch.rand(x0.shape[0], generator=g, dtype=F64)
    l_eps, l_T = sde.log_snr(torch.tensor([eps, sde.T], dtype=F64)).unbind()
    t = sde.t_from_log_snr(l_eps + u * (l_T - l_eps)).clamp(eps, sde.T)
    w = (l_eps - l_T) / ((sde.T - eps) * sde.diffusion(t) ** 2 / sde.sigma(t) ** 2)
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s = sde.sigma(t)[:, None]
    x = sde.alpha(t)[:, None] * x0 + s * z
    return (w * sde.diffusion(t) ** 2 / sde.sigma(t) ** 2 * ((s * score(x, t) + z) ** 2).mean(1)).mean()


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("name,old", [("sigma2", _old_sigma2), ("likelihood", _old_likelihood)])
def test_sigma2_and_likelihood_are_the_old_losses(name, old, sde_name):
    sde, gm = SDES[sde_name], _gaussian()
    x0 = gm.sample(512, torch.Generator().manual_seed(0))

    def score(x, t):
        return 0.7 * gm.score(x, sde, t) + 0.1

    new = dsm_loss(score, sde, x0, weighting=name, eps=1e-5, generator=torch.Generator().manual_seed(5))
    ref = old(score, sde, x0, 1e-5, torch.Generator().manual_seed(5))
    assert abs(new.item() - ref.item()) <= 1e-12 * abs(ref.item())


def test_get_weighting_parameters():
    assert get_weighting("min_snr", gamma=1.0).gamma == 1.0 and WEIGHTINGS["min_snr"].gamma == 5.0
    assert get_weighting("edm", p_mean=-0.4).p_mean == -0.4
    assert get_weighting("eps", shift=-2.0).density.shift == -2.0 and WEIGHTINGS["eps"].shift == 0.0  # signed
    with pytest.raises(ValueError, match="'shift'"):
        get_weighting("sigma2", shift=1.0)
    with pytest.raises(ValueError, match="'gamma'"):
        get_weighting("edm", gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        get_weighting("min_snr", gamma=-1.0)
    sde = VPSDE()
    t, r = sample_time(sde, 1000, weighting=get_weighting("min_snr", gamma=1.0), generator=torch.Generator())
    torch.testing.assert_close(r, torch.clamp(torch.exp(-sde.log_snr(t)), max=1.0))
    with pytest.raises(ValueError, match="eps"):
        sample_time(sde, 4, eps=1.5)


# -- low-discrepancy times (Kingma et al. 2021, VDM): unbiased, one time per 1/B stratum, lower variance ---------
def test_low_discrepancy_times_fill_every_stratum():
    g = torch.Generator().manual_seed(3)
    u = TIME_UNIFORMS["low_discrepancy"](64, g, None)
    assert u.dtype == F64 and ((u >= 0) & (u < 1)).all()
    strata = torch.sort(torch.floor(u * 64)).values
    torch.testing.assert_close(strata, torch.arange(64, dtype=F64))  # exactly one u in each [i/B, (i+1)/B)
    shifts = torch.stack([TIME_UNIFORMS["low_discrepancy"](8, g, None)[0] for _ in range(4000)])
    assert abs(shifts.mean().item() - 0.5) < 0.02 and abs(shifts.var().item() - 1 / 12) < 0.01  # u_0 ~ U(0, 1)
    with pytest.raises(ValueError, match="time_sampling.*sobol"):
        dsm_loss(lambda x, t: x, VPSDE(), torch.zeros(4, 2), time_sampling="sobol")
    with pytest.raises(ValueError, match="time_sampling"):
        sample_time(VPSDE(), 4, time_sampling="grid")


@pytest.mark.parametrize("name,sde_name,max_ratio", [("likelihood", "vp", 1.0), ("sigma2", "ve", 1.05),
                                                     ("flow", "flow", 0.85), ("edm", "vp", 0.85)])
def test_low_discrepancy_loss_is_unbiased_with_lower_variance(name, sde_name, max_ratio):
    """The same expected loss as iid times (the stated integral), and a smaller spread of batch losses where the
    time dominates it (measured ratios of the spreads: likelihood 0.87, sigma2 on VE 0.95, flow 0.69, edm 0.53; the
    rest is the noise z and x0, which stratifying t cannot remove)."""
    sde, gm = SDES[sde_name], _gaussian()
    exact = gm.score_fn(sde)

    def spread(time_sampling):
        g = torch.Generator().manual_seed(17)
        vals = torch.stack([dsm_loss(lambda x, t: 0.8 * exact(x, t), sde, gm.sample(256, g), weighting=name,
                                     eps=EPS, generator=g, time_sampling=time_sampling) for _ in range(400)])
        return vals.mean().item(), vals.std().item()

    (m_ld, s_ld), (_, s_iid) = spread("low_discrepancy"), spread("iid")
    assert abs(m_ld - _quadrature(name, sde, 0.8)) < 4 * s_ld / math.sqrt(400), (m_ld, s_ld)
    assert s_ld < max_ratio * s_iid, (s_ld, s_iid)


# -- the likelihood weighting bounds -log p (Song, Durkan, Murray & Ermon 2021, Thm. 2) ------------------------
def _elbo(sde, gm, k, n_batches=16, batch=20000):
    """E_x[-ELBO(x)] = E[-log pi(x_T)] + (T - eps)/2 * L_likelihood(sum) - D log(sigma(T) / sigma(eps)).

    The last term is -1/2 int_eps^T E[g^2 || grad log p_0t ||^2 + 2 div f] dt = -D/2 int (g^2/sigma^2 + 2 f) dt,
    and g^2 / sigma^2 + 2 f = d/dt (2 log sigma)."""
    exact = gm.score_fn(sde)
    g = torch.Generator().manual_seed(4)
    vals = torch.stack([dsm_loss(lambda x, t: k * exact(x, t), sde, gm.sample(batch, g), weighting="likelihood",
                                 reduce="sum", eps=EPS, generator=g) for _ in range(n_batches)])
    D = MU.numel()
    ends = torch.tensor([EPS, sde.T], dtype=F64)
    (a0, aT), (s0, sT) = sde.alpha(ends), sde.sigma(ends)
    prior_var = sde.prior_std**2
    var_T = aT**2 * STD**2 + sT**2  # p_T = N(aT MU, var_T)
    cross_entropy = 0.5 * ((var_T + (aT * MU) ** 2) / prior_var + math.log(2 * math.pi * prior_var)).sum()
    const = -D * math.log(sT / s0)
    bound = cross_entropy + (sde.T - EPS) / 2 * vals.mean() + const
    se = (sde.T - EPS) / 2 * vals.std() / math.sqrt(n_batches)
    entropy_eps = 0.5 * torch.log(2 * math.pi * math.e * (a0**2 * STD**2 + s0**2)).sum()  # H(p_eps)
    kl_T = 0.5 * (var_T / prior_var + (aT * MU) ** 2 / prior_var - 1 - torch.log(var_T / prior_var)).sum()
    return bound.item(), se.item(), entropy_eps.item(), kl_T.item()


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "flow"])
def test_likelihood_weighting_bounds_the_nll(sde_name):
    sde, gm = SDES[sde_name], _gaussian()
    bound, se, entropy, kl_T = _elbo(sde, gm, 1.0)
    # exact score: E[-ELBO] = H(p_eps) + KL(p_T || prior), no more
    assert abs(bound - (entropy + kl_T)) < 4 * se + 1e-3, (bound, se, entropy, kl_T)
    worse, se_w, _, _ = _elbo(sde, gm, 0.8)
    assert worse > entropy + kl_T + 4 * se_w  # a wrong score only loosens it; -log p_eps = H is below both


@pytest.mark.parametrize("sde_name", ["vp", "flow"])
def test_pf_ode_nll_equals_the_elbo_for_the_exact_score(sde_name):
    """With the exact score the PF-ODE maps p_eps to p_T, so -E log p_ODE = H(p_eps) + KL(p_T || prior) too."""
    sde, gm = SDES[sde_name], _gaussian()
    x = gm.marginal(sde, EPS).sample(400, torch.Generator().manual_seed(2))
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", eps=EPS, rtol=1e-7, atol=1e-7)
    nll, se = -res.logp.mean().item(), res.logp.std().item() / math.sqrt(x.shape[0])
    bound, se_b, entropy, kl_T = _elbo(sde, gm, 1.0, n_batches=4)
    assert abs(nll - (entropy + kl_T)) < 4 * se, (nll, se, entropy + kl_T)
    assert abs(nll - bound) < 4 * math.hypot(se, se_b)


# -- Hydra: the loss= group and sde=flow ---------------------------------------------------------------------
def _compose_train(overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_loss_group_builds_each_recipe_in_train_py(name, monkeypatch):
    from pathlib import Path

    pytest.importorskip("hydra")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import train  # experiments/train.py

    cfg = _compose_train([f"loss={name}"])
    assert cfg.loss.weighting == name
    loss = train._loss_function(cfg, object(), num_classes=0)  # an unquantized set: the partial itself
    seen = loss.keywords
    expected = get_weighting(name, **{k: v for k, v in cfg.loss.items() if k not in train._LOSS_APP_KEYS})
    assert seen["weighting"] == expected and type(seen["weighting"]) is type(WEIGHTINGS[name])
    assert seen["eps"] == cfg.loss.eps


def test_cosine_shift_from_config(monkeypatch):
    """``loss=eps loss.shift=2`` reaches dsm_loss as the shifted cosine density; the main job's default is s = 1."""
    from pathlib import Path

    pytest.importorskip("hydra")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    import train  # experiments/train.py

    recipe = train._loss_function(_compose_train(["loss=eps", "loss.shift=2.0"]), object(), num_classes=0)
    assert recipe.keywords["weighting"] == get_weighting("eps", shift=2.0)
    assert recipe.keywords["weighting"].density.shift == 2.0
    default = _compose_train([])  # the main job: loss=eps_shifted on VP with the eps parametrization
    recipe = train._loss_function(default, object(), num_classes=0)
    assert recipe.keywords["weighting"] == get_weighting("eps", shift=1.0)
    assert default.sde._target_.endswith("VPSDE") and default.model.parametrization == "eps"


def test_min_snr_gamma_and_flow_sde_from_config():
    from sde.sdes import FlowSDE as Flow

    cfg = _compose_train(["loss=min_snr", "loss.gamma=2.0", "sde=flow"])
    assert get_weighting(cfg.loss.weighting, gamma=cfg.loss.gamma).gamma == 2.0
    from hydra.utils import instantiate

    sde = instantiate(cfg.sde)
    assert isinstance(sde, Flow) and sde.T == 0.99
    assert "likelihood_weighting" not in cfg.train
