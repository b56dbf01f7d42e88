"""Drawing samples through sde.samplers with the ``sampler`` config node, recording a strip."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

__all__ = ["draw", "Strip", "strip_label"]


class Strip(list):
    """The frames of a denoising strip (a list of tensors, one per column) and their column ``labels``."""

    labels: list[str]

    def __init__(self, frames, labels: list[str]) -> None:
        super().__init__(frames)
        self.labels = list(labels)


def strip_label(sde, t: float) -> str:
    """A strip column's label: the noise level sigma(t) for the VE SDE (its natural scale), else the time t."""
    from sde.sdes import VESDE

    if isinstance(sde, VESDE):
        return f"σ={float(sde.sigma(torch.tensor([t], dtype=torch.float64))[0]):.2g}"
    return f"t={t:.2g}"


def draw(score_fn, sde, sampler_cfg: DictConfig, shape: tuple[int, ...], *, generator: torch.Generator,
         device: torch.device, dtype: torch.dtype, batch_size: int | None = None, strip_frames: int = 0,
         strip_samples: int = 8, progress: bool = False):
    """Sample ``shape`` with the configured sampler (``progress``: the sampler's tqdm bar).

    Returns:
        (x, nfe, strip, strip_nfe): samples, the sampler's own score evaluations (the same with or
        without a strip), for ``strip_frames > 0`` a list of (B', C, H, W)-like tensors alternating
        x_t and x0_hat rows at evenly spaced steps (from the sampler callback; a :class:`Strip` whose
        ``labels`` give each column's t, or sigma(t) for the VE SDE), for :func:`plots.save_strip`, and
        the extra score evaluations the strip cost (``SampleResult.callback_nfe``: one per grid point
        for ``ode``, 0 for the other samplers).
    """
    from sde.samplers import sample

    options = OmegaConf.to_container(sampler_cfg.options, resolve=True) if sampler_cfg.get("options") else {}
    record: list[tuple[int, Tensor, Tensor]] = []

    def callback(info: dict) -> None:
        x0 = info.get("x0_hat")
        if callable(x0):
            x0 = x0()
        x0 = info["x"] if x0 is None else x0
        t = float(torch.as_tensor(info["t"]).flatten()[0])
        record.append((t, info["x"][:strip_samples].detach().clone(), x0[:strip_samples].detach().clone()))

    x_T = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    with torch.no_grad():  # samplers only evaluate the score; no gradients through the model
        res = sample(score_fn, sde, x_T, sampler=sampler_cfg.name, generator=generator,
                     callback=callback if strip_frames > 0 else None, batch_size=batch_size, progress=progress,
                     **options)
    strip: list[Tensor] = []
    if strip_frames > 0 and record:
        picks = torch.linspace(0, len(record) - 1, min(strip_frames, len(record))).round().long().tolist()
        xs = [record[p][1] for p in picks] + [res.x[:strip_samples]]
        x0s = [record[p][2] for p in picks] + [res.x[:strip_samples]]
        # Rows: sample j's x_t trajectory, then its x0_hat trajectory just below; columns labelled by t (sigma).
        strip = Strip([torch.stack([a, b], 1).flatten(0, 1) for a, b in zip(xs, x0s)],
                      [strip_label(sde, record[p][0]) for p in picks] + ["final"])
    return res.x, int(res.nfe), strip, int(res.callback_nfe)

