"""The life cycle every Hydra app in experiments/ shares: check, set up, run, record, always finish."""

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
Check = Callable[[DictConfig], None]


def check(cfg: DictConfig, task: str, validate: Check | None = None) -> None:
    """The config checks (:func:`_common.checks.check_config`, then the app's ``validate``), errors logged."""
    from .checks import check_config
    from .console import file_log

    try:
        check_config(cfg)
        if validate is not None:
            validate(cfg)
    except Exception as err:
        file_log().error("%s: invalid config, nothing was run: %s", task, err)
        raise


def run_task(cfg: DictConfig, task: str, body: Body, validate: Check | None = None) -> dict[str, Any]:
    """Run ``body(cfg, tracker, out, device, dtype, generator) -> metrics`` as the job ``task``.

    First checks the composed config (``validate``: the app's own checks), before any W&B run or output
    is created. Then writes metrics.json (atomically) in the run folder, logs the summary and a results
    table to the tracker, adds the job's row (its swept parameters first) to the sweep's results table
    in a multirun, prints a summary table, and finishes the tracker even when ``body`` raises (exit code
    1, the error in the W&B summary and in the run's log file), so that multirun jobs never share a
    W&B run.
    """
    from .sweeps import job_names

    check(cfg, task, validate)
    device, dtype, generator = setup(cfg)
    out = run_dir()
    sweep, _ = sweep_info()
    names = job_names(cfg)

    def publish(tracker: NullTracker, metrics: dict[str, Any]) -> None:
        tracker.table("results", [metrics])
        if sweep is not None:
            params = {k: v for k, v in names.params.items() if k not in metrics}
            write_row(sweep, str(HydraConfig.get().job.num), {**params, **metrics})
        print_table(f"{task}: {cfg.name} -> {out}", metrics)

    return tracked(cfg, task, out, names.group, names.run,
                   lambda tracker: body(cfg, tracker, out, device, dtype, generator), publish)


def tracked(cfg: DictConfig, task: str, out: Path, group: str, run: str | None,
            compute: Callable[[NullTracker], dict[str, Any]],
            publish: Callable[[NullTracker, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One recorded job: open its tracker, ``compute(tracker) -> metrics``, write ``out/metrics.json``
    (atomically) and the tracker summary, ``publish(tracker, metrics)``; on an error log it to the run's log
    file and mark the W&B run failed; always finish the tracker (exit code 0 or 1)."""
    from .console import file_log

    tracker = open_tracker(cfg, task, out, group, run)
    exit_code = 1
    try:
        metrics = compute(tracker)
        write_json(out / "metrics.json", metrics)
        tracker.summary(metrics)
        if publish is not None:
            publish(tracker, metrics)
        exit_code = 0
        return metrics
    except BaseException as err:
        file_log().exception("%s failed: %s: %s", task, type(err).__name__, err)
        tracker.fail(err)
        raise
    finally:
        tracker.finish(exit_code)
