"""Feature extractors for sample-quality metrics; nothing is downloaded at run time.

Extractor protocol: ``extractor(x) -> (B, F)`` features for images ``x`` in [-1, 1]; extractors
that classify also offer ``extractor.features_and_probs(x) -> ((B, F), (B, C))``.

- :class:`DigitsClassifier` / :func:`get_digits_classifier`: a CNN on 8x8 digits, trained by the
  project in seconds and cached; defines FD-digits and the digits IS.
- :class:`FIDInceptionV3` / :func:`load_fid_inception`: InceptionV3 for FID from a local
  pytorch-fid weights file.
"""

from ._cache import CACHE_ENV, default_cache_dir
from .digits_classifier import (
    DIGITS_CLASSIFIER_VERSION,
    DigitsClassifier,
    digits_accuracy,
    get_digits_classifier,
    load_digits_split,
    train_digits_classifier,
)
from .inception import FIDInceptionV3, load_fid_inception
from .reference import REFERENCES, evaluate_samples, extract_features, reference_features

__all__ = [
    "CACHE_ENV", "default_cache_dir", "DIGITS_CLASSIFIER_VERSION", "DigitsClassifier", "digits_accuracy",
    "get_digits_classifier", "load_digits_split", "train_digits_classifier", "FIDInceptionV3", "load_fid_inception",
    "REFERENCES", "evaluate_samples", "extract_features", "reference_features",
]
