"""``TrainingModule``: the user's model, and the store behind ``self.log``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from types import FrameType
from typing import Any, TypeVar

import torch
from torch import nn

from torchplug import hparams as hyper

M = TypeVar("M", bound="TrainingModule")

REDUCE_FX = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", torch.mean: "mean", torch.sum: "sum",
             torch.max: "max", torch.min: "min"}


class _Aggregate:
    """One metric's values over an epoch, on the device: mean, sum, max or min."""

    def __init__(self, fx: str, key: str, sync_dist: bool) -> None:
        self.fx, self.key, self.sync_dist = fx, key, sync_dist
        self.value: torch.Tensor | float | None = None
        self.count = 0

    def add(self, value: torch.Tensor | float) -> None:
        self.count += 1
        if self.value is None:
            self.value = value
        elif self.fx in ("mean", "sum"):
            self.value = self.value + value
        else:
            pick = torch.maximum if self.fx == "max" else torch.minimum
            self.value = pick(torch.as_tensor(self.value), torch.as_tensor(value))

    def result(self) -> torch.Tensor | float:
        assert self.value is not None
        return self.value / self.count if self.fx == "mean" else self.value


class MetricStore:
    """What ``TrainingModule.log`` records. Values stay tensors (no device sync per step)
    until the Trainer reads them at its logging interval.

    Lightning 1.x semantics: in training (``training_step``, the batch hooks) ``on_step=True,
    on_epoch=False`` by default; in validation and in the epoch-end hooks ``on_step=False,
    on_epoch=True``. Logged on both, a training metric is written as ``<name>_step`` and
    ``<name>_epoch``. An epoch value is ``reduce_fx`` over the epoch's logged values;
    ``sync_dist=True`` reduces it over the processes (mean, or sum for ``reduce_fx="sum"``) with
    the strategy's ``reduce`` hook, at the epoch's end (per step for step values).
    """

    def __init__(self) -> None:
        self.validating = False
        #: True while the training epoch-end hooks run (their logs are epoch values)
        self.epoch_end = False
        self.train: dict[str, torch.Tensor | float] = {}
        self.epoch: dict[str, _Aggregate] = {}
        self.val: dict[str, _Aggregate] = {}
        #: names logged with prog_bar=True, and with logger=False (kept out of metrics.csv)
        self.prog_bar: set[str] = set()
        self.not_logged: set[str] = set()
        #: the strategy's reduce hook, set by the loop: (tensor, op) → tensor
        self.reduce: Any = None

    def log(self, name: str, value: torch.Tensor | float, prog_bar: bool = False, logger: bool = True,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            sync_dist: bool = False) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"self.log({name!r}, ...) needs a scalar, got a tensor of shape {tuple(value.shape)}")
            value = value.detach() if value.ndim == 0 else value.detach().reshape(())
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"self.log({name!r}, ...) needs a number or a scalar tensor, got {type(value).__name__}")
        fx = REDUCE_FX.get(reduce_fx) if not isinstance(reduce_fx, list) else None
        if fx is None:
            raise ValueError(f"self.log({name!r}, reduce_fx={reduce_fx!r}): use 'mean', 'sum', 'max' or 'min' "
                             "(or torch.mean, torch.sum, torch.max, torch.min).")
        if sync_dist and fx in ("max", "min"):
            raise ValueError(f"self.log({name!r}, reduce_fx={fx!r}, sync_dist=True): the processes are reduced "
                             "by mean or sum only; log the value with reduce_fx='mean' or 'sum'.")
        op = "sum" if fx == "sum" else "mean"
        epoch_phase = self.validating or self.epoch_end
        on_step = (not epoch_phase) if on_step is None else on_step
        on_epoch = epoch_phase if on_epoch is None else on_epoch
        if on_step and epoch_phase:
            where = "validation" if self.validating else "an epoch-end hook"
            raise ValueError(f"self.log({name!r}, on_step=True) in {where}: there is no step there; use "
                             "on_epoch=True (the default there).")
        if not (on_step or on_epoch):
            raise ValueError(f"self.log({name!r}, on_step=False, on_epoch=False) would log nothing.")
        if prog_bar:
            self.prog_bar.add(name)
        if self.validating:
            self.val.setdefault(name, _Aggregate(fx, name, sync_dist)).add(value)
            return
        step_key = f"{name}_step" if on_step and on_epoch else name
        epoch_key = f"{name}_epoch" if on_step and on_epoch else name
        if not logger:
            self.not_logged.update((step_key, epoch_key))
        if on_epoch:
            self.epoch.setdefault(name, _Aggregate(fx, epoch_key, sync_dist)).add(value)
        if on_step:
            if sync_dist and self.reduce is not None:
                value = self.reduce(torch.as_tensor(value, dtype=torch.float32), op)
            self.train[step_key] = value

    def end_train_epoch(self) -> None:
        """Move the epoch values into the values written next (reduced over processes if asked)."""
        for agg in self.epoch.values():
            value = agg.result()
            if agg.sync_dist and self.reduce is not None:
                value = self.reduce(torch.as_tensor(value, dtype=torch.float32), "sum" if agg.fx == "sum" else "mean")
            self.train[agg.key] = value
        self.epoch.clear()

    def begin_validation(self) -> None:
        self.validating = True
        self.val.clear()

    def end_validation(self) -> dict[str, torch.Tensor | float]:
        self.validating = False
        return {name: agg.result() for name, agg in self.val.items()}


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

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int | None = None) -> Any:
        """``Trainer.predict``'s step; Lightning's default: the module's forward on the batch."""
        return self(batch)

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

    def log(self, name: str, value: torch.Tensor | float, prog_bar: bool = False, logger: bool = True,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            tbptt_reduce_fx: Any = None, tbptt_pad_token: Any = None, enable_graph: bool = False,
            sync_dist: bool = False, sync_dist_op: Any = None, sync_dist_group: Any = None) -> None:
        """Record a metric (Lightning 1.x's arguments; see :class:`MetricStore`); outside a Trainer
        run this does nothing. Arguments torchplug cannot honour are refused, never ignored."""
        if tbptt_reduce_fx is not None or tbptt_pad_token is not None or sync_dist_group is not None:
            refused = {"tbptt_reduce_fx": tbptt_reduce_fx, "tbptt_pad_token": tbptt_pad_token,
                       "sync_dist_group": sync_dist_group}  # built only when refusing: self.log runs per step
            arg = next(arg for arg, given in refused.items() if given is not None)
            raise ValueError(f"self.log({name!r}, {arg}=...): torchplug has no {arg.split('_')[0]} support; "
                             f"drop {arg}.")
        if enable_graph:
            raise ValueError(f"self.log({name!r}, enable_graph=True): logged values are detached; drop it.")
        if sync_dist_op is not None and sync_dist_op not in ("mean", "sum", torch.mean, torch.sum):
            raise ValueError(f"self.log({name!r}, sync_dist_op={sync_dist_op!r}): use 'mean' or 'sum'.")
        if sync_dist_op in ("sum", torch.sum) and reduce_fx in ("mean", torch.mean):
            reduce_fx = "sum"  # Lightning 1.1 spelled the cross-process sum this way
        store: MetricStore | None = self.__dict__.get("_torchplug_metrics")
        if store is not None:
            store.log(name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
                      reduce_fx=reduce_fx, sync_dist=sync_dist)

    def log_dict(self, dictionary: dict[str, torch.Tensor | float], **kwargs: Any) -> None:
        """``self.log(name, value, **kwargs)`` for each item."""
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def save_hyperparameters(self, *args: Any, ignore: str | Sequence[str] | None = None,
                             frame: FrameType | None = None) -> None:
        """Keep ``__init__``'s arguments (or the ``args`` named, or one dict) in ``self.hparams``
        and in checkpoints (``"hyper_parameters"``); call it in ``__init__``. :mod:`torchplug.hparams`."""
        hyper.save(self, args, ignore, frame or getattr(inspect.currentframe(), "f_back", None))

    @property
    def hparams(self) -> hyper.AttributeDict:
        """What ``save_hyperparameters`` kept: ``self.hparams.lr`` or ``self.hparams["lr"]``."""
        return hyper.hparams_of(self)

    @hparams.setter
    def hparams(self, value: Any) -> None:
        # Lightning 1.1 let __init__ assign self.hparams = hparams (a dict or argparse.Namespace).
        hyper.hparams_of(self).clear()
        hyper.save(self, (value,), None, None)

    @classmethod
    def load_from_checkpoint(cls: type[M], checkpoint_path: str | os.PathLike[str], strict: bool = True,
                             **overrides: Any) -> M:
        """The module rebuilt from a checkpoint's hyperparameters (``overrides`` replace them) with
        its weights loaded; refused, naming what is missing, when ``__init__`` needs arguments
        the checkpoint does not store."""
        return hyper.load_from_checkpoint(cls, checkpoint_path, strict, overrides)

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
        state.pop("_torchplug_loop", None)
        return state
