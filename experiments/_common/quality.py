"""Sample quality against reference data: the metrics evaluate.py and the study (experiments/study.py) report."""

from __future__ import annotations

import torch

__all__ = ["quality"]


def quality(x: torch.Tensor, ref: torch.Tensor, digits: bool, generator: torch.Generator) -> dict:
    """Distances between generated samples x and reference data ref (both in [-1, 1])."""
    from sde.metrics import (
        FeatureStats,
        energy_distance,
        frechet_distance,
        inception_score,
        kernel_inception_distance,
        mmd,
        sliced_wasserstein,
    )

    a, b = x.flatten(1).double(), ref.flatten(1).double()
    out = {"mmd": mmd(a, b), "energy_distance": energy_distance(a, b),
           "sliced_w2": sliced_wasserstein(a, b, generator=generator)}
    if digits:
        from sde.features.digits_classifier import get_digits_classifier

        clf = get_digits_classifier(device=x.device, dtype=torch.float32)
        fx, px = clf.features_and_probs(x.float())
        fr = clf(ref.float())
        out["fd_digits"] = frechet_distance(FeatureStats.from_features(fx), FeatureStats.from_features(fr))
        out["kid"], _ = kernel_inception_distance(fx, fr, num_subsets=50, subset_size=min(len(fx), len(fr), 100),
                                                  generator=generator)
        out["inception_score"], _ = inception_score(px, splits=1)
    return out
