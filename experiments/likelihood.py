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
from _common.distributed import chunk_nfe_list, chunk_nfe_rows, launched, likelihood_sharded, run_task
from _common.models import num_dims, score_source, sde_name
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sde._io import atomic_torch_save
from sde.likelihood import BitsPerDim


def nfe_metrics(batch_nfe: list[int]) -> dict:
    """Score calls per ODE solve (one solve carries a whole mini-batch: its NFE is each point's trajectory's)
    and in all: ``nfe_per_trajectory_mean`` / ``_max`` do not grow with the number of batches, ``score_calls``
    does."""
    return {"nfe_per_trajectory_mean": sum(batch_nfe) / len(batch_nfe), "nfe_per_trajectory_max": max(batch_nfe),
            "score_calls": sum(batch_nfe), "solves": len(batch_nfe)}


def _quantized(cfg: DictConfig, data, x: torch.Tensor, score_fn, sde, opts: dict, device) -> tuple[dict, object]:
    """Bits/dim through the dataset's own convention (ArrayDataset.bits_per_dim): the test_bpd of train.py.

    Under torchrun every rank scores its seeded chunks of the points with that same function
    (experiments/_common/distributed.py); returns (None, None) on ranks other than 0.
    """
    if not launched():
        res = data.bits_per_dim(score_fn, sde, x, generator=bpd_generator(cfg.seed, device),
                                batch_size=cfg.batch_size, dtype=x.dtype, **opts)
    else:
        from sde.distributed_eval import shard_map

        def chunk(idx: range, g: torch.Generator):
            res = data.bits_per_dim(score_fn, sde, x[idx.start: idx.stop], generator=g, dtype=x.dtype, **opts)
            return (res.values, res.logp[0], chunk_nfe_rows(res.batch_nfe, len(idx))), res.nfe

        size = cfg.batch_size or 256
        outs, _ = shard_map(chunk, x.shape[0], seed=cfg.seed, chunk_size=size, device=device)
        if outs is None:
            return None, None
        values, logp, rows = outs
        res = BitsPerDim.from_draws([values], [logp], chunk_nfe_list(rows, size))  # one summary rule
    values, logp, batch_nfe, mean, stderr = res.values, res.logp[0], res.batch_nfe, res.mean, res.stderr
    metrics = {**nfe_metrics(batch_nfe), "nll_nats": -logp.mean().item(),
               "nll_nats_se": (logp.std() / x.shape[0] ** 0.5).item(),
               "bpd": mean, "bpd_se": stderr, "levels": int(data.levels)}
    return metrics, (values, logp)


def _continuous(cfg: DictConfig, x: torch.Tensor, source, opts: dict, generator) -> tuple[dict, object]:
    """Nats of continuous data (sharded under torchrun), against the exact density with score=oracle."""
    lik, _ = likelihood_sharded(source.score_fn, source.sde, x, generator=generator, seed=cfg.seed,
                                batch_size=cfg.batch_size, **opts)
    if lik is None:
        return None, None
    logp, exact = lik.logp, None
    values = {**nfe_metrics(lik.batch_nfe), "nll_nats": -logp.mean().item(),
              "nll_nats_se": (logp.std() / x.shape[0] ** 0.5).item()}
    if source.oracle is not None:  # the ODE starts at eps, so the model density is that of p_eps, known exactly
        exact = source.oracle.log_prob(x.double(), source.sde, opts.get("eps", 1e-5))
        values.update({"exact_nll_nats": -exact.mean().item(),
                       "mean_abs_logp_error": (logp.double() - exact).abs().mean().item()})
    return values, (logp, exact)


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots
    from _common.console import progress_enabled, report

    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    tracker.use_checkpoint(source.checkpoint_path)  # W&B lineage when it is a logged train.py checkpoint
    data = load_data(source.data, split=cfg.split)
    x = data.data.to(device=device, dtype=dtype)
    if cfg.num_points:
        x = x[: cfg.num_points]
    opts = {**OmegaConf.to_container(cfg.likelihood, resolve=True), "progress": progress_enabled(cfg.progress)}
    report("likelihood: %d %s points, divergence=%s, method=%s", x.shape[0], cfg.split, opts["divergence"],
           opts["method"])
    metrics = {"task": "likelihood", "score": source.kind, "sde": sde_name(source.sde), "points": x.shape[0],
               "dims": num_dims(data.shape), "divergence": opts["divergence"]}
    t0 = time.perf_counter()
    exact = None
    if getattr(data, "levels", None):
        values, res = _quantized(cfg, data, x, source.score_fn, source.sde, opts, device)
        if values is None:  # a torchrun rank other than 0: rank 0 holds the gathered values and writes
            return {}
        bpd, logp = res
        tracker.image("bpd_histogram", plots.save_histogram(bpd, out / "bpd_hist.png", "bits/dim"))
    else:
        values, res = _continuous(cfg, x, source, opts, generator)
        if values is None:
            return {}
        logp, exact = res
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
