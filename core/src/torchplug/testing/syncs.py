"""Counting host reads: the Python calls that copy a tensor's value to the host.

On an accelerator ``loss.item()``, ``float(t)``, ``bool(t)``, ``t.tolist()``, ``t.cpu()`` and
their kind wait for everything queued on the device: one per step removes the overlap of host
and device that keeps a GPU busy. :class:`HostReads` counts them at the Python level, whatever
the device, so a test on the CPU shows whether a loop or a hook would sync an accelerator::

    with HostReads() as reads:
        trainer.fit(module, loader)
    assert reads.total == 0, reads.report()

    per_step, reads = reads_per_step(fit_for)   # fit_for(n) trains n steps; setup reads cancel

It sees calls made from Python, torch's own Python included (``GradScaler.step`` reads its
``found_inf`` flag with ``.item()``); reads inside C++ operators are not seen. On CUDA,
``torch.cuda.set_sync_debug_mode("warn")`` reports those as well.

On the CPU a Trainer checks each loss for NaN at once (a read that costs nothing there); on an
accelerator it queues the check on the device and reads it at the logging interval.
:func:`accelerator_path` takes the accelerator's path on the CPU, so host reads are counted as a
GPU run would make them::

    with accelerator_path():
        per_step, reads = reads_per_step(fit_for)
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from torchplug.losscheck import accelerator_path

__all__ = ["READS", "HostReads", "accelerator_path", "reads_per_step"]

#: Tensor methods and torch functions whose result is a host value computed from tensor data.
READS: frozenset[Any] = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.__complex__, torch.Tensor.__array__,
    torch.equal, torch.allclose, torch.is_nonzero,
})
_SKIP_FILES = (torch.overrides.__file__, torch._tensor.__file__, __file__)


class HostReads(TorchFunctionMode):
    """A torch function mode that counts host reads by call site (see the module docstring).

    ``sites`` maps ``"item at torchplug/loop.py:239 in train"`` to a count; ``total`` sums them.
    ``Tensor.to`` is not counted: on the CPU every placement ``.to(device)`` would look like a
    copy to the host; write host copies as ``.cpu()``, which is.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def report(self) -> str:
        """One line per call site, most frequent first."""
        return "\n".join(f"{count:6d}  {site}" for site, count in self.sites.most_common()) or "no host reads"

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in READS:
            self.sites[f"{getattr(func, '__name__', func)} at {_caller()}"] += 1
        return func(*args, **kwargs)


def reads_per_step(run: Callable[[int], object], steps: tuple[int, int] = (4, 12)) -> tuple[float, HostReads]:
    """Host reads per step of ``run(n)``, a function that trains ``n`` steps: it runs a short and
    a long run and divides the difference of their counts by the extra steps, so the reads of
    setup and teardown cancel out. Returns that and the long run's :class:`HostReads`."""
    short, long = steps
    counted = []
    for n in (short, long):
        with HostReads() as reads:
            run(n)
        counted.append(reads)
    return (counted[1].total - counted[0].total) / (long - short), counted[1]


def _caller() -> str:
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename in _SKIP_FILES:
        frame = frame.f_back
    code = frame.f_code
    path = code.co_filename.replace("\\", "/")
    for marker in ("/site-packages/", "/src/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
            break
    return f"{path}:{frame.f_lineno} in {code.co_name}"
