"""Sampler benchmarks against the exact oracle; prints Markdown tables.

    python experiments/bench_samplers.py            # all three tables, a few minutes on 2 cores
    python experiments/bench_samplers.py --only kl3072

Tables:
  quality  - KL of the deterministic samplers on Gaussian data (exact, from the affine map) and
             energy distance of every sampler on a 2-D mixture, versus NFE.
  kl3072   - the issue's target: diagonal Gaussian data in 3072 dims, VP SDE, exact score,
             20 NFE: exact KL(output || data) of each deterministic solver.
  overhead - per-step sampler time beyond the network's own forward, on CPU.
  shared_time - forward time of the default nets when the batch shares one time (a stride-0
             view, as the samplers pass it) versus one time per row.
  fast     - issue 15: exact KL on the 3072-D Gaussian, VP and VE, NFE 5-50, every fast solver and the
             references (diffusers UniPC / DPMSolverMultistep, k-diffusion DPM++ 2M / 3M) on the same grid.
  stochastic - exact-law KL of the stochastic solvers on the 3072-D Gaussian, NFE 20-100.
  defaults - the measurements behind the per-SDE defaults (ancestral variance, ddim grid,
             dpm_solver lower_order_final).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import sys
import time
from unittest import mock

import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from sde.samplers import SAMPLERS, sample
from sde.samplers.grids import time_grid
from sde.samplers.learned_grid import learn_grid

F64 = torch.float64


def diag_gaussian(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-like spectrum: means in [-0.5, 0.5], stds log-uniform in [0.02, 1]."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g, dtype=F64) - 0.5
    std = torch.exp(torch.empty(dim, dtype=F64).uniform_(math.log(0.02), 0.0, generator=g))
    return mu, std


def exact_kl(sde, mu, std, name, **opts) -> tuple[float, int]:
    """KL(output || data) of a deterministic sampler, from its diagonal affine map x = b + a x_T."""
    gm = GaussianMixture(mu[None], stds=std[None])
    probes = torch.stack([torch.zeros_like(mu), torch.ones_like(mu)])
    res = sample(gm.score_fn(sde), sde, probes, name, **opts)
    b, a = res.x[0], res.x[1] - res.x[0]
    var = (a * sde.prior_std) ** 2
    r = var / std**2
    kl = 0.5 * (r + (b - mu) ** 2 / std**2 - 1.0 - torch.log(r)).sum()
    return float(kl), res.nfe


def kl_of_law(mean, var, mu, std) -> float:
    """KL(N(mean, diag var) || N(mu, diag std^2)) in nats."""
    r = var / std**2
    return float(0.5 * (r + (mean - mu) ** 2 / std**2 - 1.0 - torch.log(r)).sum())


def kl_of_run(run, sde, mu, std) -> float:
    """KL(output || data) of any deterministic run(x_T) -> x, from its diagonal affine map."""
    probes = torch.stack([torch.zeros_like(mu), torch.ones_like(mu)])
    out = run(probes)
    b, a = out[0], out[1] - out[0]
    return kl_of_law(b, (a * sde.prior_std) ** 2, mu, std)


def energy_distance(x, y) -> float:
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


DETERMINISTIC = {  # label -> (sampler, options given the NFE budget n)
    "ddim (uniform t)": lambda n: ("ddim", dict(steps=n - 1, grid="uniform")),
    "heun (edm grid)": lambda n: ("heun", dict(steps=(n - 1) // 2)),
    "dpm_solver-2 singlestep noise": lambda n: ("dpm_solver", dict(steps=n // 2, order=2, method="singlestep",
                                                                   prediction="noise", denoise_final=False)),
    "dpm_solver-3 singlestep noise": lambda n: ("dpm_solver", dict(steps=n // 3, order=3, method="singlestep",
                                                                   prediction="noise", denoise_final=False)),
    "dpm_solver++ 2M (log_snr)": lambda n: ("dpm_solver", dict(steps=n - 1, order=2)),
    "dpm_solver++ 3M (log_snr)": lambda n: ("dpm_solver", dict(steps=n - 2, order=3)),
    "ode rk4 (log_snr)": lambda n: ("ode", dict(method="rk4", steps=max(n // 4, 1), grid="log_snr")),
}


def table_quality(args) -> None:
    sde = VPSDE()
    mu, std = diag_gaussian(64)
    budgets = (10, 20, 50, 100)
    print("\n### Exact KL(output || data) in nats, 64-D diagonal Gaussian, VP, exact score\n")
    print("| sampler | " + " | ".join(f"NFE~{n}" for n in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for label, make in DETERMINISTIC.items():
        cells = []
        for n in budgets:
            name, opts = make(n)
            kl, nfe = exact_kl(sde, mu, std, name, **opts)
            cells.append(f"{kl:.3g} ({nfe})")
        print(f"| {label} | " + " | ".join(cells) + " |")
    kl, nfe = exact_kl(sde, mu, std, "ode", rtol=1e-5, atol=1e-5)
    print(f"| ode dopri5 rtol=atol=1e-5 | {kl:.3g} ({nfe}) adaptive | | | |")

    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]], dtype=F64)
    stds, weights = torch.tensor([0.2, 0.3, 0.15], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    gm = GaussianMixture(means, stds=stds, weights=weights)
    n = args.n
    data = gm.sample(n, g)
    floor = energy_distance(gm.sample(n, g), data)
    stoch_budgets = (20, 50, 200)
    print(f"\n### Energy distance to {n} data samples, 2-D 3-component mixture, exact score "
          f"(two data sets of this size: {floor:.4f})\n")
    print("| SDE | sampler | " + " | ".join(f"NFE~{b}" for b in stoch_budgets) + " |")
    print("|---|---|" + "---|" * len(stoch_budgets))
    samplers = {  # label -> (sampler, options for the budget b)
        "euler_maruyama": ("euler_maruyama", lambda b: dict(steps=b - 1)),
        "reverse_diffusion": ("reverse_diffusion", lambda b: dict(steps=b - 1)),
        "ancestral": ("ancestral", lambda b: dict(steps=b - 1)),
        "pc (EM + langevin snr=0.1)": ("pc", lambda b: dict(steps=(b - 1) // 2, predictor="euler_maruyama", snr=0.1)),
        "ddim": ("ddim", lambda b: dict(steps=b - 1)),
        "heun": ("heun", lambda b: dict(steps=(b - 1) // 2)),
        "dpm_solver++ 3M": ("dpm_solver", lambda b: dict(steps=b - 2, order=3)),
        "ode rk4": ("ode", lambda b: dict(method="rk4", steps=b // 4)),
    }
    for sde_name, sde in (("VP", VPSDE()), ("subVP", SubVPSDE()), ("VE", VESDE(sigma_max=10.0))):
        for label, (name, make) in samplers.items():
            cells = []
            for b in stoch_budgets:
                try:
                    res = sample(gm.score_fn(sde), sde, (n, 2), name, generator=g, dtype=F64, **make(b))
                    cells.append(f"{energy_distance(res.x, data):.4f}")
                except FloatingPointError:
                    cells.append("non-finite")
                except ValueError:  # e.g. the DDPM chain of reverse_diffusion is undefined with so few steps
                    cells.append("n/a")
            print(f"| {sde_name} | {label} | " + " | ".join(cells) + " |")


def table_kl3072(args) -> None:
    sde = VPSDE()
    mu, std = diag_gaussian(3072)
    print("\n### 3072-D diagonal Gaussian (stds log-uniform in [0.02, 1]), VP, exact score, 20 NFE: "
          "exact KL(output || data) in nats\n")
    print("| solver | grid | eps | final step | NFE | KL (nats) |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("ddim", "uniform", 1e-3, True, dict(steps=19)),
        ("ddim", "log_snr", 1e-3, True, dict(steps=19)),
        ("heun", "edm", 1e-3, True, dict(steps=9)),
        ("heun", "edm", 1e-3, False, dict(steps=10)),
        ("dpm_solver-2 singlestep noise", "log_snr", 1e-3, False,
         dict(order=2, method="singlestep", prediction="noise", steps=10)),
        ("dpm_solver-3 singlestep noise", "log_snr", 1e-3, True,
         dict(order=3, method="singlestep", prediction="noise", steps=6)),
        ("dpm_solver++ 2M", "log_snr", 1e-3, True, dict(order=2, steps=19)),
        ("dpm_solver++ 3M", "log_snr", 1e-3, True, dict(order=3, steps=18)),
        ("dpm_solver++ 3M", "log_snr", 1e-4, True, dict(order=3, steps=18)),
        ("dpm_solver++ 3M", "edm", 1e-4, True, dict(order=3, steps=18)),
        ("dpm_solver++ 3M", "log_snr", 1e-5, True, dict(order=3, steps=18)),
        ("dpm_solver++ 3M", "edm", 1e-5, True, dict(order=3, steps=18)),
        ("dpm_solver++ 3M", "log_snr", 1e-5, False, dict(order=3, steps=19)),
    ]
    for label, grid, eps, final, opts in rows:
        name = "dpm_solver" if label.startswith("dpm") else label
        kl, nfe = exact_kl(sde, mu, std, name, grid=grid, eps=eps, denoise_final=final, **opts)
        print(f"| {label} | {grid} | {eps:g} | {'Tweedie' if final else 'none'} | {nfe} | {kl:.3g} |")


class _StandIn(torch.nn.Module):
    """A U-Net-sized stand-in (used only when sde.nets.UNet is unavailable): 3x3 conv residual
    blocks at 32x32 and 16x16 with 128 channels."""

    def __init__(self, ch: int = 128) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(ch, ch, 3, padding=1) for _ in range(8))
        self.out = torch.nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, noise_label, y=None):
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            h = h + torch.nn.functional.silu(blk(h))
            if i == 3:
                h = torch.nn.functional.avg_pool2d(h, 2)
            if i == 7:
                h = torch.nn.functional.interpolate(h, scale_factor=2)
        return self.out(h) + 0 * noise_label.reshape(-1, 1, 1, 1)


def table_overhead(args) -> None:
    try:
        from sde.nets import UNet
    except ImportError:
        net, label = _StandIn(), "stand-in conv net (8 residual 3x3 convs, 128 ch, 32x32/16x16)"
    else:
        net = UNet(in_channels=3, base_channels=32, channel_mults=(1, 2, 2), attn_resolutions=(8,), image_size=32)
        label = f"sde.nets.UNet 3x32x32, 32 base channels, {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params"
    net.eval()
    sde = VPSDE()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def score_fn(x, t):
        return net(x, t)

    steps = args.overhead_steps
    with torch.no_grad():
        shared_one = torch.ones(1).expand(args.batch)  # one time for the batch, as the samplers pass it
        net(x, shared_one)
        sample(score_fn, sde, x, "ddim", steps=2)  # warm-up: first calls pay one-off allocation costs
        rows = []
        for name, opts in (("ddim", dict(steps=steps, denoise_final=False)),
                           ("dpm_solver", dict(steps=steps, order=3, warmup="lower_order", denoise_final=False)),
                           ("heun", dict(steps=steps // 2, denoise_final=False)),
                           ("euler_maruyama", dict(steps=steps, denoise_final=False))):
            best = math.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                nfe = sample(score_fn, sde, x, name, generator=torch.Generator().manual_seed(0), **opts).nfe
                t_samp = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(nfe):
                    net(x, shared_one)
                t_net = time.perf_counter() - t0
                best = min(best, (t_samp - t_net) / t_net)
            rows.append((name, nfe, best))
    print(f"\n### Sampler overhead per step vs the bare network forward ({label}, batch {args.batch}x3x32x32, "
          f"CPU, best of {args.repeats})\n")
    print("| sampler | NFE | overhead |")
    print("|---|---|---|")
    for name, nfe, over in rows:
        print(f"| {name} | {nfe} | {100 * over:.1f}% |")


def table_shared_time(args) -> None:
    """Forward time of the default nets with one time per row (``ones(B) * t``, score_sde's
    convention) versus one shared element viewed B times (what our samplers and the ODE pass)."""
    from sde.models import ScoreModel
    from sde.nets import MLP, UNet

    sde, batch = VPSDE(), 128
    nets = {
        "MLP(64) (default digits MLP, 0.92M params)": (MLP(64), (batch, 64)),
        "UNet 1x8x8 (default digits U-Net)": (
            UNet(in_channels=1, base_channels=32, channel_mults=(1, 2), attn_resolutions=(4,), image_size=8),
            (batch, 1, 8, 8),
        ),
    }
    print(f"\n### Score-model forward per call, batch {batch}, CPU, median of {args.shared_calls} calls\n")
    print("| model | `ones(B) * t` (ms) | shared view (ms) | speed-up | with backward: per row / shared (ms) |")
    print("|---|---|---|---|---|")
    for name, (net, shape) in nets.items():
        model = ScoreModel(net, sde).eval().requires_grad_(False)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        per_row, shared = torch.ones(batch) * 0.3, torch.full((1,), 0.3).expand(batch)
        cells = []
        for grad in (False, True):
            for t in (per_row, shared):
                def call(t=t, grad=grad, model=model, x=x):
                    if not grad:
                        with torch.no_grad():
                            return model(x, t)
                    xx = x.detach().requires_grad_(True)
                    return torch.autograd.grad(model(xx, t).sum(), xx)
                call()
                walls = []
                for _ in range(args.shared_calls):
                    t0 = time.perf_counter()
                    call()
                    walls.append(time.perf_counter() - t0)
                cells.append(1e3 * sorted(walls)[len(walls) // 2])
        print(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[0] / cells[1]:.2f}x "
              f"| {cells[2]:.2f} / {cells[3]:.2f} |")


FAST = {  # label -> (sampler, options given the NFE budget n, Tweedie final step included)
    "dpm_solver++ 2M": lambda n: ("dpm_solver", dict(order=2, steps=n - 1)),
    "dpm_solver++ 3M": lambda n: ("dpm_solver", dict(order=3, steps=n - 2)),
    "unipc bh2 p=2": lambda n: ("unipc", dict(order=2, variant="bh2", steps=n - 1)),
    "unipc bh1 p=3": lambda n: ("unipc", dict(order=3, variant="bh1", steps=n - 1)),
    "unipc bh2 p=3": lambda n: ("unipc", dict(order=3, variant="bh2", steps=n - 1)),
    "unipc bh2 p=3 (no lower-order final)": lambda n: ("unipc", dict(order=3, steps=n - 1, lower_order_final=False)),
    "deis-3 tAB": lambda n: ("deis", dict(order=3, steps=n - 2)),
}


LEARNED = {  # label -> unipc options; the grid is learned per SDE and NFE with learn_grid (8 prior draws)
    "unipc bh2 p=2, learned grid": dict(order=2),
    "unipc bh2 p=3, learned grid": dict(order=3),
}


def _references():
    """label -> run(sde, score_fn, x_T, ts) of the installed references (same grid, last step to sigma 0)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from _references import diffusers_run, kdiffusion_run, load_kdiffusion_sampling

    refs = {}
    with contextlib.suppress(ImportError):
        import diffusers

        def dif(make):
            return lambda sde, f, x, ts: diffusers_run(make(), f, sde, x, ts, final_zero=True)

        refs["diffusers UniPC p=2"] = dif(lambda: diffusers.UniPCMultistepScheduler(prediction_type="sample"))
        refs["diffusers UniPC p=3"] = dif(lambda: diffusers.UniPCMultistepScheduler(solver_order=3,
                                                                                   prediction_type="sample"))
        refs["diffusers DPMSolverMultistep 2M"] = dif(lambda: diffusers.DPMSolverMultistepScheduler(
            prediction_type="sample"))
        refs["diffusers DPMSolverMultistep 3M"] = dif(lambda: diffusers.DPMSolverMultistepScheduler(
            solver_order=3, prediction_type="sample"))
    try:
        import pytest  # load_kdiffusion_sampling skips through pytest when k-diffusion is missing

        kd = load_kdiffusion_sampling()
    except (ImportError, pytest.skip.Exception):
        return refs
    refs["k-diffusion dpmpp_2m"] = lambda sde, f, x, ts: kdiffusion_run(kd.sample_dpmpp_2m, f, sde, x, ts,
                                                                        final_zero=True)
    refs["k-diffusion dpmpp_3m_sde eta=0"] = lambda sde, f, x, ts: kdiffusion_run(
        kd.sample_dpmpp_3m_sde, f, sde, x, ts, final_zero=True, eta=0.0)
    return refs


def table_fast(args) -> None:
    mu, std = diag_gaussian(3072)
    budgets = (5, 8, 10, 15, 20, 50)
    refs = _references()
    for sde_name, sde in (("VP", VPSDE()), ("VE", VESDE())):
        gm = GaussianMixture(mu[None], stds=std[None])
        print(f"\n### 3072-D diagonal Gaussian, {sde_name}, exact score, log-SNR grid: exact KL(output || data) "
              "in nats versus NFE\n")
        print("| solver | " + " | ".join(f"NFE {n}" for n in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        best = {"ours": [math.inf] * len(budgets), "refs": [math.inf] * len(budgets)}
        for label, make in FAST.items():
            cells = []
            for k, n in enumerate(budgets):
                name, opts = make(n)
                kl, nfe = exact_kl(sde, mu, std, name, **opts)
                best["ours"][k] = min(best["ours"][k], kl)
                cells.append(f"{kl:.3g}" + ("" if nfe == n else f" ({nfe})"))
            print(f"| {label} | " + " | ".join(cells) + " |")
        for label, opts in LEARNED.items():
            cells = []
            for k, n in enumerate(budgets):
                lg = learn_grid(gm.score_fn(sde), sde, mu.shape, "unipc", steps=n - 1, n_samples=8, sweeps=6,
                                generator=torch.Generator().manual_seed(0), **opts)
                kl, _ = exact_kl(sde, mu, std, "unipc", grid=lg.grid, **opts)
                best["ours"][k] = min(best["ours"][k], kl)
                cells.append(f"{kl:.3g}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        for label, run in refs.items():
            cells = []
            for k, n in enumerate(budgets):
                ts = time_grid(sde, n - 1, 1e-5 if sde_name == "VE" else 1e-3, "log_snr")
                f = gm.score_fn(sde)
                kl = kl_of_run(lambda x, run=run, ts=ts, sde=sde, f=f: run(sde, f, x, ts), sde, mu, std)
                best["refs"][k] = min(best["refs"][k], kl)
                cells.append(f"{kl:.3g}")
            print(f"| ref: {label} | " + " | ".join(cells) + " |")
        print("| **best ours / best reference** | " + " | ".join(
            f"{o / r:.2f}" if r < math.inf else "-" for o, r in zip(best["ours"], best["refs"])) + " |")


def exact_law(name, sde, mu, std, steps, **opts) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a stochastic sampler's output on N(mu, diag std^2) data, exactly: the output
    is affine in (x_T, z_1..z_N) coordinate-wise; row 2 + i of the probe batch gets z = 1 at step i."""
    gm = GaussianMixture(mu[None], stds=std[None])
    x_T = torch.zeros(steps + 2, mu.shape[0], dtype=mu.dtype)
    x_T[1] = 1.0
    calls = [0]

    def unit_noise(i=None, x=None, generator=None):
        z = torch.zeros_like(x)
        z[2 + (calls[0] if i is None else i)] = 1.0
        calls[0] += 1
        return z

    if "noise_sampler" in SAMPLERS[name].__code__.co_varnames:
        out = SAMPLERS[name](gm.score_fn(sde), sde, x_T, steps=steps, noise_sampler=unit_noise, **opts).x
    else:  # the predictor-only samplers draw with randn_like once per step: count the draws
        with mock.patch("sde.samplers.predictors.randn_like", lambda x, g: unit_noise(None, x)):
            out = SAMPLERS[name](gm.score_fn(sde), sde, x_T, steps=steps, **opts).x
    b, a, c = out[0], out[1] - out[0], out[2:] - out[0]
    return b, a**2 * sde.prior_std**2 + (c**2).sum(0)


def table_stochastic(args) -> None:
    mu, std = diag_gaussian(3072)
    budgets = (20, 50, 100)
    rows = {  # label -> (sampler, options given the NFE budget n)
        "dpm_solver_sde 2M eta=1": lambda n: ("dpm_solver_sde", dict(order=2, steps=n - 1)),
        "dpm_solver_sde 2M eta=1 heun": lambda n: ("dpm_solver_sde", dict(order=2, steps=n - 1, solver_type="heun")),
        "dpm_solver_sde 3M eta=1": lambda n: ("dpm_solver_sde", dict(order=3, steps=n - 1)),
        "dpm_solver_sde 2M eta=0.5": lambda n: ("dpm_solver_sde", dict(order=2, steps=n - 1, eta=0.5)),
        "dpm_2s_ancestral": lambda n: ("dpm_2s_ancestral", dict(steps=(n - 1) // 2)),
        "ancestral (beta variance)": lambda n: ("ancestral", dict(steps=n)),
        "euler_maruyama": lambda n: ("euler_maruyama", dict(steps=n)),
    }
    for sde_name, sde in (("VP", VPSDE()), ("VE", VESDE())):
        print(f"\n### Stochastic solvers, 3072-D diagonal Gaussian, {sde_name}, exact score: exact-law "
              "KL(output || data) in nats\n")
        print("| solver | " + " | ".join(f"NFE~{n}" for n in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for label, make in rows.items():
            cells = []
            for n in budgets:
                name, opts = make(n)
                m, v = exact_law(name, sde, mu, std, opts.pop("steps"), **opts)
                cells.append(f"{kl_of_law(m, v, mu, std):.3g}")
            print(f"| {label} | " + " | ".join(cells) + " |")


def table_defaults(args) -> None:
    mu, std = diag_gaussian(64)
    sdes = (("VP", VPSDE()), ("subVP", SubVPSDE()), ("VE", VESDE()))
    print("\n### Ancestral sampling: exact-law KL(output || data), 64-D diagonal Gaussian, exact score\n")
    print("| SDE | variance | 100 steps | 1000 steps |")
    print("|---|---|---|---|")
    for sde_name, sde in sdes:
        for pred in ("ancestral", "ancestral_posterior"):
            cells = []
            for n in (100, 1000):
                m, v = exact_law("pc", sde, mu, std, n, predictor=pred, corrector="none")
                cells.append(f"{kl_of_law(m, v, mu, std):.3g}")
            print(f"| {sde_name} | {'beta' if pred == 'ancestral' else 'posterior'} | " + " | ".join(cells) + " |")
    print("\n### DDIM grid: exact KL(output || data), 64-D diagonal Gaussian, exact score\n")
    print("| SDE | grid | NFE 10 | NFE 20 | NFE 50 |")
    print("|---|---|---|---|---|")
    for sde_name, sde in sdes:
        for grid in ("uniform", "log_snr", "edm"):
            cells = [f"{exact_kl(sde, mu, std, 'ddim', steps=n - 1, grid=grid)[0]:.3g}" for n in (10, 20, 50)]
            print(f"| {sde_name} | {grid} | " + " | ".join(cells) + " |")
    print("\n### dpm_solver lower_order_final (steps < 10): exact KL, 3072-D diagonal Gaussian, exact score\n")
    print("| SDE | solver | rule | NFE 5 | NFE 8 | NFE 10 |")
    print("|---|---|---|---|---|---|")
    mu, std = diag_gaussian(3072)
    for sde_name, sde in sdes:
        for order in (2, 3):
            for lof in (True, False):
                kls = [exact_kl(sde, mu, std, "dpm_solver", order=order, steps=n - 1 - (order == 3),
                                lower_order_final=lof)[0] for n in (5, 8, 10)]
                cells = [f"{kl:.3g}" for kl in kls]
                print(f"| {sde_name} | {order}M | {'on' if lof else 'off'} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["quality", "kl3072", "overhead", "shared_time", "fast", "stochastic",
                                      "defaults"], default=None,
                   help="run one table")
    p.add_argument("--n", type=int, default=500, help="samples for the 2-D mixture table")
    p.add_argument("--batch", type=int, default=4, help="batch of the overhead table")
    p.add_argument("--overhead-steps", type=int, default=6, help="steps of the overhead table")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best is kept)")
    p.add_argument("--shared-calls", type=int, default=50, help="calls timed per cell of the shared_time table")
    args = p.parse_args()
    torch.set_num_threads(1)
    tables = {"quality": table_quality, "kl3072": table_kl3072, "overhead": table_overhead,
              "shared_time": table_shared_time, "fast": table_fast, "stochastic": table_stochastic,
              "defaults": table_defaults}
    for name, fn in tables.items():
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
