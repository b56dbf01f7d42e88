"""Train a noise-conditional classifier p_t(y | x_t) for classifier guidance (Song et al. 2021, app. I.1).

    python experiments/train_classifier.py                          # digits, VP SDE
    python experiments/train_classifier.py sde=ve train.steps=5000 logger=none

Writes into its run folder: classifier.pt (weights + the sde/data/classifier config nodes, written
atomically, loadable with torch.load(..., weights_only=True)), metrics.json (test accuracy of the
noisy test set at several diffusion times) and prints a summary table. experiments/controllable.py
uses it with ``control=classifier_guidance classifier_path=<run>/classifier.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from _common import load_data, to_plain
from _common.app import run_task
from _common.models import build_sde
from omegaconf import DictConfig

CLASSIFIER_KEYS = ("sde", "data", "classifier")  # the config nodes a classifier checkpoint fixes


def build_classifier(cfg: DictConfig, sde):
    """NoiseConditionalClassifier for ``cfg.classifier`` on ``cfg.data`` (also used to rebuild a checkpoint)."""
    from sde.guidance import NoiseConditionalClassifier

    c = cfg.classifier
    return NoiseConditionalClassifier(tuple(int(s) for s in cfg.data.shape), int(cfg.data.num_classes),
                                      hidden=int(c.hidden), depth=int(c.depth), embed_dim=int(c.embed_dim),
                                      sde=sde if c.scale_input else None)


@torch.no_grad()
def noisy_accuracy(classifier, sde, x, y, fractions, draws: int, generator: torch.Generator) -> dict:
    """Test accuracy of ``classifier(x_t, t)`` with x_t ~ p_0t(. | x) at t = fraction * T."""
    out = {}
    for f in fractions:
        t = torch.full((x.shape[0],), float(f) * sde.T, dtype=x.dtype, device=x.device)
        hits = [(classifier(sde.perturb(x, t, generator=generator)[0], t).argmax(1) == y).double().mean().item()
                for _ in range(draws)]
        out[f"acc_t{f:g}"] = sum(hits) / len(hits)
    return out


def save_classifier(path: Path, cfg: DictConfig, classifier, metrics: dict) -> Path:
    from sde.training.checkpoint import save_checkpoint

    save_checkpoint(path, {"classifier": classifier.state_dict(), "metrics": dict(metrics),
                           "config": {k: to_plain(cfg[k]) for k in CLASSIFIER_KEYS}})
    return path


def run(cfg: DictConfig, tracker, out: Path, device, dtype, generator) -> dict:
    from sde.guidance import train_classifier

    train_set, test_set = load_data(cfg.data, split="train"), load_data(cfg.data, split="test")
    if train_set.labels is None or int(cfg.data.num_classes) < 2:
        raise ValueError(f"data={cfg.data.name!r} has no class labels; a classifier needs a labelled data set "
                         f"(e.g. data=digits, data=mnist, data=gmm)")
    sde = build_sde(cfg)
    classifier = build_classifier(cfg, sde).to(device=device, dtype=dtype)
    x, y = train_set.data.to(device=device, dtype=dtype), train_set.labels.to(device)
    log_every = int(cfg.logger.get("log_every", 50))

    def callback(info: dict) -> None:
        if info["step"] % log_every == 0:
            tracker.log({"train/loss": info["loss"]}, step=info["step"])

    t0 = time.perf_counter()
    losses = train_classifier(classifier, sde, x, y, steps=int(cfg.train.steps), batch_size=int(cfg.train.batch_size),
                              lr=float(cfg.train.lr), eps=float(cfg.train.eps), generator=generator, callback=callback)
    metrics = {"task": "train_classifier", "name": cfg.name, "steps": int(cfg.train.steps),
               "train_seconds": time.perf_counter() - t0,
               "final_loss": losses[-min(100, len(losses)):].mean().item(),  # mean of the last 100 steps
               "params": sum(p.numel() for p in classifier.parameters())}
    eval_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    xt, yt = test_set.data.to(device=device, dtype=dtype), test_set.labels.to(device)
    metrics.update(noisy_accuracy(classifier, sde, xt, yt, cfg.eval.times, int(cfg.eval.noise_draws), eval_gen))
    save_classifier(out / "classifier.pt", cfg, classifier, metrics)
    return metrics


@hydra.main(config_path="../conf", config_name="train_classifier", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "train_classifier", run)


if __name__ == "__main__":
    main()
