"""Train a score model, then sample a grid, measure test bits/dim and save pictures.

    python experiments/train.py                       # digits, VP SDE, the small U-Net: the main job
    python experiments/train.py model=mlp train.total_steps=10000   # a residual MLP instead (faster, noisier)
    python experiments/train.py sde=ve train.total_steps=2000 logger=none
    python experiments/train.py progress=false        # no bars (the default "auto" shows them in a terminal)
    python experiments/train.py -m sde=vp,subvp,ve    # a sweep; results.md in the sweep folder
    python experiments/train.py model.net.num_classes=10 loss.label_dropout=0.1  # conditional (CFG-ready)
    python experiments/train.py train.resume=last     # continue the newest killed run of this name in its folder

The ``train:`` node is sde.training.TrainConfig field for field. Quantized data (digits, MNIST, CIFAR-10)
trains on the dataset's dequantization (sde.data.dequantize) and test bits/dim uses the same
dataset's convention (ArrayDataset.bits_per_dim), so both score the same continuous density.

Training runs in sde.training.Trainer (EMA, warm-up, clipping, atomic checkpoints, resume). Writes into
its run folder: train_config.json (at the start), checkpoint.pt (the Trainer's checkpoint format, like
checkpoints/latest.pt, best.pt, step_*.pt), samples.png (or samples_2d.png), strip.png, metrics.json (at
the end: a run without it is unfinished); prints a summary table at the end. The config is checked
(:func:`check_train_config`: the ``train:`` node as TrainConfig, the loss) before anything is written.
Progress: a tqdm bar (step, loss, steps/s, ETA) when ``progress`` (``auto``: in a terminal), and the same
numbers every ``train.log_every`` steps in ``<run>/train.log`` (Python logging through Hydra's job logging).
"""

from __future__ import annotations

import functools
import math
import time

import hydra
import torch
from _common import bpd_generator, load_data, to_plain
from _common.distributed import per_rank_batch, run_task
from _common.models import CHECKPOINT_KEYS, build_model, build_sde, num_dims
from _common.sampling import draw
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@torch.no_grad()
def _validation_loss(model, loss_fn, data, labels, cfg) -> float:
    """Training loss of the EMA model on the test split, with the same noise at every evaluation."""
    g = torch.Generator(device=data.device).manual_seed(cfg.seed + 1)
    losses = []
    for i in range(0, data.shape[0], 512):
        kwargs = {} if labels is None else {"y": labels[i:i + 512]}
        losses.append(loss_fn(model, model.sde, data[i:i + 512], generator=g, **kwargs).item())
    return sum(losses) / len(losses)


_LOSS_APP_KEYS = ("weighting", "eps", "time_sampling", "label_dropout")  # loss: keys that are not recipe parameters


def _loss_function(cfg: DictConfig, train_set, num_classes: int):
    """The training loss: ``cfg.loss`` (a registered weighting recipe and its parameters, conf/loss/) of dsm_loss,
    on dequantized data for quantized data sets (the dataset's own dequantization, the space test bits/dim
    scores), with label dropout to the null class for conditional models (one network then serves
    classifier-free guidance)."""
    from sde.losses import dequantized, dsm_loss, get_weighting
    from sde.models import drop_labels

    params = {k: v for k, v in cfg.loss.items() if k not in _LOSS_APP_KEYS}
    loss = functools.partial(dsm_loss, weighting=get_weighting(cfg.loss.weighting, **params), eps=cfg.loss.eps,
                             time_sampling=_time_sampling(cfg))
    if getattr(train_set, "levels", None):
        loss = dequantized(loss, int(train_set.levels))  # the dataset's dequantization (sde.data.dequantize)
    if num_classes == 0:
        return loss
    p = _label_dropout(cfg)

    def conditional_loss(model, sde, x0, *, generator=None, y=None):
        y = None if y is None else drop_labels(y, num_classes, p, generator=generator)
        return loss(model, sde, x0, generator=generator, y=y)

    return conditional_loss


def _time_sampling(cfg: DictConfig) -> str:
    """loss.time_sampling: how a batch's time uniforms are drawn (sde.losses.TIME_UNIFORMS), default "iid"."""
    from _common.checks import prefixed

    from sde._checks import check_choice
    from sde.losses import TIME_UNIFORMS

    value = cfg.loss.get("time_sampling", "iid")
    return prefixed("loss", {"time_sampling"}, lambda: check_choice("time_sampling", value, TIME_UNIFORMS))


def _label_dropout(cfg: DictConfig) -> float:
    """loss.label_dropout: probability of training on the null class (classifier-free guidance), default 0.1."""
    p = cfg.loss.label_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"loss.label_dropout={p!r} must be a probability in [0, 1]")
    return float(p)


def _labels(cfg: DictConfig, data_set, num_classes: int, device) -> torch.Tensor | None:
    """The class labels a conditional model trains on (None for an unconditional one)."""
    if num_classes == 0:
        return None
    if data_set.labels is None or data_set.num_classes != num_classes:
        raise ValueError(
            f"model.net.num_classes={num_classes} asks for a class-conditional model, but data={cfg.data.name!r} has "
            f"{'no labels' if data_set.labels is None else f'{data_set.num_classes} classes'}; set "
            f"model.net.num_classes={data_set.num_classes if data_set.labels is not None else 0}")
    return data_set.labels.to(device)


def _train_fields(cfg: DictConfig) -> dict:
    """The ``train:`` node as TrainConfig's fields; ``train.progress`` (auto | true | false) becomes a bool."""
    from _common.console import progress_enabled

    fields = to_plain(cfg.train)
    fields["progress"] = progress_enabled(fields.get("progress", "auto"), "train.progress")
    return fields


def check_train_config(cfg: DictConfig) -> None:
    """Before anything is written: ``TrainConfig(**train)`` (errors name ``train.<field>``), the loss recipe and
    ``loss.time_sampling`` and ``loss.label_dropout``. ``train.resume`` is checked by :func:`_common.resume.start`."""
    from _common.checks import prefixed

    from sde.losses import get_weighting
    from sde.training import TrainConfig

    fields = {**_train_fields(cfg), "resume": True}
    prefixed("train", fields, lambda: TrainConfig(**fields))
    params = {k: v for k, v in cfg.loss.items() if k not in _LOSS_APP_KEYS}
    prefixed("loss", {"weighting", *params}, lambda: get_weighting(cfg.loss.weighting, **params))
    _time_sampling(cfg)
    _label_dropout(cfg)


def train_config(cfg: DictConfig, out, n_train: int, resume: bool):
    """``TrainConfig(**cfg.train)``: the node mirrors it field for field; the app fills the run folder
    (out_dir null -> <run>/checkpoints), the resume decision, caps the batch at the training-set size and
    splits it over the ranks under torchrun (``train.batch_size`` is the global batch)."""
    from sde.training import TrainConfig

    fields = _train_fields(cfg)
    fields.update(out_dir=fields["out_dir"] or str(out / "checkpoints"), resume=resume,
                  batch_size=per_rank_batch(min(int(fields["batch_size"]), n_train)))
    return TrainConfig(**fields)


def _progress_logger(tracker, config, started: float):
    """The Trainer's ``log_fn``: W&B keys ``train/<metric>`` and ``val/loss``, and one log line per call
    (step, loss, steps/s, ETA) in train.log, also on the console when no bar shows them."""
    from _common.console import report

    def log_fn(m: dict) -> None:
        step = int(m.pop("step"))
        tracker.log({_WANDB_KEYS.get(k, f"train/{k}"): v for k, v in m.items()}, step=step)
        if "loss" in m:
            rate = m.get("steps_per_sec", math.nan)
            eta = (config.total_steps - step) / rate if rate and math.isfinite(rate) else math.nan
            report("train: step %d/%d loss %.4g lr %.3g grad_norm %.3g %.2f steps/s ETA %s (%.0f s elapsed)",
                   step, config.total_steps, m["loss"], m.get("lr", math.nan), m.get("grad_norm", math.nan),
                   rate, _clock(eta), time.perf_counter() - started, console=not config.progress)
        else:
            report("train: step %d %s", step, " ".join(f"{k} {v:.4g}" for k, v in m.items()),
                   console=not config.progress)

    return log_fn


_WANDB_KEYS = {"val_loss": "val/loss"}  # metrics.json's flat name -> the W&B key (docs/experiments.md)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def train(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    from _common.resume import start

    from sde.training import Trainer

    resume = start(cfg, out)
    train_set = load_data(cfg.data, split="train")
    test_set = load_data(cfg.data, split="test")
    x_train = train_set.data.to(device=device, dtype=dtype)
    x_test = test_set.data.to(device=device, dtype=dtype)
    sde = build_sde(cfg)
    model = build_model(cfg, sde).to(device=device, dtype=dtype)
    if cfg.get("channels_last", False):  # NHWC weights: faster convolutions (oneDNN on CPU, CUDA tensor cores)
        model = model.to(memory_format=torch.channels_last)
    num_classes = int(cfg.model.net.get("num_classes", 0) or 0)
    _label_dropout(cfg)  # checked before any training
    y_train, y_test = _labels(cfg, train_set, num_classes, device), _labels(cfg, test_set, num_classes, device)
    config = train_config(cfg, out, x_train.shape[0], resume)
    loss_fn = _loss_function(cfg, train_set, num_classes)
    hooks = [lambda step, model, ema_model: {"val_loss": _validation_loss(ema_model, loss_fn, x_test, y_test, cfg)}]

    t0 = time.perf_counter()
    trainer = Trainer(model, sde, x_train, config, labels=y_train, loss_fn=loss_fn, callbacks=hooks,
                      log_fn=_progress_logger(tracker, config, t0),
                      model_config={k: to_plain(cfg[k]) for k in CHECKPOINT_KEYS}, device=device)
    final = trainer.fit()
    metrics: dict = {"params": sum(p.numel() for p in model.parameters()), "steps": trainer.step,
                     "train_loss": final.get("loss", math.nan), "train_seconds": time.perf_counter() - t0}
    if "val_loss" in final:
        metrics["val_loss"] = final["val_loss"]
    ckpt = trainer.save_as(out / "checkpoint.pt", metrics=metrics)  # the Trainer's format (collective under DDP)
    if not trainer.dist.is_main:  # a torchrun rank other than 0: rank 0 writes and evaluates
        return {}
    metrics["world_size"] = trainer.dist.world_size
    if cfg.logger.get("log_checkpoints", False) and tracker.enabled:
        name = checkpoint_artifact_name(cfg)
        ref = tracker.artifact(ckpt, name=name, type="model",
                               metadata={"metrics": dict(metrics), **{k: to_plain(cfg[k]) for k in CHECKPOINT_KEYS}})
        metrics.update({"checkpoint_artifact": name, **({"checkpoint_artifact_ref": ref} if ref else {})})
    return _evaluate(cfg, trainer.ema.model, sde, test_set, x_test, tracker, out, device, dtype, generator, metrics)


def checkpoint_artifact_name(cfg: DictConfig) -> str:
    """The W&B artifact of train.py's checkpoint.pt: one name per (sde, model, data) choice, e.g.
    ``score-vp-unet-digits``, so the versions of one name are runs of the same kind of model."""
    choices = HydraConfig.get().runtime.choices
    parts = [str(choices.get(k) or cfg[k].get("name") or k) for k in CHECKPOINT_KEYS]
    return "-".join(["score", *parts]).replace("/", "-")


def _evaluate(cfg, model, sde, test_set, x_test, tracker, out, device, dtype, generator, metrics) -> dict:
    from _common import plots
    from _common.console import progress_enabled

    bars = progress_enabled(cfg.progress)
    shape = (cfg.eval.num_samples, *test_set.shape)
    x, nfe, strip, strip_nfe = draw(model, sde, cfg.sampler, shape, generator=generator, device=device, dtype=dtype,
                                   strip_frames=cfg.eval.strip_frames, progress=bars)
    metrics.update({"sampler": cfg.sampler.name, "sample_nfe": nfe, "sample_strip_nfe": strip_nfe})
    if cfg.data.image:
        tracker.image("samples", plots.save_grid(x, out / "samples.png"), caption=f"{cfg.sampler.name}, NFE {nfe}")
        if strip:
            tracker.image("denoising_strip", plots.save_strip(strip, out / "strip.png"))
    else:
        tracker.image("samples", plots.save_scatter(x, out / "samples_2d.png", reference=x_test, title=cfg.name,
                                                    reference_label="test data"))
    n_bpd = min(cfg.eval.bpd_samples, x_test.shape[0])
    if n_bpd > 0 and getattr(test_set, "levels", None):
        # The dataset's own dequantization and bits/dim convention (the space the training data lived in).
        # Its own generator seeded with cfg.seed: experiments/likelihood.py reproduces this number exactly.
        res = test_set.bits_per_dim(model, sde, x_test[:n_bpd], generator=bpd_generator(cfg.seed, device),
                                    batch_size=64, dtype=dtype, progress=bars, **cfg.eval.likelihood)
        metrics.update({"test_bpd": res.mean, "test_bpd_se": res.stderr, "bpd_points": n_bpd,
                        "levels": int(test_set.levels)})
        tracker.log({"test/bpd": res.mean})
    metrics["dims"] = num_dims(test_set.shape)
    return metrics


def _train_and_describe(cfg: DictConfig, tracker, out, device, dtype, generator) -> dict:
    metrics = train(cfg, tracker, out, device, dtype, generator)
    choices = HydraConfig.get().runtime.choices
    metrics.update({"task": "train", "name": cfg.name, "sde": choices.get("sde"), "model": choices.get("model")})
    return metrics


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    metrics = run_task(cfg, "train", _train_and_describe, validate=check_train_config)
    return float(metrics.get("val_loss", metrics.get("train_loss", math.nan)))  # the Optuna sweeper's objective


if __name__ == "__main__":
    main()
