"""Exact log-likelihood (probability-flow ODE) of held-out data: bits/dim, or nats against the oracle.

    python experiments/likelihood.py score.path=outputs/train/digits/<time>/checkpoint.pt
    python experiments/likelihood.py score.path=... likelihood.divergence=exact num_points=0
    python experiments/likelihood.py data=gmm score=oracle sde=subvp   # checks against exact log p_eps

Quantized data is scored with the dataset's own dequantization and bits/dim convention
(ArrayDataset.bits_per_dim, the function train.py's test_bpd comes from): with the same checkpoint,
points, seed, batch size and ODE options the two apps report the same number. Writes metrics.json,
logp.pt (per-point log-density of the dequantized points, nats) and histograms bpd_hist.png / logp_hist.png.
"""

from __future__ import annotations

import time

import hydra
import torch
from _common import bpd_generator, load_data
from _common.app import run_task
from _common.models import num_dims, score_source
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sde._io import atomic_torch_save


def _quantized(cfg: DictConfig, data, x: torch.Tensor, score_fn, sde, opts: dict, generator) -> tuple[dict, object]:
    """Bits/dim through the dataset's own convention (ArrayDataset.bits_per_dim): the test_bpd of train.py."""
    res = data.bits_per_dim(score_fn, sde, x, generator=generator, batch_size=cfg.batch_size, dtype=x.dtype, **opts)
    metrics = {"nfe": res.nfe, "nll_nats": -res.logp.mean().item(),
               "nll_nats_se": (res.logp[0].std() / x.shape[0] ** 0.5).item(),
               "bpd": res.mean, "bpd_se": res.stderr, "levels": int(data.levels)}
    return metrics, res


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots

    from sde.likelihood import log_likelihood

    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    data = load_data(source.data, split=cfg.split)
    x = data.data.to(device=device, dtype=dtype)
    if cfg.num_points:
        x = x[: cfg.num_points]
    opts = OmegaConf.to_container(cfg.likelihood, resolve=True)
    metrics = {"task": "likelihood", "score": source.kind, "sde": type(source.sde).__name__, "points": x.shape[0],
               "dims": num_dims(data.shape), "divergence": opts["divergence"]}
    t0 = time.perf_counter()
    exact = None
    if getattr(data, "levels", None):
        values, res = _quantized(cfg, data, x, source.score_fn, source.sde, opts, bpd_generator(cfg.seed, device))
        logp = res.logp[0]
        tracker.image("bpd_histogram", plots.save_histogram(res.values, out / "bpd_hist.png", "bits/dim"))
    else:  # continuous data: nats
        lik = log_likelihood(source.score_fn, source.sde, x, generator=generator, batch_size=cfg.batch_size, **opts)
        logp = lik.logp
        values = {"nfe": int(lik.nfe), "nll_nats": -logp.mean().item(),
                  "nll_nats_se": (logp.std() / x.shape[0] ** 0.5).item()}
        if source.oracle is not None:  # the ODE starts at eps, so the model density is that of p_eps, known exactly
            exact = source.oracle.log_prob(x.double(), source.sde, opts.get("eps", 1e-5))
            values.update({"exact_nll_nats": -exact.mean().item(),
                           "mean_abs_logp_error": (logp.double() - exact).abs().mean().item()})
    metrics.update({"seconds": time.perf_counter() - t0, **values})
    atomic_torch_save(logp.cpu(), out / "logp.pt")
    tracker.image("logp_histogram", plots.save_histogram(logp, out / "logp_hist.png", "log p (nats)",
                                                         reference=exact))
    return metrics


@hydra.main(config_path="../conf", config_name="likelihood", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "likelihood", run)


if __name__ == "__main__":
    main()
