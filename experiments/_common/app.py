"""The life cycle every Hydra app in experiments/ shares: set up, run, record, always finish."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import print_table, run_dir, setup, sweep_info, write_json
from .results import write_row
from .tracking import NullTracker, open_tracker

Body = Callable[[DictConfig, NullTracker, Path, torch.device, torch.dtype, torch.Generator], dict[str, Any]]


def run_task(cfg: DictConfig, task: str, body: Body) -> dict[str, Any]:
    """Run ``body(cfg, tracker, out, device, dtype, generator) -> metrics`` as the job ``task``.

    Writes metrics.json (atomically) in the run folder, logs the summary and a results table
    to the tracker, adds the job's row to the sweep's results table in a multirun, prints a
    summary table, and finishes the tracker even when ``body`` raises, so that multirun jobs
    never share a W&B run.
    """
    device, dtype, generator = setup(cfg)
    out = run_dir()
    sweep, sweep_name = sweep_info()
    tracker = open_tracker(cfg, task, out, sweep_name or cfg.name)
    exit_code = 1
    try:
        metrics = body(cfg, tracker, out, device, dtype, generator)
        write_json(out / "metrics.json", metrics)
        tracker.summary(metrics)
        tracker.table("results", [metrics])
        if sweep is not None:
            write_row(sweep, str(HydraConfig.get().job.num), metrics)
        print_table(f"{task}: {cfg.name} -> {out}", metrics)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)
