"""Benchmark: our log_likelihood vs score_sde_pytorch's route, same score function, data and probes.

The reference route (re-implemented here from its description, not copied): flatten (x, delta) to
numpy, integrate with scipy.integrate.solve_ivp(RK45), and in every evaluation convert back to a
float32 torch tensor, call the model once for the drift and once more (with autograd) for the
Hutchinson divergence, then convert to numpy again. Ours integrates the same joint ODE with
torchdiffeq's dopri5 on the device, in the input dtype, with one score call per evaluation.
Both use the same Rademacher probes and tolerance, so the answers must agree.

Run:  python experiments/bench_likelihood.py [--batch 128] [--dim 32] [--repeats 3]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# One thread for numpy's BLAS too (scipy's RK45 does its stage sums with it), like torch below:
# the comparison is of the two routes, not of thread pools fighting over a shared machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from sde import VPSDE, GaussianMixture  # noqa: E402
from sde.likelihood import PROBES, bits_per_dim, log_likelihood  # noqa: E402


def reference_log_likelihood(score_fn, sde, x, probes, *, rtol=1e-5, atol=1e-5, eps=1e-5):
    """score_sde_pytorch's route: scipy RK45 with a numpy round trip and two model calls per evaluation."""
    shape, B = x.shape, x.shape[0]
    calls = [0]

    def counted(xx, t):
        calls[0] += 1
        return score_fn(xx, t)

    def drift_fn(xx, t):
        g2 = sde.diffusion(t) ** 2
        return sde.drift(xx, t) - 0.5 * g2.reshape(-1, *([1] * (xx.dim() - 1))) * counted(xx, t)

    def div_fn(xx, t):
        with torch.enable_grad():
            xx = xx.detach().requires_grad_(True)
            grad = torch.autograd.grad((drift_fn(xx, t) * probes).sum(), xx)[0]
        return (grad * probes).flatten(1).sum(1)

    def ode_func(t, y):
        sample = torch.from_numpy(y[:-B].reshape(shape)).to(x.device).type(torch.float32)
        vec_t = torch.full((B,), t, device=x.device, dtype=torch.float32)
        drift = drift_fn(sample, vec_t).detach().cpu().numpy().reshape(-1)
        div = div_fn(sample, vec_t).detach().cpu().numpy().reshape(-1)
        return np.concatenate([drift, div])

    y0 = np.concatenate([x.detach().cpu().numpy().reshape(-1), np.zeros(B)])
    with torch.no_grad():
        sol = solve_ivp(ode_func, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[:-B].reshape(shape)).to(x)
    delta = torch.from_numpy(zp[-B:]).to(x)
    return sde.prior_logp(z) + delta, calls[0], sol.nfev


class _TinyScoreNet(torch.nn.Module):
    """A small untrained MLP score(x, t): any smooth vector field defines a valid PF-ODE density."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, dim),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x)], dim=1)) - x  # -x: keep the flow contracting


def _joint_rms(state):
    """scipy's error norm: one RMS over every entry of the (x, delta) state (torchdiffeq's default is the
    max of per-part RMS norms, which keeps delta's error from being diluted by the D entries of x)."""
    return torch.cat([s.reshape(-1) for s in state]).pow(2).mean().sqrt()


def _median_of(repeats, fn):
    fn()  # warm-up: lazy initialisation and allocator caches are not what we measure
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP score network")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    D, B, sde = args.dim, args.batch, VPSDE()
    means = 0.6 * torch.randn(4, D, generator=g)
    gm = GaussianMixture(means, stds=0.2 + 0.3 * torch.rand(4, D, generator=g))
    torch.manual_seed(0)
    net = _TinyScoreNet(D, args.hidden).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    workloads = {f"GMM oracle, D={D}": gm.score_fn(sde), f"MLP {args.hidden} wide (untrained), D={D}": net}
    x = gm.sample(B, g).clamp(-1, 1)
    rows = [
        "| workload | route | score evals | ODE evals | wall (s) | CPU (s) | mean bits/dim | diff of means (bpd) "
        "| max per-sample diff (bpd) | speed-up (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, score_fn in workloads.items():
        probes = PROBES["rademacher"]((1, B, D), x, torch.Generator().manual_seed(1))

        def ours(score_fn=score_fn):
            return log_likelihood(score_fn, sde, x, generator=torch.Generator().manual_seed(1))

        def ref(score_fn=score_fn, probes=probes):
            return reference_log_likelihood(score_fn, sde, x, probes[0])

        def ours_joint(score_fn=score_fn):
            return log_likelihood(
                score_fn, sde, x, generator=torch.Generator().manual_seed(1), options={"norm": _joint_rms}
            )

        t_ref, c_ref, (logp_ref, calls_ref, nfev_ref) = _median_of(args.repeats, ref)
        bpd_ref = bits_per_dim(logp_ref, D)
        rows.append(
            f"| {name} | score_sde_pytorch route (scipy RK45, numpy) | {calls_ref} | {nfev_ref} | "
            f"{t_ref:.3f} | {c_ref:.3f} | {bpd_ref.mean().item():.4f} | | | 1.0x / 1.0x |"
        )
        variants = (("ours (dopri5, default error norm)", ours), ("ours (dopri5, scipy's joint norm)", ours_joint))
        for label, fn in variants:
            t_ours, c_ours, res = _median_of(args.repeats, fn)
            bpd = bits_per_dim(res.logp, D)
            rows.append(
                f"| {name} | {label} | {res.nfe} | {res.nfe} | {t_ours:.3f} | {c_ours:.3f} | {bpd.mean().item():.4f} "
                f"| {(bpd.mean() - bpd_ref.mean()).abs().item():.1e} | {(bpd - bpd_ref).abs().max().item():.1e} | "
                f"{t_ref / t_ours:.1f}x / {c_ref / c_ours:.1f}x |"
            )
    print(
        f"B={B}, D={D}, VP SDE, Hutchinson (1 Rademacher probe, same probes), rtol=atol=1e-5, eps=1e-5, "
        f"float32, torch threads={args.threads}, median of {args.repeats}\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
