"""Resuming a killed training run in its own folder: ``train.resume=last`` or ``train.resume=<run folder>``.

conf/train.yaml's ``hydra.run.dir`` is ``${train_run_dir:${train.resume},<output_root>/train/<name>,<time>}``:
a fresh timestamped folder, unless ``train.resume`` names a run. ``last`` is the newest *unfinished*
run of the same experiment name (a folder with ``train_config.json`` and no ``metrics.json``, which
train.py writes only at the very end). The run then continues in that folder from its
``checkpoints/latest.pt`` (bit-exact, see sde.training.Trainer), after :func:`start` has checked
that the requested config is the one the run started with, naming every differing key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sde.checkpoint import diff_dicts

__all__ = ["RUN_CONFIG", "train_run_dir", "config_diffs", "start"]

RUN_CONFIG = "train_config.json"  # the resolved config a training run started with
FINISHED = "metrics.json"  # written by the app at the very end of a run
# Keys that may differ between the first start and a resume (they do not change the result).
_MAY_DIFFER = ("train.resume", "train.progress", "progress", "train.time_budget_s", "threads", "logger", "output_root")


def _is_fresh(resume: Any) -> bool:
    return resume is None or isinstance(resume, bool) or str(resume).lower() in ("true", "false", "null", "none")


def train_run_dir(resume: Any, runs: str, stamp: str) -> str:
    """The run folder of a training job (the ``train_run_dir`` resolver).

    Args:
        resume: ``train.resume``: true/false/null (a fresh folder), ``last`` or a run folder.
        runs: the folder holding this experiment's runs (``<output_root>/train/<name>``).
        stamp: the timestamp naming a fresh folder.

    Returns:
        ``runs/stamp``; for ``last`` the newest unfinished run under ``runs`` (``runs/stamp`` when there
        is none: :func:`start` then says so); for a path, that path.
    """
    if _is_fresh(resume):
        return f"{runs}/{stamp}"
    if str(resume) == "last":
        candidates = sorted(p for p in Path(runs).glob("*")
                            if (p / RUN_CONFIG).is_file() and not (p / FINISHED).exists())
        return str(candidates[-1]) if candidates else f"{runs}/{stamp}"
    return str(resume)


def _comparable(config: dict) -> dict:
    out = json.loads(json.dumps(config))  # a deep copy of plain data
    for dotted in _MAY_DIFFER:
        node, *rest = dotted.split(".")
        if not rest:
            out.pop(node, None)
        elif isinstance(out.get(node), dict):
            out[node].pop(rest[0], None)
    return out


def config_diffs(saved: dict, current: dict) -> list[str]:
    """The keys (as 'key: run=a requested=b' lines) in which a run's saved config and a requested one differ,
    leaving out the keys a resume may change (``_MAY_DIFFER``)."""
    return diff_dicts(_comparable(saved), _comparable(current), labels=("run", "requested"))


def start(cfg: DictConfig, out: Path) -> bool:
    """Record or check the run's config; returns whether the Trainer should resume from ``out``'s checkpoints.

    A fresh run writes ``out/train_config.json``. With ``train.resume=last`` or ``=<run folder>``,
    ``out`` is that run: it must exist, be unfinished, and have been started with the same config.

    Raises:
        ValueError: nothing to resume, a finished run, or a different config (every differing key named).
    """
    from . import to_plain, write_json

    resume = cfg.train.resume
    current = to_plain(cfg)
    saved_file = out / RUN_CONFIG
    if _is_fresh(resume):
        if not saved_file.is_file():
            write_json(saved_file, current)
        return bool(resume) if isinstance(resume, bool) else str(resume).lower() == "true"
    if not saved_file.is_file():
        raise ValueError(f"train.resume={resume!r}: {str(out)!r} is not a training run started by experiments/train.py "
                         f"(no {RUN_CONFIG})" + (f"; no unfinished run of name={cfg.name!r} was found"
                                                 if str(resume) == "last" else ""))
    if (out / FINISHED).exists():
        raise ValueError(f"train.resume={resume!r}: the run {str(out)!r} has already finished ({FINISHED} exists)")
    diffs = config_diffs(json.loads(saved_file.read_text()), current)
    if diffs:
        raise ValueError(f"train.resume={resume!r}: {str(out)!r} was started with a different config; differing "
                         "keys:\n  " + "\n  ".join(diffs) + "\nResume with the same settings or start a new run.")
    return True


def register_resolver() -> None:
    """Register ``train_run_dir`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("train_run_dir"):
        OmegaConf.register_new_resolver("train_run_dir", train_run_dir)
