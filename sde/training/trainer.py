"""The training loop: AdamW + linear LR warmup + grad clipping + EMA, resumable bit-for-bit.

Follows the recipe of Song et al. 2021 (score_sde: Adam, warmup, clipping, EMA) as a small
library object: ``Trainer(model, sde, data, TrainConfig(...)).fit()``. The same code runs
under ``torchrun --nproc_per_node N`` (see :mod:`sde.training.distributed`).

Why resume is exact: the data order of epoch e is a pure function of ``(seed, e)`` (a
``DistributedSampler``, also with one replica) and the position in the epoch follows from
the step, so a checkpoint needs only the step, the weights, the EMA, the optimizer and the
RNG states (global torch/CUDA/python/numpy and the generator that draws the loss noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from .._checks import (
    check_all_finite,
    check_callable,
    check_half_open,
    check_int,
    check_open_interval,
    check_tensor,
)
from ..checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    capture_rng_state,
    check_state_dict_compatible,
    diff_dicts,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import DistInfo, current_dist_info
from .ema import EMA
from .lr_schedule import check_lr_decay, scheduled_lr

LossFn = Callable[..., Tensor]  # loss_fn(model, sde, x0, *, generator, [y]) -> scalar
EvalHook = Callable[[int, nn.Module, nn.Module], "dict[str, float] | float | None"]  # (step, model, ema_model)
LogFn = Callable[[dict[str, float]], None]



@dataclasses.dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer` (plain primitives: stored verbatim in checkpoints)."""

    total_steps: int = 10_000  # optimizer steps of the whole run; a resumed run continues up to this
    batch_size: int = 128  # per-rank batch; global batch = batch_size * world_size
    lr: float = 2e-4  # peak AdamW learning rate, reached after warmup
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW first/second moment decays
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 1000  # linear warmup: step s (1-based) uses lr * min(1, s / warmup_steps); 0 = none
    lr_decay: str = "constant"  # after warm-up: constant | cosine | linear over the run's progress (lr_schedule.py)
    lr_final_ratio: float = 0.0  # the decayed rate at the end of the run as a fraction of lr (0 with constant)
    grad_clip: float = 1.0  # clip the global gradient 2-norm to this; 0 = no clipping (norm still logged)
    ema_decay: float = 0.999  # asymptotic EMA decay of the averaged weights
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    seed: int = 0  # data order = f(seed, epoch); loss noise generator seeded from (seed, rank)
    bf16: bool = False  # bf16 autocast of forward + loss on the model's device type (CUDA or CPU); weights stay fp32
    compile: bool = False  # torch.compile the training forward (any device; CPU needs a C++ compiler, first steps slow)
    log_every: int = 100  # steps between metric logs and progress-bar updates
    eval_every: int = 0  # steps between eval hooks; 0 = only at the end of fit()
    ckpt_every: int = 1000  # steps between writes of latest.pt; 0 = only at the end of fit()
    keep_every: int = 0  # also keep step_XXXXXXXX.pt every this many steps; 0 = never
    best_metric: str = "bpd"  # eval-hook metric (lower is better) that selects best.pt
    out_dir: str | None = None  # checkpoint directory; None = no checkpoints
    resume: bool = True  # continue from out_dir/latest.pt when it exists
    time_budget_s: float | None = None  # end the run (as at total_steps) after this many seconds of fit(); None = off
    progress: bool = True  # tqdm bar (rank 0 only)

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "log_every", "eval_every", "ckpt_every", "keep_every", "seed"):
            check_int(name, getattr(self, name), 0)
        for name, minimum in (("lr", "> 0"), ("adam_eps", "> 0"), ("weight_decay", ">= 0"), ("grad_clip", ">= 0")):
            _check_hyperparameter(name, getattr(self, name), minimum)
        if self.lr * self.weight_decay >= 1.0:
            raise ValueError(f"lr * weight_decay must be < 1 (AdamW multiplies the weights by 1 - lr * weight_decay "
                             f"each step), got lr={self.lr!r}, weight_decay={self.weight_decay!r}")
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2) of AdamW moment decays in [0, 1), got {betas!r}")
        self.betas = tuple(check_half_open(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))
        check_open_interval("ema_decay", self.ema_decay, 0.0, 1.0)
        check_lr_decay(self.lr_decay, self.lr_final_ratio, prefix="lr_")
        if self.time_budget_s is not None and not (isinstance(self.time_budget_s, (int, float))
                                                   and not isinstance(self.time_budget_s, bool)
                                                   and self.time_budget_s > 0):
            raise ValueError(f"time_budget_s must be a number of seconds > 0 or None, got {self.time_budget_s!r}")
        for name in ("ema_warmup", "bf16", "compile", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__} "
                                f"({getattr(self, name)!r})")
        if not isinstance(self.best_metric, str) or not self.best_metric:
            raise ValueError(f"best_metric must be the non-empty name of an eval-hook metric, got {self.best_metric!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path (str) or None, got {type(self.out_dir).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Primitive-only dict (tuples become lists) for checkpoints and loggers."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # hyperparameters above it overflow in float32 training


def _check_hyperparameter(name: str, value: Any, minimum: str) -> None:
    """A real number, finite, not overflowing float32, and > 0 or >= 0 (``minimum``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    ok = math.isfinite(value) and abs(value) <= _FLOAT32_MAX and (value > 0 if minimum == "> 0" else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {minimum} that fits in float32 (<= {_FLOAT32_MAX:.3g}), "
                         f"got {value!r}")


# Settings that change the trajectory: resuming with different values would not continue the same run.
_TRAJECTORY_KEYS = ("batch_size", "lr", "weight_decay", "betas", "adam_eps", "warmup_steps", "lr_decay",
                    "lr_final_ratio", "grad_clip", "ema_decay", "ema_warmup", "seed", "bf16")


_RESUME_KEYS = ("step", "model", "ema", "optimizer", "config", "rng")  # what load() reads


def _fused_adamw(params: list[Tensor]) -> bool | None:
    """``fused=True`` (one AdamW kernel for all tensors, ~4x faster than the per-tensor loop on CPU) when every
    parameter is a float tensor on a CPU or CUDA device; else ``None`` (torch's default implementation)."""
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def _bf16_autocast(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of bf16 autocast contexts on ``device``'s type.

    Raises:
        ValueError: the device type has no bf16 autocast (only "cuda" and "cpu" are supported).
    """
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"bf16=True needs a cuda or cpu device for torch.autocast, got device {device}")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/inf: the loss or gradient norm (before the step was applied), or the
    weights, EMA or optimizer moments after an update (no checkpoint is ever written from such a state)."""


_MAX_UNREAD = 1000  # a read at least every this many steps: bounded pending values even with log_every=0


@dataclasses.dataclass
class _Check:
    """Device values the host reads later: ``kind="loss"``: [loss (float64), gradient norm] of step ``step``
    before it is applied; ``kind="state"``: [2-norm of weights, EMA and moments] after update ``step``."""

    kind: str
    step: int
    lr: float
    values: list[Tensor]


class Trainer:
    """Train ``model`` with ``loss_fn(model, sde, x0, generator=..., [y=...])`` on a tensor dataset.

    Args:
        model: the network (e.g. ``ScoreModel``); moved to ``device``.
        sde: the forward SDE handed to the loss.
        data: an (N, ...) float tensor in model space, or an object with ``.data`` (``load_dataset``).
        config: hyperparameters; default ``TrainConfig()``.
        labels: optional (N,) labels; when given the loss also receives ``y=labels[batch]``.
        loss_fn: default :func:`sde.losses.dsm_loss`.
        callbacks: eval hooks ``hook(step, model, ema_model)`` run on rank 0 every ``eval_every``
            steps and at the end, under ``torch.random.fork_rng`` so evaluation never changes the
            training trajectory; a returned dict (or float, named "metric") is logged and
            ``config.best_metric`` selects ``best.pt``.
        log_fn: receives ``{"step", "loss", "lr", "grad_norm", "steps_per_sec"}`` every ``log_every``
            steps (and the eval metrics) on rank 0.
        model_config: primitives describing the architecture; stored and compared on resume. A
            ``{"sde", "model", "data"}`` description (the conf/ nodes, as experiments/train.py gives)
            makes the checkpoints loadable by ``sde.checkpoint.load_score_model`` and every app.
        device: default: this rank's GPU under NCCL, else the device of the model's parameters.

    Raises:
        ValueError / TypeError: bad data, or a batch larger than the rank's share of the data.
    """

    def __init__(self, model: nn.Module, sde: Any, data: Any, config: TrainConfig | None = None, *,
                 labels: Tensor | None = None, loss_fn: LossFn | None = None, callbacks: Sequence[EvalHook] = (),
                 log_fn: LogFn | None = None, model_config: dict[str, Any] | None = None,
                 device: torch.device | str | None = None, dist_info: DistInfo | None = None) -> None:
        _check_trainer_inputs(model, loss_fn, callbacks, log_fn)
        self.config = cfg = config if config is not None else TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
        self.dist = dist_info if dist_info is not None else current_dist_info()
        if device is None:
            device = self.dist.device if self.dist.backend == "nccl" else next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.sde = sde
        data = getattr(data, "data", data)
        self.data = check_all_finite("data", check_tensor("data", data)).to(self.device)  # once, not per step
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape[:1] != self.data.shape[:1]):
            raise ValueError(f"labels must be a tensor with {self.data.shape[0]} rows, got {labels!r:.80}")
        self.labels = labels.to(self.device) if labels is not None else None
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss()
        self.callbacks = list(callbacks)
        self.log_fn = log_fn
        self.model_config = dict(model_config or {})
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        self._params = list(self.model.parameters())  # fixed objects: load() and the EMA update copy in place
        self.optimizer = torch.optim.AdamW(self._params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay, fused=_fused_adamw(self._params))
        # weights, float buffers and EMA: what the per-step state check covers besides the optimizer moments
        self._weights = [t.detach() for m in (self.model, self.ema.model) for t in (*m.parameters(), *m.buffers())
                         if t.is_floating_point()]
        self.noise_generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1_000_003 + self.dist.rank)
        self.step = 0
        self.best_value: float | None = None
        self.eval_metrics: dict[str, float] = {}
        self.checkpoints = (CheckpointManager(cfg.out_dir, cfg.keep_every)
                            if cfg.out_dir is not None and self.dist.is_main else None)
        self._sampler = DistributedSampler(range(self.data.shape[0]), num_replicas=self.dist.world_size,
                                           rank=self.dist.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        self.batches_per_epoch = len(self._sampler) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds this rank's {len(self._sampler)} examples "
                             f"({self.data.shape[0]} in all over {self.dist.world_size} ranks)")
        self._epoch_cache: tuple[int, Tensor] | None = None
        self._pending: list[_Check] = []  # device values not yet read by the host (see _read_pending)
        self._read_values: list[tuple[float, float]] = []  # (loss, grad_norm) read, not yet logged
        on_cuda = self.device.type == "cuda"
        train_model: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device] if on_cuda else None
            train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
        if cfg.compile:
            train_model = torch.compile(train_model)
        self._train_model = train_model
        self._autocast = _bf16_autocast(self.device) if cfg.bf16 else contextlib.nullcontext
        self._progress = _run_progress(None, cfg.total_steps)  # fit(progress=...) may replace it

    # ----------------------------------------------------------------------------- data
    def batch_indices(self, step: int) -> Tensor:
        """Indices of the examples this rank uses at 0-based ``step`` (a pure function of seed and step)."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._sampler.set_epoch(epoch)
            order = torch.tensor(list(iter(self._sampler)), dtype=torch.long)
            self._epoch_cache = (epoch, order.pin_memory() if self.device.type == "cuda" else order)  # async copies
        b = self.config.batch_size
        return self._epoch_cache[1][pos * b:(pos + 1) * b]

    # ----------------------------------------------------------------------------- loop
    def fit(self, stop: Callable[[int], bool] | None = None,
            progress: Callable[[int], float] | None = None) -> dict[str, float]:
        """Train until ``config.total_steps``, resuming from ``out_dir/latest.pt`` when allowed.

        Args:
            stop: optional ``stop(step) -> bool`` checked after every step; when it (or the
                ``config.time_budget_s`` wall-clock budget) says so, the run ends as at ``total_steps``
                (final log, eval, checkpoint). Under DDP it must answer the same on every rank.
            progress: optional ``progress(step) -> float``, the fraction of the run done before 0-based
                ``step`` that drives ``config.lr_decay`` (e.g. the spent fraction of the budget ``stop``
                enforces); default ``step / total_steps``. Under DDP it must answer the same on every rank.

        Returns:
            The last logged metrics merged with the last eval metrics.

        Raises:
            NonFiniteLossError: the loss or gradient norm was NaN/inf (names the step; the last
                good checkpoint on disk is left untouched).
            CheckpointMismatchError: the checkpoint belongs to another model/run configuration.
        """
        cfg = self.config
        if cfg.resume and cfg.out_dir is not None:
            latest = Path(cfg.out_dir) / CheckpointManager.LATEST  # every rank reads it (shared filesystem)
            if latest.is_file():
                self.load(latest)
        stop = _with_budget(stop, cfg.time_budget_s)
        self._progress = _run_progress(progress, cfg.total_steps)
        self.model.train()
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                   dynamic_ncols=True, desc="train")
        metrics: dict[str, float] = {}
        window_loss, window_steps, grad_norm, t0 = 0.0, 0, math.nan, time.perf_counter()
        while self.step < cfg.total_steps:
            self._train_step(read=self._read_due(self.step + 1))
            done = self.step == cfg.total_steps or (stop is not None and stop(self.step))
            if done:  # stopped between reads: read now (this update included)
                self.check_state_finite()
            values, self._read_values = self._read_values, []
            for loss_value, _ in values:  # in step order: the same float sums as a per-step read
                window_loss, window_steps = window_loss + loss_value, window_steps + 1
            grad_norm = values[-1][1] if values else grad_norm
            bar.update(1)
            if (cfg.log_every and self.step % cfg.log_every == 0) or done:
                elapsed = time.perf_counter() - t0
                metrics = {"step": self.step, "loss": window_loss / window_steps, "lr": self._lr(),
                           "grad_norm": grad_norm, "steps_per_sec": window_steps / max(elapsed, 1e-12)}
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
                self._log(metrics)
                window_loss, window_steps, t0 = 0.0, 0, time.perf_counter()
            is_best = False
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or done:
                is_best = self._evaluate()
            if cfg.out_dir is not None and ((cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or done):
                self.save(is_best=is_best)
            if done:
                break
        bar.close()
        return {**metrics, **self.eval_metrics}

    def _read_due(self, step: int) -> bool:
        """Whether the host reads the pending losses before applying ``step`` (1-based): at every step that
        logs, evaluates or writes a checkpoint, every ``_MAX_UNREAD`` steps and at the last one. Other steps
        make no host sync."""
        cfg = self.config
        every = [cfg.log_every, cfg.eval_every, _MAX_UNREAD] + ([cfg.ckpt_every] if cfg.out_dir is not None else [])
        return step == cfg.total_steps or any(k and step % k == 0 for k in every)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self, read: bool) -> None:
        """One optimizer step. With ``read``, everything pending since the last read (losses, gradient norms and
        the state each update left) and this step's loss and gradient norm are read in one host sync before
        the step is applied; without it the step makes no host sync."""
        cfg = self.config
        idx = self.batch_indices(self.step).to(self.device, non_blocking=True)
        x0 = self.data[idx]
        kwargs: dict[str, Any] = {"generator": self.noise_generator}
        if self.labels is not None:
            kwargs["y"] = self.labels[idx]
        lr = scheduled_lr(self.step + 1, cfg.lr, cfg.warmup_steps, decay=cfg.lr_decay,
                          progress=self._progress(self.step), final_ratio=cfg.lr_final_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(self._train_model, self.sde, x0, **kwargs)
        loss.backward()  # a non-finite loss only spoils gradients; they are applied only if not read here
        params = [p for p in self._params if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure the norm, change nothing
        grad_norm = nn.utils.clip_grad_norm_(params, max_norm)
        self._pending.append(_Check("loss", self.step + 1, lr, [loss.detach().to(torch.float64, copy=True), grad_norm]))
        if read:
            self._read_pending()
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        # the 2-norm of weights, EMA and moments (NaN/inf if any entry is; _raise_if_bad_state tells a finite
        # overflow apart), read at the next host read or before a checkpoint is written; one multi-tensor
        # reduction, ~6x cheaper on CPU than the max |value|
        self._pending.append(_Check("state", self.step, lr, [nn.utils.get_total_norm(self._state_tensors(), 2.0)]))
        if self.step == cfg.total_steps:  # no next read: check the last update now
            self.check_state_finite()

    def _read_pending(self) -> None:
        """Read every pending check in one host sync, in step order, raising :class:`NonFiniteLossError` on the
        first non-finite value; the (loss, grad_norm) of the steps read go to ``self._read_values``."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        checks = [c for c in pending if c.kind == "loss"]
        if self.dist.distributed and checks:  # equal per-rank batches: mean of rank means = mean of the global batch
            losses = torch.stack([c.values[0] for c in checks])
            dist.all_reduce(losses, op=dist.ReduceOp.SUM)
            losses /= self.dist.world_size
            for c, mean in zip(checks, losses.unbind()):
                c.values[0] = mean
        flat = torch.stack([v.to(torch.float64) for c in pending for v in c.values]).tolist()  # the host sync
        for c in pending:
            values, flat = flat[: len(c.values)], flat[len(c.values):]
            if c.kind == "state":
                self._raise_if_bad_state(values[0], c.step, c.lr)
            else:
                self._raise_if_bad_loss(c.step, *values)
                self._read_values.append((values[0], values[1]))

    # ----------------------------------------------------------------------------- non-finite guard
    def _state_tensors(self) -> list[Tensor]:
        """Everything a checkpoint stores as floats: weights, float buffers, EMA and optimizer moments."""
        out = list(self._weights)
        for st in self.optimizer.state.values():
            out += [v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0]
        return out

    @property
    def _pending_state_norm(self) -> Tensor | None:
        """The 2-norm of the state left by the last update while it is not yet read, else None."""
        return self._pending[-1].values[0] if self._pending and self._pending[-1].kind == "state" else None

    def check_state_finite(self) -> None:
        """Read everything pending (losses, gradient norms, the state left by the last updates) in one host sync;
        raise :class:`NonFiniteLossError` if any is NaN/inf (:meth:`save` calls it, so no checkpoint is ever
        written from such a state)."""
        self._read_pending()

    def _raise_if_bad_loss(self, step: int, loss_value: float, grad_norm: float) -> None:
        for what, value in (("loss", loss_value), ("gradient norm", grad_norm)):
            if math.isfinite(value):
                continue
            when = ("stopped before applying it" if step > self.step else
                    f"it was applied in memory (the host reads the loss every log_every={self.config.log_every} "
                    f"steps and before each checkpoint) and training stopped at step {self.step}; no checkpoint "
                    "was written from it")
            raise NonFiniteLossError(f"{what} is {value} at step {step}; {when} ({self._last_good()})")

    def _raise_if_bad_state(self, state_norm: float, step: int, lr: float) -> None:
        if math.isfinite(state_norm):
            return
        groups = {"weights": [*self.model.parameters(), *self.model.buffers()],
                  "EMA": [*self.ema.model.parameters(), *self.ema.model.buffers()],
                  "optimizer moments": [v for st in self.optimizer.state.values() for v in st.values()
                                        if isinstance(v, Tensor) and v.dim() > 0]}
        bad = [name for name, ts in groups.items()
               if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in ts)]
        if not bad:  # every entry finite: only their sum of squares overflowed
            return
        raise NonFiniteLossError(
            f"the update of step {step} (lr={lr:.4g}) left non-finite values "
            f"in the {', '.join(bad)}; stopped, and no checkpoint was written from it "
            f"({self._last_good()})")

    def _evaluate(self) -> bool:
        if not self.dist.is_main or not self.callbacks:
            return False
        metrics: dict[str, float] = {}
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for hook in self.callbacks:
                out = hook(self.step, self.model, self.ema.model)
                if isinstance(out, dict):
                    metrics.update({k: float(v) for k, v in out.items()})
                elif out is not None:
                    metrics["metric"] = float(out)
        self.model.train()
        self.eval_metrics = metrics
        if metrics and self.config.best_metric not in metrics:
            raise ValueError(f"best_metric={self.config.best_metric!r} is not among the eval hooks' metrics "
                             f"{sorted(metrics)}; set TrainConfig.best_metric to one of them")
        if metrics:
            self._log({"step": self.step, **metrics})
        value = metrics.get(self.config.best_metric)
        if value is None or not math.isfinite(value) or (self.best_value is not None and value >= self.best_value):
            return False
        self.best_value = value
        return True

    def _log(self, metrics: dict[str, float]) -> None:
        if self.log_fn is not None and self.dist.is_main:
            self.log_fn(dict(metrics))

    def _last_good(self) -> str:
        """Where the last good state is: named only if that file exists."""
        if self.checkpoints is None:
            return "no checkpoints are written: out_dir is None" if self.config.out_dir is None \
                else "checkpoints are written by rank 0"
        if not self.checkpoints.latest.is_file():
            return f"no checkpoint was written yet in {str(self.checkpoints.directory)!r}"
        return f"last good checkpoint kept: {self.checkpoints.latest}"

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit (collective under DDP: every rank must call it)."""
        rng = capture_rng_state(self.noise_generator)
        per_rank = [rng]
        if self.dist.distributed:
            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, rng)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # The LR schedule is stateless (scheduled_lr of the step and progress); stored for readers of the file.
            "scheduler": {"name": "linear_warmup", "lr": self.config.lr, "warmup_steps": self.config.warmup_steps,
                          "decay": self.config.lr_decay, "final_ratio": self.config.lr_final_ratio},
            "config": self.config.to_dict(),
            "model_config": self.model_config,
            "rng": {"world_size": self.dist.world_size, "per_rank": per_rank},
            "best_value": self.best_value,
            "eval_metrics": dict(self.eval_metrics),
        }

    def save(self, *, is_best: bool = False) -> None:
        """Write latest.pt (and best.pt / step_XXXXXXXX.pt when due) from rank 0; never a non-finite state."""
        self.check_state_finite()
        state = self.state_dict()
        if self.checkpoints is not None:
            self.checkpoints.save(state, self.step, is_best=is_best)

    def save_as(self, path: Any, *, metrics: dict[str, Any] | None = None) -> Path:
        """Write the current state (the same format as latest.pt) to ``path``, plus final ``metrics``.

        Collective under DDP like :meth:`state_dict`; only rank 0 writes. Returns ``path``.
        """
        state = self.state_dict()
        if metrics is not None:
            state["metrics"] = dict(metrics)
        if self.dist.is_main:
            save_checkpoint(path, state)
        return Path(path)

    def load(self, path: Any) -> None:
        """Restore a checkpoint written by :meth:`save`.

        Raises:
            CheckpointError: the file is unreadable or lacks a piece resume needs (names the path).
            CheckpointMismatchError: model config, trajectory hyperparameters or weight shapes differ
                (the message names every differing key).
        """
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatchError(f"{path}: checkpoint format {state.get('format')!r}, "
                                          f"expected {CHECKPOINT_FORMAT}")
        missing = [k for k in _RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {missing}, needed to resume training")
        diffs = diff_dicts(state.get("model_config", {}), self.model_config)
        if diffs:
            raise CheckpointMismatchError(f"{path} was written for a different model config: " + "; ".join(diffs))
        saved_cfg, cur_cfg = state["config"], self.config.to_dict()
        defaults = TrainConfig().to_dict()  # a key older files lack had its default value then
        diffs = diff_dicts({k: saved_cfg.get(k, defaults[k]) for k in _TRAJECTORY_KEYS},
                           {k: cur_cfg[k] for k in _TRAJECTORY_KEYS})
        if diffs:
            raise CheckpointMismatchError(f"{path} was written with different training settings "
                                          "(resuming would not continue the same run): " + "; ".join(diffs))
        check_state_dict_compatible(state["model"], self.model)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_value = state.get("best_value")
        self.eval_metrics = dict(state.get("eval_metrics", {}))
        per_rank = state["rng"]["per_rank"]
        if len(per_rank) == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank], self.noise_generator)
        else:
            warnings.warn(f"{path} was written by {len(per_rank)} ranks, resuming on {self.dist.world_size}: "
                          "RNG states are not restored, so the run is not bit-for-bit continued", stacklevel=2)


def _with_budget(stop: Callable[[int], bool] | None, seconds: float | None) -> Callable[[int], bool] | None:
    """``stop`` extended by a wall-clock budget counted from now (None: ``stop`` unchanged)."""
    if seconds is None:
        return stop
    deadline = time.perf_counter() + seconds
    return lambda step: time.perf_counter() > deadline or (stop is not None and stop(step))


def _run_progress(progress: Callable[[int], float] | None, total_steps: int) -> Callable[[int], float]:
    """``progress`` (checked callable), or ``step / total_steps`` when None: what the learning-rate decay follows."""
    if progress is None:
        return lambda step: step / total_steps
    check_callable("progress", progress, "progress(step) -> fraction of the run done")
    return progress


def _check_trainer_inputs(model: Any, loss_fn: Any, callbacks: Any, log_fn: Any) -> None:
    """Types of the Trainer's objects, named before anything is built."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} ({model!r:.60})")
    if loss_fn is not None:
        check_callable("loss_fn", loss_fn, "loss_fn(model, sde, x0, *, generator[, y]) -> scalar Tensor")
    if log_fn is not None:
        check_callable("log_fn", log_fn, "log_fn(metrics: dict)")
    if callable(callbacks) or isinstance(callbacks, (str, bytes)):
        raise TypeError(f"callbacks must be a sequence of eval hooks, got {type(callbacks).__name__}; wrap it: [hook]")
    for i, hook in enumerate(callbacks):
        check_callable(f"callbacks[{i}]", hook, "hook(step, model, ema_model)")


def _default_loss() -> LossFn:
    from ..losses import dsm_loss  # imported lazily: the loop itself does not depend on the loss module

    return dsm_loss


def train(model: nn.Module, sde: Any, data: Any, config: TrainConfig | None = None, **kwargs: Any) -> Trainer:
    """Build a :class:`Trainer`, run :meth:`Trainer.fit` and return it (for ``trainer.ema.model``)."""
    trainer = Trainer(model, sde, data, config, **kwargs)
    trainer.fit()
    return trainer
