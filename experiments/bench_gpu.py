"""GPU benchmark on the CIFAR-10 DDPM++ model (conf/experiment/cifar10_ddpmpp_vp.yaml) with synthetic data.

    python experiments/bench_gpu.py                 # one CUDA device; about 5 minutes, budgeted < 8
    python experiments/bench_gpu.py --smoke         # tiny U-Net on the CPU, < 60 s: checks the script runs

Measures, and prints as one Markdown table:
  train      - optimizer steps/s of the library Trainer (AdamW, clip, EMA, DSM loss) at batch 128:
               fp32 eager, bf16 autocast, bf16 + channels_last, bf16 + torch.compile. Target: bf16 + compile
               >= 2x fp32 eager.
  sample     - images/s of each sampler at batch 256 (eager fp32, bf16 autocast of the network, and the
               network under torch.compile), and the per-step overhead of the sampler over the bare
               network forward (NFE forwards of the same net at the same batch). Target: < 3 %.
               With CUDA, also each sampler with its score calls replayed from a CUDA graph
               (sde.samplers.CudaGraphScore, fp32 and bf16 network).
  likelihood - wall time of sde.likelihood.log_likelihood (dopri5 on the device) against the score_sde
               route (scipy RK45 with a numpy round trip per evaluation, experiments/bench_likelihood.py)
               on the same model, batch and Rademacher probes. Target: ours >= 5x faster.

The network has random weights (its zero-initialised output layers are re-drawn) so the ODEs are not
trivially easy; speed does not depend on training. Every timing synchronises the device first.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROWS: list[tuple[str, str, str, str]] = []  # (section, configuration, value, note)


def _row(section: str, config: str, value: str, note: str = "") -> None:
    ROWS.append((section, config, value, note))
    print(f"  {section:10s} {config:44s} {value:>14s}  {note}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _net_config(smoke: bool) -> dict:
    """The preset's model.net node (composed by Hydra, the one source of the architecture)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = ["experiment=cifar10_ddpmpp_vp"]
    if smoke:
        overrides += ["model.net.base_channels=16", "model.net.channel_mults=[1,2]", "model.net.num_res_blocks=1",
                      "model.net.attn_resolutions=[16]"]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.model.net, resolve=True)


def _model(net_cfg: dict, device: torch.device, memory_format=torch.contiguous_format) -> nn.Module:
    from sde.checkpoint import build_net
    from sde.models import ScoreModel
    from sde.sdes import VPSDE

    torch.manual_seed(0)
    net = build_net(net_cfg)
    if device.type != "meta":
        _randomize_outputs(net, int(net_cfg["in_channels"]), net_cfg["image_size"])
    return ScoreModel(net, VPSDE()).to(device=device, memory_format=memory_format)


@torch.no_grad()
def _randomize_outputs(net: nn.Module, channels: int, size: int) -> None:
    """Re-draw the zero-initialised convolutions, then scale the last one so the output has unit std, like a
    trained eps-predictor: a non-trivial score (the zero-init net gives score 0 and trivially easy ODEs)."""
    zero = [m for m in net.modules() if isinstance(m, nn.Conv2d) and not m.weight.any()]
    for module in zero:
        module.weight.normal_(0.0, 0.02)
    x = torch.randn(8, channels, size, size, generator=torch.Generator().manual_seed(2))
    std = net(x, torch.full((8,), 0.5)).std()
    if zero and std > 0:
        zero[-1].weight.div_(std)
        zero[-1].bias.div_(std)


# ----------------------------------------------------------------------------------------- training
TRAIN_VARIANTS = {  # label -> (bf16, compile, channels_last)
    "fp32 eager": (False, False, False),
    "bf16 autocast": (True, False, False),
    "bf16 autocast + channels_last": (True, False, True),
    "bf16 autocast + torch.compile": (True, True, False),
}


def bench_train(args, net_cfg: dict, device: torch.device) -> None:
    from sde.training import TrainConfig, Trainer

    n = args.train_steps
    data = torch.randn(args.train_batch * 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = {}
    for label, (bf16, compiled, channels_last) in TRAIN_VARIANTS.items():
        if args.smoke and compiled:
            _row("train", label, "skipped", "--smoke: inductor on the CPU compiles for minutes")
            continue
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = _model(net_cfg, device, fmt)
        logs: list[dict] = []
        try:  # 2n steps logged every n: the first window pays compilation and warm-up, the second is timed
            config = TrainConfig(total_steps=2 * n, batch_size=args.train_batch, lr=2e-4, warmup_steps=10,
                                 ema_decay=0.9999, bf16=bf16, compile=compiled, log_every=n, ckpt_every=0,
                                 progress=False)
            Trainer(model, model.sde, data, config, log_fn=logs.append, device=device).fit()
        except (ValueError, RuntimeError, NotImplementedError) as err:  # e.g. bf16/compile refused on this device
            _row("train", label, "n/a", f"{type(err).__name__}: {str(err)[:90]}")
            continue
        results[label] = logs[-1]["steps_per_sec"]
        ratio = results[label] / results["fp32 eager"] if "fp32 eager" in results else math.nan
        _row("train", label, f"{results[label]:.2f} steps/s", f"{ratio:.2f}x fp32 eager, batch {args.train_batch}")


# ----------------------------------------------------------------------------------------- sampling
def _samplers(steps: int) -> dict[str, dict]:
    return {
        "euler_maruyama": dict(steps=steps, denoise_final=False),
        "pc (Euler-Maruyama + Langevin)": dict(predictor="euler_maruyama", corrector="langevin",
                                                steps=steps // 2, denoise_final=False),
        "ddim": dict(steps=steps, denoise_final=False),
        "heun": dict(steps=steps // 2, denoise_final=False),
        "dpm_solver (order 3)": dict(steps=steps // 3, order=3, denoise_final=False),
    }


def _bf16_score(model: nn.Module, device: torch.device) -> Callable:
    def score_fn(x, t):  # network in bf16, solver state in float32
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t)
        return out.float()

    return score_fn


def _sample_row(args, route: str, score_fn: Callable, model: nn.Module, name: str, opts: dict, x_T: torch.Tensor,
                device: torch.device) -> None:
    from sde.samplers import sample

    sampler = name.split(" ")[0]
    g = torch.Generator(device=device)

    def run():
        return sample(score_fn, model.sde, x_T, sampler, generator=g.manual_seed(0), **opts)

    run()  # warm-up (and compilation)
    seconds, res = _timed(run, device)
    note = f"NFE {res.nfe}, batch {args.sample_batch}"
    if route == "eager fp32":
        t = torch.full((1,), 0.5, device=device).expand(args.sample_batch)  # one shared time, as the samplers pass
        net_s, _ = _timed(lambda: [model(x_T, t) for _ in range(res.nfe)], device)
        note += f", overhead over the bare net {100 * (seconds - net_s) / net_s:+.1f}%"
    _row("sample", f"{name}, {route}", f"{args.sample_batch / seconds:.1f} img/s", note)


def bench_sampling(args, net_cfg: dict, device: torch.device) -> None:
    from sde.samplers import CudaGraphScore

    model = _model(net_cfg, device).eval().requires_grad_(False)
    x_T = torch.randn(args.sample_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    routes = {"eager fp32": model, "eager bf16": _bf16_score(model, device)}
    if not args.smoke:
        routes["compiled bf16"] = _bf16_score(torch.compile(model), device)
    if device.type == "cuda":  # one graph per route: every sampler calls it with the same shapes
        routes["CUDA graph fp32"] = CudaGraphScore(model)
        routes["CUDA graph bf16"] = CudaGraphScore(_bf16_score(model, device))
    else:
        _row("sample", "CUDA graph (CudaGraphScore)", "n/a", f"needs CUDA; this run is on {device.type}")
    with torch.no_grad():
        for route, score_fn in routes.items():
            for name, opts in _samplers(args.sample_steps).items():
                _sample_row(args, route, score_fn, model, name, opts, x_T, device)


# ----------------------------------------------------------------------------------------- likelihood
def bench_likelihood(args, net_cfg: dict, device: torch.device) -> None:
    from bench_likelihood import reference_log_likelihood

    from sde.likelihood import PROBES, log_likelihood

    model = _model(net_cfg, device).eval().requires_grad_(False)
    x = torch.rand(args.ll_batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    probes = PROBES["rademacher"]((1, *x.shape), x, torch.Generator(device=device).manual_seed(1))
    tol = dict(rtol=args.ll_tol, atol=args.ll_tol)

    def ours():
        return log_likelihood(model, model.sde, x, generator=torch.Generator(device=device).manual_seed(1), **tol)

    def scipy_route():
        return reference_log_likelihood(model, model.sde, x, probes[0], **tol)

    ours()  # warm-up
    t_ours, res = _timed(ours, device)
    t_ref, (logp_ref, calls, nfev) = _timed(scipy_route, device)
    gap = ((res.logp - logp_ref).abs() / logp_ref.abs()).max().item()
    _row("likelihood", "ours: log_likelihood (dopri5, on device)", f"{t_ours:.2f} s",
         f"NFE {res.nfe}, batch {args.ll_batch}, tol {args.ll_tol:g}")
    _row("likelihood", "score_sde route (scipy RK45, numpy)", f"{t_ref:.2f} s",
         f"{calls} net calls ({nfev} evaluations); ours {t_ref / t_ours:.1f}x faster; "
         f"logp agree to {gap:.1e} (relative)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny U-Net on the CPU: checks the script end to end")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    p.add_argument("--only", choices=["train", "sample", "likelihood"], default=None)
    p.add_argument("--train-steps", type=int, default=None, help="timed steps per variant (after as many warm-up)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (the paper's 128)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (256)")
    p.add_argument("--sample-steps", type=int, default=None, help="NFE budget of each sampler")
    p.add_argument("--ll-batch", type=int, default=None, help="images in the likelihood comparison")
    p.add_argument("--ll-tol", type=float, default=None, help="rtol = atol of both ODE solvers")
    args = p.parse_args()
    defaults = dict(train_steps=(3, 25), train_batch=(8, 128), sample_batch=(8, 256), sample_steps=(6, 30),
                    ll_batch=(2, 32), ll_tol=(1e-2, 1e-5))
    for key, (smoke, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    elif not args.smoke:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: bf16 is its own row
    net_cfg = _net_config(args.smoke)
    n_params = sum(p.numel() for p in _model(net_cfg, torch.device("meta")).parameters())
    title = (f"bench_gpu on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
             f"torch {torch.__version__}, {'smoke U-Net' if args.smoke else 'DDPM++ (cifar10_ddpmpp_vp)'} "
             f"{n_params / 1e6:.1f}M params")
    print(title, flush=True)
    t0 = time.perf_counter()
    for name, fn in (("train", bench_train), ("sample", bench_sampling), ("likelihood", bench_likelihood)):
        if args.only in (None, name):
            fn(args, net_cfg, device)
    print(f"\n### {title} ({time.perf_counter() - t0:.0f} s)\n")
    print("| section | configuration | value | note |")
    print("|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
