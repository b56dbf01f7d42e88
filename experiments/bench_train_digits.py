"""Benchmark (not a test): train one U-Net on 8x8 digits with each training recipe for the same CPU budget;
report test bits/dim (PF-ODE) and FD-digits of 20-NFE samples.

Training uses the library loop (sde.training.Trainer) on uniformly dequantized digits (each level's
bin around its grid point, the space bits/dim scores, so train and test agree) with
``dsm_loss(weighting=...)`` (sde.losses.WEIGHTINGS, docs/recipes.md). A run is a named
(SDE, parametrization, weighting) triple (``RUNS``): every weighting on the linear VPSDE with the eps
parametrization (so only w(lambda) and p(lambda) change), and the flow-matching SDE (``FlowSDE``)
with the velocity parametrization and the flow-matching loss.

The budget is CPU time of this process (``time.process_time``, 1 thread by default), so runs made at
different loads of a shared machine get the same compute; evaluation is not charged to it. Every run shares
the optimisation settings (defaults: the main job's 0.70M U-Net ``--net main``, batch 64, AdamW lr 4e-3 after 50
warm-up steps, cosine decay to 0 over the spent fraction of the CPU budget, clip 1, EMA 0.99). At the end
the EMA model is scored on the whole test split: bits/dim by the probability-flow ODE
(sde.likelihood.dataset_bits_per_dim, dopri5, rtol = atol = ``--rtol``, Hutchinson, one
dequantization), and FD-digits (sde.metrics.frechet_distance on sde.features.digits_classifier
features) of as many samples as test images against the train split, for each solver in ``SOLVERS``
(DPM-Solver++ 2M / 3M, UniPC p = 2 / 3), 19 steps + the final denoising call = 20 NFE: the mean over
``--fd-draws`` prior draws (draw k seeded with k: the same draws for every run and solver); the table shows
the best solver. Training times are VDM's low-discrepancy draws (``--time-sampling iid`` for independent ones).

Usage:
    python experiments/bench_train_digits.py                          # every run, 5 CPU-minutes each
    python experiments/bench_train_digits.py --runs flow_sde --net default --batch 128 --lr 2e-3 --lr-decay constant
                                                                      # the first table's settings
    python experiments/bench_train_digits.py --runs sigma2 flow_sde --seconds 90 --json out.jsonl
    python experiments/bench_train_digits.py --runs eps --time-sampling iid --tag _iid --save ckpts
    python experiments/bench_train_digits.py --runs eps --tag _iid --load ckpts      # re-score saved weights
    python experiments/bench_train_digits.py --runs eps --weighting-param shift=1     # the main job's recipe

References: a full-covariance Gaussian gets 2.95 bpd on this split, uniform 4.09 (log2 17); FD-digits
of the test split against the train split is 14.6 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from sde.data import load_dataset
from sde.features.digits_classifier import get_digits_classifier
from sde.likelihood import dataset_bits_per_dim
from sde.losses import TIME_UNIFORMS, WEIGHTINGS, dequantized, dsm_loss, get_weighting
from sde.metrics import FeatureStats, frechet_distance
from sde.models import ScoreModel
from sde.nets import UNet
from sde.samplers import sample
from sde.sdes import SDE, VPSDE, FlowSDE
from sde.training import LR_DECAYS, TrainConfig, Trainer

# run name -> (SDE factory, parametrization, weighting)
RUNS: dict[str, tuple[type[SDE], str, str]] = {
    **{name: (VPSDE, "eps", name) for name in WEIGHTINGS},
    "flow_sde": (FlowSDE, "velocity", "flow"),
}
# the bench's U-Net, one for every run (--net): the library default, or conf/model/unet.yaml's (the main job's)
NETS: dict[str, dict] = {
    "default": {},  # UNet(): 1.62M parameters, channel_mults (1, 2, 2), 2 res blocks, dropout 0.1
    "main": dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),  # 0.70M
    "noattn": dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0),  # 0.65M
    "m122": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0),  # 1.11M: a third level
}
# FD-digits solvers, each 19 steps + the final denoising call = 20 NFE; the table reports the best per run
SOLVERS: dict[str, dict] = {
    "dpm2m": dict(sampler="dpm_solver", steps=19, order=2, method="multistep", prediction="data"),
    "dpm3m": dict(sampler="dpm_solver", steps=19, order=3, method="multistep", prediction="data", warmup="lower_order"),
    "unipc2": dict(sampler="unipc", steps=19, order=2, variant="bh2"),
    "unipc3": dict(sampler="unipc", steps=19, order=3, variant="bh1"),
}


class CpuBudget:
    """Stop rule on the process CPU clock; ``pause()`` excludes what runs inside it (evaluation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.process_time()

    def used(self) -> float:
        return time.process_time() - self.start

    def stop(self, step: int) -> bool:
        return self.used() >= self.seconds

    def progress(self, step: int) -> float:
        """The spent fraction of the budget: what the learning-rate decay follows (``Trainer.fit(progress=...)``)."""
        return self.used() / self.seconds


def fd_digits(score_fn, sde, n: int, reference: torch.Tensor, draws: int,
              solvers: dict[str, dict]) -> dict[str, tuple[float, float, int, list[float]]]:
    """FD-digits of n samples against ``reference`` images for each of ``solvers``: the mean and standard error
    over ``draws`` independent prior draws (draw k seeded with k, so every run and solver sees the same draws)
    the NFE per sample and the per-draw values (for paired differences between runs). One draw of 359 samples
    is noisy (6-19 for one model over six draws, docs/benchmarks.md), so means over draws compare models."""
    clf = get_digits_classifier(dtype=torch.float32)  # trained and cached on first use
    with torch.no_grad():
        ref = FeatureStats.from_features(clf(reference.float()))
    out = {}
    for name, options in solvers.items():
        fds = []
        for k in range(draws):
            res = sample(score_fn, sde, (n, *reference.shape[1:]), generator=torch.Generator().manual_seed(k),
                         batch_size=512, **options)
            with torch.no_grad():
                fds.append(frechet_distance(FeatureStats.from_features(clf(res.x.float().clamp(-1, 1))), ref))
        fd = torch.tensor(fds, dtype=torch.float64)
        stderr = float(fd.std() / draws ** 0.5) if draws > 1 else float("nan")
        out[name] = (float(fd.mean()), stderr, res.nfe, [round(f, 3) for f in fds])
    return out


def bits_per_dim(ema, sde, dataset, levels: torch.Tensor, args) -> tuple[float, float]:
    """Bits/dim (mean, standard error) of ``levels`` (points of ``dataset``) by the PF-ODE, with the same
    dequantization noise and Hutchinson probes for every run (generator seeded 0)."""
    g = torch.Generator().manual_seed(0)
    return tuple(dataset_bits_per_dim(ema, sde, levels, **dataset.bpd_options(), generator=g, rtol=args.rtol,
                                      atol=args.rtol, batch_size=args.eval_batch))


def train_one(name: str, model: ScoreModel, sde: SDE, weighting: str, args, train) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` with one recipe for the CPU budget; the EMA model and the run's step / time counts."""
    recipe = get_weighting(weighting, **args.weighting_params)  # raises for a field the recipe does not have
    loss = dequantized(partial(dsm_loss, weighting=recipe, eps=args.train_eps, time_sampling=args.time_sampling),
                       levels=train.levels)
    budget = CpuBudget(args.seconds)
    config = TrainConfig(total_steps=10**9, batch_size=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup,
                         lr_decay=args.lr_decay, lr_final_ratio=args.lr_final_ratio, grad_clip=args.clip,
                         ema_decay=args.ema, seed=args.seed, log_every=100, eval_every=0, progress=False)
    trainer = Trainer(model, sde, train.data, config, loss_fn=loss,
                      log_fn=lambda m: "loss" in m and print(name, {k: round(v, 4) for k, v in m.items()}, flush=True))
    t_wall = time.perf_counter()
    if args.steps:  # a step budget: the same optimiser steps whatever the machine's speed per CPU-second
        trainer.fit(stop=lambda step: step >= args.steps, progress=lambda step: step / args.steps)
    else:
        trainer.fit(stop=budget.stop, progress=budget.progress)
    stats = {"steps": trainer.step, "train_cpu_s": round(budget.used(), 1),
             "train_wall_s": round(time.perf_counter() - t_wall, 1)}
    if args.save:
        torch.save(trainer.ema.model.state_dict(), f"{args.save}/{name}{args.tag}.pt")
    return trainer.ema.model, stats


def run_one(name: str, args, train, test) -> dict:
    """Train one recipe for the budget (or ``--load`` its saved EMA weights) and evaluate the EMA model."""
    sde_cls, parametrization, weighting = RUNS[name]
    torch.manual_seed(args.seed)
    sde = sde_cls()
    net = {**NETS[args.net], **({} if args.dropout is None else {"dropout": args.dropout})}
    model = ScoreModel(UNet(**net), sde, parametrization=parametrization)
    if args.channels_last:  # as the main job (conf/train.yaml channels_last): faster oneDNN convolutions
        model = model.to(memory_format=torch.channels_last)
    if args.load:  # a state dict --save wrote: tensors only (weights_only), no code runs
        model.load_state_dict(torch.load(f"{args.load}/{name}{args.tag}.pt", weights_only=True))
        ema, stats = model, {"steps": None, "train_cpu_s": None, "train_wall_s": None}
    else:
        ema, stats = train_one(name, model, sde, weighting, args, train)
    t0 = time.perf_counter()
    fds = fd_digits(ema, sde, test.data.shape[0], train.data, args.fd_draws, {k: SOLVERS[k] for k in args.solvers})
    solver = min(fds, key=lambda k: fds[k][0])
    print(name + args.tag, "FD-digits", {k: round(v[0], 2) for k, v in fds.items()}, flush=True)
    bpd, err = bits_per_dim(ema, sde, test, test.to_levels(), args)
    train_bpd = (bits_per_dim(ema, sde, train, train.to_levels()[:args.train_bpd], args) if args.train_bpd
                 else (None, None))
    row = {"run": name + args.tag, "sde": type(sde).__name__, "parametrization": parametrization,
           "weighting": weighting, "weighting_params": args.weighting_params,
           "time_sampling": args.time_sampling, "train_eps": args.train_eps, "lr": args.lr,
           "ema": args.ema, "net": args.net, "dropout": args.dropout, "weight_decay": args.weight_decay,
           "params": sum(p.numel() for p in model.parameters()),
           "batch": args.batch, "lr_decay": args.lr_decay, "lr_final_ratio": args.lr_final_ratio,
           "warmup": args.warmup, "clip": args.clip, "seed": args.seed, **stats, "bpd": bpd, "bpd_stderr": err,
           "train_bpd": train_bpd[0], "train_bpd_stderr": train_bpd[1],
           "fd_digits": fds[solver][0], "fd_stderr": fds[solver][1], "fd_draws": args.fd_draws, "solver": solver,
           "nfe": fds[solver][2], "fd_per_draw": fds[solver][3],
           "fd_by_solver": {k: round(v[0], 2) for k, v in fds.items()},
           "n_test": test.data.shape[0], "eval_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(row), flush=True)
    return row


def _weighting_params(p: argparse.ArgumentParser, items: list[str], runs: list[str]) -> dict[str, float]:
    """``["shift=2", ...]`` -> ``{"shift": 2.0}``, checked against every run's recipe before anything trains."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not (sep and key) or number is None:
            p.error(f"--weighting-param must be KEY=NUMBER (e.g. shift=2), got {item!r}")
        out[key] = number
    for name in runs:
        try:
            get_weighting(RUNS[name][2], **out)
        except ValueError as err:
            p.error(f"--weighting-param for run {name!r}: {err}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="runs (default: all)")
    p.add_argument("--seconds", type=float, default=300.0, help="training budget per run, CPU seconds")
    p.add_argument("--steps", type=int, default=0,
                   help="train this many steps instead of --seconds of CPU time (lr decay over the steps; 0 = off)")
    p.add_argument("--eval-batch", type=int, default=128, help="ODE batch size in evaluation")
    p.add_argument("--rtol", type=float, default=1e-3, help="rtol = atol of the likelihood ODE")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    p.add_argument("--net", default="main", choices=list(NETS), help="the U-Net of every run (NETS)")
    p.add_argument("--dropout", type=float, default=None, help="dropout in the U-Net's res blocks (default: the net's)")
    p.add_argument("--batch", type=int, default=64, help="training batch size")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-decay", default="cosine", choices=list(LR_DECAYS),
                   help="decay after warm-up over the spent fraction of the CPU budget (sde.training.LR_DECAYS)")
    p.add_argument("--lr-final-ratio", type=float, default=0.0, help="decayed rate at the budget's end / peak")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay (with the (1 + n) / (10 + n) warm-up)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="U-Net in NHWC memory format (the main job's default; --no-channels-last for NCHW)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS),
                   help="FD-digits solvers (default: all; the table reports the best)")
    p.add_argument("--train-bpd", type=int, default=0,
                   help="also score bits/dim on the first this many train images (the generalisation gap; 0 = off)")
    p.add_argument("--fd-draws", type=int, default=8,
                   help="FD-digits: mean over this many prior draws of n_test samples (draw k seeded with k)")
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, data order, loss noise)")
    p.add_argument("--time-sampling", default="low_discrepancy", choices=list(TIME_UNIFORMS),
                   help="how the training times' uniforms are drawn (sde.losses.TIME_UNIFORMS)")
    p.add_argument("--weighting-param", action="append", default=[], metavar="KEY=VALUE", dest="weighting_param",
                   help="a recipe hyperparameter (sde.losses.get_weighting), e.g. shift=2 for eps / v, gamma=1 for "
                        "min_snr; repeatable; a run whose recipe lacks the field stops with an error")
    p.add_argument("--train-eps", type=float, default=1e-5, help="smallest training time of dsm_loss")
    p.add_argument("--tag", default="", help="suffix of the run name in the table (variants of one run)")
    p.add_argument("--save", default=None, help="folder: write the EMA weights to <save>/<run><tag>.pt")
    p.add_argument("--load", default=None,
                   help="folder: evaluate the EMA weights --save wrote (<load>/<run><tag>.pt) instead of training")
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = p.parse_args()
    if args.seconds <= 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    if args.fd_draws < 1:
        p.error(f"--fd-draws must be >= 1, got {args.fd_draws}")
    for flag in ("steps", "train_bpd"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, flag)}")
    args.weighting_params = _weighting_params(p, args.weighting_param, args.runs)
    torch.set_num_threads(args.threads)
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    print(f"digits train {tuple(train.data.shape)}, test {tuple(test.data.shape)}, {args.seconds:.0f} CPU-s per run, "
          f"{args.threads} thread(s)", flush=True)
    rows = []
    for name in args.runs:
        rows.append(run_one(name, args, train, test))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print("\n| run | SDE | parametrization | weighting | steps | test bpd | FD-digits (20 NFE, best solver) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['sde']} | {r['parametrization']} | {r['weighting']} | {r['steps']} | "
              f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f} | {r['fd_digits']:.2f} ± {r['fd_stderr']:.2f} ({r['solver']}) |")


if __name__ == "__main__":
    main()
