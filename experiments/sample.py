"""Draw samples from a trained checkpoint or from the exact Gaussian-mixture score.

    python experiments/sample.py score.path=outputs/train/digits/<time>/checkpoint.pt sampler=pc
    python experiments/sample.py data=gmm score=oracle sampler=dpm          # no training
    python experiments/sample.py -m data=gmm score=oracle sde=vp,subvp,ve sampler=em,pc,ode,ddim,heun,dpm

With score=oracle the samples are scored against the exact mixture: MMD and energy distance to
fresh oracle samples, the error of the mixture weights recovered through the exact posterior,
and the mean exact log-density. A multirun leaves results.csv / results.md in its sweep folder.
"""

from __future__ import annotations

import time

import hydra
import torch
from _common.distributed import draw_sharded, run_task
from _common.models import score_source, sde_name
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sde._io import atomic_torch_save


def oracle_metrics(x: torch.Tensor, oracle, cfg: DictConfig, generator: torch.Generator) -> dict:
    """Sample quality against the exact mixture (all float64)."""
    from sde.metrics import energy_distance, mmd

    x = x.double()
    oracle = oracle.to(dtype=torch.float64)
    ref = oracle.sample(cfg.reference_samples, generator=torch.Generator(device=x.device).manual_seed(cfg.seed + 7))
    floor = oracle.sample(x.shape[0], generator=torch.Generator(device=x.device).manual_seed(cfg.seed + 8))
    sub = x[: cfg.reference_samples]  # kernel distances cost O(n^2) memory: compare equal-size sets
    # Mixture weights recovered from the samples through the exact posterior p(k | x):
    # for exact samples E_x[p(k | x)] = w_k, so the L1 gap measures mode-weight errors.
    weights_hat = oracle.posterior(x).mean(0)
    return {
        "mmd": mmd(sub, ref),
        "energy_distance": energy_distance(sub, ref),
        "weights_l1": (weights_hat - oracle.weights.to(weights_hat)).abs().sum().item(),
        # The same statistic for as many exact samples: the Monte Carlo floor of weights_l1.
        "weights_l1_floor": (oracle.posterior(floor).mean(0) - oracle.weights.to(x)).abs().sum().item(),
        "mean_logp": oracle.log_prob(x).mean().item(),
        "oracle_mean_logp": oracle.log_prob(ref).mean().item(),
        "nonfinite": int((~torch.isfinite(x)).any(dim=1).sum().item()),
    }


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots
    from _common.console import progress_enabled, report

    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    tracker.use_checkpoint(source.checkpoint_path)  # W&B lineage when it is a logged train.py checkpoint
    sde, image = source.sde, source.data.image
    report("sample: %d samples with sampler=%s (%s, score=%s)", cfg.num_samples, cfg.sampler.name,
           type(sde).__name__, source.kind)
    t0 = time.perf_counter()
    x, nfe, strip, strip_nfe = draw_sharded(source.score_fn, sde, cfg.sampler, (cfg.num_samples, *source.shape),
                                 generator=generator, device=device, dtype=dtype, batch_size=cfg.batch_size,
                                 strip_frames=cfg.strip_frames if image else 0, seed=cfg.seed,
                                 progress=progress_enabled(cfg.progress))
    report("sample: done in %.1f s, nfe %d (strip %d)", time.perf_counter() - t0, nfe, strip_nfe)
    if x is None:  # a torchrun rank other than 0: rank 0 holds the gathered samples and writes
        return {}
    metrics = {"task": "sample", "score": source.kind, "sde": sde_name(sde),
               "sampler": cfg.sampler.name, "nfe": nfe, "strip_nfe": strip_nfe, "num_samples": cfg.num_samples}
    atomic_torch_save(x.cpu(), out / "samples.pt")
    if image:
        tracker.image("samples", plots.save_grid(x[:64], out / "samples.png"), caption=f"{cfg.sampler.name}, NFE {nfe}")
        if strip:
            tracker.image("denoising_strip", plots.save_strip(strip, out / "strip.png"))
    else:
        oracle = source.oracle
        reference = oracle.sample(4000, generator=generator) if oracle is not None else None
        title = f"{metrics['sde']} / {cfg.sampler.name} (NFE {nfe})"
        tracker.image("samples", plots.save_scatter(
            x, out / "samples_2d.png", reference=reference, title=title, reference_label="oracle samples",
            log_density=None if oracle is None else (lambda z: oracle.log_prob(z.to(reference)))))
    if source.oracle is not None:
        metrics.update(oracle_metrics(x, source.oracle, cfg, generator))
    return metrics


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "sample", run)


if __name__ == "__main__":
    main()
