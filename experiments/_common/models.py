"""Building SDEs, score models and score functions from configs; checkpoint files.

A checkpoint written by experiments/train.py carries the resolved ``sde``, ``model`` and
``data`` config nodes, so sample/likelihood/evaluate rebuild exactly the trained model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from . import build, to_plain

__all__ = [
    "Flatten", "build_sde", "build_model", "save_checkpoint", "load_checkpoint", "config_diff",
    "overridden_groups", "score_source", "CHECKPOINT_KEYS",
]

CHECKPOINT_KEYS = ("sde", "model", "data")  # the config groups a checkpoint fixes


class Flatten(nn.Module):
    """Run a vector network (B, D) on image batches (B, C, H, W): flatten in, reshape out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", 0)  # guidance checks it on the outer net

    def forward(self, x: Tensor, noise_label: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x.flatten(1), noise_label, y).view_as(x)


def build_sde(cfg: DictConfig):
    return build(cfg.sde)


def build_model(cfg: DictConfig, sde) -> nn.Module:
    """ScoreModel(net, sde, parametrization) for ``cfg.model``; vector nets are wrapped for images."""
    from sde.models import ScoreModel

    net = build(cfg.model.net)
    if len(cfg.data.shape) > 1 and cfg.model.net._target_.endswith("MLP"):
        net = Flatten(net)
    return ScoreModel(net, sde, parametrization=cfg.model.parametrization)


def save_checkpoint(path: str | os.PathLike, cfg: DictConfig, model: nn.Module, ema: nn.Module | None,
                    step: int, metrics: dict[str, Any] | None = None) -> Path:
    """Atomically write the weights with the config nodes needed to rebuild the model."""
    from sde.training.checkpoint import save_checkpoint as _save

    state = {
        "model": model.state_dict(),
        "ema": None if ema is None else ema.state_dict(),
        "config": {k: to_plain(cfg[k]) for k in CHECKPOINT_KEYS},
        "step": int(step),
        "metrics": dict(metrics or {}),
    }
    _save(path, state)
    return Path(path)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: checkpoint=a requested=b' lines."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if (list(va) if isinstance(va, tuple) else va) != (list(vb) if isinstance(vb, tuple) else vb):
            out.append(f"{key}: checkpoint={va!r} requested={vb!r}")
    return out


def overridden_groups(overrides: list[str]) -> set[str]:
    """Which of sde/model/data the command line set (``sde=ve``, ``sde.beta_max=10``, ``+data...``)."""
    out = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]
        if key in CHECKPOINT_KEYS:
            out.add(key)
    return out


def load_checkpoint(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype):
    """Load ``cfg.score.path``; returns (model, cfg with the checkpoint's sde/model/data, checkpoint).

    Raises:
        FileNotFoundError: the path does not exist (says which command writes one).
        ValueError: the command line asked for sde/model/data settings other than the checkpoint's
            (lists every differing key).
    """
    path = Path(str(cfg.score.path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"score.path={str(path)!r} does not exist. Train a model first, e.g.\n"
            f"    python experiments/train.py\n"
            f"then pass score.path=<its run folder>/checkpoint.pt"
            + (" (or use data=gmm score=oracle for the exact score)" if cfg.task == "sample" else "")
        )
    ckpt = torch.load(path, map_location=device, weights_only=True)
    saved = ckpt["config"]
    asked = overridden_groups(overrides)
    diffs = []
    for key in sorted(asked):
        diffs += config_diff({key: saved[key]}, {key: to_plain(cfg[key])})
    if diffs:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the requested config; differing keys:\n  "
            + "\n  ".join(diffs)
            + "\nDrop those overrides (the checkpoint's settings are used) or train a matching model."
        )
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    for key in CHECKPOINT_KEYS:
        cfg[key] = OmegaConf.create(saved[key])
    sde = build_sde(cfg)
    model = build_model(cfg, sde).to(device=device, dtype=dtype)
    use_ema = cfg.score.get("ema", True) and ckpt.get("ema") is not None
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    model.eval().requires_grad_(False)
    return model, cfg, ckpt


def score_source(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype):
    """(score_fn, sde, cfg, extras) for ``cfg.score``: a checkpoint's model or the exact oracle score.

    ``extras`` holds ``oracle`` (the GaussianMixture) for score=oracle and ``model`` for checkpoints.
    """
    kind = cfg.score.kind
    if kind == "oracle":
        from . import load_data

        ds = load_data(cfg.data)
        oracle = getattr(ds, "oracle", None)
        if oracle is None:
            raise ValueError(f"score=oracle needs a data set with an exact score (data=gmm), got {cfg.data.name!r}")
        oracle = oracle.to(device=device, dtype=dtype)
        sde = build_sde(cfg)
        return oracle.score_fn(sde), sde, cfg, {"oracle": oracle, "data": ds}
    if kind == "checkpoint":
        model, cfg, ckpt = load_checkpoint(cfg, overrides, device, dtype)
        return model, model.sde if hasattr(model, "sde") else build_sde(cfg), cfg, {"model": model, "checkpoint": ckpt}
    if kind == "diffusers":
        from .pretrained import diffusers_source

        return diffusers_source(cfg, device, dtype)
    raise ValueError(f"score.kind={kind!r} is not supported; choose one of ['checkpoint', 'diffusers', 'oracle']")


def num_dims(shape) -> int:
    return math.prod(int(s) for s in shape)
