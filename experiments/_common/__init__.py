"""Glue shared by the Hydra apps in experiments/: object building, run setup, outputs.

The library (sde/) never sees Hydra or wandb; everything here turns a composed config into
library objects and library results into files, tables, pictures and W&B records.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = ["build", "setup", "run_dir", "sweep_info", "write_json", "print_table", "to_plain", "load_data"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build(node: DictConfig | dict, /, **kwargs: Any) -> Any:
    """Build the object a config node describes (``_target_`` + arguments): the one factory."""
    if node is None or "_target_" not in node:
        raise ValueError(f"config node has no _target_ to build: {node!r}")
    return instantiate(node, **kwargs)


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
    """Write a text file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Print a two-column summary table (the last thing every app prints)."""
    rows = [(k, format_value(v)) for k, v in metrics.items() if not isinstance(v, (dict, list))]
    width = max([len(k) for k, _ in rows] + [6])
    vwidth = max([len(v) for _, v in rows] + [5])
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    print(f"\n{title}", file=file)
    print(line, file=file)
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>{vwidth}} |", file=file)
    print(line, file=file, flush=True)


def load_data(data_cfg: DictConfig, **kwargs: Any):
    """Load the data set a ``data`` node names and check its shape against the config."""
    ds = build(data_cfg.loader, **kwargs)
    shape = tuple(int(s) for s in data_cfg.shape)
    if tuple(ds.shape) != shape:
        raise ValueError(
            f"data={data_cfg.name!r} loaded samples of shape {tuple(ds.shape)} but the config says "
            f"data.shape={list(shape)}; fix data.shape (and data.dim={math.prod(ds.shape)})"
        )
    return ds
