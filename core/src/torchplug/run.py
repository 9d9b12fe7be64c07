"""One process's whole fit: environment, preparation, the loop, the exception path, teardown.

``FitRun.run`` is the path every fit takes, in every launch mode (in-process, a spawned
worker, a torchrun rank)::

    setup_environment → world_size/global_rank → [all_gather_object: the plan handshake, with
    several processes] → setup("fit") → prepare (root_device → model_init_context
    → model_transforms → setup_optimizers … configure_ddp) → the run folder
    → [load_state_dicts (load_sharded_state for sharded state) → on_load_checkpoint when resuming]
    → FitLoop.train
    on KeyboardInterrupt: last.ckpt of the last completed step → on_exception → re-raise
    on an error: a note saying where it happened → on_exception → the outputs closed (an
        empty run folder removed) → re-raised, as PluginHookError when a plugin raised it
    always: the wrapper dropped and collected → teardown("fit") (if setup ran) → teardown_environment
"""

from __future__ import annotations

import gc
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchplug.errors import MisconfigurationError, TorchplugError
from torchplug.handshake import check_ranks
from torchplug.loop import FitLoop
from torchplug.module import MetricStore
from torchplug.outputs import RunOutputs
from torchplug.prepare import Prepared, attach_metrics, prepare
from torchplug.provenance import check_resume_world_size
from torchplug.sharded import FOLDER_KEY
from torchplug.signals import StopRequest
from torchplug.state import Position, RunState, load_training_state

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


@dataclass
class FitOutcome:
    """What one process's fit produced; the launcher returns rank 0's to the caller."""

    global_step: int
    current_epoch: int
    callback_metrics: dict[str, float]
    log_dir: str | None
    checkpoint_path: str | None
    #: the trained weights, set when the fit ran in another process than ``Trainer.fit``'s
    state_dict: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FitRun:
    """Everything one process needs for one ``fit``; :meth:`run` does it."""

    def __init__(self, trainer: Trainer, module: nn.Module, train_loader: Any, val_loader: Any,
                 resume: dict[str, Any] | None) -> None:
        self.trainer = trainer
        self.hooks = trainer.hooks
        self.module = module  # the user's module (after connect_precision, once prepared)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.resume = resume
        self.state = RunState()
        self.position = Position()
        self.metrics = MetricStore()
        self.stop = StopRequest(multi_process=lambda: trainer.world_size > 1)
        self.outputs: RunOutputs | None = None
        self.loop: FitLoop | None = None
        self.set_up = False  # whether the setup hook ran (then teardown runs too)

    def run(self) -> FitOutcome:
        trainer, hooks = self.trainer, self.hooks
        trainer._run = self  # its state is what trainer.global_step & co. show; save_checkpoint uses it
        trainer.model = self.module  # plugins see the user's module from the start (trainer_api)
        start = time.perf_counter()
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        with self.stop:
            try:
                if trainer.deterministic:
                    torch.use_deterministic_algorithms(True)
                loop = self._setup()
                loop.train()
            except KeyboardInterrupt as exc:
                self.stop.stopping = True
                if self.loop is not None:
                    self.loop.checkpoint_on_interrupt()
                hooks.on_exception(trainer=trainer, exception=exc)
                raise
            except Exception as exc:
                self.stop.stopping = True
                add_context(exc, self.position, self.state)
                hooks.on_exception(trainer=trainer, exception=exc)
                with suppress(OSError):  # the first error is the one to report (e.g. metrics.csv on a full disk)
                    self._close_outputs()
                if self.outputs is not None:
                    self.outputs.remove_if_empty()
                wrapped = hooks.wrap_error(exc)
                if wrapped is exc:
                    raise
                raise wrapped from exc
            finally:
                self.stop.stopping = True
                if trainer.deterministic:
                    # Only when changed: the call imports torch._inductor (~4 s on these VMs), which a
                    # fit that ends early (the plan handshake refusing, say) would otherwise wait for.
                    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
                self._close_outputs()
                attach_metrics(self.module, None)
                self.module.__dict__.pop("_torchplug_loop", None)
                self._release_wrapper()
                if self.set_up:
                    hooks.teardown(trainer=trainer, stage="fit")
                hooks.teardown_environment(trainer=trainer)
        outputs = self.outputs
        return FitOutcome(
            global_step=self.state.global_step,
            current_epoch=self.state.epoch,
            callback_metrics=dict(self.state.callback_metrics),
            log_dir=str(outputs.log_dir) if outputs is not None and outputs.log_dir else None,
            checkpoint_path=str(outputs.last_checkpoint) if outputs is not None and outputs.last_checkpoint else None,
            state_dict=self.loop.final_weights if self.loop is not None else None,
            extra={"seconds": time.perf_counter() - start, "skipped_steps": self.state.skipped_steps,
                   "logged_metrics": dict(self.state.logged_metrics), "should_stop": self.state.should_stop},
        )

    def _setup(self) -> FitLoop:
        trainer, hooks = self.trainer, self.hooks
        hooks.setup_environment(trainer=trainer)
        trainer.world_size = hooks.world_size()
        trainer.global_rank = hooks.global_rank()
        if trainer.world_size > 1:
            check_ranks(trainer)  # before any other collective: different plans would hang in one
        self.set_up = True
        hooks.setup(trainer=trainer, stage="fit")
        if trainer.on_nonfinite_loss == "skip" and trainer.world_size > 1:
            raise MisconfigurationError(
                f"on_nonfinite_loss='skip' cannot run on {trainer.world_size} processes: a rank that skips a "
                "backward would desynchronise the gradient all-reduce. Use 'error' or 'ignore'."
            )
        parts = prepare(trainer, self.module, self.train_loader, self.val_loader, self.metrics)
        self.module = trainer.model = parts.module
        trainer.val_dataloaders = parts.val_loader
        trainer.log_dir = trainer.checkpoint_path = None
        rank_zero = trainer.is_global_zero
        self.outputs = outputs = RunOutputs(
            trainer.default_root_dir, folder=rank_zero and (trainer.logger or trainer.enable_checkpointing),
            csv=trainer.logger, progress=trainer.enable_progress_bar and rank_zero)
        trainer.log_dir = str(outputs.log_dir) if outputs.log_dir is not None else None
        self.loop = loop = FitLoop(trainer, parts, self.state, outputs, self.stop, self.position, self.metrics)
        if self.resume is not None:
            if rank_zero:
                check_resume_world_size(self.resume, trainer.world_size)
            module, optimizers = loop.module, loop.optimizers

            resume = self.resume

            def load(weights: dict[str, Any], states: list[dict[str, Any]]) -> None:
                if "sharded_state" in resume:  # the model and optimizer state is in the shards' folder
                    hooks.load_sharded_state(trainer=trainer, model=module, optimizers=optimizers,
                                             folder=resume[FOLDER_KEY], reference=resume["sharded_state"])
                    return
                hooks.load_state_dicts(trainer=trainer, model=module, optimizers=optimizers, state_dict=weights,
                                       optimizer_states=states)

            load_training_state(self.resume, optimizers, loop.schedulers, load)
            self.state.restore(self.resume)
            loop.batches.rng_restore(self.resume["rng_states"])
            hooks.on_load_checkpoint(trainer=trainer, checkpoint=self.resume)
        return loop

    def save_checkpoint(self, path: Path | None) -> None:
        """``trainer.save_checkpoint``: gathered on every process, written by the one given a path."""
        if self.loop is None:
            raise MisconfigurationError(
                "save_checkpoint was called before the fit's setup finished (the optimizers and the run state do "
                "not exist yet); call it from on_fit_start or later."
            )
        self.loop.save_checkpoint(path)

    def _close_outputs(self) -> None:
        if self.outputs is not None:
            self.outputs.close()

    def _release_wrapper(self) -> None:
        """Drop configure_ddp's wrapper before the environment is torn down. Kept (trainer._run
        outlives the fit) it holds the process group until interpreter exit, and a gloo group
        finalised there aborts the process ("terminate called without an active exception"):
        4 of 30 two-rank runs of a plain DDP script did, 0 of 30 once it was collected first."""
        if self.loop is not None and self.loop.release_wrapper():
            gc.collect()  # after a backward the wrapper sits in reference cycles


def validate_only(trainer: Trainer, module: nn.Module, val_loader: Any) -> dict[str, float]:
    """``Trainer.validate``: this process, the module's device, no run folder."""
    hooks = trainer.hooks
    device = hooks.root_device(trainer=trainer, model=module)
    module.to(device)
    metrics, position, state = MetricStore(), Position(), RunState()
    parts = Prepared(device=device, module=module, model=module, optimizers=[], schedulers=[], train_loader=None,
                     val_loader=val_loader)
    outputs = RunOutputs(trainer.default_root_dir, folder=False, csv=False, progress=False)
    loop = FitLoop(trainer, parts, state, outputs, StopRequest(multi_process=lambda: False), position, metrics)
    attach_metrics(module, metrics)
    hooks.setup(trainer=trainer, stage="validate")
    try:
        return loop.validate()
    except Exception as exc:
        add_context(exc, position, state)
        raise
    finally:
        attach_metrics(module, None)
        module.__dict__.pop("_torchplug_loop", None)
        hooks.teardown(trainer=trainer, stage="validate")


def add_context(exc: BaseException, position: Position, state: RunState) -> None:
    """Note where a user's or plugin's exception happened (its type and message stay as they
    are; Python >= 3.11 shows notes under the message)."""
    if position.phase is None or isinstance(exc, TorchplugError) or not hasattr(exc, "add_note"):
        return
    if any(str(note).startswith("torchplug: raised") for note in getattr(exc, "__notes__", ())):
        return
    where = "validation batch" if position.phase == "validation" else "batch"
    exc.add_note(f"torchplug: raised during {position.phase} at epoch {state.epoch}, {where} {position.batch} "
                 f"(global step {state.global_step}).")


__all__ = ["FitOutcome", "FitRun", "validate_only"]
