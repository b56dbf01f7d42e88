"""Experiment tracking: a W&B run per job (offline by default) or nothing.

Every run is opened with the resolved config and always finished, also when the job fails,
so the jobs of a multirun never write into the same run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import to_plain

__all__ = ["NullTracker", "WandbTracker", "open_tracker"]


class NullTracker:
    """The tracker for ``logger=none``: every call does nothing."""

    enabled = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        pass

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def artifact(self, path: str | os.PathLike, name: str, type: str) -> None:  # noqa: A002 - W&B's word
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """A wandb run; ``wandb`` is imported only when this logger is selected."""

    enabled = True

    def __init__(self, cfg: DictConfig, job_type: str, run_dir: Path, group: str) -> None:
        import wandb

        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=cfg.logger.get("group") or group,
            job_type=job_type,
            name=f"{group}/{run_dir.name}" if group else None,
            tags=list(cfg.logger.get("tags") or []),
            config=to_plain(cfg),
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",  # a fresh run per job, even in one process (basic launcher)
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        self.run.log({key: self._wandb.Image(str(path), caption=caption)})

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(rows[0])
        data = [[row.get(c) for c in columns] for row in rows]
        self.run.log({key: self._wandb.Table(columns=columns, data=data)})

    def artifact(self, path: str | os.PathLike, name: str, type: str) -> None:  # noqa: A002
        art = self._wandb.Artifact(name=name.replace("/", "-"), type=type)
        art.add_file(str(path))
        self.run.log_artifact(art)

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float, str, bool)):
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def open_tracker(cfg: DictConfig, job_type: str, run_dir: Path, group: str) -> NullTracker:
    """The tracker ``cfg.logger`` selects; W&B is off for logger=none or WANDB_MODE=disabled."""
    kind = cfg.logger.kind
    if kind == "none" or os.environ.get("WANDB_MODE") == "disabled":
        return NullTracker()
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r} is not supported; choose one of ['none', 'wandb']")
    return WandbTracker(cfg, job_type, run_dir, group)
