"""Batch counts that depend on the loaders: fractional ``limit_*_batches`` and ``val_check_interval``,
resolved (as in Lightning) against ``len(loader)``; checked in ``Trainer.fit`` before any work and
resolved again by the loop on each process's (possibly sharded) loaders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchplug.errors import MisconfigurationError

if TYPE_CHECKING:
    from torchplug.data import EpochBatches, Window
    from torchplug.state import RunState
    from torchplug.trainer import Trainer


def loader_length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def resolve_limit(name: str, limit: int | float | None, loader: Any) -> int | None:
    """A batch count (``None``: every batch): a fraction of the loader's length, at least 1 batch
    unless the fraction is 0.0; 1.0 is every batch, also for a loader without ``len``."""
    if not isinstance(limit, float):
        return limit
    if limit == 1.0 or loader is None:
        return None
    n = loader_length(loader)
    if n is None:
        raise MisconfigurationError(
            f"{name}={limit} is a fraction of the loader's batches, but the {type(loader).__name__} has no len() "
            f"(an IterableDataset?); pass an int number of batches instead."
        )
    return 0 if limit == 0.0 else max(1, int(n * limit))


def val_check_batches(interval: int | float, train_loader: Any, limit: int | None) -> int | None:
    """Training batches between mid-epoch validations, or ``None``: validation at the epoch's end only."""
    n = loader_length(train_loader)
    if n is not None and limit is not None:
        n = min(n, limit)
    if isinstance(interval, float):
        if interval == 1.0:
            return None
        if n is None:
            raise MisconfigurationError(
                f"val_check_interval={interval} is a fraction of the training epoch, but the training "
                f"{type(train_loader).__name__} has no len(); pass an int number of training batches instead."
            )
        return max(1, int(n * interval))
    if n is not None and interval > n:
        raise MisconfigurationError(
            f"val_check_interval={interval} training batches is more than the epoch's {n} batches; pass at most "
            f"{n}, or a float fraction of the epoch."
        )
    return interval


def check_loaders(trainer: Trainer, train_loader: Any, val_loader: Any) -> None:
    """What :func:`resolve_limit` and :func:`val_check_batches` would refuse, before any work."""
    limit = resolve_limit("limit_train_batches", trainer.limit_train_batches, train_loader)
    if val_loader is not None:
        resolve_limit("limit_val_batches", trainer.limit_val_batches, val_loader)
        val_check_batches(trainer.val_check_interval, train_loader, limit)


class ValidationSchedule:
    """When :class:`torchplug.loop.FitLoop` validates (whose attributes it uses): after the epochs
    ``check_val_every_n_epoch`` names, every ``val_check_interval`` training batches inside them, and
    ``num_sanity_val_steps`` batches before training."""

    trainer: Trainer
    val_loader: Any
    batches: EpochBatches
    state: RunState

    def validate(self, sanity: bool = False) -> dict[str, float]:
        raise NotImplementedError  # FitLoop's

    def schedule_validation(self, train_loader: Any) -> None:
        trainer = self.trainer
        #: ``trainer.sanity_checking``
        self.sanity_checking = False
        #: validation batches (None: all, 0: validation off)
        self.val_limit = resolve_limit("limit_val_batches", trainer.limit_val_batches, self.val_loader)
        #: training batches between mid-epoch validations; None: at the epoch's end only
        self.val_every = None if self.val_loader is None or train_loader is None else \
            val_check_batches(trainer.val_check_interval, train_loader, self.batches.length())

    def validates_after(self, epoch: int) -> bool:
        return self.val_loader is not None and self.val_limit != 0 \
            and (epoch + 1) % self.trainer.check_val_every_n_epoch == 0

    def mid_epoch_validation_due(self, epoch: int, window: Window) -> bool:
        """Whether the window just stepped reached a multiple of ``val_every`` batches: validation runs
        after an optimizer step (never inside a window), and not after the epoch's last batch, where
        the epoch's own validation follows."""
        every, end, n = self.val_every, self.state.batch_in_epoch, self.batches.length()
        if every is None or (n is not None and end >= n) or not self.validates_after(epoch):
            return False
        return end // every > (end - window.length) // every

    def sanity_limit(self) -> int | None:
        steps, limit = self.trainer.num_sanity_val_steps, self.val_limit
        return limit if steps < 0 else (steps if limit is None else min(limit, steps))

    def sanity_check(self) -> None:
        """``num_sanity_val_steps``: that many validation batches (-1: all) before training, through the
        validation hooks but ``on_validation_end``; metrics discarded, the RNG states restored after it
        (training draws the same numbers as without it)."""
        if self.trainer.num_sanity_val_steps and self.val_loader is not None and self.val_limit != 0:
            rng = self.batches.rng_snapshot()
            self.sanity_checking = True
            try:
                self.validate(sanity=True)
            finally:
                self.sanity_checking = False
            self.batches.rng_restore(rng)


__all__ = ["ValidationSchedule", "check_loaders", "resolve_limit", "val_check_batches"]
