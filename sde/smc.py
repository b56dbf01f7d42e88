"""Sequential Monte Carlo over the reverse diffusion: conditional sampling that converges to the
exact posterior as the number of particles K grows (docs/controllable.md, "SMC").

Both samplers run a Feynman-Kac particle filter along the discretized reverse chain
T = t_N > ... > t_0 = eps with the model's Euler-Maruyama kernel
p(x_s | x_t) = N(x_t - reverse_drift(x_t, t) (t - s), g(t)^2 (t - s) I) and a positive twisting
function h_t. The target at t_i is p_model(x_{t_N:t_i}) h_{t_i}(x_{t_i}); the final twist h_eps is
the exact likelihood, so the weighted particles target p_model(x_eps) h_eps(x_eps), the posterior,
for ANY intermediate twists (these only change the variance). Resampling is systematic, per
condition, when the normalized effective sample size falls below ``ess_threshold``.

- ``smc_inverse``: a measurement P x_0 = b (P an orthogonal projector: inpainting, colorization,
  super-resolution; optional noise on range(P)). Twist g_t(x) = N(P x; alpha_t b, r_t^2 I) with
  r_t^2 = sigma_t^2 + alpha_t^2 noise_std^2, the law of the noised measurement (MCGdiff, Cardoso
  et al. 2023, noiseless and noisy cases). Kernel and twist are Gaussian, so the locally optimal
  proposal and its weight are closed form (a fully adapted filter). Prior-corrected twist
  (``prior_std``, ``prior_mean``): g_t(x) / N(P x; alpha_t prior_mean, alpha_t^2 prior_std^2 +
  sigma_t^2), again Gaussian on range(P). The posterior path has P x_t ~ N(alpha_t b, r_t^2)
  exactly (given P x_0 = b the measured part diffuses independently of the rest), while p_t(x)
  g_t(x) counts the prior of P x_t a second time; the division undoes that for a Gaussian prior
  on range(P). The last step keeps g_eps (same target); the weights degenerate much less.
  ``prior_cov`` (the data's full (d, d) covariance S) divides by N(P x; alpha_t P prior_mean,
  alpha_t^2 P S P + sigma_t^2 P) instead: the measured block's correlations too (for any orthogonal
  P, not only masks); the twist is then exp(-x^T L_t x / 2 + h_t^T x) with (B, d, d) matrices in float64.
- ``smc_guidance``: a class y with a noise-conditional classifier p_t(y | x_t) as the twist and
  the classifier-guided kernel as the proposal (the twisted diffusion sampler, Wu et al. 2023).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._checks import as_time, check_covariance, check_int, check_open_interval, check_tensor
from .flow import reverse_drift, tweedie
from .samplers import default_eps
from .sdes import SDE, ScoreFn

__all__ = ["SMCResult", "smc_inverse", "smc_guidance", "systematic_resample", "effective_sample_size"]

State = dict[str, Tensor]  # tensors with leading dim K * B, particle k of condition b at row k * B + b


@dataclass
class SMCResult:
    """What an SMC sampler returns.

    Attributes:
        x: (B, ...) one posterior draw per condition, a uniform pick among ``samples``
            (systematic resampling keeps E[copies of particle j] = K w_j, so it is particle j
            with probability w_j), shaped like the measurement: what ``solve_inverse`` returns.
        nfe: exact number of score evaluations (each on the whole K * B batch).
        samples: (B, K, ...) equally weighted particles (the weighted ones, resampled once more).
        particles: (B, K, ...) the final weighted particles; estimate E[f] by sum_k w_k f(x_k)
            (lower variance than averaging ``samples``).
        log_weights: (B, K) their normalized log weights (logsumexp over K is 0).
        ess: (steps, B) normalized effective sample size ESS / K in (0, 1] after each step's reweighting.
        resampled: (steps, B) whether each condition was resampled at each step.
        sampler: "smc".
        options: the options it ran with.
    """

    x: Tensor
    nfe: int
    samples: Tensor
    particles: Tensor
    log_weights: Tensor
    ess: Tensor
    resampled: Tensor
    sampler: str = "smc"
    options: dict[str, Any] = field(default_factory=dict)


# -- resampling ---------------------------------------------------------------------------------
def effective_sample_size(log_w: Tensor) -> Tensor:
    """Normalized ESS = (sum w)^2 / (K sum w^2) / ... in (0, 1] of (K, B) log weights, shape (B,)."""
    w = torch.softmax(log_w, dim=0)
    return 1.0 / (w.pow(2).sum(0) * log_w.shape[0])


def systematic_resample(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Systematic resampling (Kitagawa 1996) of each column of (K, B) log weights.

    Args:
        log_w: (K, B) unnormalized log weights, one column per condition.
        generator: draws the single uniform offset of each column.

    Returns:
        (K, B) ancestor indices in [0, K): column b holds, in order, the particles copied.
    """
    return _systematic_indices(log_w, _offsets(log_w, generator))


def _offsets(log_w: Tensor, generator: torch.Generator | None) -> Tensor:
    """The (B, 1) uniform offsets of systematic resampling, one per column of (K, B) log weights."""
    return torch.rand(log_w.shape[1], 1, generator=generator, device=log_w.device, dtype=torch.float64)


def _systematic_indices(log_w: Tensor, u: Tensor) -> Tensor:
    """(K, B) ancestors of systematic resampling with offsets u (B, 1): searchsorted on the weights' CDF."""
    K = log_w.shape[0]
    cdf = torch.cumsum(torch.softmax(log_w.double(), dim=0), dim=0).T.contiguous()  # (B, K)
    pos = (u + torch.arange(K, device=log_w.device, dtype=torch.float64)) / K  # (B, K), sorted
    return torch.searchsorted(cdf, pos).clamp_max(K - 1).T


def _resample(state: State, log_w: Tensor, threshold: float, generator) -> tuple[State, Tensor, Tensor, Tensor]:
    """Resample the conditions whose ESS / K < threshold; returns (state, log_w, ess, resampled)."""
    K, B = log_w.shape
    ess = effective_sample_size(log_w)
    need = ess < threshold
    u = _offsets(log_w, generator)  # drawn every step: the generator's use never depends on data
    if not bool(need.any()):
        return state, log_w, ess, need
    keep = torch.arange(K, device=log_w.device)[:, None].expand(K, B)
    anc = torch.where(need[None], _systematic_indices(log_w, u), keep)
    rows = (anc * B + torch.arange(B, device=log_w.device)).reshape(-1)  # row k * B + b of the state
    state = {k: v.index_select(0, rows) for k, v in state.items()}
    log_w = torch.where(need[None], torch.zeros_like(log_w), log_w)
    return state, log_w, ess, need


def _check_smc(particles: int, ess_threshold: float) -> None:
    check_int("particles", particles, 1)
    if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, (int, float)) or not (
        0.0 < ess_threshold <= 1.0
    ):
        raise ValueError(f"ess_threshold must lie in (0, 1] (resample when ESS / K falls below it), "
                         f"got {ess_threshold!r}")


def _grid(sde: SDE, steps: int, eps: float | None) -> list[float]:
    check_int("steps", steps, 1)
    eps = default_eps(sde) if eps is None else eps
    check_open_interval("eps", eps, 0.0, sde.T)
    return torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()


# -- the generic particle loop ----------------------------------------------------------------------
Weigh = Callable[[State, float, float], tuple[State, Tensor]]
Move = Callable[[State, float, float], State]


def _run(state: State, log_w: Tensor, ts: list[float], weigh: Weigh, move: Move, *, K: int, threshold: float,
         generator, callback, progress: bool) -> tuple[State, Tensor, Tensor, Tensor]:
    """For each step t -> s: reweigh (incremental log weights), resample, move."""
    ess_all, res_all = [], []
    steps = range(len(ts) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="smc", leave=False)
    for i in steps:
        t, s = ts[i], ts[i + 1]
        state, incr = weigh(state, t, s)
        log_w = log_w + incr.view(log_w.shape)
        state, log_w, ess, need = _resample(state, log_w, threshold, generator)
        state = move(state, t, s)
        ess_all.append(ess)
        res_all.append(need)
        if callback is not None:
            B = log_w.shape[1]
            x = state["x"]
            callback({"i": i, "t": x.new_full((x.shape[0],), s), "x": x.view(K, B, *x.shape[1:]).transpose(0, 1),
                      "x0_hat": state.get("x0_hat"), "ess": ess, "resampled": need})
    return state, log_w, torch.stack(ess_all), torch.stack(res_all)


def _finish(x: Tensor, log_w: Tensor, K: int, ess: Tensor, res: Tensor, nfe: int, generator, options) -> SMCResult:
    B = log_w.shape[1]
    cols = torch.arange(B, device=x.device)
    xs = x.view(K, B, *x.shape[1:])
    samples = xs[systematic_resample(log_w, generator), cols[None]].transpose(0, 1)  # (B, K, ...)
    pick = torch.randint(K, (B,), generator=generator, device=x.device)
    log_w = log_w - torch.logsumexp(log_w, dim=0, keepdim=True)
    return SMCResult(samples[cols, pick], nfe, samples, xs.transpose(0, 1), log_w.T, ess, res, options=options)


def _times(t: float, x: Tensor) -> Tensor:
    """(N,) times sharing one element (a stride-0 view: score models compute time terms once)."""
    return x.new_full((1,), t).expand(x.shape[0])


def _em_var(sde: SDE, t: float, s: float, like: Tensor) -> float:
    """Variance g(t)^2 (t - s) of the reverse Euler-Maruyama step t -> s < t."""
    return float(sde.diffusion(as_time(t, like, sde.T, batch=1))[0]) ** 2 * (t - s)


def _em_kernel(sde: SDE, score: Tensor, x: Tensor, t: float, s: float) -> tuple[Tensor, float]:
    """Mean and variance of the reverse Euler-Maruyama step t -> s < t with a precomputed score."""
    mean = x - reverse_drift(sde, lambda *_: score, x, _times(t, x)) * (t - s)
    return mean, _em_var(sde, t, s, x)


def _a_s(sde: SDE, t: float, like: Tensor) -> tuple[float, float]:
    tt = as_time(t, like, sde.T, batch=1)
    return float(sde.alpha(tt)[0]), float(sde.sigma(tt)[0])


def _check_noise_std(noise_std: float) -> None:
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not (
        math.isfinite(noise_std) and noise_std >= 0
    ):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")


def _sample(state: State, log_w: Tensor, ts: list[float], weigh: Weigh, move: Move, *, score_fn: ScoreFn, sde: SDE,
            K: int, ess_threshold: float, denoise_final: bool, calls: list[int], generator, callback, progress: bool,
            options: dict[str, Any], fix: Callable[[Tensor], Tensor] | None = None) -> SMCResult:
    """Run the particle loop, then the optional final Tweedie denoise (one score call, then ``fix``)."""
    state, log_w, ess, res = _run(state, log_w, ts, weigh, move, K=K, threshold=float(ess_threshold),
                                  generator=generator, callback=callback, progress=progress)
    x = state["x"]
    if denoise_final:
        tt = x.new_full((x.shape[0],), ts[-1])
        x = tweedie(sde, x, tt, score_fn(x, tt))
        calls[0] += 1
        if fix is not None:
            x = fix(x)
    return _finish(x, log_w, K, ess, res, calls[0], generator, options)


# -- inverse problems -------------------------------------------------------------------------
def smc_inverse(
    score_fn: ScoreFn,
    sde: SDE,
    constraint: Any,
    *,
    particles: int = 16,
    ess_threshold: float = 0.5,
    steps: int = 500,
    eps: float | None = None,
    noise_std: float = 0.0,
    prior_std: float | Tensor | None = None,
    prior_mean: float | Tensor = 0.0,
    prior_cov: Tensor | None = None,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> SMCResult:
    """SMC for P x_0 = b (+ noise): MCGdiff (Cardoso et al. 2023, Alg. 1) with the EM kernel.

    Twist N(P x; alpha_t b, r_t^2 I), r_t^2 = sigma_t^2 + alpha_t^2 noise_std^2, or prior-corrected (``prior_std`` /
    ``prior_cov``; module docstring); proposal: EM kernel x twist; the final denoise and projection keep P x = b.

    Args:
        score_fn: unconditional score ``(x, t)``; called on batches of K * B particles.
        sde: the forward SDE (any: VP, sub-VP, VE).
        constraint: an ``sde.inverse.Constraint`` (project, target) with target (B, ...).
        particles: K >= 1 particles per condition.
        ess_threshold: resample a condition when ESS / K < ess_threshold, in (0, 1] (1 = always).
        steps: reverse EM steps on a uniform grid from T to eps.
        eps: end time (default 1e-3; 1e-5 for VE).
        noise_std: std of Gaussian noise on the measured part (0 = exact measurement).
        prior_std: the data's std per measured coordinate (> noise_std; float or tensor broadcasting against the
            target; rough values do: the target does not depend on it); None: MCGdiff's twist.
        prior_mean: the data's mean (a float or a tensor broadcasting against the target), with prior_std / cov.
        prior_cov: the data's (d, d) covariance (d = numel of a target row; symmetric, eigenvalues > noise_std^2):
            the twist corrected by P prior_cov P, O(d^3) per step and condition; exclusive with prior_std; None: unused.
        denoise_final: finish with Tweedie's E[x_0 | x_eps] (one more score call) and the projection.
        generator: source of all randomness (prior, moves, resampling).
        callback: ``callback(info)`` after each step: "i", "t", "x" (B, K, ...), "ess" (B,), "resampled" (B,).
        progress: show a tqdm bar.

    Returns:
        SMCResult; ``nfe`` = steps + denoise_final.

    Raises:
        ValueError / TypeError: particles < 1, ess_threshold outside (0, 1], steps < 1, eps outside (0, T), a non-float
            target, noise_std < 0, prior_std <= noise_std, prior_std / prior_mean / prior_cov of a wrong shape,
            prior_cov not symmetric or with an eigenvalue <= noise_std^2, or given with prior_std.
    """
    P, ts, bk = _inverse_setup(sde, constraint, particles, ess_threshold, steps, eps, noise_std)
    K, calls = particles, [0]
    twist = _make_twist(sde, P, bk, K, noise_std, prior_std, prior_mean, prior_cov, ts[-1])
    state, log_w, weigh, move = _inverse_filter(score_fn, sde, bk, twist, ts[0], K, generator, calls)
    options = dict(particles=K, ess_threshold=ess_threshold, steps=steps, eps=ts[-1], noise_std=noise_std,
                   prior_std=prior_std, prior_mean=prior_mean, prior_cov=prior_cov, denoise_final=denoise_final)
    return _sample(state, log_w, ts, weigh, move, score_fn=score_fn, sde=sde, K=K, ess_threshold=ess_threshold,
                   denoise_final=denoise_final, calls=calls, generator=generator, callback=callback, progress=progress,
                   options=options, fix=(lambda x: x - P(x) + bk) if noise_std == 0 else None)


def _inverse_setup(sde: SDE, constraint: Any, particles: int, ess_threshold: float, steps: int, eps: float | None,
                   noise_std: float) -> tuple[Callable[[Tensor], Tensor], list[float], Tensor]:
    """``smc_inverse``'s checks, then P, the grid and the target repeated for the K particles, (K * B, ...)."""
    _check_smc(particles, ess_threshold)
    _check_noise_std(noise_std)
    P, b = constraint
    check_tensor("constraint.target", b, 1)
    return P, _grid(sde, steps, eps), b.repeat(particles, *([1] * (b.dim() - 1)))


def _make_twist(sde: SDE, P: Callable[[Tensor], Tensor], bk: Tensor, K: int, noise_std: float, prior_std: Any,
                prior_mean: float | Tensor, prior_cov: Any, eps: float) -> _DiagTwist | _CovTwist:
    """``smc_inverse``'s twist: full covariance (``prior_cov``), else per coordinate or MCGdiff's."""
    if prior_cov is not None:
        return _cov_twist(sde, P, bk, K, noise_std, prior_std, prior_cov, prior_mean, eps)
    return _DiagTwist(P, _twist(sde, P, bk, noise_std, prior_std, prior_mean, eps))


Twist = Callable[[float], tuple[Tensor, float]]  # t -> (center in range(P) (K * B, ...), var): N(P x; center, var I)


def _twist(sde: SDE, P: Callable[[Tensor], Tensor], bk: Tensor, noise_std: float, prior_std: float | Tensor | None,
           prior_mean: float | Tensor, eps: float) -> Twist:
    """``smc_inverse``'s Gaussian twist on range(P) at each time: MCGdiff's N(alpha_t b, r_t^2), or
    with ``prior_std`` that divided by N(alpha_t prior_mean, alpha_t^2 prior_std^2 + sigma_t^2) (not at eps)."""
    if prior_std is not None:
        mu = P(_broadcast("prior_mean", prior_mean, bk))
        lam = _check_prior(prior_std, noise_std, bk) ** 2  # a float, or a (K * B, ...) tensor

    @functools.lru_cache(maxsize=2)  # each step asks for t and s: computed once per grid time
    def twist(t: float) -> tuple[Tensor, float | Tensor]:
        a, s = _a_s(sde, t, bk)
        r2 = s**2 + a**2 * noise_std**2
        if prior_std is None or t == eps:
            return a * bk, r2
        p2 = a**2 * lam + s**2  # variance of P x_t under the Gaussian prior N(prior_mean, prior_std^2)
        var = 1.0 / (1.0 / r2 - 1.0 / p2)
        return var * (a / r2 * bk - a / p2 * mu), var

    return twist


def _broadcast(name: str, value: float | Tensor, like: Tensor) -> Tensor:
    try:
        return torch.broadcast_to(torch.as_tensor(value, dtype=like.dtype, device=like.device), like.shape)
    except RuntimeError:
        raise ValueError(f"{name} must be a float or a tensor broadcasting against the target {tuple(like.shape[1:])}, "
                         f"got shape {tuple(torch.as_tensor(value).shape)}") from None


def _check_prior(prior_std: float | Tensor, noise_std: float, like: Tensor) -> float | Tensor:
    """``prior_std`` checked: a float, or a tensor broadcast like the (K * B, ...) target."""
    if isinstance(prior_std, Tensor):
        std = _broadcast("prior_std", prior_std, like)
        ok = bool((torch.isfinite(std) & (std > noise_std)).all())
    else:
        std = prior_std
        ok = not isinstance(std, bool) and isinstance(std, (int, float)) and math.isfinite(std) and std > noise_std
    if not ok:
        raise ValueError(f"prior_std must be a finite number (or tensor of them) > noise_std = {noise_std} (the "
                         f"data's std on range(P)), or None; got {prior_std!r}")
    return std


def _sqrt(v: float | Tensor) -> float | Tensor:
    return v.sqrt() if isinstance(v, Tensor) else math.sqrt(v)


class _DiagTwist:
    """MCGdiff's (or the per-coordinate prior-corrected) twist N(P x; c_t, var_t I): its log density and the
    locally optimal move (the EM kernel N(m, v I) times the twist at s)."""

    def __init__(self, P: Callable[[Tensor], Tensor], twist: Twist):
        self.P, self.twist = P, twist

    def log_g(self, x: Tensor, t: float, v: float = 0.0) -> Tensor:  # log N(P x; c_t, (v + var_t) I) + const
        c, var = self.twist(t)
        if isinstance(var, Tensor):  # a per-coordinate prior_std
            return -((self.P(x) - c).pow(2) / (v + var)).flatten(1).sum(1) / 2
        return -(self.P(x) - c).flatten(1).pow(2).sum(1) / (2 * (v + var))

    def propose(self, m: Tensor, v: float, s: float, z: Tensor) -> Tensor:
        c, rs2 = self.twist(s)
        known = (rs2 * self.P(m) + v * c) / (v + rs2) + _sqrt(v * rs2 / (v + rs2)) * self.P(z)
        free = m + math.sqrt(v) * z
        return free - self.P(free) + known


def _inverse_filter(score_fn: ScoreFn, sde: SDE, bk: Tensor, twist: Any, t0: float, K: int, generator,
                    calls: list[int]) -> tuple[State, Tensor, Weigh, Move]:
    """``smc_inverse``'s prior particles and their (K, B) log weights (the twist at t0), its reweighting and move:
    ``twist.log_g(x, t, v)`` is log of the twist at t smoothed by N(0, v I), ``twist.propose(m, v, s, z)`` the move."""

    def weigh(st: State, t: float, s: float) -> tuple[State, Tensor]:
        x = st["x"]
        score = score_fn(x, _times(t, x))
        calls[0] += 1
        m, v = _em_kernel(sde, score, x, t, s)
        return {"x": x, "m": m}, twist.log_g(m, s, v) - twist.log_g(x, t)

    def move(st: State, t: float, s: float) -> State:
        m, v = st["m"], _em_var(sde, t, s, st["m"])
        z = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
        return {"x": twist.propose(m, v, s, z)}

    x = sde.prior_sampling(bk.shape, generator=generator, device=bk.device, dtype=bk.dtype)
    return {"x": x}, twist.log_g(x, t0).view(K, -1), weigh, move


# -- the full-covariance prior-corrected twist ---------------------------------------------------------
def _cov_twist(sde: SDE, P: Callable[[Tensor], Tensor], bk: Tensor, K: int, noise_std: float,
               prior_std: Any, prior_cov: Any, prior_mean: float | Tensor, eps: float) -> _CovTwist:
    """The checked ``prior_cov`` twist: (B, d, d) projector matrices of the B conditions, the prior mean (B, d)."""
    if prior_std is not None:
        raise ValueError(f"give prior_std (a diagonal prior) or prior_cov (a full one), not both; got prior_std="
                         f"{prior_std!r} and prior_cov of shape {tuple(getattr(prior_cov, 'shape', ()))}")
    B, d = bk.shape[0] // K, bk[0].numel()
    cov = _check_prior_cov(prior_cov, d, noise_std, bk)
    eye = torch.eye(d, dtype=torch.float64, device=bk.device).repeat_interleave(B, 0)  # row i * B + b: e_i
    Pm = P(eye.to(bk.dtype).view(d * B, *bk.shape[1:])).reshape(d, B, d).transpose(0, 1).double()  # (B, d, d)
    mu = _broadcast("prior_mean", prior_mean, bk[:B]).reshape(B, d).double()
    return _CovTwist(sde, Pm, bk[:B].reshape(B, d).double(), cov, mu, noise_std, eps, K)


def _check_prior_cov(prior_cov: Any, d: int, noise_std: float, like: Tensor) -> Tensor:
    """``prior_cov`` as a float64 (d, d) tensor: finite, symmetric, eigenvalues > noise_std^2."""
    if not isinstance(prior_cov, Tensor):
        raise TypeError(f"prior_cov must be a (d, d) torch.Tensor or None, got {type(prior_cov).__name__}")
    if tuple(prior_cov.shape) != (d, d):
        raise ValueError(f"prior_cov must have shape (d, d) = ({d}, {d}) (d = numel of one target row), "
                         f"got {tuple(prior_cov.shape)}")
    cov = prior_cov.to(device=like.device, dtype=torch.float64)
    check_covariance("prior_cov", cov, rel_tol=1e-8, floor=noise_std**2,
                     floor_name=f"noise_std^2 = {noise_std**2:.3g} (then the division is a Gaussian)")
    return cov


class _CovTwist:
    """The prior-corrected twist with a full covariance S: N(P x; alpha b, r^2 P) / N(P x; alpha P mu,
    alpha^2 P S P + sigma^2 P) = exp(-x^T L x / 2 + h^T x) on range(P), with (M = alpha^2 P S P + sigma^2 I
    commutes with P, so P M^-1 P is the pseudo-inverse of M on range(P))
    L = P / r^2 - P M^-1 P and h = alpha (b / r^2 - P M^-1 P mu); at eps M^-1 is dropped (same target).
    Matrices per condition (B, d, d) in float64; particles (K * B, ...) row k * B + b."""

    def __init__(self, sde: SDE, Pm: Tensor, b: Tensor, cov: Tensor, mu: Tensor, noise_std: float, eps: float,
                 K: int):
        self.sde, self.Pm, self.b, self.mu, self.noise2, self.eps, self.K = sde, Pm, b, mu, noise_std**2, eps, K
        self.PSP = Pm @ cov @ Pm
        self.quad = functools.lru_cache(maxsize=2)(self._quad)  # each step asks for t and s: once per grid time
        self.smooth = functools.lru_cache(maxsize=2)(self._smooth)

    def _quad(self, t: float) -> tuple[Tensor, Tensor]:
        """(L_t (B, d, d), h_t (B, d))."""
        a, s = _a_s(self.sde, t, self.b)
        r2 = s**2 + a**2 * self.noise2
        L, h = self.Pm / r2, a * self.b / r2
        if t != self.eps:
            eye = torch.eye(self.b.shape[1], dtype=self.b.dtype, device=self.b.device)
            A = self.Pm @ torch.linalg.solve(a**2 * self.PSP + s**2 * eye, self.Pm)  # P M^-1 P
            L, h = L - A, h - a * (A @ self.mu[..., None])[..., 0]
        return (L + L.transpose(1, 2)) / 2, h

    def _smooth(self, s: float, v: float) -> tuple[Tensor, Tensor, Tensor]:
        """W = (I + v L_s)^-1, h_s and the Cholesky factor of the move's covariance v W."""
        L, h = self.quad(s)
        eye = torch.eye(L.shape[1], dtype=L.dtype, device=L.device)
        W = torch.linalg.inv(eye + v * L)
        return W, h, torch.linalg.cholesky(v * (W + W.transpose(1, 2)) / 2)

    def _rows(self, x: Tensor) -> Tensor:  # (K * B, ...) -> (K, B, d) float64
        return x.reshape(self.K, self.b.shape[0], -1).double()

    def log_g(self, x: Tensor, t: float, v: float = 0.0) -> Tensor:
        """log of the twist at t smoothed by N(0, v I) at x: -x^T L W x / 2 + h^T W x, W = (I + v L)^-1 (+ const)."""
        u = self._rows(x)
        L, h = self.quad(t)
        if v != 0.0:  # L W = W L, symmetric
            W = self.smooth(t, v)[0]
            L, h = L @ W, torch.einsum("bij,bj->bi", W, h)
        out = -0.5 * (u * torch.einsum("bij,kbj->kbi", L, u)).sum(-1) + (h * u).sum(-1)
        return out.reshape(-1).to(x.dtype)

    def propose(self, m: Tensor, v: float, s: float, z: Tensor) -> Tensor:
        """N(W (m + v h_s), v W): the EM kernel N(m, v I) times the twist at s."""
        W, h, C = self.smooth(s, v)
        mean = torch.einsum("bij,kbj->kbi", W, self._rows(m) + v * h)
        return (mean + torch.einsum("bij,kbj->kbi", C, self._rows(z))).reshape(m.shape).to(m.dtype)


# -- class guidance ------------------------------------------------------------------------------
def smc_guidance(
    score_fn: ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    classifier: Callable[[Tensor, Tensor], Tensor],
    y: int | Tensor,
    *,
    particles: int = 16,
    ess_threshold: float = 0.5,
    steps: int = 500,
    eps: float | None = None,
    denoise_final: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> SMCResult:
    """Twisted diffusion sampler (Wu et al. 2023, Alg. 1) for p(x_0 | y) with a noisy classifier.

    Twist h_t(x) = p_t(y | x) from ``classifier(x, t)``; proposal: the EM kernel with the guided
    mean m + v grad log h_t(x_t) (classifier guidance at scale 1); incremental weight
    p(x_s | x_t) h_s(x_s) / (q(x_s | x_t) h_t(x_t)). The weighted particles target
    p_model(x_eps) h_eps(x_eps): the exact class posterior when h_eps is the true p(y | x) (the
    oracle's ``class_log_posterior``), whatever the classifier at larger t.

    Args:
        score_fn: unconditional score ``(x, t)``.
        sde: the forward SDE.
        shape: (B, ...) one condition per row of y.
        classifier: ``(x, t) -> logits (N, C)`` (log p_t(y | x) is their log-softmax at y), or
            ``(x, t) -> log p_t(y | x)`` of shape (N,); differentiable in x.
        y: class id (int) or (B,) integer tensor.
        particles: K >= 1 particles per condition.
        ess_threshold: resample when ESS / K < ess_threshold, in (0, 1].
        steps: reverse EM steps on a uniform grid from T to eps.
        eps: end time (default 1e-3; 1e-5 for VE).
        denoise_final: finish with Tweedie's E[x_0 | x_eps] (one more score call).
        generator: source of all randomness.
        device: of the particles.
        dtype: of the particles.
        callback: as in ``smc_inverse``.
        progress: show a tqdm bar.

    Returns:
        SMCResult; ``nfe`` = steps + denoise_final (the classifier runs once more than the steps).

    Raises:
        ValueError / TypeError: bad particles, ess_threshold, steps, eps, shape or class ids.
    """
    ts, x, labels = _guidance_setup(sde, shape, classifier, y, particles, ess_threshold, steps, eps, generator,
                                    device, dtype)
    calls = [0]
    state, log_w, weigh = _guidance_filter(score_fn, sde, classifier, labels, x, ts[0], particles, generator, calls)
    options = dict(particles=particles, ess_threshold=ess_threshold, steps=steps, eps=ts[-1],
                   denoise_final=denoise_final)
    return _sample(state, log_w, ts, weigh, lambda st, t, s: st, score_fn=score_fn, sde=sde, K=particles,
                   ess_threshold=ess_threshold, denoise_final=denoise_final, calls=calls, generator=generator,
                   callback=callback, progress=progress, options=options)


def _guidance_setup(sde: SDE, shape: tuple[int, ...], classifier: Callable, y: int | Tensor, particles: int,
                    ess_threshold: float, steps: int, eps: float | None, generator, device,
                    dtype) -> tuple[list[float], Tensor, Tensor]:
    """``smc_guidance``'s checks, then the grid, the (K * B, ...) prior particles and their (K * B,) labels."""
    from .guidance import _check_labels, _labels_for, _num_classes

    _check_smc(particles, ess_threshold)
    shape = tuple(shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"shape must be a tuple of positive ints (B, ...), got {shape!r}")
    y = _check_labels("smc_guidance", y, _num_classes(classifier), "classifier")
    ts, K, B = _grid(sde, steps, eps), particles, shape[0]
    x = sde.prior_sampling((K * B, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return ts, x, _labels_for(y, x[:B]).repeat(K)


def _guidance_filter(score_fn: ScoreFn, sde: SDE, classifier: Callable, labels: Tensor, x: Tensor, t0: float, K: int,
                     generator, calls: list[int]) -> tuple[State, Tensor, Weigh]:
    """``smc_guidance``'s initial state and (K, B) log weights (the twist at t0), and its proposal + reweighting."""

    def twist(x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = classifier(x_in, _times(t, x))
            log_h = torch.log_softmax(out, 1).gather(1, labels[:, None])[:, 0] if out.dim() == 2 else out
            grad = torch.autograd.grad(log_h.sum(), x_in)[0]
        return log_h.detach(), grad

    def weigh(st: State, t: float, s: float) -> tuple[State, Tensor]:
        x = st["x"]
        score = score_fn(x, _times(t, x))
        calls[0] += 1
        m, v = _em_kernel(sde, score, x, t, s)
        mq = m + v * st["grad"]
        x_s = mq + math.sqrt(v) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        log_pq = ((x_s - mq).flatten(1).pow(2).sum(1) - (x_s - m).flatten(1).pow(2).sum(1)) / (2 * v)
        log_h, grad = twist(x_s, s)
        x0 = tweedie(sde, x, _times(t, x), score)
        return {"x": x_s, "log_h": log_h, "grad": grad, "x0_hat": x0}, log_h - st["log_h"] + log_pq

    log_h, grad = twist(x, t0)
    return {"x": x, "log_h": log_h, "grad": grad}, log_h.view(K, -1), weigh
