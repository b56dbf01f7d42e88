"""NFE accounting (issue 14): a sampler's nfe excludes the callback's (denoising strip's) extra score
calls, which are reported apart; likelihood.py reports NFE per ODE solve (trajectory) and the total
score calls, not a sum over mini-batches under the name nfe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sde import VPSDE, SubVPSDE
from sde.likelihood import dataset_bits_per_dim, log_likelihood
from sde.samplers import SAMPLERS, sample

from test_samplers_api import ADAPTIVE, GM, Counter  # isort: skip  (the sampler tests' mixture and call counter)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _x_T(n=6):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)


@pytest.mark.parametrize("opts", [dict(method="rk4", steps=5), dict(method="dopri5", steps=3),
                                  dict(method="dopri5"), dict(method="euler", steps=4, denoise_final=True)])
def test_ode_callback_calls_are_counted_apart_and_change_nothing(opts):
    sde = VPSDE()
    plain_counter, cb_counter, infos = Counter(GM.score_fn(sde)), Counter(GM.score_fn(sde)), []
    plain = sample(plain_counter, sde, _x_T(), "ode", **opts)
    with_cb = sample(cb_counter, sde, _x_T(), "ode", callback=infos.append, **opts)
    torch.testing.assert_close(with_cb.x, plain.x, rtol=0, atol=0)  # the numerics do not change
    assert with_cb.nfe == plain.nfe == plain_counter.calls  # the sampler's own calls only
    assert plain.callback_nfe == 0 and with_cb.callback_nfe == len(infos) > 0  # one per grid point
    assert cb_counter.calls == with_cb.nfe + with_cb.callback_nfe  # and together they are every call


def test_callback_nfe_sums_over_batches_and_is_zero_for_other_samplers():
    sde = SubVPSDE()
    infos = []
    res = sample(GM.score_fn(sde), sde, _x_T(6), "ode", callback=infos.append, batch_size=4, method="rk4", steps=3)
    assert res.callback_nfe == len(infos) == 2 * 3 and res.nfe == 2 * 3 * 4
    for name in SAMPLERS:
        if name == "ode":
            continue
        counter = Counter(GM.score_fn(sde))
        steps = 40 if name in ("reverse_diffusion", "pc") else 4  # DDPM's step needs beta(t) dt < 1
        opts = {} if name in ADAPTIVE else dict(steps=steps)  # adaptive samplers take no steps
        out = sample(counter, sde, _x_T(), name, generator=torch.Generator().manual_seed(0), callback=lambda i: None,
                     **opts)
        assert out.callback_nfe == 0 and out.nfe == counter.calls, name


def _draw(strip_frames: int):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from _common.distributed import draw_sharded
        from _common.sampling import draw
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    sde = VPSDE()
    cfg = OmegaConf.load(ROOT / "conf" / "sampler" / "ode.yaml")
    cfg.options.steps = 6
    kw = dict(generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), dtype=F64,
              strip_frames=strip_frames)
    a = draw(GM.score_fn(sde), sde, cfg, (5, 2), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    b = draw_sharded(GM.score_fn(sde), sde, cfg, (5, 2), seed=0, **kw)  # sample.py's route (no torchrun here)
    assert torch.equal(a[0], b[0]) and (a[1], a[3], len(a[2])) == (b[1], b[3], len(b[2]))
    return a


def test_draw_reports_the_samplers_nfe_with_or_without_a_strip():
    """sample.py / train.py / every app using ``draw``: the strip does not change the reported nfe."""
    x0, nfe0, strip0, strip_nfe0 = _draw(0)
    x1, nfe1, strip1, strip_nfe1 = _draw(4)
    assert torch.equal(x0, x1)
    assert nfe0 == nfe1 == 4 * 6  # rk4: 4 calls per interval; the old accounting gave 4 * 6 + 6 with the strip
    assert strip0 == [] and strip_nfe0 == 0
    assert len(strip1) == 4 + 1 and strip_nfe1 == 6  # one x0_hat call per grid point, reported apart


def test_likelihood_batch_nfe_is_per_solve_and_sums_to_nfe():
    sde = VPSDE()
    x = GM.sample(12, generator=torch.Generator().manual_seed(1))
    calls = []
    score = GM.score_fn(sde)

    def counted(xx, t):
        calls.append(xx.shape[0])
        return score(xx, t)

    res = log_likelihood(counted, sde, x, divergence="exact", batch_size=5, rtol=1e-4, atol=1e-4)
    assert len(res.batch_nfe) == 3 and sum(res.batch_nfe) == res.nfe == len(calls)
    assert res.batch_nfe[0] + res.batch_nfe[1] == calls.count(5) and res.batch_nfe[2] == calls.count(2)
    bpd = dataset_bits_per_dim(GM.score_fn(sde), sde, torch.randint(0, 256, (6, 2)), repeats=2, batch_size=4,
                               generator=torch.Generator().manual_seed(0), divergence="exact", rtol=1e-3, atol=1e-3)
    assert len(bpd.batch_nfe) == 2 * 2 and sum(bpd.batch_nfe) == bpd.nfe


def _app(script: str, args: list[str], tmp: Path) -> dict:
    out = tmp / script.removesuffix(".py") / "_".join(a.split("=")[-1] for a in args)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_SILENT="true", HYDRA_FULL_ERROR="1",
               SCORE_SDE_CACHE=str(tmp / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "threads=1", "logger=none",
                           "data=gmm", "score=oracle", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_likelihood_app_reports_nfe_per_trajectory_and_total_calls(tmp_path):
    common = ["num_points=256", "likelihood.divergence=exact", "likelihood.rtol=1e-4", "likelihood.atol=1e-4"]
    big, small = (_app("likelihood.py", [*common, f"batch_size={b}"], tmp_path) for b in (256, 64))
    assert big["solves"] == 1 and small["solves"] == 4
    assert big["score_calls"] == big["nfe_per_trajectory_mean"] == big["nfe_per_trajectory_max"]
    # Per trajectory the NFE is about the same (the step control sees a different batch), not 4 times larger.
    assert 0.5 < small["nfe_per_trajectory_mean"] / big["nfe_per_trajectory_mean"] < 1.5
    assert small["nfe_per_trajectory_mean"] <= small["nfe_per_trajectory_max"]
    assert small["score_calls"] == pytest.approx(4 * small["nfe_per_trajectory_mean"])  # the total is their sum
    assert "nfe" not in big  # no ambiguous sum under the name nfe
    sampled = _app("sample.py", ["sampler=ode", "sampler.options.steps=5", "num_samples=50",
                                 "reference_samples=50"], tmp_path)
    assert sampled["nfe"] == 4 * 5 and sampled["strip_nfe"] == 0  # 2-D data: no strip
