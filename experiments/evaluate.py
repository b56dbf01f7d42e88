"""Sample quality of a trained model against held-out data.

    python experiments/evaluate.py score.path=outputs/train/digits/<time>/checkpoint.pt sampler=ode
    python experiments/evaluate.py -m score.path=... sampler=em,pc,ode,ddim,heun,dpm   # quality vs NFE

Metrics: on digits, FD-digits (Frechet distance of a digits-classifier's 64-d features), KID and
Inception Score on the same classifier; for every data set, MMD, energy distance and sliced W2
on the raw samples. Disjoint test points scored the same way give the floor (floor_*): the test split is
cut into a reference half and a floor half with the same number of points of every class
(:func:`balanced_halves`, docs/evaluation.md), so the floor measures sampling noise, not a class-mix gap.
"""

from __future__ import annotations

import hydra
import torch
from _common import load_data
from _common.distributed import draw_sharded, run_task
from _common.models import score_source, sde_name
from _common.quality import quality
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def balanced_halves(labels: torch.Tensor | None, num_points: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets of at most ``n`` test points each, with equal class counts (stratified by label).

    Each class's points (in split order) are paired, first with second, third with fourth, ...; the pairs are
    interleaved over the classes in proportion to their sizes, and the first ``n`` pairs give the reference
    half (first of each pair) and the floor half (second). Any prefix therefore has the split's class mix and
    the two halves the same count of every class. Unlabelled data: the first ``n`` points and the next ``n``.

    Args:
        labels: (num_points,) integer class labels, or None.
        num_points: size of the split.
        n: points wanted per half (fewer when the split has fewer pairs).

    Returns:
        (reference, floor): index tensors of equal length.
    """
    if labels is None:
        n = min(n, num_points // 2)
        return torch.arange(n), torch.arange(n, 2 * n)
    labels = labels.cpu()
    keyed = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        pairs = members[: members.numel() // 2 * 2].reshape(-1, 2)
        keyed += [((j + 0.5) / len(pairs), c, pair) for j, pair in enumerate(pairs)]  # proportional interleave
    keyed.sort(key=lambda k: (k[0], k[1]))
    chosen = torch.stack([pair for _, _, pair in keyed[:n]]) if keyed and n > 0 else torch.zeros(0, 2, dtype=torch.long)
    return chosen[:, 0], chosen[:, 1]


def run(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common import plots
    from _common.console import progress_enabled, report

    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    tracker.use_checkpoint(source.checkpoint_path)  # W&B lineage when it is a logged train.py checkpoint
    data = load_data(source.data, split=cfg.split)
    test = data.data.to(device=device, dtype=dtype)
    # the floor needs a second, disjoint set of n test points with the reference half's class mix
    ref_idx, floor_idx = balanced_halves(getattr(data, "labels", None), test.shape[0], cfg.num_samples)
    n = len(ref_idx)
    report("evaluate: %d samples with sampler=%s against %d test points", n, cfg.sampler.name, n)
    x, nfe, _, _ = draw_sharded(source.score_fn, source.sde, cfg.sampler, (n, *test.shape[1:]), generator=generator,
                             device=device, dtype=dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                             progress=progress_enabled(cfg.progress))
    if x is None:  # a torchrun rank other than 0: rank 0 scores the gathered samples
        return {}
    digits = source.data.name == "digits"
    metrics = {"task": "evaluate", "sde": sde_name(source.sde), "sampler": cfg.sampler.name, "nfe": nfe,
               "num_samples": n}
    reference = test[ref_idx.to(test.device)]
    metrics.update(quality(x, reference, digits, generator))
    floor = quality(test[floor_idx.to(test.device)], reference, digits, generator)  # held-out data, same reference
    metrics.update({f"floor_{k}": v for k, v in floor.items()})
    if source.data.image:
        tracker.image("samples", plots.save_grid(x[:64], out / "samples.png"))
    else:
        title = f"{metrics['sde']} / {cfg.sampler.name} (NFE {nfe})"
        tracker.image("samples", plots.save_scatter(x, out / "samples_2d.png", reference=test, title=title,
                                                    reference_label="test data"))
    return metrics


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "evaluate", run)


if __name__ == "__main__":
    main()
