"""The fit loop: one process's whole run, set up, trained, validated and checkpointed.

``FitRun.train`` is the loop, in execution order; every hook is called on the line where its
step happens. Per micro-batch::

    on_before_forward → [block_backward_sync, entered unless last of the window]
        → forward_context → training_step → backward(loss / window length)
    at the window's end, per optimizer: unscale_gradients → on_before_optimizer_step
        → clip_gradients (gradient_clip_val > 0)
    → optimizer_step (may be skipped) → zero_grad(set_to_none=True)
    → LR schedulers (interval "step"; not after a skipped step) → on_train_batch_end
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from torchplug import __version__
from torchplug import checkpoint as ckpt
from torchplug.errors import CheckpointError, MisconfigurationError, NonFiniteLossError
from torchplug.metrics import CSVLogger, ProgressBar, to_floats
from torchplug.module import MetricStore

if TYPE_CHECKING:
    from torchplug.trainer import FitOutcome, Trainer


def check_module(model: Any, need_validation: bool = False) -> None:
    """Refuse a model the loop cannot train, naming what is missing."""
    if not isinstance(model, nn.Module):
        raise MisconfigurationError(f"fit() needs a torch.nn.Module (a torchplug.TrainingModule), got {type(model).__name__}")
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
    if train is None and need_train:
        train = _call_optional(model, "train_dataloader")
        if train is None:
            raise MisconfigurationError(
                f"No training data: pass fit(model, train_dataloaders=...) or define {type(model).__name__}.train_dataloader()."
            )
    if val is None:
        val = _call_optional(model, "val_dataloader")
    for name, loader in (("train_dataloaders", train), ("val_dataloaders", val)):
        if loader is None:
            continue
        if not hasattr(loader, "__iter__"):
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
        self.last_checkpoint: Path | None = None
        trainer._run = self  # type: ignore[attr-defined]  # for trainer.save_checkpoint

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        trainer, hooks, module = self.trainer, self.hooks, self.module
        if trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        hooks.setup_environment(trainer=trainer)
        trainer.world_size = hooks.world_size()
        trainer.global_rank = hooks.global_rank()
        device = hooks.root_device(trainer=trainer, model=module)
        self.device = device
        module.to(device)
        if hasattr(module, "_attach_metrics"):
            module._attach_metrics(self.metrics)
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
        self.train_loader = _distributed_loader(self.train_loader, trainer, shuffle_default=True)
        self.val_loader = _distributed_loader(self.val_loader, trainer, shuffle_default=False)
        if trainer.is_global_zero and (trainer.logger or trainer.enable_checkpointing):
            self.log_dir = _new_version_dir(trainer.default_root_dir / "torchplug_logs")
            if trainer.logger:
                self.csv = CSVLogger(self.log_dir)
        self.progress = ProgressBar(trainer.enable_progress_bar and trainer.is_global_zero)
        if self.resume is not None:
            self._restore(self.resume)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> None:
        trainer, hooks, module, model = self.trainer, self.hooks, self.module, self.model
        optimizers, metrics = self.optimizers, self.metrics
        accumulate, clip = trainer.accumulate_grad_batches, trainer.gradient_clip_val
        norm_type, max_steps = trainer.gradient_clip_norm_type, trainer.max_steps
        step_schedulers = [s["scheduler"] for s in self.schedulers if s["interval"] == "step"]
        # A wrapper from configure_ddp runs training_step itself (inside DDP's forward).
        training_step = module.training_step if model is module else model
        check_loss = trainer.on_nonfinite_loss != "ignore"
        no_sync = nullcontext()

        hooks.on_fit_start(trainer=trainer, model=module)
        while not self._finished():
            epoch = self.epoch
            n_batches = _num_batches(self.train_loader, trainer.limit_train_batches)
            batches = self._epoch_batches(epoch)
            hooks.on_train_epoch_start(trainer=trainer, epoch=epoch)
            self.progress.start_epoch(epoch, n_batches)
            model.train()
            for batch_idx, batch in batches:
                window_start = batch_idx - batch_idx % accumulate
                window_len = min(accumulate, n_batches - window_start) if n_batches else accumulate
                window_end = batch_idx + 1 == window_start + window_len
                args = hooks.on_before_forward(model=model, args=(batch, batch_idx))
                with no_sync if window_end else hooks.block_backward_sync(model=model):
                    with hooks.forward_context(model=model):
                        output = training_step(*args)
                    loss = _loss_of(output, batch_idx, epoch)
                    if check_loss and not bool(torch.isfinite(loss)):
                        if trainer.on_nonfinite_loss == "error":
                            raise NonFiniteLossError(
                                f"training_step returned a non-finite loss ({loss.item()}) at epoch {epoch}, "
                                f"batch {batch_idx}, global step {self.global_step}. Pass "
                                "Trainer(on_nonfinite_loss='skip') to skip such batches."
                            )
                    else:
                        hooks.backward(loss=loss / window_len if window_len > 1 else loss,
                                       optimizers=optimizers, model=model)
                if window_end:
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
                    self.global_step += 1
                    self.batch_in_epoch = batch_idx + 1
                    if self.global_step % trainer.log_every_n_steps == 0:
                        self._log_train()
                hooks.on_train_batch_end(trainer=trainer, outputs=output, batch=args[0], batch_idx=batch_idx)
                self.progress.update()
                if 0 < max_steps <= self.global_step:
                    break
            else:  # the epoch's data is exhausted
                self._end_epoch(epoch)
                continue
            # max_steps reached: the epoch still ends if its last batch was trained
            if n_batches is not None and self.batch_in_epoch >= n_batches:
                self._end_epoch(epoch)
            break
        self._log_train()
        self.progress.close()
        if trainer.enable_checkpointing and trainer.is_global_zero:
            self.save_checkpoint(self._last_checkpoint_path())
        hooks.on_fit_end(trainer=trainer, model=module)

    def _end_epoch(self, epoch: int) -> None:
        trainer, hooks = self.trainer, self.hooks
        hooks.on_train_epoch_end(trainer=trainer, epoch=epoch)
        self._log_train()
        if self.val_loader is not None and (epoch + 1) % trainer.check_val_every_n_epoch == 0:
            self.validate()
        for sched in self.schedulers:
            if sched["interval"] == "epoch":
                monitor = sched.get("monitor")
                if monitor is not None:
                    if monitor not in self.callback_metrics:
                        raise MisconfigurationError(
                            f"LR scheduler monitors {monitor!r}, which no step logged; logged: {sorted(self.callback_metrics)}"
                        )
                    sched["scheduler"].step(self.callback_metrics[monitor])
                else:
                    sched["scheduler"].step()
        self.epoch = epoch + 1
        self.batch_in_epoch = 0
        self.epoch_rng = None
        if trainer.enable_checkpointing and trainer.is_global_zero:
            self.save_checkpoint(self._last_checkpoint_path())

    def _finished(self) -> bool:
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        return (max_epochs is not None and self.epoch >= max_epochs) or (0 < max_steps <= self.global_step)

    def _epoch_batches(self, epoch: int) -> Any:
        """The epoch's (index, batch) pairs; a resumed epoch replays its shuffle from the RNG
        state saved at the epoch's start and skips the batches already trained."""
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # before the iterator exists, or every epoch repeats
        skip = self.batch_in_epoch
        restore_after = None
        if skip and self.epoch_rng is not None:
            restore_after = ckpt.rng_states()
            ckpt.set_rng_states(self.epoch_rng)
        else:
            self.epoch_rng = ckpt.rng_states()
        iterator = iter(loader)
        limit = self.trainer.limit_train_batches
        for _ in range(skip):
            next(iterator)
        if restore_after is not None:
            ckpt.set_rng_states(restore_after)
        index = skip
        for batch in iterator:
            if limit is not None and index >= limit:
                break
            yield index, batch
            index += 1

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        trainer, hooks, module = self.trainer, self.hooks, self.module
        module.eval()
        self.metrics.begin_validation()
        limit = trainer.limit_val_batches
        try:
            with torch.no_grad():
                for batch_idx, batch in enumerate(self.val_loader):
                    if limit is not None and batch_idx >= limit:
                        break
                    args = hooks.on_before_forward(model=module, args=(batch, batch_idx))
                    with hooks.forward_context(model=module):
                        module.validation_step(*args)  # type: ignore[operator]
        finally:
            values = self.metrics.end_validation()
            module.train()
        reduced = {name: hooks.reduce(tensor=torch.as_tensor(value, dtype=torch.float32, device=self.device), op="mean")
                   for name, value in values.items()}
        result = to_floats(reduced)  # type: ignore[arg-type]
        self.callback_metrics.update(result)
        if self.csv is not None:
            self.csv.log(self.global_step, self.epoch, result)
        self.progress.show(self.callback_metrics)
        hooks.on_validation_end(trainer=trainer, metrics=result)
        return result

    def validate_only(self) -> dict[str, float]:
        trainer, hooks = self.trainer, self.hooks
        self.device = hooks.root_device(trainer=trainer, model=self.module)
        self.module.to(self.device)
        if hasattr(self.module, "_attach_metrics"):
            self.module._attach_metrics(self.metrics)
        return self.validate()

    def _log_train(self) -> None:
        if not self.metrics.train:
            return
        values = to_floats(self.metrics.train)
        self.metrics.train.clear()
        if self.skipped_steps:
            values["skipped_steps"] = float(self.skipped_steps)
        self.callback_metrics.update(values)
        if self.csv is not None:
            self.csv.log(self.global_step, self.epoch, values)
        self.progress.show(self.callback_metrics)

    # -- checkpoints -------------------------------------------------------------------------
    def _last_checkpoint_path(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "checkpoints" / "last.ckpt"

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
            "rng_states": ckpt.rng_states(),
            "epoch_rng_states": self.epoch_rng,
            "callback_metrics": dict(self.callback_metrics),
            "plugins": self.trainer.plugin_names,
        }
        self.hooks.on_save_checkpoint(trainer=self.trainer, checkpoint=checkpoint)
        return checkpoint

    def save_checkpoint(self, path: Path) -> None:
        ckpt.save(self.checkpoint_dict(), path)
        self.last_checkpoint = path

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
            for sched, state in zip(self.schedulers, data.get("lr_schedulers", [])):
                sched["scheduler"].load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"The checkpoint does not match this model or its optimizers: {exc}") from exc
        self.epoch = int(data["epoch"])
        self.batch_in_epoch = int(data.get("batch_in_epoch", 0))
        self.global_step = int(data["global_step"])
        self.skipped_steps = int(data.get("skipped_steps", 0))
        self.callback_metrics = dict(data.get("callback_metrics", {}))
        self.epoch_rng = data.get("epoch_rng_states")
        ckpt.set_rng_states(data["rng_states"])
        self.hooks.on_load_checkpoint(trainer=self.trainer, checkpoint=data)

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> FitOutcome:
        from torchplug.trainer import FitOutcome

        trainer, hooks = self.trainer, self.hooks
        start = time.perf_counter()
        try:
            self.setup()
            self.train()
        except KeyboardInterrupt as exc:
            self._checkpoint_on_interrupt()
            hooks.on_exception(trainer=trainer, exception=exc)
            raise
        except Exception as exc:
            hooks.on_exception(trainer=trainer, exception=exc)
            wrapped = hooks.wrap_error(exc)
            if wrapped is exc:
                raise
            raise wrapped from exc
        finally:
            self.progress.close()
            if self.csv is not None:
                self.csv.close()
            if hasattr(self.module, "_attach_metrics"):
                self.module._attach_metrics(None)
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

    def _checkpoint_on_interrupt(self) -> None:
        """Keep the last completed step: the weights, optimizer state and data position as of
        the last optimizer step (a partial accumulation window is dropped)."""
        if self.trainer.enable_checkpointing and self.trainer.is_global_zero and self.log_dir is not None \
                and self.optimizers:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.save_checkpoint(self._last_checkpoint_path())


def _loss_of(output: Any, batch_idx: int, epoch: int) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise MisconfigurationError(
            f"training_step must return a scalar loss tensor or a dict with 'loss'; got {got} "
            f"at epoch {epoch}, batch {batch_idx}."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            f"The loss returned by training_step at epoch {epoch}, batch {batch_idx} does not require grad "
            "(computed under no_grad, or detached?)."
        )
    return loss


def _num_batches(loader: Any, limit: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return limit
    return min(n, limit) if limit is not None else n


def _configure_optimizers(module: nn.Module) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
    config = module.configure_optimizers()  # type: ignore[operator]
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[dict[str, Any]] = []

    def add_scheduler(item: Any) -> None:
        entry = dict(item) if isinstance(item, dict) else {"scheduler": item}
        entry.setdefault("interval", "epoch")
        if entry["interval"] not in ("step", "epoch"):
            raise MisconfigurationError(f"LR scheduler interval must be 'step' or 'epoch', got {entry['interval']!r}")
        schedulers.append(entry)

    def add(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            optimizers.append(item)
        elif isinstance(item, dict) and "optimizer" in item:
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
    sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                 shuffle=shuffle, drop_last=loader.drop_last)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def _new_version_dir(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
        versions = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
        version = max(versions, default=-1) + 1
        while True:
            path = root / f"version_{version}"
            try:
                path.mkdir()
                return path
            except FileExistsError:  # another run took it meanwhile
                version += 1
    except OSError as exc:
        raise MisconfigurationError(
            f"Cannot create the run folder under {root}: {exc}. Pass a writable default_root_dir, "
            "or Trainer(logger=False, enable_checkpointing=False) to write nothing."
        ) from exc

