"""Exact log-likelihood (probability-flow ODE) of held-out data: bits/dim, or nats against the oracle.

    python experiments/likelihood.py score.path=outputs/train/digits/<time>/checkpoint.pt
    python experiments/likelihood.py score.path=... likelihood.divergence=exact num_points=0
    python experiments/likelihood.py data=gmm score=oracle sde=subvp   # checks against exact log p_eps

Writes metrics.json, logp.pt (per-point values) and a histogram bpd_hist.png / logp_hist.png.
"""

from __future__ import annotations

import time

import hydra
import torch
from _common import load_data
from _common.distributed import likelihood_sharded, run_task
from _common.models import num_dims, score_source
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def _dequantize(x: torch.Tensor, levels: int, generator: torch.Generator) -> torch.Tensor:
    """[-1, 1] data on the grid of ``levels`` values -> y = 2 (k + u) / levels - 1, u ~ U[0, 1)^D."""
    k = torch.round((x.double() + 1) / 2 * (levels - 1))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
    return (2 * (k + u) / levels - 1).to(x.dtype)


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots

    from sde.likelihood import bits_per_dim

    overrides = list(HydraConfig.get().overrides.task)
    score_fn, sde, cfg, extras = score_source(cfg, overrides, device, dtype)
    data = load_data(cfg.data, split=cfg.split)
    x = data.data.to(device=device, dtype=dtype)
    if cfg.num_points:
        x = x[: cfg.num_points]
    levels = getattr(data, "levels", None)
    opts = OmegaConf.to_container(cfg.likelihood, resolve=True)
    t0 = time.perf_counter()
    res, y = likelihood_sharded(score_fn, sde, x, generator=generator, seed=cfg.seed, batch_size=cfg.batch_size,
                                preprocess=(lambda xb, g: _dequantize(xb, int(levels), g)) if levels else None, **opts)
    seconds = time.perf_counter() - t0
    if res is None:  # a torchrun rank other than 0: rank 0 holds the gathered log-densities and writes
        return {}
    D = num_dims(data.shape)
    metrics = {"task": "likelihood", "score": cfg.score.kind, "sde": type(sde).__name__, "points": x.shape[0],
               "dims": D, "divergence": opts["divergence"], "nfe": int(res.nfe), "seconds": seconds,
               "nll_nats": -res.logp.mean().item(), "nll_nats_se": (res.logp.std() / x.shape[0] ** 0.5).item()}
    torch.save(res.logp.cpu(), out / "logp.pt")
    if levels:
        bpd = bits_per_dim(res.logp.double(), D, levels=int(levels), scale=2.0)
        metrics.update({"bpd": bpd.mean().item(), "bpd_se": (bpd.std() / bpd.numel() ** 0.5).item(),
                        "levels": int(levels)})
        tracker.image("bpd_histogram", plots.save_histogram(bpd, out / "bpd_hist.png", "bits/dim"))
    exact = None
    if "oracle" in extras:
        # The ODE starts at eps, so the model density is that of p_eps, known exactly.
        exact = extras["oracle"].log_prob(y.double(), sde, opts.get("eps", 1e-5))
        metrics.update({"exact_nll_nats": -exact.mean().item(),
                        "mean_abs_logp_error": (res.logp.double() - exact).abs().mean().item()})
    tracker.image("logp_histogram", plots.save_histogram(res.logp, out / "logp_hist.png", "log p (nats)",
                                                         reference=exact))
    return metrics


@hydra.main(config_path="../conf", config_name="likelihood", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "likelihood", run)


if __name__ == "__main__":
    main()
