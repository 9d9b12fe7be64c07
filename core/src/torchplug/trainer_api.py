"""The part of :class:`torchplug.Trainer` that plugins and callbacks use during a fit.

Everything here is public and typed; a plugin in this repository needs nothing else of the
Trainer (``core/tests/test_plugin_api.py`` fails when one touches a private attribute):

* ``trainer.model`` / ``trainer.lightning_module``: the user's module, from the fit's setup on;
* ``trainer.fitting``: a fit is running in this process; ``trainer.arguments``: its arguments;
* ``trainer.sanity_checking``: the ``num_sanity_val_steps`` validation before training runs;
* ``trainer.should_stop``: set it to end the fit at the end of the current optimizer step (or
  epoch), like ``max_steps`` does;
* ``trainer.reduce_boolean_decision(decision, all=False)``: one decision for every rank;
* ``trainer.log(name, value, prog_bar=False, logger=True)``: log a metric from a plugin;
* ``trainer.logged_metrics`` (what was written to metrics.csv and ``on_log_metrics``) and
  ``trainer.callback_metrics`` (the last value of everything logged);
* ``trainer.save_checkpoint(path)`` (in trainer.py): a checkpoint in the trainer's own format;
* ``trainer.val_dataloaders``, ``trainer.lr_scheduler_configs``, ``trainer.log_dir``,
  ``trainer.is_global_zero``, ``trainer.global_step``, ``trainer.current_epoch``;
* ``trainer.fast_dev_run`` (its batches, 0: off; a logger or checkpoint callback then writes no
  file) and ``trainer.accumulate_grad_batches`` (the accumulation of the current epoch).

The module's own callbacks (``TrainingModule.configure_callbacks``) are registered here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug.errors import MisconfigurationError, PluginValidationError
from torchplug.hookcalls import Hooks
from torchplug.plugin import Plugin

if TYPE_CHECKING:
    from torchplug.manager import PluginManager
    from torchplug.run import FitOutcome, FitRun
    from torchplug.state import SchedulerConfig


class PluginFacingTrainer:
    """Mixed into :class:`torchplug.Trainer`; see the module docstring."""

    # Set by Trainer.__init__ (declared here for the type checker).
    pm: PluginManager
    hooks: Hooks
    world_size: int
    global_rank: int
    #: the user's module: during fit from its setup on (in every process), and after it
    model: nn.Module | None
    #: the validation loader of the running fit (sharded under several processes), or None
    val_dataloaders: Any
    #: the LR schedulers with their interval (``"step"``/``"epoch"``) and monitored metric
    lr_scheduler_configs: list[SchedulerConfig]
    _init_args: dict[str, Any]
    _run: FitRun | None
    _outcome: FitOutcome | None
    _stop_without_fit: bool
    _trainer_callbacks: list[object]
    _module_callbacks: list[object]
    _module_callbacks_for: int | None

    @property
    def lightning_module(self) -> nn.Module | None:
        """Lightning's name for :attr:`model`: the user's module."""
        return self.model

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments this Trainer was built with, by name (a copy; e.g. for a logger's
        hyperparameters)."""
        return dict(self._init_args)

    @property
    def fitting(self) -> bool:
        """Whether a fit is running in this process, from its setup on (``False`` during
        ``Trainer.validate``, whose ``on_validation_end`` a callback may then ignore)."""
        run = self._run
        return run is not None and run.loop is not None and not run.stop.stopping

    @property
    def sanity_checking(self) -> bool:
        """Whether the ``num_sanity_val_steps`` validation before training is running (Lightning's name)."""
        run = self._run
        return run is not None and run.loop is not None and run.loop.sanity_checking

    @property
    def should_stop(self) -> bool:
        """Set it to ``True`` to stop the fit cleanly: the loop checks it at the end of every
        optimizer step and every epoch, and stops as ``max_steps`` does (the epoch ends if its
        last batch was trained, ``last.ckpt`` is written, ``on_fit_end`` runs). Under several
        processes set it on every rank alike (decide with :meth:`reduce_boolean_decision`);
        the loop also reduces it across ranks at every epoch end, so a rank that stops there
        stops them all. Reset to ``False`` when a fit starts."""
        if self._run is not None:
            return self._run.state.should_stop
        return self._stop_without_fit

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise MisconfigurationError(f"trainer.should_stop must be a bool, got {value!r}")
        if self._run is not None:
            self._run.state.should_stop = value
        else:
            self._stop_without_fit = value

    def reduce_boolean_decision(self, decision: bool, all: bool = False) -> bool:  # Lightning's names
        """The same decision on every rank: ``True`` if any rank decided ``True`` (``all=False``)
        or if every rank did (``all=True``). One collective through the ``reduce`` hook (and one
        host read) under several processes; nothing at all in one. Call it on every rank, at
        the same point (an event hook such as ``on_validation_end``), never per step."""
        decision = bool(decision)
        if self.world_size <= 1:
            return decision
        run = self._run
        if run is None or run.loop is None:
            raise MisconfigurationError(
                "reduce_boolean_decision needs the fit's processes: call it from a hook during fit "
                "(on_fit_start or later)."
            )
        votes = self.hooks.reduce(tensor=torch.tensor(float(decision), device=run.loop.device), op="sum")
        total = float(votes)
        return total >= self.world_size - 0.5 if all else total > 0.5

    def log(self, name: str, value: torch.Tensor | float, prog_bar: bool = False, logger: bool = True) -> None:
        """Log a metric from a plugin, into the same store as the module's ``self.log``: during
        a step it is written at the logging interval; from ``on_train_epoch_end`` or
        ``on_validation_end`` it is written with that event's row (metrics.csv,
        ``on_log_metrics``); during validation it is averaged like ``validation_step``'s.
        Keep tensors on the device (no host read per step)."""
        run = self._run
        if run is None or run.loop is None:
            raise MisconfigurationError(
                f"trainer.log({name!r}, ...) was called outside a fit; call it from a hook during fit "
                "(on_fit_start or later)."
            )
        run.metrics.log(name, value, prog_bar=prog_bar, logger=logger)

    @property
    def logged_metrics(self) -> dict[str, float]:
        """The last value of every metric written to metrics.csv and ``on_log_metrics`` (what the
        loggers got; ``self.log(..., logger=False)`` metrics are not in it); live during fit."""
        if self._run is not None:
            return self._run.state.logged_metrics
        return dict(self._outcome.extra.get("logged_metrics", {})) if self._outcome is not None else {}

    # -- the module's callbacks --------------------------------------------------------------
    def _use_module_callbacks(self, model: nn.Module) -> None:
        """Register what ``model.configure_callbacks()`` returns (replacing a ``callbacks=``
        object of the same class), once per fit and process: a spawned worker's Trainer is
        rebuilt from its arguments, so it registers them again there."""
        if self._module_callbacks_for == id(model):
            return
        self._module_callbacks_for = id(model)
        configure = getattr(model, "configure_callbacks", None)
        found = configure() if callable(configure) else []
        made = list(found) if isinstance(found, Sequence) and not isinstance(found, str) else \
            ([] if found is None else [found])
        if not made and not self._module_callbacks:
            return  # nothing changes: keep the Hooks as built
        for item in made:
            if isinstance(item, (str, type)) or item is None:
                raise MisconfigurationError(
                    f"{type(model).__name__}.configure_callbacks() returned {item!r}; return callback objects "
                    "(torchplug.Plugin instances), e.g. [EarlyStopping(monitor='val_loss')]."
                )
        for old in self._module_callbacks:
            if self.pm.is_registered(old):
                self.pm.unregister(old)
        replaced = {type(cb) for cb in made}
        for cb in self._trainer_callbacks:
            registered = self.pm.is_registered(cb)
            if type(cb) in replaced and registered:
                self.pm.unregister(cb)
            elif type(cb) not in replaced and not registered:
                self._register_callback(cb)
        for cb in made:
            self._register_callback(cb)
        self.pm.check_roles()
        self._module_callbacks = made
        self.hooks = Hooks(self.pm)  # its call sites are resolved once, when built
        if made:
            self.pm.subset_hook_caller(
                "check_configuration", remove_plugins=[p for p in self.pm.get_plugins() if p not in made]
            )(trainer=self)

    def _register_callback(self, callback: object) -> None:
        from torchplug.selection import unique

        used = {rec.name for rec in self.pm.records}
        name = unique(str(getattr(callback, "plugin_name", None) or type(callback).__name__), used)
        self.pm.register_plugin(callback, name, "object")
        if not isinstance(callback, Plugin) and not self.pm.get_hookcallers(callback):
            self.pm.unregister(callback)
            raise PluginValidationError(
                f"configure_callbacks() returned {type(callback).__qualname__}, which implements no torchplug hook. "
                "Return instances of torchplug.Plugin subclasses (torchplug.callbacks has EarlyStopping, "
                "ModelCheckpoint, LearningRateMonitor)."
            )


__all__ = ["PluginFacingTrainer"]
