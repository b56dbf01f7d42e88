"""score=diffusers: a diffusers model folder (save_pretrained layout) or Hub id as the score source.

The SDE comes from the model's scheduler config (DiscreteVPSDE for the DDPM family, VESDE for
ScoreSdeVe); ``score.scheduler=<folder or scheduler_config.json>`` overrides it. See docs/pretrained.md.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["build_diffusers_score", "diffusers_source"]


def build_diffusers_score(score_cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """(score_fn, sde, model) for a ``score: diffusers`` config node.

    Raises:
        ValueError: score.path is missing; from_diffusers' own errors (folder without model or
            scheduler, unsupported scheduler class, unknown prediction type).
    """
    from sde.pretrained import from_diffusers

    path = score_cfg.get("path")
    if path in (None, "", "???"):
        raise ValueError("score=diffusers needs score.path=<a save_pretrained folder or a Hub id>")
    score_fn, sde = from_diffusers(
        str(path), scheduler=score_cfg.get("scheduler"), subfolder=score_cfg.get("subfolder"),
        prediction_type=score_cfg.get("prediction_type"), null_class=score_cfg.get("null_class"),
        device=device, dtype=dtype,
    )
    return score_fn, sde, score_fn.unet


def diffusers_source(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    """The apps' :class:`~_common.models.ScoreSource` of ``score=diffusers``: the data node gets the model's
    (C, H, W) shape."""
    from .models import ScoreSource

    score_fn, sde, _ = build_diffusers_score(cfg.score, device, dtype)
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    if score_fn.sample_shape is not None:
        if [int(d) for d in data.get("shape", [])] != list(score_fn.sample_shape):
            data.shape_from = f"the model at score.path={cfg.score.path}"  # named by load_data if real data disagree
        data.shape = list(score_fn.sample_shape)
        data.dim = math.prod(score_fn.sample_shape)
        data.image = True
    return ScoreSource(kind="diffusers", score_fn=score_fn, sde=sde, data=data, sde_config={"name": type(sde).__name__},
                       model=score_fn)  # the DiffusersScore: a score_fn with conditional(y), as a ScoreModel
