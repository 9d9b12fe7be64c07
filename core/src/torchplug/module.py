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
        #: names logged with ``prog_bar=True`` (shown on the progress bar) and ``logger=False``
        #: (kept in ``callback_metrics`` only, never written to metrics.csv or loggers)
        self.prog_bar: set[str] = set()
        self.not_logged: set[str] = set()

    def log(self, name: str, value: torch.Tensor | float, prog_bar: bool = False, logger: bool = True) -> None:
        (self.prog_bar.add if prog_bar else self.prog_bar.discard)(name)
        (self.not_logged.discard if logger else self.not_logged.add)(name)
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
      ``val_dataloader()``, ``configure_callbacks()``.

    Call ``self.log(name, value)`` in either step to record a metric; validation values are
    averaged over the epoch's batches (and processes).
    """

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define training_step(batch, batch_idx)")

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define configure_optimizers()")

    def log(self, name: str, value: torch.Tensor | float, prog_bar: bool = False, logger: bool = True) -> None:
        """Record a metric; outside a Trainer run this does nothing. ``prog_bar=True`` shows it on
        the progress bar; ``logger=False`` keeps it out of metrics.csv and the loggers (it still
        reaches ``trainer.callback_metrics``)."""
        store: MetricStore | None = self.__dict__.get("_torchplug_metrics")
        if store is not None:
            store.log(name, value, prog_bar=prog_bar, logger=logger)

    def configure_callbacks(self) -> Any:
        """Callbacks (plugin objects) this module needs, registered when ``fit`` starts, after
        ``Trainer(callbacks=...)``; one of the same class given to the Trainer is replaced by it
        (as in Lightning). Return a list, or one object. Default: none."""
        return []

    def _attach_metrics(self, store: MetricStore | None) -> None:
        # Plain __dict__ write: nn.Module.__setattr__ is slow and would register nothing useful.
        self.__dict__["_torchplug_metrics"] = store

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_torchplug_metrics", None)  # per-process; never pickled into workers
        return state
