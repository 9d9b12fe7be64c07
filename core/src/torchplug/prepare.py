"""Preparing a fit: checking the user's module and loaders, its optimizers and schedulers, and
the loaders' shards under several processes. Everything here runs before the first step, so a
module or data the loop cannot train is refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from torchplug import transforms
from torchplug.errors import MisconfigurationError
from torchplug.module import MetricStore, TrainingModule
from torchplug.state import SchedulerConfig
from torchplug.utils import mark_scheduler_step
from torchplug.wrappers import TrainingStepModule

if TYPE_CHECKING:
    from torchplug.trainer import Trainer


class StepModule(Protocol):
    """What the loop calls on the user's module (``nn.Module.__getattr__`` hides it from mypy)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any: ...

    def validation_step(self, batch: Any, batch_idx: int) -> Any: ...

    def configure_optimizers(self) -> Any: ...


def check_module(model: Any, need_validation: bool = False, need: tuple[str, ...] | None = None) -> None:
    """Refuse a model the loop cannot train (or validate, or run ``need``'s steps), naming what is missing."""
    if not isinstance(model, nn.Module):
        raise MisconfigurationError(
            f"Expected a torch.nn.Module (a torchplug.TrainingModule), got {type(model).__name__}"
        )
    needed = list(need) if need is not None else ["validation_step"] if need_validation else \
        ["training_step", "configure_optimizers"]
    for name in needed:
        method = getattr(model, name, None)
        if not callable(method) or _is_base_stub(model, name):
            raise MisconfigurationError(
                f"{type(model).__name__} has no {name}(); define it (see torchplug.TrainingModule)."
            )


def _is_base_stub(model: nn.Module, name: str) -> bool:
    base = getattr(TrainingModule, name, None)
    return base is not None and getattr(type(model), name, None) is base


def check_loader(name: str, loader: Any) -> None:
    """Refuse, naming it, a loader that is not iterable or is empty."""
    if not hasattr(loader, "__iter__") or isinstance(loader, (str, bytes, dict)):
        raise MisconfigurationError(f"{name} must be iterable (a DataLoader), got {type(loader).__name__}")
    try:
        empty = len(loader) == 0
    except TypeError:  # iterable without a length
        empty = False
    if empty:
        raise MisconfigurationError(f"{name} is empty (len 0): check the dataset and batch_size/drop_last.")


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
        if loader is not None:
            check_loader(name, loader)
    if val is not None and not callable(getattr(model, "validation_step", None)):
        raise MisconfigurationError(
            f"Validation data was given but {type(model).__name__} has no validation_step(batch, batch_idx)."
        )
    return train, val


def _call_optional(model: nn.Module, name: str) -> Any:
    method = getattr(model, name, None)
    return method() if callable(method) else None



def attach_metrics(module: nn.Module, store: MetricStore | None) -> None:
    attach = getattr(module, "_attach_metrics", None)
    if callable(attach):
        attach(store)


def unwrap(found: Any, wrapper: nn.Module, module: nn.Module) -> nn.Module:
    """The user's module behind ``configure_ddp``'s wrapper: ``get_model_from_plugin``'s answer,
    through any stack of ``TrainingStepModule`` and ``torch.compile`` (``OptimizedModule``,
    ``_orig_mod``) layers, so checkpoints carry no wrapper prefix; the module that was wrapped
    when there is no other answer."""
    while True:
        if isinstance(found, TrainingStepModule):
            found = found.module
        elif isinstance(found, nn.Module) and isinstance(getattr(found, "_orig_mod", None), nn.Module):
            found = found._orig_mod
        else:
            break
    if isinstance(found, nn.Module) and found is not wrapper:
        return found
    return module


def configure_optimizers(module: nn.Module) -> tuple[list[torch.optim.Optimizer], list[SchedulerConfig]]:
    config = cast(StepModule, module).configure_optimizers()
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[SchedulerConfig] = []

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
        schedulers.append(SchedulerConfig(sched, entry["interval"], entry.get("monitor")))

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


def rebind_schedulers(schedulers: list[SchedulerConfig], old: list[torch.optim.Optimizer],
                      new: list[torch.optim.Optimizer]) -> None:
    """setup_optimizers (ZeRO) and apex's initialize may return new optimizer objects; schedulers
    must follow them."""
    mapping = {id(o): n for o, n in zip(old, new) if o is not n}
    for entry in schedulers:
        sched = entry.scheduler
        opt = getattr(sched, "optimizer", None)
        if opt is not None and id(opt) in mapping:
            sched.optimizer = mapping[id(opt)]
            mark_scheduler_step(sched.optimizer)  # or the re-bound scheduler warns every fit


def distributed_loader(loader: Any, trainer: Trainer, shuffle_default: bool) -> Any:
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


@dataclass
class Prepared:
    """The parts of a fit, after the setup hooks ran, in the order they ran."""

    device: torch.device
    module: nn.Module  # the user's module (what configure_apex may have replaced)
    model: nn.Module  # what configure_ddp returned: ``module`` or a wrapper of it
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[SchedulerConfig]
    train_loader: Any
    val_loader: Any


def prepare(trainer: Trainer, module: nn.Module, train_loader: Any, val_loader: Any,
            metrics: MetricStore) -> Prepared:
    """Device, model init and transforms, optimizers, precision, wrapper and sharded loaders,
    each step once the ones it depends on are final (hookspecs.py, phase 2): ``root_device`` →
    ``model_init_context`` around ``configure_model()`` → the module to its device →
    ``model_transforms`` in their declared order → ``configure_optimizers`` →
    ``setup_optimizers`` → ``on_after_setup_optimizers`` → ``connect_precision`` →
    ``configure_ddp`` (→ ``get_model_from_plugin``)."""
    hooks = trainer.hooks
    device = hooks.root_device(trainer=trainer, model=module)
    transforms.configure_model(trainer, module)
    if not transforms.has_meta_tensors(module):  # else a transform materialises them
        module.to(device)
    declared = transforms.collect(hooks.answers("model_transforms", trainer=trainer, model=module))
    ordered = transforms.order(declared)  # refused before any transform runs
    transforms.apply(ordered, module)
    trainer.model_transforms = [(item.transform.name, item.plugin) for item in ordered]
    if transforms.has_meta_tensors(module):
        raise MisconfigurationError(
            f"{type(module).__name__} still has meta-device parameters or buffers after the model transforms "
            f"({', '.join(n for n, _ in trainer.model_transforms) or 'none'}): the plugin whose model_init_context "
            "created them must materialise them in a model transform (module.to_empty(device=...))."
        )
    attach_metrics(module, metrics)
    optimizers, schedulers = configure_optimizers(module)
    replaced = list(hooks.setup_optimizers(trainer=trainer, optimizers=optimizers))
    if len(replaced) != len(optimizers):
        raise MisconfigurationError(
            f"setup_optimizers returned {len(replaced)} optimizers for the {len(optimizers)} that "
            "configure_optimizers() made; return one per optimizer, in order."
        )
    rebind_schedulers(schedulers, optimizers, replaced)
    optimizers = trainer.optimizers = replaced
    trainer.lr_schedulers = [s.scheduler for s in schedulers]
    trainer.lr_scheduler_configs = schedulers
    hooks.on_after_setup_optimizers(trainer=trainer)
    module, connected = hooks.connect_precision(trainer=trainer, model=module, optimizers=optimizers)
    rebind_schedulers(schedulers, optimizers, connected)
    optimizers = trainer.optimizers = list(connected)
    model = hooks.configure_ddp(model=module, device_ids=[device.index or 0] if device.type == "cuda" else None)
    if model is not module:
        module = unwrap(hooks.get_model_from_plugin(model=model), model, module)
    return Prepared(
        device=device, module=module, model=model, optimizers=optimizers, schedulers=schedulers,
        train_loader=distributed_loader(train_loader, trainer, shuffle_default=True),
        val_loader=distributed_loader(val_loader, trainer, shuffle_default=False),
    )
