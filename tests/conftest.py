"""Test-session settings.

The suite runs as two pytest-xdist workers on a 2-core machine (README's test command), so
each worker keeps torch to one thread: two threads per worker would oversubscribe the cores
and slow small-tensor tests several times over.
"""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
