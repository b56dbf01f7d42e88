"""Train a score model, then sample a grid, measure test bits/dim and save pictures.

    python experiments/train.py                       # digits, VP SDE, MLP: the main job
    python experiments/train.py sde=ve model=unet train.steps=2000 logger=none
    python experiments/train.py -m sde=vp,subvp,ve    # a sweep; results.md in the sweep folder

Writes into its run folder: checkpoint.pt (+ checkpoints/), samples.png (or samples_2d.png),
strip.png, bpd_hist.png, metrics.json; prints a summary table at the end.
"""

from __future__ import annotations

import math
import time

import hydra
import torch
from _common import build, load_data, print_table, run_dir, setup, sweep_info, write_json
from _common.models import build_model, build_sde, num_dims, save_checkpoint
from _common.results import write_row
from _common.sampling import draw
from _common.tracking import open_tracker
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def _batches(data: torch.Tensor, labels, batch_size: int, generator: torch.Generator):
    """Endless random mini-batches (reshuffled every epoch with the run's generator)."""
    n = data.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = perm[i:i + batch_size]
            yield data[idx], None if labels is None else labels[idx]


@torch.no_grad()
def _validation_loss(model, sde, data, cfg, generator) -> float:
    from sde.losses import dsm_loss

    g = torch.Generator(device=generator.device).manual_seed(cfg.seed + 1)  # same noise every time
    losses = [dsm_loss(model, sde, data[i:i + 512], likelihood_weighting=cfg.train.likelihood_weighting,
                       eps=cfg.train.eps, generator=g).item() for i in range(0, data.shape[0], 512)]
    return sum(losses) / len(losses)


def train(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from sde.losses import dsm_loss

    from sde.training.ema import EMA

    train_set = load_data(cfg.data, split="train")
    test_set = load_data(cfg.data, split="test")
    x_train = train_set.data.to(device=device, dtype=dtype)
    x_test = test_set.data.to(device=device, dtype=dtype)
    sde = build_sde(cfg)
    model = build_model(cfg, sde).to(device=device, dtype=dtype)
    optimizer = build(cfg.optimizer)(model.parameters())
    base_lr = [g["lr"] for g in optimizer.param_groups]
    ema = EMA(model, decay=cfg.train.ema_decay)
    tc = cfg.train
    batches = _batches(x_train, None, min(tc.batch_size, x_train.shape[0]), generator)
    metrics: dict = {"params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    t_last, running = t0, 0.0
    for step in range(1, tc.steps + 1):
        x0, _ = next(batches)
        warm = min(1.0, step / tc.warmup) if tc.warmup > 0 else 1.0
        for group, lr in zip(optimizer.param_groups, base_lr):
            group["lr"] = lr * warm
        loss = dsm_loss(model, sde, x0, likelihood_weighting=tc.likelihood_weighting, eps=tc.eps, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        optimizer.step()
        ema.update(model, step)
        running += loss.item()
        if step % cfg.logger.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            k = cfg.logger.log_every if step % cfg.logger.log_every == 0 else step % cfg.logger.log_every
            record = {"train/loss": running / k, "train/lr": optimizer.param_groups[0]["lr"],
                      "train/grad_norm": grad_norm, "train/steps_per_s": k / max(now - t_last, 1e-9)}
            tracker.log(record, step=step)
            t_last, running = now, 0.0
            metrics["train_loss"] = record["train/loss"]
        if tc.val_every and (step % tc.val_every == 0 or step == tc.steps):
            metrics["val_loss"] = _validation_loss(ema.model, sde, x_test, cfg, generator)
            tracker.log({"val/loss": metrics["val_loss"]}, step=step)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            save_checkpoint(out / "checkpoints" / f"step_{step:08d}.pt", cfg, model, ema.model, step)
    metrics["train_seconds"] = time.perf_counter() - t0
    ckpt = save_checkpoint(out / "checkpoint.pt", cfg, model, ema.model, tc.steps, metrics)
    if cfg.logger.get("log_checkpoints", False):
        tracker.artifact(ckpt, name=f"{cfg.name}-checkpoint", type="model")
    return _evaluate(cfg, ema.model, sde, test_set, x_test, tracker, out, device, dtype, generator, metrics)


def _evaluate(cfg, model, sde, test_set, x_test, tracker, out, device, dtype, generator, metrics) -> dict:
    from _common import plots

    from sde.likelihood import dataset_bits_per_dim

    shape = (cfg.eval.num_samples, *test_set.shape)
    x, nfe, strip = draw(model, sde, cfg.sampler, shape, generator=generator, device=device, dtype=dtype,
                         strip_frames=cfg.eval.strip_frames)
    metrics.update({"sampler": cfg.sampler.name, "sample_nfe": nfe})
    if cfg.data.image:
        tracker.image("samples", plots.save_grid(x, out / "samples.png"), caption=f"{cfg.sampler.name}, NFE {nfe}")
        if strip:
            tracker.image("denoising_strip", plots.save_strip(strip, out / "strip.png"))
    else:
        tracker.image("samples", plots.save_scatter(x, out / "samples_2d.png", reference=x_test, title=cfg.name))
    n_bpd = min(cfg.eval.bpd_samples, x_test.shape[0])
    if n_bpd > 0 and getattr(test_set, "levels", None):
        levels = int(test_set.levels)
        x01 = ((x_test[:n_bpd].double() + 1) / 2).to(dtype)  # back on the grid k / (levels - 1)
        bpd, bpd_se = dataset_bits_per_dim(model, sde, x01, levels=levels, generator=generator, batch_size=64,
                                           **cfg.eval.likelihood)
        metrics.update({"test_bpd": bpd, "test_bpd_se": bpd_se, "bpd_points": n_bpd, "levels": levels})
        tracker.log({"test/bpd": bpd})
    metrics["dims"] = num_dims(test_set.shape)
    return metrics


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    device, dtype, generator = setup(cfg)
    out = run_dir()
    sweep, sweep_name = sweep_info()
    tracker = open_tracker(cfg, "train", out, sweep_name or cfg.name)
    exit_code = 1
    try:
        metrics = train(cfg, tracker, out, device, dtype, generator)
        metrics.update({"task": "train", "name": cfg.name, "sde": HydraConfig.get().runtime.choices.get("sde"),
                        "model": HydraConfig.get().runtime.choices.get("model")})
        write_json(out / "metrics.json", metrics)
        tracker.summary(metrics)
        tracker.table("results", [metrics])
        if sweep is not None:
            write_row(sweep, str(HydraConfig.get().job.num), metrics)
        print_table(f"train: {cfg.name} -> {out}", metrics)
        exit_code = 0
        return float(metrics.get("val_loss", metrics.get("train_loss", math.nan)))
    finally:
        tracker.finish(exit_code)


if __name__ == "__main__":
    main()
