"""Linear inverse problems with an unconditional score model: inpainting, colorization,
super-resolution. Every method returns a new ``score_fn(x, t)``, so any sampler works.

Each measurement here observes an orthogonal projection of the image: ``P x0 = b`` with P an
orthogonal projector and b its known value (``Constraint``). In an orthonormal basis adapted
to P the known coordinates are exactly the range of P:

- inpainting: P = diag(mask), b = mask * y;
- colorization: the decoupled colour transform of Song et al. 2021 (app. I.2), an orthogonal
  3x3 map whose first axis is (1, 1, 1)/sqrt(3); P x = channel mean broadcast to 3 channels;
- super-resolution by f x f average pooling: P x = nearest-upsample(avg_pool(x)), the
  block-constant component; its complement holds the detail.

Conditioning methods (registry ``CONDITIONING_METHODS``):

- "replacement" (Song et al. 2021, sec. 5 / app. I, in score form): the known part of the
  score is the exact score of p_t(P x_t | b) = N(alpha b, sigma^2) on range(P); the rest is the
  model score at x, whose known part carries the noised measurement:
  ``s(x, t) = -(P x - alpha b) / sigma^2 + (I - P) s_model(x, t)``.
  Not the exact posterior score: (I - P) grad log p_t(x) conditions on the noisy P x_t, not on
  P x_0 = b (docs/controllable.md measures the bias).
- "dps" (Chung et al. 2023, diffusion posterior sampling): ``s_model(x, t) - zeta / ||r||
  grad_x ||r||^2`` with r = P x0_hat(x) - b and Tweedie's x0_hat = (x + sigma^2 s) / alpha.

The convenience functions sample and finish with the projection ``x <- x - P x + b``, which
keeps the known coordinates exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ._checks import (
    as_time,
    bcast,
    check_all_finite,
    check_callable,
    check_int,
    check_positive,
    check_sde,
    check_tensor,
)
from .flow import tweedie
from .sdes import SDE, ScoreFn
from .smc import _a_s, _em_kernel, _grid, _times, smc_inverse

__all__ = [
    "Constraint",
    "inpainting_constraint",
    "colorization_constraint",
    "super_resolution_constraint",
    "replacement_score",
    "dps_score",
    "project",
    "repaint",
    "repaint_schedule",
    "solve_inverse",
    "inpaint",
    "colorize",
    "super_resolve",
    "CONDITIONING_METHODS",
    "COLOR_TRANSFORM",
]


class Constraint(NamedTuple):
    """A linear measurement ``P x0 = target`` with P an orthogonal projector.

    Attributes:
        project: x -> P x (batch-first, shape preserving, idempotent and symmetric).
        target: P x0, shaped like the samples (B, ...); its shape is the sample shape.
    """

    project: Callable[[Tensor], Tensor]
    target: Tensor


# Orthonormal rows: grayscale axis (1,1,1)/sqrt3, then two colour-difference axes.
COLOR_TRANSFORM = torch.tensor(
    [
        [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ],
    dtype=torch.float64,
)


# -- constraints ----------------------------------------------------------------------------
def inpainting_constraint(y: Tensor, mask: Tensor) -> Constraint:
    """Known pixels ``mask == 1`` with values y; P = diag(mask).

    Args:
        y: (B, ...) image or vector batch; values where mask == 0 are ignored.
        mask: 0/1 (or bool) tensor broadcastable to y's shape, e.g. (B, ...), (1, ...),
            y.shape[1:], or (B, 1, H, W) for a mask shared by all channels.

    Raises:
        TypeError / ValueError: y not a float tensor, mask shape not broadcastable to y,
            or mask values other than 0 and 1.
    """
    check_all_finite("y", check_tensor("y", y, 2))
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, y.shape)
    except RuntimeError:
        shape = None
    if shape != y.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to y's shape {tuple(y.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must hold only 0 and 1 (1 = known pixel)")
    m = mask.to(device=y.device, dtype=y.dtype).expand(y.shape)

    def project(x: Tensor) -> Tensor:  # x may stack several copies of the batch (SMC particles: K * B rows)
        if x.shape[0] == m.shape[0] or x.shape[1:] != m.shape[1:] or x.shape[0] % m.shape[0]:
            return x * m
        return (x.view(-1, *m.shape) * m).view(x.shape)

    return Constraint(project, y * m)


def _channel_mean(x: Tensor) -> Tensor:
    return x.mean(dim=1, keepdim=True).expand_as(x)


def colorization_constraint(gray: Tensor, channels: int = 3) -> Constraint:
    """Known grayscale = channel mean, i.e. the first axis of ``COLOR_TRANSFORM``.

    The gray coordinate of the decoupled space is sqrt(3) * mean(r, g, b); fixing it fixes
    the channel mean, so P x = mean_c(x) broadcast to all channels.

    Args:
        gray: (B, 1, H, W) grayscale (channel mean of the wanted colour image).
        channels: channels of the output image (3 for RGB).

    Raises:
        TypeError / ValueError: gray is not a float tensor of shape (B, 1, H, W).
    """
    check_all_finite("gray", check_tensor("gray", gray, 4))
    if gray.dim() != 4 or gray.shape[1] != 1:
        raise ValueError(f"gray must have shape (B, 1, H, W), got {tuple(gray.shape)}")
    check_int("channels", channels, 2)
    b, _, h, w = gray.shape
    return Constraint(_channel_mean, gray.expand(b, channels, h, w).contiguous())


def super_resolution_constraint(y_low: Tensor, factor: int) -> Constraint:
    """Known f x f block means: A x = avg_pool(x, f), y_low = A x0.

    The pooled component of a block is its mean times f along the unit vector (1,...,1)/f;
    its orthogonal complement (zero-mean detail) is unknown. P x = upsample(avg_pool(x)).

    Args:
        y_low: (B, C, h, w) low-resolution image.
        factor: integer upsampling factor f >= 1; the output is (B, C, f h, f w).

    Raises:
        TypeError / ValueError: y_low is not (B, C, h, w) floats, or factor < 1.
    """
    check_all_finite("y_low", check_tensor("y_low", y_low, 4))
    if y_low.dim() != 4:
        raise ValueError(f"y_low must have shape (B, C, h, w), got {tuple(y_low.shape)}")
    f = check_int("factor", factor, 1)

    def project(x: Tensor) -> Tensor:
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by factor={f}")
        return _upsample(F.avg_pool2d(x, f), f)

    return Constraint(project, _upsample(y_low, f))


def _upsample(x: Tensor, f: int) -> Tensor:
    return x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


# -- score wrappers ----------------------------------------------------------------------------
def _alpha_sigma2(sde: SDE, x: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = as_time(t, x, sde.T)
    return t, bcast(sde.alpha(t), x), bcast(sde.sigma(t) ** 2, x)


def _check_conditioning_inputs(score_fn: Any, sde: Any, constraint: Any) -> Constraint:
    check_callable("score_fn", score_fn, "score_fn(x, t)")
    check_sde(sde)
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be an sde.inverse.Constraint (from inpainting_constraint, ...), "
                        f"got {type(constraint).__name__}")
    return constraint


def _check_batch(x: Tensor, target: Tensor) -> None:
    if x.shape != target.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but the measurement defines samples of {tuple(target.shape)}")


def replacement_score(score_fn: ScoreFn, sde: SDE, constraint: Constraint) -> ScoreFn:
    """Replacement method in score form (Song et al. 2021, sec. 5 and app. I).

    ``s(x, t) = -(P x - alpha(t) b) / sigma(t)^2 + (I - P) score_fn(x, t)``: the exact score
    of N(alpha b, sigma^2) on the known subspace, the model score on its complement.

    Args:
        score_fn: unconditional score ``(x, t) -> Tensor``.
        sde: the forward SDE (gives alpha, sigma).
        constraint: the measurement (see ``inpainting_constraint`` and friends).

    Returns:
        The conditional score function; diverges like 1/sigma^2 as t -> 0, so sample to
        t = eps > 0 and finish with ``project``.
    """
    P, b = _check_conditioning_inputs(score_fn, sde, constraint)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x, b)
        t, a, s2 = _alpha_sigma2(sde, x, t)
        s = score_fn(x, t)
        return s - P(s) - (P(x) - a * b.to(x)) / s2

    return conditional


def dps_score(score_fn: ScoreFn, sde: SDE, constraint: Constraint, zeta: float = 1.0) -> ScoreFn:
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1) in score form.

    ``s(x, t) = score_fn(x, t) - zeta / ||r|| * grad_x ||r||^2``, r = P x0_hat(x) - b per sample,
    x0_hat = (x + sigma^2 score_fn(x, t)) / alpha (Tweedie). The gradient back-propagates
    through score_fn. The sampler multiplies the score by g(t)^2 dt, so zeta is in score
    units, not DPS's per-step units; tune it per SDE and step count.

    Args:
        score_fn: unconditional, differentiable score ``(x, t) -> Tensor``.
        sde: the forward SDE.
        constraint: the measurement.
        zeta: guidance strength > 0.

    Returns:
        The guided score function.
    """
    zeta = check_positive("zeta", zeta)
    P, b = _check_conditioning_inputs(score_fn, sde, constraint)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        _check_batch(x, b)
        t = as_time(t, x, sde.T)
        with torch.enable_grad():  # samplers may run under no_grad
            x_in = x.detach().requires_grad_(True)
            s = score_fn(x_in, t)
            x0_hat = tweedie(sde, x_in, t, s)
            r = (P(x0_hat) - b.to(x)).flatten(1).norm(dim=1)
            grad = torch.autograd.grad(r.sum(), x_in)[0]
        # zeta / ||r|| * grad ||r||^2 = 2 zeta grad ||r||
        return s.detach() - 2.0 * zeta * grad

    return guided


def project(x: Tensor, constraint: Constraint) -> Tensor:
    """``x - P x + b``: keep x's unknown part, set the known part to the measurement."""
    P, b = constraint
    _check_batch(x, b)
    return x - P(x) + b.to(x)


# -- RePaint (Lugmayr et al. 2022) ---------------------------------------------------------------
def repaint_schedule(steps: int, jump_length: int, resample: int) -> list[int]:
    """RePaint's walk over grid indices 0 (t = T) .. steps (t = eps) (Lugmayr et al. 2022, Alg. 1).

    Every ``jump_length`` steps down (except at the end) the walk goes back up ``jump_length``
    steps and down again, ``resample - 1`` times; ``resample = 1`` is the plain descent.

    Args:
        steps: grid intervals >= 1.
        jump_length: steps per jump back, >= 1.
        resample: passes over each stretch, >= 1 (the paper's r).

    Returns:
        The visited indices, starting at 0 and ending at ``steps``.
    """
    check_int("steps", steps, 1)
    check_int("jump_length", jump_length, 1)
    check_int("resample", resample, 1)
    walk, i, jumps = [0], 0, {}
    while i < steps:
        i += 1
        walk.append(i)
        if i % jump_length == 0 and i < steps and jumps.get(i, 0) < resample - 1:
            jumps[i] = jumps.get(i, 0) + 1
            walk.extend(range(i - 1, i - jump_length - 1, -1))
            i -= jump_length
    return walk


def repaint(
    score_fn: ScoreFn,
    sde: SDE,
    constraint: Constraint,
    *,
    steps: int = 250,
    jump_length: int = 10,
    resample: int = 10,
    eps: float | None = None,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
):
    """RePaint (Lugmayr et al. 2022, Alg. 1) for P x_0 = b with the reverse Euler-Maruyama step.

    Going down t -> s: the unknown part takes the model's reverse step, the known part is a fresh
    draw alpha_s b + sigma_s P z. Going up s -> t (the resampling jumps): the exact forward kernel
    x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z, which
    lets the known part's information reach the unknown part. Still biased (docs/controllable.md).

    Args:
        score_fn: unconditional score ``(x, t)``.
        sde: the forward SDE.
        constraint: the measurement.
        steps: grid intervals from T to eps (uniform in t).
        jump_length: steps per jump back (the paper's j).
        resample: passes over each stretch (the paper's r; 1 = replacement with fresh known noise).
        eps: end time (default 1e-3; 1e-5 for VE).
        denoise_final: finish with Tweedie's E[x_0 | x_eps] (one more score call).
        generator: source of all randomness.
        callback: ``callback({"i", "t", "x", "x0_hat"})`` after each step down.
        progress: show a tqdm bar.

    Returns:
        SampleResult(x projected, nfe = steps down + denoise_final, "repaint", options).
    """
    from .samplers import SampleResult  # imported here: the sampler registry imports nothing from us

    P, b = constraint
    ts, walk = _grid(sde, steps, eps), repaint_schedule(steps, jump_length, resample)
    x, nfe = sde.prior_sampling(b.shape, generator=generator, device=b.device, dtype=b.dtype), 0
    a_s = [_a_s(sde, t, b) for t in ts]  # (alpha, sigma) on the grid
    for n, (i, j) in enumerate(zip(walk[:-1], walk[1:])):
        x, down = _repaint_step(score_fn, sde, P, b, x, ts, a_s, i, j, generator)
        nfe += int(down)
        if down and callback is not None:
            callback({"i": n, "t": _times(ts[j], x), "x": x, "x0_hat": None})
    if denoise_final:
        x = tweedie(sde, x, _times(ts[-1], x), score_fn(x, _times(ts[-1], x)))
        nfe += 1
    opts = dict(steps=steps, jump_length=jump_length, resample=resample, eps=ts[-1], denoise_final=denoise_final)
    return SampleResult(project(x, constraint), nfe, "repaint", opts)


def _repaint_step(score_fn: ScoreFn, sde: SDE, P: Callable[[Tensor], Tensor], b: Tensor, x: Tensor,
                  ts: list[float], a_s: list[tuple[float, float]], i: int, j: int,
                  generator: torch.Generator | None) -> tuple[Tensor, bool]:
    """One move of RePaint's walk, grid index i -> j; returns (x, whether it stepped down: one score call)."""
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if j < i:  # jump back up: the forward kernel from ts[i] to ts[j]
        ratio = a_s[j][0] / a_s[i][0]
        return ratio * x + math.sqrt(max(a_s[j][1] ** 2 - (ratio * a_s[i][1]) ** 2, 0.0)) * z, False
    score = score_fn(x, _times(ts[i], x))
    m, v = _em_kernel(sde, score, x, ts[i], ts[j])
    free = m + math.sqrt(v) * z
    return free - P(free) + a_s[j][0] * b + a_s[j][1] * P(z), True


# -- the registry: every method solves P x = b and returns a result whose x is projected ---------------
def _with_sampler(wrap: Callable[..., ScoreFn], *keys: str) -> Callable[..., Any]:
    """A score-wrapper method run by any registered sampler, then projected."""

    def solve(score_fn: ScoreFn, sde: SDE, constraint: Constraint, *, sampler: str | None = None,
              sampler_options: dict[str, Any] | None = None, generator: torch.Generator | None = None,
              **options: Any):
        from .samplers import sample  # imported here: the sampler registry imports nothing from us

        cond = wrap(score_fn, sde, constraint, **{k: options.pop(k) for k in keys if k in options})
        both = sorted(set(options) & set(sampler_options or {}))
        if both:
            raise TypeError(f"sampler option(s) {both} given both as keywords and in sampler_options; give each once")
        b = constraint.target
        x_T = sde.prior_sampling(b.shape, generator=generator, device=b.device, dtype=b.dtype)
        result = sample(cond, sde, x_T, sampler=sampler or "pc", generator=generator, **options,
                        **(sampler_options or {}))
        return _with_x(result, project(result.x, constraint))

    return solve


def _own_loop(run: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A method with its own reverse loop (EM kernel): no ``sampler`` choice."""

    def solve(score_fn: ScoreFn, sde: SDE, constraint: Constraint, *, sampler: str | None = None,
              sampler_options: dict[str, Any] | None = None, generator: torch.Generator | None = None,
              **options: Any):
        for arg, value in (("sampler", sampler), ("sampler_options", sampler_options or None)):
            if value is not None:
                raise ValueError(f"method={name!r} runs its own reverse loop; {arg}={value!r} cannot be used "
                                 f"with it (leave {arg} unset; its options go in as keywords)")
        return run(score_fn, sde, constraint, generator=generator, **options)

    return solve


CONDITIONING_METHODS: dict[str, Callable[..., Any]] = {
    "replacement": _with_sampler(replacement_score),  # biased (conditions on the noisy known part)
    "dps": _with_sampler(dps_score, "zeta"),  # biased (Tweedie plug-in likelihood)
    "repaint": _own_loop(repaint, "repaint"),  # biased, less so with more resampling
    "smc": _own_loop(smc_inverse, "smc"),  # asymptotically exact as particles grow
}


# -- convenience: build, sample, project --------------------------------------------------------
def _check_method(method: Any, sampler_options: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse the removed ``conditioning=`` keyword, an unknown method and a non-dict ``sampler_options``."""
    if "conditioning" in options:
        raise TypeError(f"conditioning= was renamed: pass method={options['conditioning']!r} "
                        f"(a sampler's own 'method' option goes in sampler_options={{'method': ...}})")
    if method not in CONDITIONING_METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {sorted(CONDITIONING_METHODS)} "
                         f"(an 'ode' sampler's integration method goes in sampler_options={{'method': ...}})")
    if sampler_options is not None and not (isinstance(sampler_options, dict)
                                            and all(isinstance(k, str) for k in sampler_options)):
        raise TypeError(f"sampler_options must be a dict of option name -> value, got {sampler_options!r}")
    return sampler_options


def solve_inverse(
    score_fn: ScoreFn,
    sde: SDE,
    constraint: Constraint,
    *,
    method: str = "replacement",
    sampler: str | None = None,
    sampler_options: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
):
    """Sample x ~ p(x | P x = b) with a method of ``CONDITIONING_METHODS``; known part kept exactly.

    "replacement" and "dps" are score wrappers run by any registered sampler (x_T drawn from the
    prior with the shape, dtype and device of ``constraint.target``); "repaint" and "smc" run
    their own reverse loop. Every result is ``project``ed: P x = b exactly.

    Args:
        score_fn: unconditional score model.
        sde: the forward SDE.
        constraint: the measurement.
        method: "replacement", "dps", "repaint" or "smc" (DESIGN.md's ``method=``).
        sampler: for "replacement" / "dps": any name in ``sde.samplers.SAMPLERS`` (default "pc");
            must stay None for "repaint" and "smc".
        sampler_options: for "replacement" / "dps": options of the sampler, given as a dict;
            the route for names that ``solve_inverse`` itself takes, e.g. the "ode" sampler's
            ``sampler_options={"method": "rk4"}``; must stay None for "repaint" and "smc".
        generator: drives every random draw.
        **options: the method's own options, then the sampler's: "dps" takes ``zeta``;
            "repaint" ``steps, jump_length, resample, eps``; "smc" ``particles, ess_threshold,
            steps, eps, noise_std, ...`` (``sde.smc.smc_inverse``); the rest go to the sampler
            (an option nobody takes raises TypeError).

    Returns:
        A SampleResult (an ``sde.smc.SMCResult`` for "smc") whose ``x`` has the target's shape.

    Raises:
        TypeError: the removed keyword ``conditioning=`` (renamed ``method=``), a sampler option
            given both as a keyword and in ``sampler_options``, or an option nobody takes.
        ValueError: unknown method or sampler, a sampler or sampler_options given to "repaint" /
            "smc", or the method's own checks (zeta <= 0, particles < 1, ess_threshold outside
            (0, 1], ...).
    """
    sampler_options = _check_method(method, sampler_options, options)
    return CONDITIONING_METHODS[method](score_fn, sde, constraint, sampler=sampler, sampler_options=sampler_options,
                                        generator=generator, **options)


def _with_x(result: Any, x: Tensor) -> Any:
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(result, x=x)
    return result._replace(x=x)  # NamedTuple


def inpaint(score_fn: ScoreFn, sde: SDE, y: Tensor, mask: Tensor, *, method: str = "replacement", **kwargs: Any):
    """Inpainting: sample the pixels where mask == 0 given y where mask == 1.

    Args:
        score_fn: unconditional score model.
        sde: the forward SDE.
        y: (B, ...) images or vectors; values where mask == 0 are ignored.
        mask: 0/1 tensor broadcastable to y (1 = known), as in ``inpainting_constraint``.
        method: a name in ``CONDITIONING_METHODS`` ("replacement", "dps", "repaint", "smc").
        **kwargs: ``solve_inverse``'s other keywords (sampler, sampler_options, generator, options).

    Returns:
        ``solve_inverse``'s result; ``x`` equals y where mask == 1, bit for bit.
    """
    return solve_inverse(score_fn, sde, inpainting_constraint(y, mask), method=method, **kwargs)


def colorize(score_fn: ScoreFn, sde: SDE, gray: Tensor, *, method: str = "replacement", **kwargs: Any):
    """Colorization: sample RGB images (B, 3, H, W) whose channel mean equals ``gray``.

    Args:
        score_fn: unconditional score model of RGB images.
        sde: the forward SDE.
        gray: (B, 1, H, W) the wanted channel mean.
        method: a name in ``CONDITIONING_METHODS``.
        **kwargs: ``solve_inverse``'s other keywords (sampler, sampler_options, generator, options).

    Returns:
        ``solve_inverse``'s result; ``x.mean(1)`` equals gray.
    """
    return solve_inverse(score_fn, sde, colorization_constraint(gray), method=method, **kwargs)


def super_resolve(score_fn: ScoreFn, sde: SDE, y_low: Tensor, factor: int, *, method: str = "replacement",
                  **kwargs: Any):
    """Super-resolution: sample (B, C, f h, f w) images whose f x f block means equal y_low.

    Args:
        score_fn: unconditional score model of the high-resolution images.
        sde: the forward SDE.
        y_low: (B, C, h, w) low-resolution images.
        factor: the integer factor f >= 1.
        method: a name in ``CONDITIONING_METHODS``.
        **kwargs: ``solve_inverse``'s other keywords (sampler, sampler_options, generator, options).

    Returns:
        ``solve_inverse``'s result; ``avg_pool(x, f)`` equals y_low.
    """
    return solve_inverse(score_fn, sde, super_resolution_constraint(y_low, factor), method=method, **kwargs)
