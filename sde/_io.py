"""File IO with two guarantees: writes are atomic, reads never let a file choose code to run.

Writing: ``atomic_write(path, data)`` writes ``data`` to a temporary file ``.tmp-<name>.<random>`` in the
target folder, fsyncs it, gives it the permissions a plain ``open(path, "w")`` would (``0666``
minus the umask: ``0644`` under umask 022; ``mkstemp`` alone makes ``0600`` files) and
``os.replace``s it onto ``path``. A reader sees the old file or the whole new one; a process
killed mid-write leaves the old file intact plus a stale temporary file (removed by
:func:`remove_stale_temp_files`, e.g. when a checkpoint folder is reopened). Every file the project
writes (checkpoints, JSON, tables, PNGs, caches) goes through it.

Reading files that are not checkpoints:

- :func:`load_restricted_pickle`: CIFAR-10's python batches are pickles. They hold dicts,
  lists, bytes, str, ints and numpy arrays; an ndarray pickle (as numpy 1.x on Python 2 wrote
  those files) names exactly three globals: ``numpy.core.multiarray._reconstruct``,
  ``numpy.ndarray`` and ``numpy.dtype``. The unpickler admits those (``numpy.dtype`` only
  for dtypes without Python objects) and refuses every other global with an error naming
  the file and the global.
- :func:`load_npy`: ``np.load`` with ``allow_pickle=False`` (object arrays are refused).
- :func:`load_tensor_file`: ``torch.load(weights_only=True)``, errors naming the file.

docs/security.md lists every load path and what it trusts.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np

try:  # numpy >= 2 moved the module; pickles written by numpy 1.x still name numpy.core.multiarray
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

TMP_PREFIX = ".tmp-"  # temporary files are named .tmp-<final name>.<random>

__all__ = ["atomic_write", "atomic_torch_save", "remove_stale_temp_files", "TMP_PREFIX"]
__all__ += ["UnsafeFileError", "load_restricted_pickle", "load_npy", "load_tensor_file"]


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


class UnsafeFileError(pickle.UnpicklingError, ValueError):
    """A file asked to run code (a pickle global outside the allowlist, or an object array)."""


def _plain_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` for the unpickler: a dtype holding Python objects would unpickle arbitrary objects."""
    dt = np.dtype(*args)
    if dt.hasobject:
        raise UnsafeFileError(f"refusing numpy dtype {dt!r}: it holds Python objects")
    return dt


# (module, name) -> object: what a numpy ndarray pickled by numpy 1.x or 2.x needs, nothing else
NUMPY_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,  # as numpy 1.x wrote it (CIFAR-10)
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,  # as numpy 2.x writes it (protocols 2-4)
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: str, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as CIFAR-10's own loader reads it
        self._path, self._allowed = path, allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            allowed = sorted(f"{m}.{n}" for m, n in self._allowed)
            raise UnsafeFileError(
                f"{self._path!r} asks the unpickler for the global {module}.{name}, which could run code; "
                f"refused (only {allowed} are allowed in this file)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"{self._path!r} holds a persistent id ({pid!r:.40}); refused")


def load_restricted_pickle(
    file: IO[bytes], path: str | os.PathLike, allowed: dict[tuple[str, str], Any] | None = None
) -> Any:
    """Unpickle ``file`` admitting only the globals in ``allowed`` (default ``NUMPY_ARRAY_GLOBALS``).

    Args:
        file: a binary file object positioned at the pickle.
        path: the file's name, for error messages.
        allowed: ``{(module, name): object}`` the pickle may reference.

    Returns:
        The unpickled object (builtin containers, bytes, str, numbers and the allowed objects).

    Raises:
        UnsafeFileError: the pickle references any other global (nothing of it is called).
    """
    return _RestrictedUnpickler(file, os.fspath(path), NUMPY_ARRAY_GLOBALS if allowed is None else allowed).load()


def load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """``np.load`` of one ``.npy`` array with ``allow_pickle=False``.

    Raises:
        UnsafeFileError: the file holds an object array (it would need pickle).
        ValueError: the file is not a .npy array; the message names ``what`` and the path.
    """
    path = os.fspath(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            msg = f"{what}: {path!r} holds a pickled object array; refused (it could run code)"
            raise UnsafeFileError(msg) from err
        raise ValueError(f"{what}: {path!r} is not a .npy array: {err}") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{what}: cannot read {path!r}: {err}") from err
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise ValueError(f"{what}: {path!r} is an .npz archive, expected one .npy array")
    return arr


def load_tensor_file(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name ``what`` and the path.

    Raises:
        UnsafeFileError: the file references a global that ``weights_only`` refuses.
        ValueError: the file is empty, truncated or not a torch file.
    """
    import torch

    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(f"{what}: {path!r} is refused by torch.load(weights_only=True): {err}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{what}: {path!r} is not a readable torch file: {err}") from err
