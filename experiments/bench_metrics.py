"""Sanity table for the digits metrics: classifier accuracy and FD/KID/IS of real, blurred and noise digits.

Usage: python experiments/bench_metrics.py [--cache DIR]
(trains the digits classifier into the cache on first use; ~20 s on a CPU).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sde.features import digits_accuracy, evaluate_samples, get_digits_classifier, load_digits_split


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).reshape(1, 1, 3, 3)  # 3x3 binomial blur
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", default=None, help="cache folder (default $SCORE_SDE_CACHE or ~/.cache/score_sde)")
    args = parser.parse_args()
    start = time.perf_counter()
    model = get_digits_classifier(args.cache)
    print(f"digits classifier: test accuracy {digits_accuracy(model, 'test'):.4f}, train accuracy "
          f"{digits_accuracy(model, 'train'):.4f} (load/train {time.perf_counter() - start:.1f} s)")
    test = load_digits_split("test")[0]
    gen = torch.Generator().manual_seed(0)
    candidates = {
        "test split": test,
        "test, blurred 3x3": _blur(test),
        "test + N(0, 0.3^2) noise": (test + 0.3 * torch.randn(test.shape, generator=gen)).clamp(-1, 1),
        "uniform noise": torch.rand(test.shape, generator=gen) * 2 - 1,
    }
    print(f"\n| samples ({len(test)}) vs. train split | FD-digits | KID (x1e3) | digits IS |")
    print("|---|---|---|---|")
    for name, x in candidates.items():
        r = evaluate_samples(x, "digits_train", cache_dir=args.cache, kid_subsets=50,
                             generator=torch.Generator().manual_seed(1))
        print(f"| {name} | {r['fd']:.2f} | {r['kid'] / 1e3:.2f} ± {r['kid_std'] / 1e3:.2f} | "
              f"{r['is']:.2f} ± {r['is_std']:.2f} |")


if __name__ == "__main__":
    main()
