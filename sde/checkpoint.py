"""The one checkpoint module: the file format, atomic writes, safe loads, and rebuilding a model from a file.

Every checkpoint the project writes (the Trainer's ``latest.pt`` / ``best.pt`` / ``step_XXXXXXXX.pt``,
experiments/train.py's ``checkpoint.pt``) is one dict of tensors and primitive containers:

=================  ===========================================================================
``format``         :data:`CHECKPOINT_FORMAT` (1)
``step``           optimizer steps taken
``model``          ``state_dict`` of the trained model (a :class:`~sde.models.ScoreModel` in the apps)
``ema``            ``state_dict`` of the EMA model (same keys)
``optimizer``      AdamW ``state_dict``; ``scheduler``: the (stateless) LR schedule, for readers
``config``         :class:`~sde.training.TrainConfig` as primitives
``model_config``   the plain description the model is rebuilt from: ``{"sde", "model", "data"}``
``rng``            every RNG state, per rank (exact resume)
``best_value``, ``eval_metrics``, ``metrics`` (train.py's final metrics; absent in Trainer files)
=================  ===========================================================================

Loading never runs code chosen by the file: ``torch.load(..., weights_only=True)`` admits only
tensors and primitives, and :func:`load_score_model` rebuilds the SDE, network and data
description from plain fields through the registries below. A ``_target_`` string (the Hydra
spelling the configs in conf/ use) is looked up among the registered classes, never imported.
Anything else is refused with a :class:`CheckpointSpecError` naming the key.

Registries (add one line to register a new class):

- :data:`SDES` -- name -> SDE class (``vp``, ``subvp``, ``ve``),
- :data:`sde.nets.NETS` -- name -> network class (``mlp``, ``unet``),
- :data:`DATA_LOADERS` -- name -> data-set loader (``load_dataset``),
- :data:`sde.models.PARAMETRIZATIONS` -- checked by :class:`~sde.models.ScoreModel`.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_write, remove_stale_temp_files
from .data import load_dataset
from .models import ScoreModel
from .nets import MLP, NETS
from .sdes import SDE, VESDE, VPSDE, FlowSDE, SubVPSDE

__all__ = [
    "CHECKPOINT_FORMAT", "SDES", "DATA_LOADERS", "CheckpointError", "CheckpointSpecError",
    "CheckpointMismatchError", "save_checkpoint", "load_checkpoint", "CheckpointManager", "capture_rng_state",
    "restore_rng_state", "diff_dicts", "check_state_dict_compatible", "build_sde", "build_net",
    "build_score_model", "build_data", "model_spec", "LoadedModel", "load_score_model", "Flatten",
]  # fmt: skip

CHECKPOINT_FORMAT = 1

# name -> SDE class. Register a new SDE with one line (e.g. "flow": FlowSDE).
SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "flow": FlowSDE}
# name -> data-set loader called as loader(**fields, split=...).
DATA_LOADERS: dict[str, Callable[..., Any]] = {"load_dataset": load_dataset}

_SCALARS = (bool, int, float, str, type(None))
_HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (missing pieces, corrupt, or not weights-only)."""


class CheckpointSpecError(CheckpointError):
    """A model description names something the project does not register (nothing was called)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not belong to the model/run it is loaded into."""


# ----------------------------------------------------------------------------- files
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Serialise ``state`` with ``torch.save`` and write it atomically (:func:`sde._io.atomic_write`)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no code in the file can run).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupt, holds anything but tensors and primitive
            containers (e.g. a pickled object), or is not a dict; the message names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded as weights-only data "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


class CheckpointManager:
    """Keeps ``latest.pt``, ``best.pt`` (lowest eval metric) and ``step_XXXXXXXX.pt`` every k steps.

    Args:
        directory: where checkpoints live (created on first save).
        keep_every: also keep a permanent copy every this many steps (0: never).

    Stale temporary files left by a killed writer are removed on construction.
    """

    LATEST = "latest.pt"
    BEST = "best.pt"

    def __init__(self, directory: str | Path, keep_every: int = 0) -> None:
        self.directory = Path(directory)
        self.keep_every = int(keep_every)
        remove_stale_temp_files(self.directory)

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
        targets = [self.latest]
        if is_best:
            targets.append(self.best)
        if self.keep_every and step % self.keep_every == 0:
            targets.append(self.step_path(step))
        for target in targets:
            atomic_write(target, data)
        return targets


# ----------------------------------------------------------------------------- RNG and comparisons
def capture_rng_state(noise_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the loop may touch, as tensors and primitives (``weights_only``-safe)."""
    np_state = np.random.get_state()
    return {
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_prim, np_state[2:])],
        "noise": noise_generator.get_state() if noise_generator is not None else None,
    }


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


def diff_dicts(saved: Mapping[str, Any], current: Mapping[str, Any], *, labels: tuple[str, str] = ("checkpoint",
               "current")) -> list[str]:
    """Dotted keys whose values differ between two (nested) dicts of primitives, as readable strings.

    Args:
        saved: the stored values.
        current: the values asked for now.
        labels: how the two sides are named in the messages.

    Returns:
        ``"key: checkpoint=a current=b"`` lines, sorted by key (nested dicts give dotted keys).
    """
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if _norm(va) != _norm(vb):
            out.append(f"{key}: {labels[0]}={va!r} {labels[1]}={vb!r}")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d} if prefix else {}


def _norm(v: Any) -> Any:
    return list(map(_norm, v)) if isinstance(v, (list, tuple)) else v


def check_state_dict_compatible(saved: dict[str, Tensor], model: nn.Module, what: str = "model") -> None:
    """Raise :class:`CheckpointMismatchError` naming missing, unexpected and reshaped keys."""
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in sorted(set(saved) & set(current))
        if saved[k].shape != current[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"missing from checkpoint: {missing}")
    if unexpected:
        parts.append(f"not in the model: {unexpected}")
    if reshaped:
        parts.append(f"different shapes: {reshaped}")
    if parts:
        raise CheckpointMismatchError(f"{what} checkpoint does not match the {what}: " + "; ".join(parts))


# ----------------------------------------------------------------------------- rebuilding from plain fields
def _plain(value: Any, key: str) -> Any:
    """``value`` if it is primitives all the way down (no Hydra construction keys), else refuse naming ``key``."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        for k in value:
            if k in _HYDRA_KEYS:
                raise CheckpointSpecError(f"{key}.{k}={value[k]!r}: a nested object to construct is not allowed "
                                          "here; only plain numbers, strings and lists")
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    raise CheckpointSpecError(f"{key} is a {type(value).__name__}; only plain numbers, strings and lists are allowed")


def _spellings(name: str, obj: Any) -> set[str]:
    """Names a registered ``obj`` may be given by: its registry key and its import paths (never imported)."""
    qual = getattr(obj, "__qualname__", getattr(obj, "__name__", name))
    module = getattr(obj, "__module__", "")
    package = module.rsplit(".", 1)[0] if "." in module else module
    return {name, f"{module}.{qual}", f"{package}.{qual}"}


def _lookup(registry: Mapping[str, Any], spec: Any, key: str, what: str) -> tuple[Any, dict[str, Any]]:
    """(registered object, plain keyword arguments) for ``spec`` = ``{"name" | "_target_": ..., **kwargs}``."""
    if not isinstance(spec, Mapping):
        raise CheckpointSpecError(f"{key} must be a mapping naming a registered {what}, got {type(spec).__name__}")
    spec = dict(spec)
    field = "_target_" if "_target_" in spec else "name"
    chosen = spec.pop(field, None)
    for extra in _HYDRA_KEYS[1:]:
        if extra in spec:
            raise CheckpointSpecError(f"{key}.{extra} is not allowed (objects are built from plain fields only)")
    for name, obj in registry.items():
        if isinstance(chosen, str) and chosen in _spellings(name, obj):
            return obj, _plain(spec, key)
    raise CheckpointSpecError(f"{key}.{field}={chosen!r} is not a registered {what}; allowed: {sorted(registry)} "
                              f"(or their import paths, e.g. {sorted(_spellings(*next(iter(registry.items()))))[0]!r})")


def build_sde(spec: Mapping[str, Any], *, key: str = "sde") -> SDE:
    """The SDE a plain description names: ``{"_target_": "sde.sdes.VPSDE" | "name": "vp", **arguments}``.

    Args:
        spec: the description (a conf/sde/*.yaml node as a dict).
        key: how error messages name the description.

    Returns:
        The SDE, built through :data:`SDES`.

    Raises:
        CheckpointSpecError: the name is not in :data:`SDES`, or an argument is not plain data.
    """
    cls, kwargs = _lookup(SDES, spec, key, "SDE")
    return cls(**kwargs)


def build_net(spec: Mapping[str, Any], *, key: str = "model.net") -> nn.Module:
    """The network a plain description names (``{"_target_": "sde.nets.MLP" | "name": "mlp", ...}``) via NETS.

    Args:
        spec: the description (the ``net`` node of conf/model/*.yaml).
        key: how error messages name the description.

    Returns:
        The freshly initialised network.

    Raises:
        CheckpointSpecError: the name is not in :data:`sde.nets.NETS`, or an argument is not plain data.
    """
    cls, kwargs = _lookup(NETS, spec, key, "network")
    return cls(**kwargs)


class Flatten(nn.Module):
    """Run a vector network (B, D) on image batches (B, C, H, W): flatten in, reshape out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_classes = getattr(net, "num_classes", 0)  # guidance checks it on the outer net

    def forward(self, x: Tensor, noise_label: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x.flatten(1), noise_label, y).view_as(x)


def build_score_model(spec: Mapping[str, Any], sde: SDE, data_shape: Any = None) -> ScoreModel:
    """``ScoreModel(net, sde, parametrization)`` for a model description ``{"net": {...}, "parametrization": ...}``.

    Args:
        spec: the description (conf/model/*.yaml as a dict); keys besides ``net`` go to ScoreModel.
        sde: the SDE the model belongs to.
        data_shape: one sample's shape; a vector network (MLP) on images is wrapped in :class:`Flatten`.

    Returns:
        The model (untrained weights).

    Raises:
        CheckpointSpecError: no ``net``, an unregistered network, or non-plain arguments.
    """
    if not isinstance(spec, Mapping) or "net" not in spec:
        raise CheckpointSpecError(f"model must be a mapping with a 'net' description, got {spec!r:.200}")
    options = _plain({k: v for k, v in spec.items() if k != "net"}, "model")
    net = build_net(spec["net"])
    if data_shape is not None and len(data_shape) > 1 and isinstance(net, MLP):
        net = Flatten(net)
    return ScoreModel(net, sde, **options)


def build_data(spec: Mapping[str, Any], **kwargs: Any) -> Any:
    """Load the data set a data description names (its ``loader`` node) through :data:`DATA_LOADERS`.

    Args:
        spec: the description (conf/data/*.yaml as a dict) with a ``loader`` node.
        **kwargs: extra loader arguments chosen by the caller (e.g. ``split``).

    Returns:
        What the loader returns (an :class:`~sde.data.ArrayDataset`).

    Raises:
        CheckpointSpecError: no loader, an unregistered loader, or non-plain arguments.
    """
    loader = spec.get("loader") if isinstance(spec, Mapping) else None
    if loader is None:
        raise CheckpointSpecError(f"data must be a mapping with a 'loader' node, got {spec!r:.200}")
    fn, fields = _lookup(DATA_LOADERS, loader, "data.loader", "data loader")
    return fn(**fields, **kwargs)


def model_spec(state: Mapping[str, Any], path: str | Path = "<checkpoint>") -> dict[str, Any]:
    """The ``{"sde", "model", "data"}`` description a checkpoint's model is rebuilt from.

    Reads ``model_config`` (format 1) and, for files written before the formats were merged,
    the ``config`` of experiments/train.py's old ``checkpoint.pt``.

    Raises:
        CheckpointError: the checkpoint has no such description (e.g. a bare Trainer run whose
            ``model_config`` did not describe an sde/model/data).
    """
    for field in ("model_config", "config"):
        spec = state.get(field)
        if isinstance(spec, Mapping) and all(k in spec for k in ("sde", "model", "data")):
            return {k: spec[k] for k in ("sde", "model", "data")}
    raise CheckpointError(f"checkpoint {str(path)!r} does not describe its model (no model_config with sde, model "
                          "and data); checkpoints written by experiments/train.py or a Trainer given "
                          "model_config={'sde': ..., 'model': ..., 'data': ...} do")


@dataclass(frozen=True)
class LoadedModel:
    """A score model rebuilt from a checkpoint (see :func:`load_score_model`)."""

    model: ScoreModel  # eval mode, no gradients
    sde: SDE
    spec: dict[str, Any]  # {"sde", "model", "data"} plain descriptions
    state: dict[str, Any]  # the whole checkpoint dict
    path: Path
    weights: str  # "ema" or "model": which weights were loaded


def load_score_model(path: str | Path, *, device: Any = "cpu", dtype: torch.dtype | None = None,
                     ema: bool = True) -> LoadedModel:
    """Rebuild the score model of any project checkpoint (Trainer file or train.py's checkpoint.pt).

    Args:
        path: the checkpoint file.
        device: where the model goes (also ``map_location``).
        dtype: the model's dtype (None keeps the stored one).
        ema: load the EMA weights when the checkpoint has them (else the raw weights).

    Returns:
        :class:`LoadedModel`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError / CheckpointSpecError: unreadable file, no description, or a description
            naming anything outside the project's registries (nothing is called).
        CheckpointMismatchError: the stored weights do not fit the described model.
    """
    state = load_checkpoint(path, map_location=device)
    spec = model_spec(state, path)
    sde = build_sde(spec["sde"])
    data_shape = spec["data"].get("shape") if isinstance(spec["data"], Mapping) else None
    model = build_score_model(spec["model"], sde, data_shape)
    weights = "ema" if ema and state.get("ema") is not None else "model"
    if not isinstance(state.get(weights), Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} has no {weights!r} weights")
    check_state_dict_compatible(state[weights], model)
    model.load_state_dict(state[weights])
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(model=model, sde=sde, spec=spec, state=state, path=Path(path), weights=weights)
