"""Names of a job inside its sweep: what W&B groups and runs are called, which parameters a results row lists.

A multirun's *swept* keys are the command-line overrides with several values (``sde=vp,subvp,ve``, read back
from the ``multirun.yaml`` Hydra's basic sweeper leaves in the sweep folder) and the keys of a sweeper's
``hydra.sweeper.params`` (the Optuna search space, conf/hparams_search/optuna.yaml). A job's values of those
keys are its own overrides (``hydra.overrides.task``). ``hydra.*`` overrides never name anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["JobNames", "job_names", "names_from"]

_MAX_NAME = 128  # W&B's limit on group names


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o for o in OverridesParser.create().parse_overrides(list(overrides))
            if not o.key_or_group.startswith("hydra.") and o.key_or_group != "hydra"]


@dataclass(frozen=True)
class JobNames:
    """How one job is named: its W&B group and run name, and its values of the swept keys."""

    group: str  # "<config>:<name> <sweep overrides>" in a multirun, the experiment name in a single run
    run: str  # the job's values of the swept keys ("sde=vp sampler=ddim"), or its overrides in a single run
    params: dict[str, Any] = field(default_factory=dict)  # swept key -> this job's value (results rows)


def names_from(config_name: str, name: str, job_overrides: list[str], sweep_overrides: list[str] | None,
               sweeper_params: dict[str, Any] | None) -> JobNames:
    """:class:`JobNames` from plain data (``sweep_overrides`` None: a single run).

    Args:
        config_name: the primary config (``train``, ``sample``, ...).
        name: the experiment name (``cfg.name``).
        job_overrides: this job's ``hydra.overrides.task``.
        sweep_overrides: the sweep's command-line overrides (with the comma lists), None in a single run.
        sweeper_params: ``hydra.sweeper.params`` (key -> search-space spec), or None.
    """
    job = _parse(job_overrides)
    if sweep_overrides is None and not sweeper_params:
        run = " ".join(o.input_line for o in job) or name
        return JobNames(group=name, run=run[:_MAX_NAME])
    spec = {o.key_or_group: o.input_line for o in _parse(sweep_overrides or []) if o.is_sweep_override()}
    spec.update({str(k): f"{k}={v}" for k, v in (sweeper_params or {}).items()})
    fixed = [o.input_line for o in job if o.key_or_group not in spec]
    group = " ".join([f"{config_name}:{name}", *fixed, *spec.values()])
    params = {o.key_or_group: o.value() for o in job if o.key_or_group in spec and o.value() is not None}
    run = " ".join(f"{k}={v}" for k, v in params.items()) or name
    return JobNames(group=group[:_MAX_NAME], run=run[:_MAX_NAME], params=params)


def job_names(cfg) -> JobNames:
    """The :class:`JobNames` of the running Hydra job (``cfg``: its composed config)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job = list(hc.overrides.task)
    params = hc.sweeper.get("params") if hc.get("sweeper") is not None else None
    params = OmegaConf.to_container(params, resolve=False) if params is not None else None
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return names_from(hc.job.config_name, str(cfg.name), job, None, None)
    saved = Path(hc.sweep.dir) / "multirun.yaml"  # the basic sweeper's record of the sweep's config
    sweep = list(OmegaConf.load(saved).hydra.overrides.task) if saved.is_file() else []
    return names_from(hc.job.config_name, str(cfg.name), job, sweep, params)
