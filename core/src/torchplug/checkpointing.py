"""Checkpoints of a running fit: ``last.ckpt`` at each resume point, on interrupt, and
``trainer.save_checkpoint``. Every process first runs ``save_sharded_state`` (a strategy that
keeps its state sharded writes its shards there) and ``collect_state`` (a sharded optimizer or
model gathers there); rank 0 then builds the dict (``get_state_dicts``, unless the state was
saved sharded → ``on_save_checkpoint``) and writes it atomically (:mod:`torchplug.checkpoint`).

Every checkpoint is captured at one defined point, the run state's resume position (epoch,
stage, batch in epoch, global step: :mod:`torchplug.state`), with the RNG states that point
starts from: the current ones, or those where the accumulation window or validation now
running started (``RunState.resume_rng``), which a resume then replays whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchplug import __version__
from torchplug import checkpoint as ckpt
from torchplug.sharded import state_dict_shapes
from torchplug.shards import refuse_before_save
from torchplug.state import training_state

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from torchplug.data import EpochBatches
    from torchplug.hookcalls import Hooks
    from torchplug.losscheck import LossCheck
    from torchplug.outputs import RunOutputs
    from torchplug.state import RunState, SchedulerConfig
    from torchplug.trainer import Trainer


class Checkpointing:
    """The checkpoint steps of :class:`torchplug.loop.FitLoop` (whose attributes they use)."""

    trainer: Trainer
    hooks: Hooks
    module: nn.Module
    optimizers: list[Optimizer]
    schedulers: list[SchedulerConfig]
    state: RunState
    outputs: RunOutputs
    batches: EpochBatches
    losses: LossCheck
    _saved_at: tuple[int, int, int, str] | None

    def resume_position(self) -> tuple[int, int, int, str]:
        """Where a checkpoint written now resumes: (epoch, batch in epoch, global step, stage)."""
        state = self.state
        return state.epoch, state.batch_in_epoch, state.global_step, state.stage

    def checkpoint(self) -> None:
        """``last.ckpt`` of the current position, unless it was just written."""
        self.losses.flush(self.state.global_step)  # never checkpoint weights a non-finite loss reached
        position = self.resume_position()
        if not self.trainer.enable_checkpointing or self._saved_at == position:
            return
        path = self.outputs.last_checkpoint_path
        self._write(path)  # every rank: rank 0 alone writes the file
        self._saved_at = position
        if path is not None:
            self.outputs.last_checkpoint = path
            self.trainer.checkpoint_path = str(path)  # also known when fit ends with an exception

    def checkpoint_on_interrupt(self) -> None:
        """Keep the last completed optimizer step: weights, optimizer state and data position
        (a partial accumulation window is dropped). After a requested stop the position is
        exact, RNG included, so resuming continues as if never stopped."""
        if not (self.trainer.enable_checkpointing and self.optimizers):
            return
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._saved_at = None
        self.checkpoint()

    def _write(self, path: Path | None) -> None:
        """Shards and gathers on every process, then the file on the one given ``path`` (rank 0)."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)  # the shards' folder goes next to the file
        sharded = self.hooks.save_sharded_state(trainer=self.trainer, model=self.module, optimizers=self.optimizers,
                                                checkpoint_path=None if path is None else str(path))
        self.hooks.collect_state(trainer=self.trainer)
        if path is not None:
            ckpt.save(self.checkpoint_dict(sharded), path)

    def final_state_dict(self) -> dict[str, Any] | None:
        """The trained weights a fit in worker processes hands back (rank 0's; ``None`` elsewhere),
        gathered on every process after ``on_fit_end`` (an EMA plugin may have swapped its weights in)."""
        self.hooks.collect_state(trainer=self.trainer)  # every rank
        if not self.trainer.is_global_zero:
            return None
        weights, _ = self.hooks.get_state_dicts(trainer=self.trainer, model=self.module, optimizers=self.optimizers)
        return weights

    def checkpoint_dict(self, sharded: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0's checkpoint, after ``collect_state`` ran on every process; ``sharded``: what
        ``save_sharded_state`` answered (the model and optimizer state is in its folder)."""
        if sharded is None:
            weights, optimizer_states = self.hooks.get_state_dicts(trainer=self.trainer, model=self.module,
                                                                   optimizers=self.optimizers)
        else:
            weights, optimizer_states = {}, []
        checkpoint: dict[str, Any] = {
            "torchplug_checkpoint": ckpt.FORMAT_VERSION,
            "torchplug_version": __version__,
            **self.state.to_checkpoint(),
            **training_state(weights, optimizer_states, self.schedulers),
            # the RNG states where the resume point starts (torchplug.state: the capture point)
            "rng_states": self.batches.rng_snapshot(self.state.resume_rng),
            "plugins": self.trainer.plugin_names,
            # provenance: compared with the resuming run's plan (torchplug.provenance)
            "plan": self.trainer.plan.to_dict(),
            "world_size": self.trainer.world_size,
        }
        if sharded is not None:
            checkpoint["sharded_state"] = sharded
            checkpoint["state_dict_shapes"] = state_dict_shapes(self.module)  # checked against a model before work
        self.hooks.on_save_checkpoint(trainer=self.trainer, checkpoint=checkpoint)
        refuse_before_save(checkpoint, self.trainer.plan.role("strategy").winner)  # rank 0's shard is not a state
        return checkpoint

    def save_checkpoint(self, path: Path | None) -> None:
        """``trainer.save_checkpoint``: shards and gathers on every process, the file on rank 0 (``path`` given)."""
        self._write(path)


__all__ = ["Checkpointing"]
