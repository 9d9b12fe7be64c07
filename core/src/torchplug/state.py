"""Where a run is: its counters and metrics (``RunState``), and their checkpoint round trip.

One owner: the loop advances the ``RunState`` of its run, the Trainer reads it (its
``global_step``, ``current_epoch`` and ``callback_metrics`` are views of it), and a
checkpoint stores and restores it. Counters follow Lightning: ``global_step`` counts optimizer
steps (windows), including steps a precision plugin skipped; ``epoch`` counts completed epochs.

**The capture point.** Every checkpoint (``last.ckpt``, ``trainer.save_checkpoint`` from any hook,
the one written on interrupt) says exactly what the next thing to do is: ``epoch``, ``stage``
(:data:`STAGES`) and, in the ``"train"`` stage, ``batch_in_epoch``, with the RNG states that
thing starts from. The loop moves ``stage`` on *before* it calls a stage's hooks, so a
checkpoint written from inside a hook counts that stage as done and resume neither repeats nor
skips an end hook, a validation or an RNG draw:

* ``"train"``: train the epoch from batch ``batch_in_epoch`` (the shuffle replayed from
  ``epoch_rng``, the epoch's start). Written inside an accumulation window, it resumes at the
  window's start, from the RNG states there (gradients are not saved).
* ``"on_train_epoch_end"``: the batches are trained and ``training_epoch_end`` ran (a checkpoint
  from ``training_epoch_end``); next ``on_train_epoch_end``, then the rest.
* ``"on_epoch_end"``: a checkpoint from ``on_train_epoch_end``; next ``on_epoch_end``.
* ``"validation"``: a checkpoint from ``on_epoch_end`` or from inside the validation loop;
  next the epoch's validation (whole, from the RNG states where it started).
* ``"epoch_close"``: a checkpoint from ``on_validation_end``; next the epoch-interval
  LR schedulers and the stop decision, then epoch ``epoch + 1``, ``"train"``.

A checkpoint written before ``stage`` existed resumes in ``"train"``, as it was written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer

from torchplug.errors import CheckpointError, MisconfigurationError
from torchplug.utils import mark_optimizer_stepped

TRAIN = "train"
#: the end of an epoch, in the order the loop runs it (see the module docstring)
END_STAGES = ("training_epoch_end", "on_train_epoch_end", "on_epoch_end", "validation", "epoch_close")
STAGES = (TRAIN, *END_STAGES)


@dataclass
class RunState:
    """The counters of one fit, live while it runs."""

    epoch: int = 0
    #: batches of the current epoch already trained (the resume point inside an epoch)
    batch_in_epoch: int = 0
    global_step: int = 0
    #: optimizer steps a precision plugin skipped (inf/NaN gradients), counted in global_step too
    skipped_steps: int = 0
    callback_metrics: dict[str, float] = field(default_factory=dict)
    #: the last value of every metric written to metrics.csv and on_log_metrics
    logged_metrics: dict[str, float] = field(default_factory=dict)
    #: ``trainer.should_stop``: end the fit at the end of the current step or epoch (not saved)
    should_stop: bool = False
    #: RNG states at the start of the current epoch, to replay its shuffle on resume
    epoch_rng: dict[str, Any] | None = None
    #: what resume does next in ``epoch`` (:data:`STAGES`; moved on before a stage's hooks run)
    stage: str = TRAIN
    #: RNG states where the unit now running (an accumulation window, a validation) started: a
    #: checkpoint written inside it resumes there, so its draws are not made twice; None between units
    resume_rng: tuple[Any, ...] | None = None  # (EpochBatches.rng_capture)

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "epoch_rng_states": self.epoch_rng,
            "stage": self.stage,
            "callback_metrics": dict(self.callback_metrics),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        self.epoch = int(data["epoch"])
        self.batch_in_epoch = int(data.get("batch_in_epoch", 0))
        self.global_step = int(data["global_step"])
        self.skipped_steps = int(data.get("skipped_steps", 0))
        self.callback_metrics.update(data.get("callback_metrics", {}))
        self.epoch_rng = data.get("epoch_rng_states")
        self.stage = str(data.get("stage", TRAIN))
        if self.stage not in STAGES:
            raise CheckpointError(
                f"The checkpoint's stage {self.stage!r} is none of {', '.join(STAGES)}: it was written by a newer "
                "torchplug; resume it with that version."
            )


def resume_point(data: Mapping[str, Any]) -> str:
    """Where a checkpoint resumes, in words: ``"epoch 2, batch 3, global step 17"``."""
    stage = data.get("stage", TRAIN)
    where = f"batch {int(data.get('batch_in_epoch', 0))}" if stage == TRAIN else f"before {stage}"
    return f"epoch {int(data['epoch'])}, {where}, global step {int(data['global_step'])}"


def already_finished(data: Mapping[str, Any], max_epochs: int | None, max_steps: int) -> bool:
    """Whether a run resumed from ``data`` would train nothing (the loop's own stopping rule)."""
    return (max_epochs is not None and int(data["epoch"]) >= max_epochs) or 0 < max_steps <= int(data["global_step"])


@dataclass
class Position:
    """What the run is doing, for the note an exception gets: ``"train"``/``"validation"`` and the
    batch being fetched or run (set once per batch)."""

    phase: str | None = None
    batch: int = 0


@dataclass
class SchedulerConfig:
    """One LR scheduler from ``configure_optimizers`` and how the loop steps it."""

    scheduler: Any
    interval: str = "epoch"  # "step" or "epoch"
    #: the metric ``ReduceLROnPlateau`` steps on
    monitor: str | None = None

    def step_epoch(self, metrics: Mapping[str, float]) -> None:
        """The epoch's step (``interval="epoch"``), on the monitored metric if there is one."""
        if self.monitor is None:
            self.scheduler.step()
            return
        if self.monitor not in metrics:
            raise MisconfigurationError(
                f"The LR scheduler {type(self.scheduler).__name__} monitors {self.monitor!r}, which no "
                f"step logged (self.log); logged so far: {sorted(metrics)}."
            )
        self.scheduler.step(metrics[self.monitor])


def training_state(state_dict: dict[str, Any], optimizer_states: list[dict[str, Any]],
                   schedulers: list[SchedulerConfig]) -> dict[str, Any]:
    """Weights, optimizer and scheduler states, as a checkpoint stores them (the first two from
    the ``get_state_dicts`` hook)."""
    return {
        "state_dict": state_dict,
        "optimizer_states": optimizer_states,
        "lr_schedulers": [s.scheduler.state_dict() for s in schedulers],
    }


def load_training_state(data: Mapping[str, Any], optimizers: list[Optimizer], schedulers: list[SchedulerConfig],
                        load: Callable[[dict[str, Any], list[dict[str, Any]]], Any]) -> None:
    """Load what :func:`training_state` saved, the weights and optimizer states through ``load``
    (the ``load_state_dicts`` hook); a mismatch is a :class:`CheckpointError`."""
    try:
        # sharded state (torchplug.sharded): the optimizers' state is in the shards, which ``load`` reads
        if "sharded_state" not in data and len(data["optimizer_states"]) != len(optimizers):
            raise CheckpointError(
                f"The checkpoint has {len(data['optimizer_states'])} optimizer states, "
                f"configure_optimizers() made {len(optimizers)}."
            )
        load(data["state_dict"], list(data["optimizer_states"]))
        saved = data.get("lr_schedulers", [])
        if len(saved) != len(schedulers):
            raise CheckpointError(
                f"The checkpoint has {len(saved)} LR scheduler states, configure_optimizers() made {len(schedulers)}."
            )
        for sched, state in zip(schedulers, saved):
            sched.scheduler.load_state_dict(state)
        if int(data.get("global_step", 0)) > 0:
            for optimizer in optimizers:
                mark_optimizer_stepped(optimizer)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"The checkpoint does not match this model or its optimizers: {exc}") from exc
