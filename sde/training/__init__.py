"""Training: the loop, EMA, atomic checkpoints with exact resume (sde.checkpoint), and DDP under torchrun."""

from ..checkpoint import CheckpointManager, CheckpointMismatchError, load_checkpoint, save_checkpoint
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .ema import EMA, ema_decay
from .lr_schedule import LR_DECAYS, scheduled_lr, warmup_lr
from .trainer import NonFiniteLossError, TrainConfig, Trainer, train

__all__ = [
    "TrainConfig", "Trainer", "train", "warmup_lr", "scheduled_lr", "LR_DECAYS", "NonFiniteLossError",
    "EMA", "ema_decay",
    "CheckpointManager", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint",
    "DistInfo", "init_distributed", "cleanup_distributed",
]
