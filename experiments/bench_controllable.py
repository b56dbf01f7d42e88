"""Benchmark (not a test): conditioning methods against the exact posterior (GaussianMixture.condition).

Parts (``--part``):

- ``bias``: the correlated 4-D Gaussian (coordinates 0, 1 observed, 2, 3 inpainted): mean and
  covariance errors of replacement and DPS at several zeta.
- ``ksweep``: method x K x SDE on three problems with the exact (oracle) score: the correlated
  4-D Gaussian, a 2-D three-component mixture (x_1 observed) and an 8-D four-component mixture
  (4 coordinates observed). SMC runs R = N / K independent filters of K particles (one
  condition each, batched, ``--chunk`` particles per call); its estimates are the weighted ones,
  averaged over the R filters, with Monte-Carlo standard errors from their spread. ``--twist``:
  MCGdiff's twist, or the prior-corrected one with the prior's mean and std (smc_inverse's
  ``prior_mean``, ``prior_std``; the default "prior": per coordinate). Replacement, DPS and RePaint draw the same
  number of independent samples (R conditions x K samples): their errors do not fall with K.
  Weight error: max_k |E[responsibility_k(X)] - w_k| under the posterior mixture (its exact weights).
- ``guidance``: SMC class guidance against classifier guidance with the same (plug-in) twist:
  energy distance to exact class-conditional samples.
- ``sdedit``: SDEdit on digits with a small MLP score model trained here: distance to the guide
  and FD-digits against t0.

    python experiments/bench_controllable.py --part ksweep [--n 65536 --n-baseline 16384 --steps 200]
    python experiments/bench_controllable.py --part ksweep --methods smc --problems "mixture 8-D" --ks 256 --n 262144
    python experiments/bench_controllable.py --part bias --n 2000 --steps 300

Prints Markdown tables (docs/benchmarks.md, "Controllable generation"; docs/controllable.md).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sde import VESDE, VPSDE, GaussianMixture, SubVPSDE
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
    gm = GaussianMixture(mu[None], cov[None])
    post = gm.condition(mask=torch.tensor([1, 1, 0, 0]), values=y0)
    return gm, y0, post.mean(), post.covariance()


def problems() -> dict[str, tuple[GaussianMixture, torch.Tensor, torch.Tensor]]:
    """name -> (prior, mask (D,), values (D,)) for the K sweep."""
    gm4, y4, _, _ = problem()
    means2 = torch.tensor([[-2.0, -1.0], [1.5, 1.0], [0.5, -2.5]], dtype=F64)
    covs2 = torch.tensor([[[0.5, 0.3], [0.3, 0.4]], [[0.4, -0.2], [-0.2, 0.5]], [[0.3, 0.0], [0.0, 0.2]]], dtype=F64)
    gm2 = GaussianMixture(means2, covs2, weights=torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    g = torch.Generator().manual_seed(8)
    A = torch.randn(4, 8, 8, generator=g, dtype=F64)
    covs8 = 0.25 * A @ A.transpose(-1, -2) / 8 + 0.05 * torch.eye(8, dtype=F64)
    gm8 = GaussianMixture(0.7 * torch.randn(4, 8, generator=g, dtype=F64), covs8,
                          weights=torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64))
    y8 = 0.6 * gm8.means[0] + 0.4 * gm8.means[1]  # between two components: posterior weights 0.62, 0.28, 0.08, 0.03
    return {
        "Gaussian 4-D": (gm4, torch.tensor([1.0, 1, 0, 0], dtype=F64), y4),
        "mixture 2-D": (gm2, torch.tensor([0.0, 1], dtype=F64), torch.tensor([0.0, -0.9], dtype=F64)),
        "mixture 8-D": (gm8, torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0], dtype=F64), y8),
    }


# -- part: bias of the score-wrapper methods ----------------------------------------------------------
def bias_table(args) -> None:
    gm, y0, mean, cond_cov = problem()
    y = y0.expand(args.n, 4).clone()
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    g = torch.Generator().manual_seed(1)
    print(f"exact conditional mean {mean.numpy().round(3)}, variances {cond_cov.diag().numpy().round(3)}; "
          f"n={args.n}, euler_maruyama steps={args.steps}\n")
    print("| SDE | method | mean error (L2) | cov error (max abs) | std ratio | known kept |")
    print("|---|---|---|---|---|---|")
    methods = [("replacement", None)] + [("dps", z) for z in args.zetas]
    for sde in (VPSDE(), VESDE(sigma_max=10.0)):
        for method, zeta in methods:
            opts = {} if zeta is None else {"zeta": zeta}
            res = solve_inverse(gm.score_fn(sde), sde, inpainting_constraint(y, mask), method=method,
                                sampler="euler_maruyama", steps=args.steps, generator=g, **opts)
            xu = res.x[:, UNKNOWN]
            cov = torch.cov(xu.T)
            name = method if zeta is None else f"DPS zeta={zeta:g}"
            ratio = ", ".join(f"{r:.2f}" for r in (cov.diag() / cond_cov.diag()).sqrt().tolist())
            kept = bool((res.x[:, KNOWN] == y[:, KNOWN]).all())
            print(f"| {type(sde).__name__} | {name} | {(xu.mean(0) - mean).norm():.3f} | "
                  f"{(cov - cond_cov).abs().max():.3f} | {ratio} | {kept} |", flush=True)


# -- part: the K sweep ------------------------------------------------------------------------------
def _estimates(x: torch.Tensor, w: torch.Tensor, post: GaussianMixture) -> tuple[torch.Tensor, ...]:
    """Per-run estimates from x (R, K, d) with weights (R, K): means (R, d), covariances about the
    pooled mean (R, d, d; their average is the pooled covariance, free of the per-run mean's
    spread) and posterior component weights (R, C)."""
    m = torch.einsum("rk,rkd->rd", w, x)
    d = x - m.mean(0)
    c = torch.einsum("rk,rki,rkj->rij", w, d, d)
    resp = post.posterior(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
    return m, c, torch.einsum("rk,rkc->rc", w, resp)


def _errors(m, c, wt, post) -> dict[str, float]:
    """Errors of the averaged estimates and their Monte-Carlo standard errors (spread over the R runs)."""
    R = m.shape[0]
    se = lambda v: v.std(0) / math.sqrt(R)  # noqa: E731
    return {"mean": (m.mean(0) - post.mean()).norm().item(), "mean_se": se(m).norm().item(),
            "cov": (c.mean(0) - post.covariance()).abs().max().item(), "cov_se": se(c).max().item(),
            "w": (wt.mean(0) - post.weights).abs().max().item(), "w_se": se(wt).max().item()}


def _prior_twist(gm: GaussianMixture, mask: torch.Tensor, kind: str) -> dict:
    """smc_inverse's prior-corrected twist from the prior's moments (what a user estimates from training data):
    its mean and full covariance ("prior-cov"), per-coordinate std ("prior") or the rms std of the observed
    coordinates ("prior-iso")."""
    if kind == "prior-cov":
        return {"prior_mean": gm.mean(), "prior_cov": gm.covariance()}
    var = gm.covariance().diag()
    std = var.sqrt() if kind == "prior" else var[mask == 1].mean().sqrt().item()
    return {"prior_mean": gm.mean(), "prior_std": std}


def _run_smc(gm, sde, mask, y0, K: int, R: int, args, g) -> tuple[torch.Tensor, torch.Tensor, int]:
    """R filters of K particles, in calls of at most ``args.chunk`` particles (the same law as one call;
    cache-sized batches run faster)."""
    opts = {} if args.twist == "mcgdiff" else _prior_twist(gm, mask, args.twist)
    xs, ws = [], []
    per_call = max(1, args.chunk // K)
    for r0 in range(0, R, per_call):
        r = min(per_call, R - r0)
        res = solve_inverse(gm.score_fn(sde), sde, inpainting_constraint(y0.expand(r, -1).clone(), mask),
                            method="smc", particles=K, ess_threshold=args.ess_threshold, steps=args.steps,
                            generator=g, **opts)
        xs.append(res.particles[..., mask == 0])
        ws.append(res.log_weights.exp())
    return torch.cat(xs), torch.cat(ws), res.nfe


def _run_method(method: str, gm, sde, mask, y0, K: int, R: int, args, g) -> tuple[dict, int]:
    """Samples (R, K, d_U) and weights (R, K) of one method, K per condition."""
    unknown = mask == 0
    if method == "smc":
        return _run_smc(gm, sde, mask, y0, K, R, args, g)
    opts = {"replacement": {"sampler": "euler_maruyama"}, "dps": {"sampler": "euler_maruyama", "zeta": 1.0},
            "repaint": {"jump_length": 10, "resample": args.resample}}[method]
    res = solve_inverse(gm.score_fn(sde), sde, inpainting_constraint(y0.expand(R * K, -1).clone(), mask),
                        method=method, steps=args.steps, generator=g, **opts)
    x = res.x[:, unknown].view(R, K, -1)
    return x, torch.full((R, K), 1.0 / K, dtype=F64), res.nfe


def ksweep_table(args) -> None:
    sdes = {"VP": VPSDE(), "sub-VP": SubVPSDE(), "VE": VESDE(sigma_max=10.0)}
    filters = f"R = {args.filters}" if args.filters else f"{args.n} particles per row in R = N / K"
    print(f"SMC: {filters} filters ({args.twist} twist, {args.chunk} particles per "
          f"call); baselines: {args.n_baseline} samples per row; {args.steps} EM steps; ESS threshold "
          f"{args.ess_threshold}; RePaint j=10, r={args.resample}\n")
    print("| problem | SDE | method | K | mean error | cov error | weight error | NFE | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(args.seed)
    for pname, (gm, mask, y0) in problems().items():
        if args.problems and pname not in args.problems:
            continue
        post = gm.condition(mask=mask, values=y0)
        for sname in args.sdes:
            for method in args.methods:
                for K in args.ks:
                    R = max(1, (args.n if method == "smc" else args.n_baseline) // K)
                    R = args.filters if method == "smc" and args.filters else R
                    t0 = time.perf_counter()
                    x, w, nfe = _run_method(method, gm, sdes[sname], mask, y0, K, R, args, g)
                    e = _errors(*_estimates(x, w, post), post)
                    wt = "-" if post.K == 1 else f"{e['w']:.3f} ± {e['w_se']:.3f}"
                    print(f"| {pname} | {sname} | {method} | {K} | {e['mean']:.3f} ± {e['mean_se']:.3f} | "
                          f"{e['cov']:.3f} ± {e['cov_se']:.3f} | {wt} | {nfe} | {time.perf_counter() - t0:.1f} |",
                          flush=True)


# -- part: SMC class guidance ---------------------------------------------------------------------------
def guidance_table(args) -> None:
    from sde.flow import tweedie
    from sde.guidance import classifier_guided_score
    from sde.metrics import energy_distance
    from sde.samplers import sample
    from sde.smc import smc_guidance

    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=F64)
    gm = GaussianMixture(means, stds=torch.full((3,), 0.8, dtype=F64), weights=torch.tensor([0.4, 0.4, 0.2], dtype=F64))
    classes = torch.tensor([0, 1, 1])
    g = torch.Generator().manual_seed(0)
    target = gm.given_class(1, classes)
    ref = target.sample(4096, g)
    floor = energy_distance(target.sample(4096, g), ref)
    print(f"class 1 = components 1, 2; twist: plug-in p_0(y | x0_hat(x_t)); {args.steps} EM steps; "
          f"energy distance of two exact 4096-sample sets: {floor:.4f}\n")
    print("| SDE | method | K | energy distance | within-class weight of comp. 1 (exact 0.667) | NFE | wall s |")
    print("|---|---|---|---|---|---|---|")
    for sname, sde in (("VP", VPSDE()), ("VE", VESDE(sigma_max=10.0))):
        clf = lambda x, t, sde=sde: gm.class_log_posterior(tweedie(sde, x, t, gm.score(x, sde, t)), classes)  # noqa: E731
        t0 = time.perf_counter()
        x = sample(classifier_guided_score(gm.score_fn(sde), clf, 1), sde, (4096, 2), sampler="euler_maruyama",
                   steps=args.steps, generator=g, dtype=F64).x
        print(f"| {sname} | classifier guidance | - | {energy_distance(x, ref):.4f} | "
              f"{target.posterior(x)[:, 0].mean():.3f} | {args.steps} | {time.perf_counter() - t0:.1f} |", flush=True)
        for K in args.ks:
            t0 = time.perf_counter()
            res = smc_guidance(gm.score_fn(sde), sde, (max(1, 4096 // K), 2), clf, 1, particles=K, steps=args.steps,
                               generator=g, dtype=F64)
            xs = res.samples.reshape(-1, 2)
            print(f"| {sname} | SMC | {K} | {energy_distance(xs, ref):.4f} | {target.posterior(xs)[:, 0].mean():.3f} | "
                  f"{res.nfe} | {time.perf_counter() - t0:.1f} |", flush=True)


# -- part: SDEdit on digits -------------------------------------------------------------------------
def sdedit_table(args) -> None:
    from sde.editing import sdedit
    from sde.features import load_digits_split
    from sde.features.reference import evaluate_samples
    from sde.losses import dsm_loss
    from sde.models import ScoreModel
    from sde.nets import MLP

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, _ = load_digits_split("train")
    x_test, _ = load_digits_split("test")
    sde = VPSDE()
    model = ScoreModel(MLP(64, hidden=256, depth=4), sde, "eps")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        idx = torch.randint(x_train.shape[0], (128,), generator=g)
        loss = dsm_loss(model, sde, x_train[idx].flatten(1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    n = min(args.n_edit, x_test.shape[0])
    clean = x_test[:n].flatten(1)
    # Guides: test digits with a third of their pixels replaced by uniform noise (a corrupted image).
    corrupt = torch.rand(clean.shape, generator=g) < 1 / 3
    guide = torch.where(corrupt, torch.rand(clean.shape, generator=g) * 2 - 1, clean)
    print(f"MLP score model trained {args.train_steps} steps ({time.perf_counter() - t0:.0f} s); {n} corrupted test "
          f"digits (1/3 of pixels uniform noise) as guides; EM, steps = round(1000 t0 / 2)\n")
    print("| t0 | RMS distance to guide | RMS distance to clean digit | FD-digits | wall s |")
    print("|---|---|---|---|---|")
    fd_guide = evaluate_samples(guide.view(-1, 1, 8, 8), metrics=("fd",))["fd"]
    print(f"| 0 (the guide) | 0 | {(guide - clean).pow(2).mean().sqrt():.3f} | {fd_guide:.2f} | - |")
    for t_edit in args.t0s:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sdedit(model, sde, guide, t_edit, steps=max(1, round(500 * t_edit)), generator=g).x.clamp(-1, 1)
        fd = evaluate_samples(x.view(-1, 1, 8, 8), metrics=("fd",))["fd"]
        print(f"| {t_edit:g} | {(x - guide).pow(2).mean().sqrt():.3f} | {(x - clean).pow(2).mean().sqrt():.3f} | "
              f"{fd:.2f} | {time.perf_counter() - t0:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["bias", "ksweep", "guidance", "sdedit"], default="ksweep")
    p.add_argument("--n", type=int, default=65536, help="bias: samples per method; ksweep: SMC particles per row")
    p.add_argument("--n-baseline", type=int, default=16384, help="ksweep: samples per row of the other methods")
    p.add_argument("--steps", type=int, default=200, help="Euler-Maruyama steps")
    p.add_argument("--zetas", type=float, nargs="+", default=[0.3, 1.0, 3.0], help="bias: DPS strengths")
    p.add_argument("--methods", nargs="+", default=["smc", "replacement", "dps", "repaint"])
    p.add_argument("--problems", nargs="+", default=None, choices=list(problems()),
                   help="ksweep: the problems to run (default: all three)")
    p.add_argument("--seed", type=int, default=0, help="ksweep: seed of the generator")
    p.add_argument("--sdes", nargs="+", default=["VP", "sub-VP", "VE"], choices=["VP", "sub-VP", "VE"])
    p.add_argument("--ess-threshold", type=float, default=0.5, help="SMC resampling threshold on ESS / K")
    p.add_argument("--twist", choices=["mcgdiff", "prior", "prior-iso", "prior-cov"], default="prior",
                   help="SMC twist: MCGdiff's, or prior-corrected with the prior's mean and per-coordinate std "
                        "(prior), the rms std of the observed coordinates (prior-iso) or the full covariance "
                        "(prior-cov)")
    p.add_argument("--filters", type=int, default=0, help="ksweep: SMC filters R at every K (0: R = N / K)")
    p.add_argument("--ks", dest="ks", type=int, nargs="+", default=[4, 16, 64, 256], help="particles per condition")
    p.add_argument("--chunk", type=int, default=16384, help="ksweep: SMC particles per call (K x filters)")
    p.add_argument("--resample", type=int, default=5, help="RePaint passes per stretch (r)")
    p.add_argument("--train-steps", type=int, default=3000, help="sdedit: score-model training steps")
    p.add_argument("--n-edit", type=int, default=360, help="sdedit: test digits edited")
    p.add_argument("--t0s", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 1.0], help="sdedit strengths")
    args = p.parse_args()
    torch.set_num_threads(1)
    {"bias": bias_table, "ksweep": ksweep_table, "guidance": guidance_table, "sdedit": sdedit_table}[args.part](args)


if __name__ == "__main__":
    main()
