"""``EarlyStopping``: stop the fit when a monitored metric stops improving."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from torchplug.callbacks._common import StatefulCallback, check_mode, improved, monitored, state_key
from torchplug.errors import MisconfigurationError

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


class EarlyStopping(StatefulCallback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` checks
    (Lightning's arguments and behaviour).

    :param monitor: the metric to watch (``self.log``'d), e.g. ``"val_loss"``.
    :param min_delta: the least change that counts as an improvement.
    :param patience: checks without improvement before stopping.
    :param mode: ``"min"`` (lower is better) or ``"max"``.
    :param check_finite: stop at once when the metric is NaN or infinite.
    :param stopping_threshold: stop at once when the metric reaches this value.
    :param divergence_threshold: stop at once when the metric is worse than this value.
    :param check_on_train_epoch_end: check at the train epoch's end instead of after
        validation; ``None``: only when the fit has no validation.
    :param verbose: print why it stopped.

    Checked on every rank; the decision is reduced across ranks
    (``trainer.reduce_boolean_decision``), so every rank stops at the same step. Its counter and
    best score are saved in checkpoints and restored on resume. A monitor that was never logged
    is a :class:`~torchplug.MisconfigurationError` naming the metrics that were.
    """

    plugin_name = "early_stopping"

    def __init__(self, monitor: str, min_delta: float = 0.0, patience: int = 3, verbose: bool = False,
                 mode: str = "min", check_finite: bool = True, stopping_threshold: float | None = None,
                 divergence_threshold: float | None = None, check_on_train_epoch_end: bool | None = None) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise MisconfigurationError(f"EarlyStopping(monitor={monitor!r}): name the metric to monitor.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise MisconfigurationError(f"EarlyStopping(patience={patience!r}): patience must be an integer >= 0.")
        self.monitor = monitor
        self.mode = check_mode("EarlyStopping", mode)
        self.min_delta = abs(float(min_delta))
        self.patience = patience
        self.verbose = verbose
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.wait_count = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        self.stopped_epoch = 0
        self.stopping_reason: str | None = None
        self._checked_at: tuple[int, int] | None = None  # (epoch, step) of the last check

    def __repr__(self) -> str:
        return f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}, patience={self.patience})"

    @property
    def state_key(self) -> str:
        return state_key("EarlyStopping", monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score,
                "patience": self.patience, "checked_at": list(self._checked_at or ())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait_count = int(state["wait_count"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best_score = float(state["best_score"])
        checked: list[Any] = list(state.get("checked_at") or [])
        self._checked_at = (int(checked[0]), int(checked[1])) if len(checked) == 2 else None

    # -- hooks -------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.fitting and self._at_train_epoch_end(trainer):
            self._check(trainer, "the end of the training epoch")

    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.fitting and not self._at_train_epoch_end(trainer):
            self._check(trainer, "validation")

    # -- the decision ------------------------------------------------------------------------
    def _at_train_epoch_end(self, trainer: Trainer) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return trainer.val_dataloaders is None or trainer.limit_val_batches == 0

    def _check(self, trainer: Trainer, where: str) -> None:
        position = (trainer.current_epoch, trainer.global_step)
        if self._checked_at == position:
            return  # resumed from a checkpoint written at this very check: it was counted already
        self._checked_at = position
        current = monitored("EarlyStopping", self.monitor, trainer, where)
        stop, reason = self._evaluate(current)
        stop = trainer.reduce_boolean_decision(stop)  # one answer on every rank
        if stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason = reason or "another rank decided to stop"
            trainer.should_stop = True
            if self.verbose and trainer.is_global_zero:
                print(f"EarlyStopping: {self.stopping_reason}", file=sys.stderr)

    def _evaluate(self, current: float) -> tuple[bool, str | None]:
        name = self.monitor
        if self.check_finite and not math.isfinite(current):
            return True, f"{name} = {current} is not finite; the previous best was {self.best_score:.6g}."
        threshold = self.stopping_threshold
        if threshold is not None and (current == threshold or improved(current, threshold, self.mode)):
            return True, f"{name} = {current:.6g} reached the stopping threshold {self.stopping_threshold}."
        if self.divergence_threshold is not None \
                and improved(self.divergence_threshold, current, self.mode):
            return True, f"{name} = {current:.6g} is past the divergence threshold {self.divergence_threshold}."
        if improved(current, self.best_score, self.mode, self.min_delta):
            self.best_score = current
            self.wait_count = 0
            return False, None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"{name} did not improve by more than {self.min_delta} in the last {self.wait_count} "
                          f"checks; best {self.best_score:.6g}.")
        return False, None
