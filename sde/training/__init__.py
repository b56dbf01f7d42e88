"""Training: the loop, EMA, atomic checkpoints with exact resume (sde.checkpoint), and DDP under torchrun."""

from ..checkpoint import CheckpointManager, CheckpointMismatchError, load_checkpoint, save_checkpoint
from .distributed import DistInfo, cleanup_distributed, init_distributed
from .ema import EMA, ema_decay
from .trainer import NonFiniteLossError, TrainConfig, Trainer, train, warmup_lr

__all__ = [
    "TrainConfig", "Trainer", "train", "warmup_lr", "NonFiniteLossError",
    "EMA", "ema_decay",
    "CheckpointManager", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint",
    "DistInfo", "init_distributed", "cleanup_distributed",
]
