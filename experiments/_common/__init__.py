"""Glue shared by the Hydra apps in experiments/: run setup, data loading, outputs.

The library (sde/) never sees Hydra or wandb; everything here turns a composed config into
library objects and library results into files, tables, pictures and W&B records.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sde._io import atomic_write

__all__ = ["setup", "bpd_generator", "run_dir", "sweep_info", "write_json", "print_table", "to_plain", "load_data"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts and lists (for checkpoints, metrics.json and W&B)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def setup(cfg: DictConfig) -> tuple[torch.device, torch.dtype, torch.Generator]:
    """Device, dtype and a seeded generator for one run; seeds torch's global RNG too (weights init)."""
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} was asked for but CUDA is not available; use device=cpu")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return device, _DTYPES[cfg.dtype], generator


def bpd_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator bits/dim is measured with (dequantization + probes), the same in every app: train.py's
    test_bpd and likelihood.py agree for the same checkpoint, points, seed and ODE options."""
    return torch.Generator(device=device).manual_seed(int(seed))


def run_dir() -> Path:
    """This job's output folder (Hydra's run dir, or the job's subfolder in a multirun)."""
    return Path(HydraConfig.get().runtime.output_dir)


def sweep_info() -> tuple[Path | None, str]:
    """(sweep folder, sweep name) in a multirun; (None, "") in a single run."""
    hc = HydraConfig.get()
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        sweep = Path(hc.sweep.dir)
        return sweep, sweep.name
    return None, ""


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically: a reader sees the old file or the whole new one."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (:func:`sde._io.atomic_write`)."""
    atomic_write(path, text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def print_table(title: str, metrics: dict[str, Any], file=sys.stdout) -> None:
    """Print a two-column summary table (the last thing every app prints); the run's log file gets it too."""
    rows = [(k, format_value(v)) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    width = max([len(k) for k, _ in rows] + [6])
    vwidth = max([len(v) for _, v in rows] + [5])
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    text = "\n".join([title, line, *(f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows), line])
    print(f"\n{text}", file=file, flush=True)
    from .console import report

    report("%s", text, console=False)


def load_data(data_cfg: DictConfig, **kwargs: Any):
    """Load the data set a ``data`` node names and check its shape against the config."""
    from sde.checkpoint import build_data

    ds = build_data(to_plain(data_cfg), **kwargs)  # through sde.checkpoint.DATA_LOADERS, never an import path
    shape = tuple(int(s) for s in data_cfg.shape)
    if tuple(ds.shape) != shape and data_cfg.get("shape_from"):  # score=diffusers: the shape is the model's
        raise ValueError(f"data={data_cfg.name!r} has samples of shape {tuple(ds.shape)}, but {data_cfg.shape_from} "
                         f"takes {shape} (its in_channels and sample_size): choose a data= of that shape")
    if tuple(ds.shape) != shape:
        raise ValueError(
            f"data={data_cfg.name!r} loaded samples of shape {tuple(ds.shape)} but the config says "
            f"data.shape={list(shape)}; fix data.shape (and data.dim={math.prod(ds.shape)})"
        )
    return ds


def _register_resolvers() -> None:
    from .resume import register_resolver

    register_resolver()  # ${train_run_dir:...} in conf/train.yaml's hydra.run.dir
    if not OmegaConf.has_resolver("progress_on"):  # ${progress_on:${progress}}: conf/train.yaml's train.progress
        from .console import progress_enabled

        OmegaConf.register_new_resolver("progress_on", progress_enabled)


_register_resolvers()
