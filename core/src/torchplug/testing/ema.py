"""``EMAWeights``: an exponential moving average of the weights, written on the public plugin API
the way a third party would, to test plugins composed with a sharding strategy.

It keeps the average next to the parameters (on their device, sharded like them under FSDP:
each rank averages its own shard, no collective per step), swaps it into the module in
``on_fit_end`` on every rank (so a ``devices=N`` fit hands the average back: the core gathers
the final weights after ``on_fit_end``), gathers the full average in ``collect_state`` (every
rank) so that rank 0's ``on_save_checkpoint`` stores complete tensors, and restores it, sharded
like the parameters again, in ``on_load_checkpoint``. ``state_dict()``/``load_state_dict()``
bring rank 0's average back to the object in the launching process.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from torchplug.errors import CheckpointError
from torchplug.plugin import Plugin

KEY = "ema_weights"


def _is_dtensor(value: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor: every rank must call it)."""
    return (value.full_tensor() if _is_dtensor(value) else value).detach().cpu().clone()  # type: ignore[attr-defined]


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` placed like ``param`` (its shard of it, under FSDP; no collective: every rank has it all)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,  # type: ignore[attr-defined]
                                 param.placements, src_data_rank=None)  # type: ignore[attr-defined]
    return full.to(param.device, param.dtype).clone()


class EMAWeights(Plugin):
    """Average the parameters after every optimizer step, ``avg = decay * avg + (1 - decay) * p``;
    at the end of fit the module holds the average.

    :param decay: the weight of the past.
    """

    plugin_name = "ema_weights"

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        #: parameter name -> the running average (sharded like the parameter during fit)
        self.average: dict[str, torch.Tensor] = {}
        self._last_step = -1
        self._gathered: dict[str, torch.Tensor] | None = None

    def _params(self, trainer: Any) -> dict[str, nn.Parameter]:
        return dict(trainer.model.named_parameters())

    def on_train_start(self, trainer: Any) -> None:
        params = self._params(trainer)
        if set(self.average) != set(params):  # not restored by on_load_checkpoint
            self.average = {name: p.detach().clone() for name, p in params.items()}
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Any) -> None:
        if trainer.global_step == self._last_step:
            return  # inside an accumulation window
        self._last_step = trainer.global_step
        for name, param in self._params(trainer).items():
            self.average[name].mul_(self.decay).add_(param.detach(), alpha=1 - self.decay)

    def collect_state(self, trainer: Any) -> None:
        # Every rank: full_tensor() of a shard is a collective. Rank 0 keeps the result for on_save_checkpoint.
        gathered = {name: _full(value) for name, value in self.average.items()}
        self._gathered = gathered if trainer.is_global_zero else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._gathered is None:
            raise RuntimeError("EMAWeights: on_save_checkpoint before collect_state gathered the average")
        checkpoint[KEY] = {"decay": self.decay, "average": self._gathered}

    def on_load_checkpoint(self, trainer: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        if saved is None:
            return
        params = self._params(trainer)
        for name, full in saved["average"].items():
            expected = tuple(params[name].shape)  # a DTensor's shape is the global one
            if tuple(full.shape) != expected:
                raise CheckpointError(
                    f"checkpoint[{KEY!r}]['average'][{name!r}] has shape {tuple(full.shape)}, the parameter "
                    f"{expected}: it holds a shard, not the full average (written on one rank under a sharding "
                    "strategy without gathering it). Write it with EMAWeights.collect_state gathering on every rank."
                )
        self.average = {name: _like(full, params[name]) for name, full in saved["average"].items()}

    @torch.no_grad()
    def on_fit_end(self, trainer: Any) -> None:
        for name, param in self._params(trainer).items():  # every rank: its shard of the average
            param.copy_(self.average[name])

    # -- the state the launching process gets back from devices=N workers (torchplug.handback)
    def state_dict(self) -> dict[str, Any]:
        # After fit the last collect_state (every rank, after on_fit_end) has gathered the full average.
        average = self._gathered if self._gathered is not None else {n: _full(v) for n, v in self.average.items()}
        return {"decay": self.decay, "average": dict(average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.average = dict(state["average"])


__all__ = ["EMAWeights"]
