"""Benchmark (not a test): bias of the inverse-problem solvers against the exact posterior.

A correlated 4-D Gaussian with the exact (oracle) score; coordinates 0 and 1 are observed, 2 and
3 inpainted. The exact conditional law of the unknown coordinates is Gaussian and closed form,
so the mean and covariance errors of each method (replacement, DPS at several zeta) are exact
up to Monte-Carlo error. Prints a Markdown table (docs/benchmarks.md, "Controllable generation").

    python experiments/bench_controllable.py --n 2000 --steps 300
"""

from __future__ import annotations

import argparse

import torch

from sde import VESDE, VPSDE, GaussianMixture
from sde.inverse import inpainting_constraint, solve_inverse

F64 = torch.float64
KNOWN, UNKNOWN = [0, 1], [2, 3]


def problem(seed: int = 0) -> tuple[GaussianMixture, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prior, the observation y0 and the exact conditional mean and covariance of the unknowns."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    cov = A @ A.T / 4 + 0.1 * torch.eye(4, dtype=F64)
    mu = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=F64)
    y0 = torch.tensor([0.8, 0.2, 0.0, 0.0], dtype=F64)
    S_kk, S_uk = cov[KNOWN][:, KNOWN], cov[UNKNOWN][:, KNOWN]
    mean = mu[UNKNOWN] + S_uk @ torch.linalg.solve(S_kk, y0[KNOWN] - mu[KNOWN])
    cond_cov = cov[UNKNOWN][:, UNKNOWN] - S_uk @ torch.linalg.solve(S_kk, S_uk.T)
    return GaussianMixture(mu[None], cov[None]), y0, mean, cond_cov


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="samples per method")
    p.add_argument("--steps", type=int, default=300, help="Euler-Maruyama steps")
    p.add_argument("--zetas", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="DPS step sizes")
    args = p.parse_args()
    gm, y0, mean, cond_cov = problem()
    y = y0.expand(args.n, 4).clone()
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    g = torch.Generator().manual_seed(1)
    print(f"exact conditional mean {mean.numpy().round(3)}, variances {cond_cov.diag().numpy().round(3)}; "
          f"n={args.n}, euler_maruyama steps={args.steps}\n")
    print("| SDE | method | mean error (L2) | cov error (max abs) | std ratio | known kept |")
    print("|---|---|---|---|---|---|")
    methods = [("replacement", 1.0)] + [("dps", z) for z in args.zetas]
    for sde in (VPSDE(), VESDE(sigma_max=10.0)):
        for method, zeta in methods:
            res = solve_inverse(gm.score_fn(sde), sde, inpainting_constraint(y, mask), conditioning=method, zeta=zeta,
                                sampler="euler_maruyama", steps=args.steps, generator=g)
            xu = res.x[:, UNKNOWN]
            cov = torch.cov(xu.T)
            name = method if method == "replacement" else f"DPS zeta={zeta:g}"
            ratio = ", ".join(f"{r:.2f}" for r in (cov.diag() / cond_cov.diag()).sqrt().tolist())
            kept = bool((res.x[:, KNOWN] == y[:, KNOWN]).all())
            print(f"| {type(sde).__name__} | {name} | {(xu.mean(0) - mean).norm():.3f} | "
                  f"{(cov - cond_cov).abs().max():.3f} | {ratio} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
