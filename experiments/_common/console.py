"""What a person sees: progress bars in a terminal, the same information in the run folder's log.

``progress: auto | true | false`` (every app's config) turns the library's tqdm bars on (the Trainer's
``TrainConfig.progress``, the samplers' and likelihood functions' ``progress=``): ``auto`` shows them
when both stdout and stderr are terminals, so a job piped to a file, a CI log or a SLURM output file
stays quiet. Whatever the bars show is also logged through Python logging, which Hydra's job logging
sends to ``<run folder>/<app>.log`` (``train.log``, ``sample.log``, ...): the console gets the log
lines only while no bar shows the same thing, the file always gets them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["PROGRESS_CHOICES", "progress_enabled", "log", "file_log", "report"]

PROGRESS_CHOICES = ("auto", "true", "false")
log = logging.getLogger("score_sde")  # console + the run's log file (Hydra's job logging on the root logger)
_FILE_LOG = "score_sde.file"  # the run's log file only


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_enabled(value: Any, key: str = "progress") -> bool:
    """Whether bars are shown for the config value ``value`` of ``key``.

    Args:
        value: ``auto`` (bars when stdout and stderr are terminals), ``true`` or ``false`` (YAML booleans
            or strings).
        key: the config key, for the error message.

    Raises:
        ValueError: any other value.
    """
    text = str(value).lower()
    if text not in PROGRESS_CHOICES:
        raise ValueError(f"{key}={value!r} is not supported; choose one of {list(PROGRESS_CHOICES)} "
                         "(auto: bars when stdout and stderr are terminals)")
    if text == "auto":
        return _is_terminal(sys.stdout) and _is_terminal(sys.stderr)
    return text == "true"


def file_log() -> logging.Logger:
    """A logger writing only to the run's log file(s): the FileHandlers Hydra's job logging put on the root logger.

    Refreshed on every call, so that each job of a multirun in one process writes its own file.
    """
    logger = logging.getLogger(_FILE_LOG)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return logger


def report(message: str, *args: Any, console: bool = True) -> None:
    """Log ``message % args`` at INFO to the run's log file, and to the console too when ``console``."""
    (log if console else file_log()).info(message, *args)
