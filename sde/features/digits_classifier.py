"""A small CNN on scikit-learn's 8x8 digits: the feature extractor behind FD-digits and the digits IS.

There is no public pretrained network for 8x8 digits, so the project trains its own: fixed seed,
fixed split, a few seconds on a CPU, cached on disk and reused. Its 64-d penultimate activations
play the role of Inception's pool3 features and its softmax the role of Inception's class
probabilities (the classifier-based metrics of Heusel et al. 2017 / Salimans et al. 2016, on digits).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._cache import atomic_torch_save, resolve_cache_dir

__all__ = ["DigitsClassifier", "load_digits_split", "train_digits_classifier", "get_digits_classifier",
           "digits_accuracy", "DIGITS_CLASSIFIER_VERSION"]

DIGITS_CLASSIFIER_VERSION = 2  # bump when the architecture, split or recipe changes: old cache files are retrained
_TRAIN = {"seed": 0, "epochs": 25, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4}  # training recipe


def load_digits_split(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 images (N, 1, 8, 8) in [-1, 1] and int64 labels (N,).

    The split is the one of ``sde.data.load_dataset("digits")`` (every fifth image is test), so the
    classifier never sees the images that generative models are evaluated against.

    Args:
        split: "train" (1438 images), "test" (359) or "all" (1797).
    """
    from ..data import load_dataset

    if split not in ("train", "test", "all"):
        raise ValueError(f"split={split!r} is not supported; choose one of ['all', 'test', 'train']")
    if split == "all":
        parts = [load_digits_split(s) for s in ("train", "test")]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    ds = load_dataset("digits", split=split)
    return ds.data.float(), ds.labels.long()


class DigitsClassifier(nn.Module):
    """CNN for (B, 1, 8, 8) digits in [-1, 1]. Calling it returns the (B, 64) penultimate features.

    This follows the extractor protocol of :mod:`sde.features`: ``extractor(x) -> (B, F)``;
    :meth:`features_and_probs` also gives the class probabilities for the Inception Score.
    """

    feature_dim = 64  # width of the penultimate layer (the FD-digits feature space)
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)  # then 2x2 max-pool: 4x4
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)  # then 2x2 max-pool: 2x2
        self.fc1 = nn.Linear(64 * 2 * 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)

    def _prepare(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
        if x.dim() < 2 or x[0].numel() != 64:
            raise ValueError(f"x must be a batch of 8x8 digits, (B, 1, 8, 8), (B, 8, 8) or (B, 64); got shape "
                             f"{tuple(x.shape)}")
        w = self.fc1.weight
        return x.reshape(-1, 1, 8, 8).to(device=w.device, dtype=w.dtype)

    def _features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, 64) penultimate features, on x's device and in x's dtype."""
        return self._features(self._prepare(x)).to(device=x.device, dtype=x.dtype)

    def logits(self, x: Tensor) -> Tensor:
        """(B, 10) class logits."""
        return self.fc2(self._features(self._prepare(x))).to(device=x.device, dtype=x.dtype)

    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 64) features and (B, 10) softmax probabilities from one forward pass."""
        h = self._features(self._prepare(x))
        probs = self.fc2(h).softmax(-1)
        return h.to(device=x.device, dtype=x.dtype), probs.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def digits_accuracy(model: DigitsClassifier, split: str = "test") -> float:
    """Fraction of ``split`` digits that ``model`` labels correctly."""
    images, labels = load_digits_split(split)
    was_training = model.training
    model.eval()
    pred = model.logits(images).argmax(-1)
    model.train(was_training)
    return float((pred == labels).double().mean())


def train_digits_classifier() -> DigitsClassifier:
    """Train a fresh classifier on the fixed train split, deterministically (seeded, CPU, float32).

    The global RNG is forked, so callers' random state is untouched.
    """
    images, labels = load_digits_split("train")
    gen = torch.Generator().manual_seed(_TRAIN["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TRAIN["seed"])  # nn.Module initializers draw from the global RNG
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=_TRAIN["lr"], weight_decay=_TRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=_TRAIN["epochs"])
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster than several (and than a busy machine)
    try:
        _fit(model, opt, sched, images, labels, gen)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _fit(model: DigitsClassifier, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
         images: Tensor, labels: Tensor, gen: torch.Generator) -> None:
    for _ in range(_TRAIN["epochs"]):
        perm = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), _TRAIN["batch_size"]):
            idx = perm[start:start + _TRAIN["batch_size"]]
            loss = F.cross_entropy(model.logits(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def _cache_file(cache_dir: str | os.PathLike | None) -> Path:
    return resolve_cache_dir(cache_dir) / f"digits_classifier_v{DIGITS_CLASSIFIER_VERSION}.pt"


def _try_load(path: Path) -> DigitsClassifier | None:
    """The cached classifier, or None (with a warning) when the file is missing, corrupt or stale."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("version") != DIGITS_CLASSIFIER_VERSION:
            raise ValueError(f"version {payload.get('version')!r} != {DIGITS_CLASSIFIER_VERSION}")
        model = DigitsClassifier()
        model.load_state_dict(payload["state_dict"])
        return model.eval()
    except Exception as err:  # any unreadable cache is rebuilt, never trusted
        warnings.warn(f"ignoring unusable digits classifier cache {path} ({err}); retraining", stacklevel=3)
        return None


def get_digits_classifier(cache_dir: str | os.PathLike | None = None, *, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None) -> DigitsClassifier:
    """The project's digits classifier: loaded from the cache, or trained (seconds) and cached atomically.

    Args:
        cache_dir: folder of the cache; default ``$SCORE_SDE_CACHE`` or ``~/.cache/score_sde``.
        device, dtype: where to put the returned (frozen, eval-mode) network.
    """
    path = _cache_file(cache_dir)
    model = _try_load(path)
    if model is None:
        model = train_digits_classifier()
        atomic_torch_save({"version": DIGITS_CLASSIFIER_VERSION, "state_dict": model.state_dict(),
                           "test_accuracy": digits_accuracy(model)}, path)
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype)
