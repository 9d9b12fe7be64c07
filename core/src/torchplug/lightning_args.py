"""Trainer arguments as PyTorch Lightning 1.1 spelled them, mapped to today's at ``Trainer()``.

``gpus``, ``num_processes``, ``accelerator="ddp_cpu"``/``"ddp_spawn"`` and
``resume_from_checkpoint`` become ``accelerator``/``strategy``/``devices`` and ``fit(ckpt_path=)``,
each with one :class:`~torchplug.errors.LightningSpellingWarning` naming today's spelling;
retired spellings (``accelerator="dp"``, ``"ddp2"``) and conflicting pairs are refused naming
both. ``fast_dev_run`` overrides the run's length, as in Lightning. The Lightning-only values of
the other arguments (fractional ``limit_*_batches``, ``val_check_interval``, an accumulation
schedule) are checked here too and resolved against the loaders in :mod:`torchplug.batchlimits`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torchplug.arguments import ACCELERATORS, check_int
from torchplug.errors import LightningSpellingWarning, MisconfigurationError
from torchplug.utils import warn_at_caller

#: Lightning 1.1 accelerators torchplug does not run, and what to use instead
RETIRED_ACCELERATORS = {
    "dp": "DataParallel (accelerator='dp') is not supported: use strategy='ddp' with devices=N (one process per "
          "device, each with its own batch)",
    "ddp2": "accelerator='ddp2' (DP inside each node, DDP across nodes) is not supported: use strategy='ddp' with "
            "devices=N per node and num_nodes=M",
}
SPAWN_NOTE = ("the ddp plugin starts devices=N worker processes itself with multiprocessing's spawn (as ddp_spawn "
              "did), or runs under torchrun without spawning")


def _warn(old: str, new: str) -> None:
    warn_at_caller(f"Trainer({old}) is Lightning 1.1's spelling; torchplug runs it as Trainer({new}). "
                   f"Write {new} to silence this warning.", LightningSpellingWarning)


def gpu_count(gpus: Any) -> int:
    """Lightning 1.1's ``gpus``: an int (-1: every GPU), ``"2"``, ``"0,1"``, ``[0, 1]``; as a count
    of devices. Specific GPU indices other than 0..n-1 cannot be expressed by ``devices``."""
    value = gpus
    if isinstance(value, str):
        text = value.strip()
        try:
            value = [int(p) for p in text.split(",") if p.strip()] if "," in text else int(text)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)) or (isinstance(value, int) and value < -1):
        raise MisconfigurationError(
            f"gpus must be a number of GPUs (0 or None: CPU, -1: all), a string such as '2' or '0,1', or a list of "
            f"GPU indices, got {gpus!r}. Today's spelling: accelerator='gpu', devices=N."
        )
    if isinstance(value, int):
        return value
    indices = list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices) or sorted(indices) != list(
            range(len(indices))):
        raise MisconfigurationError(
            f"gpus={gpus!r} names GPU indices; torchplug takes a count (devices=N uses GPUs 0..N-1). Choose the GPUs "
            f"with CUDA_VISIBLE_DEVICES={','.join(map(str, indices))} and pass accelerator='gpu', "
            f"devices={len(indices)}."
        )
    return len(indices)


def map_spellings(args: dict[str, Any], cuda_available: Callable[[], bool]) -> dict[str, Any]:
    """``accelerator``, ``strategy`` and ``devices`` after the Lightning 1.1 spellings in ``args``
    (``gpus``, ``num_processes``, ``accelerator="ddp_cpu"/"ddp_spawn"``) are mapped; raises on a
    retired spelling or a pair that contradicts itself, before any work."""
    accelerator, strategy, devices = args["accelerator"], args["strategy"], args["devices"]
    gpus, num_processes = args["gpus"], args["num_processes"]
    if isinstance(accelerator, str) and accelerator in RETIRED_ACCELERATORS:
        raise MisconfigurationError(RETIRED_ACCELERATORS[accelerator] + ".")
    if accelerator in ("ddp_cpu", "ddp_spawn"):
        if strategy is not None and strategy != "ddp":
            raise MisconfigurationError(
                f"accelerator={accelerator!r} (Lightning 1.1) means strategy='ddp', but strategy={strategy!r} was "
                "passed too; pass one."
            )
        kind = "cpu" if accelerator == "ddp_cpu" else None
        _warn(f"accelerator={accelerator!r}", "strategy='ddp'" + (", accelerator='cpu'" if kind else "")
              + ("" if kind else f" ({SPAWN_NOTE})"))
        strategy, accelerator = "ddp", kind
    if (gpus is not None or num_processes is not None) and isinstance(accelerator, str) \
            and accelerator not in ACCELERATORS and strategy in (None, accelerator):
        strategy, accelerator = accelerator, None  # Trainer(gpus=2, accelerator="ddp"): "ddp" is the strategy
    if gpus is not None and num_processes is not None:
        raise MisconfigurationError(
            f"gpus={gpus!r} and num_processes={num_processes!r} both give the process count; pass devices=N with "
            "accelerator='gpu' or 'cpu'."
        )
    if gpus is not None:
        count = gpu_count(gpus)
        if count != 0:
            if devices is not None:
                raise MisconfigurationError(
                    f"gpus={gpus!r} (Lightning 1.1) and devices={devices!r} both give the device count; pass "
                    "accelerator='gpu' with devices=N only."
                )
            if accelerator not in (None, "auto", "gpu", "cuda"):
                raise MisconfigurationError(f"gpus={gpus!r} asks for CUDA GPUs, but accelerator={accelerator!r}; "
                                            "pass one of the two.")
            if not cuda_available():
                raise MisconfigurationError(
                    f"gpus={gpus!r} asks for CUDA GPUs, but torch.cuda.is_available() is False on this machine. "
                    "Drop gpus (or gpus=0) to train on the CPU, or install a CUDA build of torch."
                )
            if count == -1:
                import torch
                count = torch.cuda.device_count()
            _warn(f"gpus={gpus!r}", f"accelerator='gpu', devices={count}")
            accelerator, devices = "gpu", count
        else:  # Lightning 1.1: gpus=0 trains on the CPU
            _warn(f"gpus={gpus!r}", "accelerator='cpu'")
            accelerator = "cpu" if accelerator in (None, "auto") else accelerator
    if num_processes is not None:
        count = check_int("num_processes", num_processes, minimum=1)
        if devices is not None and devices != count:
            raise MisconfigurationError(
                f"num_processes={num_processes!r} (Lightning 1.1) and devices={devices!r} both give the process "
                "count; pass devices=N only."
            )
        if accelerator not in (None, "auto", "cpu"):
            raise MisconfigurationError(
                f"num_processes={num_processes!r} runs CPU processes, but accelerator={accelerator!r}; for GPUs pass "
                "accelerator='gpu', devices=N."
            )
        _warn(f"num_processes={num_processes}", f"accelerator='cpu', devices={count}")
        accelerator, devices = "cpu", count
    return {"accelerator": accelerator, "strategy": strategy, "devices": devices}


def check_resume_argument(path: Any) -> str | os.PathLike[str] | None:
    """Lightning 1.1's ``Trainer(resume_from_checkpoint=path)``: ``fit(ckpt_path=path)`` today."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise MisconfigurationError(
            f"resume_from_checkpoint must be a path, got {path!r} ({type(path).__name__}); today's spelling is "
            "trainer.fit(model, ckpt_path=...)."
        )
    _warn(f"resume_from_checkpoint={str(path)!r}", f"...).fit(model, ckpt_path={str(path)!r}")
    return path


def fast_dev_run_batches(value: Any) -> int:
    """``fast_dev_run``: ``True`` is 1 batch, an int n is n batches, ``False``/0 is off."""
    if isinstance(value, bool):
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise MisconfigurationError(
            f"fast_dev_run must be True/False or a number of batches >= 0, got {value!r} ({type(value).__name__})"
        )
    return value


def fast_dev_run_overrides(n: int) -> tuple[int, int, int, int, float, int, int, bool, bool]:
    """What ``fast_dev_run=n`` overrides (Lightning's semantics): ``max_epochs`` 1, ``max_steps`` -1,
    n train and n validation batches, ``val_check_interval`` 1.0, ``check_val_every_n_epoch`` 1,
    no sanity check, no metrics file (``logger``) and no checkpoint (``enable_checkpointing``)."""
    return 1, -1, n, n, 1.0, 1, 0, False, False


def fast_dev_run_note(n: int) -> str:
    return (f"torchplug: fast_dev_run={n}: {n} training and {n} validation batch(es), one epoch; no checkpoint, "
            "no metrics file (max_epochs, max_steps and limit_*_batches overridden).")


def fit_checkpoint(resume_from_checkpoint: str | os.PathLike[str] | None,
                   ckpt_path: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """The checkpoint ``fit`` resumes from: ``ckpt_path``, or Lightning 1.1's ``Trainer(resume_from_checkpoint=)``."""
    if ckpt_path is not None and resume_from_checkpoint is not None:
        raise MisconfigurationError(
            f"Trainer(resume_from_checkpoint={str(resume_from_checkpoint)!r}) and fit(ckpt_path={str(ckpt_path)!r}) "
            "both name a checkpoint; pass fit(ckpt_path=...) only."
        )
    return resume_from_checkpoint if ckpt_path is None else ckpt_path


def check_limit(name: str, value: Any, minimum: int) -> int | float | None:
    """``limit_*_batches``: None (all), an int count >= ``minimum``, or a float fraction of the
    loader in (0, 1] (0.0 too for validation: off)."""
    if value is None:
        return None
    if isinstance(value, float):
        if not (0.0 < value <= 1.0 or (minimum == 0 and value == 0.0)):
            low = "[0.0" if minimum == 0 else "(0.0"
            raise MisconfigurationError(
                f"{name} as a float is a fraction of the loader's batches in {low}, 1.0], got {value!r}; pass an "
                "int for a number of batches."
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise MisconfigurationError(
            f"{name} must be an int (batches) or a float fraction in (0.0, 1.0], got {value!r} "
            f"({type(value).__name__})"
        )
    return check_int(name, value, minimum)


def check_val_check_interval(value: Any) -> int | float:
    """``val_check_interval``: a float fraction of the epoch in (0, 1], or an int number of training batches."""
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise MisconfigurationError(
        f"val_check_interval must be a float fraction of the training epoch in (0.0, 1.0] or an int number of "
        f"training batches >= 1, got {value!r}"
    )


def check_sanity_steps(value: Any) -> int:
    """``num_sanity_val_steps``: validation batches before training; -1: the whole loader; 0: none."""
    return check_int("num_sanity_val_steps", value, minimum=-1)


def check_schedule(value: Any) -> dict[int, int]:
    """``accumulate_grad_batches``: an int, or Lightning's ``{epoch: n}`` schedule (from that epoch
    on, n micro-batches per step; 1 before the first key, as Lightning's GradientAccumulationScheduler)."""
    if not isinstance(value, dict):
        return {0: check_int("accumulate_grad_batches", value, minimum=1)}
    if not value:
        raise MisconfigurationError("accumulate_grad_batches={} is an empty schedule; pass {epoch: n, ...} or an int.")
    for epoch, n in value.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise MisconfigurationError(
                f"accumulate_grad_batches={value!r}: schedule keys are epochs (ints >= 0), got {epoch!r}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise MisconfigurationError(
                f"accumulate_grad_batches={value!r}: epoch {epoch} accumulates {n!r} batches; it must be an int >= 1"
            )
    return {0: 1, **dict(sorted(value.items()))}


def accumulation(schedule: dict[int, int], epoch: int) -> int:
    """Micro-batches per optimizer step in ``epoch``: the schedule's entry of the last key <= epoch."""
    return schedule[max(k for k in schedule if k <= epoch)]




#: Lightning 1.1 Trainer arguments renamed since: (today's name, today's value from the old one)
RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "distributed_backend": ("strategy", lambda v: v),
    "checkpoint_callback": ("enable_checkpointing", lambda v: v),
    "progress_bar_refresh_rate": ("enable_progress_bar",
                                  lambda v: v if isinstance(v, bool) or not isinstance(v, int) else v > 0),
    "terminate_on_nan": ("on_nonfinite_loss", lambda v: ("error" if v else "ignore") if isinstance(v, bool) else v),
}

#: Lightning 1.1 Trainer arguments torchplug has no counterpart for, and what to do instead
RETIRED: dict[str, str] = {
    "auto_lr_find": "torchplug has no tuner: choose the learning rate in configure_optimizers",
    "auto_scale_batch_size": "torchplug has no tuner: choose the batch size in your DataLoader",
    "auto_select_gpus": "choose the GPUs with CUDA_VISIBLE_DEVICES and pass accelerator='gpu', devices=N",
    "tpu_cores": "TPUs are not supported: use accelerator='gpu' or 'cpu'",
    "profiler": "TORCHPLUG_TRACE=trace.json writes every hook call with its duration (chrome://tracing), or run "
                "torch.profiler around trainer.fit",
    "weights_summary": "torchplug prints no model summary: drop it (print(model) shows the layers)",
    "track_grad_norm": "log the norm from on_before_optimizer_step (torch.nn.utils.get_total_norm of the grads)",
    "truncated_bptt_steps": "split the sequence inside training_step",
    "automatic_optimization": "set automatic_optimization = False on the TrainingModule (as in Lightning >= 1.2)",
    "enable_pl_optimizer": "drop it: self.optimizers() gives the wrapped optimizers when optimizing manually",
    "overfit_batches": "pass limit_train_batches=n and the training loader as the validation loader too",
    "min_epochs": "not supported: EarlyStopping(patience=...) or max_epochs bound the run",
    "min_steps": "not supported: EarlyStopping(patience=...) or max_steps bound the run",
    "flush_logs_every_n_steps": "metrics.csv is written every log_every_n_steps: set that",
    "log_gpu_memory": "log torch.cuda.memory_allocated() with self.log in training_step",
    "process_position": "drop it: torchplug shows one progress bar",
    "weights_save_path": "pass ModelCheckpoint(dirpath=...) or default_root_dir",
    "move_metrics_to_cpu": "drop it: logged metrics stay on the device until the logging interval and are then "
                           "read to the host",
    "prepare_data_per_node": "drop it",
    "reload_dataloaders_every_epoch": "not supported: the loaders are iterated anew every epoch; build a new "
                                      "DataLoader in a plugin's on_train_epoch_start if you need one",
    "benchmark": "set torch.backends.cudnn.benchmark = True yourself before fit",
    "replace_sampler_ddp": "the ddp plugin shards a loader without a DistributedSampler itself; pass your own "
                           "DistributedSampler to keep control",
    "sync_batchnorm": "convert the model yourself: torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) before fit",
}


def map_retired(extra: dict[str, Any], args: dict[str, Any], signature: Any) -> dict[str, Any]:
    """Today's arguments for the Lightning 1.1 keywords in ``extra`` (``Trainer(**extra)`` beyond
    its signature): renamed ones mapped with a warning, retired ones refused with the fix, anything
    else a ``TypeError`` naming it (with the closest argument), as Python's own."""
    import difflib

    mapped: dict[str, Any] = {}
    for name, value in extra.items():
        if name in RENAMED:
            new, convert = RENAMED[name]
            if args[new] != signature.parameters[new].default:
                raise MisconfigurationError(
                    f"{name}={value!r} (Lightning 1.1) and {new}={args[new]!r} are one setting; pass {new} only."
                )
            mapped[new] = convert(value)
            _warn(f"{name}={value!r}", f"{new}={mapped[new]!r}")
        elif name in RETIRED:
            raise MisconfigurationError(f"Trainer({name}={value!r}) is a Lightning 1.1 argument torchplug does not "
                                        f"have: {RETIRED[name]}.")
        else:
            close = difflib.get_close_matches(name, list(signature.parameters), n=1)
            raise TypeError(f"Trainer.__init__() got an unexpected keyword argument {name!r}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
    return mapped


__all__ = ["RENAMED", "RETIRED", "accumulation", "check_limit", "check_schedule", "fast_dev_run_overrides",
           "map_retired", "map_spellings"]
