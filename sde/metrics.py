"""Sample-quality metrics: Frechet distance, KID, Inception Score, MMD, energy and sliced W2 distances.

Every distance takes two feature sets ``x`` (N, F) and ``y`` (M, F) (or their Gaussian statistics)
and accumulates in float64: covariances of 2048-d features lose digits quickly in float32.
Feature extraction lives in :mod:`sde.features`; this module is pure arithmetic on features.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ._checks import check_choice, check_int, check_positive, check_tensor
from ._io import atomic_write

__all__ = [
    "FeatureStats", "RunningStats", "compute_feature_stats", "frechet_distance", "gaussian_w2", "gaussian_kl",
    "kernel_inception_distance", "inception_score", "mmd", "energy_distance", "sliced_wasserstein",
]


def _features(name: str, x: Tensor) -> Tensor:
    """Validate a (N, F) feature matrix and return it in float64."""
    check_tensor(name, x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a (N, F) feature matrix, got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _same_width(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: x has {x.shape[1]} features, y has {y.shape[1]}; "
                         "both sets must come from the same extractor")


def _min_samples(name: str, x: Tensor, need: int, why: str) -> None:
    if x.shape[0] < need:
        raise ValueError(f"{name} has {x.shape[0]} samples; {why} needs at least {need}")


# ----------------------------------------------------------------------------------------- statistics

@dataclass
class FeatureStats:
    """Gaussian summary of a feature set: mean (F,), unbiased covariance (F, F), sample count n."""

    mean: Tensor
    cov: Tensor
    n: int

    @classmethod
    def from_features(cls, x: Tensor) -> FeatureStats:
        """Statistics of a (N, F) feature matrix, N >= 2."""
        return RunningStats().update(x).finalize()

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (.npz) atomically: a temp file in the same folder, then os.replace."""
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.cpu().numpy(), cov=self.cov.cpu().numpy(), n=np.int64(self.n))
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by :meth:`save` (float64 tensors on the CPU).

        Raises:
            ValueError: the file is not a saved FeatureStats (missing arrays or inconsistent shapes).
        """
        with np.load(os.fspath(path), allow_pickle=False) as data:
            missing = {"mean", "cov", "n"} - set(data.files)
            if missing:
                raise ValueError(f"{path} is not a FeatureStats file: missing arrays {sorted(missing)}")
            mean, cov, n = data["mean"], data["cov"], int(data["n"])
        if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2:
            raise ValueError(f"{path}: mean shape {mean.shape} and cov shape {cov.shape} are inconsistent")
        return cls(torch.from_numpy(mean).double(), torch.from_numpy(cov).double(), n)


class RunningStats:
    """Streaming mean and covariance in float64 (Chan et al. 1979 pairwise update).

    Each batch contributes its own mean and centred scatter matrix, merged exactly, so 50k
    samples never sit in memory and large feature means do not cancel catastrophically.
    """

    def __init__(self) -> None:
        self.n = 0
        self._mean: Tensor | None = None
        self._scatter: Tensor | None = None  # sum_i (x_i - mean)(x_i - mean)^T

    def update(self, x: Tensor) -> RunningStats:
        """Add a (B, F) batch of features; returns self so calls chain."""
        x = _features("x", x)
        if x.shape[0] == 0:
            return self
        if self._mean is not None and x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature sizes differ: batch has {x.shape[1]} features, earlier ones had "
                             f"{self._mean.shape[0]}")
        batch = RunningStats()
        batch.n, batch._mean = x.shape[0], x.mean(0)
        centred = x - batch._mean
        batch._scatter = centred.T @ centred
        return self.merge(batch)

    def merge(self, other: RunningStats) -> RunningStats:
        """Fold another stream's statistics into this one (the exact pairwise merge); returns self.

        Args:
            other: statistics of disjoint samples (e.g. another rank's); left unchanged.

        Raises:
            TypeError / ValueError: ``other`` is not a RunningStats, or its feature size differs.
        """
        if not isinstance(other, RunningStats):
            raise TypeError(f"other must be a RunningStats, got {type(other).__name__}")
        if other._mean is None:
            return self
        if self._mean is None:
            self.n, self._mean, self._scatter = other.n, other._mean.clone(), other._scatter.clone()
            return self
        if other._mean.shape != self._mean.shape:
            raise ValueError(f"feature sizes differ: other has {other._mean.shape[0]} features, this has "
                             f"{self._mean.shape[0]}")
        nb, n = other.n, self.n + other.n
        delta = other._mean.to(self._mean.device) - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._scatter = (self._scatter + other._scatter.to(self._mean.device)
                         + torch.outer(delta, delta) * (self.n * nb / n))
        self.n = n
        return self

    @property
    def device(self) -> torch.device | None:
        """Device of the accumulated statistics (None before the first batch)."""
        return None if self._mean is None else self._mean.device

    def to(self, device: torch.device | str | None) -> RunningStats:
        """A copy with the statistics on another device.

        Args:
            device: the target device; None keeps the current one (an empty stream is copied as is).

        Returns:
            A new RunningStats; this one is unchanged.
        """
        out = RunningStats()
        out.n = self.n
        if self._mean is not None:
            target = self._mean.device if device is None else device
            out._mean, out._scatter = self._mean.to(target, copy=True), self._scatter.to(target, copy=True)
        return out

    def finalize(self) -> FeatureStats:
        """Return the :class:`FeatureStats` so far (unbiased covariance).

        Raises:
            ValueError: fewer than 2 samples were added (a covariance needs at least 2).
        """
        if self.n < 2:
            raise ValueError(f"got {self.n} samples; a covariance needs at least 2 (and at least F+1 for a "
                             "full-rank one)")
        return FeatureStats(self._mean.clone(), self._scatter / (self.n - 1), self.n)


def compute_feature_stats(extractor: Callable[[Tensor], Tensor], batches: Iterable[Tensor]) -> FeatureStats:
    """Run ``extractor`` over ``batches`` (each (B, ...) in [-1, 1]) and stream the feature statistics."""
    stats = RunningStats()
    with torch.no_grad():
        for batch in batches:
            stats.update(extractor(batch))
    return stats.finalize()


# ----------------------------------------------------------------------------------------- Gaussian distances

def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2): symmetric PSD, so eigenvalues clipped at 0 are exact."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """tr sqrtm(S1 S2) with scipy; eps*I is added to both if the product is singular (as in TTUR's FID)."""
    root = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        offset = np.eye(s1.shape[0]) * eps
        root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm(S1 S2) has an imaginary part of {imag:.3g}: covariances are not PSD")
        root = root.real
    return float(np.trace(root))


TRACE_SQRT_METHODS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "eigh": _trace_sqrt_eigh,  # symmetric eigenvalue route: real, no eps needed
    "sqrtm": _trace_sqrt_sqrtm,  # scipy.linalg.sqrtm of the non-symmetric product (reference implementations)
}


def _gaussian_pair(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> tuple[np.ndarray, ...]:
    arrays = [torch.as_tensor(a).detach().to("cpu", torch.float64).numpy() for a in (mean1, cov1, mean2, cov2)]
    m1, s1, m2, s2 = arrays
    d = m1.shape[-1]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"feature sizes differ or shapes are wrong: means {m1.shape}, {m2.shape}, covs {s1.shape}, "
                         f"{s2.shape}; expected (F,) and (F, F) with the same F")
    return m1, s1, m2, s2


def gaussian_w2(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor, *, method: str = "eigh") -> float:
    """2-Wasserstein distance between N(m1, S1) and N(m2, S2) (Dowson & Landau 1982).

    W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed in float64.
    """
    check_choice("method", method, TRACE_SQRT_METHODS)
    m1, s1, m2, s2 = _gaussian_pair(mean1, cov1, mean2, cov2)
    w2_sq = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * TRACE_SQRT_METHODS[method](s1, s2))
    return math.sqrt(max(w2_sq, 0.0))


def frechet_distance(stats_a: FeatureStats, stats_b: FeatureStats, *, method: str = "eigh") -> float:
    """Frechet distance (FID when the features are Inception pool3; Heusel et al. 2017): W2^2 of the Gaussian fits.

    Raises:
        ValueError: the two statistics have different feature sizes.
    """
    m1, s1, m2, s2 = _gaussian_pair(stats_a.mean, stats_a.cov, stats_b.mean, stats_b.cov)
    check_choice("method", method, TRACE_SQRT_METHODS)
    value = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * TRACE_SQRT_METHODS[method](s1, s2))
    return max(value, 0.0)  # rounding can give -1e-12 for identical statistics


def gaussian_kl(mean_p: Tensor, cov_p: Tensor, mean_q: Tensor, cov_q: Tensor, *, diagonal: bool = False) -> Tensor:
    """KL(N(m_p, S_p) || N(m_q, S_q)) in nats, exact.

    KL = 1/2 [tr(S_q^-1 S_p) + d^T S_q^-1 d - D + log|S_q| - log|S_p|], d = m_q - m_p; leading batch dims broadcast.

    Args:
        mean_p, mean_q: (..., D) means.
        cov_p, cov_q: (..., D, D) covariances, or (..., D) variances when ``diagonal=True``.
        diagonal: the covariances are given as their diagonals (an explicit flag: a (D, D) tensor could be either).
    """
    for name, v in (("mean_p", mean_p), ("cov_p", cov_p), ("mean_q", mean_q), ("cov_q", cov_q)):
        check_tensor(name, v)
    diff = mean_q - mean_p
    dim = mean_p.shape[-1]
    if diagonal:
        if cov_p.shape[-1] != dim or cov_q.shape[-1] != dim:
            raise ValueError(f"diagonal=True needs (..., {dim}) variances, got cov_p {tuple(cov_p.shape)}, "
                             f"cov_q {tuple(cov_q.shape)}")
        return 0.5 * (cov_p / cov_q + diff**2 / cov_q - 1 + cov_q.log() - cov_p.log()).sum(-1)
    if cov_p.shape[-2:] != (dim, dim) or cov_q.shape[-2:] != (dim, dim):
        raise ValueError(f"cov_p {tuple(cov_p.shape)} and cov_q {tuple(cov_q.shape)} must be (..., {dim}, {dim}) "
                         f"(or (..., {dim}) variances with diagonal=True)")
    chol_q = torch.linalg.cholesky(cov_q)
    chol_p = torch.linalg.cholesky(cov_p)
    a = torch.linalg.solve_triangular(chol_q, chol_p, upper=False)  # L_q^-1 L_p: tr(S_q^-1 S_p) = |a|_F^2
    b = torch.linalg.solve_triangular(chol_q, diff.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * (chol_q.diagonal(dim1=-2, dim2=-1).log() - chol_p.diagonal(dim1=-2, dim2=-1).log()).sum(-1)
    return 0.5 * ((a**2).sum((-2, -1)) + (b**2).sum(-1) - dim + logdet)


# ----------------------------------------------------------------------------------------- sample-based distances

def _polynomial_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with k(a, b) = (a.b / F + 1)^3 (Binkowski et al. 2018, Eq. 2)."""
    dim, m, n = x.shape[1], x.shape[0], y.shape[0]
    kxx = (x @ x.T / dim + 1) ** 3
    kyy = (y @ y.T / dim + 1) ** 3
    kxy = (x @ y.T / dim + 1) ** 3
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * kxy.mean()


def kernel_inception_distance(x: Tensor, y: Tensor, *, num_subsets: int = 100, subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets (Binkowski et al. 2018).

    Args:
        x, y: (N, F) and (M, F) features.
        num_subsets: number of random subset pairs drawn.
        subset_size: subset size, capped at min(N, M); each subset is drawn without replacement.
        generator: random source for the subsets.

    Returns:
        (mean, std) of MMD^2 over the subsets. The estimate is unbiased, so it can be slightly negative.
    """
    x, y = _features("x", x), _features("y", y)
    _same_width(x, y)
    check_int("num_subsets", num_subsets, 1)
    check_int("subset_size", subset_size, 2)
    _min_samples("x", x, 2, "an unbiased MMD")
    _min_samples("y", y, 2, "an unbiased MMD")
    size = min(subset_size, x.shape[0], y.shape[0])
    rng_device = generator.device if generator is not None else "cpu"
    values = []
    for _ in range(num_subsets):
        ix = torch.randperm(x.shape[0], generator=generator, device=rng_device)[:size].to(x.device)
        iy = torch.randperm(y.shape[0], generator=generator, device=rng_device)[:size].to(y.device)
        values.append(_polynomial_mmd2(x[ix], y[iy]))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=num_subsets > 1)) if num_subsets > 1 else 0.0


def inception_score(probs: Tensor, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) per split (Salimans et al. 2016).

    Args:
        probs: (N, C) class probabilities (rows sum to 1).
        splits: the samples are cut into this many equal parts, scored separately.

    Returns:
        (mean, std) over splits. With C classes, IS lies in [1, C].
    """
    probs = _features("probs", probs)
    check_int("splits", splits, 1)
    _min_samples("probs", probs, splits, f"splits={splits}")
    if (probs < 0).any() or not torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-4):
        raise ValueError("probs must be non-negative with rows summing to 1 (pass softmax outputs, not logits)")
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(0, keepdim=True)
        kl = torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal.expand_as(part))
        scores.append(kl.sum(1).mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std()) if splits > 1 else 0.0


def _median_bandwidth(d2: Tensor) -> float:
    """Median heuristic: sigma^2 = median of pairwise squared distances / 2 (Gretton et al. 2012)."""
    off_diag = d2[~torch.eye(d2.shape[0], dtype=torch.bool, device=d2.device)] if d2.shape[0] == d2.shape[1] else d2
    return math.sqrt(max(float(off_diag.median()) / 2, 1e-12))


def mmd(x: Tensor, y: Tensor, *, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel exp(-|a-b|^2 / (2 bw^2)) (Gretton et al. 2012).

    Args:
        bandwidth: kernel width; None uses the median heuristic on the pooled samples.
    """
    x, y = _features("x", x), _features("y", y)
    _same_width(x, y)
    _min_samples("x", x, 2, "an unbiased MMD")
    _min_samples("y", y, 2, "an unbiased MMD")
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    bw = _median_bandwidth(d2) if bandwidth is None else check_positive("bandwidth", bandwidth)
    k = torch.exp(-d2 / (2 * bw**2))
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    value = (kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean()
    return float(value)


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely & Rizzo 2013), within-set terms unbiased."""
    x, y = _features("x", x), _features("y", y)
    _same_width(x, y)
    _min_samples("x", x, 2, "the energy distance")
    _min_samples("y", y, 2, "the energy distance")
    m, n = x.shape[0], y.shape[0]
    cross = torch.cdist(x, y).mean()
    within_x = torch.cdist(x, x).sum() / (m * (m - 1))
    within_y = torch.cdist(y, y).sum() / (n * (n - 1))
    return float(2 * cross - within_x - within_y)


def sliced_wasserstein(x: Tensor, y: Tensor, *, num_projections: int = 128,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011): sqrt of the mean over random unit directions
    of the exact 1-D W2^2 between the projected empirical distributions (their quantile functions).
    """
    x, y = _features("x", x), _features("y", y)
    _same_width(x, y)
    check_int("num_projections", num_projections, 1)
    _min_samples("x", x, 1, "the sliced Wasserstein distance")
    _min_samples("y", y, 1, "the sliced Wasserstein distance")
    rng_device = generator.device if generator is not None else x.device
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64, device=rng_device)
    theta = theta.to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    if px.shape[0] == py.shape[0]:
        return float(((px - py) ** 2).mean().sqrt())
    # Unequal sizes: both quantile functions are step functions; integrate exactly over the merged breakpoints.
    n, m = px.shape[0], py.shape[0]
    grid = lambda k: torch.arange(1, k + 1, dtype=torch.float64, device=x.device) / k  # noqa: E731
    edges = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64, device=x.device), grid(n), grid(m)]))
    widths, mids = edges.diff(), (edges[1:] + edges[:-1]) / 2
    qx = px[(mids * n).long().clamp(max=n - 1)]
    qy = py[(mids * m).long().clamp(max=m - 1)]
    return float((((qx - qy) ** 2) * widths[:, None]).sum(0).mean().sqrt())
