"""Argument validation shared by the public entry points.

Checks run at entry points only (constructors, ``sample``, ``log_likelihood``): a value
check that forces a host sync on every solver step would cost more than the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError listing them."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(allowed)}")
    return value


def check_positive(name: str, value: float) -> float:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """Raise unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_callable(name: str, value: Any, what: str) -> Any:
    """Raise TypeError unless ``value`` is callable; ``what`` shows the expected call, e.g. "score_fn(x, t)"."""
    if not callable(value):
        raise TypeError(f"{name} must be callable as {what}, got {type(value).__name__} ({value!r:.60})")
    return value


def check_sde(value: Any, name: str = "sde") -> Any:
    """Raise TypeError unless ``value`` is an ``sde.sdes.SDE`` instance (not a name, not a class)."""
    from .sdes import SDE  # lazy: sdes imports this module

    if not isinstance(value, SDE):
        hint = " (build one, e.g. sde.VPSDE(); the apps resolve names from configs)" if isinstance(value, str) else ""
        raise TypeError(f"{name} must be an SDE instance (VPSDE, SubVPSDE, VESDE, ...), got "
                        f"{type(value).__name__} ({value!r:.60}){hint}")
    return value


def check_all_finite(name: str, value: Tensor, *, sync: bool = True) -> Tensor:
    """Raise ValueError if ``value`` holds NaN or inf. With ``sync=False`` the check runs only for
    CPU tensors (it would cost a device sync elsewhere): use that on per-step paths."""
    if not sync and value.device.type != "cpu":
        return value
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} holds {bad} non-finite (NaN or inf) values of {value.numel()}; "
                         f"finite values are required")
    return value


def check_output_shape(name: str, out: Any, x: Tensor) -> Tensor:
    """Raise unless ``out`` (what ``name`` returned for ``x``) is a tensor shaped like ``x``.

    Metadata only (no device sync); callers run it once, on the first output."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a torch.Tensor shaped like x, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
                         "it must return a tensor shaped like x (a smaller shape would broadcast silently)")
    return out


def check_int(name: str, value: Any, minimum: int) -> int:
    """Raise unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_open_interval(name: str, value: float, low: float, high: float) -> float:
    """Raise ValueError unless ``low < value < high``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low < value < high):
        raise ValueError(f"{name} must lie in the open interval ({low}, {high}), got {value!r}")
    return float(value)


def check_half_open(name: str, value: float, low: float, high: float) -> float:
    """Raise ValueError unless ``low <= value < high`` (NaN is outside every interval)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (low <= value < high):
        raise ValueError(f"{name} must lie in [{low}, {high}), got {value!r}")
    return float(value)


def check_tensor(name: str, value: Any, min_dim: int = 1) -> Tensor:
    """Raise TypeError unless ``value`` is a floating-point tensor with >= ``min_dim`` dims."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims (batch first), got shape {tuple(value.shape)}")
    return value


def check_covariance(name: str, cov: Tensor, *, rel_tol: float, floor: float = 0.0,
                     floor_name: str = "0") -> tuple[Tensor, Tensor]:
    """Check finite (..., D, D) covariances: symmetric to ``rel_tol`` times the largest entry, every
    eigenvalue > ``floor`` (named ``floor_name`` in the message); return ``torch.linalg.eigh(cov)``.

    Raises:
        ValueError: non-finite entries, an asymmetry above the tolerance, or an eigenvalue <= floor.
    """
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(cov)).sum())} non-finite entries")
    asym = (cov - cov.transpose(-1, -2)).abs().max().item()
    if asym > rel_tol * max(cov.abs().max().item(), 1e-300):
        raise ValueError(f"{name} must be symmetric, got max |C - C^T| = {asym:.3g}")
    evals, evecs = torch.linalg.eigh(cov)
    low = evals.min().item()
    if not low > floor:
        raise ValueError(f"{name} must be positive definite with eigenvalues > {floor_name}, got smallest "
                         f"eigenvalue {low:.3g}")
    return evals, evecs


def as_time(t: float | Tensor, like: Tensor, T: float, *, batch: int | None = None) -> Tensor:
    """Turn ``t`` (a float, a 0-d tensor or a (B,) tensor) into a (B,) tensor like ``like``.

    ``batch`` defaults to ``like.shape[0]``. A range check against [0, T] runs when it
    costs no device sync (Python floats and CPU tensors).

    Raises:
        ValueError: ``t`` has the wrong shape or lies outside [0, T].
    """
    if batch is None:
        batch = like.shape[0] if like.dim() > 0 else 1
    if isinstance(t, Tensor):
        if t.dim() == 0:
            t = t.reshape(1).expand(batch)
        elif t.dim() != 1 or t.shape[0] not in (1, batch):
            raise ValueError(f"t must be a float or a tensor of shape ({batch},), got shape {tuple(t.shape)}")
        if t.device.type == "cpu":  # checked where it lives: free for a CPU t, even when x is on a GPU
            _check_time_values(shared_time(t), T)
        dtype = like.dtype if like.is_floating_point() else t.dtype
        if t.shape[0] == 1 or shared_time(t) is not t:  # one time for the batch: convert it once, keep the view
            return t[:1].to(device=like.device, dtype=dtype).expand(batch)
        return t.to(device=like.device, dtype=dtype)
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise TypeError(f"t must be a float or a Tensor, got {type(t).__name__}")
    if not (0.0 <= t <= T * (1 + 1e-6)):
        raise ValueError(f"t must lie in [0, {T}], got {t}")
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return torch.full((1,), float(t), device=like.device, dtype=dtype).expand(batch)


def _check_time_values(t: Tensor, T: float) -> None:
    """Range and NaN check of a CPU time tensor (one element when the batch shares it)."""
    if bool(((t >= 0) & (t <= T * (1 + 1e-6))).all()):  # NaN fails both comparisons
        return
    tf = t.double()
    nan = torch.isnan(tf)
    if bool(nan.any()):
        raise ValueError(f"t holds NaN ({int(nan.sum())} of {t.numel()} values); times must lie in [0, {T}]")
    raise ValueError(f"t must lie in [0, {T}], got values in [{tf.min().item():.4g}, {tf.max().item():.4g}]")


def shared_time(t: Tensor) -> Tensor:
    """``t[:1]`` when a (B,) time tensor is one element viewed B times (stride 0), else ``t``.

    Samplers and the likelihood ODE pass one time for the whole batch as such a view (see
    ``as_time``), so score models can compute time-only terms (alpha, sigma, the noise
    embedding and its projections) once per call instead of once per row; they broadcast back.
    A materialized (B,) tensor is never inspected by value (that would cost a device sync).
    """
    return t[:1] if t.dim() == 1 and t.shape[0] > 1 and t.stride(0) == 0 else t


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """View a (B,) tensor so that it broadcasts against a batch-first ``x``."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))
