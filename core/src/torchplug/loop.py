"""The fit loop: epochs of accumulation windows, each window its micro-batches, then one step.

``FitLoop.train`` is the loop, in execution order; every hook is called on the line where its
step happens. An epoch is a sequence of accumulation windows (:mod:`torchplug.data`)::

    on_train_epoch_start
    per window, per micro-batch:
        on_before_forward → [block_backward_sync, entered unless last of the window]
            → forward_context → training_step → backward(loss / window length, sync_gradients)
        at the window's last micro-batch, the optimizer step:
            per optimizer: unscale_gradients → on_before_optimizer_step
                → clip_gradients (gradient_clip_val > 0)
            → optimizer_step (may be skipped) → zero_grad(set_to_none=True)
            → LR schedulers (interval "step"; not after a skipped step)
        → on_train_batch_end
    on_train_epoch_end → validation (on_validation_end) → LR schedulers (interval "epoch")
        → last.ckpt (collect_state on every rank → get_state_dicts → on_save_checkpoint)

Counters live in the run's :class:`torchplug.state.RunState`. A stop requested by SIGTERM or
Ctrl-C (:mod:`torchplug.signals`) takes effect at the end of the current optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from torchplug import __version__
from torchplug import checkpoint as ckpt
from torchplug.data import EpochBatches, Window
from torchplug.errors import MisconfigurationError
from torchplug.losscheck import LossCheck
from torchplug.metrics import to_floats
from torchplug.module import MetricStore
from torchplug.outputs import RunOutputs
from torchplug.prepare import Prepared, StepModule
from torchplug.signals import StopRequest
from torchplug.state import Position, RunState, training_state
from torchplug.utils import warn_at_caller

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


class FitLoop:
    """Trains, validates and checkpoints one process's prepared parts."""

    def __init__(self, trainer: Trainer, parts: Prepared, state: RunState, outputs: RunOutputs,
                 stop: StopRequest, position: Position, metrics: MetricStore) -> None:
        self.trainer = trainer
        self.hooks = trainer.hooks
        self.module = parts.module  # the user's module
        self.model = parts.model  # what configure_ddp returned
        self.device = parts.device
        self.optimizers = parts.optimizers
        self.schedulers = parts.schedulers
        self.val_loader = parts.val_loader
        self.state = state
        self.outputs = outputs
        self.stop = stop
        self.position = position
        self.metrics = metrics
        self.batches = EpochBatches(parts.train_loader, trainer.limit_train_batches, state, position)
        self.losses = LossCheck(trainer.on_nonfinite_loss, parts.device)
        self._saved_at: tuple[int, int, int] | None = None
        #: rank 0's trained weights (``get_state_dicts``), for a fit in worker processes
        self.final_weights: dict[str, Any] | None = None
        self._training_step: Callable[..., Any] = cast(StepModule, self.module).training_step

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        trainer, hooks, state, model = self.trainer, self.hooks, self.state, self.model
        accumulate = trainer.accumulate_grad_batches
        # A wrapper from configure_ddp runs training_step itself (inside DDP's forward).
        self._training_step = cast(StepModule, self.module).training_step if model is self.module else model
        hooks.on_fit_start(trainer=trainer, model=self.module)
        while not self.finished():
            epoch = state.epoch
            hooks.on_train_epoch_start(trainer=trainer, epoch=epoch)
            self.outputs.progress.start_epoch(epoch, self.batches.length(), initial=state.batch_in_epoch)
            model.train()
            self.position.phase = "train"
            window: Window | None = None
            for window in self.batches.windows(epoch, accumulate):
                for batch_idx, batch, is_last in window:
                    args = hooks.on_before_forward(model=model, args=(batch, batch_idx))
                    with nullcontext() if is_last else hooks.block_backward_sync(model=model):
                        output = self._forward_backward(args, batch_idx, epoch, window, is_last)
                    if is_last:
                        self._optimizer_step(window, batch_idx)
                    hooks.on_train_batch_end(trainer=trainer, outputs=output, batch=args[0], batch_idx=batch_idx)
                    self.outputs.progress.update()
                if window.open:
                    break  # the loader ran dry inside this window
                if self.max_steps_reached():
                    if self._epoch_trained():
                        self._end_epoch(epoch)  # the epoch still ends if its last batch was trained
                    self._finish()
                    return
                self.stop.check()
            if (window is not None and window.open) or not self._epoch_trained():
                self._drop_open_window(epoch)
            self._end_epoch(epoch)
        self._finish()

    def _forward_backward(self, args: tuple[Any, ...], batch_idx: int, epoch: int, window: Window,
                          is_last: bool) -> Any:
        """One micro-batch: ``forward_context`` → ``training_step`` → the loss check → ``backward``;
        returns what ``training_step`` returned."""
        hooks, model = self.hooks, self.model
        with hooks.forward_context(model=model):
            output = self._training_step(*args)
        loss = _loss_of(output, batch_idx, epoch)
        if self.losses.admits(loss, epoch, batch_idx, self.state.global_step):
            hooks.backward(loss=loss / window.length if window.length > 1 else loss, optimizers=self.optimizers,
                           model=model, sync_gradients=is_last)
            window.backwards += 1
        return output

    def _optimizer_step(self, window: Window, batch_idx: int) -> None:
        """The window's optimizer step: unscale → ``on_before_optimizer_step`` → clip → step →
        ``zero_grad`` → step-interval schedulers. A window without any backward takes no step."""
        trainer, hooks, state = self.trainer, self.hooks, self.state
        stepped = False
        if window.backwards:
            clip, norm_type = trainer.gradient_clip_val, trainer.gradient_clip_norm_type
            for optimizer in self.optimizers:
                hooks.unscale_gradients(optimizer=optimizer)
                hooks.on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
                if clip > 0:
                    hooks.clip_gradients(grad_clip_val=clip, optimizer=optimizer, norm_type=norm_type)
            stepped = hooks.optimizer_step(optimizers=self.optimizers)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
        if stepped:
            for sched in self.schedulers:
                if sched.interval == "step":
                    sched.scheduler.step()
        else:
            state.skipped_steps += 1
        state.global_step += 1
        state.batch_in_epoch = batch_idx + 1
        if state.global_step % trainer.log_every_n_steps == 0:
            self.log_train()

    def _end_epoch(self, epoch: int) -> None:
        trainer, state = self.trainer, self.state
        self.position.phase = None
        self.hooks.on_train_epoch_end(trainer=trainer, epoch=epoch)
        self.log_train()
        if self.val_loader is not None and trainer.limit_val_batches != 0 \
                and (epoch + 1) % trainer.check_val_every_n_epoch == 0:
            self.validate()
        for sched in self.schedulers:
            if sched.interval != "epoch":
                continue
            if sched.monitor is None:
                sched.scheduler.step()
                continue
            if sched.monitor not in state.callback_metrics:
                raise MisconfigurationError(
                    f"The LR scheduler {type(sched.scheduler).__name__} monitors {sched.monitor!r}, which no "
                    f"step logged (self.log); logged so far: {sorted(state.callback_metrics)}."
                )
            sched.scheduler.step(state.callback_metrics[sched.monitor])
        state.epoch = epoch + 1
        state.batch_in_epoch = 0
        state.epoch_rng = None
        self.checkpoint()

    def _finish(self) -> None:
        self.position.phase = None
        self.log_train()
        self.outputs.progress.close()
        self.checkpoint()
        if self.trainer.launched_copy:  # the weights go back to the process that called fit
            if self._saved_at != (self.state.epoch, self.state.batch_in_epoch, self.state.global_step):
                self.hooks.collect_state(trainer=self.trainer)  # every rank; checkpoint() did not
            if self.trainer.is_global_zero:
                self.final_weights, _ = self.hooks.get_state_dicts(trainer=self.trainer, model=self.module,
                                                                   optimizers=self.optimizers)
        self.hooks.on_fit_end(trainer=self.trainer, model=self.module)

    def finished(self) -> bool:
        max_epochs = self.trainer.max_epochs
        return (max_epochs is not None and self.state.epoch >= max_epochs) or self.max_steps_reached()

    def max_steps_reached(self) -> bool:
        return 0 < self.trainer.max_steps <= self.state.global_step

    def _epoch_trained(self) -> bool:
        """Whether the epoch's last batch was trained (always unknown, so false, without ``len``)."""
        n = self.batches.length()
        return n is not None and self.state.batch_in_epoch >= n

    def _drop_open_window(self, epoch: int) -> None:
        """The loader ended earlier than its ``len`` promised: the open window's gradients are
        discarded rather than leaked into the next epoch."""
        if self.batches.length() is None:
            return
        warn_at_caller(
            f"The training loader of epoch {epoch} ended after {self.state.batch_in_epoch} of the "
            f"{self.batches.length()} batches its len() announced; the incomplete accumulation window was discarded.",
            RuntimeWarning,
        )
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    # -- validation and metrics --------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        trainer, hooks, module = self.trainer, self.hooks, self.module
        step_module = cast(StepModule, module)
        was_training = module.training
        module.eval()
        self.metrics.begin_validation()
        limit = trainer.limit_val_batches
        phase = self.position.phase
        self.position.phase, self.position.batch = "validation", 0
        try:
            with torch.no_grad():
                for batch_idx, batch in enumerate(self.val_loader):
                    if limit is not None and batch_idx >= limit:
                        break
                    self.position.batch = batch_idx
                    args = hooks.on_before_forward(model=module, args=(batch, batch_idx))
                    with hooks.forward_context(model=module):
                        step_module.validation_step(*args)
                    self.stop.check()
        finally:
            values = self.metrics.end_validation()
            module.train(was_training)
        self.position.phase = phase
        reduced = {name: hooks.reduce(tensor=torch.as_tensor(value, dtype=torch.float32, device=self.device),
                                      op="mean")
                   for name, value in values.items()}
        result = to_floats(reduced)
        self.state.callback_metrics.update(result)
        self.outputs.log(self.state.global_step, self.state.epoch, result)
        self.outputs.progress.show(self.state.callback_metrics)
        hooks.on_validation_end(trainer=trainer, metrics=result)
        return result

    def log_train(self) -> None:
        """Write the metrics logged since the last call: one host transfer for all of them."""
        state = self.state
        self.losses.flush(state.global_step)
        if state.skipped_steps:
            state.callback_metrics["skipped_steps"] = float(state.skipped_steps)
        if not self.metrics.train:
            return
        values = to_floats(self.metrics.train)
        self.metrics.train.clear()
        state.callback_metrics.update(values)
        self.outputs.log(state.global_step, state.epoch, values)
        self.outputs.progress.show(state.callback_metrics)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """``last.ckpt`` of the current position, unless it was just written."""
        self.losses.flush(self.state.global_step)  # never checkpoint weights a non-finite loss reached
        state = self.state
        position = (state.epoch, state.batch_in_epoch, state.global_step)
        if not self.trainer.enable_checkpointing or self._saved_at == position:
            return
        self.hooks.collect_state(trainer=self.trainer)  # every rank: rank 0 alone writes
        self._saved_at = position
        path = self.outputs.last_checkpoint_path
        if path is not None:
            ckpt.save(self.checkpoint_dict(), path)
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

    def checkpoint_dict(self) -> dict[str, Any]:
        """Rank 0's checkpoint, after ``collect_state`` ran on every process."""
        weights, optimizer_states = self.hooks.get_state_dicts(trainer=self.trainer, model=self.module,
                                                               optimizers=self.optimizers)
        checkpoint: dict[str, Any] = {
            "torchplug_checkpoint": ckpt.FORMAT_VERSION,
            "torchplug_version": __version__,
            **self.state.to_checkpoint(),
            **training_state(weights, optimizer_states, self.schedulers),
            "rng_states": self.batches.rng_snapshot(),
            "plugins": self.trainer.plugin_names,
        }
        self.hooks.on_save_checkpoint(trainer=self.trainer, checkpoint=checkpoint)
        return checkpoint

    def save_checkpoint(self, path: Path | None) -> None:
        """``trainer.save_checkpoint``: gather on every process, write on rank 0 (``path`` given)."""
        self.hooks.collect_state(trainer=self.trainer)
        if path is not None:
            ckpt.save(self.checkpoint_dict(), path)

    def release_wrapper(self) -> bool:
        """Forget ``configure_ddp``'s wrapper; True if there was one."""
        if self.model is self.module:
            return False
        self.model = self.module
        return True


def _loss_of(output: Any, batch_idx: int, epoch: int) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        if isinstance(loss, torch.Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        elif isinstance(output, dict):
            got = f"a dict without 'loss' (keys {sorted(map(str, output))})"
        else:
            got = type(loss).__name__
        raise MisconfigurationError(
            f"training_step must return a scalar loss tensor or a dict with 'loss'; got {got} "
            f"at epoch {epoch}, batch {batch_idx}."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            f"The loss returned by training_step at epoch {epoch}, batch {batch_idx} does not require grad "
            "(computed under torch.no_grad(), or detached?)."
        )
    return loss


__all__ = ["FitLoop"]
