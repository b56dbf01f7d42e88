"""Experiment tracking: a W&B run per job (offline by default) or nothing.

Every run is opened with the resolved config and always finished, also when the job fails (exit code 1,
the error in the summary), so the jobs of a multirun never write into the same run. Groups and run names
come from the sweep (:mod:`_common.sweeps`). wandb's own folders (artifact staging: ``WANDB_DATA_DIR``,
logs and the artifact cache: ``WANDB_CACHE_DIR``) default to ``<run folder>/wandb/`` instead of
``~/.local/share/wandb`` and ``~/.cache/wandb``, unless those variables are set in the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import to_plain

__all__ = ["NullTracker", "WandbTracker", "open_tracker", "checkpoint_artifact"]

_WANDB_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}  # variable -> subfolder of <run>/wandb
_USER_DIRS = {k for k in _WANDB_DIRS if k in os.environ}  # set by the user: left alone
_ARTIFACT_FILE = "metrics.json"  # train.py's record of the checkpoint artifact it logged (key checkpoint_artifact)


def checkpoint_artifact(checkpoint: Path) -> dict[str, str] | None:
    """The W&B artifact ``checkpoint`` was logged as by the training run that wrote it, or None.

    Only ``<train run>/checkpoint.pt`` is logged (train.py's ``metrics.json`` then names the artifact);
    ``checkpoints/*.pt`` are other files, never logged.
    """
    import json

    record = Path(checkpoint).parent / _ARTIFACT_FILE
    if Path(checkpoint).name != "checkpoint.pt" or not record.is_file():
        return None
    try:
        metrics = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    name = metrics.get("checkpoint_artifact") if isinstance(metrics, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return {"name": name, "ref": str(metrics.get("checkpoint_artifact_ref") or "")}


class NullTracker:
    """The tracker for ``logger=none``: every call does nothing."""

    enabled = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        pass

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def artifact(self, path: str | os.PathLike, name: str, type: str,  # noqa: A002 - W&B's word
                 metadata: dict[str, Any] | None = None) -> str:
        """Log ``path`` as an artifact; returns its versioned reference when the tracker knows it ("" offline)."""
        return ""

    def use_checkpoint(self, path: str | os.PathLike | None) -> dict[str, str] | None:
        """Declare the checkpoint this run reads (lineage); returns what was recorded (None: not a logged one)."""
        return None

    def fail(self, error: BaseException) -> None:
        """Record that the job failed with ``error`` (before :meth:`finish` with a non-zero exit code)."""

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(NullTracker):
    """A wandb run; ``wandb`` is imported only when this logger is selected."""

    enabled = True

    def __init__(self, cfg: DictConfig, job_type: str, run_dir: Path, group: str, name: str | None = None) -> None:
        import wandb

        for key, sub in _WANDB_DIRS.items():  # per job: each run stages into its own folder
            if key not in _USER_DIRS:
                os.environ[key] = str(run_dir / "wandb" / sub)
        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", cfg.logger.mode)
        self.offline = mode == "offline"
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.get("entity"),
            group=cfg.logger.get("group") or group,
            job_type=job_type,
            name=name,
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

    def artifact(self, path: str | os.PathLike, name: str, type: str,  # noqa: A002
                 metadata: dict[str, Any] | None = None) -> str:
        art = self._wandb.Artifact(name=name.replace("/", "-"), type=type, metadata=metadata)
        # immutable: referenced in place, not copied to wandb's staging folder (the file is final when logged)
        art.add_file(str(path), policy="immutable")
        self.run.log_artifact(art)
        if self.offline:  # the version is assigned when the run is synced
            return ""
        art.wait()
        return art.qualified_name

    def use_checkpoint(self, path: str | os.PathLike | None) -> dict[str, str] | None:
        found = None if path is None else checkpoint_artifact(Path(path))
        if found is None:
            return None
        self.run.config.update({"checkpoint_artifact": found["name"]}, allow_val_change=True)
        if found["ref"] and not self.offline:
            self.run.use_artifact(found["ref"], type="model")  # lineage: this run consumed that version
        return found

    def fail(self, error: BaseException) -> None:
        self.run.summary["error"] = f"{type(error).__name__}: {error}"[:2000]

    def summary(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float, str, bool)):
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def open_tracker(cfg: DictConfig, job_type: str, run_dir: Path, group: str, name: str | None = None) -> NullTracker:
    """The tracker ``cfg.logger`` selects; W&B is off for logger=none or WANDB_MODE=disabled."""
    kind = cfg.logger.kind
    if kind == "none" or os.environ.get("WANDB_MODE") == "disabled":
        return NullTracker()
    if kind != "wandb":
        raise ValueError(f"logger.kind={kind!r} is not supported; choose one of ['none', 'wandb']")
    return WandbTracker(cfg, job_type, run_dir, group, name)
