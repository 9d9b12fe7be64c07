"""``LearningRateMonitor``: log every optimizer's learning rate through ``trainer.log``."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from torchplug.errors import MisconfigurationError
from torchplug.plugin import Plugin

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from torchplug.trainer import Trainer

INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Plugin):
    """Log the learning rate of every optimizer as ``lr-<OptimizerClass>`` (Lightning's names:
    ``lr-SGD``, ``lr-Adam-1`` for a second Adam, ``lr-SGD/pg2`` for a second parameter group;
    ``momentum-SGD`` … with ``log_momentum=True``).

    :param logging_interval: ``"step"`` (the rate each optimizer step uses, logged before the
        step), ``"epoch"`` (at every epoch start), or ``None``: ``"step"`` when an LR scheduler
        steps per step, else ``"epoch"``.
    :param log_momentum: also log ``momentum`` (or Adam's ``beta1``).

    The values are Python floats read from ``param_groups``: no device sync. Like any metric
    they reach metrics.csv and ``on_log_metrics`` at the logging interval or the epoch's end.
    """

    plugin_name = "lr_monitor"

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in INTERVALS:
            raise MisconfigurationError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}): use 'step', 'epoch' or None."
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self._names: list[list[str]] = []
        self._interval = "epoch"

    def __repr__(self) -> str:
        return f"LearningRateMonitor(logging_interval={self.logging_interval!r})"

    def on_fit_start(self, trainer: Trainer) -> None:
        self._names = _names(trainer.optimizers)
        if self.logging_interval is not None:
            self._interval = self.logging_interval
        else:
            steps = any(config.interval == "step" for config in trainer.lr_scheduler_configs)
            self._interval = "step" if steps else "epoch"

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        if self._interval == "epoch":
            self._log(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, optimizer: Optimizer) -> None:
        if self._interval == "step" and trainer.optimizers and optimizer is trainer.optimizers[0]:
            self._log(trainer)  # once per step, for every optimizer

    def _log(self, trainer: Trainer) -> None:
        for optimizer, names in zip(trainer.optimizers, self._names):
            for group, name in zip(optimizer.param_groups, names):
                trainer.log(name, float(group["lr"]))
                if self.log_momentum:
                    momentum = group.get("momentum", group.get("betas", (0.0,))[0])
                    trainer.log(name.replace("lr-", "momentum-", 1), float(momentum))


def _names(optimizers: list[Optimizer]) -> list[list[str]]:
    """Lightning's metric names, one list per optimizer, one name per parameter group."""
    seen: Counter[str] = Counter()
    out = []
    for optimizer in optimizers:
        cls = type(optimizer).__name__
        base = f"lr-{cls}" if seen[cls] == 0 else f"lr-{cls}-{seen[cls]}"
        seen[cls] += 1
        groups = len(optimizer.param_groups)
        out.append([base] if groups == 1 else [f"{base}/pg{i + 1}" for i in range(groups)])
    return out
