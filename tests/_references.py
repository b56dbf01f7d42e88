"""Test-only drivers of the reference implementations (diffusers, k-diffusion) on our SDEs and grids.

Each driver runs the reference on the scaled variable it works in, with the model output computed from
the same oracle score at the same times, so any difference is the reference's arithmetic or convention.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import torch

F64 = torch.float64


def load_kdiffusion_sampling(double_3m_d2: bool = False, float64_adaptive: bool = False) -> types.ModuleType:
    """k_diffusion/sampling.py loaded without the package __init__ (which needs torchvision etc.).

    Args:
        double_3m_d2: replace the 3M SDE's d2 = (d1_0 - d1_1)/(r0 + r1) by twice that (our third-order term),
            so that a comparison isolates that one documented convention.
        float64_adaptive: make ``sample_dpm_adaptive`` hold its tolerances and its log-sigma times in float64
            (it builds them with ``torch.tensor(python_float)``, i.e. in float32), so that a comparison
            isolates the step arithmetic.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.origin is None:
        import pytest

        pytest.skip("k-diffusion is not installed")
    path = pathlib.Path(spec.origin).parent / "sampling.py"
    src = path.read_text()
    if double_3m_d2:
        old = "d2 = (d1_0 - d1_1) / (r0 + r1)"
        assert src.count(old) == 1, "k-diffusion's 3M SDE update changed; revisit the convention test"
        src = src.replace(old, "d2 = 2 * (d1_0 - d1_1) / (r0 + r1)")
    if float64_adaptive:
        for old in ("atol = torch.tensor(atol)", "rtol = torch.tensor(rtol)", "torch.tensor(sigma_max)",
                    "torch.tensor(sigma_min)"):
            assert old in src, "k-diffusion's sample_dpm_adaptive changed; revisit the convention test"
            src = src.replace(old, old[:-1] + ", dtype=torch.float64)")
    pkg = types.ModuleType("_kdiff_ref")
    pkg.__path__ = []
    utils = types.ModuleType("_kdiff_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules["_kdiff_ref"], sys.modules["_kdiff_ref.utils"] = pkg, utils
    mod = types.ModuleType("_kdiff_ref.sampling")
    mod.__package__ = "_kdiff_ref"
    try:
        exec(compile(src, str(path), "exec"), mod.__dict__)
    except ImportError as err:  # its own imports (scipy, torchsde, tqdm) missing
        import pytest

        pytest.skip(f"k-diffusion's sampling.py cannot be loaded: {err}")
    return mod


def _coefs(sde, ts):
    tt = torch.tensor(ts, dtype=F64)
    return tt, sde.alpha(tt), sde.sigma(tt)


def kdiffusion_run(fn, score_fn, sde, x_T, ts, noises=None, final_zero=False, **kw):
    """Run a k-diffusion sampler on sigma = sigma(t)/alpha(t) at our grid; returns x at ts[-1] (or, with
    ``final_zero``, after a last step to sigma = 0: the last x0 estimate)."""
    tt, a, s = _coefs(sde, ts)
    sig = torch.cat([s / a, s.new_zeros(1)]) if final_zero else s / a
    if noises is not None:
        it = iter(noises)
        kw["noise_sampler"] = lambda s0, s1: next(it)
    out = fn(_kdiffusion_denoiser(score_fn, sde), x_T / a[0], sig, disable=True, **kw)
    return out if final_zero else out * a[-1]


def _kdiffusion_denoiser(score_fn, sde):
    """k-diffusion's denoiser D(x/alpha, sigma/alpha) = x0_hat from our score (Tweedie)."""

    def denoiser(xs, sigma):
        t = sde.t_from_log_snr(-2 * torch.log(sigma[:1])).clamp(max=sde.T).expand(xs.shape[0])
        al = sde.alpha(t)[:, None]
        x = xs * al
        return (x + sde.sigma(t)[:, None] ** 2 * score_fn(x, t)) / al

    return denoiser


def kdiffusion_adaptive(kd, score_fn, sde, x_T, eps, **kw):
    """k-diffusion's ``sample_dpm_adaptive`` from T to eps on sigma = sigma(t)/alpha(t); returns (x at eps,
    its info dict: steps, nfe, n_accept, n_reject)."""
    _, a, s = _coefs(sde, [sde.T, eps])
    sig = s / a
    out, info = kd.sample_dpm_adaptive(_kdiffusion_denoiser(score_fn, sde), x_T / a[0], float(sig[1]), float(sig[0]),
                                       disable=True, return_info=True, **kw)
    return out * a[1], info


def diffusers_run(scheduler, score_fn, sde, x_T, ts, final_zero=False):
    """Drive a diffusers multistep scheduler with sigmas = sigma(t)/alpha(t) at our grid.

    diffusers works on the VP-normalised variable x' = x a'/alpha with a' = 1/sqrt(1 + (sigma/alpha)^2);
    the model output passed is the oracle's x0 estimate (prediction_type="sample"). With ``final_zero`` the
    last step goes to sigma = 0 (diffusers' final_sigmas_type="zero": the output is the last x0 estimate)."""
    n = len(ts) - 1 + final_zero
    scheduler.set_timesteps(n)
    tt, a, s = _coefs(sde, ts)
    st = s / a
    scheduler.sigmas = torch.cat([st, st.new_zeros(1)]) if final_zero else st.clone()
    scheduler.timesteps = torch.arange(n, 0, -1)
    ap = 1 / torch.sqrt(st**2 + 1)
    y = x_T * (ap[0] / a[0])
    for i in range(n):
        x = y * (a[i] / ap[i])
        x0 = (x + s[i] ** 2 * score_fn(x, tt[i].expand(x.shape[0]))) / a[i]
        y = scheduler.step(x0, scheduler.timesteps[i], y).prev_sample
    return y if final_zero else y * (a[-1] / ap[-1])
