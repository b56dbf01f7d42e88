"""InceptionV3 for FID (Szegedy et al. 2016; Heusel et al. 2017), loading pytorch-fid's weights file.

The TensorFlow graph used by the original FID code (inception-2015-12-05) differs from the
textbook InceptionV3 in three places, which this module reproduces so that its pool3 features
match the reference ones: (1) the average-pool branch of the A, C and first E blocks ignores
zero padding (TF "SAME" average pooling), (2) the last E block uses a max-pool branch, and
(3) the classifier has 1008 outputs. Module names follow torchvision's naming, which is what the
converted ``pt_inception-2015-12-05-*.pth`` state dict uses, so that file loads without renaming.
Nothing is downloaded: the caller points to the file.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._io import load_tensor_file

__all__ = ["FIDInceptionV3", "load_fid_inception"]


class _ConvBN(nn.Module):
    """Bias-free convolution, batch norm (TF's epsilon 1e-3) and ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF SAME pooling excludes padding


class _BlockA(nn.Module):  # 35x35 mixing block: 1x1, 5x5, double 3x3 and pool branches
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _ReductionB(nn.Module):  # 35x35 -> 17x17 grid reduction
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):  # 17x17 block with factorized 7x7 convolutions (1x7 then 7x1)
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class _ReductionD(nn.Module):  # 17x17 -> 8x8 grid reduction
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):  # 8x8 block with split 1x3 / 3x1 outputs; ``max_pool`` marks the TF graph's last block
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 as in TF's FID graph. Calling it maps (B, C, H, W) images in [-1, 1] to (B, 2048) pool3 features.

    Args:
        resize: inputs are resized bilinearly to resize x resize first (299 for FID; >= 75 works).

    Single-channel inputs are repeated to RGB. :meth:`features_and_probs` also returns the 1008-way
    softmax used by the Inception Score.
    """

    feature_dim = 2048
    num_classes = 1008

    def __init__(self, resize: int = 299) -> None:
        super().__init__()
        self.resize = resize
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, self.num_classes)

    def _pool3(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"x must be a float (B, 1 or 3, H, W) image batch in [-1, 1], got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        w = self.fc.weight
        x = x.to(device=w.device, dtype=w.dtype).expand(-1, 3, -1, -1)
        # Resizing is linear, so resizing [-1, 1] equals pytorch-fid's resize-in-[0, 1]-then-rescale.
        x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean((2, 3))  # global average pool: the 2048-d "pool3" features

    def forward(self, x: Tensor) -> Tensor:
        """(B, 2048) pool3 features, on x's device and in x's dtype."""
        return self._pool3(x).to(device=x.device, dtype=x.dtype)

    def features_and_probs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 2048) features and (B, 1008) softmax probabilities."""
        h = self._pool3(x)
        return h.to(device=x.device, dtype=x.dtype), self.fc(h).softmax(-1).to(device=x.device, dtype=x.dtype)


def load_fid_inception(path: str | os.PathLike, *, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, resize: int = 299) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` from a local pytorch-fid weights file (pt_inception-2015-12-05-*.pth).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict of this format; the missing and unexpected keys are listed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path!r} not found; download pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth once and pass its path")
    state = load_tensor_file(path, "Inception weights")
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    model = FIDInceptionV3(resize=resize)
    expected = model.state_dict()
    # num_batches_tracked is a training counter that older exports omit; it never affects features.
    want = {k for k in expected if not k.endswith("num_batches_tracked")}
    have = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(want - have), sorted(have - want)
    wrong_shape = sorted(k for k in want & have if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        def show(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        raise ValueError(f"{path!r} is not a pytorch-fid InceptionV3 state dict: missing keys {show(missing)}, "
                         f"unexpected keys {show(unexpected)}, wrong shapes {show(wrong_shape)}")
    model.load_state_dict({k: v for k, v in state.items() if k in want}, strict=False)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)
