"""Sample quality of a trained model against held-out data.

    python experiments/evaluate.py score.path=outputs/train/digits/<time>/checkpoint.pt sampler=ode
    python experiments/evaluate.py -m score.path=... sampler=em,pc,ode,ddim,heun,dpm   # quality vs NFE

Metrics: on digits, FD-digits (Frechet distance of a digits-classifier's 64-d features), KID and
Inception Score on the same classifier; for every data set, MMD, energy distance and sliced W2
on the raw samples. Disjoint test points scored the same way give the floor (floor_*).
"""

from __future__ import annotations

import hydra
from _common import load_data
from _common.distributed import draw_sharded, run_task
from _common.models import score_source, sde_name
from _common.quality import quality
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots

    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    test = load_data(source.data, split=cfg.split).data.to(device=device, dtype=dtype)
    n = min(cfg.num_samples, test.shape[0] // 2)  # the floor needs a second, disjoint set of n test points
    x, nfe, _, _ = draw_sharded(source.score_fn, source.sde, cfg.sampler, (n, *test.shape[1:]), generator=generator,
                             device=device, dtype=dtype, batch_size=cfg.batch_size, seed=cfg.seed)
    if x is None:  # a torchrun rank other than 0: rank 0 scores the gathered samples
        return {}
    digits = source.data.name == "digits"
    metrics = {"task": "evaluate", "sde": sde_name(source.sde), "sampler": cfg.sampler.name, "nfe": nfe,
               "num_samples": n}
    metrics.update(quality(x, test[:n], digits, generator))
    floor = quality(test[n:2 * n], test[:n], digits, generator)  # held-out data vs the same reference
    metrics.update({f"floor_{k}": v for k, v in floor.items()})
    if source.data.image:
        tracker.image("samples", plots.save_grid(x[:64], out / "samples.png"))
    else:
        tracker.image("samples", plots.save_scatter(x, out / "samples_2d.png", reference=test))
    return metrics


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "evaluate", run)


if __name__ == "__main__":
    main()
