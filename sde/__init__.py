"""score-sde: score-based generative modeling with SDEs, in plain PyTorch.

The library never imports hydra, omegaconf or wandb; experiments/ does the gluing.
Subpackages: ``sde.samplers``, ``sde.nets``, ``sde.training``, ``sde.features``.
"""

from .data import DATASETS, ArrayDataset, load_dataset
from .editing import TimeWindow, sdedit
from .guidance import NoiseConditionalClassifier, cfg_score, classifier_guided_score, train_classifier
from .interpolation import INTERPOLATIONS, interpolate, lerp, slerp
from .inverse import (
    CONDITIONING_METHODS,
    colorize,
    dps_score,
    inpaint,
    repaint,
    replacement_score,
    solve_inverse,
    super_resolve,
)
from .likelihood import LikelihoodResult, bits_per_dim, dataset_bits_per_dim, decode, encode, log_likelihood
from .losses import dequantize, dequantized, dsm_loss
from .metrics import (
    FeatureStats,
    RunningStats,
    energy_distance,
    frechet_distance,
    gaussian_kl,
    gaussian_w2,
    inception_score,
    kernel_inception_distance,
    mmd,
    sliced_wasserstein,
)
from .models import PARAMETRIZATIONS, ScoreModel, drop_labels
from .nets import MLP, UNet
from .oracle import GaussianMixture
from .pretrained import DiffusersScore, from_diffusers
from .samplers import SAMPLERS, SampleResult, sample
from .sdes import SDE, VESDE, VPSDE, DiscreteVPSDE, FlowSDE, ReverseSDE, ScoreFn, SubVPSDE, ddpm_betas
from .smc import SMCResult, smc_guidance, smc_inverse
from .training import TrainConfig, Trainer, train

__version__ = "0.1.0"

__all__ = [
    # SDEs and the exact oracle
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "FlowSDE", "DiscreteVPSDE", "ddpm_betas", "ReverseSDE", "ScoreFn",
    "GaussianMixture",
    # pretrained diffusers models
    "from_diffusers", "DiffusersScore",
    # sampling
    "sample", "SAMPLERS", "SampleResult",
    # likelihood
    "log_likelihood", "LikelihoodResult", "bits_per_dim", "dataset_bits_per_dim", "encode", "decode",
    "interpolate", "slerp", "lerp", "INTERPOLATIONS",
    # models, losses, data, training
    "MLP", "UNet", "ScoreModel", "PARAMETRIZATIONS", "drop_labels", "dsm_loss", "dequantize", "dequantized",
    "load_dataset", "ArrayDataset", "DATASETS", "TrainConfig", "Trainer", "train",
    # controllable generation
    "classifier_guided_score", "cfg_score", "NoiseConditionalClassifier", "train_classifier",
    "inpaint", "colorize", "super_resolve", "solve_inverse", "replacement_score", "dps_score", "CONDITIONING_METHODS",
    "repaint", "smc_inverse", "smc_guidance", "SMCResult", "sdedit", "TimeWindow",
    # metrics
    "FeatureStats", "RunningStats", "frechet_distance", "kernel_inception_distance", "inception_score", "mmd",
    "energy_distance", "sliced_wasserstein", "gaussian_kl", "gaussian_w2",
    "__version__",
]  # fmt: skip
