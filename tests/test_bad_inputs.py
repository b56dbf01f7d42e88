"""The catalogue of bad inputs: each one fails early with the right error type and a message that
names the argument (and mostly the value and what is allowed).

One row per bad input: ``(id, call, error type, regex the message must match)``. The classes of
issue 13 are all here: silent (tensor times outside [0, T] or NaN, negative dt, a wrong-shape
score, NaN data / oracle parameters), obscure (integer dtypes, negative sizes, an SDE given as a
string, NaN reaching the ODE solver, bad files) and unclear (a NaN x_T, non-callables, image-folder
files). TrainConfig rows live in tests/test_guard.py; file payloads in tests/test_security.py.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sde import samplers
from sde.data import ArrayDataset, load_dataset
from sde.guidance import NoiseConditionalClassifier, cfg_score, classifier_guided_score
from sde.inverse import (
    colorization_constraint,
    dps_score,
    inpainting_constraint,
    replacement_score,
    solve_inverse,
    super_resolution_constraint,
)
from sde.likelihood import bits_per_dim, dataset_bits_per_dim, decode, encode, log_likelihood
from sde.losses import dequantize, dsm_loss, sample_time
from sde.oracle import GaussianMixture
from sde.samplers import ode, pc, sample
from sde.sdes import VESDE, VPSDE, SubVPSDE
from sde.training import EMA, TrainConfig, Trainer, load_checkpoint, warmup_lr
from sde.training.checkpoint import CheckpointMismatchError

from _py2pickle import dumps_py2  # isort: skip  (tests/ helper: CIFAR-10's Python 2 pickle format)

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
B = 4
VP = VPSDE()
X = torch.randn(B, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
GM = GaussianMixture(torch.tensor([[0.5, 0.0], [-0.5, 0.0]], dtype=torch.float64), stds=torch.tensor([0.3, 0.3]))
SCORE = GM.score_fn(VP)


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x.view(-1)[0] = NAN
    return x


def wrong_shape_score(x, t):
    return SCORE(x, t)[:, :1]  # (B, 1): broadcasts against (B, 2) silently without the check


def numpy_score(x, t):
    return SCORE(x, t).numpy()


class Net(nn.Module):
    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(3, out).double()

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None].to(x.dtype)], 1))


def toy_loss(model, sde, x0, *, generator=None):
    return model(x0, torch.full((x0.shape[0],), 0.5, dtype=x0.dtype)).pow(2).mean()


def trainer(**kw):
    options = dict(
        model=Net(),
        sde=VP,
        data=X.repeat(16, 1),
        config=TrainConfig(total_steps=2, batch_size=8, progress=False, warmup_steps=0),
        loss_fn=toy_loss,
    )
    options.update(kw)
    return Trainer(options.pop("model"), options.pop("sde"), options.pop("data"), options.pop("config"), **options)


# ----------------------------------------------------------------------------------------------- SDEs
SDE_CASES = [
    ("vp-beta_min-nan", lambda: VPSDE(beta_min=NAN), ValueError, r"beta_min must be a finite number > 0, got nan"),
    ("vp-beta_min-negative", lambda: VPSDE(beta_min=-0.1), ValueError, r"beta_min .*got -0\.1"),
    ("vp-beta_max-inf", lambda: VPSDE(beta_max=INF), ValueError, r"beta_max .*got inf"),
    ("vp-beta-order", lambda: VPSDE(beta_min=2.0, beta_max=1.0), ValueError, r"beta_min must be < beta_max"),
    ("vp-schedule", lambda: VPSDE(schedule="quadratic"), ValueError, r"schedule='quadratic'.*cosine.*linear"),
    ("vp-N-zero", lambda: VPSDE(N=0), ValueError, r"N must be >= 1, got 0"),
    ("vp-N-float", lambda: VPSDE(N=1.5), TypeError, r"N must be an int.*1\.5"),
    ("subvp-beta_max-str", lambda: SubVPSDE(beta_max="20"), TypeError, r"beta_max must be a number, got str"),
    ("ve-sigma_min-zero", lambda: VESDE(sigma_min=0.0), ValueError, r"sigma_min .*got 0\.0"),
    ("ve-sigma-order", lambda: VESDE(sigma_min=60.0), ValueError, r"sigma_min must be < sigma_max.*60"),
    (
        "t-tensor-above-T",
        lambda: VP.marginal_prob(X, torch.full((B,), 1.5)),
        ValueError,
        r"t must lie in \[0, 1\.0\].*1\.5",
    ),
    ("t-tensor-negative", lambda: VP.marginal_prob(X, torch.full((B,), -0.1)), ValueError, r"t must lie in .*-0\.1"),
    ("t-tensor-nan", lambda: VP.marginal_prob(X, with_nan(torch.full((B,), 0.5))), ValueError, r"t holds NaN \(1 of 4"),
    ("t-shared-view-nan", lambda: VP.marginal_prob(X, torch.tensor([NAN]).expand(B)), ValueError, r"t holds NaN"),
    (
        "t-float64-x-float32-nan",
        lambda: VP.drift(X.float(), torch.full((B,), NAN, dtype=torch.float64)),
        ValueError,
        r"t holds NaN",
    ),
    ("t-float-above-T", lambda: VP.marginal_prob(X, 1.2), ValueError, r"t must lie in \[0, 1\.0\], got 1\.2"),
    ("t-float-nan", lambda: VP.marginal_prob(X, NAN), ValueError, r"t must lie in .*got nan"),
    (
        "t-wrong-shape",
        lambda: VP.marginal_prob(X, torch.zeros(B, 2)),
        ValueError,
        r"t must be a float or a tensor of shape \(4,\)",
    ),
    ("t-str", lambda: VP.marginal_prob(X, "0.5"), TypeError, r"t must be a float or a Tensor, got str"),
    (
        "x0-int",
        lambda: VP.perturb(torch.ones(B, 2, dtype=torch.long), 0.5),
        TypeError,
        r"x0 must be a floating-point tensor",
    ),
    ("x0-list", lambda: VP.marginal_prob([[0.0, 1.0]], 0.5), TypeError, r"x0 must be a torch.Tensor, got list"),
    ("dt-negative", lambda: VP.discretize(X, 0.5, dt=-0.01), ValueError, r"dt must be a finite number > 0, got -0\.01"),
    ("dt-zero-ve", lambda: VESDE().discretize(X, 0.5, dt=0.0), ValueError, r"dt must be a finite number > 0, got 0\.0"),
    ("dt-nan-subvp", lambda: SubVPSDE().discretize(X, 0.5, dt=NAN), ValueError, r"dt .*nan"),
    ("prior-negative-size", lambda: VP.prior_sampling((-1, 2)), ValueError, r"shape must be .*ints >= 1.*\(-1, 2\)"),
    ("prior-int-shape", lambda: VP.prior_sampling(5), ValueError, r"shape must be a non-empty tuple.*got 5"),
    (
        "prior-int-dtype",
        lambda: VP.prior_sampling((4, 2), dtype=torch.int64),
        TypeError,
        r"dtype must be a floating-point",
    ),
    ("reverse-score-str", lambda: VP.reverse("score"), TypeError, r"score_fn must be callable .*got str"),
]

# --------------------------------------------------------------------------------------------- oracle
MEANS = torch.zeros(2, 2, dtype=torch.float64)
ORACLE_CASES = [
    ("means-nan", lambda: GaussianMixture(with_nan(MEANS), stds=0.1), ValueError, r"means holds 1 non-finite"),
    ("stds-nan", lambda: GaussianMixture(MEANS, stds=torch.tensor([0.1, NAN])), ValueError, r"stds holds 1 non-finite"),
    (
        "weights-nan",
        lambda: GaussianMixture(MEANS, stds=0.1, weights=torch.tensor([NAN, 0.5])),
        ValueError,
        r"weights holds 1 non-finite",
    ),
    ("covs-nan", lambda: GaussianMixture(MEANS, with_nan(torch.eye(2).repeat(2, 1, 1))), ValueError, r"covs holds 1"),
    ("means-1d", lambda: GaussianMixture(torch.zeros(2), stds=0.1), ValueError, r"means must have at least 2 dims"),
    (
        "means-int",
        lambda: GaussianMixture(torch.zeros(2, 2, dtype=torch.long), stds=0.1),
        TypeError,
        r"means must be a floating-point tensor",
    ),
    (
        "means-empty",
        lambda: GaussianMixture(torch.zeros(0, 2), stds=0.1),
        ValueError,
        r"means must have shape \(K, D\) with K, D >= 1",
    ),
    (
        "covs-and-stds",
        lambda: GaussianMixture(MEANS, torch.eye(2).repeat(2, 1, 1), stds=0.1),
        ValueError,
        r"exactly one of covs",
    ),
    (
        "covs-shape",
        lambda: GaussianMixture(MEANS, torch.eye(3).repeat(2, 1, 1)),
        ValueError,
        r"covs must have shape \(K, D, D\)",
    ),
    (
        "covs-not-pd",
        lambda: GaussianMixture(MEANS, -torch.eye(2).repeat(2, 1, 1)),
        ValueError,
        r"covs must be positive definite",
    ),
    (
        "stds-negative",
        lambda: GaussianMixture(MEANS, stds=torch.tensor([0.1, -0.1])),
        ValueError,
        r"stds must be positive.*-0\.1",
    ),
    ("stds-shape", lambda: GaussianMixture(MEANS, stds=torch.ones(3)), ValueError, r"stds must be a float, \(K,\)"),
    (
        "weights-length",
        lambda: GaussianMixture(MEANS, stds=0.1, weights=torch.ones(3) / 3),
        ValueError,
        r"weights must have shape \(K,\)",
    ),
    (
        "weights-sum",
        lambda: GaussianMixture(MEANS, stds=0.1, weights=torch.tensor([0.25, 0.25])),
        ValueError,
        r"weights must be positive and sum to one, got sum 0\.5",
    ),
    ("sample-n-zero", lambda: GM.sample(0), ValueError, r"n must be >= 1, got 0"),
    (
        "score-wrong-dim",
        lambda: GM.score(torch.zeros(B, 3, dtype=torch.float64), VP, 0.5),
        ValueError,
        r"x must have 2 features per sample",
    ),
    ("score_fn-sde-str", lambda: GM.score_fn("vp"), TypeError, r"sde must be an SDE instance .*'vp'"),
    ("marginal-t", lambda: GM.marginal(VP, 2.0), ValueError, r"t must lie in \[0, 1\.0\], got 2\.0"),
    ("log_prob-t-nan", lambda: GM.log_prob(X, VP, torch.full((B,), NAN)), ValueError, r"t holds NaN"),
    ("component-k", lambda: GM.component(5), ValueError, r"k must be in \[0, 1\], got 5"),
]

# ------------------------------------------------------------------------------------------- samplers
SAMPLER_CASES = [
    ("sampler-name", lambda: sample(SCORE, VP, (B, 2), sampler="bogus"), ValueError, r"sampler='bogus'.*ode"),
    ("sde-str", lambda: sample(SCORE, "vp", (B, 2)), TypeError, r"sde must be an SDE instance.*str.*'vp'"),
    ("sde-class", lambda: sample(SCORE, VPSDE, (B, 2)), TypeError, r"sde must be an SDE instance"),
    ("shape-negative", lambda: sample(SCORE, VP, (-4, 2)), ValueError, r"shape_or_x_T must be .*\(-4, 2\)"),
    ("batch_size-zero", lambda: sample(SCORE, VP, (B, 2), batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (
        "x_T-int",
        lambda: sample(SCORE, VP, torch.ones(B, 2, dtype=torch.long)),
        TypeError,
        r"shape_or_x_T must be a floating-point tensor",
    ),
    ("x_T-nan", lambda: sample(SCORE, VP, with_nan(X), sampler="ode"), ValueError, r"x_T holds 1 non-finite"),
    ("x_T-inf-pc", lambda: pc(SCORE, VP, X * INF, steps=2), ValueError, r"x_T holds 8 non-finite"),
    (
        "callback-int",
        lambda: sample(SCORE, VP, X, sampler="ode", callback=5),
        TypeError,
        r"callback must be callable as callback\(info: dict\), got int",
    ),
    (
        "callback-str-direct",
        lambda: pc(SCORE, VP, X, steps=30, callback="log"),
        TypeError,
        r"callback must be callable",
    ),
    ("score-none", lambda: sample(None, VP, X, steps=30), TypeError, r"score_fn must be callable .*got NoneType"),
    (
        "score-wrong-shape-pc",
        lambda: sample(wrong_shape_score, VP, X, steps=30),
        ValueError,
        r"score_fn returned shape \(4, 1\) for x of shape \(4, 2\)",
    ),
    ("score-wrong-shape-ode", lambda: ode(wrong_shape_score, VP, X), ValueError, r"score_fn returned shape \(4, 1\)"),
    (
        "score-wrong-shape-ddim",
        lambda: sample(wrong_shape_score, VP, X, sampler="ddim", steps=2),
        ValueError,
        r"score_fn returned shape",
    ),
    (
        "score-numpy",
        lambda: sample(numpy_score, VP, X, sampler="heun", steps=2),
        TypeError,
        r"score_fn must return a torch.Tensor shaped like x, got ndarray",
    ),
    ("steps-zero", lambda: sample(SCORE, VP, X, steps=0), ValueError, r"steps must be >= 1, got 0"),
    ("steps-float", lambda: sample(SCORE, VP, X, sampler="ddim", steps=2.5), TypeError, r"steps must be an int.*2\.5"),
    (
        "eps-zero",
        lambda: sample(SCORE, VP, X, steps=2, eps=0.0),
        ValueError,
        r"eps must lie in the open interval \(0\.0, 1\.0\)",
    ),
    ("eps-above-T", lambda: sample(SCORE, VP, X, sampler="dpm_solver", steps=2, eps=1.5), ValueError, r"eps .*1\.5"),
    ("ode-method", lambda: sample(SCORE, VP, X, sampler="ode", method="bogus"), ValueError, r"method='bogus'.*dopri5"),
    (
        "ode-fixed-no-steps",
        lambda: sample(SCORE, VP, X, sampler="ode", method="rk4"),
        ValueError,
        r"method='rk4' is a fixed-grid method: give steps",
    ),
    (
        "ode-rtol",
        lambda: sample(SCORE, VP, X, sampler="ode", rtol=-1.0),
        ValueError,
        r"rtol must be a finite number > 0, got -1\.0",
    ),
    ("pc-predictor", lambda: sample(SCORE, VP, X, predictor="bogus"), ValueError, r"predictor='bogus'"),
    ("pc-corrector", lambda: sample(SCORE, VP, X, corrector="bogus"), ValueError, r"corrector='bogus'"),
    (
        "pc-snr",
        lambda: sample(SCORE, VP, X, steps=30, snr=-1.0),
        ValueError,
        r"snr must be a finite number > 0, got -1\.0",
    ),
    ("pc-n_steps", lambda: sample(SCORE, VP, X, steps=30, n_steps=0), ValueError, r"n_steps must be >= 1, got 0"),
    ("grid", lambda: sample(SCORE, VP, X, sampler="ddim", steps=2, grid="bogus"), ValueError, r"grid='bogus'"),
    ("unknown-option", lambda: sample(SCORE, VP, X, sampler="ddim", steps=2, stepz=3), TypeError, r"stepz"),
]

# ----------------------------------------------------------------------------------------- likelihood
LL = dict(rtol=1e-3, atol=1e-3)
LIKELIHOOD_CASES = [
    ("x-nan", lambda: log_likelihood(SCORE, VP, with_nan(X), **LL), ValueError, r"x holds 1 non-finite"),
    (
        "x-int",
        lambda: log_likelihood(SCORE, VP, torch.ones(B, 2, dtype=torch.long)),
        TypeError,
        r"x must be a floating-point",
    ),
    ("x-1d", lambda: log_likelihood(SCORE, VP, X[0]), ValueError, r"x must have at least 2 dims"),
    ("divergence", lambda: log_likelihood(SCORE, VP, X, divergence="bogus"), ValueError, r"divergence='bogus'.*exact"),
    ("probe", lambda: log_likelihood(SCORE, VP, X, probe="bogus"), ValueError, r"probe='bogus'.*rademacher"),
    ("n_probes", lambda: log_likelihood(SCORE, VP, X, n_probes=0), ValueError, r"n_probes must be >= 1, got 0"),
    ("method", lambda: log_likelihood(SCORE, VP, X, method="bogus"), ValueError, r"method='bogus'"),
    ("rtol", lambda: log_likelihood(SCORE, VP, X, rtol=0.0), ValueError, r"rtol must be a finite number > 0, got 0\.0"),
    ("eps", lambda: log_likelihood(SCORE, VP, X, eps=0.0), ValueError, r"eps must lie in the open interval"),
    ("sde-str", lambda: log_likelihood(SCORE, "vp", X), TypeError, r"sde must be an SDE instance"),
    (
        "score-wrong-shape",
        lambda: log_likelihood(wrong_shape_score, VP, X, **LL),
        ValueError,
        r"score_fn returned shape \(4, 1\)",
    ),
    ("score-not-callable", lambda: log_likelihood(42, VP, X), TypeError, r"score_fn must be callable .*got int"),
    ("batch_size", lambda: log_likelihood(SCORE, VP, X, batch_size=0, **LL), ValueError, r"batch_size must be >= 1"),
    ("encode-x-nan", lambda: encode(SCORE, VP, with_nan(X)), ValueError, r"x holds 1 non-finite"),
    ("decode-z-nan", lambda: decode(SCORE, VP, with_nan(X)), ValueError, r"z holds 1 non-finite"),
    ("decode-wrong-shape", lambda: decode(wrong_shape_score, VP, X, **LL), ValueError, r"score_fn returned shape"),
    ("encode-sde-str", lambda: encode(SCORE, "ve", X), TypeError, r"sde must be an SDE instance.*'ve'"),
    ("bpd-logp-2d", lambda: bits_per_dim(torch.zeros(B, 2), 2), ValueError, r"logp must have shape \(B,\)"),
    ("bpd-num_dims", lambda: bits_per_dim(torch.zeros(B), 0), ValueError, r"num_dims must be >= 1, got 0"),
    ("bpd-levels", lambda: bits_per_dim(torch.zeros(B), 2, levels=1), ValueError, r"levels must be >= 2, got 1"),
    ("bpd-scale", lambda: bits_per_dim(torch.zeros(B), 2, scale=0.0), ValueError, r"scale must be a finite number > 0"),
    ("dataset-bpd-range", lambda: dataset_bits_per_dim(SCORE, VP, X), ValueError, r"float x must lie in \[0, 1\]"),
]

# --------------------------------------------------------------------------------------------- losses
LOSS_CASES = [
    ("x0-nan", lambda: dsm_loss(Net(), VP, with_nan(X)), ValueError, r"x0 holds 1 non-finite"),
    ("model-not-callable", lambda: dsm_loss("net", VP, X), TypeError, r"model must be callable as model\(x, t\).*str"),
    ("sde-str", lambda: dsm_loss(Net(), "vp", X), TypeError, r"sde must be an SDE instance"),
    (
        "model-wrong-shape",
        lambda: dsm_loss(Net(out=1), VP, X),
        ValueError,
        r"model returned shape \(4, 1\) for x of shape \(4, 2\)",
    ),
    ("reduce", lambda: dsm_loss(Net(), VP, X, reduce="median"), ValueError, r"reduce='median'"),
    ("eps", lambda: dsm_loss(Net(), VP, X, eps=0.0), ValueError, r"eps must lie in the open interval"),
    (
        "x0-int",
        lambda: dsm_loss(Net(), VP, torch.ones(B, 2, dtype=torch.long)),
        TypeError,
        r"x0 must be a floating-point",
    ),
    ("x0-1d", lambda: dsm_loss(Net(), VP, X[0]), ValueError, r"x0 must have at least 2 dims"),
    ("dequantize-levels", lambda: dequantize(X, 1), ValueError, r"levels must be >= 2, got 1"),
    (
        "dequantize-int",
        lambda: dequantize(torch.ones(B, 2, dtype=torch.long), 256),
        TypeError,
        r"x must be a floating-point",
    ),
    ("sample_time-batch", lambda: sample_time(VP, -1), ValueError, r"batch must be >= 1, got -1"),
]


# ----------------------------------------------------------------------------------------------- data
def _image_folder(tmp_path: Path, sizes=((8, 8),), corrupt: bool = False) -> Path:
    for i, size in enumerate(sizes):
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / f"{'ab'[i]}.png")
    if corrupt:
        (tmp_path / "bad.png").write_bytes(b"not a png")
    return tmp_path


def _cifar_with_meta(tmp: Path, meta, batch=None):
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir()
    good = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(dumps_py2(batch if batch is not None and name == "data_batch_1" else good))
    if meta is not None:
        (folder / "batches.meta").write_bytes(dumps_py2(meta))
    return load_dataset("cifar10", root=tmp)


DATA_CASES = [
    ("name", lambda tmp: load_dataset("bogus"), ValueError, r"name='bogus'.*moons"),
    ("split", lambda tmp: load_dataset("moons", split="val"), ValueError, r"split='val'.*train"),
    ("n-negative", lambda tmp: load_dataset("moons", n=-5), ValueError, r"n must be >= 1, got -5"),
    ("n-float", lambda tmp: load_dataset("gmm", n=10.5), TypeError, r"n must be an int.*10\.5"),
    (
        "noise-negative",
        lambda tmp: load_dataset("moons", noise=-0.1),
        ValueError,
        r"noise must be a finite number >= 0, got -0\.1",
    ),
    ("noise-nan", lambda tmp: load_dataset("swiss_roll", noise=NAN), ValueError, r"noise .*nan"),
    (
        "dtype-int",
        lambda tmp: load_dataset("moons", dtype=torch.int64),
        TypeError,
        r"dtype must be a floating-point.*int64",
    ),
    (
        "dtype-digits",
        lambda tmp: load_dataset("digits", dtype="float32"),
        TypeError,
        r"dtype must be a floating-point torch.dtype",
    ),
    ("unknown-option", lambda tmp: load_dataset("moons", bogus=1), TypeError, r"load_dataset\('moons'\).*bogus"),
    ("squares", lambda tmp: load_dataset("checkerboard", squares=1), ValueError, r"squares must be >= 2, got 1"),
    ("test_every", lambda tmp: load_dataset("digits", test_every=1), ValueError, r"test_every must be >= 2, got 1"),
    ("root-int", lambda tmp: load_dataset("cifar10", root=5), TypeError, r"root must be a path.*int"),
    (
        "cifar-missing",
        lambda tmp: load_dataset("cifar10", root=tmp),
        FileNotFoundError,
        r"cifar10: expected files .*data_batch_1",
    ),
    (
        "mnist-missing",
        lambda tmp: load_dataset("mnist", root=tmp),
        FileNotFoundError,
        r"mnist: expected files .*train-images",
    ),
    (
        "mnist-bad-magic",
        lambda tmp: (
            (tmp / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x01" + b"\0" * 16),
            (tmp / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\0"),
            load_dataset("mnist", root=tmp),
        ),
        ValueError,
        r"train-images-idx3-ubyte.*magic number",
    ),
    (
        "cifar-meta-malformed",
        lambda tmp: _cifar_with_meta(tmp, {b"label_names": [b"cat"]}),
        ValueError,
        r"batches\.meta.* has no b'label_names' list of 10 byte strings",
    ),
    (
        "cifar-batch-no-data",
        lambda tmp: _cifar_with_meta(tmp, None, batch={b"labels": [0]}),
        ValueError,
        r"data_batch_1.* is not a CIFAR-10 python batch .*b'data'",
    ),
    (
        "image-root-not-dir",
        lambda tmp: load_dataset("image_folder", root=tmp / "nope"),
        FileNotFoundError,
        r"root .*nope.* is not a directory",
    ),
    (
        "image-no-images",
        lambda tmp: load_dataset("image_folder", root=tmp),
        FileNotFoundError,
        r"no images .*found under",
    ),
    (
        "image-corrupt",
        lambda tmp: load_dataset("image_folder", root=_image_folder(tmp, corrupt=True)),
        ValueError,
        r"cannot read image .*bad\.png",
    ),
    (
        "image-mixed-sizes",
        lambda tmp: load_dataset("image_folder", root=_image_folder(tmp, ((8, 8), (4, 4)))),
        ValueError,
        r"b\.png.* has shape \(1, 4, 4\).*image_size",
    ),
    (
        "image-mode",
        lambda tmp: load_dataset("image_folder", root=_image_folder(tmp), mode="CMYK"),
        ValueError,
        r"mode='CMYK'.*RGB",
    ),
    (
        "image-size-zero",
        lambda tmp: load_dataset("image_folder", root=_image_folder(tmp), image_size=0),
        ValueError,
        r"image_size must be an int >= 1 .*got 0",
    ),
    (
        "image-size-pair",
        lambda tmp: load_dataset("image_folder", root=_image_folder(tmp), image_size=(8,)),
        ValueError,
        r"image_size .*\(8,\)",
    ),
    (
        "batches-batch_size",
        lambda tmp: next(load_dataset("moons", n=8).batches(0)),
        ValueError,
        r"batch_size must be >= 1",
    ),
    (
        "batches-hflip-vectors",
        lambda tmp: next(load_dataset("moons", n=8).batches(2, hflip=True)),
        ValueError,
        r"hflip needs \(N, C, H, W\) images",
    ),
    (
        "labels-shape",
        lambda tmp: ArrayDataset(torch.zeros(4, 2), torch.zeros(3)),
        ValueError,
        r"labels must have shape \(4,\)",
    ),
    ("to_levels-continuous", lambda tmp: load_dataset("moons", n=8).to_levels(), ValueError, r"'moons' is continuous"),
    ("gmm-oracle", lambda tmp: load_dataset("gmm", oracle="gmm"), TypeError, r"oracle must be an sde.GaussianMixture"),
]

# ------------------------------------------------------------------------------------------- training
TRAINING_CASES = [
    ("model-not-module", lambda: trainer(model=SCORE), TypeError, r"model must be a torch.nn.Module, got function"),
    ("loss_fn-int", lambda: trainer(loss_fn=5), TypeError, r"loss_fn must be callable .*got int"),
    ("callbacks-bare-hook", lambda: trainer(callbacks=lambda s, m, e: 1.0), TypeError, r"callbacks must be a sequence"),
    ("callbacks-entry", lambda: trainer(callbacks=[5]), TypeError, r"callbacks\[0\] must be callable"),
    ("log_fn-str", lambda: trainer(log_fn="print"), TypeError, r"log_fn must be callable"),
    ("data-nan", lambda: trainer(data=with_nan(X.repeat(16, 1))), ValueError, r"data holds 1 non-finite"),
    (
        "data-int",
        lambda: trainer(data=torch.ones(64, 2, dtype=torch.long)),
        TypeError,
        r"data must be a floating-point",
    ),
    ("config-dict", lambda: trainer(config={"lr": 1e-3}), TypeError, r"config must be a TrainConfig, got dict"),
    (
        "labels-rows",
        lambda: trainer(labels=torch.zeros(3, dtype=torch.long)),
        ValueError,
        r"labels must be a tensor with 64 rows",
    ),
    ("batch-too-large", lambda: trainer(config=TrainConfig(batch_size=128)), ValueError, r"batch_size=128 exceeds"),
    ("total_steps", lambda: TrainConfig(total_steps=-5), ValueError, r"total_steps must be >= 1, got -5"),
    ("lr-inf", lambda: TrainConfig(lr=INF), ValueError, r"lr must be a finite number > 0 .*got inf"),
    ("betas-length", lambda: TrainConfig(betas=(0.9,)), ValueError, r"betas must be a pair.*\(0\.9,\)"),
    (
        "ema-decay",
        lambda: EMA(Net(), decay=1.0),
        ValueError,
        r"decay must lie in the open interval \(0\.0, 1\.0\), got 1\.0",
    ),
    ("warmup_lr-step", lambda: warmup_lr(0, 1e-3, 10), ValueError, r"step must be >= 1, got 0"),
]


# ---------------------------------------------------------------------------------------- checkpoints
def _saved(tmp: Path, **state_overrides) -> Path:
    t = trainer(config=TrainConfig(total_steps=1, batch_size=8, progress=False, out_dir=str(tmp)))
    t.fit()
    if state_overrides:
        state = load_checkpoint(tmp / "latest.pt")
        state.update(state_overrides)
        torch.save(state, tmp / "latest.pt")
    return tmp / "latest.pt"


CHECKPOINT_CASES = [
    (
        "missing-file",
        lambda tmp: load_checkpoint(tmp / "nope.pt"),
        FileNotFoundError,
        r"checkpoint .*nope\.pt.* does not exist",
    ),
    (
        "other-model-config",
        lambda tmp: trainer(model_config={"hidden": 64}).load(_saved(tmp)),
        CheckpointMismatchError,
        r"latest\.pt was written for a different model config: hidden: checkpoint='<missing>' current=64",
    ),
    (
        "format",
        lambda tmp: trainer().load(_saved(tmp, format=99)),
        CheckpointMismatchError,
        r"latest\.pt: checkpoint format 99",
    ),
    (
        "trajectory-setting",
        lambda tmp: trainer(config=TrainConfig(total_steps=2, batch_size=8, lr=1e-3)).load(_saved(tmp)),
        CheckpointMismatchError,
        r"different training settings.*lr: checkpoint=0\.0002 current=0\.001",
    ),
]
# Bad checkpoint files still give bare errors without the path: developer B's checkpoint rewrite owns them.
CHECKPOINT_FILE_CASES = [  # unreadable or incomplete checkpoint files: the path is named
    ("empty-file", lambda tmp: (tmp / "e.pt").write_bytes(b"") or load_checkpoint(tmp / "e.pt"), ValueError, r"e\.pt"),
    (
        "truncated",
        lambda tmp: (tmp / "t.pt").write_bytes(_saved(tmp).read_bytes()[:100]) and load_checkpoint(tmp / "t.pt"),
        ValueError,
        r"t\.pt",
    ),
    (
        "missing-key",
        lambda tmp: trainer(config=TrainConfig(total_steps=1, batch_size=8, progress=False)).load(
            _drop(_saved(tmp), "model")
        ),
        ValueError,
        r"latest\.pt.*model",
    ),
]


def _drop(path: Path, key: str) -> Path:
    state = load_checkpoint(path)
    del state[key]
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------ guidance/inverse
IMG = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
MASK = torch.ones(1, 1, 4, 4, dtype=torch.float64)
CONDITIONING_CASES = [
    (
        "cfg-scale-negative",
        lambda: cfg_score(Net(), 1, scale=-1.0),
        ValueError,
        r"scale must be a finite number >= 0, got -1\.0",
    ),
    ("cfg-scale-nan", lambda: cfg_score(Net(), 1, scale=NAN), ValueError, r"scale .*nan"),
    ("cfg-model-not-callable", lambda: cfg_score(5, 1), TypeError, r"model must be callable as model\(x, t, y\)"),
    ("cg-y-float", lambda: classifier_guided_score(SCORE, Net(), 1.5), TypeError, r"y must be an int class id"),
    (
        "cg-classifier-not-callable",
        lambda: classifier_guided_score(SCORE, "clf", 1),
        TypeError,
        r"classifier must be callable",
    ),
    ("cg-score-not-callable", lambda: classifier_guided_score(None, Net(), 1), TypeError, r"score_fn must be callable"),
    (
        "classifier-num_classes",
        lambda: NoiseConditionalClassifier(2, 1),
        ValueError,
        r"num_classes must be >= 2, got 1",
    ),
    (
        "replacement-score-none",
        lambda: replacement_score(None, VP, inpainting_constraint(IMG, MASK)),
        TypeError,
        r"score_fn must be callable",
    ),
    (
        "replacement-sde-str",
        lambda: replacement_score(SCORE, "vp", inpainting_constraint(IMG, MASK)),
        TypeError,
        r"sde must be an SDE instance",
    ),
    (
        "replacement-constraint-tuple",
        lambda: replacement_score(SCORE, VP, (lambda x: x, IMG)),
        TypeError,
        r"constraint must be an sde.inverse.Constraint .*got tuple",
    ),
    (
        "dps-zeta",
        lambda: dps_score(SCORE, VP, inpainting_constraint(IMG, MASK), zeta=0.0),
        ValueError,
        r"zeta must be .*got 0\.0",
    ),
    ("mask-values", lambda: inpainting_constraint(IMG, MASK * 0.5), ValueError, r"mask must hold only 0 and 1"),
    (
        "mask-shape",
        lambda: inpainting_constraint(IMG, torch.ones(3, 3)),
        ValueError,
        r"mask of shape \(3, 3\) does not broadcast",
    ),
    ("mask-not-tensor", lambda: inpainting_constraint(IMG, [[1]]), TypeError, r"mask must be a torch.Tensor, got list"),
    ("inpaint-y-nan", lambda: inpainting_constraint(with_nan(IMG), MASK), ValueError, r"y holds 1 non-finite"),
    ("sr-factor", lambda: super_resolution_constraint(IMG, 0), ValueError, r"factor must be >= 1, got 0"),
    ("sr-y_low-nan", lambda: super_resolution_constraint(with_nan(IMG), 2), ValueError, r"y_low holds 1 non-finite"),
    (
        "colorize-gray-channels",
        lambda: colorization_constraint(IMG.repeat(1, 3, 1, 1)),
        ValueError,
        r"gray must have shape \(B, 1, H, W\)",
    ),
    (
        "solve-method",
        lambda: solve_inverse(SCORE, VP, inpainting_constraint(IMG, MASK), method="bogus"),
        ValueError,
        r"method='bogus'.*replacement",
    ),
    (
        "solve-conditioning-renamed",
        lambda: solve_inverse(SCORE, VP, inpainting_constraint(IMG, MASK), conditioning="smc"),
        TypeError,
        r"conditioning= was renamed: pass method='smc'",
    ),
]


# ----------------------------------------------------------------------------------------- Hydra apps
def _compose(overrides: list[str], name: str = "train"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def _app_call(overrides: list[str], step: str, name: str = "train"):
    """What the apps do first with a composed config (experiments/_common and train.py helpers)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from _common import load_data, setup
        from _common.models import build_sde
        from _common.sampling import draw

        cfg = _compose(overrides, name)
        if step == "sde":
            return build_sde(cfg)
        if step == "data":
            return load_data(cfg.data, split="train")
        if step == "setup":
            return setup(cfg)
        if step == "sampler":
            return draw(
                SCORE,
                VP,
                cfg.sampler,
                (B, 2),
                generator=torch.Generator(),
                device=torch.device("cpu"),
                dtype=torch.float64,
            )
        import train

        return train.check_train_config(cfg) if step == "check" else train._label_dropout(cfg)
    finally:
        sys.path.remove(str(ROOT / "experiments"))


APP_CASES = [
    (
        "sde.beta_min",
        lambda: _app_call(["sde=vp", "sde.beta_min=-1"], "sde"),
        ValueError,
        r"beta_min must be a finite number > 0, got -1",
    ),
    (
        "sde.sigma_min",
        lambda: _app_call(["sde=ve", "sde.sigma_min=100"], "sde"),
        ValueError,
        r"sigma_min must be < sigma_max",
    ),
    (
        "sde.schedule",
        lambda: _app_call(["sde=vp", "sde.schedule=quadratic"], "sde"),
        ValueError,
        r"schedule='quadratic'",
    ),
    (
        "data.loader.n",
        lambda: _app_call(["data=moons", "+data.loader.n=-3"], "data"),
        ValueError,
        r"n must be >= 1, got -3",
    ),
    (
        "data.loader.root",
        lambda: _app_call(["data=cifar10", "data.loader.root=/nonexistent/x"], "data"),
        FileNotFoundError,
        r"cifar10: expected files .*data_batch_1.*/nonexistent/x",
    ),
    ("data.shape", lambda: _app_call(["data=moons", "data.shape=[3]"], "data"), ValueError, r"data\.shape=\[3\]"),
    ("dtype", lambda: _app_call(["dtype=float16"], "setup"), ValueError, r"dtype='float16' is not supported"),
    ("sampler.name", lambda: _app_call(["sampler.name=bogus"], "sampler"), ValueError, r"sampler='bogus'"),
    (
        "sampler.options.steps",
        lambda: _app_call(["sampler=ode", "sampler.options.steps=-3"], "sampler"),
        ValueError,
        r"steps must be >= 1, got -3",
    ),
    (
        "sampler.options.method",
        lambda: _app_call(["sampler=ode", "sampler.options.method=bogus"], "sampler"),
        ValueError,
        r"method='bogus'",
    ),
    (
        "loss.label_dropout",
        lambda: _app_call(["loss.label_dropout=2"], "label_dropout"),
        ValueError,
        r"loss\.label_dropout=2 must be a probability",
    ),
    (
        "loss.time_sampling",
        lambda: _app_call(["loss.time_sampling=sobol"], "check"),
        ValueError,
        r"loss\.time_sampling='sobol' is not supported; choose one of \['iid', 'low_discrepancy'\]",
    ),
]


# ------------------------------------------------------------------------------------------------ run
def _params(cases, needs_tmp=False):
    return [pytest.param(call, err, match, needs_tmp, id=name) for name, call, err, match in cases]


ALL = (
    _params(SDE_CASES)
    + _params(ORACLE_CASES)
    + _params(SAMPLER_CASES)
    + _params(LIKELIHOOD_CASES)
    + _params(LOSS_CASES)
    + _params(DATA_CASES, True)
    + _params(TRAINING_CASES)
    + _params(CHECKPOINT_CASES, True)
    + _params(CONDITIONING_CASES)
)


@pytest.mark.parametrize("call,error,match,needs_tmp", ALL)
def test_bad_input_is_named(call, error, match, needs_tmp, tmp_path):
    with pytest.raises(error, match=match):
        call(tmp_path) if needs_tmp else call()


@pytest.mark.parametrize("call,error,match,needs_tmp", _params(APP_CASES))
def test_bad_app_config_is_named(call, error, match, needs_tmp):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call,error,match,needs_tmp", _params(CHECKPOINT_FILE_CASES, True))
def test_bad_checkpoint_file_is_named(call, error, match, needs_tmp, tmp_path):
    with pytest.raises(error, match=match):
        call(tmp_path)


def test_catalogue_size():
    assert len(ALL) + len(APP_CASES) >= 80


def test_a_wrong_shape_score_is_checked_once_without_cost():
    """The shape check runs on the first output only (metadata, no sync): later calls are not re-checked."""
    calls = []

    def score(x, t):
        calls.append(1)
        return SCORE(x, t) if len(calls) == 1 else SCORE(x, t)[:, :1]

    counted = samplers._base.CountedScore(score)
    t = torch.full((B,), 0.5, dtype=torch.float64)
    counted(X, t)
    assert counted(X, t).shape == (B, 1) and counted.calls == 2
    assert math.isfinite(float(counted(X, t).sum()))
