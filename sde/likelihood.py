"""Exact likelihoods through the probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2).

The PF-ODE ``dx/dt = v(x, t) = f(x, t) - 1/2 g(t)^2 score(x, t)`` transports p_eps to p_T.
With the instantaneous change of variables (Chen et al. 2018, "Neural ODEs", thm. 1),

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div_x v(x(t), t) dt,

so integrating the pair (x, delta) with d delta / dt = div v from eps to T, and replacing
p_T by the prior, gives the model's log-density. The divergence is exact (one vector-Jacobian
product per dimension) or the Skilling-Hutchinson estimate E[e^T (dv/dx) e] with probes e
drawn once per trajectory. Everything stays on the input's device and dtype: no numpy round
trip per evaluation (score_sde_pytorch's route), and one score evaluation per ODE step where
the reference spends two (one for the drift, one inside the divergence).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import check_all_finite, check_choice, check_int, check_positive, check_sde, check_tensor
from .flow import ADAPTIVE_METHODS, check_ode, integrate_ode, ode_times, pf_velocity
from .samplers._base import CountedScore
from .samplers.grids import Grid
from .sdes import SDE, ScoreFn

__all__ = ["LikelihoodResult", "log_likelihood", "bits_per_dim", "dataset_bits_per_dim", "BitsPerDim", "encode",
           "decode"]
__all__ += ["DIVERGENCES", "PROBES", "joint_rms_norm", "mixed_rms_norm"]

DEFAULT_EPS = 1e-5  # start time of the likelihood ODE (Song et al. 2021 use 1e-5 for every SDE)
_EXACT_CHUNK = 256  # one-hot directions pushed through autograd at once by the exact divergence


@dataclass
class LikelihoodResult:
    """Output of :func:`log_likelihood`.

    Attributes:
        logp: (B,) log-density of x under the model, in nats, in the space x lives in.
        z: the latent x(T), shaped like x.
        nfe: number of score-function evaluations (forward calls of ``score_fn``), summed
            over all mini-batches (the total score calls). The divergence adds backward passes,
            not evaluations.
        n_vjp: number of vector-Jacobian products spent on the divergence: D per evaluation
            for ``"exact"``, ``n_probes`` per evaluation for ``"hutchinson"``.
        batch_nfe: the evaluations of each mini-batch's ODE solve, in order (one solve moves all
            of its points together, so this is the NFE per trajectory); ``sum(batch_nfe) == nfe``.
            Empty when the producer did not record it.
    """

    logp: Tensor
    z: Tensor
    nfe: int
    n_vjp: int = 0
    batch_nfe: list[int] = field(default_factory=list)


# -- probes and divergences (registries) -------------------------------------------------------------
def _rademacher(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Entries +-1 with equal probability (lowest-variance Hutchinson probe)."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def _gaussian(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal entries."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


PROBES: dict[str, Callable[[tuple[int, ...], Tensor, torch.Generator | None], Tensor]] = {
    "rademacher": _rademacher,
    "gaussian": _gaussian,
}


def _quadratic_forms(v: Tensor, x: Tensor, vectors: Tensor) -> Tensor:
    """e_m^T (dv/dx) e_m for each of M direction batches ``vectors`` (M, *x.shape); returns (M, B).

    One backward pass per direction, batched with vmap (``is_grads_batched``); score functions
    that vmap cannot trace fall back to a loop over the same graph.
    """
    if vectors.shape[0] == 1:  # a single direction: a plain backward pass, no vmap overhead
        return (torch.autograd.grad(v, x, vectors[0], retain_graph=True)[0] * vectors[0]).flatten(1).sum(-1)[None]
    try:
        jt_e = torch.autograd.grad(v, x, vectors, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:
        jt_e = torch.stack([torch.autograd.grad(v, x, e, retain_graph=True)[0] for e in vectors])
    return (jt_e * vectors).flatten(2).sum(-1)


def _exact_divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Trace of dv/dx: sum over the D one-hot directions, in chunks of _EXACT_CHUNK."""
    B, D = x.shape[0], x[0].numel()
    total = torch.zeros(B, dtype=x.dtype, device=x.device)
    for start in range(0, D, _EXACT_CHUNK):
        idx = torch.arange(start, min(start + _EXACT_CHUNK, D), device=x.device)
        basis = torch.zeros(idx.numel(), B, D, dtype=x.dtype, device=x.device)
        basis[torch.arange(idx.numel(), device=x.device), :, idx] = 1.0
        total = total + _quadratic_forms(v, x, basis.reshape(idx.numel(), *x.shape)).sum(0)
    return total


def _hutchinson_divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Skilling-Hutchinson: mean over probes e of e^T (dv/dx) e (unbiased for E[e e^T] = I)."""
    return _quadratic_forms(v, x, probes).mean(0)


DIVERGENCES: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "exact": _exact_divergence,
    "hutchinson": _hutchinson_divergence,
}


# -- the ODE -------------------------------------------------------------------------------------------
def _velocity(score: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """The PF-ODE velocity at the scalar time t (a 0-d tensor from torchdiffeq), as a shared (B,) view."""
    return pf_velocity(sde, score, x, t.to(x.dtype).reshape(1).expand(x.shape[0]))  # see _checks.shared_time


def _augmented_velocity(score, sde: SDE, div_fn, probes: Tensor | None, shape: torch.Size):
    """Right-hand side of the joint ODE (dx/dt, d delta/dt) = (v, div v) on one flat state; one score call each.

    The state is x flattened with delta appended: a single tensor spares torchdiffeq's tuple
    packing (a split and a concatenation per evaluation and per norm); see ``_split``.
    """
    n = shape.numel()

    def func(t: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            xt = y[:n].view(shape).detach().requires_grad_(True)
            v = _velocity(score, sde, xt, t)
            div = div_fn(v, xt, probes)
        return torch.cat([v.detach().reshape(-1), div.detach()])

    return func


def _split(y: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(x, delta) views of the flat joint state."""
    n = shape.numel()
    return y[..., :n].reshape(*y.shape[:-1], *shape), y[..., n:]


def _rms(v: Tensor) -> Tensor:
    return v.pow(2).mean().sqrt()


def joint_rms_norm(state: tuple[Tensor, Tensor]) -> Tensor:
    """Step-size control norm of :func:`log_likelihood` by default: one RMS over every entry of
    the scaled error of (x, delta), as scipy's ``solve_ivp`` (and so score_sde_pytorch) measures it:
    the reference's semantics of rtol/atol. :func:`mixed_rms_norm` controls delta separately.

    Args:
        state: the (x, delta) pair (x of shape (B, ...), delta of shape (B,)).

    Returns:
        A 0-d tensor.
    """
    x, delta = state
    return torch.sqrt((x.pow(2).sum() + delta.pow(2).sum()) / (x.numel() + delta.numel()))


def mixed_rms_norm(state: tuple[Tensor, Tensor]) -> Tensor:
    """The max of the RMS norms of x and of delta: torchdiffeq's default for a tuple state.

    Controls the log-density increment as tightly as x itself (in :func:`joint_rms_norm` delta
    has weight 1 / (D + 1)); pass ``options={"norm": mixed_rms_norm}`` to use it. It costs steps:
    1100 against 584 evaluations on the digits U-Net at rtol = atol = 1e-5 (docs/benchmarks.md).

    Args:
        state: the (x, delta) pair.

    Returns:
        A 0-d tensor.
    """
    return torch.maximum(*(_rms(part) for part in state))


def _flat_norm(shape: torch.Size, norm: Callable | None) -> Callable[[Tensor], Tensor]:
    """Step-size control norm on the flat state. The default, :func:`joint_rms_norm`, is the RMS
    of the flat state itself (no split); a user's ``options["norm"]`` receives the (x, delta) tuple.
    """
    if norm is None:
        return _rms
    return lambda y: norm(_split(y, shape))


@dataclass(frozen=True)
class _Solve:
    """The validated ODE settings of one encode / decode / log_likelihood call."""

    method: str
    rtol: float
    atol: float
    options: dict
    ts: list[float]  # decreasing, T ... eps (see sde.flow.ode_times)

    def run(self, func, y: Tensor, to_latent: bool, progress: str | None = None) -> Tensor:
        ts = self.ts[::-1] if to_latent else self.ts
        return integrate_ode(func, y, ts, method=self.method, rtol=self.rtol, atol=self.atol, options=self.options,
                             progress=progress)


def _check_solve(sde: SDE, method: str, rtol: float, atol: float, steps: int | None, eps: float | None, grid: Grid,
                 rho: float, options: dict | None, from_T: str | None = None) -> _Solve:
    """The one validation of sde.flow (the ``ode`` sampler's), with this module's default eps; with
    ``from_T`` (the caller's name) the grid must start at T, where the prior density is known."""
    check_sde(sde)
    options = check_ode(method, rtol, atol, options)
    eps = DEFAULT_EPS if eps is None and isinstance(grid, str) else eps
    ts = ode_times(sde, method, steps, eps, grid, rho=rho)
    if from_T is not None and ts[0] != sde.T:
        raise ValueError(f"{from_T} needs the grid to start at T={sde.T} (the prior), got t_0={ts[0]!r}")
    return _Solve(method, rtol, atol, options, ts)


def _chunks(x: Tensor, batch_size: int | None, progress: bool, desc: str):
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)
    size = x.shape[0] if batch_size is None else batch_size
    starts = range(0, x.shape[0], size)
    return tqdm(starts, desc=desc, disable=not progress, leave=False), size


def _likelihood_batch(score: CountedScore, sde: SDE, xb: Tensor, solve: _Solve, divergence: str, probe: str,
                      n_probes: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(logp, z) of one mini-batch: the joint (x, delta) ODE from eps to T."""
    probes = None if divergence == "exact" else PROBES[probe]((n_probes, *xb.shape), xb, generator)
    func = _augmented_velocity(score, sde, DIVERGENCES[divergence], probes, xb.shape)
    y0 = torch.cat([xb.reshape(-1), torch.zeros(xb.shape[0], dtype=xb.dtype, device=xb.device)])
    opts = solve.options
    if solve.method in ADAPTIVE_METHODS:
        opts = {**opts, "norm": _flat_norm(xb.shape, opts.get("norm"))}
    z, delta = _split(replace(solve, options=opts).run(func, y0, to_latent=True), xb.shape)
    return sde.prior_logp(z) + delta, z


def log_likelihood(
    score_fn: ScoreFn, sde: SDE, x: Tensor, *,
    divergence: str = "hutchinson",  # "exact" (D vjps per step) or "hutchinson" (n_probes vjps per step)
    probe: str = "rademacher",  # Hutchinson probe distribution: "rademacher" or "gaussian"
    n_probes: int = 1,  # Hutchinson probes per sample, averaged; fixed along the trajectory
    method: str = "dopri5",  # a name in sde.flow.ODE_METHODS
    rtol: float = 1e-5,  # relative tolerance of the adaptive solver
    atol: float = 1e-5,  # absolute tolerance of the adaptive solver
    eps: float | None = None,  # start time of the ODE (default 1e-5): the likelihood is that of p_eps
    steps: int | None = None,  # grid intervals: required by fixed-grid methods, optional for adaptive ones
    grid: Grid = "uniform",  # name in GRIDS (used with steps), or the decreasing times T = t_0 > ... > t_N
    rho: float = 7.0,  # exponent of the "edm" grid
    generator: torch.Generator | None = None,
    batch_size: int | None = None,  # solve this many samples at a time (bounded memory); all if None
    progress: bool = False,  # tqdm bar over mini-batches
    options: dict | None = None,  # torchdiffeq solver options ({"norm": mixed_rms_norm}, {"max_num_steps": ...})
) -> LikelihoodResult:
    """Log-likelihood of x by the probability-flow ODE (Song et al. 2021, sec. 4.3; Chen et al. 2018).

    Integrates (x, delta) from ``eps`` to ``T`` with ``d delta/dt = div v``; ``logp = sde.prior_logp(x(T))
    + delta(T)``, up to solver error (and probe noise for Hutchinson). Step control: see :func:`joint_rms_norm`.
    The solver settings go through ``sde.flow`` exactly as the ``ode`` sampler's do.

    Args:
        score_fn, sde: ``score_fn(x, t) -> Tensor`` shaped like x, and the forward SDE.
        x: (B, ...) data in model space (the space the score was trained in).
        divergence: "exact" (trace of dv/dx: D vector-Jacobian products per evaluation) or
            "hutchinson" (Skilling-Hutchinson estimate: ``n_probes`` products per evaluation).
        probe: Hutchinson probe distribution, "rademacher" (lowest variance) or "gaussian".
        n_probes: Hutchinson probes per sample, averaged; drawn once per trajectory.
        method: the torchdiffeq method, a name in ``sde.flow.ODE_METHODS`` (adaptive or fixed-grid).
        rtol, atol: relative and absolute tolerances of adaptive methods.
        eps: start time of the ODE, default 1e-5: the density returned is that of p_eps.
        steps: grid intervals; required by fixed-grid methods (one step each), optional for adaptive ones.
        grid: the time grid used with ``steps``, a name in ``GRIDS`` or the decreasing times
            T = t_0 > ... > t_N themselves (run backwards from t_N; t_0 must be T).
        rho: exponent of the "edm" grid.
        generator: draws the Hutchinson probes.
        batch_size: solve this many samples at a time (bounded memory); all at once if None.
        progress: show a tqdm bar over mini-batches.
        options: torchdiffeq solver options of the method's kind; ``norm`` receives the (x, delta) pair.

    Returns:
        LikelihoodResult(logp (B,) nats, z like x, nfe (total), n_vjp, batch_nfe (per mini-batch solve)).

    Raises:
        ValueError: unknown divergence/probe/method, a fixed-grid method without steps, rtol/atol
            <= 0, eps outside (0, T), a grid not starting at T, n_probes, steps or batch_size < 1,
            an option the method does not take.
        TypeError: x is not a floating tensor, sde not an SDE, score_fn not callable.
        ValueError: x holds NaN/inf; score_fn's output is not shaped like x.
    """
    _check_likelihood(x, divergence, probe, n_probes)
    solve = _check_solve(sde, method, rtol, atol, steps, eps, grid, rho, options, from_T="log_likelihood")
    score = CountedScore(score_fn)
    logp, z, batch_nfe = _likelihood_batches(score, sde, x, solve, divergence, probe, n_probes, generator, batch_size,
                                             progress)
    n_vjp_per_eval = x[0].numel() if divergence == "exact" else n_probes
    return LikelihoodResult(logp, z, score.calls, score.calls * n_vjp_per_eval, batch_nfe)


def _likelihood_batches(score: CountedScore, sde: SDE, x: Tensor, solve: _Solve, divergence: str, probe: str,
                        n_probes: int, generator: torch.Generator | None, batch_size: int | None,
                        progress: bool) -> tuple[Tensor, Tensor, list[int]]:
    """(logp, z, score calls per batch) of all of x, solved mini-batch by mini-batch in order (the probes
    drawn batch by batch)."""
    starts, size = _chunks(x, batch_size, progress, "log-likelihood")
    parts, batch_nfe = [], []
    for i in starts:
        before = score.calls
        parts.append(_likelihood_batch(score, sde, x[i : i + size], solve, divergence, probe, n_probes, generator))
        batch_nfe.append(score.calls - before)
    logp, z = (torch.cat(part) for part in zip(*parts))
    return logp, z, batch_nfe


def _check_likelihood(x: Tensor, divergence: str, probe: str, n_probes: int) -> None:
    check_all_finite("x", check_tensor("x", x, 2))  # one sync; NaN would be torchdiffeq's "underflow in dt"
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("probe", probe, PROBES)
    check_int("n_probes", n_probes, 1)


def _flow(score_fn: ScoreFn, sde: SDE, x: Tensor, name: str, to_latent: bool, *, method: str, rtol: float,
          atol: float, eps: float | None, steps: int | None, grid: Grid, rho: float, batch_size: int | None,
          progress: bool, options: dict | None) -> Tensor:
    """Integrate the PF-ODE alone (no divergence) through the grid, mini-batch by mini-batch:
    eps -> T when ``to_latent`` (encode), T -> eps otherwise (decode). ``name`` is x's argument name."""
    check_all_finite(name, check_tensor(name, x, 2))
    solve = _check_solve(sde, method, rtol, atol, steps, eps, grid, rho, options)
    score_fn = CountedScore(score_fn)  # callable, and its first output shaped like x

    def func(t: Tensor, xt: Tensor) -> Tensor:
        return _velocity(score_fn, sde, xt, t)

    out = []
    starts, size = _chunks(x, batch_size, progress, "encode" if to_latent else "decode")
    for start in starts:
        out.append(solve.run(func, x[start : start + size], to_latent))
    return torch.cat(out)


def encode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    steps: int | None = None,
    grid: Grid = "uniform",
    rho: float = 7.0,
    batch_size: int | None = None,
    progress: bool = False,
    options: dict | None = None,
) -> Tensor:
    """Latent code z = x(T) of data x = x(eps) along the probability-flow ODE (Song et al. 2021, sec. 4.3).

    Args:
        score_fn: ``score_fn(x, t) -> Tensor`` shaped like x.
        sde: the forward SDE.
        x: (B, ...) data in model space.
        method, rtol, atol, eps, steps, grid, rho, batch_size, progress: as :func:`log_likelihood`
            (the same sde.flow checks; a fixed-grid method needs steps).
        options: torchdiffeq solver options of the method's kind (``norm`` receives the state tensor).

    Returns:
        z shaped like x (at the grid's first time, T unless an explicit grid starts lower).

    Raises:
        ValueError: as :func:`log_likelihood` for the solver settings.
    """
    return _flow(score_fn, sde, x, "x", True, method=method, rtol=rtol, atol=atol, eps=eps, steps=steps, grid=grid,
                 rho=rho, batch_size=batch_size, progress=progress, options=options)


def decode(
    score_fn: ScoreFn,
    sde: SDE,
    z: Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    steps: int | None = None,
    grid: Grid = "uniform",
    rho: float = 7.0,
    batch_size: int | None = None,
    progress: bool = False,
    options: dict | None = None,
) -> Tensor:
    """Data x = x(eps) of latent z = x(T): the inverse of :func:`encode` (same ODE, run from T to eps).

    Args:
        score_fn: ``score_fn(x, t) -> Tensor`` shaped like z.
        sde: the forward SDE.
        z: (B, ...) latents at the grid's first time (T).
        method, rtol, atol, eps, steps, grid, rho, batch_size, progress, options: as :func:`encode`.

    Returns:
        x shaped like z.

    Raises:
        ValueError: as :func:`log_likelihood` for the solver settings.
    """
    return _flow(score_fn, sde, z, "z", False, method=method, rtol=rtol, atol=atol, eps=eps, steps=steps, grid=grid,
                 rho=rho, batch_size=batch_size, progress=progress, options=options)


# -- bits per dimension -------------------------------------------------------------------------------
def bits_per_dim(logp: Tensor, num_dims: int | Tensor, *, levels: int = 256, scale: float = 2.0) -> Tensor:
    """Bits/dim of dequantized discrete data from the model log-density (Theis et al. 2016; Ho et al. 2020).

    Data x in [0, 1] is dequantized as (k + u) / levels and modelled as y = scale * x - shift, so
    ``bpd = -(log p_y(y) + D log(scale) - D log(levels)) / (D log 2)``. No other offset.

    Args:
        logp: (B,) log p_y(y) in nats (``LikelihoodResult.logp``).
        num_dims: D, the number of dimensions per sample; or the data batch itself, whose
            per-sample size gives D and whose batch must match ``logp``.
        levels: number of quantization levels per dimension (256 for 8-bit images).
        scale: slope of the map from [0, 1] data to model space (2 for [-1, 1]).

    Returns:
        (B,) bits per dimension.

    Raises:
        ValueError: logp not 1-D, num_dims < 1 or inconsistent with logp, levels < 2, scale <= 0.
    """
    check_tensor("logp", logp, 1)
    if logp.dim() != 1:
        raise ValueError(f"logp must have shape (B,), got {tuple(logp.shape)}")
    if isinstance(num_dims, Tensor):
        if num_dims.dim() < 2 or num_dims.shape[0] != logp.shape[0]:
            raise ValueError(
                f"num_dims given as data must be batch-first with batch {logp.shape[0]} like logp, "
                f"got shape {tuple(num_dims.shape)}"
            )
        num_dims = num_dims[0].numel()
    D = check_int("num_dims", num_dims, 1)
    check_int("levels", levels, 2)
    check_positive("scale", scale)
    return -(logp + D * math.log(scale) - D * math.log(levels)) / (D * math.log(2.0))


@dataclass
class BitsPerDim:
    """Bits/dim of a data set (:func:`dataset_bits_per_dim`); unpacks as ``mean, stderr = result``."""

    mean: float  # mean bits/dim over samples and repeats
    stderr: float  # standard error over samples (over repeats for one sample; NaN for one draw of one sample)
    values: Tensor  # (B,) each sample's bits/dim, averaged over its repeats
    logp: Tensor  # (repeats, B) log-density of the dequantized points in model space, nats
    nfe: int  # score evaluations spent in all
    batch_nfe: list[int] = field(default_factory=list)  # evaluations of each ODE solve (repeat by repeat, batch
    # by batch); nfe == sum(batch_nfe)

    def __iter__(self):
        return iter((self.mean, self.stderr))

    @classmethod
    def from_draws(cls, bpd: list[Tensor], logp: list[Tensor], batch_nfe: list[int]) -> BitsPerDim:
        """The summary of ``repeats`` draws: per-draw (B,) bits/dim and log-densities, and the solves' nfe.

        Args:
            bpd: one (B,) tensor of bits/dim per dequantization draw.
            logp: the matching (B,) log-densities in model space, nats.
            batch_nfe: score calls of each mini-batch solve.

        Returns:
            The mean over samples and draws, the standard error over samples (over draws for one sample).
        """
        per = torch.stack(bpd)  # (repeats, B)
        values = per.mean(0) if per.shape[1] > 1 else per[:, 0]
        stderr = values.std() / math.sqrt(values.numel()) if values.numel() > 1 else torch.tensor(float("nan"))
        return cls(mean=per.mean().item(), stderr=stderr.item(), values=per.mean(0), logp=torch.stack(logp),
                   nfe=sum(batch_nfe), batch_nfe=batch_nfe)


def _as_levels(x: Tensor, levels: int, dtype: torch.dtype | None) -> tuple[Tensor, torch.dtype]:
    """(integer levels k, model-space dtype) of x: integers in [0, levels - 1] or floats on the grid k/(levels-1)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch-first tensor, got {type(x).__name__}")
    if x.is_floating_point():
        k = x * (levels - 1)
        if x.min() < 0 or x.max() > 1 or (k - k.round()).abs().max() > 1e-3:
            raise ValueError(
                f"float x must lie in [0, 1] on the grid k/{levels - 1}; got values in "
                f"[{x.min().item():.4g}, {x.max().item():.4g}] (rescale [-1, 1] data with (x + 1) / 2)"
            )
        return k.round(), dtype or x.dtype
    if x.min() < 0 or x.max() > levels - 1:
        raise ValueError(f"integer x must lie in [0, {levels - 1}], got [{x.min().item()}, {x.max().item()}]")
    return x, dtype or torch.float32


def _dequantized_levels(k: Tensor, levels: int, scale: float, shift: float, dtype: torch.dtype,
                        generator: torch.Generator | None) -> Tensor:
    """y = scale * (k + u) / levels - shift, u ~ U[0, 1)^D: level k's bin in model space."""
    u = torch.rand(k.shape, generator=generator, device=k.device, dtype=dtype)
    return scale * (k.to(dtype) + u) / levels - shift


def dataset_bits_per_dim(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    levels: int = 256,
    scale: float = 2.0,
    shift: float | None = None,
    repeats: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
    **likelihood_options,
) -> BitsPerDim:
    """Bits/dim over a data set, with uniform dequantization: the one bits/dim every app reports.

    Each sample is dequantized ``repeats`` times as (k + u) / levels, u ~ U[0, 1)^D, mapped to
    y = scale * x - shift and scored with :func:`log_likelihood` and :func:`bits_per_dim`; a sample's
    bpd is the mean over its repeats. A data set's own convention is ``ArrayDataset.bpd_options()``
    (``ArrayDataset.bits_per_dim`` calls this function with it).

    Args:
        score_fn: the model's score function.
        sde: its SDE.
        x: integer tensor of levels k in [0, levels - 1], or a float tensor in [0, 1] on the
            grid k / (levels - 1) (as torchvision's ToTensor gives).
        levels: quantization levels per dimension.
        scale: slope of the map from [0, 1] data to model space, y = scale * x - shift.
        shift: offset of that map; None = scale / 2 (centres [0, 1] data on 0).
        repeats: dequantization (and probe) draws averaged per sample.
        generator: draws the dequantization noise and the divergence probes.
        batch_size: points per ODE solve (None: all at once).
        progress: tqdm bar over batches.
        dtype: model-space dtype; None = x's if float, else float32.
        likelihood_options: passed to :func:`log_likelihood` (divergence, rtol, ...).

    Returns:
        :class:`BitsPerDim`; ``mean, stderr = dataset_bits_per_dim(...)`` also works.

    Raises:
        ValueError: x outside its range or off the quantization grid; bad levels/repeats.
    """
    check_int("levels", levels, 2)
    check_int("repeats", repeats, 1)
    check_positive("scale", scale)
    shift = scale / 2 if shift is None else float(shift)
    k, dtype = _as_levels(x, levels, dtype)
    bpd, logp, batch_nfe = [], [], []
    for _ in range(repeats):
        y = _dequantized_levels(k, levels, scale, shift, dtype, generator)
        res = log_likelihood(
            score_fn, sde, y, generator=generator, batch_size=batch_size, progress=progress, **likelihood_options
        )
        bpd.append(bits_per_dim(res.logp, y, levels=levels, scale=scale))
        logp.append(res.logp)
        batch_nfe += res.batch_nfe
    return BitsPerDim.from_draws(bpd, logp, batch_nfe)
