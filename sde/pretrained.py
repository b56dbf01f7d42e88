"""Pretrained diffusers models as score functions: ``score_fn, sde = from_diffusers(path)``.

A diffusers ``UNet2DModel`` (or any module with its call ``model(x, timestep, class_labels=...)``)
trained with a DDPM-family scheduler becomes a score function on the matching
:class:`~sde.sdes.DiscreteVPSDE`; a ScoreSdeVe (NCSN++) model becomes one on a
:class:`~sde.sdes.VESDE`. Time conventions (docs/pretrained.md):

- VP: diffusers' timestep n is our time t_n = (n + 1) / N. For any t the network is called at the
  continuous timestep ``t N - 1`` (UNet2DModel's sinusoidal embedding accepts non-integers); a t
  that is a tabulated t_n up to the rounding of its dtype calls it at the integer n exactly.
- VE: the network is called at the noise std of our time, ``sde.sigma(t)``; its output is the score.

diffusers is an optional extra (``pip install -e ".[diffusers]"``); it is imported only when a model
is loaded from a folder or the Hub. Weights load from safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import as_time, bcast, check_choice, shared_time
from .models import PARAMETRIZATIONS, ConditionalScore
from .sdes import SDE, VESDE, DiscreteVPSDE

__all__ = ["from_diffusers", "DiffusersScore", "scheduler_grid", "sde_from_scheduler", "VP_SCHEDULERS", "VE_SCHEDULERS",
           "PREDICTION_TYPES", "MODEL_CLASSES"]

# diffusers schedulers whose config is a DDPM beta schedule (-> DiscreteVPSDE), and the VE one (-> VESDE)
VP_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
)
VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
MODEL_CLASSES = ("UNet2DModel",)  # model classes a folder may name in its config.json


def _v_score(out: Tensor, x: Tensor, sde: SDE, t: Tensor, sigma_data: float) -> Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022); on VP alpha^2 + sigma^2 = 1 gives eps = sigma x + alpha v."""
    a, s = bcast(sde.alpha(t), x), bcast(sde.sigma(t), x)
    return PARAMETRIZATIONS["eps"](s * x + a * out, x, sde, t, sigma_data)


# diffusers' prediction_type -> (network output, x, sde, t, unused) -> score (sde.models.PARAMETRIZATIONS' form)
PREDICTION_TYPES: dict[str, Callable[[Tensor, Tensor, SDE, Tensor, float], Tensor]] = {
    "epsilon": PARAMETRIZATIONS["eps"],
    "v_prediction": _v_score,
    "sample": PARAMETRIZATIONS["x0"],
    "score": PARAMETRIZATIONS["score"],  # ScoreSdeVe models (NCSN++): the output is the score itself
}


class DiffusersScore(nn.Module):
    """A diffusers noise/score network read as ``score_fn(x, t, y=None)`` on our time axis.

    Args:
        unet: module called as ``unet(x, timestep, class_labels=y)`` returning ``.sample``, a tuple or a tensor.
        sde: a DiscreteVPSDE (the timestep is t N - 1) or a VESDE (the model input is sigma(t)).
        prediction_type: "epsilon", "v_prediction", "sample" (VP) or "score" (VE).
        null_class: the label the model reads as "no class" (label dropout); used when y is None on a
            class-conditional model, e.g. by ``cfg_score``. None: such a model needs labels.
        sample_shape: (C, H, W) the model accepts, checked on every call; None skips the check.

    Raises:
        ValueError: unknown prediction type, a prediction type that does not fit the SDE, or a null
            class on an unconditional model.
        TypeError: sde is not a DiscreteVPSDE or VESDE.
    """

    def __init__(self, unet: nn.Module, sde: SDE, prediction_type: str = "epsilon", *,
                 null_class: int | None = None, sample_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if not isinstance(sde, (DiscreteVPSDE, VESDE)):
            raise TypeError(f"sde must be a DiscreteVPSDE or a VESDE, got {type(sde).__name__}")
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if (prediction_type == "score") != isinstance(sde, VESDE):
            raise ValueError(f"prediction_type={prediction_type!r} does not fit {sde!r}: VE models predict the "
                             "score, VP models one of ['epsilon', 'sample', 'v_prediction']")
        self.unet, self.sde, self.prediction_type = unet, sde, prediction_type
        self.sample_shape = None if sample_shape is None else tuple(int(d) for d in sample_shape)
        self.num_classes = _num_class_embeds(unet)
        if null_class is not None and not (self.num_classes and 0 <= null_class < self.num_classes):
            raise ValueError(f"null_class={null_class!r} needs a class-conditional model and an id in "
                             f"[0, {self.num_classes - 1}]; this model has num_classes={self.num_classes}")
        self.null_class = null_class

    def model_time(self, t: Tensor) -> Tensor:
        """What the network is conditioned on at our time t (B,): diffusers' timestep (VP) or sigma (VE)."""
        if isinstance(self.sde, VESDE):
            return self.sde.sigma(t)
        n = self.sde.N
        u = t.to(torch.float64) * n - 1.0
        snapped = torch.round(u)
        tol = 4.0 * n * torch.finfo(t.dtype).eps  # t_n rounded to t's dtype: the integer n exactly
        return torch.where((u - snapped).abs() <= tol, snapped, u).to(t.dtype)

    def _labels(self, x: Tensor, y: int | Tensor | None) -> Tensor | None:
        if y is None:
            if self.num_classes and self.null_class is None:
                raise ValueError("this model is class-conditional: bind labels with score_fn.conditional(y) or "
                                 "cfg_score(score_fn, y, scale) (which needs from_diffusers(..., null_class=...))")
            y = self.null_class
            if y is None:
                return None
        elif not self.num_classes:
            raise ValueError(f"y={y!r} was given but the model is unconditional (no class embedding)")
        y = torch.as_tensor(y, dtype=torch.long, device=x.device)
        return y.reshape(()).expand(x.shape[0]) if y.numel() == 1 else y

    def _check_shape(self, x: Tensor) -> None:
        if self.sample_shape is not None and tuple(x.shape[1:]) != self.sample_shape:
            want = ", ".join(map(str, self.sample_shape))
            raise ValueError(f"x has shape {tuple(x.shape)}, but the model takes (B, {want})"
                             " (its in_channels and sample_size)")

    def forward(self, x: Tensor, t: float | Tensor, y: int | Tensor | None = None) -> Tensor:
        """The score at (x, t), conditioned on class ids y (None: unconditional / the null class)."""
        self._check_shape(x)
        t = as_time(t, x, self.sde.T)
        tc = shared_time(t)  # one time for the batch: the schedule terms are computed once
        labels = self._labels(x, y)
        cond = self.model_time(tc).expand(t.shape)
        out = self.unet(x, cond) if labels is None else self.unet(x, cond, class_labels=labels)
        out = _output_tensor(out, x)
        return PREDICTION_TYPES[self.prediction_type](out, x, self.sde, tc, 1.0)

    def denoise(self, x: Tensor, t: float | Tensor, y: int | Tensor | None = None) -> Tensor:
        """E[x_0 | x_t = x] by Tweedie's formula (sde.flow.tweedie)."""
        from .flow import tweedie

        t = as_time(t, x, self.sde.T)
        return tweedie(self.sde, x, t, self(x, t, y))

    def conditional(self, y: int | Tensor | None) -> ConditionalScore:
        """A ``score_fn(x, t)`` with class id(s) y bound (an int is used for the whole batch)."""
        return ConditionalScore(self, y)


def _num_class_embeds(unet: nn.Module) -> int:
    config = getattr(unet, "config", None)
    n = getattr(config, "num_class_embeds", None) if config is not None else None
    return int(n) if n else 0


def _output_tensor(out: Any, x: Tensor) -> Tensor:
    """The prediction tensor of a model call: ``.sample``, a tuple's first item or the tensor; a learned
    variance (twice the channels, diffusers' "learned"/"learned_range") is dropped."""
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]
    if out.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    return out


# -- schedulers -> SDEs ----------------------------------------------------------------------------
def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A plain config dict (with ``_class_name``) from a scheduler object, a dict or a folder / json file."""
    if isinstance(scheduler, dict):
        return dict(scheduler)
    if isinstance(scheduler, (str, os.PathLike)):
        p = Path(scheduler)
        p = p / "scheduler_config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"scheduler={str(scheduler)!r}: no scheduler_config.json there")
        return json.loads(p.read_text())
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError("scheduler must be a diffusers scheduler, a config dict or a folder, "
                        f"got {type(scheduler).__name__}")
    return {**dict(config), "_class_name": type(scheduler).__name__}


def _scheduler_class(config: dict[str, Any]) -> str:
    name = config.get("_class_name")
    supported = VP_SCHEDULERS + VE_SCHEDULERS
    if name not in supported:
        raise ValueError(f"scheduler class {name!r} is not supported; supported: {list(supported)}")
    return name


def sde_from_scheduler(scheduler: Any) -> tuple[SDE, str]:
    """The SDE and prediction type of a diffusers scheduler (object, config dict or folder).

    Args:
        scheduler: a diffusers scheduler, its config dict (with ``_class_name``) or a folder holding
            scheduler_config.json.

    Returns:
        (DiscreteVPSDE from its alphas_cumprod, its prediction_type) for DDPM-family schedulers;
        (VESDE(sigma_min, sigma_max, N=num_train_timesteps), "score") for ScoreSdeVeScheduler.

    Raises:
        ValueError: an unsupported scheduler class (the supported ones are listed), an unknown prediction
            type, or a zero-terminal-SNR schedule.
    """
    config = _scheduler_config(scheduler)
    name = _scheduler_class(config)
    if name in VE_SCHEDULERS:
        return VESDE(float(config.get("sigma_min", 0.01)), float(config.get("sigma_max", 1348.0)),
                     N=int(config.get("num_train_timesteps", 2000))), "score"
    prediction = config.get("prediction_type", "epsilon")
    check_choice("prediction_type", prediction, [k for k in PREDICTION_TYPES if k != "score"])
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:  # build the scheduler (a class from the allow-list above) for its own float32 table
        import diffusers

        ac = getattr(diffusers, name).from_config(config).alphas_cumprod
    return DiscreteVPSDE.from_alphas_cumprod(ac), prediction


def scheduler_grid(scheduler: Any, sde: SDE) -> dict[str, Any]:
    """Sampler options that put our samplers on a configured diffusers scheduler's timesteps.

    Call ``scheduler.set_timesteps(n)`` first. VP: timestep n -> t_n = (n + 1) / N; the last step goes to
    alphas_cumprod = 1 (DDPM; DDIM with set_alpha_to_one; DPM-Solver / UniPC with final_sigmas_type "zero"),
    which is our final Tweedie denoise, or to alphas_cumprod[0] (t = 1/N, no denoise). VE
    (ScoreSdeVeScheduler): its discrete sigmas sigma_k map to the t with sde.sigma(t) = sigma_k, and its last
    step (to noise 0, returning the mean) is our final denoise.

    Args:
        scheduler: a diffusers scheduler after ``set_timesteps``.
        sde: the SDE ``from_diffusers`` returned for it.

    Returns:
        ``{"grid": [t_0, ...], "denoise_final": bool}`` to pass to a sampler.

    Raises:
        ValueError: the scheduler has no timesteps yet.
    """
    if getattr(scheduler, "timesteps", None) is None:
        raise ValueError("scheduler has no timesteps: call scheduler.set_timesteps(num_inference_steps) first")
    if isinstance(sde, VESDE):
        sig = scheduler.discrete_sigmas.to(torch.float64).flip(0)
        ts = sde.t_from_log_snr(-2.0 * torch.log(sig)).clamp(max=sde.T)
        return {"grid": ts.tolist(), "denoise_final": True}
    steps = [int(n) for n in scheduler.timesteps]
    grid = [(n + 1) / sde.N for n in steps]
    config = scheduler.config
    final_to_one = config.get("set_alpha_to_one", True) and config.get("final_sigmas_type", "zero") == "zero"
    if not final_to_one and steps[-1] != 0:
        grid.append(1.0 / sde.N)
    return {"grid": grid, "denoise_final": bool(final_to_one)}


# -- loading ---------------------------------------------------------------------------------------
def _local_layout(root: Path, subfolder: str | None) -> tuple[Path, Path | None]:
    """(model folder, scheduler folder or None) of a save_pretrained folder."""
    if subfolder is not None:
        model_dir = root / subfolder
    elif (root / "unet" / "config.json").is_file():
        model_dir = root / "unet"
    else:
        model_dir = root
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{str(root)!r} holds no diffusers model: expected {str(model_dir / 'config.json')!r} "
                                "(a pipeline folder with unet/ and scheduler/, or a model folder from save_pretrained)")
    for cand in (root / "scheduler", root, model_dir):
        if (cand / "scheduler_config.json").is_file():
            return model_dir, cand
    return model_dir, None


def _load_local_model(model_dir: Path) -> nn.Module:
    import diffusers

    name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    check_choice("model class (config.json _class_name)", name, MODEL_CLASSES)
    return getattr(diffusers, name).from_pretrained(model_dir, use_safetensors=True)


def _load(path_or_model: Any, scheduler: Any, subfolder: str | None, hub_kwargs: dict[str, Any]):
    """(model, scheduler source) for a module, a local folder or a Hub id."""
    if isinstance(path_or_model, nn.Module):
        if scheduler is None:
            raise ValueError("from_diffusers(model) needs scheduler=... (a scheduler, its config dict or folder)")
        return path_or_model, scheduler
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise TypeError(f"path_or_model must be a folder, a Hub id or an nn.Module, got {type(path_or_model).__name__}")
    root = Path(path_or_model).expanduser()
    if root.is_dir():
        model_dir, sched_dir = _local_layout(root, subfolder)
        if scheduler is None and sched_dir is None:
            raise FileNotFoundError(f"{str(root)!r} holds no scheduler_config.json (looked in scheduler/, the folder "
                                    "and the model folder); pass scheduler=...")
        return _load_local_model(model_dir), scheduler if scheduler is not None else sched_dir
    if root.exists() or str(path_or_model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"path_or_model={str(path_or_model)!r} is not a folder")
    import diffusers  # a Hub id: diffusers' own from_pretrained (needs network or its cache)

    repo = str(path_or_model)
    model = diffusers.UNet2DModel.from_pretrained(repo, subfolder=subfolder or "unet", use_safetensors=True,
                                                  **hub_kwargs)
    if scheduler is None:
        scheduler = diffusers.DDPMScheduler.load_config(repo, subfolder="scheduler", **hub_kwargs)
    return model, scheduler


def from_diffusers(
    path_or_model: str | os.PathLike | nn.Module,
    *,
    scheduler: Any = None,
    subfolder: str | None = None,
    prediction_type: str | None = None,
    null_class: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **hub_kwargs: Any,
) -> tuple[DiffusersScore, SDE]:
    """Load a diffusers UNet2DModel as a score function with its matching SDE.

    Args:
        path_or_model: a local folder in save_pretrained layout (a pipeline folder with unet/ and
            scheduler/, or a model folder), a Hub id (passed to diffusers' from_pretrained with
            ``use_safetensors=True``), or a model object (then ``scheduler`` is required).
        scheduler: a diffusers scheduler, its config dict or a folder with scheduler_config.json; default:
            the one saved with the model. Its class picks the SDE (DiscreteVPSDE for the DDPM family,
            VESDE for ScoreSdeVeScheduler).
        subfolder: the model's subfolder inside the folder / Hub repo (default "unet" when present).
        prediction_type: override the scheduler's prediction_type ("epsilon", "v_prediction", "sample").
        null_class: the class id a label-dropout model reads as "unconditional" (for cfg_score).
        device: move the model there (default: where it loaded, the CPU).
        dtype: cast the model's weights (default: as saved).
        **hub_kwargs: passed to diffusers' from_pretrained / load_config for Hub ids (revision, cache_dir,
            local_files_only, token, ...).

    Returns:
        (score_fn, sde): a :class:`DiffusersScore` (``score_fn(x, t, y=None)``, with ``denoise`` and
        ``conditional``) in eval mode without gradients, and the SDE of its scheduler.

    Raises:
        FileNotFoundError: a folder without a model or a scheduler.
        ValueError: an unsupported scheduler or model class, or an unknown prediction type.
        TypeError: path_or_model of another kind.
    """
    model, sched = _load(path_or_model, scheduler, subfolder, hub_kwargs)
    sde, pred = sde_from_scheduler(sched)
    if prediction_type is not None:
        if isinstance(sde, VESDE):
            raise ValueError(f"prediction_type={prediction_type!r}: a ScoreSdeVe model's output is the score")
        pred = check_choice("prediction_type", prediction_type, [k for k in PREDICTION_TYPES if k != "score"])
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return DiffusersScore(model, sde, pred, null_class=null_class, sample_shape=_sample_shape(model)), sde


def _sample_shape(model: nn.Module) -> tuple[int, ...] | None:
    config = getattr(model, "config", None)
    size, ch = getattr(config, "sample_size", None), getattr(config, "in_channels", None)
    if size is None or ch is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return (int(ch), *map(int, hw)) if isinstance(hw, Sequence) else None
