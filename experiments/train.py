"""Train a score model, then sample a grid, measure test bits/dim and save pictures.

    python experiments/train.py                       # digits, VP SDE, MLP: the main job
    python experiments/train.py sde=ve model=unet train.steps=2000 logger=none
    python experiments/train.py -m sde=vp,subvp,ve    # a sweep; results.md in the sweep folder

Training runs in sde.training.Trainer (EMA, warm-up, clipping, atomic checkpoints, resume). Writes into
its run folder: checkpoint.pt (+ checkpoints/latest.pt, best.pt, step_*.pt), samples.png (or samples_2d.png),
strip.png, metrics.json; prints a summary table at the end.
"""

from __future__ import annotations

import functools
import math
import time

import hydra
import torch
from _common import load_data, print_table, run_dir, setup, sweep_info, to_plain, write_json
from _common.models import build_model, build_sde, num_dims, save_checkpoint
from _common.results import write_row
from _common.sampling import draw
from _common.tracking import open_tracker
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@torch.no_grad()
def _validation_loss(model, sde, data, cfg) -> float:
    """DSM loss of the EMA model on the test split, with the same noise at every evaluation."""
    from sde.losses import dsm_loss

    g = torch.Generator(device=data.device).manual_seed(cfg.seed + 1)
    losses = [dsm_loss(model, sde, data[i:i + 512], likelihood_weighting=cfg.train.likelihood_weighting,
                       eps=cfg.train.eps, generator=g).item() for i in range(0, data.shape[0], 512)]
    return sum(losses) / len(losses)


def train(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from sde.losses import dsm_loss
    from sde.training import TrainConfig, Trainer

    train_set = load_data(cfg.data, split="train")
    test_set = load_data(cfg.data, split="test")
    x_train = train_set.data.to(device=device, dtype=dtype)
    x_test = test_set.data.to(device=device, dtype=dtype)
    sde = build_sde(cfg)
    model = build_model(cfg, sde).to(device=device, dtype=dtype)
    tc, opt = cfg.train, cfg.optimizer
    config = TrainConfig(
        total_steps=tc.steps, batch_size=min(tc.batch_size, x_train.shape[0]), lr=opt.lr, betas=tuple(opt.betas),
        weight_decay=opt.weight_decay, adam_eps=opt.eps, warmup_steps=tc.warmup, grad_clip=tc.grad_clip,
        ema_decay=tc.ema_decay, seed=cfg.seed, log_every=cfg.logger.log_every, eval_every=tc.val_every,
        ckpt_every=tc.checkpoint_every, keep_every=tc.checkpoint_every, best_metric="val_loss",
        out_dir=str(out / "checkpoints"), resume=tc.resume, progress=tc.progress,
    )
    loss_fn = functools.partial(dsm_loss, likelihood_weighting=tc.likelihood_weighting, eps=tc.eps)
    hooks = [lambda step, model, ema_model: {"val_loss": _validation_loss(ema_model, sde, x_test, cfg)}]
    hooks = hooks if tc.val_every else []
    deadline = time.perf_counter() + tc.time_budget_s if tc.time_budget_s else None

    def log_fn(m: dict) -> None:
        step = int(m.pop("step"))
        tracker.log({(k if k.startswith("val") else f"train/{k}"): v for k, v in m.items()}, step=step)

    trainer = Trainer(model, sde, x_train, config, loss_fn=loss_fn, callbacks=hooks, log_fn=log_fn,
                      model_config={k: to_plain(cfg[k]) for k in ("sde", "model", "data")}, device=device)
    t0 = time.perf_counter()
    final = trainer.fit(stop=(lambda step: time.perf_counter() > deadline) if deadline else None)
    metrics: dict = {"params": sum(p.numel() for p in model.parameters()), "steps": trainer.step,
                     "train_loss": final.get("loss", math.nan), "train_seconds": time.perf_counter() - t0}
    if "val_loss" in final:
        metrics["val_loss"] = final["val_loss"]
    ema_model = trainer.ema.model
    ckpt = save_checkpoint(out / "checkpoint.pt", cfg, model, ema_model, trainer.step, metrics)
    if cfg.logger.get("log_checkpoints", False):
        tracker.artifact(ckpt, name=f"{cfg.name}-checkpoint", type="model")
    return _evaluate(cfg, ema_model, sde, test_set, x_test, tracker, out, device, dtype, generator, metrics)


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
