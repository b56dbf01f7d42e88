"""Reference features cached on disk, and ``evaluate_samples``: FD / KID / IS of samples in one call."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_tensor
from .._io import atomic_write
from ..metrics import FeatureStats, RunningStats, frechet_distance, inception_score, kernel_inception_distance
from ._cache import resolve_cache_dir
from .digits_classifier import DIGITS_CLASSIFIER_VERSION, get_digits_classifier, load_digits_split

__all__ = ["REFERENCES", "extract_features", "reference_features", "evaluate_samples"]

# name -> (images loader, tag of the extractor whose features are cached). Digits only for now:
# Inception references need a user-supplied weights file and dataset, so they go through
# compute_feature_stats + FeatureStats.save instead.
REFERENCES: dict[str, Callable[[], Tensor]] = {
    "digits": lambda: load_digits_split("all")[0],  # all 1797 images: what generative models train on by default
    "digits_train": lambda: load_digits_split("train")[0],
    "digits_test": lambda: load_digits_split("test")[0],
}


@torch.no_grad()
def extract_features(extractor: Callable[[Tensor], Tensor], images: Tensor, *,
                     batch_size: int = 500) -> tuple[Tensor, Tensor | None]:
    """Features (N, F) (and probabilities (N, C) when the extractor has ``features_and_probs``) in batches."""
    check_tensor("images", images, min_dim=2)
    check_int("batch_size", batch_size, 1)
    feats, probs = [], []
    for batch in images.split(batch_size):
        if hasattr(extractor, "features_and_probs"):
            f, p = extractor.features_and_probs(batch)
            probs.append(p)
        else:
            f = extractor(batch)
        feats.append(f)
    return torch.cat(feats), (torch.cat(probs) if probs else None)


def reference_features(reference: str = "digits", cache_dir: str | os.PathLike | None = None) -> Tensor:
    """Digits-classifier features (N, 64) float64 of a named reference set, computed once and cached (.npz).

    The cache file name carries the classifier version, so retraining recipes never mix with old features.
    """
    check_choice("reference", reference, REFERENCES)
    folder = resolve_cache_dir(cache_dir)
    path = folder / f"ref_{reference}_digitscnn_v{DIGITS_CLASSIFIER_VERSION}.npz"
    cached = _load_features(path)
    if cached is not None:
        return cached
    model = get_digits_classifier(folder)
    feats, _ = extract_features(model, REFERENCES[reference]())
    feats = feats.double()
    _save_features(path, feats)
    return feats


def _load_features(path: Path) -> Tensor | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return torch.from_numpy(data["features"]).double()
    except (OSError, KeyError, ValueError):  # missing or corrupt: recompute
        return None


def _save_features(path: Path, feats: Tensor) -> None:
    buf = io.BytesIO()
    np.savez(buf, features=feats.cpu().numpy())
    atomic_write(path, buf.getvalue())


def evaluate_samples(samples: Tensor, reference: str = "digits", *, metrics: tuple[str, ...] = ("fd", "kid", "is"),
                     kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10,
                     batch_size: int = 500, cache_dir: str | os.PathLike | None = None,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """FD-digits, KID and digits-IS of generated digits against a cached reference set.

    Args:
        samples: (N, 1, 8, 8) (or (N, 64)) generated digits in [-1, 1]; N >= 2 (FD wants N > 64).
        reference: a key of :data:`REFERENCES`.
        metrics: any of "fd", "kid", "is".
        kid_subsets, kid_subset_size: KID's subset count and size (capped at the set sizes).
        is_splits: Inception-Score splits (capped at N).
        batch_size: feature-extraction batch size.
        cache_dir: cache folder for the classifier and the reference features.
        generator: random source of the KID subsets.

    Returns:
        dict with "fd", "kid", "kid_std", "is", "is_std" (those requested) and "n_samples".
    """
    check_tensor("samples", samples, min_dim=2)
    for name in metrics:
        check_choice("metrics", name, ("fd", "kid", "is"))
    ref = reference_features(reference, cache_dir)
    model = get_digits_classifier(cache_dir)
    feats, probs = extract_features(model, samples.detach().cpu().float(), batch_size=batch_size)
    out: dict[str, float] = {"n_samples": float(samples.shape[0])}
    if "fd" in metrics:
        out["fd"] = frechet_distance(RunningStats().update(feats).finalize(), FeatureStats.from_features(ref))
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kernel_inception_distance(feats, ref, num_subsets=kid_subsets,
                                                               subset_size=kid_subset_size, generator=generator)
    if "is" in metrics:
        out["is"], out["is_std"] = inception_score(probs, splits=min(is_splits, samples.shape[0]))
    return out
