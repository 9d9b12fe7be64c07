"""The fit loop: one process's whole run, set up, trained, validated and checkpointed.

``FitRun.train`` is the loop, in execution order; every hook is called on the line where its
step happens. Per micro-batch::

    on_before_forward → [block_backward_sync, entered unless last of the window]
        → forward_context → training_step → backward(loss / window length)
    at the window's end, per optimizer: unscale_gradients → on_before_optimizer_step
        → clip_gradients (gradient_clip_val > 0)
    → optimizer_step (may be skipped) → zero_grad(set_to_none=True)
    → LR schedulers (interval "step"; not after a skipped step) → on_train_batch_end

Per epoch: ``on_train_epoch_start`` → the micro-batches → ``on_train_epoch_end`` →
validation (``on_validation_end``) → LR schedulers (interval "epoch") → checkpoint.

Counters follow Lightning: ``global_step`` counts optimizer steps (windows), including steps a
precision plugin skipped; ``current_epoch`` counts completed epochs.

Stopping: SIGTERM and Ctrl-C (single process, default handlers) ask the loop to stop at the
end of the current optimizer step; it then writes ``last.ckpt`` (when checkpointing is on)
and raises ``KeyboardInterrupt``. A second signal stops at once.
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from torchplug import __version__
from torchplug import checkpoint as ckpt
from torchplug.errors import CheckpointError, MisconfigurationError, NonFiniteLossError, TorchplugError
from torchplug.metrics import CSVLogger, ProgressBar, to_floats
from torchplug.module import MetricStore
from torchplug.wrappers import TrainingStepModule

if TYPE_CHECKING:
    from torchplug.trainer import FitOutcome, Trainer


class StepModule(Protocol):
    """What the loop calls on the user's module (``nn.Module.__getattr__`` hides it from mypy)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any: ...

    def validation_step(self, batch: Any, batch_idx: int) -> Any: ...

    def configure_optimizers(self) -> Any: ...


def check_module(model: Any, need_validation: bool = False) -> None:
    """Refuse a model the loop cannot train, naming what is missing."""
    if not isinstance(model, nn.Module):
        raise MisconfigurationError(
            f"Expected a torch.nn.Module (a torchplug.TrainingModule), got {type(model).__name__}"
        )
    needed = ["validation_step"] if need_validation else ["training_step", "configure_optimizers"]
    for name in needed:
        method = getattr(model, name, None)
        if not callable(method) or _is_base_stub(model, name):
            raise MisconfigurationError(
                f"{type(model).__name__} has no {name}(); define it (see torchplug.TrainingModule)."
            )


def _is_base_stub(model: nn.Module, name: str) -> bool:
    from torchplug.module import TrainingModule

    base = getattr(TrainingModule, name, None)
    return base is not None and getattr(type(model), name, None) is base


def resolve_loaders(model: nn.Module, train: Any, val: Any, need_train: bool = True) -> tuple[Any, Any]:
    """The train and validation loaders: given, or from the module's ``*_dataloader()``;
    refused before any work when missing, not iterable or empty."""
    if train is None and need_train:
        train = _call_optional(model, "train_dataloader")
        if train is None:
            raise MisconfigurationError(
                "No training data: pass fit(model, train_dataloaders=...) or define "
                f"{type(model).__name__}.train_dataloader()."
            )
    if val is None:
        val = _call_optional(model, "val_dataloader")
    for name, loader in (("train_dataloaders", train), ("val_dataloaders", val)):
        if loader is None:
            continue
        if not hasattr(loader, "__iter__") or isinstance(loader, (str, bytes, dict)):
            raise MisconfigurationError(f"{name} must be iterable (a DataLoader), got {type(loader).__name__}")
        try:
            empty = len(loader) == 0
        except TypeError:  # iterable without a length
            empty = False
        if empty:
            raise MisconfigurationError(f"{name} is empty (len 0): check the dataset and batch_size/drop_last.")
    if val is not None and not callable(getattr(model, "validation_step", None)):
        raise MisconfigurationError(
            f"Validation data was given but {type(model).__name__} has no validation_step(batch, batch_idx)."
        )
    return train, val


def _call_optional(model: nn.Module, name: str) -> Any:
    method = getattr(model, name, None)
    return method() if callable(method) else None


class FitRun:
    """Everything one process needs for one ``fit``: set up, then train."""

    def __init__(self, trainer: Trainer, module: nn.Module, train_loader: Any, val_loader: Any,
                 resume: dict[str, Any] | None) -> None:
        self.trainer = trainer
        self.hooks = trainer.hooks
        self.module = module  # the user's module
        self.model: nn.Module = module  # what configure_ddp returned
        self.device = torch.device("cpu")
        self._queued_losses: list[tuple[torch.Tensor, int, int, int]] = []
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.resume = resume
        self.metrics = MetricStore()
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[dict[str, Any]] = []
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of the current epoch already trained (resume point)
        self.epoch_rng: dict[str, Any] | None = None  # RNG at epoch start, to replay its shuffle
        self.skipped_steps = 0
        self.callback_metrics: dict[str, float] = {}
        self.csv: CSVLogger | None = None
        self.progress = ProgressBar(False)
        self.log_dir: Path | None = None
        self.last_checkpoint: Path | None = None  # the automatic last.ckpt, once written
        self._saved_at: tuple[int, int, int] | None = None
        self._created: list[Path] = []  # folders this run made, removed again if it fails empty
        #: set by the first SIGTERM/SIGINT; the loop stops at the end of the current step
        self.stop_signal: int | None = None
        self._stopping = False  # the run is ending: checkpoint on interrupt, on_exception, teardown
        self._ignored_signals = 0
        # Where the run is, for the note an exception gets: "train"/"validation" and the batch
        # being fetched or run (set by the batch generators, once per batch).
        self._phase: str | None = None
        self._batch = 0

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        trainer, hooks, module = self.trainer, self.hooks, self.module
        trainer.global_step = trainer.current_epoch = 0
        trainer.callback_metrics = self.callback_metrics
        hooks.setup_environment(trainer=trainer)
        trainer.world_size = hooks.world_size()
        trainer.global_rank = hooks.global_rank()
        if trainer.on_nonfinite_loss == "skip" and trainer.world_size > 1:
            raise MisconfigurationError(
                f"on_nonfinite_loss='skip' cannot run on {trainer.world_size} processes: a rank that skips a "
                "backward would desynchronise the gradient all-reduce. Use 'error' or 'ignore'."
            )
        device = hooks.root_device(trainer=trainer, model=module)
        self.device = device
        module.to(device)
        _attach_metrics(module, self.metrics)
        self.optimizers, self.schedulers = _configure_optimizers(module)
        trainer.optimizers = self.optimizers
        trainer.lr_schedulers = [s["scheduler"] for s in self.schedulers]
        hooks.on_after_setup_optimizers(trainer=trainer)
        module, optimizers = hooks.connect_precision(trainer=trainer, model=module, optimizers=self.optimizers)
        _rebind_schedulers(self.schedulers, self.optimizers, optimizers)
        self.module, self.optimizers = module, list(optimizers)
        trainer.optimizers = self.optimizers
        self.model = hooks.configure_ddp(
            model=module, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
        if self.model is not module:
            self.module = _unwrap(hooks.get_model_from_plugin(model=self.model), self.model, module)
        self.train_loader = _distributed_loader(self.train_loader, trainer, shuffle_default=True)
        self.val_loader = _distributed_loader(self.val_loader, trainer, shuffle_default=False)
        trainer.log_dir = trainer.checkpoint_path = None
        if trainer.is_global_zero and (trainer.logger or trainer.enable_checkpointing):
            self.log_dir = self._new_version_dir(trainer.default_root_dir / "torchplug_logs")
            trainer.log_dir = str(self.log_dir)
            if trainer.logger:
                self.csv = CSVLogger(self.log_dir)
        self.progress = ProgressBar(trainer.enable_progress_bar and trainer.is_global_zero)
        if self.resume is not None:
            self._restore(self.resume)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        trainer, hooks, module, model = self.trainer, self.hooks, self.module, self.model
        optimizers = self.optimizers
        accumulate, clip = trainer.accumulate_grad_batches, trainer.gradient_clip_val
        norm_type, max_steps = trainer.gradient_clip_norm_type, trainer.max_steps
        log_every = trainer.log_every_n_steps
        step_schedulers = [s["scheduler"] for s in self.schedulers if s["interval"] == "step"]
        # A wrapper from configure_ddp runs training_step itself (inside DDP's forward).
        training_step = cast(StepModule, module).training_step if model is module else model
        check_loss = trainer.on_nonfinite_loss != "ignore"
        # On an accelerator, reading the loss every micro-batch would stall the host on the device
        # each step; in "error" mode the checks are queued on the device and read at the logging
        # interval and before every checkpoint (self._check_queued_losses), naming the first bad step.
        queue_checks = check_loss and trainer.on_nonfinite_loss == "error" and self._defer_loss_checks()
        check_now = check_loss and not queue_checks
        no_sync = nullcontext()

        hooks.on_fit_start(trainer=trainer, model=module)
        while not self._finished():
            epoch = self.epoch
            n_batches = _num_batches(self.train_loader, trainer.limit_train_batches)
            hooks.on_train_epoch_start(trainer=trainer, epoch=epoch)
            self.progress.start_epoch(epoch, n_batches, initial=self.batch_in_epoch)
            model.train()
            self._phase = "train"
            pending = 0  # micro-batches of the open window that ran backward
            window_start = self.batch_in_epoch
            for batch_idx, batch, last in self._epoch_batches(epoch, n_batches):
                if batch_idx - window_start >= accumulate:
                    window_start = batch_idx
                window_len = accumulate if n_batches is None else min(accumulate, n_batches - window_start)
                window_end = last or batch_idx + 1 - window_start >= window_len
                args = hooks.on_before_forward(model=model, args=(batch, batch_idx))
                with no_sync if window_end else hooks.block_backward_sync(model=model):
                    with hooks.forward_context(model=model):
                        output = training_step(*args)
                    loss = _loss_of(output, batch_idx, epoch)
                    if queue_checks:
                        self._queued_losses.append((loss.detach(), epoch, batch_idx, self.global_step))
                    if check_now and not math.isfinite(loss.item()):
                        self._nonfinite(loss, batch_idx, epoch)
                    else:
                        hooks.backward(loss=loss / window_len if window_len > 1 else loss,
                                       optimizers=optimizers, model=model)
                        pending += 1
                if window_end:
                    stepped = False
                    if pending:
                        for optimizer in optimizers:
                            hooks.unscale_gradients(optimizer=optimizer)
                            hooks.on_before_optimizer_step(trainer=trainer, optimizer=optimizer)
                            if clip > 0:
                                hooks.clip_gradients(grad_clip_val=clip, optimizer=optimizer, norm_type=norm_type)
                        stepped = hooks.optimizer_step(optimizers=optimizers)
                        for optimizer in optimizers:
                            optimizer.zero_grad(set_to_none=True)
                    if stepped:
                        for scheduler in step_schedulers:
                            scheduler.step()
                    else:
                        self.skipped_steps += 1
                    pending = 0
                    self.global_step += 1
                    trainer.global_step = self.global_step  # live for hooks, as in Lightning
                    self.batch_in_epoch = batch_idx + 1
                    if self.global_step % log_every == 0:
                        self._log_train()
                hooks.on_train_batch_end(trainer=trainer, outputs=output, batch=args[0], batch_idx=batch_idx)
                self.progress.update()
                if window_end:
                    if 0 < max_steps <= self.global_step:
                        break
                    if self.stop_signal is not None:
                        raise KeyboardInterrupt(f"stopped by {signal.Signals(self.stop_signal).name}")
            else:  # the epoch's data is exhausted
                if pending or self.batch_in_epoch < (n_batches or 0):
                    self._drop_open_window(epoch, n_batches)
                self._end_epoch(epoch)
                continue
            # max_steps reached: the epoch still ends if its last batch was trained
            if n_batches is not None and self.batch_in_epoch >= n_batches:
                self._end_epoch(epoch)
            break
        self._phase = None
        self._log_train()
        self.progress.close()
        self._checkpoint()
        hooks.on_fit_end(trainer=trainer, model=module)

    def _defer_loss_checks(self) -> bool:
        return self.device.type != "cpu"

    def _check_queued_losses(self) -> None:
        """Read the losses queued on the device since the last check, in one transfer."""
        queued, self._queued_losses = self._queued_losses, []
        if not queued:
            return
        finite = torch.isfinite(torch.stack([item[0] for item in queued])).cpu().tolist()
        for ok, (loss, epoch, batch_idx, step) in zip(finite, queued):
            if not ok:
                self._nonfinite(loss, batch_idx, epoch, step,
                                note=f" It was detected at global step {self.global_step}: on an accelerator the "
                                     "check runs at the logging interval, so later steps used its gradients and "
                                     "no checkpoint was written since.")

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int, epoch: int, step: int | None = None,
                   note: str = "") -> None:
        if self.trainer.on_nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"training_step returned a non-finite loss ({loss.item()}) at epoch {epoch}, batch {batch_idx} "
                f"(global step {self.global_step if step is None else step}, the optimizer step it belongs to).{note} "
                "Pass "
                "Trainer(on_nonfinite_loss='skip') to skip such batches, or 'ignore' to backpropagate anyway."
            )
        # "skip": no backward for this micro-batch; a window without any backward takes no step.

    def _drop_open_window(self, epoch: int, n_batches: int | None) -> None:
        """The loader ended earlier than its ``len`` promised: the open window's gradients are
        discarded rather than leaked into the next epoch."""
        warnings.warn(
            f"The training loader of epoch {epoch} ended after {self.batch_in_epoch} of the {n_batches} batches "
            "its len() announced; the incomplete accumulation window was discarded.",
            RuntimeWarning, stacklevel=2,
        )
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def _end_epoch(self, epoch: int) -> None:
        trainer, hooks = self.trainer, self.hooks
        self._phase = None
        hooks.on_train_epoch_end(trainer=trainer, epoch=epoch)
        self._log_train()
        if self.val_loader is not None and trainer.limit_val_batches != 0 \
                and (epoch + 1) % trainer.check_val_every_n_epoch == 0:
            self.validate()
        for sched in self.schedulers:
            if sched["interval"] == "epoch":
                monitor = sched.get("monitor")
                if monitor is not None:
                    if monitor not in self.callback_metrics:
                        raise MisconfigurationError(
                            f"The LR scheduler {type(sched['scheduler']).__name__} monitors {monitor!r}, which no "
                            f"step logged (self.log); logged so far: {sorted(self.callback_metrics)}."
                        )
                    sched["scheduler"].step(self.callback_metrics[monitor])
                else:
                    sched["scheduler"].step()
        self.epoch = trainer.current_epoch = epoch + 1
        self.batch_in_epoch = 0
        self.epoch_rng = None
        self._checkpoint()

    def _finished(self) -> bool:
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        return (max_epochs is not None and self.epoch >= max_epochs) or (0 < max_steps <= self.global_step)

    def _epoch_batches(self, epoch: int, n_batches: int | None) -> Iterator[tuple[int, Any, bool]]:
        """The epoch's ``(index, batch, is_last)``. A resumed epoch replays its shuffle from
        the RNG states saved at the epoch's start and skips the batches already trained. A
        loader without ``len`` is read one batch ahead to know which batch is its last."""
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # before the iterator exists, or every epoch repeats
        skip = self.batch_in_epoch
        restore_after = None
        if skip and self.epoch_rng is not None:
            restore_after = self._rng_snapshot()
            self._rng_restore(self.epoch_rng)
        else:
            self.epoch_rng = self._rng_snapshot()
        iterator = iter(loader)
        for _ in range(skip):
            next(iterator, None)
        if restore_after is not None:
            self._rng_restore(restore_after)
        index = self._batch = skip
        if n_batches is not None:
            for batch in iterator:
                if index >= n_batches:
                    return
                yield index, batch, index + 1 == n_batches
                index = self._batch = index + 1
            return
        limit = self.trainer.limit_train_batches
        sentinel = object()
        batch = next(iterator, sentinel)
        while batch is not sentinel:
            self._batch = index + 1
            following = next(iterator, sentinel) if limit is None or index + 1 < limit else sentinel
            self._batch = index
            yield index, batch, following is sentinel
            batch = following
            index += 1

    def _loader_generators(self) -> list[torch.Generator]:
        """Explicit generators the train loader shuffles with (``DataLoader(generator=...)``):
        their states are part of the resume point, like the global RNGs."""
        loader = self.train_loader
        found: dict[int, torch.Generator] = {}
        for holder in (loader, getattr(loader, "sampler", None),
                       getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            gen = getattr(holder, "generator", None)
            if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
                found.setdefault(id(gen), gen)
        return list(found.values())

    def _rng_snapshot(self) -> dict[str, Any]:
        states = ckpt.rng_states()
        states["loader_generators"] = [g.get_state() for g in self._loader_generators()]
        return states

    def _rng_restore(self, states: dict[str, Any]) -> None:
        ckpt.set_rng_states(states)
        for gen, state in zip(self._loader_generators(), states.get("loader_generators", [])):
            gen.set_state(state)

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        trainer, hooks, module = self.trainer, self.hooks, self.module
        step_module = cast(StepModule, module)
        was_training = module.training
        module.eval()
        self.metrics.begin_validation()
        limit = trainer.limit_val_batches
        phase, self._phase, self._batch = self._phase, "validation", 0
        try:
            with torch.no_grad():
                for batch_idx, batch in enumerate(self.val_loader):
                    if limit is not None and batch_idx >= limit:
                        break
                    self._batch = batch_idx
                    args = hooks.on_before_forward(model=module, args=(batch, batch_idx))
                    with hooks.forward_context(model=module):
                        step_module.validation_step(*args)
                    if self.stop_signal is not None:
                        raise KeyboardInterrupt(f"stopped by {signal.Signals(self.stop_signal).name}")
        except Exception as exc:
            self._add_context(exc)
            raise
        finally:
            values = self.metrics.end_validation()
            module.train(was_training)
        self._phase = phase
        reduced = {name: hooks.reduce(tensor=torch.as_tensor(value, dtype=torch.float32, device=self.device),
                                      op="mean")
                   for name, value in values.items()}
        result = to_floats(reduced)
        self.callback_metrics.update(result)
        if self.csv is not None:
            self.csv.log(self.global_step, self.epoch, result)
        self.progress.show(self.callback_metrics)
        hooks.on_validation_end(trainer=trainer, metrics=result)
        return result

    def validate_only(self) -> dict[str, float]:
        """``Trainer.validate``: this process, the module's device, no run folder."""
        trainer, hooks = self.trainer, self.hooks
        self.device = hooks.root_device(trainer=trainer, model=self.module)
        self.module.to(self.device)
        _attach_metrics(self.module, self.metrics)
        try:
            return self.validate()
        finally:
            _attach_metrics(self.module, None)

    def _log_train(self) -> None:
        self._check_queued_losses()
        if self.skipped_steps:
            self.callback_metrics["skipped_steps"] = float(self.skipped_steps)
        if not self.metrics.train:
            return
        values = to_floats(self.metrics.train)
        self.metrics.train.clear()
        self.callback_metrics.update(values)
        if self.csv is not None:
            self.csv.log(self.global_step, self.epoch, values)
        self.progress.show(self.callback_metrics)

    # -- checkpoints -------------------------------------------------------------------------
    def _last_checkpoint_path(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "checkpoints" / "last.ckpt"

    def _checkpoint(self) -> None:
        """``last.ckpt`` of the current position, unless it was just written."""
        self._check_queued_losses()  # never checkpoint weights a non-finite loss reached
        position = (self.epoch, self.batch_in_epoch, self.global_step)
        if self.trainer.enable_checkpointing and self.log_dir is not None and self._saved_at != position:
            path = self._last_checkpoint_path()
            self.save_checkpoint(path)
            self._saved_at = position
            self.last_checkpoint = path
            self.trainer.checkpoint_path = str(path)  # also known when fit ends with an exception

    def checkpoint_dict(self) -> dict[str, Any]:
        checkpoint: dict[str, Any] = {
            "torchplug_checkpoint": ckpt.FORMAT_VERSION,
            "torchplug_version": __version__,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "state_dict": self.module.state_dict(),
            "optimizer_states": [opt.state_dict() for opt in self.optimizers],
            "lr_schedulers": [s["scheduler"].state_dict() for s in self.schedulers],
            "rng_states": self._rng_snapshot(),
            "epoch_rng_states": self.epoch_rng,
            "callback_metrics": dict(self.callback_metrics),
            "plugins": self.trainer.plugin_names,
        }
        self.hooks.on_save_checkpoint(trainer=self.trainer, checkpoint=checkpoint)
        return checkpoint

    def save_checkpoint(self, path: Path) -> None:
        ckpt.save(self.checkpoint_dict(), path)

    def _restore(self, data: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(data["state_dict"])
            if len(data["optimizer_states"]) != len(self.optimizers):
                raise CheckpointError(
                    f"The checkpoint has {len(data['optimizer_states'])} optimizer states, "
                    f"configure_optimizers() made {len(self.optimizers)}."
                )
            for opt, state in zip(self.optimizers, data["optimizer_states"]):
                opt.load_state_dict(state)
            schedulers = data.get("lr_schedulers", [])
            if len(schedulers) != len(self.schedulers):
                raise CheckpointError(
                    f"The checkpoint has {len(schedulers)} LR scheduler states, "
                    f"configure_optimizers() made {len(self.schedulers)}."
                )
            for sched, state in zip(self.schedulers, schedulers):
                sched["scheduler"].load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"The checkpoint does not match this model or its optimizers: {exc}") from exc
        self.epoch = self.trainer.current_epoch = int(data["epoch"])
        self.batch_in_epoch = int(data.get("batch_in_epoch", 0))
        self.global_step = self.trainer.global_step = int(data["global_step"])
        self.skipped_steps = int(data.get("skipped_steps", 0))
        self.callback_metrics.update(data.get("callback_metrics", {}))
        self.epoch_rng = data.get("epoch_rng_states")
        self._rng_restore(data["rng_states"])
        self.hooks.on_load_checkpoint(trainer=self.trainer, checkpoint=data)

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> FitOutcome:
        from torchplug.trainer import FitOutcome

        trainer, hooks = self.trainer, self.hooks
        trainer._run = self  # for trainer.save_checkpoint during and after fit
        start = time.perf_counter()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        with self._stop_on_signals():
            try:
                if trainer.deterministic:
                    torch.use_deterministic_algorithms(True)
                self.setup()
                self.train()
            except KeyboardInterrupt as exc:
                self._stopping = True
                self._checkpoint_on_interrupt()
                hooks.on_exception(trainer=trainer, exception=exc)
                raise
            except Exception as exc:
                self._stopping = True
                self._add_context(exc)
                hooks.on_exception(trainer=trainer, exception=exc)
                with suppress(OSError):  # the first error is the one to report (e.g. metrics.csv on a full disk)
                    self._close_outputs()
                self._remove_if_empty()
                wrapped = hooks.wrap_error(exc)
                if wrapped is exc:
                    raise
                raise wrapped from exc
            finally:
                self._stopping = True
                torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
                self._close_outputs()
                _attach_metrics(self.module, None)
                self._release_wrapper()
                hooks.teardown_environment(trainer=trainer)
        trainer.global_step, trainer.current_epoch = self.global_step, self.epoch
        trainer.callback_metrics = dict(self.callback_metrics)
        return FitOutcome(
            global_step=self.global_step,
            current_epoch=self.epoch,
            callback_metrics=dict(self.callback_metrics),
            log_dir=str(self.log_dir) if self.log_dir else None,
            checkpoint_path=str(self.last_checkpoint) if self.last_checkpoint else None,
            extra={"seconds": time.perf_counter() - start, "skipped_steps": self.skipped_steps},
        )

    def _release_wrapper(self) -> None:
        """Drop configure_ddp's wrapper before the environment is torn down. Kept (trainer._run
        outlives the fit) it holds the process group until interpreter exit, and a gloo group
        finalised there aborts the process ("terminate called without an active exception"):
        4 of 30 two-rank runs of a plain DDP script did, 0 of 30 once it was collected first."""
        if self.model is not self.module:
            self.model = self.module
            gc.collect()  # after a backward the wrapper sits in reference cycles

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT (where their handlers are Python's defaults) request a stop at the
        end of the current optimizer step; a second signal, or any signal in a multi-process
        run (ranks would stop at different steps), raises ``KeyboardInterrupt`` at once. Once
        the run is ending (checkpoint on interrupt, ``on_exception``, teardown), two further
        signals are ignored so the cleanup completes (a launcher that sends SIGTERM to workers
        that are already stopping must not cut their teardown short); a third aborts it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stopping:
                self._ignored_signals += 1
                if self._ignored_signals >= 3:  # a cleanup that hangs can still be cut short
                    raise KeyboardInterrupt(f"stopped by {name} during cleanup")
                print(f"torchplug: {name} received while stopping; finishing the checkpoint and teardown",
                      file=sys.stderr, flush=True)
                return
            if self.stop_signal is not None or self.trainer.world_size > 1:
                raise KeyboardInterrupt(f"stopped by {name}")
            self.stop_signal = signum
            print(f"torchplug: {name} received, stopping after the current step "
                  "(send it again to stop now)", file=sys.stderr, flush=True)

        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        previous = {}
        for signum, default in defaults.items():
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, handler_before in previous.items():
                signal.signal(signum, handler_before)

    def _add_context(self, exc: BaseException) -> None:
        """Note where a user's or plugin's exception happened (its type and message stay as
        they are; Python >= 3.11 shows notes under the message)."""
        if self._phase is None or isinstance(exc, TorchplugError) or not hasattr(exc, "add_note"):
            return
        if any(str(note).startswith("torchplug: raised") for note in getattr(exc, "__notes__", ())):
            return
        where = "validation batch" if self._phase == "validation" else "batch"
        exc.add_note(f"torchplug: raised during {self._phase} at epoch {self.epoch}, {where} {self._batch} "
                     f"(global step {self.global_step}).")

    def _close_outputs(self) -> None:
        self.progress.close()
        if self.csv is not None:
            self.csv.close()

    def _checkpoint_on_interrupt(self) -> None:
        """Keep the last completed optimizer step: weights, optimizer state and data position
        (a partial accumulation window is dropped). After a requested stop the position is
        exact, RNG included, so resuming continues as if never stopped."""
        if not (self.trainer.enable_checkpointing and self.log_dir is not None and self.optimizers):
            return
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._saved_at = None
        self._checkpoint()

    def _new_version_dir(self, root: Path) -> Path:
        try:
            if not root.exists():
                root.mkdir(parents=True)
                self._created.append(root)
            path = _new_version_dir(root)
        except OSError as exc:
            raise MisconfigurationError(
                f"Cannot create the run folder under {root}: {exc}. Pass a writable default_root_dir, "
                "or Trainer(logger=False, enable_checkpointing=False) to write nothing."
            ) from exc
        self._created.append(path)
        return path

    def _remove_if_empty(self) -> None:
        """A run that failed before writing any metric or checkpoint leaves no folder behind."""
        if self.last_checkpoint is not None or (self.csv is not None and self.csv.rows):
            return
        for folder in reversed(self._created):
            try:
                for name in ("metrics.csv",):
                    (folder / name).unlink(missing_ok=True)
                checkpoints = folder / "checkpoints"
                if checkpoints.is_dir() and not any(checkpoints.iterdir()):
                    checkpoints.rmdir()
                folder.rmdir()
            except OSError:  # not empty (someone else's files): keep it
                return


def _attach_metrics(module: nn.Module, store: MetricStore | None) -> None:
    attach = getattr(module, "_attach_metrics", None)
    if callable(attach):
        attach(store)


def _unwrap(found: Any, wrapper: nn.Module, module: nn.Module) -> nn.Module:
    """The user's module behind ``configure_ddp``'s wrapper: ``get_model_from_plugin``'s answer
    (through a ``TrainingStepModule``), or the module that was wrapped when it has none."""
    while isinstance(found, TrainingStepModule):
        found = found.module
    if isinstance(found, nn.Module) and found is not wrapper:
        return found
    return module


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


def _num_batches(loader: Any, limit: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return None
    return min(n, limit) if limit is not None else n


def _configure_optimizers(module: nn.Module) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
    config = cast(StepModule, module).configure_optimizers()
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[dict[str, Any]] = []

    def add_scheduler(item: Any) -> None:
        entry = dict(item) if isinstance(item, dict) else {"scheduler": item}
        sched = entry.get("scheduler")
        if not callable(getattr(sched, "step", None)) or not callable(getattr(sched, "state_dict", None)):
            raise MisconfigurationError(
                f"configure_optimizers() returned the LR scheduler {sched!r}; expected a torch.optim.lr_scheduler "
                "object (with step() and state_dict())."
            )
        entry.setdefault("interval", "epoch")
        if entry["interval"] not in ("step", "epoch"):
            raise MisconfigurationError(f"LR scheduler interval must be 'step' or 'epoch', got {entry['interval']!r}")
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if entry.get("monitor") is None:
                raise MisconfigurationError(
                    "ReduceLROnPlateau needs a metric: return {'optimizer': opt, 'lr_scheduler': {'scheduler': "
                    "sched, 'monitor': 'val_loss'}} and self.log('val_loss', ...) in validation_step."
                )
            if entry["interval"] != "epoch":
                raise MisconfigurationError("ReduceLROnPlateau steps per epoch: use interval 'epoch'.")
        schedulers.append(entry)

    def add(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            optimizers.append(item)
        elif isinstance(item, dict) and isinstance(item.get("optimizer"), torch.optim.Optimizer):
            optimizers.append(item["optimizer"])
            if item.get("lr_scheduler") is not None:
                add_scheduler(item["lr_scheduler"])
        else:
            raise MisconfigurationError(
                f"configure_optimizers() returned {type(item).__name__}; return an optimizer, a list of them, "
                "(optimizers, schedulers), or {'optimizer': ..., 'lr_scheduler': ...}."
            )

    if isinstance(config, tuple) and len(config) == 2 and isinstance(config[0], (list, tuple)):
        for opt in config[0]:
            add(opt)
        for sched in config[1]:
            add_scheduler(sched)
    elif isinstance(config, (list, tuple)):
        for item in config:
            add(item)
    else:
        add(config)
    if not optimizers:
        raise MisconfigurationError("configure_optimizers() returned no optimizer.")
    return optimizers, schedulers


def _rebind_schedulers(schedulers: list[dict[str, Any]], old: list[torch.optim.Optimizer],
                       new: list[torch.optim.Optimizer]) -> None:
    """apex's initialize may return new optimizer objects; schedulers must follow them."""
    mapping = {id(o): n for o, n in zip(old, new) if o is not n}
    for entry in schedulers:
        sched = entry["scheduler"]
        opt = getattr(sched, "optimizer", None)
        if opt is not None and id(opt) in mapping:
            sched.optimizer = mapping[id(opt)]


def _distributed_loader(loader: Any, trainer: Trainer, shuffle_default: bool) -> Any:
    """Give every rank its shard: swap the loader's sampler for a DistributedSampler."""
    if loader is None or trainer.world_size <= 1 or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    from torch.utils.data import BatchSampler, IterableDataset

    if isinstance(loader.dataset, IterableDataset):
        return loader
    if type(loader.batch_sampler) is not BatchSampler:
        raise MisconfigurationError(
            "A DataLoader with a custom batch_sampler cannot be sharded automatically across "
            f"{trainer.world_size} processes; give it a DistributedSampler yourself."
        )
    shuffle = isinstance(loader.sampler, RandomSampler) if shuffle_default else False
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
        shuffle=shuffle, drop_last=loader.drop_last,
    )
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def _new_version_dir(root: Path) -> Path:
    """``root/version_N`` with the next free N, made atomically (mkdir fails if taken)."""
    versions = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    version = max(versions, default=-1) + 1
    while True:
        path = root / f"version_{version}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took it meanwhile
            version += 1


__all__ = ["FitRun", "StepModule", "check_module", "resolve_loaders"]
