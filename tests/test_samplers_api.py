"""Sampler API: exact nfe, reproducibility, callbacks, batching, grids and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.samplers import CORRECTORS, GRIDS, PREDICTORS, SAMPLERS, sample, time_grid
from sde.samplers.defaults import DDIM_GRID, per_sde

F64 = torch.float64
GM = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=F64), stds=0.3)
# adaptive samplers take no steps; their callbacks come once per accepted step / per iteration (info key)
ADAPTIVE = {"dpm_adaptive": "accepted", "gotta_go_fast": "iterations"}


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return self.fn(x, t)


NFE_CASES = [  # (sampler, options, expected nfe)
    ("euler_maruyama", dict(steps=7), 8),
    ("reverse_diffusion", dict(steps=30, denoise_final=False), 30),  # DDPM needs beta(t) dt < 1
    ("ancestral", dict(steps=5), 6),
    ("pc", dict(steps=5, n_steps=2, predictor="ancestral"), 16),
    ("pc", dict(steps=5, predictor="ancestral", corrector="annealed_langevin", denoise_final=False), 10),
    ("pc", dict(steps=5, predictor="euler_maruyama", corrector="none"), 6),
    ("ode", dict(method="euler", steps=6), 6),
    ("ode", dict(method="rk4", steps=3, denoise_final=True), 13),
    ("ddim", dict(steps=9), 10),
    ("heun", dict(steps=4), 9),
    ("dpm_solver", dict(steps=6, order=3, method="singlestep"), 19),
    ("dpm_solver", dict(steps=6, order=3, method="multistep"), 8),
    ("dpm_solver", dict(steps=6, order=3, method="multistep", warmup="lower_order", denoise_final=False), 6),
    ("dpm_solver", dict(steps=6, order=2, method="singlestep", denoise_final=False), 12),
]


@pytest.mark.parametrize("name,opts,nfe", NFE_CASES)
def test_nfe_is_exact(name, opts, nfe):
    sde = VPSDE()
    counter = Counter(GM.score_fn(sde))
    res = sample(counter, sde, (4, 2), name, generator=torch.Generator().manual_seed(0), dtype=F64, **opts)
    assert res.nfe == counter.calls == nfe
    assert res.x.shape == (4, 2) and res.x.dtype == F64


def test_nfe_counted_for_adaptive_ode():
    sde = VESDE(sigma_max=10.0)
    counter = Counter(GM.score_fn(sde))
    res = sample(counter, sde, (4, 2), "ode", generator=torch.Generator().manual_seed(0), dtype=F64)
    assert res.nfe == counter.calls > 10


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_generator_reproducible_and_callback(name):
    sde = SubVPSDE()
    opts = dict(steps=4) if name != "ode" else dict(method="rk4", steps=4)
    opts["steps"] = 40 if name in ("reverse_diffusion", "pc") else 4  # DDPM's step needs beta(t) dt < 1
    opts = {} if name in ADAPTIVE else opts
    infos = []

    def run(seed, cb=None):
        return sample(GM.score_fn(sde), sde, (5, 2), name, generator=torch.Generator().manual_seed(seed),
                      dtype=F64, callback=cb, **opts)

    first = run(1, infos.append)
    a, b, c = first.x, run(1).x, run(2).x
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    steps = first.info[ADAPTIVE[name]] if name in ADAPTIVE else opts["steps"]
    assert [info["i"] for info in infos] == list(range(steps))
    for info in infos:
        assert set(info) >= {"i", "t", "x", "x0_hat"}
        assert info["t"].shape == (5,) and info["x"].shape == info["x0_hat"].shape == (5, 2)
        expected = (info["x"] + sde.sigma(info["t"])[:, None] ** 2 * GM.score(info["x"], sde, info["t"]))
        torch.testing.assert_close(info["x0_hat"], expected / sde.alpha(info["t"])[:, None])
    assert math.isclose(float(infos[0]["t"][0]), sde.T) or name == "heun"


@pytest.mark.parametrize("name", ["ode", "ddim", "heun", "dpm_solver"])
def test_deterministic_with_given_x_T_and_batching(name):
    sde = VPSDE()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    opts = dict(steps=5) if name != "ode" else dict(rtol=1e-9, atol=1e-9)  # adaptive error norms span the batch
    r1 = sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(1), **opts)
    r2 = sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(2), batch_size=4, **opts)
    torch.testing.assert_close(r1.x, r2.x, atol=1e-6 if name == "ode" else 1e-12, rtol=0)
    assert r2.x.shape == (6, 2)


def test_batching_draws_prior_per_chunk_and_sums_nfe():
    sde = VPSDE()
    res = sample(GM.score_fn(sde), sde, (10, 2), "ddim", generator=torch.Generator().manual_seed(0),
                 batch_size=4, dtype=F64, steps=3)
    assert res.x.shape == (10, 2) and res.nfe == 3 * 4  # 3 chunks x (3 steps + denoise)


def test_dpm_solver_order1_is_ddim():
    """Both DPM-Solver-1 and DPM-Solver++(1) equal deterministic DDIM (Lu et al. 2022)."""
    sde = VPSDE()
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = sample(GM.score_fn(sde), sde, x_T, "ddim", steps=7, grid="log_snr").x
    for prediction in ("noise", "data"):
        out = sample(GM.score_fn(sde), sde, x_T, "dpm_solver", steps=7, order=1, prediction=prediction).x
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_ode_keeps_dtype_float32():
    sde = VPSDE()
    gm32 = GM.to(dtype=torch.float32)
    res = sample(gm32.score_fn(sde), sde, (4, 2), "ode", generator=torch.Generator().manual_seed(0))
    assert res.x.dtype == torch.float32


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_grids(sde, grid):
    ts = time_grid(sde, 10, 1e-3, grid)
    assert len(ts) == 11 and ts[0] == sde.T and ts[-1] == 1e-3
    assert all(a > b for a, b in zip(ts, ts[1:]))
    lam = sde.log_snr(torch.tensor(ts, dtype=F64))
    if grid == "log_snr":
        torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=1e-6, atol=1e-9)
    if grid == "edm":
        root = torch.exp(-0.5 * lam) ** (1 / 7)
        torch.testing.assert_close(root.diff(), root.diff().mean().expand(10), rtol=1e-6, atol=1e-9)


BAD = [
    (dict(sampler="nope"), "sampler='nope'.*euler_maruyama"),
    (dict(sampler="pc", predictor="nope"), "predictor='nope'.*ancestral"),
    (dict(sampler="pc", corrector="nope"), "corrector='nope'.*langevin"),
    (dict(sampler="ddim", grid="nope"), "grid='nope'.*log_snr"),
    (dict(sampler="ddim", steps=0), "steps must be >= 1, got 0"),
    (dict(sampler="heun", eps=0.0), "eps must lie in the open interval"),
    (dict(sampler="dpm_solver", eps=1.0), "eps must lie in the open interval"),
    (dict(sampler="pc", snr=0.0), "snr must be a finite number > 0, got 0.0"),
    (dict(sampler="dpm_solver", order=4), "order must be 1, 2 or 3, got 4"),
    (dict(sampler="ddim", eta=1.5), r"eta must lie in \[0, 1\], got 1.5"),
    (dict(sampler="ode", method="euler"), "fixed-grid method: give steps"),
    (dict(sampler="ode", method="nope"), "method='nope'"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_input(kwargs, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(GM.score_fn(sde), sde, (2, 2), dtype=F64, **kwargs)


def test_bad_types():
    sde = VPSDE()
    with pytest.raises(TypeError, match="steps must be an int"):
        sample(GM.score_fn(sde), sde, (2, 2), "ddim", steps=2.5)
    with pytest.raises(ValueError, match="shape_or_x_T"):
        sample(GM.score_fn(sde), sde, (0, 2), "ddim")
    with pytest.raises(TypeError, match="score_fn must be callable"):
        sample(None, sde, (2, 2), "ddim")


def test_registries_are_complete():
    assert set(SAMPLERS) == {"euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ode", "ddim", "heun",
                             "dpm_solver", "unipc", "deis", "dpm_solver_sde", "dpm_2s_ancestral", "dpm_adaptive",
                             "gotta_go_fast"}
    assert set(PREDICTORS) == {"euler_maruyama", "reverse_diffusion", "ancestral", "ancestral_posterior"}
    assert set(CORRECTORS) == {"none", "langevin", "annealed_langevin"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_non_finite_output_raises_naming_sampler(name):
    sde = VPSDE()

    def bad_score(x, t):
        return torch.full_like(x, float("nan"))

    opts = dict(steps=2) if name != "ode" else dict(method="euler", steps=2)
    if name in ("reverse_diffusion", "pc"):
        opts["steps"] = 25  # the DDPM chain needs beta_max / steps < 1 (checked up front)
    opts = {} if name in ADAPTIVE else opts
    with pytest.raises(FloatingPointError, match=f"sampler '{name}'.*steps"):
        sample(bad_score, sde, (2, 2), name, dtype=F64, **opts)


@pytest.mark.parametrize("sampler, extra", [("reverse_diffusion", {}), ("pc", {"corrector": "none"})])
def test_ddpm_chain_with_too_few_steps_fails_before_sampling(sampler, extra):
    calls = []

    def score(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=r"steps=10 .* beta\(t\) dt < 1"):
        sample(score, VPSDE(), (4, 2), sampler=sampler, steps=10, **extra)
    assert not calls  # rejected at the entry point, not after a wasted run
    res = sample(score, VPSDE(), (4, 2), sampler=sampler, steps=25, **extra)  # beta_max / 25 < 1 is fine
    assert torch.isfinite(res.x).all()


EXPLICIT_CASES = [  # fixed-step samplers: a named grid and the same times given explicitly
    ("euler_maruyama", dict(steps=7)),
    ("ancestral", dict(steps=5)),
    ("pc", dict(steps=5, predictor="ancestral")),
    ("ode", dict(method="rk4", steps=3)),
    ("ddim", dict(steps=9, eta=0.5)),
    ("heun", dict(steps=4)),
    ("dpm_solver", dict(steps=6, order=3)),
    ("dpm_solver", dict(steps=6, order=2, method="singlestep")),
]


@pytest.mark.parametrize("name,opts", EXPLICIT_CASES)
def test_explicit_grid_equals_named_grid(name, opts):
    sde = VPSDE()
    grid = SAMPLERS[name].__kwdefaults__["grid"] or per_sde(DDIM_GRID, sde, "log_snr")  # None: per-SDE default
    ts = time_grid(sde, opts["steps"], 1e-3, grid)
    x_T = sde.prior_sampling((16, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    named = sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(2), eps=1e-3, **opts)
    rest = {k: v for k, v in opts.items() if k != "steps"}
    given = sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(2), grid=ts, **rest)
    assert torch.equal(named.x, given.x) and named.nfe == given.nfe
    as_tensor = sample(GM.score_fn(sde), sde, x_T, name, generator=torch.Generator().manual_seed(2),
                       grid=torch.tensor(ts, dtype=F64), **rest)
    assert torch.equal(named.x, as_tensor.x)


def test_explicit_grid_may_start_below_T():
    sde = VPSDE()
    x = sde.prior_sampling((8, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    res = sample(GM.score_fn(sde), sde, x, "ddim", grid=[0.9, 0.5, 0.1, 1e-3])
    assert res.nfe == 4 and res.options["steps"] == 3 and res.options["eps"] == 1e-3


@pytest.mark.parametrize(
    "grid,extra,match",
    [
        ([1.0], {}, "at least 2"),
        ([1.0, 0.5, 0.7], {}, "strictly decreasing"),
        ([1.0, float("nan")], {}, "finite"),
        ([1.5, 0.5], {}, r"\(0, 1.0\]"),
        ([1.0, 0.0], {}, r"\(0, 1.0\]"),
        ([1.0, 0.5, 0.1], {"steps": 5}, "steps=5 contradicts"),
        ([1.0, 0.5, 0.1], {"eps": 0.2}, "eps=0.2 contradicts"),
        (torch.ones(2, 2), {}, "1-D"),
    ],
)
def test_explicit_grid_bad_input(grid, extra, match):
    sde = VPSDE()
    with pytest.raises(ValueError, match=match):
        sample(GM.score_fn(sde), sde, (4, 2), "ddim", grid=grid, **extra)


def test_explicit_grid_wrong_type():
    sde = VPSDE()
    with pytest.raises(TypeError, match="grid must be a name"):
        sample(GM.score_fn(sde), sde, (4, 2), "ddim", grid={"a": 1})
