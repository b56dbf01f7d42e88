"""On-disk cache location and atomic writes for trained extractors and reference statistics."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "SCORE_SDE_CACHE"  # environment variable overriding the cache folder


def default_cache_dir() -> Path:
    """``$SCORE_SDE_CACHE`` if set, else ``~/.cache/score_sde``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "score_sde")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the target folder, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
