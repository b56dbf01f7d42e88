"""On-disk cache location and atomic writes for trained extractors and reference statistics."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import atomic_torch_save

CACHE_ENV = "SCORE_SDE_CACHE"  # environment variable overriding the cache folder


def default_cache_dir() -> Path:
    """``$SCORE_SDE_CACHE`` if set, else ``~/.cache/score_sde``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "score_sde")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    path = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = ["CACHE_ENV", "default_cache_dir", "resolve_cache_dir", "atomic_torch_save"]
