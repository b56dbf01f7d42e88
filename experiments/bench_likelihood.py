"""Benchmark: our log_likelihood vs score_sde_pytorch's route, same score function, data and probes.

The reference route (re-implemented here from its description, not copied): flatten (x, delta) to
numpy, integrate with scipy.integrate.solve_ivp(RK45), and in every evaluation convert back to a
float32 torch tensor, build the time vector as ``ones(B) * t``, call the model once for the drift
and once more (with autograd) for the Hutchinson divergence, then convert to numpy again. Ours
integrates the same joint ODE with torchdiffeq's dopri5 on the device, in the input dtype, with one
score call per evaluation and the time passed as one shared element (``sde._checks.shared_time``).
Both use the same Rademacher probes, tolerance and error norm (one RMS over the whole state), so the
answers must agree; a fourth row shows ours with ``mixed_rms_norm`` (delta controlled on its own).

Workloads: the exact score of a 64-D Gaussian mixture, and the default digits MLP score model
(sde.nets.MLP, eps-parametrized) trained here for ``--train-steps`` steps on dequantized digits and
scored on the dequantized test split; ``--checkpoint`` adds a model written by experiments/train.py
(e.g. the U-Net of the main job). Routes run interleaved, a warm-up first; medians are reported.

Run:  python experiments/bench_likelihood.py [--repeats 5] [--checkpoint run/checkpoint.pt]
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

# One thread for numpy's BLAS too (scipy's RK45 does its stage sums with it), like torch below:
# the comparison is of the two routes, not of thread pools fighting over a shared machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from sde import VPSDE, GaussianMixture  # noqa: E402
from sde.data import load_dataset  # noqa: E402
from sde.likelihood import PROBES, bits_per_dim, log_likelihood, mixed_rms_norm  # noqa: E402
from sde.losses import dequantize, dequantized, dsm_loss  # noqa: E402
from sde.models import ScoreModel  # noqa: E402
from sde.nets import MLP  # noqa: E402
from sde.training import TrainConfig, Trainer  # noqa: E402


def reference_log_likelihood(score_fn, sde, x, probes, *, rtol=1e-5, atol=1e-5, eps=1e-5, shared_t=False):
    """score_sde_pytorch's route: scipy RK45 with a numpy round trip and two model calls per evaluation.

    ``shared_t=True`` passes the time as a stride-0 view instead of ``ones(B) * t``: the same model
    fast path ours uses, to show how much of the gap is the route and how much the time embedding.
    """
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
        if shared_t:
            vec_t = torch.full((1,), t, device=x.device, dtype=torch.float32).expand(B)
        else:
            vec_t = torch.ones(B, device=x.device, dtype=torch.float32) * t
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


def _gmm_workload(dim: int, batch: int):
    g = torch.Generator().manual_seed(0)
    sde = VPSDE()
    gm = GaussianMixture(0.6 * torch.randn(4, dim, generator=g), stds=0.2 + 0.3 * torch.rand(4, dim, generator=g))
    x = gm.sample(batch, g).clamp(-1, 1)
    return gm.score_fn(sde), sde, x, {"levels": 256, "scale": 2.0}


def _digits_mlp_workload(steps: int, batch: int):
    """The default digits MLP, trained here with the library's Trainer on dequantized digits, as
    experiments/train.py does (plain DSM, lr 1e-3, EMA 0.999); the EMA weights are scored."""
    sde = VPSDE()
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    torch.manual_seed(0)
    config = TrainConfig(total_steps=steps, batch_size=128, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                         log_every=10**9, ckpt_every=0, progress=False)
    trainer = Trainer(ScoreModel(MLP(64), sde), sde, train.data.flatten(1), config,
                      loss_fn=dequantized(dsm_loss, levels=train.levels))
    trainer.fit()
    model = trainer.ema.model.eval().requires_grad_(False)
    y = dequantize(test.data.flatten(1)[:batch], test.levels, generator=torch.Generator().manual_seed(2))
    return model, sde, y, test.bpd_options()


def _checkpoint_workload(path: str, batch: int):
    """A model written by experiments/train.py, scored on its data set's dequantized test split."""
    from sde.checkpoint import load_score_model

    loaded = load_score_model(path, dtype=torch.float32)
    test = load_dataset(loaded.spec["data"]["name"], split="test")
    y = dequantize(test.data[:batch], test.levels, generator=torch.Generator().manual_seed(2))
    return loaded.model, loaded.sde, y, test.bpd_options()


def _bpd(logp, x, opts):
    return bits_per_dim(logp.double(), x[0].numel(), levels=int(opts["levels"]), scale=opts["scale"])


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _run_workload(name, score_fn, sde, x, bpd_opts, repeats):
    probes = PROBES["rademacher"]((1, *x.shape), x, torch.Generator().manual_seed(1))

    def ours(norm=None):
        opts = None if norm is None else {"norm": norm}
        res = log_likelihood(score_fn, sde, x, generator=torch.Generator().manual_seed(1), options=opts)
        return res.logp, res.nfe, res.nfe

    routes = {
        "score_sde_pytorch route (scipy RK45, numpy, `ones(B) * t`)": lambda: reference_log_likelihood(
            score_fn, sde, x, probes[0]
        ),
        "same route, t as a shared view": lambda: reference_log_likelihood(
            score_fn, sde, x, probes[0], shared_t=True
        ),
        "**ours** (dopri5, default = scipy's joint RMS norm)": ours,
        "ours (dopri5, `mixed_rms_norm`)": lambda: ours(mixed_rms_norm),
    }
    times = {k: ([], []) for k in routes}
    outs = {}
    for rep in range(repeats + 1):  # round 0 is the warm-up: lazy init and allocator caches
        for label, fn in routes.items():
            wall, cpu, outs[label] = _timed(fn)
            if rep:
                times[label][0].append(wall)
                times[label][1].append(cpu)
    rows = []
    base = next(iter(routes))
    ref_wall, ref_cpu = (statistics.median(v) for v in times[base])
    ref_bpd = _bpd(outs[base][0], x, bpd_opts)
    for label in routes:
        logp, calls, evals = outs[label]
        wall, cpu = (statistics.median(v) for v in times[label])
        bpd = _bpd(logp, x, bpd_opts)
        diffs = "| | |" if label == base else (
            f"| {(bpd.mean() - ref_bpd.mean()).abs().item():.1e} | {(bpd - ref_bpd).abs().max().item():.1e} |"
        )
        rows.append(
            f"| {name} | {label} | {calls} | {evals} | {wall:.3f} | {cpu:.3f} | {bpd.mean().item():.4f} {diffs} "
            f"{ref_wall / wall:.2f}x / {ref_cpu / cpu:.2f}x |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="samples per likelihood batch")
    parser.add_argument("--dim", type=int, default=64, help="dimension of the Gaussian-mixture workload")
    parser.add_argument("--train-steps", type=int, default=2000, help="training steps of the digits MLP")
    parser.add_argument("--checkpoint", action="append", default=[], help="a train.py checkpoint (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workloads = {
        f"GMM oracle, D={args.dim}": partial(_gmm_workload, args.dim, args.batch),
        f"digits MLP ({args.train_steps} steps), D=64": partial(_digits_mlp_workload, args.train_steps, args.batch),
    }
    for path in args.checkpoint:
        workloads[f"checkpoint {Path(path).parent.name}/{Path(path).name}"] = partial(
            _checkpoint_workload, path, args.batch
        )
    rows = [
        "| workload | route | score evals | ODE evals | wall (s) | CPU (s) | mean bits/dim | diff of means (bpd) "
        "| max per-sample diff (bpd) | speed-up (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build in workloads.items():
        score_fn, sde, x, bpd_opts = build()
        rows += _run_workload(name, score_fn, sde, x, bpd_opts, args.repeats)
        print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"B={args.batch}, VP SDE, Hutchinson (1 Rademacher probe, same probes), rtol=atol=1e-5, eps=1e-5, "
        f"float32, torch threads={args.threads}, median of {args.repeats} interleaved runs after a warm-up\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
