"""The non-finite loss check, without a host read per step on an accelerator.

Reading a loss on the host (``math.isfinite(loss.item())``) waits for the device to finish the
step; one such read per micro-batch removes the overlap of host and device that keeps a GPU
busy. On the CPU the read is free and the loss is checked at once. On an accelerator, in
``"error"`` mode, the losses are queued on the device and read in one transfer at the logging
interval and before every checkpoint (:meth:`LossCheck.flush`), so no checkpoint ever holds
weights a non-finite loss reached, and the error still names the first bad step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from torchplug.errors import MisconfigurationError, NonFiniteLossError

#: Set by :func:`accelerator_path` (``torchplug.testing.syncs.accelerator_path``): a CPU run
#: then takes the path an accelerator run takes, so its host reads can be counted on the CPU.
_force_deferred = False


@contextmanager
def accelerator_path() -> Iterator[None]:
    """Within the block, Trainers check losses as on an accelerator (queued on the device)."""
    global _force_deferred
    before, _force_deferred = _force_deferred, True
    try:
        yield
    finally:
        _force_deferred = before


class LossCheck:
    """``on_nonfinite_loss`` (``"error"``, ``"skip"``, ``"ignore"``) for one fit on ``device``."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.deferred = mode == "error" and (device.type != "cpu" or _force_deferred)
        self._queued: list[tuple[torch.Tensor, int, int, int]] = []

    def admits(self, loss: torch.Tensor, epoch: int, batch_idx: int, step: int) -> bool:
        """Whether this micro-batch's loss may be backpropagated. Raises
        :class:`NonFiniteLossError` at once when the check is not deferred."""
        if self.mode == "ignore":
            return True
        if self.deferred:
            self._queued.append((loss.detach(), epoch, batch_idx, step))
            return True
        if math.isfinite(loss.item()):
            return True
        self._fail(loss, epoch, batch_idx, step)  # raises in "error" mode
        return False  # "skip": no backward for this micro-batch

    def flush(self, current_step: int) -> None:
        """Read the losses queued since the last flush, in one transfer."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        finite = torch.isfinite(torch.stack([item[0] for item in queued])).cpu().tolist()
        for ok, (loss, epoch, batch_idx, step) in zip(finite, queued):
            if not ok:
                self._fail(loss, epoch, batch_idx, step,
                           note=f" It was detected at global step {current_step}: on an accelerator the check "
                                "runs at the logging interval, so later steps used its gradients and no "
                                "checkpoint was written since.")

    def _fail(self, loss: torch.Tensor, epoch: int, batch_idx: int, step: int, note: str = "") -> None:
        if self.mode == "error":
            raise NonFiniteLossError(
                f"training_step returned a non-finite loss ({loss.item()}) at epoch {epoch}, batch {batch_idx} "
                f"(global step {step}, the optimizer step it belongs to).{note} Pass "
                "Trainer(on_nonfinite_loss='skip') to skip such batches, or 'ignore' to backpropagate anyway."
            )


def loss_of(output: Any, batch_idx: int, epoch: int) -> torch.Tensor:
    """The loss in what ``training_step`` returned; refused, naming the step, if it cannot be trained."""
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        if isinstance(loss, torch.Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        elif isinstance(output, dict):
            got = f"a dict without 'loss' (keys {sorted(map(str, output))})"
        else:
            got = type(loss).__name__
        raise MisconfigurationError(
            f"training_step must return a scalar loss tensor or a dict with 'loss'; got {got} "
            f"at epoch {epoch}, batch {batch_idx}."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            f"The loss returned by training_step at epoch {epoch}, batch {batch_idx} does not require grad "
            "(computed under torch.no_grad(), or detached?)."
        )
    return loss
