"""Fast solvers (UniPC, DEIS, SDE-DPM-Solver++, DPM-Solver++(2S) ancestral) against the exact oracle
and against the reference implementations (diffusers, k-diffusion) on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch
from _references import diffusers_run, kdiffusion_run, load_kdiffusion_sampling

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.samplers import SAMPLERS, sample
from sde.samplers.grids import time_grid

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": lambda: VESDE(sigma_max=10.0)}
MU = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64)
STD = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=F64)


def exact_flow(sde, x_T, eps):
    """Closed-form PF-ODE map for N(MU, diag STD^2) data: (x - alpha mu)/sqrt(v) is conserved."""
    t = torch.tensor([sde.T, eps], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    v = a[:, None] ** 2 * STD**2 + s[:, None] ** 2
    return a[1] * MU + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * MU)


def ode_errors(name, sde_name, steps, **opts):
    sde = SDES[sde_name]()
    gm = GaussianMixture(MU[None], stds=STD[None])
    x_T = sde.prior_sampling((8, 4), generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = exact_flow(sde, x_T, 1e-2)
    return [(SAMPLERS[name](gm.score_fn(sde), sde, x_T, steps=n, eps=1e-2, grid="log_snr", denoise_final=False,
                            **opts).x - exact).abs().max().item() for n in steps]


# Measured global order = the theory of each method, capped by its warm-up: a multistep method whose
# first step is order 1 (local error h^2) is at most order 2 (UniP, DEIS with warmup="lower_order"); the
# UniC-corrected first step has local error h^3, so UniPC-p is order min(p + 1, 3) (the paper's p + 1
# assumes exact starting values).
UNIPC_CASES = [
    (dict(order=p, corrector=c, prediction=pr, variant=v), min(p + 1, 3) if c else min(p, 2), s)
    for s in SDES for p in (1, 2, 3) for c in (False, True) for pr in ("data", "noise") for v in ("bh1", "bh2")
    if not (p == 3 and v == "bh1" and s != "vp")  # bh1 and bh2 coincide to 1e-9 at order 3; keep CI short
]
DEIS_CASES = [
    (dict(order=p, prediction=pr, basis=b, warmup="singlestep"), p, s)
    for s in SDES for p in (1, 2, 3) for pr in ("noise", "data") for b in ("t", "log_snr")
] + [(dict(order=3, warmup="lower_order"), 2, s) for s in SDES]


@pytest.mark.parametrize("opts,order,sde_name", UNIPC_CASES)
def test_unipc_convergence_order(opts, order, sde_name):
    errs = ode_errors("unipc", sde_name, (24, 48, 96), lower_order_final=False, **opts)
    slope = math.log2(errs[-2] / errs[-1])
    assert slope > order - 0.35, f"errors {errs}, slope {slope}"


@pytest.mark.parametrize("opts,order,sde_name", DEIS_CASES)
def test_deis_convergence_order(opts, order, sde_name):
    errs = ode_errors("deis", sde_name, (24, 48, 96), **opts)
    slope = math.log2(errs[-2] / errs[-1])
    assert slope > order - 0.35, f"errors {errs}, slope {slope}"


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("order", [2, 3])
def test_sde_solver_eta0_is_dpm_solver_exactly(order, sde_name):
    sde, gm = SDES[sde_name](), GaussianMixture(MU[None], stds=STD[None])
    x_T = sde.prior_sampling((6, 4), generator=torch.Generator().manual_seed(0), dtype=F64)
    for steps, lof in ((8, True), (8, False), (15, True)):
        a = sample(gm.score_fn(sde), sde, x_T, "dpm_solver_sde", steps=steps, order=order, eta=0.0,
                   lower_order_final=lof).x
        b = sample(gm.score_fn(sde), sde, x_T, "dpm_solver", steps=steps, order=order, warmup="lower_order",
                   lower_order_final=lof).x
        assert torch.equal(a, b)


# -- exact law of the stochastic solvers on Gaussian data ------------------------------------------


def exact_law(name, sde, steps, **opts):
    """Mean and variance of a stochastic sampler's output on N(MU, diag STD^2) data, exactly: the output
    is affine in (x_T, z_1, ..., z_N) coordinate-wise, so one batch of probes gives every coefficient."""
    gm = GaussianMixture(MU[None], stds=STD[None])
    x_T = torch.zeros(steps + 2, MU.shape[0], dtype=F64)
    x_T[1] = 1.0

    def unit_noise(i, x):  # row 2 + i gets z = 1 at step i, every other row no noise
        z = torch.zeros_like(x)
        z[2 + i] = 1.0
        return z

    out = SAMPLERS[name](gm.score_fn(sde), sde, x_T, steps=steps, noise_sampler=unit_noise, **opts).x
    b, a, c = out[0], out[1] - out[0], out[2:] - out[0]
    return b, a**2 * sde.prior_std**2 + (c**2).sum(0)


WEAK_CASES = [  # weak (law) order: 1 for the first-order solver, 2 for 2M and 3M (the noise caps 3M at 2)
    ("dpm_solver_sde", dict(order=1), 1), ("dpm_solver_sde", dict(order=2), 2),
    ("dpm_solver_sde", dict(order=2, solver_type="heun"), 2), ("dpm_solver_sde", dict(order=3), 2),
    ("dpm_2s_ancestral", {}, 1),
]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("name,opts,order", WEAK_CASES)
def test_stochastic_solvers_weak_order(name, opts, order, sde_name):
    sde = SDES[sde_name]()
    ref_m, ref_v = exact_law(name, sde, 1000, eps=1e-2, denoise_final=False, **opts)
    errs = []
    for n in (20, 40, 80):
        m, v = exact_law(name, sde, n, eps=1e-2, denoise_final=False, **opts)
        errs.append(max((m - ref_m).abs().max().item(), (v - ref_v).abs().max().item()))
    slope = math.log2(errs[-2] / errs[-1])
    assert slope > order - 0.35, f"errors {errs}, slope {slope}"


def test_stochastic_solvers_reach_the_data_law():
    """eta = 1 at 200 steps: the exact output law is close to p_eps (the reverse SDE's law)."""
    sde, eps = VPSDE(), 1e-3
    t = torch.tensor([eps], dtype=F64)
    target_v = sde.alpha(t) ** 2 * STD**2 + sde.sigma(t) ** 2
    for name in ("dpm_solver_sde", "dpm_2s_ancestral"):
        m, v = exact_law(name, sde, 200, eps=eps, denoise_final=False)
        kl = 0.5 * (v / target_v + (m - sde.alpha(t) * MU) ** 2 / target_v - 1 - torch.log(v / target_v)).sum()
        assert kl < 1e-3, (name, float(kl))


# -- references ----------------------------------------------------------------------------------


def two_blobs():
    return GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64),
                           stds=torch.tensor([0.2, 0.3], dtype=F64))


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_unipc_matches_diffusers(prediction, variant, order, sde_name):
    diffusers = pytest.importorskip("diffusers")
    sde, gm = SDES[sde_name](), two_blobs()
    x_T = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = time_grid(sde, 8, 1e-3, "log_snr")
    sch = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant,
                                            predict_x0=prediction == "data", prediction_type="sample",
                                            final_sigmas_type="sigma_min")
    ref = diffusers_run(sch, gm.score_fn(sde), sde, x_T, ts)
    ours = sample(gm.score_fn(sde), sde, x_T, "unipc", grid=ts, order=order, variant=variant,
                  prediction=prediction, denoise_final=False).x
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_log_snr_basis_matches_diffusers(order, sde_name):
    """diffusers' DEIS is the log-rho variant: our basis="log_snr" (a Lagrange polynomial in log-SNR is
    one in log rho). diffusers lowers the final orders only below 15 steps; we run 16."""
    diffusers = pytest.importorskip("diffusers")
    sde, gm = SDES[sde_name](), two_blobs()
    x_T = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = time_grid(sde, 16, 1e-3, "log_snr")
    sch = diffusers.DEISMultistepScheduler(solver_order=order, prediction_type="sample")
    ref = diffusers_run(sch, gm.score_fn(sde), sde, x_T, ts)
    ours = sample(gm.score_fn(sde), sde, x_T, "deis", grid=ts, order=order, basis="log_snr", prediction="noise",
                  warmup="lower_order", lower_order_final=False, denoise_final=False).x
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def _noisy_case(sde_name, steps=12):
    sde, gm = SDES[sde_name](), two_blobs()
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_sampling((5, 2), generator=g, dtype=F64)
    noises = [torch.randn(5, 2, generator=g, dtype=F64) for _ in range(steps)]
    return sde, gm, x_T, time_grid(sde, steps, 1e-3, "log_snr"), noises


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpm_2m_matches_kdiffusion(solver_type, eta, sde_name):
    kd = load_kdiffusion_sampling()
    sde, gm, x_T, ts, noises = _noisy_case(sde_name)
    ref = kdiffusion_run(kd.sample_dpmpp_2m_sde, gm.score_fn(sde), sde, x_T, ts, noises, eta=eta,
                         solver_type=solver_type)
    ours = sample(gm.score_fn(sde), sde, x_T, "dpm_solver_sde", grid=ts, order=2, eta=eta, solver_type=solver_type,
                  noise_sampler=lambda i, x: noises[i], lower_order_final=False, denoise_final=False).x
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sde_dpm_3m_matches_kdiffusion_up_to_the_d2_factor(eta, sde_name):
    """k-diffusion's 3M SDE weights its second difference half as much as the third-order Taylor term
    (our dpm_solver 3M and Lu et al.'s DPM-Solver++ 3M); with that one line doubled the two agree to
    rounding, and unpatched they do not. Its warm-up step is the "heun" 2M form."""
    sde, gm, x_T, ts, noises = _noisy_case(sde_name)
    ours = sample(gm.score_fn(sde), sde, x_T, "dpm_solver_sde", grid=ts, order=3, eta=eta, solver_type="heun",
                  noise_sampler=lambda i, x: noises[i], lower_order_final=False, denoise_final=False).x
    for patched in (True, False):
        kd = load_kdiffusion_sampling(double_3m_d2=patched)
        ref = kdiffusion_run(kd.sample_dpmpp_3m_sde, gm.score_fn(sde), sde, x_T, ts, noises, eta=eta)
        diff = (ours - ref).abs().max().item()
        assert (diff < 1e-11) if patched else (diff > 1e-3), (patched, diff)


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpm_2s_ancestral_matches_kdiffusion(eta, sde_name):
    kd = load_kdiffusion_sampling()
    sde, gm, x_T, ts, noises = _noisy_case(sde_name)
    ref = kdiffusion_run(kd.sample_dpmpp_2s_ancestral, gm.score_fn(sde), sde, x_T, ts, noises, eta=eta)
    ours = sample(gm.score_fn(sde), sde, x_T, "dpm_2s_ancestral", grid=ts, eta=eta,
                  noise_sampler=lambda i, x: noises[i], denoise_final=False).x
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


# -- bookkeeping and input checks ------------------------------------------------------------------


@pytest.mark.parametrize("name,opts,nfe", [
    ("unipc", dict(steps=7), 8), ("unipc", dict(steps=7, denoise_final=False), 7),
    ("deis", dict(steps=7, order=3), 9), ("deis", dict(steps=7, order=3, warmup="lower_order"), 8),
    ("dpm_solver_sde", dict(steps=7), 8), ("dpm_2s_ancestral", dict(steps=7), 15),
])
def test_nfe_is_exact(name, opts, nfe):
    sde, gm = VPSDE(), two_blobs()
    calls = []

    def score(x, t):
        calls.append(1)
        return gm.score_fn(sde)(x, t)

    res = sample(score, sde, (4, 2), name, generator=torch.Generator().manual_seed(0), dtype=F64, **opts)
    assert res.nfe == len(calls) == nfe


@pytest.mark.parametrize("name,opts,match", [
    ("unipc", dict(order=4), "order"), ("unipc", dict(variant="bh3"), "variant"),
    ("unipc", dict(prediction="v"), "prediction"), ("deis", dict(basis="rho"), "basis"),
    ("deis", dict(warmup="x"), "warmup"), ("dpm_solver_sde", dict(eta=-1.0), "eta"),
    ("dpm_solver_sde", dict(solver_type="euler"), "solver_type"), ("dpm_2s_ancestral", dict(eta=1.5), "eta"),
    ("dpm_solver_sde", dict(noise_sampler=lambda i, x: x[:1]), "noise_sampler"),
])
def test_bad_options_name_the_argument(name, opts, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(two_blobs().score_fn(sde), sde, (3, 2), name, dtype=F64, steps=4, **opts)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_with_tweedie_final_matches_diffusers_final_zero(order, sde_name):
    """Our last Tweedie step is diffusers' last step to sigma = 0: same grid, same NFE, same output."""
    diffusers = pytest.importorskip("diffusers")
    sde, gm = SDES[sde_name](), two_blobs()
    x_T = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = time_grid(sde, 6, 1e-3, "log_snr")
    sch = diffusers.UniPCMultistepScheduler(solver_order=order, prediction_type="sample")
    ref = diffusers_run(sch, gm.score_fn(sde), sde, x_T, ts, final_zero=True)
    res = sample(gm.score_fn(sde), sde, x_T, "unipc", grid=ts, order=order)
    assert res.nfe == len(ts)
    torch.testing.assert_close(res.x, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_learned_grid_beats_every_fixed_grid_at_10_nfe(sde_name):
    """On the oracle, judged by the exact PF-ODE map (not by the estimate the grid was fitted to)."""
    from sde.samplers.learned_grid import learn_grid

    sde = SDES[sde_name]()
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(32, generator=g, dtype=F64) - 0.5
    std = torch.exp(torch.empty(32, dtype=F64).uniform_(-3.0, 0.0, generator=g))
    gm = GaussianMixture(mu[None], stds=std[None])
    eps = 1e-3
    lg = learn_grid(gm.score_fn(sde), sde, (32,), "unipc", steps=9, eps=eps, n_samples=8, sweeps=4,
                    generator=torch.Generator().manual_seed(1), denoise_final=False)
    assert lg.grid[0] == sde.T and lg.grid[-1] == eps and len(lg.grid) == 10 and lg.loss < lg.initial_loss
    x_T = sde.prior_sampling((64, 32), generator=torch.Generator().manual_seed(2), dtype=F64)
    t = torch.tensor([sde.T, eps], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    v = a[:, None] ** 2 * std**2 + s[:, None] ** 2
    exact = a[1] * mu + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * mu)

    def err(grid):
        out = sample(gm.score_fn(sde), sde, x_T, "unipc", grid=grid, denoise_final=False).x
        return float(((out - exact) ** 2).mean())

    fixed = {name: err(time_grid(sde, 9, eps, name)) for name in ("uniform", "log_snr", "edm")}
    assert err(lg.grid) < min(fixed.values()), (err(lg.grid), fixed)


def _gaussian_kl_of_grid(sde, mu, std, name, grid, **opts):
    """Exact KL(output || N(mu, diag std^2)) of a deterministic sampler on that grid (its affine map)."""
    gm = GaussianMixture(mu[None], stds=std[None])
    probes = torch.stack([torch.zeros_like(mu), torch.ones_like(mu)])
    out = sample(gm.score_fn(sde), sde, probes, name, grid=grid, **opts).x
    b, a = out[0], out[1] - out[0]
    r = (a * sde.prior_std) ** 2 / std**2
    return float(0.5 * (r + (b - mu) ** 2 / std**2 - 1.0 - torch.log(r)).sum())


@pytest.mark.parametrize("name,opts", [("dpm_solver", dict(order=2)), ("unipc", dict(order=3))])
def test_learned_grid_halves_the_ve_kl_of_the_best_fixed_grid_at_10_nfe(name, opts):
    """VE, 10 NFE, a 64-D Gaussian with stds log-uniform in [0.02, 1] (the benchmark's spectrum): the
    whitened objective's grid has at most half the exact KL of the best named grid, and beats the plain
    squared error's grid (which weights the wide coordinates the KL barely sees)."""
    from sde.samplers.learned_grid import learn_grid

    sde, g = VESDE(), torch.Generator().manual_seed(0)
    mu = torch.rand(64, generator=g, dtype=F64) - 0.5
    std = torch.exp(torch.empty(64, dtype=F64).uniform_(math.log(0.02), 0.0, generator=g))
    score = GaussianMixture(mu[None], stds=std[None]).score_fn(sde)
    kl = {grid: _gaussian_kl_of_grid(sde, mu, std, name, time_grid(sde, 9, 1e-5, grid), **opts)
          for grid in ("uniform", "log_snr", "edm")}
    for objective in ("whitened", "mse"):
        lg = learn_grid(score, sde, (64,), name, steps=9, n_samples=8, sweeps=4, objective=objective,
                        generator=torch.Generator().manual_seed(1), **opts)
        assert len(lg.grid) == 10 and lg.grid[-1] == 1e-5 and lg.loss < lg.initial_loss
        kl[objective] = _gaussian_kl_of_grid(sde, mu, std, name, lg.grid, **opts)
    assert kl["whitened"] <= 0.5 * min(kl["uniform"], kl["log_snr"], kl["edm"]), kl
    assert kl["whitened"] < kl["mse"], kl


def test_learned_grid_init_and_bad_options():
    from sde.samplers.learned_grid import learn_grid

    sde, gm = VESDE(sigma_max=10.0), two_blobs()
    lg = learn_grid(gm.score_fn(sde), sde, (2,), "dpm_solver", steps=5, n_samples=4, sweeps=0, init="edm",
                    reference_steps=20)
    torch.testing.assert_close(torch.tensor(lg.grid, dtype=F64), torch.tensor(time_grid(sde, 5, 1e-5, "edm"),
                                                                             dtype=F64), rtol=1e-9, atol=1e-12)
    assert lg.loss == lg.initial_loss
    for opts, match in ((dict(objective="kl"), "objective"), (dict(var_floor=-1.0), "var_floor"),
                        (dict(init="cosine"), "init"), (dict(n_samples=1), "n_samples")):
        with pytest.raises(ValueError, match=match):
            learn_grid(gm.score_fn(sde), sde, (2,), "dpm_solver", steps=5, **opts)
