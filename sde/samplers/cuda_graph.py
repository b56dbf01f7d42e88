"""CUDA-graph replay of the score evaluation of every sampler step (docs/scale.md, "CUDA graphs").

```python
score = CudaGraphScore(model)          # captured at its first call, replayed at every later one
result = sample(score, sde, x_T, "ddim", steps=30)
```
A step of a fixed-grid sampler is one (or a few) score calls plus a handful of elementwise updates;
nearly all of its kernels are the network's. ``CudaGraphScore`` records the network forward once,
on static input buffers (x and the step's time, a device tensor), and each later call copies the new
x and t into those buffers (device-to-device, no host sync) and replays the recorded kernels in one
launch. The samplers themselves need no change: every entry of ``SAMPLERS`` passes device times of
a fixed batch shape. The sampler's own update kernels stay eager.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_callable, check_int, shared_time
from ..sdes import ScoreFn

__all__ = ["CudaGraphScore"]


class CudaGraphScore:
    """``score_fn`` captured in a CUDA graph at its first call and replayed at every later call.

    The output is a fresh tensor each call (a copy of the graph's static output), so samplers may keep
    past outputs (multistep methods do). Outputs equal the eager ``score_fn``'s bit for bit when the
    network's kernels are deterministic (tests/test_cuda_graph.py, on a GPU).

    Args:
        score_fn: ``score_fn(x, t)``; it must be capturable: CUDA tensors only, no host syncs
            (``.item()``, ``bool(tensor)``, printing), no host-to-device copies, no shape that depends on
            values, the same code path at every call (a graph replays what it recorded).
        warmup: eager calls on a side stream before the capture (cuDNN / cuBLAS pick their kernels and
            lazily built buffers are made), as PyTorch's CUDA-graph recipe asks.

    Raises:
        TypeError: score_fn is not callable.
        ValueError: warmup < 1.
    """

    def __init__(self, score_fn: ScoreFn, *, warmup: int = 3) -> None:
        self.score_fn = check_callable("score_fn", score_fn, "score_fn(x, t) -> Tensor shaped like x")
        self.warmup = check_int("warmup", warmup, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._x = self._t = self._t_store = self._out = None
        self._shared = False  # captured with one time viewed B times (as every sampler passes it)
        self.replays = 0  # calls served by the graph (the first call captures and replays once too)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The score at (x, t) by graph replay; the first call captures it.

        Raises:
            ValueError: x is not a CUDA tensor (``cuda_graph`` does not apply on the CPU), or x / t differ
                in shape, dtype, device or time layout from the first call (a graph has fixed shapes).
            RuntimeError: the score function cannot be captured (the error names the reason).
        """
        if not isinstance(x, Tensor) or x.device.type != "cuda":
            where = x.device if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"CudaGraphScore (cuda_graph) needs CUDA tensors, got x on {where}; on the CPU call the "
                             "score function directly (CUDA graphs do not apply there)")
        t = t if isinstance(t, Tensor) else torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        if self.graph is None:
            self._capture(x, t)
        self._load(x, t)
        self.graph.replay()
        self.replays += 1
        return self._out.clone()

    def _load(self, x: Tensor, t: Tensor) -> None:
        """Copy x and t into the static buffers (device to device: no host sync)."""
        shared = shared_time(t) is not t
        if (x.shape, x.dtype, x.device, t.shape, t.dtype, shared) != \
                (self._x.shape, self._x.dtype, self._x.device, self._t.shape, self._t.dtype, self._shared):
            raise ValueError(f"CudaGraphScore was captured for x {tuple(self._x.shape)} {self._x.dtype} and t "
                             f"{tuple(self._t.shape)} {self._t.dtype}; got x {tuple(x.shape)} {x.dtype}, t "
                             f"{tuple(t.shape)} {t.dtype}: a CUDA graph replays fixed shapes, build a new one")
        self._x.copy_(x)
        self._t_store.copy_(t[:1] if shared else t)

    def _capture(self, x: Tensor, t: Tensor) -> None:
        """Static buffers shaped like the first call's (a shared time stays a one-element view), a few
        eager warm-up calls on a side stream, then the capture."""
        self._shared = shared = shared_time(t) is not t
        self._x = x.detach().clone()
        self._t_store = (t[:1] if shared else t).detach().clone()
        self._t = self._t_store.expand(t.shape[0]) if shared else self._t_store
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.score_fn(self._x, self._t)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._out = self.score_fn(self._x, self._t)
        except RuntimeError as err:
            raise RuntimeError(f"cuda_graph: the score function cannot be captured in a CUDA graph ({err}); it must "
                               "run without host syncs or host-to-device copies; call it without CudaGraphScore"
                               ) from err
        if not isinstance(self._out, Tensor):
            raise RuntimeError(f"cuda_graph: the score function returned {type(self._out).__name__}, not a Tensor")
        self.graph = graph
