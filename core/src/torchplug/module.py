"""``TrainingModule``: the user's model, and the store behind ``self.log``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MetricStore:
    """What ``TrainingModule.log`` records. Values stay tensors (no device sync per step)
    until the Trainer reads them at its logging interval."""

    def __init__(self) -> None:
        self.validating = False
        self.train: dict[str, torch.Tensor | float] = {}
        self.val_sums: dict[str, torch.Tensor | float] = {}
        self.val_counts: dict[str, int] = {}

    def log(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}, ...) needs a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach()
        elif not isinstance(value, (int, float)):
            raise TypeError(f"self.log({name!r}, ...) needs a number or a scalar tensor, got {type(value).__name__}")
        if self.validating:
            self.val_sums[name] = self.val_sums.get(name, 0.0) + value
            self.val_counts[name] = self.val_counts.get(name, 0) + 1
        else:
            self.train[name] = value

    def begin_validation(self) -> None:
        self.validating = True
        self.val_sums.clear()
        self.val_counts.clear()

    def end_validation(self) -> dict[str, torch.Tensor | float]:
        self.validating = False
        return {name: total / self.val_counts[name] for name, total in self.val_sums.items()}


class TrainingModule(nn.Module):
    """Subclass it and define:

    * ``training_step(batch, batch_idx)`` → a scalar loss tensor, or a dict with ``"loss"``;
    * ``configure_optimizers()`` → an optimizer; a list of optimizers; ``(optimizers,
      schedulers)``; or a dict ``{"optimizer": opt, "lr_scheduler": sched | {"scheduler": sched,
      "interval": "step" | "epoch", "monitor": "val_loss"}}`` (or a list of such dicts);
    * optionally ``validation_step(batch, batch_idx)``, ``train_dataloader()``,
      ``val_dataloader()``.

    Call ``self.log(name, value)`` in either step to record a metric; validation values are
    averaged over the epoch's batches (and processes).
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define training_step(batch, batch_idx)")

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define configure_optimizers()")

    #: Lightning's switch: False hands optimization to ``training_step`` (``self.optimizers()``,
    #: ``self.manual_backward(loss)``, ``opt.step()``); see :mod:`torchplug.optimization`.
    automatic_optimization: bool = True

    def _fit_loop(self, what: str) -> Any:
        loop = self.__dict__.get("_torchplug_loop")
        if loop is None:
            raise RuntimeError(f"{type(self).__name__}.{what} works only during Trainer.fit")
        return loop

    @property
    def trainer(self) -> Any:
        """The Trainer fitting this module (``None`` outside a fit)."""
        loop = self.__dict__.get("_torchplug_loop")
        return loop.trainer if loop is not None else None

    @property
    def current_epoch(self) -> int:
        """The Trainer's ``current_epoch`` (0 outside a fit)."""
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    @property
    def global_step(self) -> int:
        """The Trainer's ``global_step`` (0 outside a fit)."""
        trainer = self.trainer
        return int(trainer.global_step) if trainer is not None else 0

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter or buffer (CPU without any)."""
        for param in self.parameters():
            return param.device
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    def optimizers(self) -> Any:
        """The optimizers, stepping through the precision plugin (one, or a list of several)."""
        wrapped = self._fit_loop("optimizers()").step_optimizers
        return wrapped[0] if len(wrapped) == 1 else list(wrapped)

    def lr_schedulers(self) -> Any:
        """The LR schedulers (one, a list, or None): manual optimization steps them itself."""
        schedulers = [s.scheduler for s in self._fit_loop("lr_schedulers()").schedulers]
        return None if not schedulers else schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: torch.Tensor) -> None:
        """Backward through the precision plugin (loss scaling, apex): ``on_before_backward`` →
        the ``backward`` hook → ``on_after_backward``."""
        loop = self._fit_loop("manual_backward()")
        hooks, trainer = loop.hooks, loop.trainer
        hooks.on_before_backward(trainer=trainer, loss=loss)
        hooks.backward(loss=loss, optimizers=loop.optimizers, model=loop.model, sync_gradients=True)
        hooks.on_after_backward(trainer=trainer)

    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a metric; outside a Trainer run this does nothing."""
        store: MetricStore | None = self.__dict__.get("_torchplug_metrics")
        if store is not None:
            store.log(name, value)

    def _attach_metrics(self, store: MetricStore | None) -> None:
        # Plain __dict__ write: nn.Module.__setattr__ is slow and would register nothing useful.
        self.__dict__["_torchplug_metrics"] = store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_torchplug_metrics", None)  # per-process; never pickled into workers
        state.pop("_torchplug_loop", None)
        return state
