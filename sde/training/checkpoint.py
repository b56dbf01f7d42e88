"""Checkpoint files: atomic writes, ``weights_only`` loads, retention and RNG capture.

A checkpoint is a dict of tensors and primitive containers only, so that it loads with
``torch.load(..., weights_only=True)`` (no arbitrary code runs on load). Files are written
to a temporary file in the target directory, fsync'ed, then ``os.replace``'d onto the final
name: a reader never sees a half-written checkpoint, and a process killed mid-write leaves
the previous file intact (plus a stale ``.tmp-*`` file that the next run removes).
"""

from __future__ import annotations

import io
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TMP_PREFIX = ".tmp-"
# Test hook: pause half-way through writing the checkpoint of this step, after touching the
# marker file, so a test can SIGKILL the writer mid-write. Unset in normal use.
_PAUSE_STEP_ENV = "SDE_TEST_CKPT_PAUSE_STEP"
_PAUSE_MARKER_ENV = "SDE_TEST_CKPT_PAUSE_MARKER"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the model/run it is loaded into."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, _pause: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if _pause:  # test hook: simulate a crash half-way through the write
                f.flush()
                os.fsync(f.fileno())
                Path(os.environ[_PAUSE_MARKER_ENV]).touch()
                time.sleep(3600)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise ``state`` with ``torch.save`` and write it atomically to ``path``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state(noise_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the loop may touch, as tensors and primitives (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_prim, np_state[2:])],
        "noise": noise_generator.get_state() if noise_generator is not None else None,
    }
    return state


def restore_rng_state(state: dict[str, Any], noise_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch_cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if noise_generator is not None and state["noise"] is not None:
        noise_generator.set_state(state["noise"])


def _prim(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def diff_dicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flat dicts of primitives, as readable strings."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if _norm(a) != _norm(b):
            out.append(f"{key}: checkpoint={a!r} current={b!r}")
    return out


def _norm(v: Any) -> Any:
    return list(map(_norm, v)) if isinstance(v, (list, tuple)) else v


def check_state_dict_compatible(saved: dict[str, torch.Tensor], model: torch.nn.Module, what: str = "model") -> None:
    """Raise :class:`CheckpointMismatchError` naming missing, unexpected and reshaped keys."""
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in sorted(set(saved) & set(current))
        if saved[k].shape != current[k].shape
    ]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"missing from checkpoint: {missing}")
        if unexpected:
            parts.append(f"not in the model: {unexpected}")
        if reshaped:
            parts.append(f"different shapes: {reshaped}")
        raise CheckpointMismatchError(f"{what} checkpoint does not match the {what}: " + "; ".join(parts))


class CheckpointManager:
    """Keeps ``latest.pt``, ``best.pt`` (lowest eval metric) and ``step_XXXXXXXX.pt`` every k steps.

    Args:
        directory: where checkpoints live (created on first save).
        keep_every: also keep a permanent copy every this many steps (0: never).

    Stale temporary files left by a killed writer are removed on construction.
    """

    LATEST = "latest.pt"
    BEST = "best.pt"

    def __init__(self, directory: str | os.PathLike, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_every = int(keep_every)
        if self.directory.is_dir():
            for stale in self.directory.glob(_TMP_PREFIX + "*"):
                stale.unlink(missing_ok=True)

    @property
    def latest(self) -> Path:
        return self.directory / self.LATEST

    @property
    def best(self) -> Path:
        return self.directory / self.BEST

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def step_checkpoints(self) -> list[Path]:
        """Permanent per-step checkpoints, oldest first."""
        return sorted(p for p in self.directory.glob("step_*.pt") if re.fullmatch(r"step_\d{8}\.pt", p.name))

    def save(self, state: dict[str, Any], step: int, *, is_best: bool = False) -> list[Path]:
        """Write ``state`` as latest (and best / step copy when due); returns the paths written."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        pause = os.environ.get(_PAUSE_STEP_ENV) == str(step)
        targets = [self.latest]
        if is_best:
            targets.append(self.best)
        if self.keep_every and step % self.keep_every == 0:
            targets.append(self.step_path(step))
        for target in targets:
            atomic_write_bytes(target, data, _pause=pause and target == self.latest)
        return targets
