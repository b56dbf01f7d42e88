"""Checks of a composed config that run before a job records anything (no W&B run, no train artifacts).

:func:`check_config` runs first in :func:`_common.app.run_task`; an app adds its own checks (train.py:
the ``train:`` node as ``sde.training.TrainConfig``). Every error names the config key. Hydra has already
created the run folder with its own ``.hydra/`` and ``<app>.log`` by then (it does so before calling the
app); nothing else is written, and the error also goes to that log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["check_config", "prefixed", "missing_checkpoint"]

_LOGGERS = ("none", "wandb")


def missing_checkpoint(cfg: DictConfig, path: Path | None) -> Exception:
    """The error for an unset (``path`` None) or nonexistent ``score.path``: it names the command that writes one."""
    hint = " (or use data=gmm score=oracle for the exact score)" if cfg.get("task") == "sample" else ""
    first = ("score.path is not set: score=checkpoint needs a checkpoint" if path is None
             else f"score.path={str(path)!r} does not exist")
    message = (f"{first}. Train a model first, e.g.\n    python experiments/train.py\n"
               f"then pass score.path=<its run folder>/checkpoint.pt (or <run>/checkpoints/latest.pt){hint}")
    return ValueError(message) if path is None else FileNotFoundError(message)


def _check_score(cfg: DictConfig) -> None:
    from .models import SCORE_KINDS

    score = cfg.get("score")
    if score is None:
        return
    kind = score.get("kind")
    if kind not in SCORE_KINDS:
        raise ValueError(f"score.kind={kind!r} is not supported; choose one of {sorted(SCORE_KINDS)}")
    if kind not in ("checkpoint", "diffusers"):
        return
    if OmegaConf.is_missing(score, "path") or score.get("path") in (None, ""):
        if kind == "diffusers":
            raise ValueError("score.path is not set: score=diffusers needs score.path=<a save_pretrained folder "
                             "or a Hub id> (docs/pretrained.md)")
        raise missing_checkpoint(cfg, None)
    if kind == "checkpoint" and not Path(str(score.path)).expanduser().is_file():
        raise missing_checkpoint(cfg, Path(str(score.path)).expanduser())


def check_config(cfg: DictConfig) -> None:
    """The checks every app shares: ``progress``, ``logger.kind``, ``score``.

    Raises:
        ValueError: a bad value (the message names the key, the value and what is allowed); an unset
            ``score.path`` (it names the command that writes a checkpoint).
        FileNotFoundError: ``score.path`` names no file.
    """
    from .console import progress_enabled

    progress_enabled(cfg.get("progress", "auto"))
    if cfg.get("logger") is not None and cfg.logger.get("kind") not in _LOGGERS:
        raise ValueError(f"logger.kind={cfg.logger.get('kind')!r} is not supported; choose one of {list(_LOGGERS)}")
    _check_score(cfg)


def prefixed(node: str, fields: Any, build: Callable[[], Any]) -> Any:
    """``build()``, with a ValueError/TypeError that names a field of ``fields`` re-raised naming ``node.field``.

    Library objects (e.g. ``TrainConfig``) name their own arguments (``total_steps must be >= 1, got -5``);
    the config key is ``train.total_steps``.
    """
    try:
        return build()
    except (ValueError, TypeError) as err:
        text = str(err)
        first = text.split(" ", 1)[0].split("[", 1)[0].split("=", 1)[0]  # "lr must ...", "betas[0] ...", "name='x' ..."
        keyed = f"{node}.{text}" if first in fields else f"{node}: {text}"
        raise type(err)(keyed) from err
