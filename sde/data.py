"""Named datasets, all held in memory as float tensors scaled to [-1, 1].

``load_dataset(name, root=..., split=..., **opts)`` looks ``name`` up in ``DATASETS`` and
returns an ``ArrayDataset``: ``.data`` (N, C, H, W) images or (N, D) vectors, ``.labels``
(N,) long or None, and ``.shape``, ``.levels`` (quantization levels of the raw data, None
for continuous data), ``.num_classes``. Quantized data with L levels maps k -> 2k/(L-1) - 1,
and the dataset owns its dequantization and bits/dim convention (``ArrayDataset.dequantize``,
``.bpd_options()``, ``.bits_per_dim(...)``): training and every app use them. See docs/data.md.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_choice, check_int, check_nonnegative, check_tensor
from ._io import UnsafeFileError, load_npy, load_restricted_pickle, load_tensor_file
from .oracle import GaussianMixture

__all__ = ["ArrayDataset", "load_dataset", "DATASETS", "random_hflip", "default_root", "default_gmm", "dequantize",
           "dequantize_bins", "load_array"]

_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def default_root() -> Path:
    """Where on-disk datasets live unless ``root`` is given: $SCORE_SDE_DATA, else ./data."""
    return Path(os.environ.get("SCORE_SDE_DATA", "data"))


def random_hflip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image (B, C, H, W) left-right with probability p."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class ArrayDataset(torch.utils.data.Dataset):
    """An in-memory dataset; item i is ``(data[i], labels[i])``, or ``data[i]`` without labels.

    Attributes:
        data: float tensor in [-1, 1] (2-D toys: mostly within it, noise may step outside).
        labels: (N,) long tensor or None.
        shape: shape of one sample.
        levels: number of quantization levels of the raw data (256, 17 for digits) or None.
        num_classes: number of classes (0 without labels).
        name: registry name.
        classes: class names, where the source has them.
        oracle: the GaussianMixture the data were drawn from ("gmm" only), else None.
    """

    def __init__(
        self,
        data: Tensor,
        labels: Tensor | None = None,
        *,
        levels: int | None = None,
        num_classes: int = 0,
        name: str = "",
        classes: list[str] | None = None,
        oracle: GaussianMixture | None = None,
    ) -> None:
        if labels is not None and labels.shape != (data.shape[0],):
            raise ValueError(f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}")
        self.data, self.labels = data, labels
        self.levels, self.num_classes, self.name = levels, num_classes, name
        self.classes, self.oracle = classes, oracle

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i):
        return self.data[i] if self.labels is None else (self.data[i], self.labels[i])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset({self.name!r}, n={len(self)}, shape={self.shape}, levels={self.levels}, "
            f"num_classes={self.num_classes})"
        )

    def to_levels(self, x: Tensor | None = None) -> Tensor:
        """The integer levels k in [0, levels - 1] of ``x`` (default: this dataset's data).

        Raises:
            ValueError: the dataset is not quantized (levels is None).
        """
        if self.levels is None:
            raise ValueError(f"dataset {self.name!r} is continuous (levels=None): it has no integer levels")
        x = self.data if x is None else x
        return ((x.double() + 1.0) * (self.levels - 1) / 2.0).round().clamp(0, self.levels - 1).long()

    def bpd_options(self) -> dict[str, float]:
        """This dataset's bits/dim convention, as keyword arguments of ``sde.likelihood.dataset_bits_per_dim``:
        each level k's dequantization bin, of width 2 / (levels - 1), is centred on the grid point
        2k / (levels - 1) - 1, the space a model trained on data dequantized by :meth:`dequantize` lives in.

        Raises:
            ValueError: the dataset is continuous (levels is None).
        """
        L = self._levels("bits/dim")
        return {"levels": L, "scale": 2.0 * L / (L - 1), "shift": L / (L - 1)}

    def _levels(self, what: str) -> int:
        if self.levels is None:
            raise ValueError(f"dataset {self.name!r} is continuous (levels=None): {what} needs levels")
        return int(self.levels)

    def dequantize(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """This dataset's dequantization of ``x`` (its [-1, 1] grid values): :func:`dequantize` with its levels."""
        return dequantize(x, self._levels("dequantization"), generator=generator)

    def bits_per_dim(self, score_fn: Callable, sde, x: Tensor | None = None, **options):
        """Bits/dim of ``x`` (this dataset's [-1, 1] samples; default all of them) under ``score_fn``, with this
        dataset's convention (:meth:`bpd_options`): the one bits/dim every app reports.

        Args:
            score_fn: the model's score function.
            sde: its SDE.
            x: samples of this dataset (their integer levels are what is scored).
            **options: passed to :func:`sde.likelihood.dataset_bits_per_dim` (repeats, generator,
                batch_size, dtype, divergence, rtol, ...).

        Returns:
            :class:`sde.likelihood.BitsPerDim` (mean, stderr, per-sample values, logp, nfe).
        """
        from .likelihood import dataset_bits_per_dim

        return dataset_bits_per_dim(score_fn, sde, self.to_levels(x), **self.bpd_options(), **options)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        hflip: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """One epoch of ``(x, y)`` minibatches (y None without labels); ``hflip`` flips a random
        half of each image batch left-right (training augmentation)."""
        check_int("batch_size", batch_size, 1)
        if hflip and self.data.dim() != 4:
            raise ValueError(f"hflip needs (N, C, H, W) images, dataset {self.name!r} has shape {self.shape}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size].to(self.data.device)
            x = self.data[idx]
            if hflip:
                x = random_hflip(x, generator=generator)
            yield x, None if self.labels is None else self.labels[idx]


def dequantize_bins(grid: Tensor, width: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Spread grid values uniformly over bins of ``width`` centred on them: ``grid + (u - 1/2) width``,
    u ~ U[0, 1)^D drawn in ``grid``'s dtype (the one dequantization step of the loss and of bits/dim)."""
    u = torch.rand(grid.shape, generator=generator, device=grid.device, dtype=grid.dtype)
    return grid + (u - 0.5) * width


def dequantize(x: Tensor, levels: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Spread quantized data on the grid 2k / (levels - 1) - 1 uniformly over each level's bin (width
    2 / (levels - 1), centred on the grid point): the continuous density bits/dim scores
    (:meth:`ArrayDataset.bpd_options`).

    Raises:
        ValueError: levels is not an integer >= 2.
        TypeError: x is not a floating-point tensor.
    """
    check_int("levels", levels, 2)
    check_tensor("x", x, 1)
    return dequantize_bins(x, 2.0 / (levels - 1), generator=generator)


def _quantized(raw: np.ndarray, levels: int, dtype: torch.dtype) -> Tensor:
    """Integers 0..levels-1 -> [-1, 1]."""
    return torch.from_numpy(np.array(raw)).to(torch.float64).mul(2.0 / (levels - 1)).sub(1.0).to(dtype)


def _check_dtype(dtype: Any) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (data live in [-1, 1]), got {dtype!r}")


def _check_synthetic(n: int, noise: float | None, dtype: Any) -> None:
    """The shared options of the 2-D toys: n >= 1 samples, noise std >= 0, a float dtype."""
    check_int("n", n, 1)
    if noise is not None:
        check_nonnegative("noise", noise)
    _check_dtype(dtype)


def _generator(generator: torch.Generator | None, seed: int | None, split: str) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(_SPLITS.index(split) if seed is None else seed)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, targets = bunch.images.astype(np.int64), bunch.target.astype(np.int64)
    images.flags.writeable = targets.flags.writeable = False  # shared by every call
    return images, targets


# -- embedded and synthetic --------------------------------------------------------------------
def _digits(root, split: str, *, test_every: int = 5, dtype: torch.dtype = torch.float32) -> ArrayDataset:
    """scikit-learn's 8x8 digits (1797 images, values 0..16): every ``test_every``-th image is test."""
    check_int("test_every", test_every, 2)
    _check_dtype(dtype)
    all_images, all_targets = _digits_arrays()
    keep = (np.arange(len(all_targets)) % test_every == test_every - 1) == (split == "test")
    images = all_images[keep][:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(all_targets[keep])
    return ArrayDataset(_quantized(images, 17, dtype), labels, levels=17, num_classes=10, name="digits")


def _moons(root, split, *, n=10000, noise=0.05, seed=None, generator=None, dtype=torch.float32) -> ArrayDataset:
    """Two interleaved half circles, labelled by moon, scaled so the noiseless shape spans [-1, 1]."""
    _check_synthetic(n, noise, dtype)
    g = _generator(generator, seed, split)
    label = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * math.pi
    x = torch.where(label == 0, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(label == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([(x - 0.5) / 1.5, (y - 0.25) / 0.75], 1)  # x in [-1, 2], y in [-0.5, 1] -> [-1, 1]
    pts = pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return ArrayDataset(pts.to(dtype), label, num_classes=2, name="moons")


def _swiss_roll(root, split, *, n=10000, noise=0.03, seed=None, generator=None, dtype=torch.float32) -> ArrayDataset:
    """The 2-D swiss roll r = theta, theta in [1.5 pi, 4.5 pi], scaled by 1 / (4.5 pi) into [-1, 1]."""
    _check_synthetic(n, noise, dtype)
    g = _generator(generator, seed, split)
    theta = math.pi * (1.5 + 3.0 * torch.rand(n, generator=g, dtype=torch.float64))
    pts = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], 1) / (4.5 * math.pi)
    pts = pts + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return ArrayDataset(pts.to(dtype), name="swiss_roll")


def _checkerboard(root, split, *, n=10000, squares=4, seed=None, generator=None, dtype=torch.float32) -> ArrayDataset:
    """Uniform on the black cells of a ``squares`` x ``squares`` board covering [-1, 1]^2."""
    check_int("squares", squares, 2)
    _check_synthetic(n, None, dtype)
    g = _generator(generator, seed, split)
    cells = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    pick = torch.tensor(cells, dtype=torch.float64)[torch.randint(0, len(cells), (n,), generator=g)]
    pts = (pick + torch.rand(n, 2, generator=g, dtype=torch.float64)) * (2.0 / squares) - 1.0
    return ArrayDataset(pts.to(dtype), name="checkerboard")


def default_gmm(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """8 equal Gaussians (std 0.1) on the circle of radius 0.7: the default "gmm" oracle."""
    angles = torch.arange(8, dtype=dtype) * (2 * math.pi / 8)
    means = 0.7 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return GaussianMixture(means, stds=torch.full((8,), 0.1, dtype=dtype))


def _gmm(root, split, *, n=10000, oracle=None, seed=None, generator=None, dtype=torch.float32) -> ArrayDataset:
    """Samples of a GaussianMixture oracle (default ``default_gmm()``), labelled by component."""
    _check_synthetic(n, None, dtype)
    oracle = default_gmm() if oracle is None else oracle
    if not isinstance(oracle, GaussianMixture):
        raise TypeError(f"oracle must be an sde.GaussianMixture, got {type(oracle).__name__}")
    x, labels = oracle.sample(n, _generator(generator, seed, split), return_labels=True)
    return ArrayDataset(x.to(dtype), labels, num_classes=oracle.K, name="gmm", oracle=oracle)


# -- on disk -----------------------------------------------------------------------------------
def _image_folder(root, split, *, image_size=None, mode=None, dtype=torch.float32) -> ArrayDataset:
    """Every image under ``root`` (class subfolders -> labels, sorted by name; flat -> unlabelled).

    ``image_size`` (int or (H, W)) resizes; otherwise all images must share one size.
    ``mode`` is an 8-bit PIL mode ("L", "RGB", "RGBA"); default "RGB" unless every image is grayscale.
    ``split`` is not used: point ``root`` at a train or test folder.
    """
    from PIL import Image, UnidentifiedImageError

    _check_dtype(dtype)
    size = _check_image_size(image_size)
    if mode is not None:
        check_choice("mode", mode, _IMAGE_MODES)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: root {str(root)!r} is not a directory of images")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    folders = subdirs if subdirs else [root]
    paths, labels = [], []
    for k, folder in enumerate(folders):
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += found
        labels += [k] * len(found)
    if not paths:
        raise FileNotFoundError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(im.copy())
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"image_folder: cannot read image {str(p)!r}: {err}") from err
    if mode is None:
        mode = "L" if all(im.mode in ("L", "1", "I;16", "I") for im in images) else "RGB"
    arrays = []
    for p, im in zip(paths, images):
        try:
            im = im.convert(mode)
            if size is not None:
                im = im.resize((size[1], size[0]), Image.BICUBIC)
        except (OSError, ValueError) as err:
            raise ValueError(f"image_folder: cannot convert {str(p)!r} to mode {mode!r}: {err}") from err
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"image_folder: {str(p)!r} has shape {arrays[-1].shape}, not {arrays[0].shape}; "
                "pass image_size to resize"
            )
    lab = torch.tensor(labels, dtype=torch.long) if subdirs else None
    classes = [d.name for d in subdirs] if subdirs else None
    return ArrayDataset(
        _quantized(np.stack(arrays), 256, dtype),
        lab,
        levels=256,
        num_classes=len(subdirs),
        name="image_folder",
        classes=classes,
    )


_IMAGE_MODES = ("L", "RGB", "RGBA")  # 8-bit PIL modes image_folder converts to: 1, 3 or 4 channels


def _check_image_size(image_size: Any) -> tuple[int, int] | None:
    """None, an int or an (H, W) pair of ints >= 1."""
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, int) else image_size
    ok = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2  # tuple, list, ListConfig
    if not (ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in pair)):
        raise ValueError(f"image_size must be an int >= 1 or an (H, W) pair of them, got {image_size!r}")
    return int(pair[0]), int(pair[1])


def _find(root: Path, names: list[str], where: list[Path], dataset: str) -> list[Path]:
    """The first folder in ``where`` holding every file of ``names`` (each optionally .gz)."""
    for folder in where:
        found = [next((folder / c for c in (n, n + ".gz") if (folder / c).is_file()), None) for n in names]
        if all(found):
            return found
    tried = ", ".join(repr(str(f)) for f in where)
    raise FileNotFoundError(f"{dataset}: expected files {names} (optionally .gz) in one of {tried}; see docs/data.md")


_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _read_cifar_pickle(path: Path) -> Any:
    """One CIFAR-10 python file through the restricted unpickler (sde._io: numpy arrays only)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return load_restricted_pickle(f, path)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) of one data batch."""
    try:
        batch = _read_cifar_pickle(path)
        arr = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        lab = np.asarray(batch[b"labels"], dtype=np.int64)
    except UnsafeFileError:
        raise
    except Exception as err:
        raise ValueError(
            f"cifar10: {str(path)!r} is not a CIFAR-10 python batch (a pickled dict with b'data' (N, 3072) "
            f"uint8 and b'labels'): {err}"
        ) from err
    if lab.shape != (arr.shape[0],):
        raise ValueError(f"cifar10: {str(path)!r} has {arr.shape[0]} images but {lab.shape} labels")
    return arr, lab


def _cifar_classes(folder: Path) -> list[str]:
    """Class names from ``batches.meta`` when it is there (restricted unpickler too), else the standard ten."""
    path = folder / "batches.meta"
    if not path.is_file():
        return list(_CIFAR_CLASSES)
    meta = _read_cifar_pickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == 10 and all(isinstance(n, bytes) for n in names)):
        raise ValueError(f"cifar10: {str(path)!r} has no b'label_names' list of 10 byte strings")
    return [n.decode("utf-8", "replace") for n in names]


def _cifar10(root, split, *, dtype=torch.float32) -> ArrayDataset:
    """CIFAR-10 from the python-pickle folder ``cifar-10-batches-py`` (in ``root`` or being ``root``).

    The batches are read with a restricted unpickler: a file that references anything but
    numpy arrays is refused (sde._io, docs/security.md).
    """
    _check_dtype(dtype)
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = _find(root, names, [root / "cifar-10-batches-py", root], "cifar10")
    data, labels = zip(*(_cifar_batch(path) for path in paths))
    return ArrayDataset(
        _quantized(np.concatenate(data), 256, dtype),
        torch.from_numpy(np.concatenate(labels)),
        levels=256,
        num_classes=10,
        name="cifar10",
        classes=_cifar_classes(paths[0].parent),
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array (LeCun's MNIST format): magic 0x0000080<ndim>, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        (magic,) = struct.unpack(">I", raw[:4])
        if magic != 0x800 + ndim:
            raise ValueError(f"magic number {magic:#010x}, expected {0x800 + ndim:#010x}")
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != math.prod(dims):
            raise ValueError(f"{body.size} data bytes for dims {dims}")
    except (OSError, EOFError, struct.error, ValueError) as err:
        raise ValueError(f"mnist: {str(path)!r} is not a {ndim}-d unsigned-byte idx file: {err}") from err
    return body.reshape(dims)


def _mnist(root, split, *, dtype=torch.float32) -> ArrayDataset:
    """MNIST from the four idx files (train-/t10k-images-idx3-ubyte, -labels-idx1-ubyte, optionally .gz)."""
    _check_dtype(dtype)
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    img_path, lab_path = _find(root, names, [root, root / "MNIST" / "raw", root / "mnist"], "mnist")
    images, labels = _read_idx(img_path, 3), _read_idx(lab_path, 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"mnist: {images.shape[0]} images in {str(img_path)!r} but {labels.shape[0]} labels")
    return ArrayDataset(
        _quantized(images[:, None], 256, dtype),
        torch.from_numpy(labels.astype(np.int64)),
        levels=256,
        num_classes=10,
        name="mnist",
    )


def load_array(path: str | os.PathLike, *, what: str = "array") -> Tensor:
    """A tensor stored in ``path``: a ``.npy`` file (``np.load(allow_pickle=False)``) or a torch file
    (``torch.load(weights_only=True)``); nothing in the file can choose code to run.

    Args:
        path: the file.
        what: the argument or config key it came from, for error messages (e.g. "control.mask").

    Returns:
        The tensor (CPU).

    Raises:
        FileNotFoundError: no such file.
        sde._io.UnsafeFileError (a ValueError): the file asks for pickled objects.
        ValueError: the file is unreadable or does not hold a single tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
    raw = load_npy(path, what) if path.suffix == ".npy" else load_tensor_file(path, what)
    if isinstance(raw, np.ndarray):
        return torch.from_numpy(raw)
    if not isinstance(raw, Tensor):
        raise ValueError(f"{what}: {str(path)!r} holds a {type(raw).__name__}, expected one tensor or array")
    return raw


# name -> loader(root, split, **opts); on-disk loaders get root (default_root() if None)
DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": _digits,
    "moons": _moons,
    "swiss_roll": _swiss_roll,
    "checkerboard": _checkerboard,
    "gmm": _gmm,
    "image_folder": _image_folder,
    "cifar10": _cifar10,
    "mnist": _mnist,
}
_ON_DISK = {"image_folder", "cifar10", "mnist"}


def load_dataset(name: str, *, root: str | os.PathLike | None = None, split: str = "train", **opts) -> ArrayDataset:
    """Load the dataset registered as ``name`` (see ``DATASETS`` and docs/data.md).

    Args:
        name: one of DATASETS.
        root: folder of on-disk datasets (default: $SCORE_SDE_DATA or ./data); ignored by the others.
        split: "train" or "test".
        **opts: options of that dataset (n, seed, generator, image_size, dtype, ...).

    Raises:
        ValueError: unknown name/split, or a corrupt file.
        TypeError: an option the dataset does not take.
        FileNotFoundError: the expected files are missing (the message lists them).
    """
    check_choice("name", name, DATASETS)
    check_choice("split", split, _SPLITS)
    if name in _ON_DISK and root is None:
        root = default_root()
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__} ({root!r:.60})")
    try:
        return DATASETS[name](root, split, **opts)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"load_dataset({name!r}): {err}; see docs/data.md for its options") from err
        raise
