"""Learning-rate schedules: a linear warm-up, then a decay over the run's progress.

The schedule is a pure function of the 1-based step and of the fraction of the run already done
(``progress`` in [0, 1]); no scheduler object counts steps. The Trainer's progress is
``step / total_steps`` unless ``fit(progress=...)`` says otherwise, e.g. the spent fraction of a CPU-time
budget (experiments/bench_train_digits.py), so a run that ends on a budget still decays to its end.

Decays (``LR_DECAYS``, a multiplier f(p) with f(0) = 1):

    constant  f = 1                              (Song et al. 2021: warm-up, then a constant rate)
    cosine    f = (1 + cos(pi p)) / 2            (Loshchilov & Hutter 2017, SGDR, one cycle without restarts)
    linear    f = 1 - p

The rate of step s is ``lr * min(1, s / warmup_steps) * (final_ratio + (1 - final_ratio) f(p))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._checks import check_choice, check_half_open, check_int

# name -> f(progress), the decay multiplier: 1 at the start of the run; cosine and linear reach 0 at its end
LR_DECAYS: dict[str, Callable[[float], float]] = {
    "constant": lambda p: 1.0,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
}


def check_lr_decay(decay: str, final_ratio: float, prefix: str = "") -> None:
    """Validate a (decay, final_ratio) pair; ``prefix`` is prepended to the names in messages ("lr_" for TrainConfig).

    Raises:
        ValueError: decay not in ``LR_DECAYS``, final_ratio outside [0, 1), or non-zero with "constant".
    """
    check_choice(f"{prefix}decay", decay, LR_DECAYS)
    check_half_open(f"{prefix}final_ratio", final_ratio, 0.0, 1.0)
    if decay == "constant" and final_ratio != 0:
        raise ValueError(f"{prefix}final_ratio={final_ratio!r} has no effect with {prefix}decay='constant'; "
                         "use 'cosine' or 'linear'")


def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): ``lr * min(1, step / warmup_steps)``."""
    check_int("step", step, 1)
    return lr if warmup_steps == 0 else lr * min(1.0, step / warmup_steps)


def scheduled_lr(step: int, lr: float, warmup_steps: int, *, decay: str = "constant", progress: float = 0.0,
                 final_ratio: float = 0.0) -> float:
    """Learning rate of step ``step``: the linear warm-up times the decay at ``progress``.

    Args:
        step: the optimizer step, 1-based.
        lr: the peak learning rate.
        warmup_steps: steps of the linear warm-up (0 = none).
        decay: a name in ``LR_DECAYS`` ("constant", "cosine", "linear").
        progress: the fraction of the run done before this step, in [0, 1] (clamped to 1 above it: a
            budget may be overrun by the last step).
        final_ratio: the rate at progress 1 as a fraction of ``lr``, in [0, 1); must be 0 with "constant"
            (which has no end value to set).

    Returns:
        ``lr * min(1, step / warmup_steps) * (final_ratio + (1 - final_ratio) * LR_DECAYS[decay](progress))``.

    Raises:
        ValueError: unknown decay, step < 1, progress < 0 or not a number, final_ratio outside [0, 1) or
            non-zero with "constant".
    """
    check_lr_decay(decay, final_ratio)
    if not isinstance(progress, (int, float)) or isinstance(progress, bool) or not progress >= 0:
        raise ValueError(f"progress must be a fraction of the run >= 0, got {progress!r}")
    multiplier = final_ratio + (1.0 - final_ratio) * LR_DECAYS[decay](min(float(progress), 1.0))
    return warmup_lr(step, lr, warmup_steps) * multiplier
