"""What the callbacks share: reading a monitored metric, comparing scores, their checkpoint slot."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torchplug.errors import MisconfigurationError
from torchplug.plugin import Plugin

if TYPE_CHECKING:
    from torchplug.trainer import Trainer

#: Where callbacks keep their state in a checkpoint: ``checkpoint["callbacks"][state_key]``.
CHECKPOINT_KEY = "callbacks"
MODES = ("min", "max")


def check_mode(owner: str, mode: str) -> str:
    if mode not in MODES:
        raise MisconfigurationError(f"{owner}(mode={mode!r}): mode must be 'min' or 'max'.")
    return mode


def monitored(owner: str, monitor: str, trainer: Trainer, where: str) -> float:
    """The monitored metric's last value; a metric never logged is an error naming those that were."""
    metrics = trainer.callback_metrics
    if monitor not in metrics:
        logged = ", ".join(repr(k) for k in sorted(metrics)) or "none"
        raise MisconfigurationError(
            f"{owner} (torchplug.callbacks, distribution torchplug) monitors {monitor!r}, which was never logged "
            f"by {where} (epoch {trainer.current_epoch}, global step {trainer.global_step}). Logged metrics: "
            f"{logged}. Log it (self.log({monitor!r}, ...) in validation_step or training_step) or monitor one of "
            "those."
        )
    return float(metrics[monitor])


def improved(current: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``current`` beats ``best`` by more than ``min_delta`` (NaN never does)."""
    if math.isnan(current):
        return False
    if math.isnan(best):
        return True
    return current < best - min_delta if mode == "min" else current > best + min_delta


def state_key(cls_name: str, **attrs: Any) -> str:
    """Lightning's key: the class name and the arguments that tell two instances apart."""
    return f"{cls_name}{attrs!r}"


def state_of(checkpoint: dict[str, Any], key: str) -> dict[str, Any] | None:
    found = checkpoint.get(CHECKPOINT_KEY, {}).get(key)
    return found if isinstance(found, dict) else None


class StatefulCallback(Plugin):
    """A callback whose ``state_dict()`` travels in checkpoints under ``checkpoint["callbacks"]
    [state_key]`` and comes back with ``load_state_dict`` on resume."""

    @property
    def state_key(self) -> str:
        """Where in ``checkpoint["callbacks"]`` this callback's state goes (unique per configuration)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = self.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = state_of(checkpoint, self.state_key)
        if state is not None:
            self.load_state_dict(state)
