"""Count the host syncs a piece of code would make on an accelerator, on the CPU.

On CUDA, a host sync is any read of a device tensor's value by Python (``item``, ``bool``, ``float``,
``tolist``, ``.cpu()``, ...) and any blocking copy of host data to the device (``cpu_tensor.to(x)``,
``torch.tensor(data, device=x.device)`` with ``non_blocking=False``): both wait for the GPU's queue.
On the CPU every tensor lives in host memory, so "device tensor" is tracked by provenance instead:
``HostSyncCounter(roots)`` marks the given tensors (x_T, a model's parameters, the data) as on the
device; every output of an op with a marked input, and every factory called with an explicit
``device=`` other than the string "cpu", is marked too. Unmarked tensors are the host-side ones
(float64 time grids and schedules, the sampler's data order, AdamW's step counters): reading them is
free on CUDA as well, and it is not counted.

Usage::

    with HostSyncCounter([x_T]) as counter:
        sampler(score_fn, sde, x_T, steps=8)
    counter.total, counter.sites  # number of syncs, and where (file:line -> count)
"""

from __future__ import annotations

import collections
import traceback
import weakref

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
# reads of a tensor's value into Python: each one waits for the device
_READS = {_T.item, _T.__bool__, _T.__float__, _T.__int__, _T.__index__, _T.tolist, _T.numpy, _T.cpu, _T.__array__,
          _T.__format__, _T.is_nonzero, torch.equal, torch.allclose}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.randn,
              torch.rand, torch.randint, torch.arange, torch.linspace, torch.logspace, torch.eye}
_COPIES = {_T.to, _T.copy_, _T.cuda}
# library functions that only ever see host tensors on CUDA, whose reads are free there: ``as_time``
# range-checks a time tensor only when ``t.device.type == "cpu"``; the reverse-diffusion chain is
# checked once at entry on a float64 CPU probe. On the CPU their inputs look like device tensors.
HOST_ONLY = {"_check_time_values", "_check_discrete_chain"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _is_host(device) -> bool:
    return isinstance(device, str) and device == "cpu"


class HostSyncCounter(TorchFunctionMode):
    """A torch-function mode that counts would-be host syncs of the marked (device) tensors."""

    def __init__(self, roots=()) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.sites: collections.Counter[str] = collections.Counter()
        for t in _tensors(list(roots)):
            self.mark(t)

    def mark(self, t: torch.Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def marked(self, t: torch.Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def _count(self, kind: str) -> None:
        frames = [f for f in traceback.extract_stack() if "_host_sync.py" not in f.filename
                  and "/torch/overrides.py" not in f.filename]
        if any(f.name in HOST_ONLY for f in frames):
            return
        where = frames[-1] if frames else None
        self.sites[f"{kind} at {where.filename}:{where.lineno}" if where else kind] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in _tensors((args, kwargs))]
        on_device = any(self.marked(t) for t in inputs)
        to_host = to_device = False
        if func in _READS and on_device:
            self._count(getattr(func, "__name__", str(func)))
            to_host = True
        elif func in _COPIES:
            to_host, to_device = self._copy(func, args, kwargs)
        out = func(*args, **kwargs)
        made_on_device = func in _FACTORIES and kwargs.get("device") is not None and not _is_host(kwargs["device"])
        if made_on_device and func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
            self._count("host-to-device copy (torch.tensor)")
        if (on_device or made_on_device or to_device) and not to_host:
            for t in _tensors(out):
                self.mark(t)
        return out

    def _copy(self, func, args, kwargs) -> tuple[bool, bool]:
        """Count a blocking copy between host and device; returns (result on the host, result on the device)."""
        src = args[0]
        if func is _T.copy_:  # dst.copy_(src)
            dst_dev, src_dev = self.marked(args[0]), self.marked(args[1])
            if dst_dev != src_dev and not kwargs.get("non_blocking", len(args) > 2 and args[2]):
                self._count("copy_ between host and device")
            return False, dst_dev
        target = [a for a in args[1:] if isinstance(a, (torch.device, str, torch.Tensor))] + \
            [kwargs[k] for k in ("device", "other") if k in kwargs]
        if not target:
            return False, False  # a dtype change: stays where it is
        tgt = target[0]
        to_device = self.marked(tgt) if isinstance(tgt, torch.Tensor) else not _is_host(tgt)
        blocking = not kwargs.get("non_blocking", False)
        if to_device and not self.marked(src) and blocking:
            self._count("host-to-device copy (.to)")
        elif not to_device and self.marked(src):
            self._count("device-to-host copy (.to)")
            return True, False
        return False, to_device
