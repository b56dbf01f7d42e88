"""Controllable generation with a trained score model (Song et al. 2021, sec. 5): guidance, inverse
problems and latent interpolation, each with any registered sampler.

    python experiments/controllable.py score.path=<train run>/checkpoint.pt control=inpaint control.mask=centre_box
    python experiments/controllable.py score.path=<ckpt> control=super_resolve control.factor=2 sampler=pc
    python experiments/controllable.py score.path=<conditional ckpt> control=cfg control.scale=3
    python experiments/controllable.py score.path=<ckpt> control=classifier_guidance classifier_path=<run>/classifier.pt
    python experiments/controllable.py score.path=<ckpt> control=interpolate control.steps=10
    python experiments/controllable.py score.path=<ckpt> control=inpaint control.method=smc control.particles=32
    python experiments/controllable.py score.path=<ckpt> control=edit control.t0=0.4 control.guide=coarse

Writes into its run folder: <control>.png (rows: ground truth, observation, mask, result for inverse
problems; one row per pair for interpolation; the generated grid for guidance), results.pt (the tensors,
written atomically), metrics.json (measurement-consistency error, error to the ground truth, or for
guidance on digits the digits classifier's accuracy on the requested classes) and a summary table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from _common import load_data, plots
from _common.app import run_task
from _common.models import ScoreSource, build_sde, config_diff, score_source
from _common.sampling import draw
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn import functional as F

from sde.checkpoint import load_checkpoint, save_checkpoint
from sde.data import load_array

MASK_PRESETS = ("left_half", "right_half", "top_half", "centre_box", "random")


@dataclass(frozen=True)
class Job:
    """What every control runner gets besides the config: the score model and where to run."""

    source: ScoreSource  # the checkpoint's model, SDE and data description
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    images: Tensor | None = None  # the first num_images test images (inverse problems, interpolation)
    out: Path | None = None  # the run folder (extra pictures such as SMC's ESS plot)
    pictures: list[Path] = field(default_factory=list)  # extra pictures written, logged at the end

    @property
    def model(self):
        return self.source.model

    @property
    def sde(self):
        return self.source.sde


# -- class-conditional generation -------------------------------------------------------------------
def _class_ids(cfg: DictConfig, num_classes: int, device, null_class: int | None = None) -> Tensor:
    """control.classes (null = every class in turn) cycled over num_images, checked against the model's classes;
    ``null_class``: a label-dropout id inside [0, num_classes) (diffusers models), never a class to generate."""
    classes = cfg.control.classes
    ids = ([c for c in range(num_classes) if c != null_class] if classes is None
           else list(classes if OmegaConf.is_list(classes) else [classes]))
    bad = [c for c in ids if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes
           or c == null_class]
    if not ids or bad:
        null = "" if null_class is None else f", except the null class {null_class}"
        raise ValueError(f"control.classes={ids!r}: class ids must be integers in [0, {num_classes - 1}]{null} "
                         f"(the model has {num_classes} classes); offending: {bad}")
    return torch.tensor(ids, device=device).repeat(math.ceil(cfg.num_images / len(ids)))[: cfg.num_images]


def _class_metrics(job: Job, x: Tensor, y: Tensor) -> dict:
    """For digits: how often the project's digits classifier sees the requested class."""
    if job.source.data.name != "digits":
        return {}
    from sde.features import get_digits_classifier

    clf = get_digits_classifier(device=x.device, dtype=x.dtype)
    with torch.no_grad():
        return {"class_accuracy": (clf.logits(x).argmax(1) == y).double().mean().item()}


def _guided(cfg: DictConfig, job: Job, score_fn, y: Tensor) -> tuple[dict, dict]:
    x, nfe, _, _ = draw(score_fn, job.sde, cfg.sampler, (cfg.num_images, *job.source.shape), generator=job.generator,
                     device=job.device, dtype=job.dtype)
    per_class = int(math.ceil(cfg.num_images / len(set(y.tolist()))))
    metrics = {"scale": float(cfg.control.scale), "nfe": nfe, **_class_metrics(job, x, y)}
    return metrics, {"x": x, "labels": y, "grid": (x, per_class)}


def _need_classes(job: Job, what: str) -> int:
    k = int(getattr(job.model, "num_classes", 0))
    if k == 0 and job.source.kind == "diffusers":
        raise ValueError(f"control={what} needs a class-conditional model, but the diffusers model at score.path "
                         "has no class embedding (its config's num_class_embeds is null)")
    if k == 0:
        raise ValueError(f"control={what} needs a class-conditional model, but the checkpoint "
                         f"{str(job.source.checkpoint_path)!r} has "
                         f"model.net.num_classes=0 (no class embedding). Train one with\n    python experiments/"
                         f"train.py model.net.num_classes=10  (label dropout gives the unconditional null class)")
    return k


def run_cfg(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    """Classifier-free guidance with the checkpoint's own null class."""
    from sde.guidance import cfg_score

    k = _need_classes(job, "cfg")
    null = getattr(job.model, "null_class", None)  # diffusers models: the label-dropout id, one of their k ids
    if job.source.kind == "diffusers" and null is None:
        raise ValueError("control=cfg on a diffusers model needs score.null_class=<the class id its label dropout "
                         f"trained as 'unconditional', in [0, {k - 1}]>")
    y = _class_ids(cfg, k, job.device, null)
    return _guided(cfg, job, cfg_score(job.model, y, scale=float(cfg.control.scale)), y)


def _load_classifier(cfg: DictConfig, job: Job):
    from train_classifier import build_classifier

    if cfg.classifier_path is None:
        raise ValueError("control=classifier_guidance needs classifier_path=<run>/classifier.pt; train one with\n"
                         "    python experiments/train_classifier.py  (same sde and data as the score model)")
    path = Path(str(cfg.classifier_path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier_path={str(path)!r} does not exist (python experiments/train_classifier.py "
                                f"writes <run>/classifier.pt)")
    ckpt = load_checkpoint(path, map_location=job.device)
    saved = OmegaConf.create(ckpt["config"])
    diffs = config_diff({"sde": ckpt["config"]["sde"]}, {"sde": job.source.sde_config})
    diffs += [f"data.shape: classifier={list(saved.data.shape)} model={list(job.source.shape)}"
              for _ in [0] if tuple(saved.data.shape) != job.source.shape]
    if diffs:
        raise ValueError(f"classifier {str(path)!r} was trained for another SDE or data set than the score model:\n  "
                         + "\n  ".join(diffs))
    classifier = build_classifier(saved, build_sde(saved)).to(device=job.device, dtype=job.dtype)
    classifier.load_state_dict(ckpt["classifier"])
    return classifier.eval().requires_grad_(False)


def run_classifier_guidance(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    """Unconditional score (the null class of a conditional model) plus the classifier's gradient."""
    from sde.guidance import classifier_guided_score

    classifier = _load_classifier(cfg, job)
    y = _class_ids(cfg, classifier.num_classes, job.device)
    if cfg.control.get("method", "guidance") == "smc":
        return _smc_guided(cfg, job, classifier, y)
    if cfg.control.get("method", "guidance") != "guidance":
        raise ValueError(f"control.method={cfg.control.method!r} is not supported for classifier guidance; "
                         f"choose guidance or smc")
    score = classifier_guided_score(job.model, classifier, y, scale=float(cfg.control.scale))
    return _guided(cfg, job, score, y)


def _smc_guided(cfg: DictConfig, job: Job, classifier, y: Tensor) -> tuple[dict, dict]:
    """SMC class guidance (twisted diffusion sampler): the classifier is the twist, scale 1."""
    from sde.smc import smc_guidance

    if float(cfg.control.scale) != 1.0:
        raise ValueError(f"control.method=smc targets p(x | y) itself: control.scale must be 1, "
                         f"got {cfg.control.scale}")
    c = cfg.control
    with torch.no_grad():
        res = smc_guidance(job.model, job.sde, (cfg.num_images, *job.source.shape), classifier, y,
                           particles=int(c.particles), ess_threshold=float(c.ess_threshold), steps=int(c.steps),
                           generator=job.generator, device=job.device, dtype=job.dtype)
    _save_ess_plot(res.ess, job.out / f"{cfg.control.name}_ess.png", job)
    per_class = int(math.ceil(cfg.num_images / len(set(y.tolist()))))
    metrics = {"method": "smc", "particles": int(c.particles), "nfe": res.nfe, "min_ess": res.ess.min().item(),
               **_class_metrics(job, res.x, y)}
    return metrics, {"x": res.x, "labels": y, "ess": res.ess, "grid": (res.x, per_class)}


# -- inverse problems -------------------------------------------------------------------------------
def make_mask(control: DictConfig, shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> Tensor:
    """A 0/1 mask broadcastable to ``shape`` = (B, C, H, W): 1 = known pixel.

    Raises:
        ValueError: unknown preset, or a mask file whose shape does not fit the images.
    """
    b, c, h, w = shape
    name = str(control.mask)
    if name in MASK_PRESETS:
        mask = torch.ones(b, 1, h, w, device=device, dtype=dtype)
        if name == "left_half":
            mask[..., w // 2:] = 0
        elif name == "right_half":
            mask[..., : w // 2] = 0
        elif name == "top_half":
            mask[..., h // 2:, :] = 0
        elif name == "centre_box":
            bh, bw = max(1, round(h * control.box_fraction)), max(1, round(w * control.box_fraction))
            mask[..., (h - bh) // 2:(h - bh) // 2 + bh, (w - bw) // 2:(w - bw) // 2 + bw] = 0
        else:
            u = torch.rand(b, 1, h, w, generator=generator, device=generator.device).to(device)
            mask = (u < control.keep_fraction).to(dtype)
        return mask
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"control.mask={name!r} is neither a preset {list(MASK_PRESETS)} nor an existing "
                         f".pt/.npy file")
    raw = load_array(path, what="control.mask")  # .npy without pickle, or torch weights_only
    mask = torch.as_tensor(raw).to(device=device, dtype=dtype)
    fits = mask.dim() in (2, 3, 4) and mask.shape[-2:] == (h, w) and (mask.dim() == 2 or mask.shape[-3] in (1, c)) \
        and (mask.dim() < 4 or mask.shape[0] in (1, b))
    if not fits:
        raise ValueError(f"control.mask={name!r} has shape {tuple(mask.shape)}; it must be (H, W), (1 or C, H, W) or "
                         f"(1 or B, 1 or C, H, W) for images of shape (B, C, H, W)={tuple(shape)}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"control.mask={name!r} must hold only 0 and 1 (1 = known pixel)")
    return mask.expand(shape) if mask.dim() == 4 else mask.expand(b, *mask.shape[-3:]) if mask.dim() == 3 \
        else mask.expand(b, 1, h, w)


SMC_PRIORS = ("none", "data")  # control.prior: smc_inverse's twist uncorrected (MCGdiff) or by the train split


def _smc_prior(cfg: DictConfig, job: Job) -> dict:
    """smc_inverse's prior correction: none, or the train split's per-pixel mean and std (std floored at
    control.prior_floor: constant pixels, e.g. digits' borders, have std 0 and the twist needs std > 0)."""
    from sde._checks import check_choice, check_positive

    c = cfg.control
    if check_choice("control.prior", c.get("prior", "none"), SMC_PRIORS) == "none":
        return {}
    floor = check_positive("control.prior_floor", c.get("prior_floor", 0.05))
    train = load_data(job.source.data, split="train").data.to(dtype=torch.float64)
    mean, std = train.mean(0), train.std(0).clamp_min(floor)
    return {"prior_mean": mean.to(job.device, job.dtype), "prior_std": std.to(job.device, job.dtype)}


def _method_options(cfg: DictConfig, job: Job) -> dict:
    """solve_inverse options of control.method: the sampler's for replacement / dps, the method's own otherwise."""
    method, c = cfg.control.method, cfg.control
    if method in ("replacement", "dps"):
        options = OmegaConf.to_container(cfg.sampler.options, resolve=True) if cfg.sampler.get("options") else {}
        # sampler_options: the sampler's own names (the ode sampler's `method`) never meet solve_inverse's
        return {"sampler": cfg.sampler.name, "sampler_options": options,
                **({"zeta": float(c.zeta)} if method == "dps" else {})}
    if method == "smc":
        return {"particles": int(c.particles), "ess_threshold": float(c.ess_threshold), "steps": int(c.steps),
                **_smc_prior(cfg, job)}
    if method == "repaint":
        return {"steps": int(c.steps), "jump_length": int(c.jump_length), "resample": int(c.resample)}
    from sde.inverse import CONDITIONING_METHODS

    raise ValueError(f"control.method={method!r} is not supported; choose one of {sorted(CONDITIONING_METHODS)}")


def _solve(cfg: DictConfig, job: Job, constraint) -> tuple[Tensor, int]:
    from sde.inverse import solve_inverse

    res = solve_inverse(job.model, job.sde, constraint, method=cfg.control.method,
                        generator=job.generator, **_method_options(cfg, job))
    if hasattr(res, "ess"):  # SMC: the ESS-over-time picture
        _save_ess_plot(res.ess, job.out / f"{cfg.control.name}_ess.png", job)
    return res.x.detach(), int(res.nfe)


def _save_ess_plot(ess: Tensor, path: Path, job: Job) -> None:
    """ESS / K per step (mean and min over the conditions) and where resampling happened."""
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    e = ess.detach().double().cpu()
    ax.plot(e.mean(1).numpy(), label="mean over conditions")
    ax.plot(e.min(1).values.numpy(), label="min over conditions", alpha=0.7)
    ax.set_xlabel("reverse step (t = T -> eps)")
    ax.set_ylabel("ESS / K")
    ax.set_ylim(0, 1.05)
    ax.legend()
    try:
        plots._savefig(fig, path)
    finally:
        plt.close(fig)
    job.pictures.append(path)


def _inverse_metrics(x: Tensor, truth: Tensor, constraint, nfe: int, cfg: DictConfig) -> dict:
    P, b = constraint
    smc = {"prior": cfg.control.get("prior", "none")} if cfg.control.method == "smc" else {}
    return {"method": cfg.control.method, "nfe": nfe, **smc,
            "consistency_max_error": (P(x) - b).abs().max().item(),  # the measurement reproduced (0 up to rounding)
            "mse_to_truth": (x - truth).pow(2).mean().item()}  # the sampled part vs the held-out ground truth


def run_inpaint(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    from sde.inverse import inpainting_constraint

    truth = job.images
    mask = make_mask(cfg.control, tuple(truth.shape), job.generator, truth.device, truth.dtype)
    constraint = inpainting_constraint(truth, mask)
    x, nfe = _solve(cfg, job, constraint)
    observed = truth * mask  # unknown pixels shown as mid grey (0)
    metrics = {**_inverse_metrics(x, truth, constraint, nfe, cfg), "known_fraction": mask.mean().item()}
    mask_row = (mask * 2 - 1).expand_as(truth)
    return metrics, {"x": x, "truth": truth, "observed": observed, "mask": mask,
                     "grid": (torch.cat([truth, observed, mask_row, x]), truth.shape[0])}


def run_colorize(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    from sde.inverse import colorization_constraint

    truth = job.images
    if truth.shape[1] != 3:
        raise ValueError(f"control=colorize needs 3-channel (RGB) images, but data={job.source.data.name!r} has "
                         f"{truth.shape[1]} channel(s), shape {tuple(truth.shape[1:])}; use e.g. data=cifar10")
    gray = truth.mean(1, keepdim=True)
    constraint = colorization_constraint(gray)
    x, nfe = _solve(cfg, job, constraint)
    observed = gray.expand_as(truth)
    return _inverse_metrics(x, truth, constraint, nfe, cfg), {
        "x": x, "truth": truth, "observed": gray, "grid": (torch.cat([truth, observed, x]), truth.shape[0])}


def run_super_resolve(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    from sde.inverse import super_resolution_constraint

    truth, f = job.images, cfg.control.factor
    if isinstance(f, bool) or not isinstance(f, int) or f < 1 or truth.shape[-1] % f or truth.shape[-2] % f:
        raise ValueError(f"control.factor={f!r} must be a positive integer dividing the image size "
                         f"{tuple(truth.shape[-2:])}")
    low = F.avg_pool2d(truth, f)
    constraint = super_resolution_constraint(low, f)
    x, nfe = _solve(cfg, job, constraint)
    metrics = {**_inverse_metrics(x, truth, constraint, nfe, cfg), "factor": f,
               "downsample_max_error": (F.avg_pool2d(x, f) - low).abs().max().item()}
    observed = constraint.target  # the low-resolution image, nearest-upsampled
    return metrics, {"x": x, "truth": truth, "observed": low, "grid": (torch.cat([truth, observed, x]), truth.shape[0])}


# -- editing (SDEdit) ----------------------------------------------------------------------------------
def make_guide(control: DictConfig, images: Tensor, generator: torch.Generator) -> Tensor:
    """The guide to edit: a corrupted copy of the test images, in [-1, 1].

    Raises:
        ValueError: unknown control.guide.
    """
    name = str(control.guide)
    if name == "coarse":  # a blocky 'stroke painting': block means of control.block x control.block pixels
        f = int(control.block)
        return F.interpolate(F.avg_pool2d(images, f), scale_factor=f, mode="nearest")
    if name == "noise":  # a fraction of the pixels replaced by uniform noise
        u = torch.rand(images.shape, generator=generator, device=generator.device).to(images)
        noise = torch.rand(images.shape, generator=generator, device=generator.device).to(images) * 2 - 1
        return torch.where(u < float(control.noise_fraction), noise, images)
    raise ValueError(f"control.guide={name!r} is not supported; choose coarse or noise")


def run_edit(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    """SDEdit: diffuse the guide to control.t0 and sample back with the configured sampler."""
    from sde.editing import sdedit

    truth = job.images
    guide = make_guide(cfg.control, truth, job.generator)
    mask = None
    if cfg.control.get("keep") is not None:  # masked SDEdit: keep these pixels of the guide
        keep = OmegaConf.create({**OmegaConf.to_container(cfg.control, resolve=True), "mask": cfg.control.keep})
        mask = make_mask(keep, tuple(truth.shape),
                         job.generator, truth.device, truth.dtype)
    options = OmegaConf.to_container(cfg.sampler.options, resolve=True) if cfg.sampler.get("options") else {}
    with torch.no_grad():
        res = sdedit(job.model, job.sde, guide, float(cfg.control.t0), mask=mask, sampler=cfg.sampler.name,
                     generator=job.generator, **options)
    x = res.x.detach()
    metrics = {"t0": float(cfg.control.t0), "guide": str(cfg.control.guide), "nfe": int(res.nfe),
               "distance_to_guide": (x - guide).pow(2).mean().sqrt().item(),  # RMS, faithfulness
               "distance_to_truth": (x - truth).pow(2).mean().sqrt().item()}
    if mask is not None:
        metrics["kept_max_error"] = ((x - guide) * mask).abs().max().item()
    return metrics, {"x": x, "truth": truth, "guide": guide, "grid": (torch.cat([truth, guide, x]), truth.shape[0])}


# -- interpolation --------------------------------------------------------------------------------
def run_interpolate(cfg: DictConfig, job: Job) -> tuple[dict, dict]:
    from sde.interpolation import interpolate

    images = job.images
    pairs = max(1, images.shape[0] // 2)
    if images.shape[0] < 2:
        raise ValueError(f"control=interpolate needs num_images >= 2 (pairs of test images), got {cfg.num_images}")
    x0, x1 = images[:pairs], images[pairs:2 * pairs]
    ode = OmegaConf.to_container(cfg.control.ode, resolve=True)
    with torch.no_grad():
        path = interpolate(job.model, job.sde, x0, x1, int(cfg.control.steps), kind=cfg.control.kind, **ode)
    rows = path.transpose(0, 1)  # (pairs, steps, ...): one row per pair
    metrics = {"kind": cfg.control.kind, "steps": int(cfg.control.steps), "pairs": pairs,
               # how well the ODE round trip (encode, decode) returns the end points
               "endpoint_max_error": max((path[0] - x0).abs().max().item(), (path[-1] - x1).abs().max().item())}
    return metrics, {"x": path, "x0": x0, "x1": x1, "grid": (rows.flatten(0, 1), path.shape[0])}


CONTROLS = {  # control.name -> runner(cfg, job) -> (metrics, tensors incl. "grid": (images, nrow))
    "cfg": run_cfg,
    "classifier_guidance": run_classifier_guidance,
    "inpaint": run_inpaint,
    "colorize": run_colorize,
    "super_resolve": run_super_resolve,
    "interpolate": run_interpolate,
    "edit": run_edit,
}


def run(cfg: DictConfig, tracker, out: Path, device, dtype, generator) -> dict:
    from sde._checks import check_choice

    runner = CONTROLS[check_choice("control.name", cfg.control.name, CONTROLS)]
    if isinstance(cfg.num_images, bool) or not isinstance(cfg.num_images, int) or cfg.num_images < 1:
        raise ValueError(f"num_images={cfg.num_images!r} must be a positive integer")
    source = score_source(cfg, list(HydraConfig.get().overrides.task), device, dtype)
    tracker.use_checkpoint(source.checkpoint_path)  # W&B lineage when it is a logged train.py checkpoint
    if source.model is None:
        raise ValueError(f"controllable.py needs a trained model (score=checkpoint), got score.kind={source.kind!r}")
    images = None
    if cfg.control.name not in ("cfg", "classifier_guidance"):
        images = load_data(source.data, split="test").data[: cfg.num_images].to(device=device, dtype=dtype)
    job = Job(source, device, dtype, generator, images, out)
    metrics, tensors = runner(cfg, job)
    grid, nrow = tensors.pop("grid")
    if source.data.image:
        picture = plots.save_grid(grid, out / f"{cfg.control.name}.png", nrow=nrow)
        tracker.image(cfg.control.name, picture, caption=f"{cfg.control.name}, {cfg.sampler.name}")
    for path in job.pictures:  # e.g. SMC's ESS over time
        tracker.image(path.stem, path, caption=path.stem)
    save_checkpoint(out / "results.pt", {k: v.detach().cpu() for k, v in tensors.items()})
    return {"task": "controllable", "control": cfg.control.name, "sampler": cfg.sampler.name,
            "num_images": cfg.num_images, **metrics}


@hydra.main(config_path="../conf", config_name="controllable", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_task(cfg, "controllable", run)


if __name__ == "__main__":
    main()
