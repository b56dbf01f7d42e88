"""The one atomic file writer: every file the project writes (checkpoints, JSON, tables, PNGs, caches).

``atomic_write(path, data)`` writes ``data`` to a temporary file ``.tmp-<name>.<random>`` in the
target folder, fsyncs it, gives it the permissions a plain ``open(path, "w")`` would (``0666``
minus the umask: ``0644`` under umask 022; ``mkstemp`` alone makes ``0600`` files) and
``os.replace``s it onto ``path``. A reader sees the old file or the whole new one; a process
killed mid-write leaves the old file intact plus a stale temporary file (removed by
:func:`remove_stale_temp_files`, e.g. when a checkpoint folder is reopened).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"  # temporary files are named .tmp-<final name>.<random>

__all__ = ["atomic_write", "atomic_torch_save", "remove_stale_temp_files", "TMP_PREFIX"]


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_payload(f: Any, data: bytes, path: Path) -> None:
    """Write all of ``data`` (destined for ``path``) to the open temporary file ``f`` and fsync it.

    Crash tests replace this function (monkeypatch) to stop a writer half-way; nothing else does.
    """
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or str encoded as UTF-8) to ``path`` atomically.

    Args:
        path: the final file; its folder is created when missing.
        data: the whole content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``data`` is neither bytes nor str.
        OSError: the write or the rename failed (the old file, if any, is left untouched and no
            temporary file remains).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes or str, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # group/world-readable like any other output
        with os.fdopen(fd, "wb") as f:
            _write_payload(f, bytes(data), path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` into :func:`atomic_write` (the object is serialised in memory first)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write(path, buf.getvalue())


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed :func:`atomic_write` left in ``directory``; returns them."""
    directory = Path(directory)
    stale = sorted(directory.glob(TMP_PREFIX + "*")) if directory.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
