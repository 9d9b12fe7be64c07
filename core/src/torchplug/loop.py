"""The fit loop: epochs of accumulation windows, each window its micro-batches, then one step.

``FitLoop.train`` is the loop, in execution order; every hook is called on the line where its
step happens. An epoch is a sequence of accumulation windows (:mod:`torchplug.data`)::

    on_fit_start → [num_sanity_val_steps > 0: the validation hooks over that many batches, but
        on_validation_end; metrics discarded, RNG restored] → on_train_start
    per epoch: on_epoch_start → on_train_epoch_start (accumulation: the schedule's entry for the epoch)
    per window, per micro-batch:
        on_train_batch_start (-1: skip the rest of the epoch, dropping an open window)
            → on_before_forward → [block_backward_sync, entered unless last of the window]
            → forward_context → training_step → on_before_backward
            → backward(loss / window length, sync_gradients) → on_after_backward
        at the window's last micro-batch, the optimizer step:
            per optimizer: unscale_gradients → on_before_optimizer_step
                → clip_gradients (gradient_clip_val > 0)
            → optimizer_step (may be skipped) → per optimizer: on_before_zero_grad → zero_grad(set_to_none=True)
            → LR schedulers (interval "step"; not after a skipped step)
            → [on_log_metrics every log_every_n_steps]
        → on_train_batch_end
        → [val_check_interval reached after the window's step: the validation below, mid-epoch]
        → trainer.should_stop? (ends the fit like max_steps)
    training_epoch_end(outputs) → on_train_epoch_end → on_epoch_end → on_log_metrics
    → validation: on_validation_start → on_validation_epoch_start
        → per batch: on_validation_batch_start → on_before_forward → forward_context → validation_step
          → on_validation_batch_end
        → validation_epoch_end(outputs) → on_validation_epoch_end → reduce → on_validation_end → on_log_metrics
    → LR schedulers (interval "epoch") → [should_stop reduced across ranks]
    → last.ckpt (every rank: save_sharded_state → collect_state; rank 0: get_state_dicts unless
      the state was saved sharded → on_save_checkpoint)
    after the last epoch: on_train_end → on_fit_end
        → [a launched copy: collect_state → get_state_dicts, the weights handed back]

The user's module implements these hooks like any plugin and runs after the plugins
(:mod:`torchplug.modulehooks`).

``on_log_metrics`` (global rank 0) gets each metrics row when it is written, with what plugins
logged (``trainer.log``) in the event hook just before it. Counters live in the run's
:class:`torchplug.state.RunState`. A stop requested by SIGTERM or Ctrl-C
(:mod:`torchplug.signals`) takes effect at the end of the current optimizer step, as does
``trainer.should_stop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from torchplug.batchlimits import ValidationSchedule, resolve_limit
from torchplug.checkpointing import Checkpointing
from torchplug.data import EpochBatches, Window
from torchplug.defaults import NO_CONTEXT
from torchplug.evaluation import VALIDATION, per_loader, reduced, run_epoch
from torchplug.lightning_args import accumulation
from torchplug.lightning_plugins import entering_yielded
from torchplug.losscheck import LossCheck, loss_of
from torchplug.metrics import TrainLogging
from torchplug.module import MetricStore
from torchplug.modulehooks import epoch_output
from torchplug.optimization import (
    StepOptimizer,
    call_optimizer_step,
    call_optimizer_zero_grad,
    overrides,
    takes_optimizer_idx,
    toggled,
)
from torchplug.outputs import RunOutputs
from torchplug.prepare import Prepared, StepModule
from torchplug.signals import StopRequest
from torchplug.state import STAGES, TRAIN, Position, RunState
from torchplug.utils import warn_at_caller

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


class FitLoop(Checkpointing, ValidationSchedule, TrainLogging):
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
        self.batches = EpochBatches(parts.train_loader, resolve_limit(
            "limit_train_batches", trainer.limit_train_batches, parts.train_loader), state, position)
        self.schedule_validation(parts.train_loader)
        self.losses = LossCheck(trainer.on_nonfinite_loss, parts.device)
        self._saved_at: tuple[int, int, int, str] | None = None
        #: what this epoch's training steps returned, while someone implements training_epoch_end
        self.epoch_outputs: list[Any] | None = None
        #: rank 0's trained weights (``get_state_dicts``), for a fit in worker processes
        self.final_weights: dict[str, Any] | None = None
        self._training_step: Callable[..., Any] = cast(StepModule, self.module).training_step
        module = self.module
        self.manual = not getattr(module, "automatic_optimization", True)
        self.per_optimizer = not self.manual and len(self.optimizers) > 1 \
            and takes_optimizer_idx(cast(StepModule, module).training_step)
        self.custom_step = overrides(module, "optimizer_step")
        self.custom_zero_grad = overrides(module, "optimizer_zero_grad")
        metrics.reduce = lambda tensor, op: self.hooks.reduce(tensor=tensor.to(self.device), op=op)
        #: what self.optimizers() gives a manually optimizing module
        self.step_optimizers = [StepOptimizer(opt, trainer, self.hooks) for opt in self.optimizers]
        module.__dict__["_torchplug_loop"] = self  # self.optimizers(), self.manual_backward(); run.py detaches it

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        trainer, hooks, state, model = self.trainer, self.hooks, self.state, self.model
        # A wrapper from configure_ddp runs training_step itself (inside DDP's forward).
        self._training_step = cast(StepModule, self.module).training_step if model is self.module else model
        hooks.on_fit_start(trainer=trainer, model=self.module)
        self.sanity_check()
        hooks.on_train_start(trainer=trainer)
        while not self.finished():
            epoch = state.epoch
            # accumulate_grad_batches={epoch: n}: the schedule's n, in trainer.accumulate_grad_batches as in Lightning
            accumulate = trainer.accumulate_grad_batches = accumulation(trainer.accumulation_schedule, epoch)
            self.epoch_outputs = None
            if state.stage != TRAIN:  # resumed from a checkpoint written during this epoch's end
                self._end_epoch(epoch)
                continue
            if "training_epoch_end" in hooks.implemented:
                self.epoch_outputs = [[] for _ in self.optimizers] if self.per_optimizer else []
            hooks.on_epoch_start(trainer=trainer)
            hooks.on_train_epoch_start(trainer=trainer, epoch=epoch)
            self.outputs.progress.start_epoch(epoch, self.batches.length(), initial=state.batch_in_epoch)
            model.train()
            self.position.phase = "train"
            window: Window | None = None
            skipped = False
            # The RNG states at each window's start (tens of us, once per window) where a checkpoint can fall
            # inside a window: with accumulation, and with several processes, where a signal interrupts at once.
            for window in self.batches.windows(epoch, accumulate, capture=accumulate > 1 or trainer.world_size > 1):
                for batch_idx, batch, is_last in window:
                    starts = hooks.on_train_batch_start(trainer=trainer, batch=batch, batch_idx=batch_idx)
                    if starts and any(type(r) is int and r == -1 for r in starts):
                        skipped = True  # Lightning 1.x: -1 skips the rest of the epoch
                        break
                    args = hooks.on_before_forward(model=model, args=(batch, batch_idx))
                    with NO_CONTEXT if is_last else entering_yielded(hooks.block_backward_sync(model=model)):
                        output = self._run_batch(args, batch_idx, epoch, window, is_last)
                    hooks.on_train_batch_end(trainer=trainer, outputs=output, batch=args[0], batch_idx=batch_idx)
                    self.outputs.progress.update()
                if skipped or window.open:
                    break  # on_train_batch_start returned -1, or the loader ran dry inside this window
                if self.val_every is not None and self.mid_epoch_validation_due(epoch, window):
                    self.validate()  # val_check_interval: after the window's step, at "after this batch"
                if self.max_steps_reached() or state.should_stop:  # should_stop: a plain bool, no host read
                    if self._epoch_trained():
                        self._end_epoch(epoch)  # the epoch still ends if its last batch was trained
                    self._finish()
                    return
                self.stop.check()
            if skipped:
                for optimizer in self.optimizers:  # the interrupted window's gradients
                    optimizer.zero_grad(set_to_none=True)
            elif (window is not None and window.open) or not self._epoch_trained():
                self._drop_open_window(epoch)
            self._end_epoch(epoch)
        self._finish()

    def _run_batch(self, args: tuple[Any, ...], batch_idx: int, epoch: int, window: Window, is_last: bool) -> Any:
        """One micro-batch, and the optimizer step at the window's end: returns what
        ``training_step`` returned (a list of one result per optimizer with ``optimizer_idx``)."""
        if self.manual:
            with self.hooks.forward_context(model=self.model):
                output = self._training_step(*args)
            if self.epoch_outputs is not None and isinstance(output, (torch.Tensor, dict)):
                self.epoch_outputs.append(epoch_output(output))
            stepped = all(r for opt in self.step_optimizers for r in opt.results)
            for opt in self.step_optimizers:
                opt.results.clear()
            self._end_step(batch_idx, stepped)
            return output
        if not self.per_optimizer:
            output = self._forward_backward(args, batch_idx, epoch, window, is_last, self.optimizers, None)
            stepped = self._step_optimizers(window, batch_idx, None) if is_last else False
            if is_last:
                self._end_step(batch_idx, stepped)
            return output
        # Lightning 1.x: training_step(batch, batch_idx, optimizer_idx) once per optimizer, only its
        # parameters requiring grad, and that optimizer steps on that loss before the next one runs.
        outputs, stepped = [], False
        for index, optimizer in enumerate(self.optimizers):
            with toggled(self.optimizers, index):
                outputs.append(self._forward_backward((*args, index), batch_idx, epoch, window, is_last,
                                                      [optimizer], index))
                if is_last:
                    stepped = self._step_optimizers(window, batch_idx, index) or stepped
        if is_last:
            self._end_step(batch_idx, stepped)
        return outputs

    def _forward_backward(self, args: tuple[Any, ...], batch_idx: int, epoch: int, window: Window,
                          is_last: bool, optimizers: list[torch.optim.Optimizer], index: int | None) -> Any:
        """``forward_context`` → ``training_step`` → the loss check → ``on_before_backward`` →
        ``backward`` → ``on_after_backward``; returns what ``training_step`` returned."""
        hooks, model = self.hooks, self.model
        with hooks.forward_context(model=model):
            output = self._training_step(*args)
        loss = loss_of(output, batch_idx, epoch)
        if self.epoch_outputs is not None:
            (self.epoch_outputs if index is None else self.epoch_outputs[index]).append(epoch_output(output))
        if self.losses.admits(loss, epoch, batch_idx, self.state.global_step):
            loss = loss / window.length if window.length > 1 else loss
            hooks.on_before_backward(trainer=self.trainer, loss=loss)
            hooks.backward(loss=loss, optimizers=optimizers, model=model, sync_gradients=is_last)
            hooks.on_after_backward(trainer=self.trainer)
            window.backwards += 1
        return output

    def _step_optimizers(self, window: Window, batch_idx: int, index: int | None) -> bool:
        """The window's step of all optimizers (``index`` None) or of one: unscale →
        ``on_before_optimizer_step`` → clip → step (the hook, or the module's ``optimizer_step``)
        → ``on_before_zero_grad`` → zero_grad. A window without any backward takes no step."""
        if not window.backwards:
            return False
        trainer, hooks = self.trainer, self.hooks
        chosen = self.optimizers if index is None else [self.optimizers[index]]
        clip, norm_type = trainer.gradient_clip_val, trainer.gradient_clip_norm_type
        for optimizer in chosen:
            hooks.unscale_gradients(optimizer=optimizer)
            hooks.on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
            if clip > 0:
                hooks.clip_gradients(grad_clip_val=clip, optimizer=optimizer, norm_type=norm_type)
        indices = range(len(self.optimizers)) if index is None else [index]
        if self.custom_step:
            results: list[bool] = []
            for i in indices:
                wrapped = StepOptimizer(self.optimizers[i], trainer, hooks, prepared=True)
                call_optimizer_step(self.module, self.state.epoch, batch_idx, wrapped, i, None,
                                    trainer.precision != "32")
                results += wrapped.results
            stepped = all(results)
        else:
            stepped = hooks.optimizer_step(optimizers=chosen)
        for i in indices:
            optimizer = self.optimizers[i]
            hooks.on_before_zero_grad(trainer=trainer, optimizer=optimizer)
            if self.custom_zero_grad:
                call_optimizer_zero_grad(self.module, self.state.epoch, batch_idx, optimizer, i)
            else:
                optimizer.zero_grad(set_to_none=True)
        return stepped

    def _end_step(self, batch_idx: int, stepped: bool) -> None:
        """After the window's step: step-interval schedulers (not after a skipped step), counters, logging."""
        trainer, state = self.trainer, self.state
        if not stepped:
            state.skipped_steps += 1
        elif not self.manual:  # manual optimization steps its schedulers itself (self.lr_schedulers())
            for sched in self.schedulers:
                if sched.interval == "step":
                    sched.scheduler.step()
        state.global_step += 1
        state.batch_in_epoch = batch_idx + 1
        state.resume_rng = None  # the window is complete: a checkpoint now resumes from the current RNG
        if state.global_step % trainer.log_every_n_steps == 0:
            self.log_train()

    def _enter(self, stage: str, advance: bool = True) -> bool:
        """Whether the epoch end's ``stage`` is still to run (a resumed run skips those its
        checkpoint counted as done); if so, the run state moves past it before its hooks run, so a
        checkpoint written from them resumes after it (:mod:`torchplug.state`, the capture point)."""
        index = STAGES.index(stage)
        if STAGES.index(self.state.stage) > index:
            return False
        if advance:
            self.state.stage = STAGES[index + 1]
        return True

    def _end_epoch(self, epoch: int) -> None:
        trainer, state = self.trainer, self.state
        self.position.phase = None
        # The epoch's values (means of on_epoch metrics, last step values) are in callback_metrics for
        # the epoch-end hooks (early stopping on a training metric), and written after them with what
        # plugins and the module logged there: one row for the event.
        self.metrics.end_train_epoch()
        pending = self.take_logged()
        self.metrics.epoch_end = True  # a self.log in these hooks logs an epoch value
        try:
            if self._enter("training_epoch_end") and self.epoch_outputs is not None:
                outputs, self.epoch_outputs = self.epoch_outputs, None
                self.hooks.training_epoch_end(trainer=trainer, outputs=outputs)
            if self._enter("on_train_epoch_end"):
                self.hooks.on_train_epoch_end(trainer=trainer, epoch=epoch)
            if self._enter("on_epoch_end"):
                self.hooks.on_epoch_end(trainer=trainer)
        finally:
            self.metrics.epoch_end = False
        self.metrics.end_train_epoch()
        self.log_train(pending)
        if self._enter("validation", advance=False):  # validate() moves on just before on_validation_end
            if self.validates_after(epoch):
                self.validate()
            state.stage = "epoch_close"
        for sched in self.schedulers:
            if sched.interval == "epoch" and not self.manual:  # manual optimization steps its own
                sched.step_epoch(state.callback_metrics)
        if trainer.world_size > 1:  # once per epoch: a rank that asked to stop stops them all, at the same step
            state.should_stop = trainer.reduce_boolean_decision(state.should_stop)
        state.epoch = epoch + 1
        state.batch_in_epoch = 0
        state.epoch_rng = None
        state.stage = TRAIN
        self.checkpoint()

    def _finish(self) -> None:
        self.position.phase = None
        self.log_train()
        self.outputs.progress.close()
        self.checkpoint()
        self.hooks.on_train_end(trainer=self.trainer)
        self.hooks.on_fit_end(trainer=self.trainer, model=self.module)
        if self.trainer.launched_copy:
            # The weights go back to the process that called fit, gathered after on_fit_end: what it
            # changed on every rank (an EMA swapped in) is what comes back, as in a one-process fit.
            self.final_weights = self.final_state_dict()

    def finished(self) -> bool:
        max_epochs = self.trainer.max_epochs
        return (max_epochs is not None and self.state.epoch >= max_epochs) or self.max_steps_reached() \
            or self.state.should_stop

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
    def validate(self, sanity: bool = False) -> dict[str, float]:
        trainer, hooks = self.trainer, self.hooks
        keep = VALIDATION.epoch_end in hooks.implemented  # outputs are collected only for someone
        limit = self.sanity_limit() if sanity else self.val_limit
        in_fit = self.state.stage == "validation"
        if in_fit:  # a checkpoint written during the validation resumes at its start, from these RNG states
            self.state.resume_rng = self.batches.rng_capture()
        epoch = run_epoch(trainer, self.module, [self.val_loader], VALIDATION, limit, self.position, self.metrics,
                          keep, between_batches=self.stop.check)
        if sanity:  # the sanity check's metrics are discarded
            return {}
        result = reduced(trainer, self.device, per_loader(epoch)[0])
        self.state.callback_metrics.update(result)
        if in_fit:  # validated: a checkpoint from on_validation_end resumes after it
            self.state.stage, self.state.resume_rng = "epoch_close", None
        hooks.on_validation_end(trainer=trainer, metrics=result)
        self.log_train(result)  # with what plugins logged in on_validation_end: one row for the event
        return result

    def release_wrapper(self) -> bool:
        """Forget ``configure_ddp``'s wrapper; True if there was one."""
        if self.model is self.module:
            return False
        self.model = self.module
        self._training_step = cast(StepModule, self.module).training_step  # it called the wrapper
        return True


__all__ = ["FitLoop"]
