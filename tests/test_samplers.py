"""Samplers against the exact Gaussian-mixture oracle: distributions, exact ODE maps, orders."""

from __future__ import annotations

import math

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.samplers import SAMPLERS, sample

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=10.0)}
WEIGHTS = [0.5, 0.3, 0.2]
FAST = {  # customary step counts of the fast solvers
    "ode": dict(rtol=1e-5, atol=1e-5),
    "ddim": dict(steps=50),
    "heun": dict(steps=18),
    "dpm_solver": dict(steps=20),
}
SLOW = {  # SDE samplers: fewer steps than the customary 1000, to keep CI short
    "euler_maruyama": dict(steps=200),
    "reverse_diffusion": dict(steps=200),
    "ancestral": dict(steps=200),
    "pc": dict(steps=100, predictor="euler_maruyama", corrector="langevin", snr=0.1),
}


def mixture(dim: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(dim)
    if dim == 2:
        means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=F64)
    else:
        means = torch.randn(3, dim, generator=g, dtype=F64) * 0.6
    stds = torch.tensor([0.2, 0.3, 0.15], dtype=F64)
    return GaussianMixture(means, stds=stds, weights=torch.tensor(WEIGHTS, dtype=F64))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo)."""
    return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def energy_pvalue(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, n_perm: int = 60) -> float:
    """Permutation p-value of the energy-distance two-sample test."""
    stat = energy_distance(x, y)
    z, n = torch.cat([x, y]), x.shape[0]
    hits = 0
    for _ in range(n_perm):
        p = torch.randperm(z.shape[0], generator=g)
        hits += int(energy_distance(z[p[:n]], z[p[n:]]) >= stat)
    return (hits + 1) / (n_perm + 1)


def check_weights(gm: GaussianMixture, x: torch.Tensor) -> None:
    n = x.shape[0]
    w_hat = gm.posterior(x).mean(0)
    w = torch.tensor(WEIGHTS, dtype=F64)
    se = torch.sqrt(w * (1 - w) / n)
    assert torch.isfinite(x).all()
    assert ((w_hat - w).abs() < 3 * se).all(), f"weights {w_hat.tolist()} vs {WEIGHTS}, 3 se = {(3 * se).tolist()}"


def run_mixture(name: str, opts: dict, sde_name: str, dim: int, n: int = 300, seed: int = 0):
    sde, gm = SDES[sde_name](), mixture(dim)
    g = torch.Generator().manual_seed(seed)
    res = sample(gm.score_fn(sde), sde, (n, dim), name, generator=g, dtype=F64, **opts)
    check_weights(gm, res.x)
    return gm, res


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", list(FAST))
def test_fast_samplers_match_mixture(name, sde_name, dim):
    run_mixture(name, FAST[name], sde_name, dim)


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name", list(SLOW))
def test_sde_samplers_match_mixture_2d(name, sde_name):
    run_mixture(name, SLOW[name], sde_name, 2)


@pytest.mark.slow
@pytest.mark.parametrize("corrector", ["langevin", "annealed_langevin"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_pc_correctors_16d(corrector, sde_name):
    """Langevin works for sub-VP too (the reference special-cases VP/VE and fails there)."""
    sde = SDES[sde_name]()
    sigma_end = float(sde.sigma(torch.tensor([1e-3 if sde_name != "ve" else 1e-5], dtype=F64)))
    step_lr = 2 * (0.1 * sigma_end) ** 2  # NCSN's step at the last noise level, scaled to this SDE's sigma_end
    opts = dict(steps=50, predictor="reverse_diffusion", corrector=corrector, snr=0.1, step_lr=step_lr)
    run_mixture("pc", opts, sde_name, 16)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_energy_distance_accepts_right_score_rejects_wrong(sde_name):
    sde, gm = SDES[sde_name](), mixture(2)
    g = torch.Generator().manual_seed(1)
    data = gm.sample(200, g)
    good = sample(gm.score_fn(sde), sde, (200, 2), "dpm_solver", generator=g, dtype=F64, steps=20).x
    wrong_gm = GaussianMixture(gm.means, stds=torch.tensor([0.2, 0.3, 0.15], dtype=F64),
                               weights=torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    bad = sample(wrong_gm.score_fn(sde), sde, (200, 2), "dpm_solver", generator=g, dtype=F64, steps=20).x
    assert energy_pvalue(good, data, g) > 0.05
    assert energy_pvalue(bad, data, g) < 0.02  # the smallest p of 60 permutations is 1/61


# -- Gaussian data: the probability-flow map is affine and known in closed form -----------------


def gaussian(dim: int = 3) -> GaussianMixture:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(dim, dim, generator=g, dtype=F64) * 0.4
    cov = a @ a.T + 0.05 * torch.eye(dim, dtype=F64)
    return GaussianMixture(torch.randn(1, dim, generator=g, dtype=F64), cov[None])


def affine_map(run, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, A) of the deterministic map x_T -> x, from the probes x_T = 0 and x_T = e_j."""
    probes = torch.cat([torch.zeros(1, dim, dtype=F64), torch.eye(dim, dtype=F64)])
    out = run(probes)
    b = out[0]
    return b, (out[1:] - b).T


@pytest.mark.parametrize("sde_name", list(SDES))
def test_ode_reproduces_gaussian_marginal_exactly(sde_name):
    sde, gm, dim = SDES[sde_name](), gaussian(), 3
    eps = 1e-3

    def run(x_T):
        return sample(gm.score_fn(sde), sde, x_T, "ode", rtol=1e-10, atol=1e-10, eps=eps).x

    b, A = affine_map(run, dim)
    p_T = gm.marginal(sde, sde.T)  # push the exact p_T (not the approximate prior) through the map
    mean, cov = b + A @ p_T.means[0], A @ p_T.covs[0] @ A.T
    target = gm.marginal(sde, eps)  # p_eps: alpha mu, alpha^2 Sigma + sigma^2 I
    torch.testing.assert_close(mean, target.means[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cov, target.covs[0], atol=1e-6, rtol=1e-6)


def exact_flow(sde, mu, std, x_T, eps):
    """Closed-form PF-ODE map for N(mu, diag(std^2)) data: (x - alpha mu)/sqrt(v) is conserved."""
    t = torch.tensor([sde.T, eps], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    v = a[:, None] ** 2 * std**2 + s[:, None] ** 2
    return a[1] * mu + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * mu)


ORDER_CASES = [
    ("ddim", {}, 1, "vp"),
    ("heun", {}, 2, "vp"),
    ("heun", {}, 2, "ve"),
    *[("dpm_solver", dict(order=o, method=m, prediction=p), o, "vp")
      for o in (1, 2, 3) for m in ("singlestep", "multistep") for p in ("noise", "data")],
    ("dpm_solver", dict(order=3, method="multistep", prediction="data"), 3, "ve"),
    ("dpm_solver", dict(order=3, method="singlestep", prediction="noise"), 3, "subvp"),
]


@pytest.mark.parametrize("name,opts,order,sde_name", ORDER_CASES)
def test_convergence_order(name, opts, order, sde_name):
    sde, dim = SDES[sde_name](), 4
    mu = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
    std = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=F64)
    gm = GaussianMixture(mu[None], stds=std[None])
    x_T = sde.prior_sampling((8, dim), generator=torch.Generator().manual_seed(3), dtype=F64)
    eps = 1e-2
    exact = exact_flow(sde, mu, std, x_T, eps)
    errs = []
    for steps in (12, 24, 48):
        x = SAMPLERS[name](gm.score_fn(sde), sde, x_T, steps=steps, eps=eps, grid="log_snr", denoise_final=False,
                           **opts).x
        errs.append((x - exact).abs().max().item())
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert slopes[-1] > order - 0.35, f"errors {errs}, slopes {slopes}"
