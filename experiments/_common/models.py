"""Building SDEs and score models from configs, and where an app's score comes from (``score=...``).

Everything is built through the library's registries (sde.checkpoint.SDES, sde.nets.NETS,
sde.checkpoint.DATA_LOADERS), the same path a checkpoint is rebuilt by, so a config or a file can
only name the project's own classes. Checkpoints are read by sde.checkpoint.load_score_model:
any file the project writes (train.py's checkpoint.pt, the Trainer's checkpoints/*.pt) works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sde.checkpoint import SDES, Flatten, build_score_model, diff_dicts, load_score_model
from sde.checkpoint import build_sde as _build_sde

from . import to_plain

__all__ = [
    "Flatten", "build_sde", "build_model", "config_diff", "overridden_groups", "ScoreSource", "SCORE_KINDS",
    "score_source", "CHECKPOINT_KEYS", "num_dims", "sde_name",
]  # fmt: skip

CHECKPOINT_KEYS = ("sde", "model", "data")  # the config groups a checkpoint fixes


def build_sde(cfg: DictConfig):
    """The SDE ``cfg.sde`` describes (through sde.checkpoint.SDES)."""
    return _build_sde(to_plain(cfg.sde))


def build_model(cfg: DictConfig, sde) -> nn.Module:
    """ScoreModel(net, sde, parametrization) for ``cfg.model``; vector nets are wrapped for images."""
    return build_score_model(to_plain(cfg.model), sde, list(cfg.data.shape))


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as 'key: checkpoint=a requested=b' lines."""
    return diff_dicts(saved, current, labels=("checkpoint", "requested"))


def overridden_groups(overrides: list[str]) -> set[str]:
    """Which of sde/model/data the command line set (``sde=ve``, ``sde.beta_max=10``, ``+data...``)."""
    out = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("@", 1)[0]
        if key in CHECKPOINT_KEYS:
            out.add(key)
    return out


@dataclass(frozen=True)
class ScoreSource:
    """Where an app's score comes from: what ``score=checkpoint`` / ``score=oracle`` give the apps."""

    kind: str  # the score.kind that built it
    score_fn: Callable  # score_fn(x, t) -> score
    sde: Any  # the SDE the score belongs to
    data: DictConfig  # the data node the score was trained on (the checkpoint's) or asked for
    sde_config: dict  # the plain sde description (for comparisons, e.g. with a classifier's)
    model: nn.Module | None = None  # the ScoreModel (score=checkpoint)
    oracle: Any = None  # the exact GaussianMixture (score=oracle)
    checkpoint_path: Path | None = None
    checkpoint: dict | None = None  # the whole checkpoint dict (score=checkpoint)

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape."""
        return tuple(int(s) for s in self.data.shape)


def _checked_against_overrides(spec: dict, cfg: DictConfig, overrides: list[str], path: Path) -> None:
    """Refuse command-line sde/model/data settings that differ from the checkpoint's (every key named)."""
    diffs = []
    for key in sorted(overridden_groups(overrides)):
        diffs += config_diff({key: spec[key]}, {key: to_plain(cfg[key])})
    if diffs:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the requested config; differing keys:\n  "
            + "\n  ".join(diffs)
            + "\nDrop those overrides (the checkpoint's settings are used) or train a matching model.")


def _from_checkpoint(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype) -> ScoreSource:
    from .checks import missing_checkpoint

    if OmegaConf.is_missing(cfg.score, "path"):
        raise missing_checkpoint(cfg, None)
    path = Path(str(cfg.score.path)).expanduser()
    if not path.is_file():
        raise missing_checkpoint(cfg, path)
    loaded = load_score_model(path, device=device, dtype=dtype, ema=bool(cfg.score.get("ema", True)))
    _checked_against_overrides(loaded.spec, cfg, overrides, path)
    return ScoreSource(kind="checkpoint", score_fn=loaded.model, sde=loaded.sde,
                       data=OmegaConf.create(loaded.spec["data"]), sde_config=loaded.spec["sde"], model=loaded.model,
                       checkpoint_path=path, checkpoint=loaded.state)


def _from_oracle(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype) -> ScoreSource:
    from . import load_data

    oracle = getattr(load_data(cfg.data), "oracle", None)
    if oracle is None:
        raise ValueError(f"score=oracle needs a data set with an exact score (data=gmm), got {cfg.data.name!r}")
    oracle = oracle.to(device=device, dtype=dtype)
    sde = build_sde(cfg)
    return ScoreSource(kind="oracle", score_fn=oracle.score_fn(sde), sde=sde, data=cfg.data,
                       sde_config=to_plain(cfg.sde), oracle=oracle)


def _from_diffusers(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype) -> ScoreSource:
    """score=diffusers: the model folder fixes the network and its scheduler the SDE, so sde=/model= overrides
    would be ignored: they are refused (score.scheduler=... picks another SDE)."""
    from .pretrained import diffusers_source  # diffusers is an optional extra: imported only when asked for

    ignored = sorted(overridden_groups(overrides) & {"sde", "model"})
    if ignored:
        raise ValueError(f"score=diffusers takes the network and the SDE from score.path (its scheduler); the "
                         f"overrides of {ignored} would be ignored: drop them, or set score.scheduler=<folder>")
    return diffusers_source(cfg, device, dtype)


# score.kind -> builder(cfg, command-line overrides, device, dtype) -> ScoreSource. Add a kind with one line.
SCORE_KINDS: dict[str, Callable[[DictConfig, list[str], torch.device, torch.dtype], ScoreSource]] = {
    "checkpoint": _from_checkpoint,
    "oracle": _from_oracle,
    "diffusers": _from_diffusers,
}


def score_source(cfg: DictConfig, overrides: list[str], device: torch.device, dtype: torch.dtype) -> ScoreSource:
    """The :class:`ScoreSource` ``cfg.score`` names (a registered ``score.kind``).

    Raises:
        ValueError: unknown score.kind; overrides that contradict the checkpoint (every key named).
        FileNotFoundError: score.path does not exist (says which command writes one).
        sde.checkpoint.CheckpointError: an unreadable or unsafe checkpoint.
    """
    kind = cfg.score.kind
    if kind not in SCORE_KINDS:
        raise ValueError(f"score.kind={kind!r} is not supported; choose one of {sorted(SCORE_KINDS)}")
    return SCORE_KINDS[kind](cfg, overrides, device, dtype)


def num_dims(shape) -> int:
    return math.prod(int(s) for s in shape)


def sde_name(sde) -> str:
    """The one spelling of an SDE in every results table: its sde.checkpoint.SDES key (= its conf/sde option:
    ``vp``, ``subvp``, ``ve``, ``flow``); the class name for SDEs outside the registry (DiscreteVPSDE)."""
    return next((name for name, cls in SDES.items() if type(sde) is cls), type(sde).__name__)
