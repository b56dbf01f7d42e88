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
  digits   - needs --checkpoint (a trained digits model, e.g. from experiments/train.py): FD-digits against
             the test split, distance to a many-step solution and CPU time at 10 and 20 NFE for every fast
             solver, the learned grids and the references; then the learned grid against the fixed grids at
             10 NFE. Runs only when --checkpoint is given:
             python experiments/bench_samplers.py --only digits --checkpoint outputs/train/<name>/<run>/checkpoint.pt
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


LEARNED = {  # label -> (sampler, options); the grid is learned per SDE, model and NFE with learn_grid (8 prior draws)
    "dpm_solver++ 2M, learned grid": ("dpm_solver", dict(order=2)),
    "unipc bh2 p=2, learned grid": ("unipc", dict(order=2)),
    "unipc bh2 p=3, learned grid": ("unipc", dict(order=3)),
}
LEARN = dict(n_samples=8, sweeps=6)  # learn_grid's budget in the tables (about 1200 score calls of 8 draws)


def learned(score_fn, sde, shape, name: str, n: int, **opts):
    """The LearnedGrid of sampler ``name`` at an NFE budget of n (n - 1 steps and the Tweedie step)."""
    return learn_grid(score_fn, sde, shape, name, steps=n - 1, generator=torch.Generator().manual_seed(0),
                      **LEARN, **opts)


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
        for label, (name, opts) in LEARNED.items():
            cells = []
            for k, n in enumerate(budgets):
                grid = learned(gm.score_fn(sde), sde, mu.shape, name, n, **opts).grid
                kl, _ = exact_kl(sde, mu, std, name, grid=grid, **opts)
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


DIGITS_EXACT_STEPS = 100  # steps of the many-step solution the digits tables measure distances to


class _Digits:
    """A trained digits checkpoint and what the digits tables measure against: the test split's features,
    the fixed x_T of every run, and FD-digits / wall time / distance to a many-step solution."""

    def __init__(self, args) -> None:
        from sde.checkpoint import load_score_model
        from sde.data import load_dataset
        from sde.features.digits_classifier import get_digits_classifier

        loaded = load_score_model(args.checkpoint, dtype=torch.float32)
        model, self.sde = loaded.model, loaded.sde
        self.score = lambda x, t: model(x.float(), t.float()).to(x.dtype)  # float32 net, float64 solvers
        self.clf = get_digits_classifier(dtype=torch.float32)
        test, train = load_dataset("digits", split="test").data, load_dataset("digits").data
        self.shape, self.n, self.n_test = tuple(test.shape[1:]), args.digits_samples, test.shape[0]
        self.test_stats = self._stats(test)
        pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))[: min(self.n, len(train))]
        self.floor = self.fd(train[pick])
        self.x_T = self.sde.prior_sampling((self.n, *self.shape), generator=torch.Generator().manual_seed(1),
                                           dtype=F64)
        self.exact, self.grids = None, {}

    def learned(self, name: str, n: int, **opts) -> list[float]:
        """The learned grid of (name, opts) at n NFE for this model (learned once; its cost kept in
        ``self.grids[key][1:]``: score calls, CPU seconds)."""
        key = (name, n, tuple(sorted(opts.items())))
        if key not in self.grids:
            t0 = time.process_time()
            lg = learned(self.score, self.sde, self.shape, name, n, **opts)
            self.grids[key] = (lg.grid, lg.nfe, time.process_time() - t0)
        return self.grids[key][0]

    def _stats(self, x):
        from sde.metrics import FeatureStats

        with torch.no_grad():
            return FeatureStats.from_features(self.clf(x.float().clamp(-1, 1)))

    def fd(self, x) -> float:
        from sde.metrics import frechet_distance

        return frechet_distance(self._stats(x), self.test_stats)

    def run(self, fn) -> tuple[torch.Tensor, float]:
        """x = fn(x_T) and its CPU time in seconds (one thread; the process clock, steadier than the wall
        clock on a shared machine)."""
        t0 = time.process_time()
        x = fn(self.x_T)
        return x, time.process_time() - t0

    def ours(self, name, **opts):
        return lambda x: sample(self.score, self.sde, x, name, **opts).x

    def reference(self, run, ts):
        """A reference driver (made for (B, D) data) on the flattened images."""
        def score(x, t):
            return self.score(x.view(-1, *self.shape), t).flatten(1)

        return lambda x: run(self.sde, score, x.flatten(1), ts).view(-1, *self.shape)

    def distance(self, x) -> float:
        """RMS distance per pixel to the many-step solution from the same x_T (unipc p=3, DIGITS_EXACT_STEPS)."""
        if self.exact is None:
            self.exact = self.run(self.ours("unipc", order=3, steps=DIGITS_EXACT_STEPS))[0]
        return float(((x - self.exact) ** 2).mean().sqrt())


def table_digits(args) -> None:
    """FD-digits of a trained digits model at 10 and 20 NFE for every solver, the learned grids and the
    references; then the learned grid against every fixed grid at 10 NFE."""
    if args.checkpoint is None:
        raise SystemExit("--only digits needs --checkpoint <a digits checkpoint, e.g. from experiments/train.py>")
    d = _Digits(args)
    budgets = (10, 20)
    print(f"\n### Trained digits U-Net ({type(d.sde).__name__}, `{args.checkpoint}`): FD-digits of {d.n} samples "
          f"against the {d.n_test} test images (floor, {d.n} training images: {d.floor:.2f}), "
          f"RMS distance per pixel to a {DIGITS_EXACT_STEPS}-step unipc p=3 solution from the same x_T, CPU time "
          "of the draw (one thread)\n")
    print("| solver | " + " | ".join(f"FD NFE {n}" for n in budgets) + " | "
          + " | ".join(f"distance NFE {n}" for n in budgets) + " | CPU s (10 / 20) |")
    print("|---|" + "---|" * (2 * len(budgets) + 1))
    runs = {label: (lambda n, make=make: d.ours(make(n)[0], **make(n)[1])) for label, make in FAST.items()}
    for label, (name, opts) in LEARNED.items():
        runs[label] = lambda n, name=name, opts=opts: d.ours(
            name, grid=d.learned(name, n, **opts), **opts)
    for label, run in _references().items():
        runs[f"ref: {label}"] = lambda n, run=run: d.reference(run, time_grid(d.sde, n - 1, 1e-3, "log_snr"))
    for label, make in runs.items():
        out = [d.run(make(n)) for n in budgets]
        print(f"| {label} | " + " | ".join(f"{d.fd(x):.2f}" for x, _ in out) + " | "
              + " | ".join(f"{d.distance(x):.4f}" for x, _ in out) + " | "
              + " / ".join(f"{w:.1f}" for _, w in out) + " |")
    _digits_grids(d)


def _digits_grids(d: _Digits) -> None:
    """The learned grid against the fixed grids at 10 NFE on the trained model."""
    grids = ("uniform", "log_snr", "edm", "learned")
    print(f"\n### Trained digits U-Net, 10 NFE: learned grid against the fixed grids (RMS distance per pixel to "
          f"the {DIGITS_EXACT_STEPS}-step solution / FD-digits, {d.n} samples)\n")
    print("| solver | " + " | ".join(grids) + f" | learning cost (score calls of {LEARN['n_samples']} draws / CPU s) |")
    print("|---|" + "---|" * (len(grids) + 1))
    for label, (name, opts) in LEARNED.items():
        cells = []
        for grid in grids:
            ts = d.learned(name, 10, **opts) if grid == "learned" else grid
            x, _ = d.run(d.ours(name, steps=None if grid == "learned" else 9, grid=ts, **opts))
            cells.append(f"{d.distance(x):.4f} / {d.fd(x):.2f}")
        _, calls, cpu = d.grids[(name, 10, tuple(sorted(opts.items())))]
        print(f"| {label.removesuffix(', learned grid')} | " + " | ".join(cells) + f" | {calls} / {cpu:.0f} |")


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
                                      "defaults", "digits"], default=None,
                   help="run one table")
    p.add_argument("--n", type=int, default=500, help="samples for the 2-D mixture table")
    p.add_argument("--batch", type=int, default=4, help="batch of the overhead table")
    p.add_argument("--overhead-steps", type=int, default=6, help="steps of the overhead table")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats (best is kept)")
    p.add_argument("--shared-calls", type=int, default=50, help="calls timed per cell of the shared_time table")
    p.add_argument("--checkpoint", default=None,
                   help="digits checkpoint for --only digits (e.g. outputs/train/digits/<run>/checkpoint.pt)")
    p.add_argument("--digits-samples", type=int, default=359, help="samples per cell of the digits tables")
    args = p.parse_args()
    torch.set_num_threads(1)
    tables = {"quality": table_quality, "kl3072": table_kl3072, "overhead": table_overhead,
              "shared_time": table_shared_time, "fast": table_fast, "stochastic": table_stochastic,
              "defaults": table_defaults, "digits": table_digits}
    for name, fn in tables.items():
        if args.only == name or (args.only is None and (name != "digits" or args.checkpoint is not None)):
            fn(args)


if __name__ == "__main__":
    main()
