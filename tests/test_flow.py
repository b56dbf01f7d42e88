"""sde.flow: one home for the reverse-time dynamics, Tweedie's denoiser and the ODE helper.

The ``ode`` sampler, ``encode``, ``decode`` and ``log_likelihood`` share one method table, one
validation and one end-point rule; the predictors take their drift from ``SDE.reverse()``.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from sde import VESDE, VPSDE, GaussianMixture, ReverseSDE, SubVPSDE
from sde.flow import (
    ADAPTIVE_METHODS,
    FIXED_GRID_METHODS,
    ODE_METHODS,
    pf_velocity,
    reverse_drift,
    tweedie,
)
from sde.likelihood import decode, encode, log_likelihood
from sde.samplers import sample

F64 = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.3]], dtype=F64)
    return GaussianMixture(means, stds=torch.tensor([[0.3, 0.5], [0.4, 0.2]], dtype=F64),
                           weights=torch.tensor([0.4, 0.6], dtype=F64))


def _entry_points(sde):
    """The four ODE entry points as f(**solver settings), on a small 2-D batch."""
    score = _mixture().score_fn(sde)
    x = _mixture().sample(3, torch.Generator().manual_seed(0))
    z = sde.prior_sampling((3, 2), generator=torch.Generator().manual_seed(1), dtype=F64)
    return {
        "sample_ode": lambda **kw: sample(score, sde, z, "ode", **kw).x,
        "encode": lambda **kw: encode(score, sde, x, **kw),
        "decode": lambda **kw: decode(score, sde, z, **kw),
        "log_likelihood": lambda **kw: log_likelihood(score, sde, x, divergence="exact", **kw).logp,
    }


def _outcome(fn, kw) -> str:
    try:
        out = fn(**kw)
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).split(',')[0]}"
    assert torch.isfinite(out).all()
    return "ok"


FAST = dict(rtol=1e-3, atol=1e-3)
CASES = (
    [dict(method=m, **FAST) for m in ADAPTIVE_METHODS]
    + [dict(method=m, steps=3, **FAST) for m in FIXED_GRID_METHODS]
    + [dict(method=m) for m in FIXED_GRID_METHODS]  # fixed grid without steps: an error everywhere
    + [
        dict(method="scipy_solver"),  # leaves the device: not in the table
        dict(method="rk45"),
        dict(method="dopri5", rtol=0.0),
        dict(method="dopri5", atol=-1.0),
        dict(method="dopri5", steps=0),
        dict(method="dopri5", steps=2, grid="nope"),
        dict(method="rk4", steps=2, grid="edm", **FAST),
        dict(method="rk4", grid=[1.0, 0.5, 0.01], **FAST),
        dict(method="rk4", grid=[1.0, 0.5, 0.01], steps=3),  # contradicts the grid
        dict(method="dopri5", eps=0.0),
        dict(method="dopri5", eps=2.0),
        dict(method="dopri5", options={"step_size": 0.1}),  # a fixed-grid option on an adaptive method
        dict(method="euler", steps=2, options={"first_step": 0.1}),  # and the reverse
        dict(method="rk4", steps=2, options={"step_size": 0.2}, **FAST),
        dict(method="dopri5", options={"max_num_steps": 10_000}, **FAST),
        dict(method="dopri5", options={"no_such_option": 1}),
        dict(method="dopri5", options="first_step"),
    ]
)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_four_entry_points_accept_and_reject_the_same(kw):
    fns = _entry_points(VPSDE())
    outcomes = {name: _outcome(fn, kw) for name, fn in fns.items()}
    assert len(set(outcomes.values())) == 1, outcomes
    if kw.get("method") in FIXED_GRID_METHODS and "steps" not in kw and "grid" not in kw:
        assert "fixed-grid method: give steps" in outcomes["encode"]
    if kw.get("method") not in ODE_METHODS:
        assert "method" in outcomes["encode"]


def test_method_table_is_torchdiffeqs_public_names():
    import torchdiffeq

    z = torch.zeros(1, dtype=F64)
    for m in ODE_METHODS:  # each name runs through the public odeint
        torchdiffeq.odeint(lambda t, y: -y, z + 1, torch.tensor([0.0, 0.1], dtype=F64), method=m)
    assert set(ADAPTIVE_METHODS).isdisjoint(FIXED_GRID_METHODS)
    src = pathlib.Path(__file__).resolve().parents[1] / "sde"
    assert not [p for p in src.rglob("*.py") if "torchdiffeq._impl" in p.read_text()]


@pytest.mark.parametrize("name", SDES)
def test_decode_and_ode_sampler_are_the_same_integration(name):
    sde = SDES[name]()
    score = _mixture().score_fn(sde)
    z = sde.prior_sampling((5, 2), generator=torch.Generator().manual_seed(2), dtype=F64)
    for kw in (dict(method="rk4", steps=7, grid="log_snr"), dict(method="dopri5", options={"first_step": 0.02}),
               dict(method="bosh3", steps=3, options={"first_step": None})):  # None: torchdiffeq's heuristic in both
        a = sample(score, sde, z, "ode", eps=1e-3, **kw).x
        b = decode(score, sde, z, eps=1e-3, **kw)
        assert torch.equal(a, b), kw


ENDPOINT_CASES = [("vp", "dopri5"), ("subvp", "dopri5")] + [("ve", m) for m in ADAPTIVE_METHODS]


@pytest.mark.parametrize(("name", "method"), ENDPOINT_CASES)
def test_score_is_never_evaluated_outside_eps_T(name, method):
    """The end-point rule: adaptive steps land on the end time and the first-step heuristic's
    trial evaluation stays inside [eps, T] (first_step=None forces the heuristic in the sampler too)."""
    sde, eps = SDES[name](), 1e-3
    base = _mixture().score_fn(sde)
    seen = []

    def score(x, t):
        seen.append(t)
        return base(x, t)

    x = _mixture().sample(4, torch.Generator().manual_seed(3))
    z = sde.prior_sampling((4, 2), generator=torch.Generator().manual_seed(4), dtype=F64)
    kw = dict(method=method, eps=eps, rtol=1e-3, atol=1e-3)
    sample(score, sde, z, "ode", options={"first_step": None}, **kw)
    decode(score, sde, z, **kw)
    encode(score, sde, x, **kw)
    log_likelihood(score, sde, x, divergence="exact", **kw)
    ts = torch.cat(seen)
    assert ts.min() >= eps and ts.max() <= sde.T


@pytest.mark.parametrize("name", SDES)
def test_fixed_grid_likelihood_converges_to_the_exact_density(name):
    """The issue's case: method="euler" used to take one step silently (2.7 nats off); with steps it converges."""
    sde, gm, eps = SDES[name](), _mixture(), 1e-3
    x = gm.sample(8, torch.Generator().manual_seed(5))
    exact = gm.log_prob(x, sde, eps)  # the PF-ODE of the exact score carries p_eps onto p_T; prior ~ p_T
    prior_gap = (sde.prior_logp(torch.zeros(1, 2, dtype=F64)) - gm.log_prob(torch.zeros(1, 2, dtype=F64), sde, sde.T))
    err = {n: (log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", method="rk4", steps=n, grid="edm",
                              eps=eps).logp - exact).abs().max() for n in (10, 40)}
    assert float(prior_gap.abs()) < 1e-2
    assert err[40] < 2e-2 and err[40] < err[10]
    with pytest.raises(ValueError, match="fixed-grid method: give steps"):
        log_likelihood(gm.score_fn(sde), sde, x, method="euler")


def test_likelihood_grid_must_start_at_T():
    sde, gm = VPSDE(), _mixture()
    x = gm.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="start at T"):
        log_likelihood(gm.score_fn(sde), sde, x, method="rk4", grid=[0.9, 0.5, 1e-3])
    grid = [0.9, 0.5, 1e-3]
    z = encode(gm.score_fn(sde), sde, x, grid=grid)  # encode to t_0 < T is fine: decode inverts it
    assert torch.allclose(decode(gm.score_fn(sde), sde, z, grid=grid), x, atol=1e-3)


@pytest.mark.parametrize("name", SDES)
def test_reverse_sde_is_built_on_flow(name):
    sde = SDES[name]()
    score = _mixture().score_fn(sde)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.full((4,), 0.37, dtype=F64)
    rev, ode = sde.reverse(score), sde.reverse(score, probability_flow=True)
    assert isinstance(rev, ReverseSDE)
    g2 = sde.diffusion(t)[:, None] ** 2
    assert torch.allclose(rev.drift(x, t), sde.drift(x, t) - g2 * score(x, t), rtol=1e-14, atol=1e-14)
    assert torch.equal(rev.drift(x, t), reverse_drift(sde, score, x, t))
    assert torch.equal(ode.drift(x, t), pf_velocity(sde, score, x, t))
    assert torch.equal(rev.drift(x, t, score(x, t)), rev.drift(x, t))
    assert torch.equal(ode.diffusion(t), torch.zeros(4, dtype=F64)) and torch.equal(rev.diffusion(t), sde.diffusion(t))
    f, G = sde.discretize(x, t, 0.01)
    rf, rG = rev.discretize(x, t, 0.01)
    assert torch.allclose(rf, f - G[:, None] ** 2 * score(x, t), rtol=1e-14, atol=1e-14) and torch.equal(rG, G)


@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion", "ancestral"])
def test_predictors_take_the_reverse_sde(monkeypatch, predictor):
    """The predictors get a ReverseSDE (sde.reverse(score)): its drift / discretize are what they step with."""
    calls = []
    for meth in ("drift", "discretize"):
        orig = getattr(ReverseSDE, meth)
        spy = lambda self, *a, _o=orig, _m=meth, **k: calls.append(_m) or _o(self, *a, **k)  # noqa: E731
        monkeypatch.setattr(ReverseSDE, meth, spy)
    seen = []
    orig_reverse = VPSDE.reverse
    monkeypatch.setattr(VPSDE, "reverse", lambda self, *a, **k: seen.append(1) or orig_reverse(self, *a, **k))
    sde = VPSDE()
    sample(_mixture().score_fn(sde), sde, (8, 2), predictor, steps=30, dtype=F64)
    assert seen == [1]
    want = {"euler_maruyama": ["drift"] * 30, "reverse_diffusion": ["discretize"] * 30, "ancestral": []}[predictor]
    assert calls == want


@pytest.mark.parametrize("name", SDES)
def test_tweedie_is_the_posterior_mean(name):
    """Tweedie against the oracle: for one Gaussian, E[x0 | x_t] is the exact Gaussian posterior mean."""
    sde = SDES[name]()
    mu, std = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([[0.5, 0.8]], dtype=F64)
    gm = GaussianMixture(mu, stds=std)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)
    a, s = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    post = mu + std**2 * a / (a**2 * std**2 + s**2) * (x - a * mu)
    assert torch.allclose(tweedie(sde, x, t, gm.score_fn(sde)(x, t)), post, rtol=1e-12, atol=1e-12)
