"""Adaptive step-size samplers against the exact oracle; prints Markdown tables (docs/benchmarks.md,
"Adaptive step size").

    python experiments/bench_adaptive.py                 # both tables, a few minutes on 2 cores
    python experiments/bench_adaptive.py --only ode      # dpm_adaptive vs dpm_solver and dopri5
    python experiments/bench_adaptive.py --only sde      # gotta_go_fast vs euler_maruyama

Data: the 3072-D diagonal Gaussian of bench_samplers.py (means in [-0.5, 0.5], stds log-uniform in
[0.02, 1]), exact score, VP and VE.

ode - tolerance -> NFE of ``dpm_adaptive`` (orders 2, 3), with two errors: the RMS distance to the exact
      PF-ODE map of 8 prior draws, and the exact KL(output || data) of the run's affine map. The map is
      exact because the batch holds two probes (x_T = 0 and 1) besides the 8 draws: the adaptive steps
      are decided on the whole batch (the worst sample), and given those steps the output is affine in
      x_T per coordinate. Against, at the same NFE: ``dpm_solver`` 2M and 3M (log-SNR grid), and
      ``ode`` (dopri5) at two tolerances.
sde - tolerance -> NFE of ``gotta_go_fast`` (both norms) and a moment KL of its output law from n
      samples: coordinates are grouped in 8 bins of their data std, and in each bin the standardized
      outputs are pooled into one mean and variance (so the estimate's own error is about 8 / n nats);
      ``euler_maruyama`` at the same NFE is measured the same way, and so are exact draws of p_eps
      denoised by Tweedie (what stopping at eps alone costs; a solver's own errors can partly cancel it).
"""

from __future__ import annotations

import argparse
import math

import torch

from sde import VESDE, VPSDE, GaussianMixture
from sde.flow import tweedie
from sde.samplers import sample

F64 = torch.float64
DIM = 3072
SDES = {"VP": VPSDE, "VE": VESDE}
ODE_TOLS = [(0.05, 0.0078), (0.01, 1e-3), (1e-3, 1e-4)]  # (rtol, atol): the paper's default, then tighter
SDE_TOLS = [(0.1, 0.05), (0.03, 0.0078), (0.01, 0.0078), (0.003, 0.001)]  # (rtol, atol): 0.01 / 0.0078: the paper


def diag_gaussian(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of bench_samplers.py: means in [-0.5, 0.5], stds log-uniform in [0.02, 1]."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(dim, generator=g, dtype=F64) - 0.5
    std = torch.exp(torch.empty(dim, dtype=F64).uniform_(math.log(0.02), 0.0, generator=g))
    return mu, std


def kl_diag(mean: torch.Tensor, var: torch.Tensor, mu: torch.Tensor, std: torch.Tensor) -> float:
    """KL(N(mean, diag var) || N(mu, diag std^2)) in nats (summed over what is given)."""
    r = var / std**2
    return float(0.5 * (r + (mean - mu) ** 2 / std**2 - 1.0 - torch.log(r)).sum())


def exact_map(sde, mu, std, x_T, eps):
    """The exact PF-ODE map T -> eps for N(mu, diag std^2) data, then Tweedie's E[x_0 | x_eps]."""
    t = torch.tensor([sde.T, eps], dtype=F64)
    a, s = sde.alpha(t), sde.sigma(t)
    v = a[:, None] ** 2 * std**2 + s[:, None] ** 2
    x = a[1] * mu + torch.sqrt(v[1] / v[0]) * (x_T - a[0] * mu)
    return mu + a[1] * std**2 / v[1] * (x - a[1] * mu)  # E[x_0 | x_eps] of the Gaussian


def ode_row(sde, gm, mu, std, x_T, label, name, **opts) -> tuple[str, int]:
    res = sample(gm.score_fn(sde), sde, x_T, name, **opts)
    b, a = res.x[0], res.x[1] - res.x[0]  # rows 0, 1: the probes x_T = 0 and 1
    kl = kl_diag(b, (a * sde.prior_std) ** 2, mu, std)
    eps = res.options["eps"]
    rms = float((res.x[2:] - exact_map(sde, mu, std, x_T[2:], eps)).square().mean().sqrt())
    return f"| {label} | {res.nfe} | {rms:.2e} | {kl:.3g} |", res.nfe


def table_ode(args) -> None:
    mu, std = diag_gaussian(DIM)
    gm = GaussianMixture(mu[None], stds=std[None])
    for sde_name, make in SDES.items():
        sde = make()
        draws = sde.prior_sampling((8, DIM), generator=torch.Generator().manual_seed(1), dtype=F64)
        x_T = torch.cat([torch.zeros(1, DIM, dtype=F64), torch.ones(1, DIM, dtype=F64), draws])
        print(f"\n#### {sde_name}: dpm_adaptive vs fixed-step dpm_solver at the same NFE and dopri5 "
              "(3072-D Gaussian)\n")
        print("| sampler | NFE | RMS error vs exact map | exact KL (nats) |\n|---|---|---|---|")
        for order in (2, 3):
            for rtol, atol in ODE_TOLS:
                row, nfe = ode_row(sde, gm, mu, std, x_T, f"dpm_adaptive order {order}, rtol {rtol}, atol {atol}",
                                   "dpm_adaptive", order=order, rtol=rtol, atol=atol)
                print(row, flush=True)
                for p in (2, 3):
                    print(ode_row(sde, gm, mu, std, x_T, f"  dpm_solver {p}M, {nfe - 1} steps", "dpm_solver",
                                  order=p, steps=nfe - 1)[0], flush=True)
        for tol in (1e-3, 1e-5):
            print(ode_row(sde, gm, mu, std, x_T, f"ode dopri5, rtol = atol = {tol}", "ode", rtol=tol, atol=tol,
                          denoise_final=True)[0], flush=True)


def moment_kl(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, bins: int = 8) -> float:
    """KL of the pooled standardized moments in ``bins`` groups of coordinates (by data std)."""
    order = torch.argsort(std)
    z = (x - mu) / std
    total = 0.0
    for idx in order.chunk(bins):
        zb = z[:, idx]
        m, v = zb.mean(), zb.var()
        total += len(idx) * 0.5 * float(v + m**2 - 1.0 - torch.log(v))
    return total


def _exact_then_tweedie(sde, gm, n: int) -> torch.Tensor:
    """n draws of the exact p_eps, denoised by Tweedie's formula (what the samplers end with)."""
    eps = 1e-5 if isinstance(sde, VESDE) else 1e-3
    x = gm.marginal(sde, eps).sample(n, torch.Generator().manual_seed(5))
    t = torch.full((n,), eps, dtype=F64)
    return tweedie(sde, x, t, gm.score(x, sde, t))


def table_sde(args) -> None:
    mu, std = diag_gaussian(DIM)
    gm = GaussianMixture(mu[None], stds=std[None])
    n = args.samples
    for sde_name, make in SDES.items():
        sde = make()
        print(f"\n#### {sde_name}: gotta_go_fast vs euler_maruyama at the same NFE (3072-D Gaussian, {n} samples; "
              f"estimate error ~{8 / n:.2f} nats)\n")
        print("| sampler | NFE (calls) | per-sample NFE mean / max | rejected / sample | moment KL (nats) |\n"
              "|---|---|---|---|---|")
        floor = _exact_then_tweedie(sde, gm, n)
        print(f"| exact p_eps draws + Tweedie (the eps truncation alone) | | | | {moment_kl(floor, mu, std):.3g} |")
        for norm in ("sample", "batch"):
            for rtol, atol in SDE_TOLS:
                g = torch.Generator().manual_seed(0)
                res = sample(gm.score_fn(sde), sde, (n, DIM), "gotta_go_fast", generator=g, dtype=F64, rtol=rtol,
                             atol=atol, norm=norm)
                per = res.info["sample_nfe"].double()
                print(f"| gotta_go_fast norm={norm}, rtol {rtol}, atol {atol} | {res.nfe} | {per.mean():.1f} / "
                      f"{int(per.max())} | {res.info['rejected'] / n:.2f} | {moment_kl(res.x, mu, std):.3g} |",
                      flush=True)
                em = sample(gm.score_fn(sde), sde, (n, DIM), "euler_maruyama", generator=g, dtype=F64,
                            steps=res.nfe - 1)
                print(f"|   euler_maruyama, {res.nfe - 1} steps | {em.nfe} | | | {moment_kl(em.x, mu, std):.3g} |",
                      flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["ode", "sde"], default=None)
    p.add_argument("--samples", type=int, default=64, help="samples per gotta_go_fast / euler_maruyama run")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name, table in {"ode": table_ode, "sde": table_sde}.items():
        if args.only in (None, name):
            table(args)


if __name__ == "__main__":
    main()
