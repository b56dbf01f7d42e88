"""Adaptive step-size samplers (DPM-Solver-12 / -23 and Gotta Go Fast) against the exact oracle and
against k-diffusion's ``sample_dpm_adaptive`` on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch
from _references import kdiffusion_adaptive, load_kdiffusion_sampling
from test_fast_solvers import MU, SDES, STD, exact_flow

from sde import VPSDE, DiscreteVPSDE, GaussianMixture
from sde.samplers import sample
from sde.sdes import ddpm_betas

F64 = torch.float64
EPS = 1e-3
GM = GaussianMixture(MU[None], stds=STD[None])


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _x_T(sde, n=8, seed=3):
    return sde.prior_sampling((n, 4), generator=torch.Generator().manual_seed(seed), dtype=F64)


def _dpm(sde, x_T, **opts):
    return sample(GM.score_fn(sde), sde, x_T, "dpm_adaptive", eps=EPS, denoise_final=False, **opts)


# -- DPM-Solver-12 / -23 ---------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("order,rtols", [(2, (1e-2, 1e-3)), (3, (1e-2, 1e-3, 1e-4))])
def test_dpm_adaptive_error_follows_the_tolerance(order, rtols, sde_name):
    """The error against the exact PF-ODE map is about the tolerance (slope 1 in log-log: the step
    control keeps the local error at the tolerance), and the NFE spent grows as it tightens."""
    sde = SDES[sde_name]()
    x_T = _x_T(sde)
    exact = exact_flow(sde, x_T, EPS)
    runs = [_dpm(sde, x_T, order=order, rtol=r, atol=r / 10) for r in rtols]
    errs = [(res.x - exact).abs().max().item() for res in runs]
    nfes = [res.nfe for res in runs]
    assert all(a > b for a, b in zip(errs, errs[1:])) and all(a < b for a, b in zip(nfes, nfes[1:])), (errs, nfes)
    slope = math.log(errs[0] / errs[-1]) / math.log(rtols[0] / rtols[-1])
    assert 0.7 < slope < 1.3, (errs, slope)
    assert all(0.05 < e / r < 5 for e, r in zip(errs, rtols)), (errs, rtols)


@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_nfe_is_exact_with_rejections(order, prediction):
    sde = VPSDE()
    counter = Counter(GM.score_fn(sde))
    res = sample(counter, sde, _x_T(sde), "dpm_adaptive", order=order, rtol=1e-2, atol=1e-3, prediction=prediction)
    acc, rej = res.info["accepted"], res.info["rejected"]
    assert rej > 0  # the first step (h_init) and the growth after small errors get rejected here
    assert res.nfe == counter.calls == acc + (order - 1) * (acc + rej) + 1  # + the final Tweedie step
    chunked = sample(GM.score_fn(sde), sde, _x_T(sde), "dpm_adaptive", order=order, rtol=1e-2, atol=1e-3,
                     prediction=prediction, batch_size=3)
    acc, rej = chunked.info["accepted"], chunked.info["rejected"]  # summed over the chunks of 3, 3 and 2
    assert chunked.nfe == acc + (order - 1) * (acc + rej) + 3


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dpm_adaptive_huge_tolerance_takes_the_fewest_steps(sde_name):
    sde = SDES[sde_name]()
    x_T = _x_T(sde)
    for order in (2, 3):
        res = _dpm(sde, x_T, order=order, rtol=1e6, atol=1e6)  # h_init, then all that is left
        assert res.info == {"accepted": 2, "rejected": 0} and res.nfe == 2 * order
        one = _dpm(sde, x_T, order=order, rtol=1e6, atol=1e6, h_init=1e3)  # one step over the whole interval
        assert one.info == {"accepted": 1, "rejected": 0} and one.nfe == order


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dpm_adaptive_tiny_tolerance_matches_the_exact_map(sde_name):
    sde = SDES[sde_name]()
    x_T = _x_T(sde)
    err = (_dpm(sde, x_T, order=3, rtol=1e-5, atol=1e-6).x - exact_flow(sde, x_T, EPS)).abs().max().item()
    assert err < 2e-5, err


def test_dpm_adaptive_on_a_ddpm_schedule():
    """DiscreteVPSDE (alpha, sigma, log-SNR interpolated from alphas_cumprod) against its exact PF-ODE map."""
    sde = DiscreteVPSDE(ddpm_betas("linear"))
    x_T = _x_T(sde)
    exact = exact_flow(sde, x_T, EPS)
    errs = [(_dpm(sde, x_T, rtol=r, atol=r / 10).x - exact).abs().max().item() for r in (1e-2, 1e-4)]
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 10, errs


def test_dpm_adaptive_default_rtol_is_per_sde():
    assert sample(GM.score_fn(VPSDE()), VPSDE(), (2, 4), "dpm_adaptive", dtype=F64).options["rtol"] == 0.05
    ve = SDES["ve"]()
    assert sample(GM.score_fn(ve), ve, (2, 4), "dpm_adaptive", dtype=F64).options["rtol"] == 0.01


def test_dpm_adaptive_callback_once_per_accepted_step():
    sde, infos = VPSDE(), []
    res = sample(GM.score_fn(sde), sde, _x_T(sde), "dpm_adaptive", callback=infos.append, rtol=1e-2, atol=1e-3)
    assert [i["i"] for i in infos] == list(range(res.info["accepted"])) and res.info["rejected"] > 0
    assert float(infos[0]["t"][0]) == sde.T and all(a["t"][0] > b["t"][0] for a, b in zip(infos, infos[1:]))
    for info in infos:
        expected = (info["x"] + sde.sigma(info["t"])[:, None] ** 2 * GM.score(info["x"], sde, info["t"]))
        torch.testing.assert_close(info["x0_hat"], expected / sde.alpha(info["t"])[:, None])
    plain = sample(GM.score_fn(sde), sde, _x_T(sde), "dpm_adaptive", rtol=1e-2, atol=1e-3)
    assert torch.equal(plain.x, res.x) and plain.nfe == res.nfe


# -- k-diffusion's sample_dpm_adaptive ---------------------------------------------------------------


class PaperController:
    """Lu et al.'s step rule (accept E <= 1, h <- min(theta h E^(-1/order), l_end - l_s)) in the shape of
    k-diffusion's PIDStepSizeController, to run k-diffusion's loop with the paper's controller."""

    def __init__(self, h, l_start, l_end, order, theta=0.9):
        self.s, self.end, self.order, self.theta = l_start, l_end, order, theta
        self.h = min(h, l_end - l_start)

    def propose_step(self, error):
        err = float(error)
        if err <= 1.0:
            self.s = self.s + self.h
        grow = math.inf if err == 0 else self.theta * err ** (-1 / self.order)
        self.h = min(self.h * grow, self.end - self.s)
        return err <= 1.0


def _log_sigma_ends(sde):
    t = torch.tensor([sde.T, EPS], dtype=F64)
    lam = -torch.log(sde.sigma(t) / sde.alpha(t))
    return lam[0], lam[1]


@pytest.mark.parametrize("rtol", [1e-2, 1e-3])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_equals_kdiffusion_with_the_papers_controller(order, rtol):
    """VE, one sample: the same steps, errors and accept decisions as k-diffusion's loop driven by the
    paper's controller (k-diffusion's tolerances and end points held in float64), to float64 rounding;
    our nfe is k-diffusion's minus one call per rejected step (we reuse the score at s)."""
    kd = load_kdiffusion_sampling(float64_adaptive=True)
    sde = SDES["ve"]()
    l0, l1 = _log_sigma_ends(sde)
    kd.PIDStepSizeController = lambda h, p, i, d, o, safety: PaperController(h, l0, l1, o)
    x_T = _x_T(sde, n=1)
    ours = _dpm(sde, x_T, order=order, rtol=rtol, atol=rtol / 10)
    ref, info = kdiffusion_adaptive(kd, GM.score_fn(sde), sde, x_T, EPS, order=order, rtol=rtol, atol=rtol / 10)
    torch.testing.assert_close(ours.x, ref, rtol=0, atol=1e-9)
    assert (ours.info["accepted"], ours.info["rejected"]) == (info["n_accept"], info["n_reject"])
    assert ours.nfe == info["nfe"] - info["n_reject"] and info["n_reject"] > 0


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_against_kdiffusion_defaults(order, sde_name):
    """k-diffusion as shipped (PID controller with its limiter and accept_safety = 0.81, one RMS norm over
    the whole batch, VP errors measured on x / alpha): both reach about the tolerance; ours, with the
    paper's per-sample norm (the worst sample decides), is the more accurate of the two."""
    kd = load_kdiffusion_sampling()
    sde = SDES[sde_name]()
    x_T = _x_T(sde)
    exact = exact_flow(sde, x_T, EPS)
    for rtol in (1e-2, 1e-3):
        ours = _dpm(sde, x_T, order=order, rtol=rtol, atol=rtol / 10)
        ref, _ = kdiffusion_adaptive(kd, GM.score_fn(sde), sde, x_T, EPS, order=order, rtol=rtol, atol=rtol / 10)
        e_ours, e_ref = (ours.x - exact).abs().max().item(), (ref - exact).abs().max().item()
        assert e_ours < e_ref < 10 * rtol, (rtol, e_ours, e_ref)


# -- Gotta Go Fast ------------------------------------------------------------------------------------

D_GGF, MU_GGF, STD_GGF = 1024, 0.5, 0.5  # isotropic Gaussian data: every coordinate has the same law


def _ggf_kl(sde, n=200, seed=0, **opts):
    """Exact KL(N(m, v) || p_eps) per coordinate, summed over the D_GGF coordinates, of the pooled mean and
    variance of n samples (standard error of the pooled estimate: about D / (2 n D) * 2 = 0.005 nats)."""
    gm = GaussianMixture(torch.full((1, D_GGF), MU_GGF, dtype=F64), stds=torch.full((1, D_GGF), STD_GGF, dtype=F64))
    res = sample(gm.score_fn(sde), sde, (n, D_GGF), "gotta_go_fast", generator=torch.Generator().manual_seed(seed),
                 dtype=F64, eps=EPS, denoise_final=False, **opts)
    t = torch.tensor([EPS], dtype=F64)
    tm, tv = float(sde.alpha(t)) * MU_GGF, float(sde.alpha(t)) ** 2 * STD_GGF**2 + float(sde.sigma(t)) ** 2
    m, v = res.x.mean().item(), res.x.var().item()
    return D_GGF * 0.5 * (v / tv + (m - tm) ** 2 / tv - 1 - math.log(v / tv)), res


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", list(SDES))
def test_gotta_go_fast_law_error_follows_the_tolerance(sde_name):
    """The output law's KL to the exact p_eps falls as the tolerance tightens and the NFE grows."""
    sde = SDES[sde_name]()
    rtols = (1.0, 0.3, 0.1) + ((0.03,) if sde_name == "vp" else ())
    runs = [_ggf_kl(sde, rtol=r, atol=r / 2) for r in rtols]
    kls, nfes = [k for k, _ in runs], [r.nfe for _, r in runs]
    assert all(a > b for a, b in zip(kls[:3], kls[1:3])) and all(a < b for a, b in zip(nfes, nfes[1:])), (kls, nfes)
    assert kls[0] > 1.0 and kls[-1] < 0.3, kls  # measured: 0.23 (sub-VP at 0.1) to 0.01 (VP at 0.03)


def test_gotta_go_fast_nfe_and_per_sample_counts():
    sde = VPSDE()
    counter = Counter(GM.score_fn(sde))
    res = sample(counter, sde, _x_T(sde, 16), "gotta_go_fast", generator=torch.Generator().manual_seed(0),
                 rtol=0.05, atol=0.02)
    info = res.info
    assert res.nfe == counter.calls == 2 * info["iterations"] + 1
    attempts = info["sample_accepted"] + info["sample_rejected"]
    assert int(attempts.max()) == info["iterations"] and int(attempts.min()) < info["iterations"]  # own steps
    assert torch.equal(info["sample_nfe"], 2 * attempts + 1) and int(info["sample_nfe"].max()) == res.nfe
    assert info["accepted"] == int(info["sample_accepted"].sum()) and info["rejected"] > 0
    chunked = sample(GM.score_fn(sde), sde, _x_T(sde, 16), "gotta_go_fast", generator=torch.Generator().manual_seed(0),
                     rtol=0.05, atol=0.02, batch_size=5)
    assert chunked.info["sample_nfe"].shape == (16,) and chunked.nfe == 2 * chunked.info["iterations"] + 4


@pytest.mark.parametrize("sde_name", list(SDES))
def test_gotta_go_fast_huge_tolerance_takes_the_fewest_steps(sde_name):
    sde = SDES[sde_name]()
    g = torch.Generator().manual_seed(0)
    res = sample(GM.score_fn(sde), sde, _x_T(sde), "gotta_go_fast", generator=g, rtol=1e6, atol=1e6)
    assert res.info["iterations"] == 2 and res.info["rejected"] == 0 and res.nfe == 5  # h_init, the rest, Tweedie
    one = sample(GM.score_fn(sde), sde, _x_T(sde), "gotta_go_fast", generator=g, rtol=1e6, atol=1e6, h_init=2.0)
    assert one.info["iterations"] == 1 and one.nfe == 3


def test_gotta_go_fast_generator_and_callback():
    sde, infos = VPSDE(), []

    def run(seed, cb=None):
        return sample(GM.score_fn(sde), sde, _x_T(sde), "gotta_go_fast", generator=torch.Generator().manual_seed(seed),
                      callback=cb, rtol=0.05, atol=0.02)

    a, b, c = run(1, infos.append), run(1), run(2)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe and not torch.allclose(a.x, c.x)
    assert [i["i"] for i in infos] == list(range(a.info["iterations"]))
    assert (infos[0]["t"] == sde.T).all() and len(set(infos[-1]["t"].tolist())) > 1  # each sample its own time
    for info in infos:
        expected = (info["x"] + sde.sigma(info["t"])[:, None] ** 2 * GM.score(info["x"], sde, info["t"]))
        torch.testing.assert_close(info["x0_hat"], expected / sde.alpha(info["t"])[:, None])


# -- bookkeeping and input checks ----------------------------------------------------------------------


def test_max_nfe_guard_stops_the_run():
    sde = VPSDE()
    for name in ("dpm_adaptive", "gotta_go_fast"):
        counter = Counter(GM.score_fn(sde))
        with pytest.raises(RuntimeError, match=f"sampler '{name}' reached max_nfe=20"):
            sample(counter, sde, _x_T(sde), name, generator=torch.Generator().manual_seed(0), rtol=1e-6, atol=1e-6,
                   max_nfe=20)
        assert counter.calls <= 20


BAD = [
    ("dpm_adaptive", dict(order=1), ValueError, r"order must be one of \[2, 3\], got 1"),
    ("dpm_adaptive", dict(order=4), ValueError, "order must be one of"),
    ("dpm_adaptive", dict(prediction="v"), ValueError, "prediction='v'"),
    ("dpm_adaptive", dict(theta=1.5), ValueError, r"theta must lie in \(0, 1\]"),
    ("dpm_adaptive", dict(steps=10), TypeError, "steps"),
    ("gotta_go_fast", dict(exponent=0.0), ValueError, "exponent must be a finite number > 0"),
    ("gotta_go_fast", dict(theta=0.0), ValueError, "theta"),
    ("gotta_go_fast", dict(norm="max"), ValueError, "norm='max'"),
] + [
    (name, {opt: value}, ValueError, f"{opt} must be a finite number > 0")
    for name in ("dpm_adaptive", "gotta_go_fast") for opt in ("rtol", "atol", "h_init")
    for value in (0.0, -1e-3, math.inf, math.nan)
] + [
    (name, dict(max_nfe=0), ValueError, "max_nfe must be >= 1") for name in ("dpm_adaptive", "gotta_go_fast")
] + [
    (name, dict(eps=1.5), ValueError, "eps must lie in the open interval") for name in ("dpm_adaptive", "gotta_go_fast")
]


@pytest.mark.parametrize("name,opts,err,match", BAD)
def test_bad_options_name_the_argument(name, opts, err, match):
    sde = VPSDE()
    with pytest.raises(err, match=match):
        sample(GM.score_fn(sde), sde, (3, 4), name, dtype=F64, **opts)


@pytest.mark.parametrize("name", ["dpm_adaptive", "gotta_go_fast"])
def test_non_finite_score_raises_instead_of_looping(name):
    sde = VPSDE()
    with pytest.raises(FloatingPointError, match=f"sampler '{name}'"):
        sample(lambda x, t: torch.full_like(x, math.nan), sde, (3, 4), name, dtype=F64)
